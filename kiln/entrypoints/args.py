"""Every flag of the `kiln` command line, in one place: engine, sampling, server and batch flags, and what
they become (engine/build.build_config keyword arguments, SamplingParams, ServeOptions). cli.py builds the parser
from these; scripts reuse them."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from kiln.backends.platform import BACKENDS
from kiln.config import DTYPES, QUANTIZATIONS, ModelConfig
from kiln.serving.options import ServeOptions
from kiln.serving.prompts import PromptLimits


def add_engine_args(p: argparse.ArgumentParser) -> None:
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
                   help="auto: the torch backend keeps GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 weights as their exact "
                        "blocks (where they are recovered bit-exactly) for steps of few tokens, the activations "
                        "rounded to int8 per block of 32 in bfloat16 (llama.cpp's method), float32 in --dtype float32; "
                        "exact: float32 activations in either dtype (slower); blocks: int8 activations in either dtype and no "
                        "dense copy beside the blocks "
                        "(they serve every step size: far less memory, slower prefill); none: dense weights "
                        "only (default: auto)")
    g.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per request "
                   "(default: min(model limit, 2048))")
    g.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together (default: 64)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one step: the running decodes take 1 each, prefill chunks the rest (the "
                        "prefill rows' padded bucket within it). Larger: prompts finish prefill in fewer steps "
                        "(lower TTFT) but a step carrying a long chunk is slower for every running stream (higher "
                        "TPOT); smaller: the reverse (default: max(2048, min(max-model-len, 8192)))")
    g.add_argument("--long-prefill-token-threshold", type=int, default=0,
                   help="at most this many tokens of one prompt per step (0: off, a chunk may take the whole "
                        "budget). Lower: several long prompts share a step and running streams keep a steady "
                        "TPOT, at the cost of each long prompt's TTFT (default: 0)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default: 16)")
    g.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV-cache size in GiB (default: $KILN_KVCACHE_SPACE or 1)")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn off reuse of cached prompt blocks")
    g.add_argument("--seed", type=int, default=0, help="engine seed for requests without their own")
    d = p.add_argument_group("parallelism (backends/jax/mesh.py, kiln/distributed)")
    d.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="devices one model copy is split over (jax backend; Megatron layout over a jax Mesh). On "
                        "CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N host devices (default: 1)")
    d.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="serve / batch: N engine replicas as Ray actors behind one ingress (needs kiln[ray]; "
                        "default: 1, no Ray)")
    d.add_argument("--ray-address", default=None,
                   help="join this Ray cluster instead of starting a local one (also KILN_RAY_ADDRESS / "
                        "RAY_ADDRESS)")
    d.add_argument("--coordinator-address", default=None,
                   help="multi-host: host:port of process 0's jax.distributed coordinator "
                        "(also KILN_COORDINATOR_ADDRESS / JAX_COORDINATOR_ADDRESS)")
    d.add_argument("--num-processes", type=int, default=None,
                   help="multi-host: processes of one engine (also KILN_NUM_PROCESSES / JAX_NUM_PROCESSES)")
    d.add_argument("--process-id", type=int, default=None,
                   help="multi-host: this process (0 serves; the others follow its steps; also KILN_PROCESS_ID)")
    s = p.add_argument_group("speculative decoding (engine/speculative.py; torch backend)")
    s.add_argument("--speculative", "--speculative-method", dest="speculative", default=None, choices=("ngram",),
                   help="propose drafts and verify them in one step: ngram = prompt lookup, the context's last "
                        "n-gram matched against earlier context; greedy outputs are unchanged, sampled ones keep "
                        "their distribution (default: off)")
    s.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="drafts verified per step at most (with --speculative; default: 4)")
    s.add_argument("--prompt-lookup-max", "--ngram-prompt-lookup-max", dest="prompt_lookup_max", type=int,
                   default=None, help="longest n-gram matched (default: 4)")
    s.add_argument("--prompt-lookup-min", "--ngram-prompt-lookup-min", dest="prompt_lookup_min", type=int,
                   default=None, help="shortest n-gram matched (default: 2, or --prompt-lookup-max if given)")
    s.add_argument("--speculative-config", type=_json_object, default=None, metavar="JSON",
                   help='vLLM\'s spelling: \'{"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\' (the flags above override its keys)')
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
    c.add_argument("--warmup-scoring", action="store_true",
                   help="warmup also builds the scoring graphs (one per prefill graph) that prompt_logprobs, echo "
                        "and /v1/embeddings need on the jax backend")
    c.add_argument("--tune-matmul-dtypes", action="store_true",
                   help="jax backend with --dtype auto: measure float32 against bf16-input/float32-accumulate "
                        "matmuls at each bucket's row count once on this machine (stored beside the graph cache), "
                        "and run each bucket in the faster one; residual stream, norms, softmax and KV cache stay "
                        "float32 (default: off, float32 everywhere: reproducible numerics)")
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


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def speculative_kwargs(a: argparse.Namespace) -> dict:
    """speculative_config for build_config from --speculative-config and the flags (flags win); {} when off."""
    conf = dict(getattr(a, "speculative_config", None) or {})
    for key, flag in (("method", "speculative"), ("num_speculative_tokens", "num_speculative_tokens"),
                      ("prompt_lookup_max", "prompt_lookup_max"), ("prompt_lookup_min", "prompt_lookup_min")):
        if getattr(a, flag, None) is not None:
            conf[key] = getattr(a, flag)
    if not conf:
        return {}
    if conf.get("method") is not None:
        conf.setdefault("num_speculative_tokens", 4)
    return {"speculative_config": conf}


def engine_kwargs(a: argparse.Namespace) -> dict:
    buckets = {k: v for k, v in (("prompt_bs", a.prompt_bs_bucket), ("prompt_seq", a.prompt_seq_bucket),
                                 ("decode_bs", a.decode_bs_bucket), ("decode_blocks", a.decode_block_bucket)) if v}
    return dict(model=a.model, backend=a.backend, dtype=a.dtype, quantization=a.quantization,
                kv_cache_dtype=a.kv_cache_dtype,
                max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                max_num_batched_tokens=a.max_num_batched_tokens, block_size=a.block_size,
                long_prefill_token_threshold=getattr(a, "long_prefill_token_threshold", 0),
                kv_cache_gib=a.kv_cache_gib, enable_prefix_caching=a.enable_prefix_caching, seed=a.seed,
                buckets=buckets, warmup=a.warmup, allow_lazy_compile=a.allow_lazy_compile,
                warmup_scoring=getattr(a, "warmup_scoring", False),
                tune_matmul_dtypes=getattr(a, "tune_matmul_dtypes", False),
                graph_cache=a.graph_cache, memory_utilization=a.memory_utilization,
                graph_reserved_fraction=a.graph_reserved_fraction, graph_prompt_ratio=a.graph_prompt_ratio,
                prefill_strategy=a.prefill_strategy, decode_strategy=a.decode_strategy,
                compile_workers=a.compile_workers, tensor_parallel_size=a.tensor_parallel_size,
                **distributed_kwargs(a), **speculative_kwargs(a))


def distributed_kwargs(a: argparse.Namespace) -> dict:
    """The multi-host flags given (build_config reads the environment for the rest)."""
    given = {k: getattr(a, k, None) for k in ("coordinator_address", "num_processes", "process_id")}
    return {k: v for k, v in given.items() if v is not None}


def add_sampling_args(p: argparse.ArgumentParser) -> None:
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


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    g.add_argument("--port", type=int, default=50051, help="gRPC port (default: %(default)s; 0 = any free port)")
    g.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                        "/v1/models, /health, /metrics) on this port, same host (0 = any free port)")
    g.add_argument("--no-grpc", action="store_true", help="serve only the HTTP API (needs --http-port)")
    g.add_argument("--served-model-name", default=None,
                   help="model name reported by GetModelInfo and /v1/models and expected in HTTP requests' "
                        "`model` (default: the --model value)")
    g.add_argument("--tool-call-parser", choices=("hermes", "llama3_json"), default=None,
                   help="how tool calls are read from chat output (default: from the chat template; hermes "
                        "where it has no tool format)")
    g.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    g.add_argument("--max-queued", type=int, default=64,
                   help="sequences admitted beyond the running batch (--max-num-seqs), counted when a request arrives, "
                        "n samples of a request each counting; more get RESOURCE_EXHAUSTED (HTTP 429) "
                        "(default: %(default)s)")
    g.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM, how long in-flight requests may take to finish (default: %(default)s)")
    g.add_argument("--api-key", default=None, help="require 'authorization: Bearer <key>' (gRPC metadata and "
                                                    "HTTP header of /v1/* calls)")
    g.add_argument("--api-key-file", default=None, help="read the API key from this file")
    g.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key: serve TLS)")
    g.add_argument("--tls-key", default=None, help="PEM private key")
    g.add_argument("--tls-client-ca", default=None,
                   help="PEM CA certificate(s): clients (gRPC and HTTP) must present a certificate signed by one "
                        "of them (mutual TLS; needs --tls-cert/--tls-key); others fail the handshake")
    g.add_argument("--max-message-mb", type=float, default=16.0, help="largest request/response (default: 16)")
    g.add_argument("--max-chat-messages", type=int, default=PromptLimits.max_messages,
                   help="chat messages per request at most (default: %(default)s)")
    g.add_argument("--max-prompt-chars", type=int, default=PromptLimits.max_prompt_chars,
                   help="characters of a prompt (all chat messages together) at most (default: %(default)s)")


def options_from_args(a) -> ServeOptions:
    key = a.api_key
    if a.api_key_file:
        key = Path(a.api_key_file).read_text().strip()
        if not key:
            raise ValueError(f"--api-key-file {a.api_key_file} is empty")
    return ServeOptions(host=a.host, max_queued=a.max_queued, drain_seconds=a.drain_seconds,
                        api_key=key or None, tls_cert=a.tls_cert, tls_key=a.tls_key,
                        tls_client_ca=a.tls_client_ca, metrics_port=a.metrics_port,
                        max_message_bytes=int(a.max_message_mb * 2**20),
                        port=None if a.no_grpc else a.port, http_port=a.http_port,
                        served_model_name=a.served_model_name, tool_call_parser=a.tool_call_parser,
                        limits=PromptLimits(max_messages=a.max_chat_messages, max_message_chars=a.max_prompt_chars,
                                            max_prompt_chars=a.max_prompt_chars))


def add_batch_args(b: argparse.ArgumentParser) -> None:
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
    b.add_argument("--ray", action="store_true",
                   help="run the job as a Ray Dataset mapped through --data-parallel-size engine actors (Ray "
                        "Data, for clusters; without --ray, --data-parallel-size N streams lines to N Ray actor "
                        "replicas, the faster path on one machine); a local Ray cluster unless --ray-address; "
                        "needs kiln[ray]")
    add_engine_args(b)
    add_sampling_args(b)   # used by --format text lines; JSONL lines carry their own in their body


def add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="+", help="the prompt text")
    p.add_argument("--target", default="127.0.0.1:50051", help="host:port of `kiln serve` (default: %(default)s)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--api-key", default=None, help="sent as 'authorization: Bearer <key>'")
    p.add_argument("--tls-ca", default=None, help="PEM CA certificate of the server: connect with TLS")
    p.add_argument("--tls-cert", default=None, help="PEM client certificate chain to present (mutual TLS; "
                                                    "with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
