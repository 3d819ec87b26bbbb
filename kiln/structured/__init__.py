"""Structured outputs: constrain a request's tokens to a JSON Schema, JSON, a regex, a choice or an EBNF grammar.

    SamplingParams.structured_outputs (params.StructuredOutputsParams: vLLM's fields)
        ── LLMEngine.validate ──> grammar.Grammars.compile (xgrammar, cached by kind + text) ── ValueError: 400
        ── add_request ──> one grammar.Matcher per sample
        ── each step, rows that sample: Matcher.fill -> ScheduledRow.token_bitmask [ceil(V/32)] i32
        ── the runner's sampler masks the row's logits (bitmask.py semantics) ── the token ──> Matcher.accept
           (the request stops when the grammar has terminated)
"""
