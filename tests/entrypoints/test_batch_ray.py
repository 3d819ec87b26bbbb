"""`kiln batch --data-parallel-size 2` (entrypoints/batch_ray.py) on a local Ray cluster, mock-backend replicas:
- 500 lines -> exactly 500 records, each equal (choices and usage) to the same job on one in-process engine;
- one replica SIGKILLed mid-job -> still exactly 500 records, one per line, no duplicate custom_id, every one a
  success equal to the single-engine run (its in-flight requests start over on the other replica); a --resume
  of the finished output then adds nothing.
The same with `--ray` (entrypoints/batch_ray_data.py: a Ray Dataset mapped through 2 engine actors):
- 500 lines -> 500 unique records equal to the single-engine run;
- one actor SIGKILLed mid-job -> Ray Data restarts it and runs its block again, and the output still holds
  exactly 500 unique records equal to the single-engine run; a --resume adds nothing; a partial output cut
  after 200 records (a crash) is finished by --resume with the 300 others, no duplicates.
One Ray cluster for the module (num_cpus 3)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from kiln.engine.sampling_params import SamplingParams
from kiln.entrypoints import batch as B
from kiln.entrypoints import batch_format as F
from kiln.entrypoints import batch_ray
from tests.serving.ray_factory import slow_mock

ROOT = str(Path(__file__).resolve().parents[2])
N = 500
FACTORY = "tests.serving.ray_factory:slow_mock"


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT, "KILN_SKIP_WARMUP": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The input and the single-engine reference records, by custom_id."""
    d = tmp_path_factory.mktemp("rayjob")
    inp = d / "in.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": F.COMPLETIONS_URL,
                                       "body": {"prompt": f"line {i} says {i * 7 % 13}", "max_tokens": 4 + i % 5,
                                                "temperature": 0}}) + "\n" for i in range(N)))
    B.run_batch(slow_mock(max_num_seqs=16), str(inp), d / "ref.jsonl", progress=False)
    return inp, _records(d / "ref.jsonl")


def _records(path: Path) -> dict:
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    by_id = {r["custom_id"]: r for r in recs}
    assert len(by_id) == len(recs), "duplicate custom_id in the output"
    return by_id


def _args(inp, out, **kw):
    return argparse.Namespace(input=str(inp), output=str(out), format="auto", resume=False, overwrite=False,
                              max_in_flight=None, no_progress=True, data_parallel_size=2, ray=False,
                              ray_address=None, **kw)


def _same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want) and len(got) == N
    for cid, w in want.items():
        g = got[cid]["response"]
        assert g["status_code"] == 200, g
        assert [c["text"] for c in g["body"]["choices"]] == [c["text"] for c in w["response"]["body"]["choices"]]
        assert g["body"]["usage"] == w["response"]["body"]["usage"]


def test_two_replicas_equal_one_engine(ray_cluster, job, tmp_path):
    inp, want = job
    out = tmp_path / "out.jsonl"
    assert batch_ray.main(_args(inp, out), {"max_num_seqs": 16}, SamplingParams(), factory=FACTORY) == 0
    _same(_records(out), want)


def test_killed_replica_still_one_record_per_line(ray_cluster, job, tmp_path, monkeypatch):
    from kiln.serving import ray_replicas
    inp, want = job
    out = tmp_path / "out.jsonl"
    started = []
    real = ray_replicas.start_replicas
    monkeypatch.setattr(ray_replicas, "start_replicas", lambda *a, **k: started.append(real(*a, **k)) or started[-1])
    rc = []
    t = threading.Thread(target=lambda: rc.append(batch_ray.main(
        _args(inp, out), {"max_num_seqs": 16, "step_seconds": 0.01}, SamplingParams(), factory=FACTORY)))
    t.start()
    part = B.partial_path(out)
    deadline = time.time() + 120
    while time.time() < deadline and not (part.exists() and len(part.read_text().splitlines()) >= 100):
        time.sleep(0.1)
    eng = started[0]
    pid = ray_cluster.get(eng.actors[1].ping.remote())["pid"]
    os.kill(pid, signal.SIGKILL)                                   # replica 1 dies with requests in flight
    t.join(timeout=300)
    bad = [r for r in map(json.loads, out.read_text().splitlines()) if r["response"]["status_code"] != 200] if out.exists() else "no output"
    assert rc == [0], bad[:3]
    assert eng.lost > 0                                            # it really lost in-flight requests
    _same(_records(out), want)
    again = _args(inp, out)
    again.resume = True
    assert batch_ray.main(again, {"max_num_seqs": 16}, SamplingParams(), factory=FACTORY) == 0
    _same(_records(out), want)                                     # nothing added, nothing lost


# -- --ray: the Ray Data path ----------------------------------------------------------------------------
def _data_args(inp, out, **kw):
    a = _args(inp, out, **kw)
    a.ray = True
    return a


def test_ray_data_killed_actor_still_one_record_per_line(ray_cluster, job, tmp_path):
    inp, want = job
    out, pids = tmp_path / "out.jsonl", tmp_path / "pids"
    pids.mkdir()
    kw = {"max_num_seqs": 16, "step_seconds": 0.01, "pid_dir": str(pids)}
    rc = []
    t = threading.Thread(target=lambda: rc.append(batch_ray.main(
        _data_args(inp, out), kw, SamplingParams(), factory="tests.serving.ray_factory:pid_mock")))
    t.start()
    part = B.partial_path(out)
    deadline = time.time() + 300
    while time.time() < deadline and not (part.exists() and len(part.read_text().splitlines()) >= 100):
        time.sleep(0.1)
    first = list(pids.iterdir())
    assert len(first) == 2 and len(part.read_text().splitlines()) < N     # both actors up, caught mid-job
    os.kill(int(first[0].name), signal.SIGKILL)                    # one engine actor dies, blocks in flight
    t.join(timeout=300)
    assert rc == [0]
    assert len(list(pids.iterdir())) == 3                          # Ray Data restarted it (a new engine)
    _same(_records(out), want)
    again = _data_args(inp, out)
    again.resume = True                                            # nothing pending: no actors, nothing added
    assert batch_ray.main(again, kw, SamplingParams(), factory="tests.serving.ray_factory:pid_mock") == 0
    _same(_records(out), want)
    assert len(list(pids.iterdir())) == 3


def test_ray_data_resumes_a_crashed_job(ray_cluster, job, tmp_path):
    # a crash: a partial output of 200 records (the single-engine job's) and a torn line; --ray --resume
    # answers the 300 others on Ray Data and keeps the 200 as they were
    inp, want = job
    out = tmp_path / "out.jsonl"
    kept = [F.dumps(r).decode() for r in list(want.values())[:200]]
    B.partial_path(out).write_text("".join(kept) + kept[0][:17])
    again = _data_args(inp, out)
    again.resume = True
    assert batch_ray.main(again, {"max_num_seqs": 16}, SamplingParams(), factory=FACTORY) == 0
    _same(_records(out), want)
    assert out.read_text().splitlines(keepends=True)[:200] == kept
