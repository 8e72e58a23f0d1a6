"""IncrementalDetokenizer: sampled token ids -> streamed text deltas, O(1) work per token.

Where it sits: after ``Scheduler.update`` appends sampled ids to a Request, the engine feeds
them here; each delta then goes through the stop-string matcher (jserve/stop_strings.py) and
onto the request's output stream. One instance per output sequence; host only.

Why not decode one token at a time: byte-level BPE (and byte-fallback ``<0xE2>`` tokens)
split one character over several tokens, and SentencePiece-style decoders strip the leading
space of whatever they decode first. So we decode a small *window* of ids and diff it
against the decode of the window's already-emitted head (vLLM's prefix/read offsets)::

        window ids:  [ ... context ... | ... new (not yet emitted) ... ]
                     ^ prefix          ^ read                          ^ end
        prefix_text = decode(window[prefix:read])     (already emitted, kept as context)
        new_text    = decode(window[prefix:end])
        delta       = new_text[len(prefix_text):]

A delta is emitted only when ``new_text`` does not end in U+FFFD (an unfinished multi-byte
character renders as U+FFFD until its last byte arrives); then the window slides
(prefix <- read, read <- end) and ids before ``prefix`` are dropped, so memory and decode cost
stay bounded by the window, not by the output length.

Guarantee: for decoders that just concatenate token bytes (byte-level BPE, byte fallback),
``"".join(deltas) + flush() == tokenizer.decode(output_ids)``, and for valid UTF-8 output no
delta ever holds U+FFFD. For SentencePiece-style decoders (``Strip`` of the first space) the
prompt's tail is the context, so the first output token keeps its leading space, as in vLLM.
Pathological output (over ``max_held_tokens`` ids in a row still ending in U+FFFD) is released
as is, to keep the window bounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas that never split a character.

    Args:
        tokenizer: anything with ``decode(ids, skip_special_tokens)`` (a jserve Tokenizer).
        prompt_token_ids: the prompt; only its last ``context_tokens`` ids are kept as context.
        skip_special_tokens: drop special tokens (EOS, <|im_end|>, ...) from the text.
        context_tokens: how many prompt ids to decode as context (vLLM uses 5).
        max_held_tokens: release held text after this many ids that keep ending in U+FFFD.
        max_window_tokens: slide the window even when ids decode to nothing (skipped specials).
    """

    def __init__(self, tokenizer: _Decoder, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True, *, context_tokens: int = 5,
                 max_held_tokens: int = 16, max_window_tokens: int = 64) -> None:
        if context_tokens < 0 or max_held_tokens < 1 or max_window_tokens < max_held_tokens:
            raise ValueError("IncrementalDetokenizer needs context_tokens >= 0, max_held_tokens >= 1 "
                             "and max_window_tokens >= max_held_tokens")
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._max_held = max_held_tokens
        self._max_window = max_window_tokens
        start = max(0, len(prompt_token_ids) - context_tokens)
        context = [int(t) for t in prompt_token_ids[start:]]
        context_text = self._decode(context)
        if context_text.endswith(_REPLACEMENT):
            # The prompt ends inside a character: decoding output against it would misalign the
            # diff, so decode the output on its own (continuation bytes then show as U+FFFD).
            context, context_text = [], ""
        self._ids: list[int] = context      # the window; ids before it are forgotten
        self._read = len(context)           # window[:read] has been emitted (or is prompt)
        self._prefix_text = context_text    # decode(window[:read])
        self.num_output_tokens = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def _emit(self, new_text: str) -> str:
        """Accept the whole window as emitted; slide it so that window[:read] stays as context."""
        delta = new_text[len(self._prefix_text):]
        if delta or len(self._ids) > self._max_window:
            # New prefix = old read offset: keep the last emitted ids as context for the next diff.
            self._ids = self._ids[self._read:]
            self._prefix_text = self._decode(self._ids)
        else:
            # Nothing visible yet (e.g. skipped special tokens): keep the older context.
            self._prefix_text = new_text
        self._read = len(self._ids)
        return delta

    def add(self, token_ids: Sequence[int]) -> str:
        """Append newly sampled ids; return the text they complete ("" while a character is open)."""
        out = []
        for t in token_ids:
            self._ids.append(int(t))
            self.num_output_tokens += 1
            new_text = self._decode(self._ids)
            if new_text.endswith(_REPLACEMENT) and len(self._ids) - self._read < self._max_held:
                continue  # an unfinished character: wait for its remaining bytes
            out.append(self._emit(new_text))
        return "".join(out)

    def finish(self, token_ids: Sequence[int]) -> str:
        """``add(token_ids) + flush()`` in one decode of the window and the ids, instead of one
        per id: the text of a sequence that reports only when finished (FINAL_ONLY, with no
        stop string to look for on the way). The same text wherever the deltas concatenate to
        the full decode (the module docstring's guarantee; tests/unit/test_detokenizer.py); past
        ``max_held_tokens`` ids of invalid bytes, the deltas release U+FFFD where this decodes
        the bytes together."""
        if not token_ids:
            return self.flush()
        self._ids.extend(int(t) for t in token_ids)
        self.num_output_tokens += len(token_ids)
        return self._emit(self._decode(self._ids))

    def flush(self) -> str:
        """The sequence is finished: release any held text (U+FFFD for a truly cut character)."""
        if len(self._ids) == self._read:
            return ""
        return self._emit(self._decode(self._ids))
