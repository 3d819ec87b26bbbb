"""Where the time of a torch-backend decode step and prefill step goes, on the default model.

Runs the engine (LLM(backend="torch"), bf16 by default) on W1-like rows, then profiles steps with cProfile:
every kernel call is a C function, so its own time is exact; what is left of the step is host work (Python,
the scheduler, building the batch arrays, the detokenizer) and the tensor operators that Python calls through
C slots without a profiled function (`a * b`, `x += y`: the MLP's gate product among them).

    .venv/bin/python scripts/profile_torch_step.py [--batch 64] [--steps 20] [--prompt-len 512]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "shared" / "peers"))

GROUPS = {   # C function name fragment -> what it is
    "_linear_pointwise": "matmuls, bf16 (oneDNN)", "_weight_int4pack_mm_for_cpu": "matmuls, int4",
    "_weight_int8pack_mm": "LM head, int8", "decode_attention": "decode attention kernel (rope, KV write)",
    "add_rms_norm": "residual add + RMS norm kernel", "topk": "top-8 logits re-scored in float32",
    "einsum": "top-8 logits re-scored in float32", "argmax": "greedy argmax", "silu": "SiLU",
    "matmul": "prefill attention (torch ops)", "softmax": "prefill attention (torch ops)",
}


def profile(fn, n: int) -> tuple[float, dict[str, float]]:
    """(ms per call of fn, {group: ms per call}) over n calls."""
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    total = (time.perf_counter() - t0) / n * 1e3
    groups: dict[str, float] = {}
    for (file, _, name), (_, _, tottime, _, _) in pstats.Stats(pr).stats.items():
        if file != "~":                     # Python code: host work, counted as the remainder
            continue
        group = next((g for k, g in GROUPS.items() if re.search(rf"\b{k}\b", name)), "other torch ops")
        if "method" in name and group == "other torch ops" and "torch" not in name:
            group = "host (numpy, lists, threading)"
        groups[group] = groups.get(group, 0.0) + tottime / n * 1e3
    return total, groups


def show(title: str, total: float, groups: dict[str, float]) -> None:
    print(f"\n{title}: {total:.1f} ms")
    for g, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:<44} {ms:7.2f} ms  {ms / total:6.1%}")
    rest = total - sum(groups.values())
    print(f"  {'host + tensor operators (a * b, x += y)':<44} {rest:7.2f} ms  {rest / total:6.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 1])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()
    import workload
    from kiln import LLM, SamplingParams
    llm = LLM(model=a.model, backend="torch", dtype=a.dtype, max_num_seqs=max(a.batch), max_model_len=1024,
              enable_prefix_caching=False)   # the repeated prefill below must compute every token
    e = llm.engine
    for b in a.batch:
        for p in workload.prompts(b):
            e.add_request(p, SamplingParams(temperature=0, max_tokens=40 + a.steps + 5, ignore_eos=True))
        for _ in range(40):                  # prefill, then decode to a context of ~40 + prompt
            e.step()
        show(f"decode step, batch {b}, context ~{40 + len(e.tokenizer.encode(workload.prompts(1)[0]))}",
             *profile(e.step, a.steps))
        while e.has_unfinished():
            e.step()
    ids = (e.tokenizer.encode(" ".join(workload.prompts(64))) * 8)[:a.prompt_len]
    rid = iter(range(10**6))

    def prefill():
        e.add_request(ids, SamplingParams(temperature=0, max_tokens=1), request_id=f"p{next(rid)}")
        e.step()                             # the whole prompt in one step (max_num_batched_tokens >= it)
        while e.has_unfinished():
            e.step()
    prefill()
    show(f"prefill step, one {a.prompt_len}-token prompt", *profile(prefill, 3))


if __name__ == "__main__":
    main()
