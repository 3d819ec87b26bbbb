"""Mixed steps (running decodes and prefill chunks in one step) on the real backends, against transformers.

Requests arrive while others decode, under a small token budget, so steps mix decode rows with prefill chunks
(a long prompt chunked beside the decodes). Every request's greedy tokens must equal transformers' float32
generate on the same tiny random model, and equal the same prompt run alone (no step shared with anyone).
The jax backend runs a mixed step through graphs warmup built (its decode graph, then its prefill graph): with
warmup on and lazy compiles off, serving the staggered workload compiles nothing.
"""
from __future__ import annotations

import numpy as np
import pytest

from kiln import LLM, SamplingParams
from kiln.models.loader import load_model
from tests.backends.test_model_vs_hf import hf_greedy, hf_logits, kiln_greedy, prompt
from tests.tiny import load_hf, save_tiny_model

NEW = 12
LENS = (20, 33, 7, 50)                # 33 and 50 span several 16-token blocks; 50 is chunked under the budget
MARGIN = 1e-2                         # the reference's top-2 logit gap at every greedy step (seed 14: >= 0.05)
ENGINE = dict(dtype="float32", max_model_len=128, kv_cache_gib=0.01, max_num_seqs=4, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """variant -> (folder, prompts, HF greedy tokens per prompt), built once per variant."""
    made = {}

    def get(name: str):
        if name not in made:
            folder = save_tiny_model(tmp_path_factory.mktemp(name), name)
            hf = load_hf(folder)
            V = load_model(str(folder), tmp_path_factory.getbasetemp()).spec.vocab_size
            prompts = [prompt(n, V, seed=14) for n in LENS]
            want = [hf_greedy(hf, p, NEW) for p in prompts]
            for p, w in zip(prompts, want):      # no near-tie anywhere: equal greedy tokens mean equal logits
                top2 = np.sort(hf_logits(hf, p + w)[len(p) - 1:-1], -1)[:, -2:]
                assert (top2[:, 1] - top2[:, 0]).min() > MARGIN, f"{name}: pick prompts without near-ties"
            made[name] = folder, prompts, want
        return made[name]
    return get


def _staggered(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], list]:
    """Prompt 0 first; 1 and 2 once it decodes; 3 two steps later. Returns (tokens per prompt, the steps run)."""
    eng, steps = llm.engine, []
    inner = eng.runner.execute
    eng.runner.execute = lambda out: (steps.append(out), inner(out))[1]
    sp = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    arrivals = {0: [0], 2: [1, 2], 4: [3]}            # step number -> prompts added before it
    ids, done, n = {}, {}, 0
    while n <= max(arrivals) or eng.has_unfinished():
        for i in arrivals.get(n, []):
            ids[eng.add_request(prompts[i], sp)] = i
        for out in eng.step():
            if out.finished:
                done[ids[out.request_id]] = out.outputs[0].token_ids
        n += 1
    eng.runner.execute = inner
    return [done[i] for i in range(len(prompts))], steps


# gemma2: soft-capped attention, whose torch decode rows take the torch-ops path beside the prefill rows
@pytest.mark.parametrize("name", ["llama-gqa", "gemma2"])
def test_torch_mixed_steps_equal_transformers_and_solo_runs(tiny, name):
    folder, prompts, want = tiny(name)
    llm = LLM(model=str(folder), backend="torch", **ENGINE)
    got, steps = _staggered(llm, prompts)
    mixed = [s for s in steps if s.kind == "mixed"]
    assert len(mixed) >= 3, [s.kind for s in steps]
    assert any(len(r.token_ids) > 1 and not r.sample for s in mixed for r in s.rows), "no chunk beside decodes"
    assert all(s.num_tokens <= 32 for s in steps)
    for i, p in enumerate(prompts):
        assert got[i] == want[i], f"{name} prompt {i} ({len(p)} tokens): {got[i]} != HF {want[i]}"
    solo = [kiln_greedy(llm, [p], NEW)[0] for p in prompts]        # one at a time: no step is shared
    assert solo == got
    assert llm.engine.scheduler.kv.stats()["blocks_used"] == 0


def test_jax_mixed_steps_equal_transformers_and_compile_nothing_after_warmup(tiny):
    folder, prompts, want = tiny("llama-gqa")
    # one bucket per family, so warmup stays short: decode [4 rows, 8 blocks], prefill [1 row, 32 tokens]
    one = {"decode_bs": (4, 4, 4), "decode_blocks": (8, 8, 8), "prompt_bs": (1, 1, 1), "prompt_seq": (32, 32, 32)}
    llm = LLM(model=str(folder), backend="jax", warmup=True, allow_lazy_compile=False, graph_cache=False,
              buckets=one, **ENGINE)
    runner = llm.engine.runner
    assert runner.guard.armed and runner.stats().compiles > 0
    got, steps = _staggered(llm, prompts)
    assert sum(s.kind == "mixed" for s in steps) >= 3, [s.kind for s in steps]
    assert got == want
    assert [kiln_greedy(llm, [p], NEW)[0] for p in prompts] == got
    assert runner.stats().compiles_while_serving == 0
