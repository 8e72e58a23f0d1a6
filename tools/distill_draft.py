"""Distil jserve's draft model ``code-draft`` from its target ``code-small`` (knowledge distillation).

Where it sits: offline tooling beside ``tools/train_default_model.py`` (whose corpus, file splits,
model code, optimizer style and HF export it imports), never imported by jserve.

What it does: ``prepare`` encodes the same stdlib corpus and file splits with the BUNDLED tokenizer
(``jserve/default_model/code-small/tokenizer.json``; no tokenizer is trained) exactly as
``train_default_model.py prepare`` builds its arrays. ``distill`` loads both bundled models from
their ``model.safetensors`` (checking the loader is the exact inverse of ``hf_tensors`` and that the
held-out losses in the READMEs are reproduced), then trains the student (code-draft's architecture,
started from the bundled draft, from random weights with ``--from-scratch``, or from code-small's
own embedding and chosen layers with ``--init-from-teacher``) against the frozen teacher, whose logits
are computed on the fly in the same jitted step. Loss per position: ``alpha * KL(teacher||student)
+ (1 - alpha) * CE(data)`` at temperature 1. Every ``--eval-every`` steps it measures on the
validation split the greedy agreement (argmax student == argmax teacher, teacher-forced), the mean
KL and the student CE, and keeps the checkpoint with the best agreement; the end prints the same
three on the test split for the bundled and the distilled draft, and writes an HF directory.

Why: speculative decoding accepts a drafted token when it matches the target's choice, so a draft
that imitates code-small's distribution (rather than the data's) gets more tokens accepted per
target step. Greedy agreement is the teacher-forced proxy for greedy acceptance.

``prepare`` reads the running interpreter's stdlib, like ``train_default_model.py``; the bundled
models were trained on CPython 3.12.1's, and ``prepare`` says whether its train/test token counts
match theirs. If not (another Python), the sanity check only warns and the figures are not the
READMEs'; the arrays of a 3.12.1 ``prepare`` can be copied instead.

Run (needs only jax, optax, numpy, tokenizers, safetensors and ml_dtypes; no network)::

    # CPU smoke run (a few minutes)
    python tools/distill_draft.py prepare
    python tools/distill_draft.py distill --out /tmp/dd --steps 40 --batch 4 --eval-every 20 \\
        --eval-windows 16
    # GPU run (defaults: 3000 steps, batch 32 x 512, peak lr 1e-3 from the bundled draft)
    python tools/distill_draft.py prepare && python tools/distill_draft.py distill --out /tmp/dd
    # optional: copy model.safetensors + distill_metrics.json into jserve/default_model/code-draft/
    python tools/distill_draft.py distill --out /tmp/dd --install

The shipped code-draft is this tool's output (session 28, one H200, 62 s): code-small's widths
with two layers, cut from its layers 0 and 4 and distilled for 3,000 steps at peak lr 2e-3::

    python tools/distill_draft.py distill --out /tmp/dd --init-from-teacher 0,4 --lr 2e-3 --eval-every 500

(the session-22 draft, hidden 128 and trained from scratch first, had test agreement 0.524 against
0.617: at batch 1 on a GPU a draft's cost is its kernel count, so the wider layers are free).
``distill`` with no ``--init-from-teacher`` starts from the shipped draft.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_default_model as tdm  # noqa: E402

sys.path.insert(0, str(tdm.REPO))   # (checkpoints/: the project's safetensors header parser)

TEACHER, STUDENT = "code-small", "code-draft"
TOKENIZER = tdm.INSTALL_DIR / TEACHER / "tokenizer.json"
DEFAULT_DATA = tdm.REPO / ".distill_data"
HF_LINEAR = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
             "wo": "self_attn.o_proj", "wg": "mlp.gate_proj", "wu": "mlp.up_proj", "wd": "mlp.down_proj"}
METRICS = ("agreement", "kl", "ce", "teacher_ce")
log = tdm.log


# -------------------------------------------------------------------------------------------- data
def bundled_metrics(name: str) -> dict[str, Any]:
    return json.loads((tdm.INSTALL_DIR / name / "training_metrics.json").read_text())


def expected_losses(model_dir: Path) -> dict[str, float]:
    """The held-out losses a model directory's weights should reproduce: a distilled draft's
    ``distill_metrics.json`` (test only), else its ``training_metrics.json`` (val and test)."""
    distilled = model_dir / "distill_metrics.json"
    if distilled.is_file():
        return {"test": json.loads(distilled.read_text())["test_after"]["ce"]}
    m = json.loads((model_dir / "training_metrics.json").read_text())
    return {"val": m["val_loss"], "test": m["test_loss"]}


def cmd_prepare(ns: argparse.Namespace) -> None:
    """Token arrays like ``train_default_model.cmd_prepare`` (BOS opens, EOS closes each file)."""
    from tokenizers import Tokenizer

    data, stdlib = Path(ns.data), Path(ns.stdlib)
    data.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(TOKENIZER))
    files = tdm.collect_files(stdlib)
    ref = bundled_metrics(TEACHER)
    meta: dict[str, Any] = {"stdlib": str(stdlib), "python": sys.version.split()[0],
                            "tokenizer": str(TOKENIZER.relative_to(tdm.REPO)), "splits": {}}
    for split, items in files.items():
        encs = tok.encode_batch([text for _, text in items])  # post-processor adds BOS
        ids = np.concatenate([np.asarray(e.ids + [1], np.uint16) for e in encs])
        np.save(data / f"{split}.npy", ids)
        meta["splits"][split] = {"files": len(items), "tokens": int(ids.size),
                                 "bytes": sum(len(text.encode()) for _, text in items)}
        log(f"{split}: {len(items)} files, {ids.size} tokens")
    meta["matches_bundled"] = (meta["splits"]["train"]["tokens"] == ref["train_tokens"]
                               and meta["splits"]["test"]["tokens"] == ref["test_tokens"])
    log(f"train/test token counts {'match' if meta['matches_bundled'] else 'DIFFER FROM'} the bundled "
        f"models' ({ref['train_tokens']} / {ref['test_tokens']}; python {meta['python']})")
    (data / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def windows(ids: np.ndarray, limit: int | None) -> np.ndarray:
    """Non-overlapping [n, SEQ_LEN + 1] windows as in ``eval_loss``; ``limit`` keeps n evenly spaced."""
    n = (ids.size - 1) // tdm.SEQ_LEN
    rows = np.arange(n) if not limit or limit >= n else np.linspace(0, n - 1, limit).round().astype(int)
    return ids[(rows * tdm.SEQ_LEN)[:, None] + np.arange(tdm.SEQ_LEN + 1)].astype(np.int32)


# ------------------------------------------------------------------------------------------ models
def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one ``.safetensors`` file as numpy (bf16 included: ``safetensors.numpy``
    cannot return it), through the header parser jserve's own loader uses."""
    from checkpoints.safetensors_header import read_safetensors_header

    raw = path.read_bytes()
    return {name: np.frombuffer(raw[e.data_start:e.data_end], e.numpy_dtype).reshape(e.shape)
            for name, e in read_safetensors_header(path).items()}


