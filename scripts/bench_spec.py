"""n-gram speculative decoding: tok/s and acceptance rate with and without it, code- and summary-like prompts,
single stream and batched; greedy outputs must be identical (counted).

    python scripts/bench_spec.py [--model smollm2-135m-instruct] [--backend torch] [--dtype float32]
                                 [--streams 1 8] [--tokens 96] [-k 4] [--lookup-max 4] [--lookup-min 2]

One runner is built; the plain and the speculating engine share it (the same weights and KV cache, used in
turn). Each (kind, streams) runs once to warm, then each mode is timed: `streams` requests at once (streams 1:
the prompts one after another), chat-templated, greedy, max_tokens --tokens (EOS ends a request: both modes emit
the same tokens when the outputs are identical). tok/s = generated tokens / wall time, prefill included.
acceptance = accepted drafts / drafted tokens of that run."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

from kiln.config import SpeculativeConfig
from kiln.engine.build import build_runner
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.sampling_params import SamplingParams

CODE = [
    "def moving_average(values, window):\n    out = []\n    total = 0.0\n    for i, v in enumerate(values):\n"
    "        total += v\n        if i >= window:\n            total -= values[i - window]\n        if i >= window - 1:\n"
    "            out.append(total / window)\n    return out\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        if not self.items:\n"
    "            raise IndexError('pop from empty stack')\n        return self.items.pop()\n\n"
    "    def peek(self):\n        return self.items[-1]\n",
    "def parse_config(path):\n    config = {}\n    with open(path) as f:\n        for line in f:\n"
    "            line = line.strip()\n            if not line or line.startswith('#'):\n                continue\n"
    "            key, value = line.split('=', 1)\n            config[key.strip()] = value.strip()\n    return config\n",
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n"
    "        mid = (lo + hi) // 2\n        if items[mid] == target:\n            return mid\n"
    "        if items[mid] < target:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n    return -1\n",
]
CODE_ASKS = ["Rewrite this Python code with type hints and a docstring:\n\n",
             "Rename the variables of this Python code to longer, clearer names and show the full code:\n\n"]

TEXT = [
    "The city council met on Tuesday to discuss the new public library. The library will open in the spring "
    "and will have a children's reading room, a maker space with 3D printers, and study rooms that residents "
    "can reserve online. The council approved a budget of two million dollars for books and equipment.",
    "Researchers at the university found that students who slept at least eight hours before an exam scored "
    "on average ten percent higher than students who slept less than six hours. The study followed three "
    "hundred students over two semesters and controlled for study time and prior grades.",
    "The company announced that its new electric bus can travel three hundred kilometres on a single charge. "
    "The bus charges in forty minutes at a fast charging station and carries up to eighty passengers. Three "
    "cities have already ordered a total of one hundred and twenty buses for delivery next year.",
    "A storm brought heavy rain and strong winds to the coast on Sunday. Several roads were closed because of "
    "flooding, and about five thousand homes lost power for a few hours. The weather service expects the "
    "rain to stop on Monday morning, with sunny weather for the rest of the week.",
]
TEXT_ASKS = ["Summarize the following article in two sentences, using its own words where you can:\n\n",
             "Repeat the key facts of this article as a bulleted list:\n\n"]


def prompts(tok, kind: str) -> list:
    bodies, asks = (CODE, CODE_ASKS) if kind == "code" else (TEXT, TEXT_ASKS)
    return [tok.apply_chat_template([{"role": "user", "content": a + b}]) for a in asks for b in bodies]


def run(eng: LLMEngine, batch: list, sp: SamplingParams) -> tuple[list[list[int]], float, int, int]:
    """(outputs in order, seconds, drafted, accepted)."""
    d0, a0 = eng.spec_stats.drafted, eng.spec_stats.accepted
    t0 = time.perf_counter()
    ids = [eng.add_request(p, sp) for p in batch]
    done = {}
    while len(done) < len(ids):
        done.update({o.request_id: o for o in eng.step() if o.finished})
    dt = time.perf_counter() - t0
    return [done[i].outputs[0].token_ids for i in ids], dt, eng.spec_stats.drafted - d0, eng.spec_stats.accepted - a0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--single-prompts", type=int, default=2, help="prompts run one after another at streams 1")
    ap.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--lookup-max", type=int, default=4)
    ap.add_argument("--lookup-min", type=int, default=2)
    a = ap.parse_args()
    config, loaded, runner = build_runner(a.model, dtype=a.dtype, backend=a.backend, max_model_len=512,
                                          max_num_seqs=max(a.streams), warmup=False)
    spec = SpeculativeConfig("ngram", a.num_speculative_tokens, a.lookup_max, a.lookup_min)
    engines = {"plain": LLMEngine(config, loaded.spec, runner, loaded.tokenizer),
               "ngram": LLMEngine(dataclasses.replace(config, speculative=spec), loaded.spec, runner,
                                  loaded.tokenizer)}
    sp = SamplingParams(temperature=0.0, max_tokens=a.tokens)
    rows = []
    for kind in ("code", "summary"):
        ps = prompts(loaded.tokenizer, kind)
        for streams in a.streams:
            batches = [[p] for p in ps[:a.single_prompts]] if streams == 1 else [ps[:streams]]
            run(engines["plain"], batches[0], sp)                         # warm the shapes once
            res = {}
            for mode, eng in engines.items():
                outs, secs, drafted, acc = [], 0.0, 0, 0
                for b in batches:
                    o, dt, d, ac = run(eng, b, sp)
                    outs += o
                    secs, drafted, acc = secs + dt, drafted + d, acc + ac
                res[mode] = (outs, secs, drafted, acc)
            toks = sum(len(o) for o in res["plain"][0])
            same = sum(x == y for x, y in zip(res["plain"][0], res["ngram"][0]))
            row = {"kind": kind, "streams": streams, "requests": len(res["plain"][0]), "tokens": toks,
                   "plain_tok_s": round(toks / res["plain"][1], 1),
                   "ngram_tok_s": round(sum(len(o) for o in res["ngram"][0]) / res["ngram"][1], 1),
                   "speedup": round(res["plain"][1] / res["ngram"][1], 2),
                   "drafted": res["ngram"][2], "accepted": res["ngram"][3],
                   "acceptance": round(res["ngram"][3] / res["ngram"][2], 3) if res["ngram"][2] else 0.0,
                   "identical": f"{same}/{len(res['plain'][0])}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| prompts | streams | tokens | plain tok/s | ngram tok/s | speedup | acceptance | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['streams']} | {r['tokens']} | {r['plain_tok_s']} | {r['ngram_tok_s']} | "
              f"{r['speedup']}x | {r['acceptance']:.0%} ({r['accepted']}/{r['drafted']}) | {r['identical']} |")


if __name__ == "__main__":
    main()
