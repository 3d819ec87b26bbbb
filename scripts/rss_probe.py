"""RSS of an in-process engine over rounds of generation: does memory grow per request, or per new shape?

    .venv/bin/python scripts/rss_probe.py [--backend torch] [--rounds 10] [--same-prompts] [--tracemalloc]

Each round generates 16 random prompts (1-120 words, 1-48 tokens, greedy or sampled, n up to 3), then runs
`gc.collect()` and glibc's `malloc_trim(0)` and prints RSS before and after the trim and the number of live
Python objects. With --same-prompts every round repeats the first round's prompts (the same shapes): RSS that
grows with random prompts but is flat with the same ones is a per-shape cache, not a leak per request. With
--tracemalloc the largest Python allocation growths since round 3 are listed at the end.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import random
import re
import tracemalloc
from pathlib import Path

from kiln.engine.llm import LLM
from kiln.engine.sampling_params import SamplingParams

WORDS = "the a kiln fires clay into stone over many long hours while potters wait and talk".split()


def rss_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--same-prompts", action="store_true")
    ap.add_argument("--tracemalloc", action="store_true")
    a = ap.parse_args()
    llm = LLM(backend=a.backend, dtype="float32", max_model_len=512, max_num_seqs=16)
    libc = ctypes.CDLL("libc.so.6")
    rng, snap0 = random.Random(0), None
    if a.tracemalloc:
        tracemalloc.start(10)
    for r in range(a.rounds):
        if a.same_prompts:
            rng = random.Random(0)
        prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120))) for _ in range(16)]
        params = [SamplingParams(max_tokens=rng.randint(1, 48), temperature=rng.choice([0, 0.8]),
                                 seed=rng.randrange(2**31), n=rng.choice([1, 1, 1, 3])) for _ in prompts]
        llm.generate(prompts, params)
        gc.collect()
        before = rss_mb()
        libc.malloc_trim(0)
        print(f"round {r}: RSS {before:.0f} MB, {rss_mb():.0f} MB after malloc_trim, "
              f"{len(gc.get_objects())} Python objects", flush=True)
        if a.tracemalloc and r == 2:
            snap0 = tracemalloc.take_snapshot()
    if snap0 is not None:
        for stat in tracemalloc.take_snapshot().compare_to(snap0, "traceback")[:8]:
            print(stat, *stat.traceback.format()[-6:], sep="\n")


if __name__ == "__main__":
    main()
