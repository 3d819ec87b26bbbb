"""The `kiln` command line: thin adapters over the engine. Errors are one line and a non-zero exit."""
from __future__ import annotations

import argparse
import logging
import sys
import time

from kiln.backends.platform import BACKENDS
from kiln.config import DTYPES, QUANTIZATIONS, ModelConfig


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=ModelConfig.model,
                   help="a known model name (smollm2-135m-instruct), an HF folder or a .gguf file "
                        "(default: %(default)s, fetched once into $KILN_CACHE_DIR/models)")
    g.add_argument("--backend", default=None, choices=BACKENDS,
                   help="what runs the model step: jax (XLA graphs) or torch (PyTorch CPU kernels); auto = torch "
                        "on a CPU with bf16 dot instructions (AVX512_BF16/AMX), where it is faster, else jax "
                        "(also KILN_BACKEND; default: auto)")
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="compute dtype; auto = float32 for jax on CPU, else bfloat16")
    g.add_argument("--kv-cache-dtype", default="auto", choices=DTYPES,
                   help="KV-cache dtype; auto = the compute dtype (torch backend: float32 also possible)")
    g.add_argument("--quantization", default="auto", choices=QUANTIZATIONS,
                   help="auto: the torch backend keeps 4-bit GGUF (Q4_1) layer weights 4-bit where that is "
                        "lossless, for small batches; none: dense weights only (default: auto)")
    g.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per request "
                   "(default: min(model limit, 2048))")
    g.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together (default: 64)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one prefill step, padding included (default: 2048)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default: 16)")
    g.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV-cache size in GiB (default: $KILN_KVCACHE_SPACE or 1)")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn off reuse of cached prompt blocks")
    g.add_argument("--seed", type=int, default=0, help="engine seed for requests without their own")
    c = p.add_argument_group("compiled graphs (buckets, warmup, graph cache)")
    for name, what in (("prompt-bs", "prefill batch sizes"), ("prompt-seq", "prefill seq_len"),
                       ("decode-bs", "decode batch sizes"), ("decode-block", "decode num_blocks")):
        env = name.upper().replace("-", "_")
        c.add_argument(f"--{name}-bucket", type=_bucket_triple, default=None, metavar="MIN,STEP,MAX",
                       help=f"{what} buckets: powers of two from MIN up to STEP, then multiples of STEP up to "
                            f"MAX (also KILN_{env}_BUCKET_MIN/STEP/MAX; default derived from the limits above)")
    c.add_argument("--skip-warmup", dest="warmup", action="store_false", default=None,
                   help="do not build graphs up front; compile each bucket when first needed (also KILN_SKIP_WARMUP=1)")
    c.add_argument("--allow-lazy-compile", action="store_true",
                   help="after warmup, compile a missing bucket (counted in metrics) instead of failing")
    c.add_argument("--no-graph-cache", dest="graph_cache", action="store_false",
                   help="do not read or write compiled graphs under $KILN_CACHE_DIR/graphs")
    c.add_argument("--memory-utilization", type=float, default=0.9,
                   help="share of free memory for graphs + KV cache (default: 0.9)")
    c.add_argument("--graph-reserved-fraction", type=float, default=0.1,
                   help="share of usable memory kept for graphs when the KV size is automatic (default: 0.1)")
    c.add_argument("--graph-prompt-ratio", type=float, default=0.3,
                   help="share of the graph budget for prefill graphs (default: 0.3)")
    c.add_argument("--prefill-strategy", default="min_tokens", choices=("min_tokens", "max_bs"),
                   help="warmup order of prefill buckets (default: min_tokens)")
    c.add_argument("--decode-strategy", default="max_bs", choices=("max_bs", "min_tokens"),
                   help="warmup order of decode buckets (default: max_bs)")
    c.add_argument("--compile-workers", type=int, default=2, help="graphs compiled at once (default: 2)")


def _bucket_triple(text: str) -> tuple[int, int, int]:
    try:
        lo, step, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,STEP,MAX (three integers), got {text!r}") from None
    return lo, step, hi


def engine_kwargs(a: argparse.Namespace) -> dict:
    buckets = {k: v for k, v in (("prompt_bs", a.prompt_bs_bucket), ("prompt_seq", a.prompt_seq_bucket),
                                 ("decode_bs", a.decode_bs_bucket), ("decode_blocks", a.decode_block_bucket)) if v}
    return dict(model=a.model, backend=a.backend, dtype=a.dtype, quantization=a.quantization,
                kv_cache_dtype=a.kv_cache_dtype,
                max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                max_num_batched_tokens=a.max_num_batched_tokens, block_size=a.block_size,
                kv_cache_gib=a.kv_cache_gib, enable_prefix_caching=a.enable_prefix_caching, seed=a.seed,
                buckets=buckets, warmup=a.warmup, allow_lazy_compile=a.allow_lazy_compile,
                graph_cache=a.graph_cache, memory_utilization=a.memory_utilization,
                graph_reserved_fraction=a.graph_reserved_fraction, graph_prompt_ratio=a.graph_prompt_ratio,
                prefill_strategy=a.prefill_strategy, decode_strategy=a.decode_strategy,
                compile_workers=a.compile_workers)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default: 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sample-seed", type=int, default=None, help="seed of this request's sampling")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_params(a: argparse.Namespace):
    from kiln import SamplingParams
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.sample_seed, stop=a.stop)


