"""Named ragged-paged-attention test cases shared by the interpret-mode and GPU kernel tests."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Case:
    q_lens: tuple[int, ...]
    ctx_lens: tuple[int, ...]
    page_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: object = jnp.float32
    sliding_window: int | None = None
    soft_cap: float | None = None
    num_pages: int | None = None

    @property
    def tol(self) -> float:
        return 1e-5 if jnp.dtype(self.dtype) == jnp.float32 else 1e-2


CASES = {
    # 7 decodes, lengths not multiples of the page size, GQA 2.
    "decode7_p16_d64": Case((1,) * 7, (1, 17, 33, 5, 16, 40, 2), 16, 4, 2, 64),
    # one long prefill chunk (whole prompt), not a multiple of the page size.
    "prefill1_p8_d128": Case((37,), (37,), 8, 2, 1, 128),
    # mixed: prefill chunks with cached context + decodes, bf16, head_dim 256.
    "mixed7_p32_d256_bf16": Case(
        (1, 9, 1, 1, 20, 3, 1), (70, 30, 33, 1, 64, 3, 12), 32, 4, 2, 256, jnp.bfloat16
    ),
    # 64 decode sequences with tiny heads (MHA).
    "decode64_p8": Case((1,) * 64, tuple(1 + (7 * i) % 29 for i in range(64)), 8, 2, 2, 16),
    # sliding window + soft cap, group of 3 (not a power of two).
    "window_softcap_g3": Case((1, 6, 2), (25, 6, 19), 8, 6, 2, 32, sliding_window=5, soft_cap=4.0),
    # quantized pools with per-page-per-head scales.
    "int8_kv": Case((1, 5, 1), (19, 7, 40), 16, 4, 2, 64, jnp.int8),
    "fp8_kv": Case((2, 1), (9, 30), 8, 4, 2, 32, jnp.uint8),   # e4m3 bits, as the engine stores fp8
    # the GPU kernel's QK dot in e4m3 (q rounded to 3 mantissa bits per element)
    "fp8_kv_qk8": Case((1, 3, 1), (26, 9, 40), 16, 4, 2, 64, jnp.uint8),
    # pool of more than 2^16 pages: page ids and slot offsets past 16 bits.
    "pool_70k_pages": Case((1, 3), (20, 9), 8, 2, 1, 16, num_pages=70_001),
}
