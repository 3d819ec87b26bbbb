"""The `kiln` command line: thin adapters over the engine. Errors are one line and a non-zero exit."""
from __future__ import annotations

import argparse
import logging
import sys
import time

from kiln.config import DTYPES, ModelConfig


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=ModelConfig.model,
                   help="a known model name (smollm2-135m-instruct), an HF folder or a .gguf file "
                        "(default: %(default)s, fetched once into $KILN_CACHE_DIR/models)")
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weight and KV-cache dtype; auto = float32 on CPU, bfloat16 on accelerators")
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


def engine_kwargs(a: argparse.Namespace) -> dict:
    return dict(model=a.model, dtype=a.dtype, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                max_num_batched_tokens=a.max_num_batched_tokens, block_size=a.block_size,
                kv_cache_gib=a.kv_cache_gib, enable_prefix_caching=a.enable_prefix_caching, seed=a.seed)


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


def cmd_generate(a: argparse.Namespace) -> int:
    from kiln import LLM, SamplingParams
    sp = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                        min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.sample_seed, stop=a.stop)
    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(a))
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
    return p


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
