"""Per-bucket matmul dtypes chosen by measurement on this machine, not by a table of machines.

    --tune-matmul-dtypes, --dtype auto on jax ──> StepTuning.load_or_probe(spec, cache dir)
        stored?  <graph cache>/tuning/<machine key>.json ──> the table (a warm start measures nothing)
        else     probe(): the model's four layer matmuls (qkv, o, gate|up, down) at PROBE_TOKENS rows,
                 float32 against bf16 inputs with float32 accumulation (preferred_element_type), interleaved
                 rounds, the minimum of each; bf16 only where it wins by MARGIN ──> stored
    a step of N tokens ──> matmul_dtype(N): the answer of the largest probed size <= N

The machine key holds what changes the answer (platform, device kind, the CPU's feature flags, jax/jaxlib,
the model's shapes, PROBE_VERSION), so an AVX512_BF16 machine and an AVX2 one keep their own tables in a shared
cache. A graph's matmul dtype is part of its graph-cache fingerprint (runner.fingerprint), and so is the table
only through the graphs it chose. Only the matmuls change: the residual stream, norms, softmax, the KV cache and
the logits stay float32 (model._linear casts its input to the weight's dtype and accumulates in float32).
`--dtype float32` never probes and runs float32 everywhere (the reference configuration).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

PROBE_VERSION = 1
PROBE_TOKENS = (1, 4, 16, 64, 256, 1024)   # rows of the probed matmuls; larger steps take 1024's answer
MARGIN = 0.10                              # bf16 must be this much faster: it also costs accuracy
ROUNDS = 3
MATMUL_WEIGHTS = ("qkv", "o", "gate_up", "down", "head")   # what a bf16 graph reads in bf16


@dataclasses.dataclass(frozen=True)
class StepTuning:
    matmul: tuple[tuple[int, str], ...] = ()          # (probed rows, "float32" | "bfloat16"), ascending
    measured: tuple[tuple[int, float, float], ...] = ()   # (rows, float32 ms, bf16 ms) behind each choice

    def matmul_dtype(self, tokens: int) -> str:
        """The matmul dtype of a step computing `tokens` rows (float32 without a table)."""
        pick = "float32"
        for rows, dtype in self.matmul:
            if rows <= tokens or rows == self.matmul[0][0]:
                pick = dtype
        return pick

    @property
    def uses_bf16(self) -> bool:
        return any(d == "bfloat16" for _, d in self.matmul)

    def as_dict(self) -> dict:
        return {"matmul": [list(m) for m in self.matmul], "measured": [list(m) for m in self.measured]}

    @classmethod
    def from_dict(cls, d: dict) -> StepTuning:
        return cls(tuple((int(r), str(t)) for r, t in d["matmul"]),
                   tuple((int(r), float(a), float(b)) for r, a, b in d.get("measured", ())))


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def machine_key(spec) -> str:
    """A hash of what changes the probe's answer (module docstring)."""
    import jaxlib
    dev = jax.devices()[0]
    blob = {"v": PROBE_VERSION, "platform": dev.platform, "device_kind": dev.device_kind,
            "cpu": hashlib.sha256(_cpu_flags().encode()).hexdigest()[:16] if dev.platform == "cpu" else "",
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "spec": spec.shape_key()}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:24]


def layer_shapes(spec) -> list[tuple[int, int]]:
    """(in, out) of the four layer matmuls: qkv, o, gate|up, down."""
    D, H, KVH, Dh = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    F = getattr(spec.layers[0].mlp, "intermediate_size", None) or 4 * D
    return [(D, (H + 2 * KVH) * Dh), (H * Dh, D), (D, 2 * F), (F, D)]


def _layer_fn(shapes):
    def run(x, ws):   # x [M, D] float32; the four matmuls chained as a layer chains them
        y = x
        for (i, o), w in zip(shapes, ws):
            a = y[:, :i] if y.shape[1] >= i else jnp.tile(y, (1, -(-i // y.shape[1])))[:, :i]
            y = jnp.einsum("mi,io->mo", a.astype(w.dtype), w, preferred_element_type=jnp.float32)
        return y
    return jax.jit(run)


def probe(spec, tokens=PROBE_TOKENS, rounds: int = ROUNDS, margin: float = MARGIN) -> StepTuning:
    """Time the model's layer matmuls in float32 and bf16-in / f32-accumulate at each row count."""
    shapes = layer_shapes(spec)
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(s, np.float32) * 0.05 for s in shapes]
    weights = {dt: [jnp.asarray(w, dt) for w in host] for dt in ("float32", "bfloat16")}
    fn = _layer_fn(shapes)
    choice, measured = [], []
    for m in tokens:
        x = jnp.asarray(rng.standard_normal((m, shapes[0][0]), np.float32))
        best = {}
        for dt in weights:
            jax.block_until_ready(fn(x, weights[dt]))          # compile + first run
            best[dt] = float("inf")
        reps = max(1, min(8, 2048 // m))
        for _ in range(rounds):
            for dt in weights:                                  # interleaved: load on the machine hits both
                t0 = time.perf_counter()
                for _ in range(reps):
                    out = fn(x, weights[dt])
                jax.block_until_ready(out)
                best[dt] = min(best[dt], (time.perf_counter() - t0) / reps * 1000)
        pick = "bfloat16" if best["bfloat16"] < (1 - margin) * best["float32"] else "float32"
        choice.append((m, pick))
        measured.append((m, round(best["float32"], 4), round(best["bfloat16"], 4)))
    return StepTuning(tuple(choice), tuple(measured))


def load_or_probe(spec, cache_dir: Path | None) -> StepTuning:
    """The stored table of this machine and model, else a fresh probe (stored when there is a cache dir)."""
    path = None if cache_dir is None else Path(cache_dir) / "tuning" / f"{machine_key(spec)}.json"
    if path is not None and path.is_file():
        try:
            return StepTuning.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            log.warning("tuning table %s unreadable (%s): probing again", path, e)
    t0 = time.perf_counter()
    tuning = probe(spec)
    log.info("matmul dtype probe (%.1fs): %s; ms f32/bf16: %s", time.perf_counter() - t0,
             dict(tuning.matmul), [(m, a, b) for m, a, b in tuning.measured])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(tuning.as_dict()))
        tmp.replace(path)
    return tuning


def bf16_params(params: dict, *, tied_head: bool = True) -> dict:
    """The params a bf16 graph reads: the matmul weights (and, with `tied_head`, a head that is the embedding's
    transpose) in bf16, converted on the host (no XLA compile: a warm start compiles nothing), everything else
    as it is (shared, not copied)."""
    import ml_dtypes
    out = dict(params)
    if "head" not in out and tied_head:
        out["head"] = np.asarray(params["embed"]).T
    for name in MATMUL_WEIGHTS:
        if name in out:
            out[name] = jnp.asarray(np.asarray(out[name]).astype(ml_dtypes.bfloat16))
    return out
