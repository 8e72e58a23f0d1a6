"""Speculative decoding: proposers (n-gram), the spec config and the rejection sampler.

Where it sits: the scheduler asks a proposer for draft tokens of requests whose tokens are all
known on the host and schedules 1 + k query rows for them; the runner's speculative step
variant (``verify_step``) runs the target over those rows and verifies the drafts with the
exact rejection sampler (``rejection``) inside the same executable; ``Scheduler.update`` rolls
``num_computed_tokens`` back over the rejected drafts.
"""
