"""W1 (64 prompts x 128 tokens, greedy, EOS ignored) and W2 (one stream) on kiln and, in the same run, on the
peers installed under $PEERS (../shared/peers/setup.sh): a table of tokens/s, kiln's ratio to each, JSON and a
PNG chart, plus the machine's own bounds (memory read bandwidth, matmul throughput).

    .venv/bin/python scripts/bench.py [--peers vllm,llamacpp,hf] [--out bench-results] [--baseline DIR]

W1 also runs sampled (temperature 0.8, top_p 0.95, a seed per request) on kiln: `sampled_tok_per_s`.
`--baseline DIR` runs the same kiln configurations from another checkout (e.g. a `git worktree` of an older
commit) in a subprocess of this run, so a change is measured against its parent side by side.
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
    try:                                     # PyTorch's oneDNN bf16 matmul (the torch backend's)
        import torch
        a = torch.ones(1024, 1024, dtype=torch.bfloat16)
        a @ a
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        out["matmul_bfloat16_onednn_GFLOPs"] = round(10 * 2 * 1024**3 / (time.perf_counter() - t) / 1e9, 1)
    except ImportError:
        pass
    return out


def run_kiln(model: str, n: int, out_len: int, backend: str, dtype: str, kv: str, sampled: bool = True) -> dict:
    import jax
    import workload
    from kiln import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(model=model, backend=backend, dtype=dtype, kv_cache_dtype=kv, max_num_seqs=max(n, 1),
              max_model_len=512)
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
    sampled_tps = None
    if sampled:
        sps = [SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=out_len, ignore_eos=True)
               for i in range(n)]
        llm.generate(prompts[:2], sps[:2])                                              # touch the sampler
        t2 = time.perf_counter()
        outs_s = llm.generate(prompts, sps)
        sampled_tps = round(sum(len(o.outputs[0].token_ids) for o in outs_s) / (time.perf_counter() - t2), 1)
    cfg, runner = llm.engine.config, llm.engine.runner
    params = getattr(runner, "weights", None) or getattr(runner, "params", None)
    # weight bytes one single-stream step reads: the torch backend's by batch size, the jax backend's all of them
    wbytes = params.bytes_read(1) if cfg.backend == "torch" else sum(x.nbytes for x in jax.tree.leaves(params))
    kv_note = f", KV {cfg.kv_dtype}" if cfg.kv_dtype != cfg.dtype else ""
    st = llm.engine.stats()
    return {"engine": f"kiln {cfg.backend} ({cfg.dtype}{kv_note})", "n": n,
            "tokens": [o.outputs[0].token_ids for o in outs], "gen_tokens": gen, "time_s": round(dt, 2),
            "tok_per_s": round(gen / dt, 1), "single_stream_tok_per_s": round(out_len / single, 1),
            "sampled_tok_per_s": sampled_tps,
            "init_s": round(init, 1), "weight_bytes_per_token": wbytes,
            "compiles_while_serving": st.get("compiles_while_serving", 0)}


def run_baseline(tree: Path, kiln_runs: str, n: int, out_len: int, extra: tuple[str, ...] = ()) -> list[dict]:
    """The same kiln runs from another checkout (its kiln package first on the path), in a subprocess."""
    r = subprocess.run([sys.executable, __file__, "--kiln", kiln_runs, "--peers", "", "--no-reference",
                        "--kiln-only", "-n", str(n), "--out-len", str(out_len), *extra], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(tree.resolve())})
    out = [json.loads(line[7:]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if not out:
        print(f"[bench] baseline {tree} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
    for x in out:
        x["engine"] += f" [baseline {tree.name}]"
    return out


def hf_reference(model: str, n: int, out_len: int, dtype: str) -> list[list[int]]:
    """transformers' greedy W1 outputs (batched, left-padded) on kiln's HF copy of the model's weights."""
    import torch
    import workload
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kiln import config as C
    from kiln.models.fetch import resolve_model
    from kiln.models.loader import converted_dir
    path = resolve_model(model, C.models_dir())
    folder = str(path if path.is_dir() else converted_dir(path, C.models_dir()))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    with torch.inference_mode():
        enc = tok(workload.prompts(n), return_tensors="pt", padding=True)
        # eos_token_id=[]: EOS neither stops nor is suppressed, as kiln's ignore_eos (min_new_tokens would mask it)
        out = hf.generate(**enc, max_new_tokens=out_len, do_sample=False, eos_token_id=[],
                          pad_token_id=tok.pad_token_id or 0)
    return out[:, enc["input_ids"].shape[1]:].tolist()


def same_outputs(a: list[list[int]], b: list[list[int]]) -> str:
    """'k/n identical, median first difference at token m' between two sets of W1 outputs."""
    first = sorted(next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p)) for p, q in zip(a, b))
    return f"{sum(p == q for p, q in zip(a, b))}/{len(a)} identical, median first difference at token " \
           f"{first[len(first) // 2]}"