def load_params(name: str, model_dir: Path | None = None) -> dict[str, Any]:
    """HF weights of model ``name``'s architecture (from ``model_dir``, default the bundled
    directory) -> ``train_default_model``'s float32 ``[in, out]`` tree (bf16 values), checked to
    be the exact inverse of its ``hf_tensors`` and to match ``init_params``' shapes."""
    import jax

    tensors = read_safetensors((model_dir or tdm.INSTALL_DIR / name) / "model.safetensors")
    f32 = lambda key: np.asarray(tensors[key], np.float32)
    layers = []
    for i in range(tdm.SPECS[name].num_hidden_layers):
        pre = f"model.layers.{i}."
        lp = {ours: np.ascontiguousarray(f32(pre + hf + ".weight").T) for ours, hf in HF_LINEAR.items()}
        layers.append({"ln_attn": f32(pre + "input_layernorm.weight"),
                       "ln_mlp": f32(pre + "post_attention_layernorm.weight"), **lp})
    params = {"embed": f32("model.embed_tokens.weight"), "norm": f32("model.norm.weight"), "layers": layers}
    back = tdm.hf_tensors(params)
    if back.keys() != tensors.keys() or any(not np.array_equal(back[k].view(np.uint16),
                                                               tensors[k].view(np.uint16)) for k in back):
        raise RuntimeError(f"{name}: loader is not the inverse of hf_tensors")
    shapes = jax.eval_shape(lambda: tdm.init_params(tdm.SPECS[name], 0))
    if jax.tree.map(lambda s: s.shape, shapes) != jax.tree.map(lambda a: a.shape, params):
        raise RuntimeError(f"{name}: loaded tree does not match init_params' layout")
    return params


