"""ConstraintTracker: per-sequence host state of the masks computed from the tokens so far.

Where it sits: owned by ``LLMEngine``. ``add`` runs at ``add_request`` (the grammar compile,
cached per spec, raises the ValueError that rejects a bad spec before anything is queued);
after ``Scheduler.update`` commits a step's tokens, ``advance`` feeds them to the sequence's
matcher; before ``Runner.dispatch``, ``masks`` computes one packed bitmask int32[W] per
constrained sampling row (llguidance's parallel mask call, which releases the GIL) into
``SchedulerOutput.token_masks``, which the runner ANDs into the slot's device row
(``logit_state``)::

    step N tokens --update--> advance (consume) --> masks for step N+1 --dispatch N+1-->

Kinds of host mask: a grammar (``structured_outputs``) and ``bad_words`` (vLLM's rule: the
last token of a word's tokenization is banned when the tokens before it end the output; a
one-token word is always banned; each word is tokenized with and without a leading space).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import llguidance
import llguidance.numpy as llnp
import numpy as np

from jserve.sampling_params import SamplingParams
from jserve.structured.grammar import GrammarCache
from jserve.structured.logit_state import mask_words


@dataclass
class SeqConstraint:
    """One sequence's host-mask state."""

    matcher: llguidance.LLMatcher | None
    bad_words: list[tuple[int, ...]] = field(default_factory=list)
    consumed: int = 0               # output tokens fed to the matcher so far
    error: str | None = None        # the matcher rejected a token (never with the mask applied)


def _rejected(s: SeqConstraint, token: int) -> None:
    """The matcher refused ``token`` (it is in its error state now): keep why."""
    s.error = s.matcher.get_error() or f"token {token} not allowed by the grammar"


