"""Structured outputs and token masks: grammars (llguidance), per-request matchers on the host,
and the per-slot mask / bias state the on-device sampler applies.

Data path::

    SamplingParams(structured_outputs=..., allowed_token_ids, bad_words, logit_bias)
      -> grammar.GrammarCache.compile (cached per spec; a bad spec is a ValueError naming it)
      -> constraints.ConstraintTracker: one matcher per sequence, advanced by the tokens the
         scheduler commits, a packed bitmask per constrained row before each dispatch
      -> logit_state.LogitState: per-slot device rows (bitmask + sparse bias), written for the
         rows that change, applied inside the step jit (``apply_logit_state``)
"""