def sanity_check(teacher: dict, student: dict | None, student_dir: Path | None, data: Path,
                 batch: int) -> dict[str, Any]:
    """``eval_loss`` of the loaded models on val/test vs. the losses their directories record
    (``expected_losses``); the teacher alone when ``student`` is None."""
    meta = json.loads((data / "meta.json").read_text())
    out: dict[str, Any] = {}
    pairs = [(TEACHER, teacher, tdm.INSTALL_DIR / TEACHER)] + ([] if student is None else
                                                              [(STUDENT, student, student_dir)])
    for name, params, model_dir in pairs:
        for split, want in expected_losses(model_dir).items():
            loss = tdm.eval_loss(tdm.SPECS[name], params, np.load(data / f"{split}.npy"), batch)
            diff = loss - want
            out[f"{name}_{split}_loss"] = round(loss, 4)
            log(f"check {name} {split} loss {loss:.4f} (bundled {want:.4f}, diff {diff:+.4f})")
            if abs(diff) > 2e-3 and meta.get("matches_bundled"):
                raise RuntimeError(f"{name}: loaded weights do not reproduce the bundled {split} loss")
            if abs(diff) > 2e-3:
                log("  warning: --data was not prepared from the bundled models' corpus (see prepare)")
    return out


# ---------------------------------------------------------------------------------------- distill
def position_terms(spec: Any, teacher: Any, student: Any, seqs: Any) -> tuple[Any, Any, Any, Any]:
    """seqs int32[B, T + 1] -> float32[B, T] each: KL(teacher||student), student CE, agreement,
    teacher CE (bf16 matmuls, temperature 1); ``spec``: the student's ``ModelSpec``."""
    import jax
    import jax.numpy as jnp
    import optax

    inputs, labels = seqs[:, :-1], seqs[:, 1:]
    t_logits = jax.lax.stop_gradient(tdm.forward(tdm.SPECS[TEACHER], teacher, inputs, jnp.bfloat16))
    s_logits = tdm.forward(spec, student, inputs, jnp.bfloat16)
    t_lp, s_lp = jax.nn.log_softmax(t_logits), jax.nn.log_softmax(s_logits)
    kl = jnp.sum(jnp.exp(t_lp) * (t_lp - s_lp), axis=-1)
    ce = optax.softmax_cross_entropy_with_integer_labels(s_logits, labels)
    agree = (jnp.argmax(s_logits, -1) == jnp.argmax(t_logits, -1)).astype(jnp.float32)
    return kl, ce, agree, optax.softmax_cross_entropy_with_integer_labels(t_logits, labels)


