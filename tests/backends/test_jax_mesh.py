"""Tensor parallelism on the JAX backend (backends/jax/mesh.py) over 4 forced CPU devices.

XLA_FLAGS=--xla_force_host_platform_device_count=4 must be set before JAX starts, so the sharded runs happen in
one subprocess (tests/backends/tp_worker.py) and this module asserts on what it reports:
- logits of a 3-row prefill and of the decode step after it, TP=2 and TP=4, within 1e-4 of TP=1 (float32), on
  a tiny GQA Llama (4 heads, 2 KV heads, untied head, biases: TP=2 shards the KV cache by KV head and the
  vocabulary 258 in halves; TP=4 replicates the KV cache (GQA) and the vocabulary (258 % 4 != 0));
- whole-engine greedy generation (LLMEngine, scheduler to sampler) equal at TP=1, 2 and 4;
- the compiled decode graph has exactly two all-reduces in its layer body (one after attention's o, one after
  the MLP's down: Megatron's one per block), none with TP=1, and with the KV heads split (TP=2) no other
  collective at all: the fused qkv / gate_up weights are regrouped so each device's slice is contiguous (no
  collective-permute); with the KV cache replicated (TP=4, GQA) one more all-reduce keeps one of the groups'
  equal copies of k and v, still no permute or gather in the layer;
- each device holds exactly the KV bytes the memory plan sized (engine/build.py: 1/tp of a block when split);
- the default model (SmolLM2-135M GGUF through kiln's loader: 9 heads, 3 KV heads, so TP=2 is refused and TP=3
  is the split it has) gives the engine's greedy tokens at TP=3 equal to TP=1;
- the graph cache keys differ per mesh and a TP=2 graph is a miss where only the TP=1 graph was stored.
The sharding plan's refusals are plain functions, checked here directly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from kiln.backends.jax.mesh import AXIS, ShardingError, plan_shardings
from tests.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory, default_gguf):
    from kiln.config import models_dir
    d = tmp_path_factory.mktemp("tp")
    gqa = str(save_tiny_model(d / "gqa", "llama-gqa"))
    tasks = {"gqa": ["logits", {"folder": gqa, "tps": [1, 2, 4], "greedy_tokens": 8}],
             "cache": ["cache", {"folder": gqa, "cache_dir": str(d / "cache")}],
             "default": ["default_model", {"gguf": str(default_gguf), "models_dir": str(models_dir()),
                                           "tps": [1, 3], "tokens": 4}]}
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.backends.tp_worker", "run_all", json.dumps({"tasks": tasks})],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["result"]


@pytest.mark.parametrize("model,tp", [("gqa", "2"), ("gqa", "4")])
def test_sharded_logits_match_one_device(report, model, tp):
    ref, got = report[model]["1"], report[model][tp]
    for kind in ("prefill", "decode"):
        a, b = np.asarray(ref[kind]), np.asarray(got[kind])
        assert a.shape == (3, 258) and np.abs(a).max() > 1.0            # real logits, not zeros
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=0, err_msg=f"{model} TP={tp} {kind}")


def test_kv_cache_sharded_by_kv_head_or_replicated_for_gqa(report):
    # [L, NB, KVH, bs, Dh] per device: 2 KV heads over 2 devices -> 1 each; over 4 devices -> all 2 (replicated)
    assert report["gqa"]["2"]["kv_shard_shape"][2] == 1 and report["gqa"]["2"]["notes"] == []
    assert report["gqa"]["4"]["kv_shard_shape"][2] == 2
    assert any("KV cache replicated" in n for n in report["gqa"]["4"]["notes"])


def test_greedy_generation_equal_across_meshes(report):
    g = {tp: report["gqa"][tp]["greedy"] for tp in ("1", "2", "4")}
    assert len(g["1"]) == 3 and all(len(t) == 8 for t in g["1"])
    assert g["2"] == g["1"] and g["4"] == g["1"]


def test_two_all_reduces_per_layer(report):
    assert report["gqa"]["1"]["hlo"]["total"] == {}                      # one device: no collectives at all
    for model, tp in (("gqa", "2"), ("default", "3")):
        hlo = report[model][tp]["hlo"]
        assert hlo["in_layer_scan"].get("all-reduce") == 2, (model, tp, hlo)
    # KV replicated (2 KV heads, 4 devices): o's, down's, and one (combined) for the k and v copies
    hlo = report["gqa"]["4"]["hlo"]
    assert hlo["in_layer_scan"] == {"all-reduce": 3} and "collective-permute" not in hlo["total"], hlo


def test_split_kv_heads_need_no_other_collective(report):
    # KV heads split (gqa TP=2, the default model TP=3): regrouped fused weights, every slice local; the only
    # collectives are all-reduces (two in the layer body, one for the vocab-parallel embedding lookup) and, once
    # a step outside the layers, the all-gather of the vocab-sharded logits the fused greedy sampler reads
    for model, tp in (("gqa", "2"), ("default", "3")):
        hlo = report[model][tp]["hlo"]
        assert hlo["in_layer_scan"] == {"all-reduce": 2}, (model, hlo)
        assert set(hlo["total"]) <= {"all-reduce", "all-gather"} and hlo["total"].get("all-gather", 0) <= 1, \
            (model, hlo)


def test_each_device_holds_the_planned_kv_bytes(report):
    g = report["gqa"]
    # [L=2, 16 blocks, KVH, 16, Dh=24] float32, K and V: all 2 KV heads on one device, 1 each over 2
    assert g["1"]["kv_device_bytes"] == [2 * 2 * 16 * 2 * 16 * 24 * 4] == [g["1"]["kv_planned_bytes"]]
    assert g["2"]["kv_device_bytes"] == [g["1"]["kv_planned_bytes"] // 2] * 2 == [g["2"]["kv_planned_bytes"]] * 2
    assert g["4"]["kv_device_bytes"] == [g["1"]["kv_planned_bytes"]] * 4 == [g["4"]["kv_planned_bytes"]] * 4


def test_default_model_greedy_equal_at_tp3(report):
    one, three = report["default"]["1"], report["default"]["3"]
    assert three["kv_shard_shape"][2] == 1 and one["kv_shard_shape"][2] == 3 and three["notes"] == []
    assert len(one["greedy"]) == 2 and all(len(t) == 4 for t in one["greedy"])
    assert "Paris" in one["text"][0]                                     # the model, not noise
    assert three["greedy"] == one["greedy"]


def test_graph_cache_distinguishes_meshes(report):
    c = report["cache"]
    (k1a, k1b), (k2a, k2b) = c["1"], c["2"]
    assert k1a["key"] == k1b["key"] != k2a["key"] == k2b["key"]
    assert k2a["mesh"]["shape"] == [[AXIS, 2]] and k1a["mesh"]["shape"] == []
    assert (k1a["cached_before"], k1a["how"]) == (False, "compiled")
    assert (k2a["cached_before"], k2a["how"]) == (False, "compiled")    # the TP=1 entry is not the TP=2 graph
    assert (k1b["how"], k2b["how"]) == ("hit", "hit")
    # a loaded sharded graph runs on its mesh and computes what the compiled one did (and TP=1 agrees)
    np.testing.assert_array_equal(k2b["logits"], k2a["logits"])
    np.testing.assert_allclose(k2a["logits"], k1a["logits"], atol=1e-4, rtol=0)
    assert np.abs(np.asarray(k1a["logits"])).max() > 1.0


class _Spec:
    num_heads, num_kv_heads, head_dim, vocab_size = 9, 3, 64, 49152     # SmolLM2-135M's


def test_plan_refuses_uneven_heads_and_replicates_what_cannot_split():
    with pytest.raises(ShardingError, match="attention heads \\(9\\)"):
        plan_shardings(_Spec, ["qkv"], 2, intermediate=1536)
    plan = plan_shardings(_Spec, ["embed", "qkv", "o", "final_norm"], 3, intermediate=1536)
    assert plan.params["qkv"] == P(None, None, AXIS, None) and plan.groups["qkv"] == ((9 * 64, True), (3 * 64, True), (3 * 64, True))
    assert plan.params["o"][1] == AXIS and plan.params["embed"][0] == AXIS
    assert plan.params["final_norm"] == P() and plan.kv[2] == AXIS and plan.notes == ()
    with pytest.raises(ShardingError, match="MLP intermediate size"):
        plan_shardings(_Spec, ["qkv"], 3, intermediate=1000)
