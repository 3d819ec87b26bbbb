"""Run in a subprocess by test_jax_mesh.py with XLA_FLAGS=--xla_force_host_platform_device_count=4 (the flag must
be set before JAX starts, so it cannot run inside the test session). `python -m tests.backends.tp_worker TASK
ARGS_JSON` prints one JSON line: what the test asserts on.

    logits  {folder, tps, greedy_tokens}   per TP size: last-token logits of a 3-row prefill, then of one
            decode step; the decode graph's collectives (in the layer scan, in all); the KV shard shape; the
            engine's (LLMEngine) greedy tokens of 3 prompts on the same runner
    default_model {gguf, models_dir, tps, tokens}   the default model's greedy tokens per TP size (engine)
    cache   {folder, cache_dir}     the graph cache across meshes: fingerprints, hit/miss per TP size, and the
            logits of one decode step run by each (compiled or loaded) graph
    run_all {tasks: {name: [task, args]}}   several of them in one process
"""
from __future__ import annotations

import collections
import json
import re
import sys

import numpy as np

from kiln.backends import inputs as I
from kiln.compile.graph_cache import fingerprint_key
from kiln.compile.graph_key import GraphKey
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.scheduler_output import ScheduledRow

PROMPTS = [list(range(10, 15)), list(range(40, 53)), list(range(100, 120))]   # 5, 13, 20 tokens
TABLES = [[1], [2], [3, 4]]
COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter")


def _runner(folder: str, tp: int, models_dir: str | None = None, loaded=None, **kw):
    from kiln.backends.registry import create_runner
    from kiln.engine.build import build_config
    from kiln.models.loader import load_model
    loaded = loaded or load_model(folder, models_dir or folder)
    cfg = build_config(loaded.spec, dtype="float32", max_model_len=64, num_blocks=16, warmup=False,
                       platform="cpu", free_bytes=2**34, tensor_parallel_size=tp,
                       **{"graph_cache": False, **kw})
    return create_runner("jax", spec=loaded.spec, config=cfg, tensors=loaded.tensors)


def _row(i, tokens, start):
    return ScheduledRow(request_id=str(i), token_ids=tokens, start_pos=start, block_table=TABLES[i], sample=True,
                        sampling_params=SamplingParams(temperature=0.0), seed=i, output_index=0,
                        prompt_len=len(PROMPTS[i]), history=[], eos_token_ids=())


def _logits(r, key, x, args):
    _, exe = r._graph_for(key.kind, key.batch, key.size)
    if r.fused_greedy:                     # the step graph also takes want_top and returns its greedy sample
        r.k_cache, r.v_cache, logits, _ = exe(r.params, r.k_cache, r.v_cache,
                                              *r.placement.inputs((*args, np.bool_(False))))
    else:
        r.k_cache, r.v_cache, logits = exe(r.params, r.k_cache, r.v_cache, *r.placement.inputs(args))
    return np.asarray(logits)


def _collectives(exe) -> dict:
    """Collective ops of a compiled graph: those in the layer scan's body (one layer) and all of them."""
    ops = [(m.group(1), m.group(2)) for m in re.finditer(
        r"\b(%s)(?:-start)?\(.*?op_name=\"([^\"]*)\"" % "|".join(COLLECTIVES), exe.as_text())]
    return {"in_layer_scan": collections.Counter(op for op, name in ops if "/while/body/" in name),
            "total": collections.Counter(op for op, _ in ops)}


def _greedy(r, folder, n, tokenizer=None, prompts=PROMPTS):
    """LLMEngine over runner `r` (its compiled graphs reused): greedy tokens of `prompts`."""
    from kiln.engine.llm_engine import LLMEngine
    from kiln.models.tokenizer import Tokenizer
    eng = LLMEngine(r.config, r.spec, r, tokenizer or Tokenizer.from_hf_folder(folder))
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    ids = [eng.add_request(p, sp) for p in prompts]
    done = {}
    while len(done) < len(ids):
        done.update({o.request_id: o.outputs[0].token_ids for o in eng.step() if o.finished})
    return [done[i] for i in ids]