def make_evaluator(spec: Any, batch: int) -> Any:
    """-> evaluate(teacher, student, windows) = {metric: mean over all positions} for a student
    of ``spec``'s architecture."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def rows(teacher: Any, student: Any, seqs: Any) -> Any:
        kl, ce, agree, t_ce = position_terms(spec, teacher, student, seqs)
        return jnp.stack([agree.mean(-1), kl.mean(-1), ce.mean(-1), t_ce.mean(-1)], -1)

    def evaluate(teacher: Any, student: Any, wins: np.ndarray) -> dict[str, float]:
        out = []
        for i in range(0, len(wins), batch):
            chunk = wins[i:i + batch]
            out.append(np.asarray(rows(teacher, student, np.pad(chunk, ((0, batch - len(chunk)), (0, 0)))))
                       [:len(chunk)])
        return {k: round(float(v), 4) for k, v in zip(METRICS, np.concatenate(out).mean(0), strict=True)}

    return evaluate


def make_run_steps(ns: argparse.Namespace, spec: Any, lr: float, chunk: int) -> tuple[Any, Any]:
    """(optimizer, jitted run_steps(params, opt_state, teacher, ids, starts, first)) in
    ``train_one``'s style: AdamW, warm-up + cosine, clip 1.0, sampler keyed by the step."""
    import jax
    import jax.numpy as jnp
    import optax

    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(ns.warmup, ns.steps // 10), ns.steps,
                                               end_value=lr * 0.05)
    decay_mask = lambda p: jax.tree.map(lambda a: a.ndim == 2, p)  # no decay on norms
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=spec.weight_decay,
                                  mask=decay_mask))
    data_key = jax.random.key(ns.seed)

    def sample(ids: Any, starts: Any, step: Any) -> Any:
        """[batch, SEQ_LEN + 1] windows; a quarter start at a file's BOS (as in train_one)."""
        limit = ids.size - tdm.SEQ_LEN - 1
        k1, k2, k3 = jax.random.split(jax.random.fold_in(data_key, step), 3)
        anywhere = jax.random.randint(k1, (ns.batch,), 0, limit)
        at_doc = jnp.minimum(starts[jax.random.randint(k2, (ns.batch,), 0, starts.size)], limit)
        first = jnp.where(jax.random.uniform(k3, (ns.batch,)) < 0.25, at_doc, anywhere)
        return ids[first[:, None] + jnp.arange(tdm.SEQ_LEN + 1)[None, :]]

    def loss_fn(student: Any, teacher: Any, seqs: Any) -> tuple[Any, Any]:
        kl, ce, _, _ = position_terms(spec, teacher, student, seqs)
        return jnp.mean(ns.alpha * kl + (1.0 - ns.alpha) * ce), jnp.stack([kl.mean(), ce.mean()])

    @jax.jit
    def run_steps(params: Any, opt_state: Any, teacher: Any, ids: Any, starts: Any, first: Any) -> Any:
        def one_step(carry: Any, step: Any) -> Any:
            params, opt_state = carry
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, teacher, sample(ids, starts, step))
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), jnp.concatenate([loss[None], aux])

        (params, opt_state), stats = jax.lax.scan(one_step, (params, opt_state), first + jnp.arange(chunk))
        return params, opt_state, jnp.mean(stats, 0)

    return opt, run_steps


