"""Fair admission: which waiting request the scheduler admits next.

Where it sits: ``Scheduler.schedule`` (jserve/scheduler.py), once per admission while rows,
budget and pages allow. Preempted requests sit at the front of the waiting queue and go first
(they held pages already). Otherwise the order is (priority, turns its API request has had,
queue position), over the first waiting sequence of each API request, where a turn is
``quantum`` running sequences: the ``n`` sequences of one request take turns with other
requests instead of filling the batch first, and a lower priority value goes before a higher
one. Within a request, queue order holds (the leader before its siblings, which share its
prompt pages). A small ``n`` (up to the quantum) is admitted whole, so its siblings run beside
the leader and share its last, partly filled prompt page by copy-on-write::

    quantum 4: waiting  A#0..A#127 (n=128, 8 running)   B (n=1, 0 running)
               next     B: key (0, 0, 128) < A#8's (0, 8 // 4, 0)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from jserve.request import Request, RequestStatus

FAIR_TURN_SEQS = 4  # sequences of one request admitted per turn (n <= 4: the whole request)


def fair_quantum(max_num_seqs: int) -> int:
    """Sequences of one request admitted per turn: up to ``FAIR_TURN_SEQS``, and a quarter of
    the batch at most, so a small batch still takes strict turns."""
    return max(1, min(FAIR_TURN_SEQS, max_num_seqs // 4))


def api_request(req: Request) -> str:
    """The API request a sequence belongs to: ``n`` > 1 siblings share their leader's id."""
    return req.fork_of.request_id if req.fork_of is not None else req.request_id


def next_waiting(waiting: Sequence[Request], running_per_request: Counter, quantum: int) -> Request:
    """The waiting request whose turn it is (module docstring); ``running_per_request``: running
    sequences per ``api_request``."""
    head = waiting[0]
    if head.status is RequestStatus.PREEMPTED:
        return head
    best, best_key = head, (head.priority, running_per_request[api_request(head)] // quantum, 0)
    seen = {api_request(head)}
    for pos, req in enumerate(waiting):
        g = api_request(req)
        if g in seen:
            continue
        seen.add(g)
        key = (req.priority, running_per_request[g] // quantum, pos)
        if key < best_key:
            best, best_key = req, key
    return best
