"""Two JAX processes on loopback serve one model: jax.distributed (gloo CPU collectives), a TP=2 mesh over one
CPU device of each process, process 0 scheduling and broadcasting every step, process 1 following
(kiln.distributed.lockstep). Their greedy tokens must equal one process's TP=1 run (in this test process),
and the follower must have run every step process 0 ran and then exited when it shut down."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from kiln.engine.llm import LLM
from kiln.engine.sampling_params import SamplingParams
from tests.backends.tp_worker import PROMPTS
from tests.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_greedy_equal_one_process(tmp_path):
    folder = str(save_tiny_model(tmp_path / "gqa", "llama-gqa"))
    coord = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.distributed.mh_worker", folder, coord, str(pid)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in (1, 0)]
    outs = {}
    try:
        for p in procs:
            out, err = p.communicate(timeout=400)
            assert p.returncode == 0, err[-3000:]
            line = json.loads(out.strip().splitlines()[-1])
            outs[line["process"]] = line
    finally:
        for p in procs:
            p.kill()
    leader, follower = outs[0], outs[1]
    assert leader["process_count"] == 2 and leader["mesh_processes"] == [0, 1]   # one mesh over both processes
    llm = LLM(model=folder, dtype="float32", max_model_len=64, num_blocks=32, max_num_seqs=4, warmup=False,
              allow_lazy_compile=True, graph_cache=False)
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8,
                                                                                  ignore_eos=True))]
    assert leader["tokens"] == want
    assert follower["steps"] == 8       # one prefill (3 rows together) + 7 decode steps, each run by both