def cmd_generate(a: argparse.Namespace) -> int:
    from kiln import LLM
    sp = sampling_params(a)
    t0 = time.perf_counter()
    kwargs = engine_kwargs(a)
    if kwargs["warmup"] is None:   # one prompt: build only the graphs it needs (from the graph cache when warm)
        kwargs["warmup"] = False
    llm = LLM(**kwargs)
    logging.getLogger("kiln").info("engine ready in %.1fs", time.perf_counter() - t0)
    prompt = " ".join(a.prompt)
    t0 = time.perf_counter()
    if a.raw:
        out = llm.generate(prompt, sp)[0]
    else:
        out = llm.chat([{"role": "user", "content": prompt}], sp)[0]
    dt = time.perf_counter() - t0
    print(out.outputs[0].text)
    n = len(out.outputs[0].token_ids)
    logging.getLogger("kiln").info("%d tokens in %.2fs (%.1f tok/s), finish_reason=%s", n, dt, n / dt,
                                   out.outputs[0].finish_reason)
    return 0


def cmd_warmup(a: argparse.Namespace) -> int:
    from kiln.compile.warmup import warmup
    from kiln.engine.llm import build_engine
    kwargs = engine_kwargs(a)
    kwargs["warmup"] = False                 # warm up here, to get the report
    engine = build_engine(**kwargs)
    report = warmup(engine.runner, check_only=a.check)
    print(f"{'kind':<8} {'batch':>5} {'size':>6} {'source':<9} {'seconds':>8} {'MiB':>7}")
    for r in report.rows:
        print(f"{r['kind']:<8} {r['batch']:>5} {r['size']:>6} {r['source']:<9} {r['seconds']:>8.2f} "
              f"{r['bytes'] / 2**20:>7.1f}")
    if a.check:
        missing = sum(r["source"] == "missing" for r in report.rows)
        print(f"{report.planned} graphs planned: {report.hits} in the graph cache, {missing} would be compiled")
        return 0
    print(f"{report.captured}/{report.planned} graphs ready in {report.seconds:.1f}s: {report.hits} from the cache, "
          f"{report.compiled} compiled, {report.skipped} over the graph budget; graph memory "
          f"{report.graph_bytes / 2**20:.1f} MiB, KV cache {report.kv_bytes / 2**30:.2f} GiB "
          f"({engine.config.cache.num_blocks} blocks)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="kiln: LLM inference from ahead-of-time compiled graphs")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default: INFO)")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt (as a chat message unless --raw)",
                       description="Generate a reply to one prompt and print it.")
    g.add_argument("prompt", nargs="+", help="the prompt text")
    g.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    _engine_args(g)
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)

    w = sub.add_parser("warmup", help="precompile the graphs of a model and bucket plan into the graph cache",
                       description="Load the model, plan memory and buckets, and compile every planned graph into "
                                   "the persistent graph cache ($KILN_CACHE_DIR/graphs), so that `kiln serve` and "
                                   "LLM(...) with the same settings start without compiling.")
    w.add_argument("--check", action="store_true",
                   help="only report which graphs a server with these settings would still have to compile")
    _engine_args(w)
    w.set_defaults(func=cmd_warmup)

    from kiln.entrypoints import client, serve
    s = sub.add_parser("serve", help="serve the model over gRPC (kiln.v1.Inference) and/or OpenAI-compatible HTTP",
                       description="Serve the model over gRPC, with health checking, reflection and metrics; with "
                                   "--http-port, also (or with --no-grpc, only) the OpenAI-compatible HTTP API, in "
                                   "the same process over the same engine.")
    _engine_args(s)
    serve.add_serve_args(s)
    s.set_defaults(func=serve.cmd_serve)
    c = sub.add_parser("client", help="send one prompt to a running `kiln serve` and stream the reply",
                       description="Stream a reply from a running `kiln serve`.")
    client.add_client_args(c)
    c.set_defaults(func=client.cmd_client)
    _add_batch_parser(sub)
    return p


def _add_batch_parser(sub) -> None:
    b = sub.add_parser("batch", help="run a file of OpenAI batch requests (or plain prompts) offline",
                       description="Answer every line of an OpenAI batch JSONL file (/v1/chat/completions and "
                                   "/v1/completions lines) or of a plain file of prompts, through one engine. "
                                   "Results are written to OUTPUT.partial as they finish (completion order; "
                                   "custom_id is the key) and renamed to OUTPUT at the end. Exit 0 if every line "
                                   "succeeded, 1 if any failed, 2 on usage errors.")
    b.add_argument("-i", "--input", required=True, help="input file, or - for stdin")
    b.add_argument("-o", "--output", required=True, help="output JSONL file (OpenAI batch output format)")
    b.add_argument("--format", choices=("auto", "jsonl", "text"), default="auto",
                   help="jsonl: OpenAI batch lines; text: one prompt per line (custom_id line-N); auto: jsonl "
                        "if the first non-blank line starts with '{' (default: auto)")
    b.add_argument("--resume", action="store_true",
                   help="continue OUTPUT.partial (or OUTPUT) left by an earlier run: answered lines are skipped")
    b.add_argument("--overwrite", action="store_true", help="start over even if OUTPUT or OUTPUT.partial exists")
    b.add_argument("--max-in-flight", type=int, default=None,
                   help="requests handed to the engine at once (default: 2 x --max-num-seqs)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is still printed)")
    _engine_args(b)
    _sampling_args(b)   # used by --format text lines; JSONL lines carry their own in their body
    b.set_defaults(func=cmd_batch)


def cmd_batch(a: argparse.Namespace) -> int:
    from kiln.entrypoints import batch
    return batch.main(a, engine_kwargs(a), sampling_params(a))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("jax").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:   # ModelError is a ValueError: bad model, bad input, bad flag
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
