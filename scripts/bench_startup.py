"""Start-up: cold `kiln warmup`, warm `kiln warmup`, and process start to first token with a warm graph cache,
each in a fresh process against one temporary graph cache; optionally vLLM CPU's start time in the same run.

    .venv/bin/python scripts/bench_startup.py [--max-num-seqs 64 --max-model-len 512] [--backend torch] [--vllm]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRST_TOKEN = """
import time, sys
t0 = float(sys.argv[1])
from kiln import LLM, SamplingParams
llm = LLM(model=sys.argv[2], max_num_seqs=int(sys.argv[3]), max_model_len=int(sys.argv[4]), backend=sys.argv[5])
out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=1))
print("FIRST_TOKEN", time.time() - t0, llm.engine.stats()["compiles"], flush=True)
"""


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd[:4])}... failed:\n{r.stderr[-3000:]}")
    return time.time() - t0, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--backend", default="auto", help="kiln's backend: auto, jax or torch")
    ap.add_argument("--vllm", action="store_true", help="also time vLLM CPU's start (../shared/peers)")
    a = ap.parse_args()
    env = {**os.environ, "KILN_CACHE_DIR": tempfile.mkdtemp(prefix="kiln-bench-cache-"),
           "KILN_MODELS_DIR": os.environ.get("KILN_MODELS_DIR", str(Path("~/.cache/kiln/models").expanduser()))}
    kiln = [sys.executable, "-m", "kiln.entrypoints.cli", "--log-level", "WARNING", "warmup", "--model", a.model,
            "--max-num-seqs", str(a.max_num_seqs), "--max-model-len", str(a.max_model_len), "--backend", a.backend]
    res = {}
    res["cold_warmup_s"], out = timed(kiln, env)
    res["graphs"] = out.strip().splitlines()[-1]
    res["warm_warmup_s"], _ = timed(kiln, env)
    _, out = timed([sys.executable, "-c", FIRST_TOKEN, str(time.time()), a.model, str(a.max_num_seqs),
                    str(a.max_model_len), a.backend], env)
    line = next(l for l in out.splitlines() if l.startswith("FIRST_TOKEN"))
    res["warm_start_to_first_token_s"], res["compiles_in_warm_start"] = float(line.split()[1]), int(line.split()[2])
    if a.vllm:
        peers = Path(os.environ.get("PEERS", "~/.cache/kiln-peers")).expanduser()
        r = subprocess.run([str(peers / "vllm/bin/python"), str(ROOT.parent / "shared/peers/vllm_offline.py"),
                            "-n", "1", "--out-len", "1"], capture_output=True, text=True, env={**os.environ})
        for l in r.stdout.splitlines():
            if l.startswith("RESULT "):
                res["vllm_init_s"] = json.loads(l[7:])["init_s"]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
