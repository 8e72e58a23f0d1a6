"""Which quantization a checkpoint carries: ``config.json``'s ``quantization_config`` -> a
``QuantScheme`` (or None for a plain float checkpoint), and the schemes quantize-on-load makes.

Where it sits: start-up, right after ``HFModelDir`` has read ``config.json`` and before any
tensor is read. A checkpoint quantized by a method we do not run is a ``CheckpointError``
naming the method and the supported ones: its 8-bit tensors without their scales would load
as garbage, never silently.

Supported pre-quantized formats (8-bit weights stored ``[out, in]`` like every HF Linear)::

    quant_method "fp8" (HF fine-grained FP8, e.g. Qwen3-FP8)
        weight_block_size [bn, bk]: weight F8_E4M3 + weight_scale_inv [ceil(out/bn), ceil(in/bk)]
                                    (activations stay bf16 here: w8a16 with block scales)
        no weight_block_size:       weight + per-tensor weight_scale; activation_scheme
                                    "dynamic" (per-token fp8) or "static" (+ input_scale)
    quant_method "compressed-tensors" (llm-compressor), one config group targeting Linear:
        weights 8-bit float, strategy "tensor" | "channel" | "block" -> weight_scale
              ([] / [1], [out, 1], [ceil(out/bn), ceil(in/bk)])
        input_activations: null (weight-only), dynamic "token", or static "tensor" (input_scale)
        weights 8-bit int, strategy "channel", no input activations (int8 weight-only)

Quantize-on-load (``LLM(quantization=...)`` on a float checkpoint): ``"int8"`` and ``"fp8"``
are weight-only with per-output-channel scales (w8a16); ``"fp8_w8a8"`` also quantizes the
activations to fp8 per token at run time (dynamic scales). ``quantize_lm_head`` adds the lm_head
(``QuantScheme.lm_head``), quantized on load from its float weights under any of these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from checkpoints.errors import CheckpointError

ON_LOAD_METHODS = ("int8", "fp8", "fp8_w8a8")
SUPPORTED_CHECKPOINT_METHODS = ("fp8", "compressed-tensors")
_SUPPORTED_TEXT = ("fp8 (fine-grained FP8: weight_block_size + weight_scale_inv, or per-tensor "
                   "weight_scale), compressed-tensors (8-bit float weights with per-tensor, "
                   "per-channel or block weight_scale and dynamic or static input_scale; 8-bit int "
                   "per-channel weight-only)")


@dataclass(frozen=True)
class QuantScheme:
    """How the projection weights are (or will be) quantized.

    weight_dtype: "int8" | "float8_e4m3fn". weight_scales: "channel" | "tensor" | "block" (the
    stored form; the model holds channel or row x K-group scales). block: (bn, bk) for "block".
    activations: None (weight-only), "dynamic" (per-token fp8 at run time), "static" (the
    checkpoint's ``input_scale``). prequantized: tensors are stored 8-bit (else quantize on
    load). ignore: module names the checkpoint left unquantized. lm_head: the lm_head (the
    embedding's transpose for tied models) is quantized on load too, weight-only with
    per-vocab-row scales in ``weight_dtype`` (``quantize_lm_head``), whatever the activations.
    """

    method: str
    weight_dtype: str
    weight_scales: str = "channel"
    block: tuple[int, int] | None = None
    activations: str | None = None
    prequantized: bool = False
    ignore: tuple[str, ...] = ()
    lm_head: bool = False

    @property
    def scale_name(self) -> str:
        """The tensor name suffix of the weight scales in the checkpoint."""
        return "weight_scale_inv" if self.method == "fp8" and self.block else "weight_scale"

    def describe(self) -> str:
        act = {None: "weight-only", "dynamic": "fp8 activations (dynamic per-token scales)",
               "static": "fp8 activations (static input_scale)"}[self.activations]
        scales = f"block {self.block[0]}x{self.block[1]}" if self.block else f"per-{self.weight_scales}"
        where = "pre-quantized checkpoint" if self.prequantized else "quantized on load"
        head = f"; lm_head {self.weight_dtype} weight-only, per-row scales (quantized on load)" \
            if self.lm_head else ""
        return f"{self.method}: {self.weight_dtype} weights, {scales} scales, {act} ({where}){head}"


def on_load_scheme(method: str) -> QuantScheme:
    if method not in ON_LOAD_METHODS:
        raise ValueError(f"quantization must be one of {ON_LOAD_METHODS}, got {method!r}")
    dtype = "int8" if method == "int8" else "float8_e4m3fn"
    return QuantScheme(method, dtype, activations="dynamic" if method == "fp8_w8a8" else None)


def _unsupported(source: str, what: str) -> CheckpointError:
    return CheckpointError(f"{source}: {what}; supported quantization_config methods: {_SUPPORTED_TEXT}")


def checkpoint_scheme(config: dict[str, Any], source: str = "config.json") -> QuantScheme | None:
    """The scheme of a checkpoint's ``quantization_config``; None when it has none."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{source}: quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method == "fp8":
        return _hf_fp8(qc, source)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, source)
    raise _unsupported(source, f"quantization_config.quant_method {method!r} is not supported")


