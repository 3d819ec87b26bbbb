"""The device mesh and where each array lives on it: the one place kiln decides tensor-parallel placement.

    --tensor-parallel-size N ──> make_mesh(N): Mesh(devices[:N], ("tp",))      (all processes' devices, in order)
                            ──> plan_shardings(spec, param names, N): a PartitionSpec per weight, the KV cache's
                            ──> place(params, mesh, plan): NamedSharding device_puts (or global arrays, multi-host)

The layout is Megatron's, stated on kiln's weight names (models/layout.py; linear weights are [in, out], stacked
[L, ...] for the layer scan):

    qkv, gate_up      [L, D, tp, out/tp] column-parallel, grouped: P(None, None, "tp", None)
    qkv_bias, gate_up_bias [L, tp, out/tp]                        P(None, "tp", None)
    o, down           [L, in, D]   row-parallel:    P(None, "tp", None)   (partial sums: one all-reduce each)
    embed             [V, D]       vocab-parallel:  P("tp", None)         (a masked lookup + one all-reduce)
    head              [D, V]       vocab-parallel:  P(None, "tp")         (logits gathered once, [B, V])
    norms, o_bias, down_bias                        replicated            (added after the all-reduce)
    KV cache          [L, NB, KVH, bs, Dh]          P(None, None, "tp", None, None): by KV head

We shard the inputs and let GSPMD (XLA's partitioner) place the collectives; the decoder layer (model.py) stays
one piece of code for every mesh. The fused projections are regrouped on the host before placement
(`group_columns`): q|k|v [out] becomes tp groups, group g holding the g-th tp-th of q, of k and of v (its own
heads, whole), and gate|up the same with the g-th tp-th of gate and of up. model.py reads a group's parts at
fixed offsets inside it, so every device's slice is contiguous and local, and a layer's only collectives are
its two all-reduces (after o, after down); sliced at offsets of the flat fused layout, the parts did not fall on
shard boundaries and GSPMD moved them with collective-permutes. With fewer KV heads than devices (GQA, the KV
cache replicated) every group holds its q heads and a copy of all of k and v (their weights are replicated
anyway); model.py keeps one copy with a max over the groups (exact: equal values), which is one small
all-reduce for k and v (XLA combines the two), so such a layer has three all-reduces and no permute or gather.

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
    groups: dict[str, tuple[tuple[int, bool], ...]] = dataclasses.field(default_factory=dict)   # fused weight
                                  # -> its parts (width, split over the groups or copied whole into each)


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
    H, KVH, Dh = spec.num_heads, spec.num_kv_heads, spec.head_dim
    split_kv = spec.num_kv_heads % tp == 0                # else each group gets all of k and v (docstring)
    parts = {"qkv": ((H * Dh, True), (KVH * Dh, split_kv), (KVH * Dh, split_kv)),
             "gate_up": ((intermediate, True), (intermediate, True))}
    groups = {n: parts[n.removesuffix("_bias")] for n in names if n.removesuffix("_bias") in parts}
    out = {}
    for name in names:
        if name in groups:
            out[name] = P(None, None, AXIS, None) if name in COLUMN else P(None, AXIS, None)
        elif name in COLUMN:
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
    return ShardingPlan(out, kv, tuple(notes), groups)


def named(mesh: Mesh, spec: P) -> NamedSharding:
    return NamedSharding(mesh, spec)


def put(x, sharding: NamedSharding) -> jax.Array:
    """A host (numpy) or device array as a global array of `sharding`: every process passes the same full
    value and keeps the shards of its own devices (works with one process or many)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def group_columns(w, parts: tuple[tuple[int, bool], ...], tp: int) -> np.ndarray:
    """A fused weight w [..., sum of widths] (q|k|v or gate|up) -> [..., tp, group width]: group g is, part by
    part, the g-th tp-th of a split part (q heads g*H/tp.., then its k heads, then its v heads) or the whole
    of a copied one."""
    w = np.asarray(w)
    widths = [n for n, _ in parts]
    pieces = np.split(w, np.cumsum(widths)[:-1], axis=-1)                 # [..., width] each
    grouped = [p.reshape(*p.shape[:-1], tp, p.shape[-1] // tp) if split else
               np.broadcast_to(p[..., None, :], (*p.shape[:-1], tp, p.shape[-1]))
               for p, (_, split) in zip(pieces, parts)]
    return np.concatenate(grouped, axis=-1)


def place(params: dict[str, Any], mesh: Mesh, plan: ShardingPlan) -> dict[str, jax.Array]:
    """The params pytree on the mesh, each weight with its planned sharding (fused ones regrouped first)."""
    tp = mesh.shape[AXIS]
    flat = lambda k, v: k in plan.groups and np.ndim(v) == (3 if k in COLUMN else 2)   # not yet regrouped
    grouped = lambda k, v: group_columns(v, plan.groups[k], tp) if flat(k, v) else v
    return {k: put(grouped(k, v), named(mesh, plan.params[k])) for k, v in params.items()}


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
        gu = params["gate_up"].shape if "gate_up" in params else (0,)    # [L, D, 2F] or grouped [L, D, tp, 2F/tp]
        intermediate = gu[-1] * (gu[2] if len(gu) == 4 else 1) // 2
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
