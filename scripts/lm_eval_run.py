"""lm-eval-harness against `kiln serve`: start the server, run lm-eval's `local-completions` model on a task of
scripts/lm_eval/ (a local JSONL file, no hub), print the accuracy; `--hf DIR` runs the same task with lm-eval's
own `hf` model (transformers) on an HF folder as the independent reference.

    pip install -e '.[eval]'
    python scripts/lm_eval_run.py                      # kiln serve on the default model, task kiln_mc
    python scripts/lm_eval_run.py -- --backend jax     # other `kiln serve` arguments (replace the defaults)
    python scripts/lm_eval_run.py --hf ~/.cache/kiln/models/smollm2-135m-instruct-hf
    python scripts/lm_eval_run.py --base-url http://127.0.0.1:8000/v1/completions --model NAME   # a running server

lm-eval's loglikelihood requests are /v1/completions bodies with `echo: true`, `logprobs: 1`, `max_tokens: 1`
(newer versions; 0 in some), `temperature: 0` and `prompt` a list of token-id lists; it tokenizes with a
huggingface tokenizer (`--tokenizer`, the HF folder by default: the same vocabulary as the GGUF). Prompt
scoring needs the server's scoring graphs: today `--allow-lazy-compile` (passed here) compiles them on first use.
Everything runs offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "scripts" / "lm_eval"
# No full warmup (its ~100 graphs take ~15 minutes on 2 cores): the graphs this task needs compile on first use
# (--allow-lazy-compile, always passed); short prompts, a few at a time.
SERVE_DEFAULTS = ["--skip-warmup", "--max-model-len", "512", "--max-num-seqs", "8"]
HF_DIR = Path(os.environ.get("KILN_CACHE_DIR", Path.home() / ".cache" / "kiln")) / "models" / \
    "smollm2-135m-instruct-hf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"kiln serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"kiln serve not healthy after {timeout:.0f}s")


def start_server(serve_args: list[str], timeout: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "kiln.entrypoints.cli", "serve", "--no-grpc", "--http-port", str(port),
           "--served-model-name", "kiln", "--allow-lazy-compile", *serve_args]
    print("+", " ".join(cmd), file=sys.stderr)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(cmd, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, timeout)
    except BaseException:
        proc.kill()
        raise
    return proc, base


def evaluate(model: str, model_args: dict, task: str, limit: int | None, batch_size: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager
    res = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], limit=limit,
                                  task_manager=TaskManager(include_path=str(TASKS)), batch_size=batch_size,
                                  log_samples=False)
    return res["results"][task]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="kiln_mc", help="a task of scripts/lm_eval/ (default: kiln_mc)")
    ap.add_argument("--limit", type=int, default=None, help="first N documents only")
    ap.add_argument("--tokenizer", default=str(HF_DIR), help="HF tokenizer folder lm-eval counts tokens with")
    ap.add_argument("--base-url", default=None, help="a running server's /v1/completions URL (no server started)")
    ap.add_argument("--model", default="kiln", help="the served model name (with --base-url)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per /v1/completions request (default: 8)")
    ap.add_argument("--hf", metavar="DIR", default=None,
                    help="instead: lm-eval's hf model (transformers, float32, CPU) on this HF folder")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("serve_args", nargs="*", help="`kiln serve` arguments (after --; default: "
                    + " ".join(SERVE_DEFAULTS) + ")")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.chdir(ROOT)                       # the task's data_files is relative to the repository root
    t0 = time.monotonic()
    if args.hf:
        result = evaluate("hf", {"pretrained": args.hf, "dtype": "float32", "device": "cpu"}, args.task,
                          args.limit, args.batch_size)
        label = f"hf {args.hf}"
    else:
        proc, base = (None, None) if args.base_url else \
            start_server(args.serve_args or SERVE_DEFAULTS, args.startup_timeout)
        url = args.base_url or f"{base}/v1/completions"
        try:
            result = evaluate("local-completions", {"base_url": url, "model": args.model if args.base_url else "kiln",
                                                    "tokenizer": args.tokenizer, "tokenizer_backend": "huggingface",
                                                    "tokenized_requests": True, "max_retries": 1},
                              args.task, args.limit, args.batch_size)
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        label = f"kiln serve {url}"
    metrics = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    print(json.dumps({"task": args.task, "model": label, "seconds": round(time.monotonic() - t0, 1), **metrics}))


if __name__ == "__main__":
    main()
