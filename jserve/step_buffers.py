"""StepLayout: one step's whole device input as two flat buffers (int32 and float32), both
views of one int32 host array.

Where it sits: ``Runner.dispatch`` fills the buffers on the host (numpy views per field), hands
the joint array (``joint``) to the compiled step as its one input, and the step splits it
(``split``: a static slice and a bitcast) and unpacks it with static slices into the
``StepInput`` the model reads and the ``SamplingBatch`` the in-jit sampler reads. One array
instead of ~25: the host cost of a call grows with the arrays passed, and each one is a fresh
buffer the step's CUDA graph is re-pointed at (benchmarks/RESULTS_v2_sessions_5-8.md, session 6).

Fields for a bucket of T tokens, R rows, D page-table diff entries, K banned ids::

    int32   token_ids[T] positions[T] slot_mapping[T] prev_index[T] row_slot[R] samples[R]
            pt_diff[D, 3] seq_lens[R] query_start_loc[R + 1] num_seqs[1] logits_indices[R]
            output_index[R] banned_ids[R, K] pen_slot[R] num_draft[R] mask_slot[R]
            mask_step[R] shift_row[R] token_row[T] host_row[R]
    float32 repetition_penalty[R] presence_penalty[R] frequency_penalty[R]

``row_slot[r]``: the slot of row r in the device slot table (``jserve.slot_table``: its page
table row and sampling parameters; -1: the null row); ``samples[r]``: 1 if the row samples
(else its sampling fields are neutral); ``pt_diff``: page-table entries (slot, index, page)
changed since the last step, D = ceil(T / page_size) + 2R, padding -1.

``prev_index[t] >= 0``: token t is the one the previous step sampled in that row (a
placeholder, fed on the device); -1: ``token_ids[t]`` from the host. ``pen_slot[r] >= 0``:
row r samples with penalties, from (and then into) that slot of the penalty state
(``jserve.penalty_state``); -1: no penalties (the three penalty fields are neutral).
``num_draft[r]``: speculative decoding: the last num_draft[r] tokens of row r are drafts that
the speculative step variant verifies (``jserve.spec.verify_step``); 0 elsewhere.
``mask_slot[r] >= 0``: row r samples under that slot's token mask / logit bias
(``jserve.structured.logit_state``); -1: free row. ``mask_step[r]``: a verify row's position j
reads mask row ``mask_slot[r] + j * mask_step[r]`` (0: the same row at every position).
``host_row[r] >= 0``: the split step's sampler takes row r's host mask from that row of its
host masks (put ahead in request order, jserve/grammar_steps.py); -1: from row r.
``shift_row`` / ``token_row``: rows moved on the device by the drafts their request's previous
row accepted (``jserve.spec.chain``); -1 elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np

from jserve.sampling_batch import MAX_BANNED_IDS, SamplingBatch
from jserve.slot_table import apply_diffs, diff_capacity, gather_rows
from jserve.step_input import StepInput

# (name, shape in terms of T / R / P / K, fill value of padding)
_INT_FIELDS = (
    ("token_ids", ("T",), 0), ("positions", ("T",), 0), ("slot_mapping", ("T",), 0),
    ("prev_index", ("T",), -1), ("row_slot", ("R",), -1), ("samples", ("R",), 0),
    ("pt_diff", ("D", 3), -1), ("seq_lens", ("R",), 0),
    ("query_start_loc", ("R+1",), 0), ("num_seqs", (1,), 0), ("logits_indices", ("R",), 0),
    ("output_index", ("R",), 0), ("banned_ids", ("R", "K"), -1), ("pen_slot", ("R",), -1),
    ("num_draft", ("R",), 0),
    ("mask_slot", ("R",), -1), ("mask_step", ("R",), 0), ("shift_row", ("R",), -1),
    ("token_row", ("T",), -1), ("host_row", ("R",), -1),
)
_FLOAT_FIELDS = (("repetition_penalty", ("R",), 1.0), ("presence_penalty", ("R",), 0.0),
                 ("frequency_penalty", ("R",), 0.0))


@dataclass(frozen=True)
class StepLayout:
    """Static offsets of every field in the two buffers of one (T, R) bucket."""

    num_tokens: int     # T
    num_rows: int       # R
    pages_per_seq: int  # P
    page_size: int

    @property
    def num_diffs(self) -> int:
        """D: page-table entries the step's diff list holds."""
        return diff_capacity(self.num_tokens, self.num_rows, self.page_size)

    def _dims(self) -> dict[str, int]:
        return {"T": self.num_tokens, "R": self.num_rows, "R+1": self.num_rows + 1,
                "P": self.pages_per_seq, "K": MAX_BANNED_IDS, "D": self.num_diffs}

    def _table(self, fields: tuple) -> dict[str, tuple[int, tuple[int, ...], float]]:
        dims, out, off = self._dims(), {}, 0
        for name, shape, fill in fields:
            shp = tuple(dims[d] if isinstance(d, str) else d for d in shape)
            out[name] = (off, shp, fill)
            off += math.prod(shp)
        return out

    @cached_property
    def ints(self) -> dict[str, tuple[int, tuple[int, ...], float]]:
        return self._table(_INT_FIELDS)

    @cached_property
    def floats(self) -> dict[str, tuple[int, tuple[int, ...], float]]:
        return self._table(_FLOAT_FIELDS)

    @cached_property
    def int_size(self) -> int:
        off, shp, _ = list(self.ints.values())[-1]
        return off + math.prod(shp)

    @cached_property
    def float_size(self) -> int:
        off, shp, _ = list(self.floats.values())[-1]
        return off + math.prod(shp)

    @cached_property
    def _templates(self) -> tuple[np.ndarray, np.ndarray, tuple]:
        """All-padding buffers to copy, and (name, which, start, stop, shape) per field."""
        ibuf = np.empty(self.int_size, np.int32)
        fbuf = np.empty(self.float_size, np.float32)
        spans = []
        for which, (buf, table) in enumerate(((ibuf, self.ints), (fbuf, self.floats))):
            for name, (off, shp, fill) in table.items():
                n = math.prod(shp)
                buf[off:off + n] = fill
                spans.append((name, which, off, off + n, shp))
        return ibuf, fbuf, tuple(spans)

    @cached_property
    def _joint_template(self) -> np.ndarray:
        itpl, ftpl, _ = self._templates
        return np.concatenate((itpl, ftpl.view(np.int32)))

    def new_buffers(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Fresh all-padding host buffers (int32[n], float32[m], views of one int32[n + m]
        array: ``joint``) and a writable view per field (the step's hot path: one copy and a
        slice per field)."""
        joint = self._joint_template.copy()
        n = self.int_size
        bufs = (joint[:n], joint[n:].view(np.float32))
        views = {name: bufs[which][a:b].reshape(shp) for name, which, a, b, shp in self._templates[2]}
        return bufs[0], bufs[1], views

    def joint(self, ibuf: np.ndarray) -> np.ndarray:
        """The int32[n + m] host array behind ``new_buffers``' int32 view ``ibuf``."""
        base = ibuf.base
        if base is None or base.shape != (self.int_size + self.float_size,) or ibuf.shape != (self.int_size,):
            raise ValueError("ibuf is not the int32 view new_buffers() returned for this layout")
        return base

    def split(self, joint: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Inside jit: int32[n + m] -> (int32[n], float32[m])."""
        n = self.int_size
        return joint[:n], jax.lax.bitcast_convert_type(joint[n:], jnp.float32)

    def read(self, ibuf: jax.Array, name: str) -> jax.Array:
        """One int32 field by name (a static slice; inside jit, or of the host buffer)."""
        off, shp, _ = self.ints[name]
        return ibuf[off:off + math.prod(shp)].reshape(shp)

    def unpack(self, ibuf: jax.Array, fbuf: jax.Array, table: jax.Array
               ) -> tuple[jax.Array, StepInput, SamplingBatch, jax.Array, jax.Array]:
        """Inside jit: (int32[n], float32[m], slot table int32[S + 1, W]) -> (slot table with
        the step's page-table diff applied, StepInput, SamplingBatch, prev_index int32[T],
        pen_slot int32[R]). Page-table rows and sampling parameters come from the table; the
        sampling batch has no history: penalty statistics come from the penalty state."""
        f = {}
        for buf, table_ in ((ibuf, self.ints), (fbuf, self.floats)):
            for name, (off, shp, _) in table_.items():
                f[name] = buf[off:off + math.prod(shp)].reshape(shp)
        table = apply_diffs(table, f["pt_diff"])
        page_table, s = gather_rows(table, f["row_slot"], f["samples"], self.pages_per_seq)
        batch = StepInput(token_ids=f["token_ids"], positions=f["positions"],
                          slot_mapping=f["slot_mapping"], page_table=page_table,
                          seq_lens=f["seq_lens"], query_start_loc=f["query_start_loc"],
                          num_seqs=f["num_seqs"], logits_indices=f["logits_indices"])
        sbatch = SamplingBatch(
            temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], min_p=s["min_p"],
            repetition_penalty=f["repetition_penalty"], presence_penalty=f["presence_penalty"],
            frequency_penalty=f["frequency_penalty"],
            seed=jax.lax.bitcast_convert_type(s["seed"], jnp.uint32),
            output_index=f["output_index"], banned_ids=f["banned_ids"], history_ids=None,
            num_prompt=None, want_logprobs=s["want_logprobs"] > 0)
        return table, batch, sbatch, f["prev_index"], f["pen_slot"]

    def unpack_fed(self, joint: jax.Array, table: jax.Array, prev_tokens: jax.Array
                   ) -> tuple[jax.Array, StepInput, SamplingBatch, jax.Array, jax.Array]:
        """Inside jit: ``split`` + ``unpack`` of the step's joint input, each placeholder token
        fed from the previous step's output (``prev_index`` >= 0) -> (slot table with the diffs
        applied, StepInput with its token ids fed, SamplingBatch, pen_slot int32[R], ibuf)."""
        ibuf, fbuf = self.split(joint)
        table, batch, sbatch, prev_index, pen_slot = self.unpack(ibuf, fbuf, table)
        fed = prev_tokens[jnp.maximum(prev_index, 0)]
        batch = dataclasses.replace(batch, token_ids=jnp.where(prev_index >= 0, fed, batch.token_ids))
        return table, batch, sbatch, pen_slot, ibuf
