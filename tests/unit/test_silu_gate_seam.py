"""``linear_silu_gate`` (jserve/model/linear.py): the MLP's fused gate/up projection and its SiLU
gate in one kernel. The bundled code-small, int8, with wgu on the gated Mosaic GPU kernel
interpreted on CPU (``pallas_kernels/quant_matmul/gated.py``; the SMs made as few as its 12
units, which the config rule asks for), keeps the greedy tokens of the decode kernel and XLA's
gate; where the kernel does not apply, the seam is that composition."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import quant_eval as qe
from kernel_calls import recorded

from jserve.model.linear import linear, linear_silu_gate
from pallas_kernels.quant_matmul import api, gated, mgpu_decode

PROMPT = [0, 334, 1150, 13, 2310, 302, 290, 331]
STEPS = 3   # a prefill and a decode step compiled with the kernel interpreted


def test_fused_gate_in_the_decoder_keeps_the_greedy_tokens(monkeypatch):
    cfg, params = qe.load("int8")
    monkeypatch.setattr(mgpu_decode, "sm_count", lambda: 4)   # 12 units on 6 CTAs of 2
    want = qe.greedy(cfg, params, PROMPT, STEPS)
    interpreted = {k: dataclasses.replace(v, interpret="gpu") if k == "wgu" else v
                   for k, v in params.items()}
    calls = recorded(monkeypatch, gated, "silu_gate_matmul")
    monkeypatch.setattr(api, "SILU_GATE_ON_HOPPER", True)
    jax.clear_caches()
    got = qe.greedy(cfg, interpreted, PROMPT, STEPS)
    assert calls == [(8, cfg.hidden_size)] * 2   # the prefill (8 tokens) and decode (1 -> 8) steps
    assert got == want


def test_the_seam_is_the_composition_elsewhere(monkeypatch):
    cfg, params = qe.load("int8")
    monkeypatch.setattr(api, "SILU_GATE_ON_HOPPER", True)
    calls = recorded(monkeypatch, gated, "silu_gate_matmul")
    w = params["wgu"]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, cfg.hidden_size)), jnp.bfloat16)
    gu = linear(x, w, 0)
    want = np.asarray(jax.nn.silu(gu[:, 0]) * gu[:, 1], np.float32)
    for weight in (w, dataclasses.replace(w, interpret="gpu")):   # CPU; 12 units < 132 SMs
        got = linear_silu_gate(x, weight, 0)
        assert got.shape == (5, cfg.intermediate_size) and got.dtype == x.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-3)
    dense = jnp.asarray(np.random.default_rng(1).standard_normal((1, cfg.hidden_size, 2, 8)), jnp.bfloat16)
    assert linear_silu_gate(x, dense, 0).shape == (5, 8)
    assert calls == []
