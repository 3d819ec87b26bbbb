import multiprocessing as mp

import jax
import jax.numpy as jnp
import numpy as np

from kiln.compile.graph_cache import GraphCache, fingerprint_key


def _compiled(scale: float):
    return jax.jit(lambda x: jnp.tanh(x) * scale).lower(jax.ShapeDtypeStruct((8,), jnp.float32)).compile()


def test_round_trip_and_manifest(tmp_path):
    cache = GraphCache(tmp_path)
    key = fingerprint_key({"graph": "toy", "shape": [8]})
    assert cache.load(key) is None and cache.misses == 1
    cache.store(key, _compiled(2.0), {"graph": "toy", "compile_s": 0.1, "memory_bytes": 123})
    exe = GraphCache(tmp_path).load(key)
    np.testing.assert_allclose(exe(jnp.ones(8)), np.tanh(1.0) * 2.0, rtol=1e-6)
    assert cache.manifest()[key]["memory_bytes"] == 123


def test_key_depends_on_every_field_but_not_order():
    a = fingerprint_key({"x": 1, "y": [1, 2]})
    assert a == fingerprint_key({"y": [1, 2], "x": 1})
    assert a != fingerprint_key({"x": 2, "y": [1, 2]})


def test_truncated_or_corrupt_entries_are_dropped(tmp_path, caplog):
    cache = GraphCache(tmp_path)
    for i, damage in enumerate([lambda b: b[: len(b) // 2], lambda b: b[:-10] + b"0123456789", lambda b: b"junk"]):
        key = fingerprint_key({"i": i})
        cache.store(key, _compiled(1.0), {"graph": f"g{i}"})
        path = tmp_path / f"{key}.graph"
        path.write_bytes(damage(path.read_bytes()))
        assert cache.load(key) is None
        assert not path.exists()
    assert cache.corrupt == 3
    assert "corrupt" in caplog.text


def _writer(root, worker):
    cache = GraphCache(root)
    for i in range(6):
        cache.store(fingerprint_key({"i": i % 3, "w": worker % 2}), _compiled(float(i)), {"graph": f"w{worker}-{i}"})


def test_concurrent_writers_do_not_corrupt(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    cache = GraphCache(tmp_path)
    keys = {fingerprint_key({"i": i, "w": w}) for i in range(3) for w in range(2)}
    assert set(cache.manifest()) == keys
    assert all(cache.load(k) is not None for k in keys) and cache.corrupt == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != ".lock"]