def distill(ns: argparse.Namespace, spec: Any, teacher: Any, student: Any, evaluate: Any,
            val: np.ndarray) -> tuple[dict, dict[str, Any]]:
    """Train; -> (bf16-rounded params of the best-val-agreement checkpoint (step 0, the start,
    included), {"peak_lr", "best_step", "best_val_agreement", "history"})."""
    import jax
    import jax.numpy as jnp

    lr = ns.lr or (spec.peak_lr if ns.from_scratch else 1e-3)
    opt, run_steps = make_run_steps(ns, spec, lr, ns.eval_every)
    train_ids = np.load(Path(ns.data) / "train.npy").astype(np.int32)
    ids, starts = jnp.asarray(train_ids), jnp.asarray(np.flatnonzero(train_ids == 0).astype(np.int32))
    as_bf16 = lambda p: jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), p)
    params, opt_state = student, opt.init(student)
    history = [{"step": 0, **{f"val_{k}": v for k, v in evaluate(teacher, student, val).items()}}]
    best = (history[0]["val_agreement"], 0, jax.device_get(student))
    log(f"step 0: {history[0]} (lr {lr})")
    t0 = time.perf_counter()
    for first in range(0, ns.steps, ns.eval_every):
        params, opt_state, stats = run_steps(params, opt_state, teacher, ids, starts, first)
        shipped = as_bf16(params)
        train = np.round(np.asarray(stats), 4).tolist()
        row = {"step": first + ns.eval_every,
               **dict(zip(("train_loss", "train_kl", "train_ce"), train, strict=True)),
               **{f"val_{k}": v for k, v in evaluate(teacher, shipped, val).items()},
               "seconds": round(time.perf_counter() - t0, 1)}
        history.append(row)
        log(f"step {row['step']}: train loss {row['train_loss']:.4f} (kl {row['train_kl']:.4f} ce "
            f"{row['train_ce']:.4f}) | val agree {row['val_agreement']:.4f} kl {row['val_kl']:.4f} "
            f"ce {row['val_ce']:.4f} ({row['seconds']:.0f} s)")
        if row["val_agreement"] > best[0]:
            best = (row["val_agreement"], row["step"], jax.device_get(shipped))
    log(f"best val agreement {best[0]:.4f} at step {best[1]}")
    return best[2], {"peak_lr": lr, "best_step": best[1], "best_val_agreement": best[0], "history": history}


def table(start: str, before: dict[str, float], after: dict[str, float], n_windows: int) -> str:
    rows = [f"| {name} | {m['agreement']:.4f} | {m['kl']:.4f} | {m['ce']:.4f} |"
            for name, m in ((f"{start} (before)", before), ("distilled (after)", after))]
    return "\n".join([f"Test split, {n_windows} windows x {tdm.SEQ_LEN} tokens, teacher code-small "
                      f"CE {after['teacher_ce']:.4f}:", "",
                      "| draft | greedy agreement | KL(teacher‖draft) | CE |", "| --- | --- | --- | --- |",
                      *rows])


def from_teacher(teacher: dict[str, Any], layers: list[int]) -> dict[str, Any]:
    """A student cut from the teacher: its embedding, final norm and ``layers`` (indices into its
    stack, in order) -> float32 params of code-draft's architecture, which must have the
    teacher's widths and ``len(layers)`` layers."""
    t_spec, s_spec = tdm.SPECS[TEACHER], tdm.SPECS[STUDENT]
    widths = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
    differ = [w for w in widths if getattr(t_spec, w) != getattr(s_spec, w)]
    if differ:
        raise SystemExit(f"--init-from-teacher: {STUDENT}'s {', '.join(differ)} differ from {TEACHER}'s")
    bad = [i for i in layers if not 0 <= i < t_spec.num_hidden_layers]
    if len(layers) != s_spec.num_hidden_layers or bad:
        raise SystemExit(f"--init-from-teacher: {layers} must be {s_spec.num_hidden_layers} indices into "
                         f"{TEACHER}'s {t_spec.num_hidden_layers} layers")
    return {"embed": teacher["embed"], "norm": teacher["norm"],
            "layers": [dict(teacher["layers"][i]) for i in layers]}


