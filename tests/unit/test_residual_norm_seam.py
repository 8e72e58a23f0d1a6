"""``linear_residual_norm`` (jserve/model/linear.py): the o and down projections joined to the
residual stream and normed for what comes next, in the decoder. The bundled code-small, int8,
with wo / wd running the Mosaic GPU decode kernel and the fused epilogue interpreted on CPU
(``pallas_kernels/quant_matmul/residual_norm.py``), keeps the reference's greedy tokens."""

import dataclasses

import jax
import quant_eval as qe
from kernel_calls import recorded

from pallas_kernels.quant_matmul import api, residual_norm

PROMPT = [0, 334, 1150, 13, 2310, 302, 290, 331]
STEPS = 3   # a prefill and a decode step compiled with the kernels interpreted


def test_fused_epilogue_in_the_decoder_keeps_the_greedy_tokens(monkeypatch):
    cfg, params = qe.load("int8")
    monkeypatch.setattr(api, "RESIDUAL_NORM_ON_HOPPER", False)   # (on by default)
    want = qe.greedy(cfg, params, PROMPT, STEPS)
    interpreted = {k: dataclasses.replace(v, interpret="gpu") if k in ("wo", "wd") else v
                   for k, v in params.items()}
    calls = recorded(monkeypatch, residual_norm, "residual_rms_norm")
    monkeypatch.setattr(api, "RESIDUAL_NORM_ON_HOPPER", True)
    jax.clear_caches()
    got = qe.greedy(cfg, interpreted, PROMPT, STEPS)
    # Traced once per step shape: o's (normed by ln_mlp) and down's (by the next ln_attn, or
    # by the final norm after the last layer: one trace of the layer serves all 8 layers).
    assert len(calls) == 4
    assert got == want
