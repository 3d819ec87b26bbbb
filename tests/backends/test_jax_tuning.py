"""backends/jax/tuning.py: per-bucket matmul dtypes by measurement, and what a bf16 graph computes.

- The lookup (a step takes the answer of the largest probed row count at or below its own) against
  hand-written tables.
- The table is measured once per machine and model and then read from the graph cache, never re-probed.
- A bf16-matmul forward (float32 residual stream, norms, softmax, KV cache) against transformers float32 on a
  tiny random llama: close within bf16's error, and visibly not float32 (so bf16 really ran).
- A `--dtype auto` runner with a stored table runs each bucket in the table's dtype (its graph-cache fingerprint
  and parameters say so), and its prefill's token logprob matches transformers float32.
"""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kiln.backends.jax import model as M
from kiln.backends.jax import tuning as T
from kiln.backends.jax.runner import JaxRunner
from kiln.compile.graph_key import GraphKey
from kiln.engine.build import build_config
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.scheduler_output import ScheduledRow, SchedulerOutput
from kiln.models.loader import load_model
from tests.backends.test_model_vs_hf import KilnForward, hf_logits, prompt
from tests.tiny import load_hf, save_tiny_model


def test_matmul_dtype_takes_the_largest_probed_size_at_or_below():
    t = T.StepTuning(((1, "float32"), (16, "bfloat16"), (256, "float32")))
    got = {n: t.matmul_dtype(n) for n in (1, 15, 16, 255, 256, 10**6)}
    assert got == {1: "float32", 15: "float32", 16: "bfloat16", 255: "bfloat16", 256: "float32", 10**6: "float32"}
    assert T.StepTuning(((4, "bfloat16"),)).matmul_dtype(1) == "bfloat16"    # below the table: its first entry
    assert T.StepTuning().matmul_dtype(64) == "float32" and not T.StepTuning().uses_bf16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny"), "llama-tied")
    return folder, load_hf(folder), load_model(str(folder), tmp_path_factory.getbasetemp())


def test_probe_runs_once_then_the_stored_table_is_read(tiny, tmp_path, monkeypatch):
    spec = tiny[2].spec
    first = T.load_or_probe(spec, tmp_path)
    assert [m for m, _ in first.matmul] == list(T.PROBE_TOKENS)
    assert all(d in ("float32", "bfloat16") for _, d in first.matmul)
    assert all(a > 0 and b > 0 for _, a, b in first.measured)
    stored = tmp_path / "tuning" / f"{T.machine_key(spec)}.json"
    stored.write_text(json.dumps({"matmul": [[1, "float32"], [8, "bfloat16"]], "measured": []}))
    monkeypatch.setattr(T, "probe", lambda *a, **k: pytest.fail("probed although a table was stored"))
    assert T.load_or_probe(spec, tmp_path).matmul == ((1, "float32"), (8, "bfloat16"))


def test_bf16_matmuls_stay_close_to_transformers_float32(tiny):
    _, hf, loaded = tiny
    params = M.params_from_hf(loaded.spec, loaded.tensors, jnp.float32)
    ids = prompt(33, loaded.spec.vocab_size)
    ref = hf_logits(hf, ids)
    ours = KilnForward(loaded.spec, T.bf16_params(params)).logits(ids, decode_from=20)
    err = float(np.max(np.abs(ours - ref)))
    assert 1e-4 < err < 0.05 * float(np.std(ref)), f"bf16 matmuls: max |dlogit| {err:.3e} (logit std {np.std(ref):.2f})"
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_auto_runner_runs_each_bucket_in_its_tables_dtype(tiny, tmp_path, monkeypatch):
    folder, hf, loaded = tiny
    spec = loaded.spec
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    config = build_config(spec, backend="jax", platform="cpu", dtype="auto", max_model_len=64, num_blocks=16,
                          tune_matmul_dtypes=True, warmup=False, allow_lazy_compile=True, free_bytes=2**34)
    table = config.graph_cache_dir / "tuning" / f"{T.machine_key(spec)}.json"
    table.parent.mkdir(parents=True)
    table.write_text(json.dumps({"matmul": [[1, "float32"], [4, "bfloat16"]], "measured": []}))
    runner = JaxRunner(spec=spec, config=config, tensors=loaded.tensors)
    assert config.dtype == "float32" and runner.k_cache.dtype == jnp.float32
    pre, dec = GraphKey("prefill", 1, 16), GraphKey("decode", 1, 1)
    assert runner.fingerprint(pre)["matmul_dtype"] == "bfloat16" and "bfloat16" in runner.fingerprint(pre)["args"]
    assert runner.fingerprint(dec)["matmul_dtype"] == "float32" and "bfloat16" not in runner.fingerprint(dec)["args"]
    assert runner.params_for(pre)["qkv"].dtype == jnp.bfloat16
    assert runner.params_for(pre)["attn_norm"].dtype == jnp.float32
    ids = prompt(9, spec.vocab_size, seed=3)
    row = ScheduledRow("r", ids, 0, [1], True, SamplingParams(temperature=0.0, logprobs=1), 0, 0, len(ids), [],
                       spec.eos_token_ids)
    res = runner.execute(SchedulerOutput("prefill", [row]))
    with torch.no_grad():
        want = torch.log_softmax(torch.tensor(hf_logits(hf, ids)[-1]), -1).numpy()
    assert abs(res.logprobs[0] - want[res.tokens[0]]) < 0.05
    assert want[res.tokens[0]] >= np.sort(want)[-2] - 0.05          # greedy's pick is (near-)top under float32
