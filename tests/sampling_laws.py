"""The laws the samplers must follow, in numpy, for the statistical tests of speculative
decoding (test_spec_rejection.py, test_spec_sampled_drafts.py)."""

import numpy as np


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_p(p: np.ndarray, keep_mass: float) -> np.ndarray:
    """The ordinary sampler's top-p over one distribution p[V] (ties: lower id first)."""
    order = np.argsort(-p, kind="stable")
    before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
    keep = np.zeros_like(p, bool)
    keep[order[before < keep_mass]] = True
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def l2(tokens: np.ndarray, probs: np.ndarray) -> float:
    """L2 distance between the empirical law of ``tokens`` and ``probs``."""
    return float(np.linalg.norm(np.bincount(tokens, minlength=len(probs)) / len(tokens) - probs))
