"""The device mesh and where each array lives on it: the one place kiln decides tensor-parallel placement.

    --tensor-parallel-size N ──> make_mesh(N): Mesh(devices[:N], ("tp",))      (all processes' devices, in order)
                            ──> plan_shardings(spec, param names, N): a PartitionSpec per weight, the KV cache's
                            ──> place(params, mesh, plan): NamedSharding device_puts (or global arrays, multi-host)

The layout is Megatron's, stated on kiln's weight names (models/layout.py; linear weights are [in, out], stacked
[L, ...] for the layer scan):

    qkv, gate_up      [L, D, out]  column-parallel: P(None, None, "tp")   (each device: a slice of heads / of F)
    qkv_bias, gate_up_bias [L, out]                P(None, "tp")
    o, down           [L, in, D]   row-parallel:    P(None, "tp", None)   (partial sums: one all-reduce each)
    embed             [V, D]       vocab-parallel:  P("tp", None)         (a masked lookup + one all-reduce)
    head              [D, V]       vocab-parallel:  P(None, "tp")         (logits gathered once, [B, V])
    norms, o_bias, down_bias                        replicated            (added after the all-reduce)
    KV cache          [L, NB, KVH, bs, Dh]          P(None, None, "tp", None, None): by KV head

We shard the inputs and let GSPMD (XLA's partitioner) place the collectives; the decoder layer (model.py) stays
one piece of code for every mesh. Its fused projections are sliced at fixed offsets (q|k|v, gate|up) that do
not fall on shard boundaries, so GSPMD adds small collective-permutes beside the two all-reduces a layer; an
interleaved fused layout read per shard would remove them (a model.py change, left for later).

Refusals and fallbacks (each with its reason, logged): heads or the MLP width not divisible by N refuse (there
is no even split); KV heads not divisible by N (GQA with fewer KV heads than devices) keep the KV cache
replicated, every device holding all KV heads, which is exact and costs KV memory; a vocabulary not divisible
by N keeps the embedding and head replicated.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kiln.compile.graph_key import MeshKey

log = logging.getLogger(__name__)

AXIS = "tp"
COLUMN = ("qkv", "gate_up")                 # [L, D, out]
COLUMN_BIAS = ("qkv_bias", "gate_up_bias")  # [L, out]
ROW = ("o", "down")                         # [L, in, D]


class ShardingError(ValueError):
    """The model cannot be split over this many devices (the message says why and what would work)."""


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    params: dict[str, P]          # kiln weight name -> PartitionSpec
    kv: P                         # the KV cache's PartitionSpec
    notes: tuple[str, ...] = ()   # what was replicated instead of sharded, and why


def make_mesh(tp: int, devices: list | None = None) -> Mesh:
    """A 1-D mesh ("tp",) over the first `tp` devices (jax.devices(): every process's, in process order)."""
    devices = list(jax.devices() if devices is None else devices)
    if tp < 1 or tp > len(devices):
        raise ShardingError(f"--tensor-parallel-size {tp} needs {tp} devices; {len(devices)} visible "
                            f"({devices[0].platform}). On CPU, XLA_FLAGS=--xla_force_host_platform_device_count="
                            f"{tp} makes {tp} host devices.")
    return Mesh(np.array(devices[:tp]), (AXIS,))


def _divides(n: int, what: str, size: int, tp: int) -> None:
    if size % tp:
        raise ShardingError(f"--tensor-parallel-size {tp} does not divide the model's {what} ({size}); "
                            f"use a size that divides {size}")


def plan_shardings(spec, names, tp: int, *, intermediate: int) -> ShardingPlan:
    """PartitionSpecs of the weights `names` and of the KV cache for a model of `spec` over `tp` devices.
    `intermediate` is the MLP width F (gate_up is [L, D, 2F])."""
    _divides(tp, "attention heads", spec.num_heads, tp)
    _divides(tp, "MLP intermediate size", intermediate, tp)
    notes = []
    kv = P(None, None, AXIS, None, None)
    if spec.num_kv_heads % tp:
        kv = P()
        notes.append(f"KV cache replicated: {spec.num_kv_heads} KV heads do not split over {tp} devices (GQA)")
    vocab = spec.vocab_size % tp == 0
    if not vocab:
        notes.append(f"embedding and head replicated: vocabulary {spec.vocab_size} is not divisible by {tp}")
    out = {}
    for name in names:
        if name in COLUMN:
            out[name] = P(None, None, AXIS)
        elif name in COLUMN_BIAS:
            out[name] = P(None, AXIS)
        elif name in ROW:
            out[name] = P(None, AXIS, None)
        elif name == "embed" and vocab:
            out[name] = P(AXIS, None)
        elif name == "head" and vocab:
            out[name] = P(None, AXIS)
        else:
            out[name] = P()
    for n in notes:
        log.warning("tensor parallel %d: %s", tp, n)
    return ShardingPlan(out, kv, tuple(notes))


def named(mesh: Mesh, spec: P) -> NamedSharding:
    return NamedSharding(mesh, spec)


def put(x, sharding: NamedSharding) -> jax.Array:
    """A host (numpy) or device array as a global array of `sharding`: every process passes the same full
    value and keeps the shards of its own devices (works with one process or many)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def place(params: dict[str, Any], mesh: Mesh, plan: ShardingPlan) -> dict[str, jax.Array]:
    """The params pytree on the mesh, each weight with its planned sharding."""
    return {k: put(v, named(mesh, plan.params[k])) for k, v in params.items()}


def zeros(shape, dtype, sharding: NamedSharding) -> jax.Array:
    """A zero array created shard by shard on its devices (the full KV cache never exists on one device)."""
    return jax.jit(lambda: jax.numpy.zeros(shape, dtype), out_shardings=sharding)()


def mesh_key(mesh: Mesh | None) -> MeshKey:
    """What of the mesh changes a compiled graph: axis names and sizes, device kind, process count."""
    if mesh is None:
        return MeshKey((), jax.devices()[0].device_kind, 1)
    devs = list(mesh.devices.flat)
    return MeshKey(tuple((str(a), int(mesh.shape[a])) for a in mesh.axis_names), devs[0].device_kind,
                   len({d.process_index for d in devs}))


class Placement:
    """Where the runner's arrays live. `mesh` None: the default device, exactly as without this module."""

    def __init__(self, mesh: Mesh | None = None, plan: ShardingPlan | None = None):
        self.mesh, self.plan = mesh, plan
        self.key = mesh_key(mesh)

    @classmethod
    def for_model(cls, spec, params: dict[str, Any], tp: int, *, multi_process: bool = False) -> Placement:
        """The placement of `params` over `tp` devices (tp 1 in one process: no mesh at all)."""
        if tp == 1 and not multi_process:
            return cls()
        intermediate = params["gate_up"].shape[-1] // 2 if "gate_up" in params else 0
        plan = plan_shardings(spec, params, tp, intermediate=intermediate or tp)
        return cls(make_mesh(tp), plan)

    @property
    def devices(self) -> list:
        """The devices a graph runs on, in mesh order (without a mesh: the default device only; a graph loaded
        from the cache would otherwise expect one argument shard on every visible device)."""
        return [jax.devices()[0]] if self.mesh is None else list(self.mesh.devices.flat)

    @property
    def replicated(self) -> NamedSharding | None:
        return None if self.mesh is None else named(self.mesh, P())

    @property
    def kv(self) -> NamedSharding | None:
        return None if self.mesh is None else named(self.mesh, self.plan.kv)

    def params(self, params: dict[str, Any]) -> dict[str, Any]:
        return params if self.mesh is None else place(params, self.mesh, self.plan)

    def kv_zeros(self, shape, dtype) -> jax.Array:
        return jax.numpy.zeros(shape, dtype) if self.mesh is None else zeros(shape, dtype, self.kv)

    def abstract(self, x, sharding: NamedSharding | None = None) -> jax.ShapeDtypeStruct:
        """x's shape and dtype, with its sharding on the mesh (`sharding`, else x's own, else replicated)."""
        if self.mesh is None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        sharding = sharding or (x.sharding if isinstance(getattr(x, "sharding", None), NamedSharding)
                                else self.replicated)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    def out_shardings(self, kind: str) -> dict:
        """jit keyword arguments fixing a graph's output shardings: steps return (K, V, logits [B, V])
        with the cache in place and the logits whole on every device; samplers return replicated tokens."""
        if self.mesh is None:
            return {}
        rep = self.replicated
        return {"out_shardings": rep if kind == "sample" else (self.kv, self.kv, rep)}

    def inputs(self, args):
        """Host step inputs as replicated global arrays (one process or many); unchanged without a mesh."""
        if self.mesh is None:
            return args
        return jax.tree.map(lambda a: a if isinstance(a, jax.Array) else put(a, self.replicated), args)
