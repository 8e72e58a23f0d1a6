"""A child process that builds token automata's raw tables, off the engine process's interpreter.

Where it sits: ``AutomatonCompiler.compile`` (jserve/structured/automaton.py) hands a spec's regex
to ``IndexWorker.table`` when the vocabulary is large; the child builds outlines-core's index
and its dense table (``automaton.raw_table``) and sends the table back; the parent then forces
canonical splits (it holds the tokenizer) and caches the automaton. Why: outlines' index hands
its transitions over as one Python dict built in a single call that holds the interpreter lock:
every other thread of the engine process, the engine loop among them, stopped ~0.4 s per new
spec at a 152k-token vocabulary on a 2-core machine (5-18 ms with the worker: benchmarks/
RESULTS.md, session 35). In the child only the table's bytes come back, read with the lock
released::

    parent                                         child (python -m jserve.structured.automaton_worker)
    start: tokens, eos ids, V, max_states  ---->   outlines Vocabulary, once
    table(regex)                           ---->   oc.Index(regex) -> raw_table -> header + bytes
    read header (waits <= timeout_s), then the int16[n, V] table straight into its array

The child is started on the first table (``subprocess``, never ``multiprocessing``: a user's
script without a ``__main__`` guard is not re-run) and exits when the parent closes its pipe or
dies. A child that dies or exceeds ``timeout_s`` is killed; that spec gets no automaton (the host
path serves it) and the next spec starts a new child.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import weakref
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_LEN = struct.Struct("<Q")   # message framing: a little-endian byte count, then the bytes
Table = tuple[np.ndarray, int, np.ndarray]   # (int16[n, V] next states, initial, bool[n] done)


def _read_exact(f: io.FileIO, out: memoryview) -> None:
    """Fill ``out`` from ``f`` (each read releases the interpreter lock) or raise EOFError."""
    got = 0
    while got < len(out):
        n = f.readinto(out[got:])
        if not n:
            raise EOFError("automaton worker: pipe closed")
        got += n


def _send(f: io.FileIO, obj: Any, payload: np.ndarray | None = None) -> None:
    """One message: a pickled header, then ``payload``'s raw bytes (when given)."""
    head = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_LEN.pack(len(head)) + head)
    if payload is not None:
        f.write(memoryview(np.ascontiguousarray(payload)).cast("B"))
    f.flush()


def _recv(f: io.FileIO) -> Any:
    """The header of the next message."""
    size = bytearray(_LEN.size)
    _read_exact(f, memoryview(size))
    head = bytearray(_LEN.unpack(size)[0])
    _read_exact(f, memoryview(head))
    return pickle.loads(head)


class IndexWorker:
    """The child process and its two pipes; ``table`` is thread-safe (one spec at a time)."""

    def __init__(self, tokens: list[bytes | None], eos: np.ndarray, vocab_size: int,
                 max_states: int, timeout_s: float) -> None:
        self._init = (list(tokens), [int(e) for e in eos], vocab_size, max_states)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._pipes: tuple[io.FileIO, io.FileIO] | None = None
        self._finalizer: weakref.finalize | None = None

    def _start(self) -> None:
        to_child, from_parent = os.pipe()[::-1]   # (write end, read end)
        from_child, to_parent = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "jserve.structured.automaton_worker", str(from_parent),
                 str(to_parent)], pass_fds=(from_parent, to_parent), env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except OSError:
            os.close(to_child)
            os.close(from_child)
            raise
        finally:
            os.close(from_parent)
            os.close(to_parent)
        pipes = (io.FileIO(to_child, "w"), io.FileIO(from_child, "r"))
        self._proc, self._pipes = proc, pipes
        self._finalizer = weakref.finalize(self, _stop, proc, pipes)
        _send(pipes[0], self._init)

    def close(self) -> None:
        """Stop the child (a later ``table`` starts a new one)."""
        if self._finalizer is not None:
            self._finalizer()
        self._proc = self._pipes = self._finalizer = None

    def table(self, regex: str) -> Table | None:
        """The raw table of ``regex`` built in the child (``automaton.raw_table``); None when
        outlines refuses it, it has too many states, or the child died or ran past timeout_s."""
        with self._lock:
            try:
                if self._proc is not None and self._proc.poll() is not None:
                    self.close()   # (it died between specs: a new one serves this spec)
                if self._proc is None:
                    self._start()
                out, back = self._pipes
                _send(out, regex)
                ready, _, _ = select.select([back], [], [], self.timeout_s)
                if not ready:
                    raise TimeoutError(f"no table within {self.timeout_s:g} s")
                head = _recv(back)
                if head is None:
                    return None
                shape, initial, done = head
                table = np.empty(shape, np.int16)
                _read_exact(back, memoryview(table).cast("B"))
                return table, initial, done
            except (OSError, EOFError, TimeoutError, pickle.UnpicklingError) as e:
                log.warning("token automaton worker: %s; the spec keeps the host path", e)
                self.close()
                return None


def _stop(proc: subprocess.Popen, pipes: tuple[io.FileIO, io.FileIO]) -> None:
    for f in pipes:
        f.close()
    proc.kill()
    proc.wait()


def _serve(from_parent: int, to_parent: int) -> None:
    """The child's loop: the start message, then one table per regex until the pipe closes."""
    import outlines_core as oc

    from jserve.structured.automaton import outlines_vocabulary, raw_table

    inp, out = io.FileIO(from_parent, "r"), io.FileIO(to_parent, "w")
    tokens, eos, vocab_size, max_states = _recv(inp)
    eos = np.array(eos, np.int64)
    vocab = outlines_vocabulary(tokens, eos, vocab_size)
    while True:
        try:
            regex = _recv(inp)
        except EOFError:
            return
        try:
            built = raw_table(oc.Index(regex, vocab), eos, vocab_size, max_states)
        except Exception:  # noqa: BLE001 - a regex outlines refuses: no automaton, as in-process
            built = None
        if built is None:
            _send(out, None)
        else:
            table, initial, done = built
            _send(out, (table.shape, initial, done), table)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
