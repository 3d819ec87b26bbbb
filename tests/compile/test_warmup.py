"""Warmup, the persistent graph cache and the no-compile guard, end to end on a tiny random model."""
import time

import pytest

from kiln import SamplingParams
from kiln.compile.graph_key import GraphKey
from kiln.compile.guard import CompileForbiddenError, CompileGuard
from kiln.compile.planner import PlanError
from kiln.compile.warmup import warmup
from kiln.engine.llm import build_engine
from tests.tiny import save_tiny_model

SETTINGS = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64, num_blocks=32, compile_workers=2,
                backend="jax")   # the model graphs are XLA's; the torch backend compiles nothing (below)
PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 60))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "llama-tied"))


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    from kiln.backends.torch import kernels
    kernels.load()      # the torch backend's kernels come from the session cache, not rebuilt in this empty one
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _engine(model, **kw):
    return build_engine(str(model), **{**SETTINGS, "warmup": False, **kw})


def _greedy(engine, prompts=PROMPTS):
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)) for p in prompts]
    done = {}
    while len(done) < len(ids):
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return [done[i] for i in ids]


def test_second_warmup_hits_every_graph(model_dir, cache_dir):
    t0 = time.perf_counter()
    first = warmup(_engine(model_dir).runner, show_progress=False)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = warmup(_engine(model_dir).runner, show_progress=False)
    warm = time.perf_counter() - t0
    print(f"cold warmup {cold:.1f}s, warm warmup {warm:.1f}s, {first.planned} graphs")
    assert first.planned == first.compiled == first.captured > 0 and first.hits == 0
    assert second.hits == second.planned == first.planned and second.compiled == 0


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_warm_cache_start_compiles_nothing(model_dir, cache_dir, backend):
    first = warmup(_engine(model_dir, backend=backend).runner, show_progress=False)
    if backend == "torch":                              # eager model steps and a torch sampler: no graph at all
        assert first.planned == 0 and first.rows == []
    xla = CompileGuard()                                # counts every XLA compile of the process from here on
    try:
        engine = _engine(model_dir, warmup=True, backend=backend)   # as LLM(...) / kiln serve build it
        out = _greedy(engine)
        sampled = engine.add_request([5, 6, 7], SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=4,
                                                               logprobs=2, presence_penalty=0.5))
        while engine.has_unfinished():
            engine.step()
        assert xla.total == 0, sampled                  # no XLA compile at all in this engine's lifetime
    finally:
        xla.close()
    assert engine.runner.stats().compiles == 0 and engine.stats()["compiles"] == 0
    assert all(len(t) == 6 for t in out)


def test_changes_that_miss_and_changes_that_hit(model_dir, cache_dir, tmp_path):
    base = warmup(_engine(model_dir).runner, show_progress=False)
    more = warmup(_engine(model_dir, buckets={"decode_bs": (1, 8, 8)}).runner, show_progress=False)
    # decode batch sizes (1, 2, 4) -> (1, 2, 4, 8): one new decode bucket, (8, 4 blocks), and the two sampler
    # graphs of batch 8 (greedy, general); the rest hit
    assert more.planned == base.planned + 3 and more.compiled == 3 and more.hits == base.planned
    other_dtype = warmup(_engine(model_dir, dtype="bfloat16").runner, show_progress=False)
    model_rows = [r for r in other_dtype.rows if r["kind"] != "sample"]   # samplers see float32 logits either way
    assert model_rows and all(r["source"] == "compiled" for r in model_rows)
    finetune = save_tiny_model(tmp_path / "finetune", "llama-tied", seed=1)   # same shapes, other weights
    assert warmup(_engine(finetune).runner, show_progress=False).hits == base.planned


def test_corrupt_entry_is_rebuilt_and_outputs_stay_right(model_dir, cache_dir):
    engine = _engine(model_dir)
    warmup(engine.runner, show_progress=False)
    expected = _greedy(engine)
    for f in (cache_dir / "graphs").glob("*.graph"):
        f.write_bytes(f.read_bytes()[:1000])              # truncate every entry
    engine = _engine(model_dir)
    report = warmup(engine.runner, show_progress=False)
    assert engine.runner.cache.corrupt == report.planned and report.compiled == report.planned
    assert _greedy(engine) == expected


def test_guard_forbids_compiles_after_warmup_unless_allowed(model_dir, cache_dir):
    engine = _engine(model_dir, warmup=True)
    extra = GraphKey("decode", 3, 4)                     # not a planned bucket
    with pytest.raises(CompileForbiddenError, match="--allow-lazy-compile"):
        engine.runner.load_or_compile(extra)
    lazy = _engine(model_dir, warmup=True, allow_lazy_compile=True)
    assert lazy.runner.load_or_compile(extra) == "compiled"
    assert lazy.runner.guard.while_serving >= 1


def test_plan_that_cannot_fit_fails_at_start(model_dir, cache_dir):
    with pytest.raises(PlanError, match="max_model_len=64"):
        _engine(model_dir, num_blocks=2)


def test_jax_version_and_xla_flags_are_in_the_key(model_dir, cache_dir, monkeypatch):
    from kiln.compile.graph_cache import fingerprint_key
    runner = _engine(model_dir).runner
    key = GraphKey("decode", 1, 4)
    base = fingerprint_key(runner.fingerprint(key))
    monkeypatch.setattr("jax.__version__", "0.0.1")
    assert fingerprint_key(runner.fingerprint(key)) != base
    monkeypatch.undo()
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")   # read once, when an engine is built
    assert fingerprint_key(runner.fingerprint(key)) == base
    assert fingerprint_key(_engine(model_dir).runner.fingerprint(key)) != base


def test_warmup_cli_check_then_fill(model_dir, cache_dir, capsys):
    from kiln.entrypoints.cli import main
    args = ["warmup", "--model", model_dir, "--max-model-len", "64", "--max-num-seqs", "4",
            "--max-num-batched-tokens", "64", "--kv-cache-gib", "0.01"]
    assert main(args + ["--check"]) == 0
    out = capsys.readouterr().out
    planned = int(out.strip().splitlines()[-1].split()[0])
    assert f"0 in the graph cache, {planned} would be compiled" in out
    assert main(args) == 0
    assert main(args + ["--check"]) == 0
    assert f"{planned} in the graph cache, 0 would be compiled" in capsys.readouterr().out


def test_two_processes_warming_one_cache_at_once_both_come_up(model_dir, cache_dir):
    """Two `kiln warmup` processes (the build and warmup `kiln serve` runs) fill one empty graph cache at the same
    time: both finish, and the cache then holds every planned graph, none of them corrupt."""
    import os
    import subprocess
    import sys
    args = [sys.executable, "-m", "kiln.entrypoints.cli", "warmup", "--model", model_dir, "--backend", "jax",
            "--max-model-len", "32", "--max-num-seqs", "2", "--max-num-batched-tokens", "32", "--kv-cache-gib", "0.01"]
    env = {**os.environ, "KILN_CACHE_DIR": str(cache_dir)}
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    check = subprocess.run(args + ["--check"], env=env, capture_output=True, text=True, timeout=600)
    planned = int(check.stdout.strip().splitlines()[-1].split()[0])
    assert planned > 0 and f"{planned} in the graph cache, 0 would be compiled" in check.stdout, check.stdout
    assert "corrupt" not in "".join(err for _, err in outs)
