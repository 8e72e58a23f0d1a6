"""The activation probe fitted to the layer count (jserve/activation_peak.py): probes of the
first 2 and 4 layers extended to the model's layers give the whole-model probe's figure; only
models it fits (more layers, one stage, no speculation, every window kind in the first layers)
are fitted; a fitted figure below the compiled steps' own peak makes the builder size the pool
again and compile again, and keeps the corrected figure. The probe's programs compile for their
memory analysis only (GPU: unoptimized code generation, same buffers)."""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
from fixture_paths import GOLDEN

import jserve.builder as builder
from jserve import compile_pool
from jserve.activation_peak import ActivationPeak, fit_layers, measure_activation_peak
from jserve.builder import EngineArgs, make_engine_config, resolve_model
from jserve.kv_cache import MemoryBudget
from jserve.model.params import random_params
from jserve.runner import Runner
from jserve.startup_cache import StartupCache
from sharding import make_mesh


def _config(layers: int, **engine):
    args = EngineArgs(model=str(GOLDEN / "llama"), dtype="float32", max_model_len=128, max_num_seqs=8,
                      max_num_batched_tokens=32, **engine)
    model, _ = resolve_model(args)
    model = dataclasses.replace(model, num_layers=layers, sliding_windows=(None,) * layers)
    return make_engine_config(args, model)


def test_the_fit_from_2_and_4_layers_is_the_whole_models_figure(caplog):
    config = _config(6)
    mesh = make_mesh(1)
    params = random_params(config.model, mesh)
    whole = measure_activation_peak(config, params, mesh)
    with caplog.at_level(logging.INFO, logger="jserve.activation_peak"):
        fitted = measure_activation_peak(config, params, mesh, fit=True)
    assert fitted.fitted and not whole.fitted
    assert (fitted.steps, fitted.moves) == (whole.steps, whole.moves) and whole.moves > 0
    assert "fitted to 6 layers from probes of 2 and 4" in caplog.text
    assert fitted.shortfall(whole.steps) is None and whole.shortfall(whole.steps + 1) is None
    assert fitted.shortfall(whole.steps + 1) == whole.steps + 1 + whole.moves


def test_only_models_the_fit_holds_for_are_fitted():
    assert fit_layers(_config(6)) == (2, 4)
    assert fit_layers(_config(4)) is None   # no fewer layers to probe
    assert fit_layers(_config(6, speculative_config={"method": "ngram", "num_speculative_tokens": 2})) is None
    windowed = _config(6)
    kinds = dataclasses.replace(windowed.model, sliding_windows=(None, None, 64, None, None, 64))
    assert fit_layers(dataclasses.replace(windowed, model=kinds)) is None   # a kind after layer 2
    both = dataclasses.replace(windowed.model, sliding_windows=(64, None) * 3)
    assert fit_layers(dataclasses.replace(windowed, model=both)) == (2, 4)


def test_a_fitted_figure_below_the_compiled_steps_sizes_the_pool_again(make_engine, tmp_path, monkeypatch,
                                                                        caplog):
    """A fit that came out too small (here: 1 byte of steps) is caught once the steps compile:
    the pool is sized from their own peak, the steps compile again, and the corrected figure
    is kept for the next start."""
    cache = StartupCache(str(tmp_path))
    usable = 256 * 2**20

    def budget(config, weight_bytes, device, activations):
        return MemoryBudget(usable, weight_bytes, builder.runner_state_bytes(config), activations())

    def fit_too_small(*a, **k):
        assert k["fit"]   # a one-process engine asks for the fit
        return ActivationPeak(1, 1000, True, cache, "engine")

    compiles, plans = [], []
    real, plan_pool = Runner.compile, builder.plan_pool
    monkeypatch.setattr(Runner, "compile", lambda self, *a, **k: compiles.append(self) or real(self, *a, **k))
    monkeypatch.setattr(builder, "plan_pool", lambda config, budget, draft=None: plans.append(
        (budget.activation_bytes, plan := plan_pool(config, budget, draft))) or plan)
    monkeypatch.setattr(builder, "memory_budget", budget)
    monkeypatch.setattr(builder, "measure_activation_peak", fit_too_small)
    with caplog.at_level(logging.WARNING, logger="jserve.builder"):
        engine = make_engine(num_pages=None, max_num_batched_tokens=16)
    assert len(compiles) == 2 and engine.runner is compiles[1]
    need = compiles[0].steps_peak + 1000
    assert [act for act, _ in plans] == [1001, need] and cache.get("engine", "activation_bytes") == need
    assert plans[1][1].num_pages < plans[0][1].num_pages and "sized again" in caplog.text
    assert engine.runner.kv[0][0].shape[0] == plans[1][1].num_pages   # the pool of the second plan


def test_the_probe_compiles_for_its_memory_analysis_only(make_engine, monkeypatch):
    """GPU: LLVM and ptxas unoptimized (``MEASURE_ONLY``, after buffer assignment): XLA takes
    the options, the figure is the optimized program's, and only the probe asks for them. The
    real steps' own peak is kept for the builder's check (``Runner.steps_peak``)."""
    low = jax.jit(lambda x: jnp.tanh(x @ x).sum(0)).lower(jnp.ones((64, 64)))
    assert compile_pool.compiled_extra_bytes(low.compile(compile_pool.MEASURE_ONLY)) == \
        compile_pool.compiled_extra_bytes(low.compile())
    only = compile_pool.MEASURE_ONLY
    assert only.items() <= compile_pool.compiler_options(16, True, measure_only=True).items()
    assert not only.keys() & compile_pool.compiler_options(16, True).keys()
    engine = make_engine(max_num_batched_tokens=16)
    r = engine.runner
    assert r.steps_peak == max(compile_pool.compiled_extra_bytes(c) for c in r._compiled.values()) > 0
    asked = []
    real = Runner.compile_programs
    monkeypatch.setattr(Runner, "compile_programs",
                        lambda self, *a, **k: asked.append(k.get("measure_only")) or real(self, *a, **k))
    measure_activation_peak(engine.config, r.params, r.mesh)
    assert asked == [True]