def logits(folder, tps, greedy_tokens=0):
    """Per TP size: logits of a 3-row prefill and the decode step after it, the decode graph's collectives,
    the KV cache's shard shape, and (greedy_tokens > 0) the engine's greedy tokens on the same runner."""
    out = {}
    for tp in tps:
        r = _runner(folder, tp, allow_lazy_compile=True)
        bs, width = r.config.cache.block_size, r.config.max_blocks_per_seq
        rows = [_row(i, p, 0) for i, p in enumerate(PROMPTS)]
        x = I.prepare_step(rows, block_size=bs, batch=4, seq_len=32, table_width=width)
        pre = _logits(r, GraphKey("prefill", 4, 32), x, (x.tokens, x.positions, x.slots, x.tables, x.starts, x.lens))
        nxt = pre[:3].argmax(-1)
        rows = [_row(i, [int(nxt[i])], len(p)) for i, p in enumerate(PROMPTS)]
        x = I.prepare_step(rows, block_size=bs, batch=4, seq_len=1, table_width=4)
        dec = _logits(r, GraphKey("decode", 4, 4), x, (x.tokens, x.positions, x.slots, x.tables, x.starts))
        out[tp] = {"prefill": pre[:3].tolist(), "decode": dec[:3].tolist(),
                   "notes": list(r.placement.plan.notes) if r.placement.plan else [],
                   "kv_shard_shape": list(r.k_cache.addressable_shards[0].data.shape),
                   "kv_device_bytes": [2 * sh.data.nbytes for sh in r.k_cache.addressable_shards],
                   "kv_planned_bytes": r.config.memory.kv_bytes_per_block * r.config.cache.num_blocks,
                   "hlo": _collectives(r.executables[GraphKey("decode", 4, 4)]),
                   "greedy": _greedy(r, folder, greedy_tokens) if greedy_tokens else []}
    return out


def default_model(gguf, models_dir, tps, tokens):
    """The default model (a GGUF, read by kiln's loader as the e2e tests do), per TP size: the engine's greedy
    tokens of two chat-free text prompts, the mesh notes and the decode graph's collectives."""
    from kiln.models.loader import load_model
    loaded = load_model(gguf, models_dir)
    prompts = [loaded.tokenizer.encode(t) for t in ("The capital of France is", "def fibonacci(n):")]
    out = {}
    for tp in tps:
        r = _runner(gguf, tp, loaded=loaded, allow_lazy_compile=True, max_num_seqs=2)
        greedy = _greedy(r, None, tokens, loaded.tokenizer, prompts)
        decode = [e for k, e in r.executables.items() if k.kind == "decode"]
        out[tp] = {"greedy": greedy, "text": [loaded.tokenizer.decode(t) for t in greedy],
                   "notes": list(r.placement.plan.notes) if r.placement.plan else [],
                   "hlo": _collectives(decode[0]), "kv_shard_shape": list(r.k_cache.addressable_shards[0].data.shape)}
    return out


def cache(folder, cache_dir):
    import os
    os.environ["KILN_CACHE_DIR"] = cache_dir
    key = GraphKey("decode", 1, 4)
    out = {}
    for tp in (1, 2, 1, 2):
        r = _runner(folder, tp, graph_cache=True)
        fp = r.fingerprint(key)
        entry = {"key": fingerprint_key(fp), "mesh": fp["mesh"], "cached_before": r.is_cached(key),
                 "how": r.load_or_compile(key)}
        x = I.prepare_step([_row(0, [7], 3)], block_size=r.config.cache.block_size, batch=1, seq_len=1, table_width=4)
        entry["logits"] = _logits(r, key, x, (x.tokens, x.positions, x.slots, x.tables, x.starts))[0].tolist()
        out.setdefault(str(tp), []).append(entry)
    return out


def run_all(tasks: dict) -> dict:
    """Several tasks in one process (JAX starts once): {name: [task, args]} -> {name: result}."""
    return {name: globals()[task](**args) for name, (task, args) in tasks.items()}


if __name__ == "__main__":
    task, args = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps({"task": task, "result": globals()[task](**args)}))
