"""The `kiln` command line: generate, warmup, serve, client, batch. The flags are args.py's; each command is a
thin adapter (serve.py, batch.py, client.py). Errors are one line and a non-zero exit."""
from __future__ import annotations

import argparse
import logging
import sys
import time

from kiln.entrypoints.args import (add_batch_args, add_client_args, add_engine_args, add_sampling_args,
                                   add_serve_args, engine_kwargs, options_from_args, sampling_params)

_engine_args = add_engine_args          # the names scripts/bench_batch.py imports


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


def cmd_serve(a: argparse.Namespace) -> int:
    import asyncio

    from kiln.entrypoints.serve import serve
    kwargs, build = engine_kwargs(a), None
    if a.data_parallel_size > 1:     # N replicas on Ray behind this process's servers (serving/ray_replicas.py)
        from kiln.config import Env
        from kiln.serving.ray_replicas import require_ray, start_replicas
        require_ray()
        address = a.ray_address or Env.read().ray_address
        build = lambda: start_replicas(a.data_parallel_size, kwargs, address=address)   # noqa: E731
    return asyncio.run(serve(options_from_args(a), kwargs, build=build))


def cmd_client(a: argparse.Namespace) -> int:
    from kiln.entrypoints.client import cmd_client as run
    return run(a)


def cmd_batch(a: argparse.Namespace) -> int:
    from kiln.entrypoints import batch
    return batch.main(a, engine_kwargs(a), sampling_params(a))


def _is_follower(a: argparse.Namespace) -> bool:
    """A process > 0 of a multi-process engine (--process-id, or KILN_PROCESS_ID / JAX_PROCESS_ID)."""
    if a.command not in ("generate", "serve", "batch", "warmup"):
        return False
    from kiln.config import Env
    pid = a.process_id if getattr(a, "process_id", None) is not None else Env.read().process_id
    return bool(pid)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="kiln: LLM inference from ahead-of-time compiled graphs")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default: INFO)")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt (as a chat message unless --raw)",
                       description="Generate a reply to one prompt and print it.")
    g.add_argument("prompt", nargs="+", help="the prompt text")
    g.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    add_engine_args(g)
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    w = sub.add_parser("warmup", help="precompile the graphs of a model and bucket plan into the graph cache",
                       description="Load the model, plan memory and buckets, and compile every planned graph into "
                                   "the persistent graph cache ($KILN_CACHE_DIR/graphs), so that `kiln serve` and "
                                   "LLM(...) with the same settings start without compiling.")
    w.add_argument("--check", action="store_true",
                   help="only report which graphs a server with these settings would still have to compile")
    add_engine_args(w)
    w.set_defaults(func=cmd_warmup)

    s = sub.add_parser("serve", help="serve the model over gRPC (kiln.v1.Inference) and/or OpenAI-compatible HTTP",
                       description="Serve the model over gRPC, with health checking, reflection and metrics; with "
                                   "--http-port, also (or with --no-grpc, only) the OpenAI-compatible HTTP API, in "
                                   "the same process over the same engine. Exits 0 after a SIGTERM drain, 1 if "
                                   "the engine stops.")
    add_engine_args(s)
    add_serve_args(s)
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("client", help="send one prompt to a running `kiln serve` and stream the reply",
                       description="Stream a reply from a running `kiln serve`.")
    add_client_args(c)
    c.set_defaults(func=cmd_client)

    b = sub.add_parser("batch", help="run a file of OpenAI batch requests (or plain prompts) offline",
                       description="Answer every line of an OpenAI batch JSONL file (/v1/chat/completions and "
                                   "/v1/completions lines) or of a plain file of prompts, through one engine. "
                                   "Results are written to OUTPUT.partial as they finish (completion order; "
                                   "custom_id is the key) and renamed to OUTPUT at the end. Exit 0 if every line "
                                   "succeeded, 1 if any failed, 2 on usage errors.")
    add_batch_args(b)
    b.set_defaults(func=cmd_batch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("jax").setLevel(logging.WARNING)
    try:
        if _is_follower(args):   # multi-host: processes > 0 run process 0's steps, whatever the command
            from kiln.distributed.lockstep import run_follower
            kw = engine_kwargs(args)
            run_follower(kw.pop("model"), **kw)
            return 0
        return args.func(args)
    except (ValueError, OSError) as e:   # ModelError is a ValueError: bad model, bad input, bad flag
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
