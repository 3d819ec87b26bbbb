"""Soak: a seeded, mixed workload against a real `kiln serve` for a given time, with the server's resources
sampled over time.

    .venv/bin/python scripts/soak.py --minutes 5 [--workers 8] [--seed 1] [--out bench-results/soak.json]
        [--check]  (exit 1 when a bound below is broken)
        [-- extra kiln serve flags, e.g. --backend jax]

It starts `kiln serve --http-port` (loopback, any free ports) and runs `--workers` client threads, each drawing
one action at a time from a seeded RNG: chat completions, completions, streamed completions (a third of them
cancelled after a few chunks: the client closes the socket), n > 1 samples, prompts of random length and bad
requests that must get a 4xx (NaN, huge integers, unknown roles, out-of-vocabulary ids, malformed JSON). Every
`--sample-seconds` it records the server's RSS, open file descriptors and threads (/proc), its KV-cache blocks
in use (/metrics) and the latency percentiles of the requests finished since the last sample.

Bounds (--check): no 5xx, no transport error other than the deliberate cancels; after the load stops, every KV
block is free; RSS grows by at most --max-rss-growth-mb and fds / threads by at most a few between the first and
the last quarter of the run (medians, so a warm-up step does not count).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the a kiln fires clay into stone over many long hours while potters wait and talk".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stats(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    return {"rss_mb": round(rss, 1), "threads": threads, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def metric(port: int, name: str) -> float | None:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


class Client:
    """One worker: seeded actions against the HTTP API; results go to the shared `log`."""

    BAD = [
        {"model": "m", "prompt": "x", "temperature": float("nan")},
        {"model": "m", "prompt": "x", "top_k": 10**20},
        {"model": "m", "prompt": "x", "n": 10**6},
        {"model": "m", "prompt": [10**9]},
        {"model": "m", "prompt": "x", "logit_bias": {"99999999": 5}},
        {"model": "m", "prompt": "x", "repetition_penalty": float("inf")},
        {"model": "m", "messages": [{"role": "bogus", "content": "hi"}]},
    ]

    def __init__(self, port: int, model: str, rng: random.Random, log: list, stop: threading.Event):
        self.port, self.model, self.rng, self.log, self.stop = port, model, rng, log, stop

    def prompt(self) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(1, 120)))

    def post(self, path: str, body: str, stream: bool = False, cancel_after: int | None = None) -> tuple[int, int]:
        """(status, chunks read); a cancel closes the connection after `cancel_after` stream chunks."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            c.request("POST", path, body=body, headers={"content-type": "application/json"})
            r = c.getresponse()
            if not stream or r.status != 200:
                r.read()
                return r.status, 0
            n = 0
            for line in r:
                if line.startswith(b"data:"):
                    n += 1
                    if cancel_after is not None and n >= cancel_after:
                        return -1, n              # deliberate cancel: drop the connection mid-stream
            return r.status, n
        finally:
            c.close()

    def one(self) -> None:
        rng, kind = self.rng, self.rng.choices(["chat", "completion", "stream", "cancel", "n", "bad", "bad_json"],
                                               [3, 3, 2, 2, 1, 1, 1])[0]
        body: dict = {"model": self.model, "max_tokens": rng.randint(1, 48), "temperature": rng.choice([0, 0.8]),
                      "seed": rng.randrange(2**31)}
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": self.prompt()}]
        else:
            body["prompt"] = self.prompt()
        if kind in ("stream", "cancel"):
            body["stream"] = True
        if kind == "n":
            body["n"] = rng.randint(2, 4)
        raw = json.dumps(body)
        if kind == "bad":
            raw = json.dumps(dict(rng.choice(self.BAD), model=self.model))   # NaN, Infinity as JSON5 spells them
        elif kind == "bad_json":
            raw = raw[: rng.randrange(1, len(raw))]
        path = "/v1/chat/completions" if "messages" in raw else "/v1/completions"
        t0 = time.perf_counter()
        try:
            status, _ = self.post(path, raw, stream=kind in ("stream", "cancel"),
                                  cancel_after=rng.randint(1, 4) if kind == "cancel" else None)
        except OSError as e:
            status = f"error: {type(e).__name__}"
        self.log.append({"t": time.time(), "kind": kind, "status": status, "s": time.perf_counter() - t0})

    def run(self) -> None:
        while not self.stop.is_set():
            self.one()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sample-seconds", type=float, default=10.0)
    ap.add_argument("--max-rss-growth-mb", type=float, default=200.0)
    ap.add_argument("--out", default="bench-results/soak.json")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("serve_args", nargs="*", help="extra `kiln serve` flags (after --)")
    a = ap.parse_args()
    http_port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "kiln.entrypoints.cli", "serve", "--http-port", str(http_port), "--port",
           str(grpc_port), "--max-model-len", "512", "--max-num-seqs", "16", "--max-queued", "64", *a.serve_args]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in server.stderr:                                   # wait for "ready"
        sys.stderr.write(line)
        if " ready " in line or line.rstrip().endswith("ready"):
            break
    else:
        print("server exited before it was ready", file=sys.stderr)
        return 2
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()   # drain its log
    model = json.loads(_get(http_port, "/v1/models"))["data"][0]["id"]
    log: list[dict] = []
    stop = threading.Event()
    master = random.Random(a.seed)
    workers = [threading.Thread(target=Client(http_port, model, random.Random(master.random()), log, stop).run,
                                daemon=True) for _ in range(a.workers)]
    for w in workers:
        w.start()
    samples, t_end, seen = [], time.time() + 60 * a.minutes, 0
    while time.time() < t_end and server.poll() is None:
        time.sleep(a.sample_seconds)
        window, seen = log[seen:], len(log)
        lat = sorted(x["s"] for x in window if x["status"] == 200)
        samples.append({"t": round(time.time() - (t_end - 60 * a.minutes), 1), **proc_stats(server.pid),
                        "kv_blocks_used": metric(http_port, "kiln_kv_blocks_used"), "requests": len(window),
                        "p50_s": round(lat[len(lat) // 2], 3) if lat else None,
                        "p95_s": round(lat[int(len(lat) * 0.95)], 3) if lat else None})
        print(json.dumps(samples[-1]), flush=True)
    stop.set()
    for w in workers:
        w.join(timeout=180)
    time.sleep(2)
    alive = server.poll() is None
    blocks_after = metric(http_port, "kiln_kv_blocks_used") if alive else None
    server.terminate()
    server.wait(timeout=60)
    statuses: dict[str, int] = {}
    for x in log:
        statuses[str(x["status"])] = statuses.get(str(x["status"]), 0) + 1
    q = max(len(samples) // 4, 1)
    growth = {k: statistics.median(s[k] for s in samples[-q:]) - statistics.median(s[k] for s in samples[:q])
              for k in ("rss_mb", "fds", "threads")} if samples else {}
    summary = {"minutes": a.minutes, "workers": a.workers, "seed": a.seed, "requests": len(log),
               "statuses": statuses, "server_alive": alive, "kv_blocks_used_after": blocks_after,
               "growth_first_to_last_quarter": growth, "samples": samples}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}))
    problems = [f"{k} responses" for k in statuses if k.startswith("5") or k.startswith("error")]
    problems += [] if alive else ["the server died"]
    problems += [] if blocks_after == 0 else [f"{blocks_after} KV blocks still used after the load stopped"]
    if growth and growth["rss_mb"] > a.max_rss_growth_mb:
        problems.append(f"RSS grew {growth['rss_mb']:.0f} MB")
    if growth and (growth["fds"] > 8 or growth["threads"] > 8):
        problems.append(f"fds grew {growth['fds']}, threads {growth['threads']}")
    for p in problems:
        print("soak: " + p, file=sys.stderr)
    return 1 if a.check and problems else 0


def _get(port: int, path: str) -> str:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", path)
    body = c.getresponse().read().decode()
    c.close()
    return body


if __name__ == "__main__":
    sys.exit(main())
