"""The token-automaton index worker (jserve/structured/automaton_worker.py): a child process
builds the same automata as the in-process path, and a child that dies or runs past its timeout
costs one spec its automaton (the host path), never the compiler."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from jserve.structured.automaton import WORKER_MIN_VOCAB, AutomatonCompiler
from jserve.structured.grammar import StructuredOutputsParams, make_ll_tokenizer
from tests.unit.test_automaton import EOS, PATTERNS, SCHEMA, TOKENIZER, V

SPECS = [StructuredOutputsParams(json=SCHEMA).key, StructuredOutputsParams(json=PATTERNS).key,
         StructuredOutputsParams(regex="[a-z]{2,5}(x|yz)").key,
         StructuredOutputsParams(choice=["alpha", "beta", "be"]).key]


@pytest.fixture(scope="module")
def vocab():
    from jserve.structured.automaton import token_bytes
    ll = make_ll_tokenizer(TOKENIZER.read_text(), V, EOS)
    return token_bytes(ll, V), ll


@pytest.fixture(scope="module")
def worker_compiler(vocab):
    tokens, ll = vocab
    comp = AutomatonCompiler(tokens, EOS, V, 2000, tokenize=ll.tokenize_bytes, worker=True)
    yield comp
    comp.close()


def test_worker_builds_the_in_process_automata(vocab, worker_compiler):
    tokens, ll = vocab
    local = AutomatonCompiler(tokens, EOS, V, 2000, tokenize=ll.tokenize_bytes, worker=False)
    for key in SPECS:
        a, b = local.compile(key), worker_compiler.compile(key)
        assert a is not None and b is not None, key
        np.testing.assert_array_equal(a.next, b.next)
        np.testing.assert_array_equal(a.done, b.done)
        assert a.initial == b.initial
    assert worker_compiler._worker._proc is not None   # (built in the child)
    # refused by outlines, or over max_states: None from both paths
    for key in (StructuredOutputsParams(regex="(?=a)b").key, StructuredOutputsParams(regex="a{1,3000}").key):
        assert local.compile(key) is None and worker_compiler.compile(key) is None


def test_a_dead_worker_costs_only_the_spec_it_was_building(vocab, worker_compiler, caplog):
    worker = worker_compiler._worker
    assert worker_compiler.compile(StructuredOutputsParams(regex="ab+c").key) is not None
    first = worker._proc
    first.kill()
    first.wait()   # died between specs: the next spec starts a new child, no warning
    assert worker_compiler.compile(StructuredOutputsParams(regex="ab+d").key) is not None
    assert worker._proc is not first and worker._proc.poll() is None
    worker.timeout_s = 0.0   # no child builds a schema (~0.1 s) in no time: None, the child stopped
    heavy = StructuredOutputsParams(json=SCHEMA, whitespace_flexible=True).key
    with caplog.at_level(logging.WARNING, logger="jserve.structured.automaton_worker"):
        assert worker_compiler.compile(heavy) is None
    assert "no table within 0 s" in caplog.text and worker._proc is None
    worker.timeout_s = 60.0
    assert worker_compiler.compile(StructuredOutputsParams(regex="ab+f").key) is not None


def test_large_vocabularies_use_the_worker(vocab):
    tokens, _ = vocab
    big = AutomatonCompiler(tokens, EOS, WORKER_MIN_VOCAB, 100)
    small = AutomatonCompiler(tokens, EOS, WORKER_MIN_VOCAB - 1, 100)
    assert big._worker is not None and big._worker._proc is None   # (started on the first spec)
    assert small._worker is None
