"""Online serving benchmark, as vLLM's `benchmarks/benchmark_serving.py`: Poisson arrivals at several request
rates against a running server, streaming, per-request TTFT / TPOT / ITL / E2E, throughput and goodput.

Backends:
    grpc    a `kiln serve` (kiln.v1.Inference, streaming Generate) at --target host:port
    openai  any OpenAI-compatible HTTP server (`kiln serve --http-port`, `vllm serve`, ...) at --base-url,
            streaming /v1/chat/completions (--endpoint chat) or /v1/completions (--endpoint completions)

    kiln serve --http-port 8000 &
    .venv/bin/python scripts/bench_serving.py --backend openai --base-url http://127.0.0.1:8000/v1 \\
        --num-prompts 64 --rates 1,2,4,inf --max-tokens 128 --ignore-eos --out bench-serving.json
    .venv/bin/python scripts/bench_serving.py --backend grpc --target 127.0.0.1:50051 --num-prompts 64

Prompts are the shared workload's (../shared/peers/workload.py). TTFT: request sent -> first token; TPOT: (E2E -
TTFT) / (output tokens - 1) per request; ITL: time between streamed chunks that carry tokens (a chunk may carry
several tokens); goodput: requests/s that meet every SLO given (--goodput-ttft-ms, --goodput-tpot-ms).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "shared" / "peers"))


@dataclasses.dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0                      # seconds
    e2e: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


# -- backends -----------------------------------------------------------------------------------------
class GrpcBackend:
    def __init__(self, a):
        import grpc
        from kiln.proto import inference_pb2_grpc as pb_grpc
        self.a = a
        self.channel = grpc.aio.insecure_channel(a.target, options=[("grpc.max_receive_message_length", 2**26)])
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {a.api_key}"),) if a.api_key else ()

    async def request(self, prompt: str) -> Result:
        from kiln.entrypoints.client import generate_request
        a, r = self.a, Result()
        p = [{"role": "user", "content": prompt}] if a.endpoint == "chat" else prompt
        req = generate_request(p, temperature=a.temperature, max_tokens=a.max_tokens,
                               ignore_eos=True if a.ignore_eos else None)
        t0 = last = time.perf_counter()
        try:
            async for d in self.stub.Generate(req, metadata=self.metadata, timeout=a.timeout):
                now = time.perf_counter()
                if d.token_ids:
                    if r.output_tokens == 0:
                        r.ttft = now - t0
                    else:
                        r.itl.append(now - last)
                    last = now
                    r.output_tokens += len(d.token_ids)
                if d.HasField("usage"):
                    r.prompt_tokens = d.usage.prompt_tokens
            r.e2e, r.ok = time.perf_counter() - t0, r.output_tokens > 0
        except Exception as e:   # noqa: BLE001 - any failure is one failed request
            r.error = f"{type(e).__name__}: {e.details() if hasattr(e, 'details') else e}"
        return r

    async def close(self):
        await self.channel.close()


class OpenAIBackend:
    def __init__(self, a):
        try:
            import httpx
        except ImportError:            # the openai package's own transport in this venv
            import httpx2 as httpx
        self.a = a
        headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
        self.client = httpx.AsyncClient(headers=headers, timeout=a.timeout,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        self.url = a.base_url.rstrip("/") + ("/chat/completions" if a.endpoint == "chat" else "/completions")
        self.model = a.model

    async def resolve_model(self) -> None:
        if self.model is None:
            r = await self.client.get(self.a.base_url.rstrip("/") + "/models")
            r.raise_for_status()
            self.model = r.json()["data"][0]["id"]

    async def request(self, prompt: str) -> Result:
        a, r = self.a, Result()
        body = {"model": self.model, "max_tokens": a.max_tokens, "temperature": a.temperature, "stream": True,
                "stream_options": {"include_usage": True}}
        if a.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if a.ignore_eos:
            body["ignore_eos"] = True
        t0 = last = time.perf_counter()
        chunks, usage = 0, None
        try:
            async with self.client.stream("POST", self.url, json=body) as resp:
                if resp.status_code != 200:
                    r.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                    return r
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        r.error = obj["error"].get("message", str(obj))
                        return r
                    usage = obj.get("usage") or usage
                    choices = obj.get("choices") or []
                    text = "".join((c.get("delta") or {}).get("content") or c.get("text") or "" for c in choices)
                    if text:
                        now = time.perf_counter()
                        if chunks == 0:
                            r.ttft = now - t0
                        else:
                            r.itl.append(now - last)
                        last, chunks = now, chunks + 1
            r.e2e = time.perf_counter() - t0
            r.output_tokens = usage["completion_tokens"] if usage else chunks
            r.prompt_tokens = usage["prompt_tokens"] if usage else 0
            r.ok = chunks > 0
        except Exception as e:   # noqa: BLE001
            r.error = f"{type(e).__name__}: {e}"
        return r

    async def close(self):
        await self.client.aclose()


# -- one rate -----------------------------------------------------------------------------------------
async def run_rate(backend, prompts: list[str], rate: float, a) -> tuple[list[Result], float]:
    rng = random.Random(a.seed)
    sem = asyncio.Semaphore(a.max_concurrency) if a.max_concurrency else None

    async def one(p: str) -> Result:
        if sem is None:
            return await backend.request(p)
        async with sem:
            return await backend.request(p)
    tasks = []
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        tasks.append(asyncio.create_task(one(p)))
        if rate != math.inf and i < len(prompts) - 1:
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(rate: float, results: list[Result], duration: float, a) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft * 1e3 for r in ok]
    tpot = [r.tpot * 1e3 for r in ok if r.tpot is not None]
    itl = [x * 1e3 for r in ok for x in r.itl]
    e2e = [r.e2e * 1e3 for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)

    def good(r: Result) -> bool:
        return (a.goodput_ttft_ms is None or r.ttft * 1e3 <= a.goodput_ttft_ms) and \
            (a.goodput_tpot_ms is None or (r.tpot or 0.0) * 1e3 <= a.goodput_tpot_ms)
    row = {"rate": "inf" if rate == math.inf else rate, "completed": len(ok), "failed": len(results) - len(ok),
           "duration_s": duration, "input_tokens": sum(r.prompt_tokens for r in ok), "output_tokens": out_tokens,
           "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
           "goodput": sum(good(r) for r in ok) / duration if (a.goodput_ttft_ms or a.goodput_tpot_ms) else None}
    for name, xs in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl), ("e2e_ms", e2e)):
        row[f"mean_{name}"] = sum(xs) / len(xs) if xs else float("nan")
        row[f"p50_{name}"], row[f"p99_{name}"] = _pct(xs, 50), _pct(xs, 99)
    row = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        row["errors"] = errors[:5]
    return row


def print_table(rows: list[dict]) -> None:
    cols = [("rate", "rate", "{}"), ("completed", "ok", "{}"), ("failed", "fail", "{}"),
            ("request_throughput", "req/s", "{:.2f}"), ("output_throughput", "out tok/s", "{:.1f}"),
            ("goodput", "goodput", "{:.2f}"),
            ("p50_ttft_ms", "TTFT p50", "{:.1f}"), ("p99_ttft_ms", "TTFT p99", "{:.1f}"),
            ("p50_tpot_ms", "TPOT p50", "{:.1f}"), ("p99_tpot_ms", "TPOT p99", "{:.1f}"),
            ("p50_itl_ms", "ITL p50", "{:.1f}"), ("p99_itl_ms", "ITL p99", "{:.1f}")]
    print(" ".join(f"{h:>10}" for _, h, _ in cols))
    for r in rows:
        print(" ".join(f"{'-' if r[k] is None else fmt.format(r[k]):>10}" for k, _, fmt in cols))
    print("(latencies in ms; goodput = requests/s within the SLOs)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("grpc", "openai"), default="openai")
    p.add_argument("--target", default="127.0.0.1:50051", help="grpc: host:port of `kiln serve`")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="openai: the API root (ends in /v1)")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="completions",
                   help="chat messages or raw completions (grpc: chat or text prompt)")
    p.add_argument("--model", default=None, help="openai: model name (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--rates", default="1,2,4,inf", help="request rates (req/s) to run one after another; inf = "
                                                       "all at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens (vLLM/kiln extension)")
    p.add_argument("--goodput-ttft-ms", type=float, default=None, help="SLO: time to first token")
    p.add_argument("--goodput-tpot-ms", type=float, default=None, help="SLO: time per output token")
    p.add_argument("--warmup", type=int, default=1, help="requests sent (and not measured) before each run")
    p.add_argument("--seed", type=int, default=0, help="arrival-time seed")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--out", default="bench-serving.json", help="JSON results file")
    a = p.parse_args(argv)
    a.rate_list = [math.inf if r.strip() in ("inf", "Inf") else float(r) for r in a.rates.split(",")]
    return a


async def amain(a) -> int:
    import workload
    prompts = workload.prompts(a.num_prompts)
    backend = GrpcBackend(a) if a.backend == "grpc" else OpenAIBackend(a)
    rows = []
    try:
        if a.backend == "openai":
            await backend.resolve_model()
        for rate in a.rate_list:
            for _ in range(a.warmup):
                w = await backend.request(prompts[0])
                if not w.ok:
                    raise SystemExit(f"warmup request failed: {w.error}")
            results, duration = await run_rate(backend, prompts, rate, a)
            rows.append(summarize(rate, results, duration, a))
            print(f"rate {rows[-1]['rate']}: {rows[-1]['completed']}/{len(results)} ok in {duration:.1f}s",
                  file=sys.stderr)
    finally:
        await backend.close()
    print_table(rows)
    meta = {k: v for k, v in vars(a).items() if k not in ("rate_list", "api_key")}
    if a.backend == "openai":
        meta["model"] = backend.model
    Path(a.out).write_text(json.dumps({"config": meta, "results": rows}, indent=2, default=str) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(amain(parse_args())))
