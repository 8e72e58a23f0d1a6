"""Stop strings: cut streamed text at the first stop string, holding back possible beginnings.

Where it sits: after the IncrementalDetokenizer turns sampled ids into a text delta, the
engine passes the delta here; what comes back is the text to put on the stream and, once a
stop string completes, which one (the request then finishes with reason "stop"). Host only.

Which stop string wins: the one that *completes* first in the text (earliest end; on a tie
the longest, i.e. the one starting earliest). Generation stops at that moment, so this choice
does not depend on how the text was split into deltas::

    text so far:  "... the answer is 42.\\nUser:"        stop = ("\\nUser:",)
                                    ^ cut here: emitted "... the answer is 42."
                                      (or up to the end of "\\nUser:" with
                                       include_stop_str_in_output)

Hold-back: without include_stop_str_in_output, the longest suffix of the not-yet-emitted text
that is a proper prefix of some stop string (e.g. "\\nUs") is held until the next delta shows
whether it completes a stop string; ``final=True`` (the request ended for another reason)
releases it. With include_stop_str_in_output nothing needs holding: everything up to the end
of a future match is output anyway.

Usage (per output sequence)::

    matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output)
    text, stop_str = matcher.feed(detok.add(new_ids))         # stream text; stop_str set: finish
    text, stop_str = matcher.feed(detok.flush(), final=True)  # finishing on EOS / length / abort
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class StopMatch(NamedTuple):
    """Result of one ``feed``: ``text`` to emit now; ``stop_str`` set once a stop string matched.

    A tuple, so ``emit, hit = matcher.feed(delta)`` works too.
    """

    text: str
    stop_str: str | None = None

    @property
    def stopped(self) -> bool:
        return self.stop_str is not None


def find_stop_string(text: str, num_new_chars: int, stop: Sequence[str]) -> tuple[int, str] | None:
    """First stop string to complete inside the last ``num_new_chars`` of ``text``.

    Occurrences ending earlier were already checked by the caller. Returns (start index, stop
    string) with the smallest end index (ties: the longest string), or None.
    """
    first_new = len(text) - num_new_chars
    best: tuple[int, int, str] | None = None  # (end, -len, s)
    for s in stop:
        start = text.find(s, max(0, first_new - len(s) + 1))
        if start < 0:
            continue
        key = (start + len(s), -len(s), s)
        if best is None or key < best:
            best = key
    if best is None:
        return None
    end, _, s = best
    return end - len(s), s


def partial_stop_suffix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    longest = min(len(text), max((len(s) for s in stop), default=1) - 1)
    for k in range(longest, 0, -1):
        tail = text[-k:]
        if any(len(s) > k and s.startswith(tail) for s in stop):
            return k
    return 0


class StopStringMatcher:
    """Streams text through a request's stop strings (one instance per output sequence)."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self._stop = tuple(dict.fromkeys(stop))
        self._include = include_stop_str_in_output
        self._context_len = max((len(s) for s in self._stop), default=1) - 1
        self._context = ""   # tail of the emitted text, for matches that start inside it
        self._pending = ""   # accepted but held back
        self._stop_str: str | None = None

    @property
    def stop_str(self) -> str | None:
        return self._stop_str

    @property
    def held_text(self) -> str:
        """Text received but not yet emitted (a possible stop-string beginning)."""
        return self._pending

    def feed(self, delta: str, final: bool = False) -> StopMatch:
        """Feed the next text delta; ``final`` releases held text (the sequence is ending).

        After a match, text that still arrives (tokens already in flight) is dropped: every later
        call returns ``StopMatch("", stop_str)``.
        """
        if self._stop_str is not None:
            return StopMatch("", self._stop_str)
        if not self._stop:
            return StopMatch(delta)
        unemitted = self._pending + delta
        buf = self._context + unemitted
        hit = find_stop_string(buf, len(delta), self._stop)
        if hit is not None:
            start, s = hit
            cut = start + len(s) if self._include else start
            self._stop_str = s
            self._pending = ""
            return StopMatch(buf[len(self._context):max(cut, len(self._context))], s)
        hold = 0 if (final or self._include) else partial_stop_suffix_len(unemitted, self._stop)
        emit = unemitted[:len(unemitted) - hold]
        self._pending = unemitted[len(emit):]
        if self._context_len:
            self._context = (self._context + emit)[-self._context_len:]
        return StopMatch(emit)
