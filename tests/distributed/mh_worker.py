"""One process of a two-process engine, run by test_multihost.py: `python -m tests.distributed.mh_worker FOLDER
COORDINATOR PROCESS_ID`. Process 0 generates greedily (TP=2 over one CPU device of each process) and prints the
tokens as one JSON line; process 1 follows its steps (kiln.distributed.lockstep) until it shuts down."""
from __future__ import annotations

import json
import sys

from tests.backends.tp_worker import PROMPTS

KW = dict(dtype="float32", max_model_len=64, num_blocks=32, max_num_seqs=4, warmup=False, allow_lazy_compile=True,
          graph_cache=False, tensor_parallel_size=2, num_processes=2)


def main(folder: str, coordinator: str, pid: int) -> None:
    if pid:
        from kiln.distributed.lockstep import run_follower
        steps = run_follower(folder, coordinator_address=coordinator, process_id=pid, **KW)
        print(json.dumps({"process": pid, "steps": steps}))
        return
    from kiln.engine.llm import LLM
    from kiln.engine.sampling_params import SamplingParams
    llm = LLM(model=folder, coordinator_address=coordinator, process_id=0, **KW)
    import jax
    mesh = llm.engine.runner.placement.mesh
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp)]
    llm.engine.runner.close()
    print(json.dumps({"process": 0, "tokens": tokens, "process_count": jax.process_count(),
                      "mesh_processes": sorted({d.process_index for d in mesh.devices.flat})}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