class ConstraintTracker:
    """Matchers and bad-word lists of the running sequences, by request id."""

    def __init__(self, grammars: Callable[[], GrammarCache], vocab_size: int,
                 encode: Callable[[str], list[int]] | None) -> None:
        self._grammars = grammars   # built on first use: the tokenizer wrap costs ~0.1-1 s
        self.vocab_size = vocab_size
        self.words = mask_words(vocab_size)
        self._encode = encode
        self._seqs: dict[str, SeqConstraint] = {}
        self._executor: llguidance.LLExecutor | None = None

    def compile(self, params: SamplingParams) -> str | None:
        """The grammar of ``params`` (cached per spec) or None; ValueError if it is bad."""
        if params.structured_outputs is None:
            return None
        return self._grammars().compile(params.structured_outputs)

    def bad_word_ids(self, words: Sequence[str]) -> list[tuple[int, ...]]:
        if not words:
            return []
        if self._encode is None:
            raise ValueError("bad_words: needs a tokenizer")
        out: set[tuple[int, ...]] = set()
        for w in words:
            for text in (w, " " + w.lstrip(" ")):
                ids = tuple(self._encode(text))
                if ids:
                    out.add(ids)
        return sorted(out)

    def add(self, req_id: str, params: SamplingParams, grammar: str | None,
            bad_words: list[tuple[int, ...]]) -> None:
        """Start tracking a sequence (``grammar`` from ``compile``)."""
        matcher = self._grammars().matcher(grammar) if grammar is not None else None
        self._seqs[req_id] = SeqConstraint(matcher, bad_words)

    def remove(self, req_id: str) -> None:
        self._seqs.pop(req_id, None)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def advance(self, req_id: str, output_ids: Sequence[int]) -> bool:
        """Feed the newly committed output tokens. -> True when the sequence must end now: its
        grammar is complete (nothing but EOS may follow) or it rejected a token."""
        s = self._seqs.get(req_id)
        if s is None:
            return False
        new = list(output_ids[s.consumed:])
        s.consumed = len(output_ids)
        if s.matcher is None or s.error is not None:
            return s.error is not None
        for t in new:
            if s.matcher.is_stopped():
                break
            if not s.matcher.consume_token(int(t)):
                _rejected(s, t)
                return True
        return s.matcher.is_stopped()

    def advance_all(self, items: Sequence[tuple[str, Sequence[int]]]) -> list[str]:
        """``advance`` for many sequences -> the ids that must end now. A sequence with one new
        token (a plain decode step) consumes it in llguidance's parallel call, which releases
        the GIL (the grammar thread runs beside the forward's launch); others one by one."""
        ended, par, owners = [], [], []
        for rid, output in items:
            s = self._seqs.get(rid)
            if (s is not None and s.matcher is not None and s.error is None
                    and len(output) == s.consumed + 1 and not s.matcher.is_stopped()):
                s.consumed = len(output)
                par.append((s.matcher, int(output[-1])))
                owners.append((rid, s))
            elif self.advance(rid, output):
                ended.append(rid)
        if par:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            oks = self._executor.consume_token_par(par)
            for (rid, s), (_, t), ok in zip(owners, par, oks, strict=True):
                if not ok:
                    _rejected(s, t)
                if not ok or s.matcher.is_stopped():
                    ended.append(rid)
        return ended

    def error(self, req_id: str) -> str | None:
        s = self._seqs.get(req_id)
        return None if s is None else s.error

    def mask_rows(self, chunks: Sequence[Any], get_request: Callable[[str], Any], after_read: bool = True,
                  skip: frozenset[str] = frozenset()) -> tuple[list, list]:
        """A plan's host-masked sampling rows (``SchedulerOutput.chunks``; ``get_request``: the
        scheduler's live request by id) -> (rows of ``masks``, verify rows of ``draft_masks``).
        Finished requests and ``skip`` (about to finish) get none: their tokens are dropped.
        ``after_read``: the step that sampled a placeholder row's last token has been read."""
        rows, verify = [], []
        for c in chunks:
            if c.samples and c.req_id in self._seqs:
                if c.num_placeholders and not after_read:
                    raise RuntimeError(f"request {c.req_id!r}: host-masked row over an unread placeholder")
                req = get_request(c.req_id)
                if req is None or req.is_finished or c.req_id in skip:
                    continue
                out = req.output_token_ids
                if c.num_draft:   # speculative: a mask per verify position, along the drafts
                    verify.append((c.req_id, out, c.token_ids[len(c.token_ids) - c.num_draft:]))
                else:
                    rows.append((c.req_id, out))
        return rows, verify

    def masks(self, rows: Sequence[tuple[str, Sequence[int]]], out: np.ndarray | None = None,
              at: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Allowed-token bitmasks int32[W] for the given (request id, output ids so far) rows ->
        request id -> its mask. ``out`` int32[R, W] (all ones where no mask goes) and ``at``
        (row i's mask goes to ``out[at[i]]``): filled in place, e.g. the split step's host masks
        (no copy on the way to the device); else a fresh block."""
        if not rows:
            return {}
        if out is None:
            out, at = np.full((len(rows), self.words), -1, np.int32), range(len(rows))
        par = []
        for (rid, _), r in zip(rows, at, strict=True):
            s = self._seqs[rid]
            if s.matcher is not None and s.error is None:
                par.append((s.matcher, r))
        if par:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            llnp.fill_next_token_bitmask_par(self._executor, par, out)
        for (rid, output), r in zip(rows, at, strict=True):
            self._ban_bad_words(self._seqs[rid], output, out[r])
        return {rid: out[r] for (rid, _), r in zip(rows, at, strict=True)}

    @staticmethod
    def _ban_bad_words(s: SeqConstraint, output: Sequence[int], mask: np.ndarray) -> None:
        bits = mask.view(np.uint32)
        for word in s.bad_words:
            k = len(word) - 1
            if k == 0 or (len(output) >= k and tuple(output[len(output) - k:]) == word[:k]):
                t = word[-1]
                bits[t >> 5] &= np.uint32(~(1 << (t & 31)) & 0xFFFFFFFF)

    def draft_masks(self, rows: Sequence[tuple[str, Sequence[int], Sequence[int]]]
                    ) -> dict[str, np.ndarray]:
        """Speculative decoding: for (request id, output ids so far, drafts d_1..d_k) rows, the
        masks of the k + 1 verify positions int32[k + 1, W]: position j's is the mask after
        the output and d_1..d_j (the matcher advanced along the drafts, then rolled back).
        Past a draft the grammar rejects, positions are all ones: the verify step rejects that
        draft (its target probability is 0 under its position's mask), so they are never
        reached. One parallel mask fill per position over the rows."""
        outs = {rid: np.full((len(d) + 1, self.words), -1, np.int32) for rid, _, d in rows}
        live = []   # (rid, matcher, the drafts' prefix the grammar accepts (never consumes
        #              a token it rejects: that would put the matcher in its error state))
        for rid, _, d in rows:
            m = self._seqs[rid].matcher
            if m is not None and self._seqs[rid].error is None:
                ok = m.validate_tokens([int(t) for t in d]) if d and not m.is_stopped() else 0
                live.append((rid, m, [int(t) for t in d[:ok]]))
        consumed = dict.fromkeys(outs, 0)
        width = max((len(d) for _, _, d in rows), default=0)
        for j in range(width + 1):
            now = [(rid, m, d) for rid, m, d in live if consumed[rid] == j and j <= len(d)]
            if not now:
                break
            buf = np.full((len(now), self.words), -1, np.int32)
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            llnp.fill_next_token_bitmask_par(self._executor, [(m, i) for i, (_, m, _) in
                                                              enumerate(now)], buf)
            for i, (rid, m, d) in enumerate(now):
                outs[rid][j] = buf[i]
                if j < len(d):
                    if not m.consume_token(d[j]):
                        raise RuntimeError(f"request {rid!r}: the grammar rejected draft {d[j]} "
                                           "it had validated")
                    consumed[rid] += 1
        for rid, m, _ in live:
            if consumed[rid]:
                m.rollback(consumed[rid])
        for rid, output, d in rows:
            s = self._seqs[rid]
            if s.bad_words:
                for j in range(len(d) + 1):
                    self._ban_bad_words(s, list(output) + list(d[:j]), outs[rid][j])
        return outs
