"""W1 (64 prompts x 128 tokens, greedy, EOS ignored) and W2 (one stream) on kiln and, in the same run, on the
peers installed under $PEERS (../shared/peers/setup.sh): a table of tokens/s, kiln's ratio to each, JSON and a
PNG chart, plus the machine's own bounds (memory read bandwidth, matmul throughput).

    .venv/bin/python scripts/bench.py [--peers vllm,llamacpp,hf] [--out bench-results]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
PEERS_SRC = ROOT.parent / "shared" / "peers"
sys.path.insert(0, str(PEERS_SRC))


def machine_bounds() -> dict:
    """Memory read bandwidth (GB/s, a row-wise max over 1 GiB) and fp32/bf16 matmul throughput (GFLOP/s)."""
    import jax
    import jax.numpy as jnp
    from timing import timeit
    big = jax.random.normal(jax.random.key(0), (4096, 65536))           # 1 GiB, streamed once per call
    bw = big.nbytes / (timeit(jax.jit(lambda y: jnp.max(y, axis=1)), big, reps=5) / 1000) / 1e9
    del big
    out = {"mem_read_GBps": round(bw, 1)}
    for dt in ("float32", "bfloat16"):
        x = jnp.ones((1024, 1024), dt)
        f = jax.jit(lambda x: x @ x)
        f(x).block_until_ready()
        t = time.perf_counter()
        for _ in range(10):
            f(x).block_until_ready()
        out[f"matmul_{dt}_GFLOPs"] = round(10 * 2 * 1024**3 / (time.perf_counter() - t) / 1e9, 1)
    return out


def run_kiln(model: str, n: int, out_len: int, backend: str, dtype: str) -> dict:
    import workload
    from kiln import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(model=model, backend=backend, dtype=dtype, max_num_seqs=max(n, 1), max_model_len=512)
    init = time.perf_counter() - t0
    sp = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    prompts = workload.prompts(n)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))   # touch the graphs
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    dt = time.perf_counter() - t0
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    t1 = time.perf_counter()
    llm.generate(prompts[:1], sp)
    single = time.perf_counter() - t1
    cfg = llm.engine.config
    return {"engine": f"kiln {cfg.backend} ({cfg.dtype})", "n": n, "tokens": [o.outputs[0].token_ids for o in outs], "gen_tokens": gen, "time_s": round(dt, 2),
            "tok_per_s": round(gen / dt, 1), "single_stream_tok_per_s": round(out_len / single, 1),
            "init_s": round(init, 1), "compiles_while_serving": llm.engine.runner.guard.while_serving}


def run_peer(name: str, peers: Path, n: int, out_len: int) -> dict | None:
    script, venv = {"vllm": ("vllm_offline.py", "vllm"), "llamacpp": ("llamacpp_offline.py", "ref"),
                    "hf": ("hf_offline.py", "ref")}[name]
    py = peers / venv / "bin" / "python"
    if not py.exists():
        print(f"[bench] {name}: not installed under {peers} (run ../shared/peers/setup.sh)", file=sys.stderr)
        return None
    r = subprocess.run([str(py), str(PEERS_SRC / script), "-n", str(n), "--out-len", str(out_len)],
                       capture_output=True, text=True, env={**os.environ, "PEERS": str(peers)})
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"[bench] {name} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--out-len", type=int, default=128)
    ap.add_argument("--kiln", default="torch:auto,jax:float32",
                    help="comma list of kiln backend:dtype runs; the first is the one compared to the peers")
    ap.add_argument("--peers", default="vllm,llamacpp,hf", help="comma list; empty for kiln only")
    ap.add_argument("--out", default="bench-results")
    a = ap.parse_args()
    peers = Path(os.environ.get("PEERS", "~/.cache/kiln-peers")).expanduser()
    bounds = machine_bounds()
    print("machine:", bounds)
    results = []
    for run in a.kiln.split(","):
        backend, _, dtype = run.partition(":")
        results.append(run_kiln(a.model, a.n, a.out_len, backend, dtype or "auto"))
        print("RESULT " + json.dumps({k: v for k, v in results[-1].items() if k != "tokens"}), flush=True)
    # W1 outputs against the float32 engine (equal to transformers float32 by tests/backends/test_model_vs_hf.py)
    ref = next((r["tokens"] for r in results if "float32" in r["engine"]), None)
    for r in results:
        toks = r.pop("tokens")
        if ref is not None:
            r["w1_same_as_float32"] = f"{sum(a == b for a, b in zip(toks, ref))}/{len(ref)}"
            r["w1_first_diff_median"] = sorted(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                                               for a, b in zip(toks, ref))[len(ref) // 2]
            print(f"[bench] {r['engine']}: W1 sequences identical to float32: {r['w1_same_as_float32']}, "
                  f"median first differing token {r['w1_first_diff_median']}")
    for name in filter(None, a.peers.split(",")):
        r = run_peer(name, peers, a.n, a.out_len)
        if r:
            print("RESULT " + json.dumps(r), flush=True)
            results.append(r)
    kiln = results[0]
    # bounds for the default model: bytes of weights read per decode step (W2), FLOPs per token (W1)
    weights_bytes, flops_per_token = 134.5e6 * 4 if "float32" in kiln["engine"] else 134.5e6 * 2, 2 * 134.5e6
    w2_bound = bounds["mem_read_GBps"] * 1e9 / weights_bytes
    w1_bound = bounds["matmul_float32_GFLOPs"] * 1e9 / flops_per_token
    print(f"\n{'engine':<36} {'W1 tok/s':>9} {'W2 tok/s':>9} {'init s':>7} {'kiln/W1':>8} {'kiln/W2':>8}")
    for r in results:
        print(f"{r['engine']:<36} {r['tok_per_s']:>9} {r['single_stream_tok_per_s']:>9} {r['init_s']:>7} "
              f"{kiln['tok_per_s'] / r['tok_per_s']:>8.2f} "
              f"{kiln['single_stream_tok_per_s'] / r['single_stream_tok_per_s']:>8.2f}")
    print(f"bounds ({kiln['engine']} weights): W2 <= {w2_bound:.0f} tok/s (bandwidth), W1 <= {w1_bound:.0f} tok/s (fp32 "
          f"matmul); kiln reaches {kiln['single_stream_tok_per_s'] / w2_bound:.0%} and "
          f"{kiln['tok_per_s'] / w1_bound:.0%}")
    out = Path(a.out)
    out.mkdir(exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": bounds,
                                                "results": results}, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, k, title in ((axes[0], "tok_per_s", "W1 throughput (tok/s)"),
                             (axes[1], "single_stream_tok_per_s", "W2 single stream (tok/s)")):
            ax.barh([r["engine"] for r in results], [r[k] for r in results])
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(out / "bench.png")
    except ImportError:
        print("[bench] matplotlib not installed: no chart", file=sys.stderr)


if __name__ == "__main__":
    main()