def cmd_distill(ns: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp

    if ns.steps % ns.eval_every:
        raise SystemExit("--steps must be a multiple of --eval-every")
    t0, data, out = time.perf_counter(), Path(ns.data), Path(ns.out)
    log(f"jax {jax.__version__} on {jax.devices()}")
    teacher_f32 = load_params(TEACHER)
    spec = tdm.SPECS[STUDENT]
    if ns.init_from_teacher:
        start = from_teacher(teacher_f32, [int(i) for i in ns.init_from_teacher.split(",")])
        start_name = f"{TEACHER}'s layers {ns.init_from_teacher}"
        check = {} if ns.skip_check else sanity_check(teacher_f32, None, None, data, ns.batch)
    else:
        student_dir = Path(ns.student) if ns.student else tdm.INSTALL_DIR / STUDENT
        bundled = load_params(STUDENT, student_dir)
        check = {} if ns.skip_check else sanity_check(teacher_f32, bundled, student_dir, data, ns.batch)
        start = tdm.init_params(spec, ns.seed) if ns.from_scratch else bundled
        start_name = "random init" if ns.from_scratch else f"draft {student_dir.name}"
    teacher = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), teacher_f32)  # exact: bf16 values
    val, test = (windows(np.load(data / f"{s}.npy"), ns.eval_windows) for s in ("val", "test"))
    evaluate = make_evaluator(spec, ns.batch)
    best, run = distill(ns, spec, teacher, start, evaluate, val)
    before, after = evaluate(teacher, start, test), evaluate(teacher, best, test)
    report = table(start_name, before, after, len(test))
    log("\n" + report)
    metrics = {"flags": {k: v for k, v in vars(ns).items() if k != "func"}, "sanity_check": check,
               "test_before": before, "test_after": after, "test_windows": len(test),
               "val_windows": len(val), "table": report, **run,
               "seconds": round(time.perf_counter() - t0, 1), "device": str(jax.devices()[0].device_kind)}
    tdm.write_static_files(spec, tdm.INSTALL_DIR / STUDENT, out)  # config + bundled tokenizer files
    tdm.write_weights(spec, best, metrics, out)
    (out / "training_metrics.json").replace(out / "distill_metrics.json")
    log(f"wrote {out} ({metrics['seconds']:.0f} s)")
    if ns.install:
        for f in ("model.safetensors", "distill_metrics.json"):
            shutil.copyfile(out / f, tdm.INSTALL_DIR / STUDENT / f)
        log(f"installed into {tdm.INSTALL_DIR / STUDENT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="token arrays with the bundled tokenizer")
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.set_defaults(func=cmd_prepare)
    d = sub.add_parser("distill", help="distil code-draft from code-small; write an HF directory")
    d.add_argument("--data", default=str(DEFAULT_DATA))
    d.add_argument("--out", required=True)
    d.add_argument("--steps", type=int, default=3000)
    d.add_argument("--batch", type=int, default=32)
    d.add_argument("--lr", type=float, default=None, help="peak lr (default 1e-3; 3e-3 --from-scratch)")
    d.add_argument("--warmup", type=int, default=200)
    d.add_argument("--alpha", type=float, default=0.9, help="weight of the KL term (1 - alpha: data CE)")
    d.add_argument("--eval-every", type=int, default=200)
    d.add_argument("--eval-windows", type=int, default=None, help="limit val/test windows (smoke runs)")
    d.add_argument("--seed", type=int, default=3)
    d.add_argument("--student", default=None,
                   help="HF directory of the draft to start from (default the bundled code-draft, "
                        "which ships distilled; its from-scratch base: train_default_model.py train "
                        "--models code-draft)")
    d.add_argument("--from-scratch", action="store_true", help="start from init_params, not code-draft")
    d.add_argument("--init-from-teacher", default=None, metavar="LAYERS",
                   help="start from code-small's embedding, final norm and these layers (comma list of "
                        "indices): a student of code-small's widths with that many layers")
    d.add_argument("--skip-check", action="store_true", help="skip the bundled-loss sanity check")
    d.add_argument("--install", action="store_true",
                   help="copy model.safetensors + distill_metrics.json into jserve/default_model/code-draft/")
    d.set_defaults(func=cmd_distill)
    ns = parser.parse_args()
    ns.func(ns)


if __name__ == "__main__":
    main()