def _hf_fp8(qc: dict[str, Any], source: str) -> QuantScheme:
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise _unsupported(source, f"fp8 quantization_config.fmt {fmt!r} is not supported (only e4m3)")
    act = qc.get("activation_scheme", "dynamic")
    if act not in ("dynamic", "static"):
        raise _unsupported(source, f"fp8 activation_scheme {act!r} is not supported")
    ignore = tuple(qc.get("modules_to_not_convert") or ())
    block = qc.get("weight_block_size")
    if block is not None:
        if not (isinstance(block, list) and len(block) == 2
                and all(isinstance(b, int) and b > 0 for b in block)):
            raise CheckpointError(f"{source}: quantization_config.weight_block_size must be [bn, bk], "
                                  f"got {block!r}")
        if act != "dynamic":
            raise _unsupported(source, "fp8 with weight_block_size and a static activation_scheme")
        return QuantScheme("fp8", "float8_e4m3fn", "block", (block[0], block[1]), None, True, ignore)
    return QuantScheme("fp8", "float8_e4m3fn", "tensor", None, act, True, ignore)


def _compressed_tensors(qc: dict[str, Any], source: str) -> QuantScheme:
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or len(groups) != 1:
        count = len(groups) if isinstance(groups, dict) else repr(groups)
        raise _unsupported(source, f"compressed-tensors with {count} config_groups (only one)")
    (name, group), = groups.items()
    targets = group.get("targets") or []
    if targets != ["Linear"]:
        raise _unsupported(source, f"compressed-tensors config group {name!r} targets {targets!r} "
                           "(only ['Linear'])")
    w = group.get("weights") or {}
    act = group.get("input_activations")
    kind, bits, strategy = w.get("type"), w.get("num_bits"), w.get("strategy")
    if bits != 8 or kind not in ("float", "int") or not w.get("symmetric", True) or w.get("dynamic"):
        raise _unsupported(source, f"compressed-tensors weights {w!r} (8-bit symmetric static float or "
                           "int weights only)")
    if w.get("group_size") is not None or strategy not in ("tensor", "channel", "block"):
        raise _unsupported(source, f"compressed-tensors weight strategy {strategy!r}")
    block = None
    if strategy == "block":
        bs = w.get("block_structure")
        if not (isinstance(bs, list) and len(bs) == 2):
            raise CheckpointError(f"{source}: compressed-tensors block strategy needs "
                                  "block_structure [bn, bk]")
        block = (int(bs[0]), int(bs[1]))
    ignore = tuple(qc.get("ignore") or ())
    if kind == "int":
        if act is not None or strategy != "channel":
            raise _unsupported(source, "compressed-tensors int8 other than per-channel weight-only")
        return QuantScheme("compressed-tensors", "int8", "channel", None, None, True, ignore)
    activations = None
    if act is not None:
        if act.get("num_bits") != 8 or act.get("type") != "float" or not act.get("symmetric", True):
            raise _unsupported(source, f"compressed-tensors input_activations {act!r} (8-bit float only)")
        if act.get("dynamic") and act.get("strategy") == "token":
            activations = "dynamic"
        elif not act.get("dynamic") and act.get("strategy") == "tensor":
            activations = "static"
        else:
            raise _unsupported(source, f"compressed-tensors input_activations strategy "
                               f"{act.get('strategy')!r} with dynamic={act.get('dynamic')!r} "
                               "(dynamic 'token' or static 'tensor' only)")
        if block is not None:
            raise _unsupported(source, "compressed-tensors block weights with fp8 input activations")
    return QuantScheme("compressed-tensors", "float8_e4m3fn", strategy, block, activations, True, ignore)
