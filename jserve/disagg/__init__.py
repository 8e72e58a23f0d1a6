"""Prefill/decode disaggregation: prefill and decode on separate device groups, KV pages moved
between them (docs/disaggregation.md).

Where it sits: ``build_engine`` with ``prefill_devices`` / ``decode_devices`` builds one
scheduler + runner per group (each its own mesh, weights, KV pool and compiled steps) and
returns a ``DisaggEngine``: an ``LLMEngine`` whose loop drives the two groups, so ``LLM``,
``AsyncEngine`` and the servers use it unchanged::

    add_request --> prefill group: schedule / step until the prompt is computed and the first
                    token sampled (streamed at once); the prefix cache lives here
    handoff     --> its KV pages: gather (prefill mesh) -> device_put -> scatter into free pages
                    of the decode pool (bucketed page counts: nothing compiles while serving)
    decode group --> the request continues as an ordinary running request (preemption, swap)
    prefill pages are freed once the decode side holds the bytes; an abort frees both sides

Files: ``schedulers.py`` (the two schedulers' extra moves), ``transfer.py`` (the page mover),
``group.py`` (one group's non-blocking step loop), ``two_groups.py`` (the scheduler facade the
engine's request bookkeeping talks to), ``handoff.py`` (moving prefilled requests),
``engine.py`` (the loop), ``builder.py`` (start-up checks and the two builds).
"""

from jserve.disagg.engine import DisaggEngine

__all__ = ["DisaggEngine"]
