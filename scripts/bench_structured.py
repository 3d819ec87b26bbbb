"""Cost of structured outputs: decode tok/s with a JSON Schema active against unconstrained, at batch 1 and 64.

    python scripts/bench_structured.py [--model PATH] [--backend auto] [--batches 1 64] [--tokens 32]

Each configuration runs once to compile / warm, then is timed (the fastest of --repeat runs): greedy, every row a chat prompt, the
unconstrained rows with ignore_eos and max_tokens=--tokens, the constrained rows under a schema whose output
(an array of up to 16 bounded integers) is cut by the same max_tokens. tok/s = generated tokens / wall time of
the whole run (prefill included, the same prompts for both)."""
from __future__ import annotations

import argparse
import json
import time

from kiln.engine.llm import build_engine
from kiln.engine.sampling_params import SamplingParams
from kiln.structured.params import StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "^[A-Za-z ]{1,16}$"},
    "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "maxItems": 16},
    "grade": {"enum": ["A", "B", "C"]}}, "required": ["name", "scores", "grade"]}


def run(eng, prompts, sp) -> tuple[int, float]:
    t0 = time.perf_counter()
    ids = [eng.add_request(p, sp) for p in prompts]
    done = {}
    while len(done) < len(ids):
        done.update({o.request_id: o for o in eng.step() if o.finished})
    dt = time.perf_counter() - t0
    return sum(len(done[i].outputs[0].token_ids) for i in ids), dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--modes", nargs="+", default=["unconstrained", "json_schema"],
                    choices=["unconstrained", "json_schema"], help="which runs, in this order")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per configuration; the fastest counts")
    a = ap.parse_args()
    eng = build_engine(a.model, dtype=a.dtype, backend=a.backend, max_model_len=256,
                       max_num_seqs=max(a.batches), warmup=False)
    chat = eng.tokenizer.apply_chat_template([{"role": "user", "content": "Give a student's name, scores and "
                                                                          "grade as JSON."}])
    plain = SamplingParams(temperature=0.0, max_tokens=a.tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=a.tokens,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    rows = []
    for B in a.batches:
        prompts = [chat] * B
        for name in a.modes:
            sp = plain if name == "unconstrained" else constrained
            run(eng, prompts, sp)                          # compile / warm
            toks, dt = min((run(eng, prompts, sp) for _ in range(a.repeat)), key=lambda r: r[1])
            rows.append({"batch": B, "mode": name, "tokens": toks, "seconds": round(dt, 3),
                         "tok_s": round(toks / dt, 1)})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