def run_peer(name: str, peers: Path, n: int, out_len: int, vllm_dtype: str = "bfloat16") -> dict | None:
    script, venv = {"vllm": ("vllm_offline.py", "vllm"), "llamacpp": ("llamacpp_offline.py", "ref"),
                    "hf": ("hf_offline.py", "ref")}[name]
    py = peers / venv / "bin" / "python"
    if not py.exists():
        print(f"[bench] {name}: not installed under {peers} (run ../shared/peers/setup.sh)", file=sys.stderr)
        return None
    extra = ["--dtype", vllm_dtype] if name == "vllm" else []
    r = subprocess.run([str(py), str(PEERS_SRC / script), "-n", str(n), "--out-len", str(out_len), *extra],
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
                    help="comma list of kiln backend:dtype[:kv_cache_dtype] runs; the first is compared to the peers")
    ap.add_argument("--peers", default="vllm,llamacpp,hf", help="comma list; empty for kiln only")
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="skip comparing W1 outputs with transformers (float32 and bfloat16) on the same weights")
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another kiln checkout whose same configurations run in this invocation too")
    ap.add_argument("--vllm-dtype", default="bfloat16",
                    help="vLLM's dtype (float32 where the CPU has no bf16 instructions: its bf16 path crawls there)")
    ap.add_argument("--no-sampled", dest="sampled", action="store_false", help="skip the sampled W1 variant")
    ap.add_argument("--kiln-only", action="store_true", help=argparse.SUPPRESS)   # run_baseline's subprocess
    a = ap.parse_args()
    peers = Path(os.environ.get("PEERS", "~/.cache/kiln-peers")).expanduser()
    results = []
    if a.kiln_only:
        for run in a.kiln.split(","):
            backend, dtype, kv = (run.split(":") + ["auto", "auto"])[:3]
            r = run_kiln(a.model, a.n, a.out_len, backend, dtype, kv, a.sampled)
            print("RESULT " + json.dumps({k: v for k, v in r.items() if k != "tokens"}), flush=True)
        return
    bounds = machine_bounds()
    print("machine:", bounds)
    for run in a.kiln.split(","):
        backend, dtype, kv = (run.split(":") + ["auto", "auto"])[:3]
        results.append(run_kiln(a.model, a.n, a.out_len, backend, dtype, kv, a.sampled))
        print("RESULT " + json.dumps({k: v for k, v in results[-1].items() if k != "tokens"}), flush=True)
    if a.reference:   # W1 outputs against transformers on the same weights, float32 and bfloat16
        refs = {dt: hf_reference(a.model, a.n, a.out_len, dt) for dt in ("float32", "bfloat16")}
        print(f"[bench] transformers bfloat16 vs transformers float32: {same_outputs(refs['bfloat16'], refs['float32'])}")
        for r in results:
            for dt, ref in refs.items():
                r[f"w1_vs_hf_{dt}"] = same_outputs(r["tokens"], ref)
                print(f"[bench] {r['engine']} vs transformers {dt}: {r[f'w1_vs_hf_{dt}']}")
    for r in results:
        r.pop("tokens")
    if a.baseline is not None:
        for r in run_baseline(a.baseline, a.kiln, a.n, a.out_len, () if a.sampled else ("--no-sampled",)):
            print("RESULT " + json.dumps(r), flush=True)
            results.append(r)
    for name in filter(None, a.peers.split(",")):
        r = run_peer(name, peers, a.n, a.out_len, a.vllm_dtype)
        if r:
            print("RESULT " + json.dumps(r), flush=True)
            results.append(r)
    kiln = results[0]
    # bounds for the default model: bytes of weights read per decode step (W2), FLOPs per token (W1)
    flops_per_token = 2 * 134.5e6
    w2_bound = bounds["mem_read_GBps"] * 1e9 / kiln["weight_bytes_per_token"]
    peak = bounds["matmul_float32_GFLOPs"] if "float32" in kiln["engine"] else max(
        bounds["matmul_bfloat16_GFLOPs"], bounds.get("matmul_bfloat16_onednn_GFLOPs", 0))
    w1_bound = peak * 1e9 / flops_per_token
    print(f"\n{'engine':<52} {'W1 tok/s':>9} {'W1 sampled':>10} {'W2 tok/s':>9} {'init s':>7} {'kiln/W1':>8} "
          f"{'kiln/W2':>8}")
    for r in results:
        print(f"{r['engine']:<52} {r['tok_per_s']:>9} {r.get('sampled_tok_per_s') or '-':>10} "
              f"{r['single_stream_tok_per_s']:>9} {r['init_s']:>7} {kiln['tok_per_s'] / r['tok_per_s']:>8.2f} "
              f"{kiln['single_stream_tok_per_s'] / r['single_stream_tok_per_s']:>8.2f}")
    print(f"bounds for {kiln['engine']}: W2 <= {w2_bound:.0f} tok/s ({kiln['weight_bytes_per_token'] / 1e6:.0f} MB of "
          f"weights per token at the read bandwidth), W1 <= {w1_bound:.0f} tok/s (matmul peak); kiln reaches {kiln['single_stream_tok_per_s'] / w2_bound:.0%} and "
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
