"""N-gram (prompt-lookup) proposer: draft tokens copied from earlier in the sequence, host side.

Where it sits: ``Scheduler.schedule`` asks it for the drafts of a request whose tokens are all
known on the host (no token in flight: its first row in a runner slot, host-masked requests,
the synchronous loop); the drafts become extra query rows of the request's step and are
verified by the rejection sampler as point masses. Rows planned while the request's previous
row is in flight take the drafts the step made on the device by the same rule
(``token_history.propose``, tested against this).

For n from ``prompt_lookup_max`` down to ``prompt_lookup_min``: take the last n tokens, find
their most recent earlier occurrence in the sequence (prompt + outputs), and propose the (up to
k) tokens that followed it. The longest matching n wins; no match proposes nothing::

    tokens  ... a b c X Y Z ... a b c |        last n = 3 tokens "a b c"
                      ^^^^^ proposed: X Y Z (k = 3)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    """Prompt-lookup drafts: ``propose(tokens, k)`` -> at most k token ids."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({prompt_lookup_min}) must be "
                             f">= 1 and <= prompt_lookup_max ({prompt_lookup_max})")
        self.min_n, self.max_n = prompt_lookup_min, prompt_lookup_max

    def propose(self, tokens: Sequence[int] | np.ndarray, k: int) -> list[int]:
        """Drafts for the sequence ``tokens`` (prompt + outputs so far): the k tokens after the
        most recent earlier occurrence of its longest matching suffix n-gram; [] if none."""
        if k <= 0:
            return []
        t = np.asarray(tokens, np.int64)
        length = len(t)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            # windows starting at 0 .. length - n - 1: every occurrence before the suffix itself
            win = sliding_window_view(t[:length - 1], n)
            hits = np.flatnonzero((win == t[length - n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return t[start:start + k].tolist()
        return []
