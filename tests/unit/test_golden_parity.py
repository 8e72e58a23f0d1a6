"""Golden parity with HF transformers (fixtures made by tools/make_golden_fixtures.py).

float32 logits within 1e-4 relative; greedy tokens identical for 32 steps; tokenizer ids
and RoPE frequencies identical.
"""

import jax
import numpy as np
import pytest
from engine_helpers import run_tokens
from fixture_paths import ARCHS, GOLDEN

from checkpoints import HFModelDir
from jserve.config import ModelConfig
from jserve.kv_cache import allocate_kv_cache
from jserve.model.decoder import forward
from jserve.model.params import load_params
from jserve.model.rope import inv_frequencies
from jserve.sampling_params import SamplingParams
from jserve.step_input import StepInput
from jserve.tokenizer import Tokenizer
from sharding import make_mesh

PAGE = 16


def _reference(arch):
    z = np.load(GOLDEN / arch / "reference.npz")
    prompts = [z["prompts"][i, :n].tolist() for i, n in enumerate(z["prompt_lens"])]
    return z, prompts


def _prefill_logits(cfg, params, prompt):
    """One prefill of the whole prompt over scattered pages; logits at every position."""
    n = len(prompt)
    pages_needed = -(-n // PAGE)
    num_pages = 3 * pages_needed + 2
    kv = allocate_kv_cache(cfg, num_pages, PAGE, "float32", make_mesh(1))
    # Poison the pool: any read of a page the sequence does not own shows up as NaN.
    kv = [(k.at[:].set(np.nan), v.at[:].set(np.nan)) for k, v in kv]
    pages = np.random.default_rng(n).permutation(np.arange(1, num_pages))[:pages_needed]
    pos = np.arange(n, dtype=np.int32)
    batch = StepInput(
        token_ids=np.asarray(prompt, np.int32), positions=pos,
        slot_mapping=(pages[pos // PAGE] * PAGE + pos % PAGE).astype(np.int32),
        page_table=np.pad(pages, (0, 4))[None].astype(np.int32),
        seq_lens=np.array([n], np.int32), query_start_loc=np.array([0, n], np.int32),
        num_seqs=np.array([1], np.int32), logits_indices=pos)
    _, logits = jax.jit(lambda p, k, b: forward(cfg, p, k, b))(params, kv, batch)
    return np.asarray(logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logits_match_hf(arch):
    z, prompts = _reference(arch)
    mdir = HFModelDir(GOLDEN / arch)
    cfg = ModelConfig.from_hf_config(mdir.config, dtype="float32")
    params = load_params(mdir, cfg, make_mesh(1))
    np.testing.assert_allclose(inv_frequencies(cfg), z["rope_inv_freq"], rtol=1e-6)
    for i, prompt in enumerate(prompts):
        ours, ref = _prefill_logits(cfg, params, prompt), z[f"prompt_logits_{i}"]
        rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        assert rel < 1e-4, f"{arch} prompt {i}: relative error {rel:.2e}"
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_match_hf(make_engine, arch):
    z, prompts = _reference(arch)
    engine = make_engine(arch)
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i, tokens in enumerate(run_tokens(engine, prompts, sp)):
        assert tokens == z[f"greedy_{i}"].tolist(), f"{arch} prompt {i}"


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_matches_hf(arch):
    z, _ = _reference(arch)
    tok = Tokenizer.from_dir(GOLDEN / arch)
    assert tok.encode(str(z["text_prompt"])) == z["text_prompt_ids"].tolist()
