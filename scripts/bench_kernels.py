"""Side-by-side timings of the kernel choices kiln made on XLA:CPU (ratios matter, not absolute times):

- decode attention over a paged cache: the [NB, bs, KVH, D] layout with an einsum over [B, S, KVH, D], against
  kiln's [NB, KVH, bs, D] layout gathered into [B, KVH, S, D];
- argmax over a batch of logits: jnp.argmax against kiln's two-reduction argmax;
- drawing a token: gumbel-max noise over the vocabulary against kiln's inverse-CDF draw;
- top-k/top-p: a full sort against lax.top_k over kiln's 256 candidates;
- scan over layers against an unrolled layer loop (compile and step time) is in scripts/profile_step.py's notes.

    .venv/bin/python scripts/bench_kernels.py [--batch 64] [--context 256]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from timing import timeit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=49152)
    a = ap.parse_args()
    from kiln.kernels.attention import gather_kv
    from kiln.kernels.sampling import TOP_CANDIDATES, argmax, draw

    B, S, KVH, G, D, NB, bs = a.batch, a.context, 3, 3, 64, 4096, 16
    rng = np.random.default_rng(0)
    old_cache = jnp.asarray(rng.normal(size=(NB, bs, KVH, D)).astype(np.float32))   # [NB, bs, KVH, D]
    new_cache = old_cache.transpose(0, 2, 1, 3)[None]                                 # [1, NB, KVH, bs, D]
    tables = jnp.asarray(rng.integers(1, NB, (B, S // bs)).astype(np.int32))
    q = jnp.asarray(rng.normal(size=(B, KVH, G, D)).astype(np.float32))
    lens = jnp.full((B,), S - 3)

    def softmax_attend(s, v, eq):
        s = jnp.where(jnp.arange(S) < lens[:, None, None, None], s, -1e30)
        return jnp.einsum(eq, jax.nn.softmax(s, -1), v)

    def old_layout(q, cache):
        k = cache[tables].reshape(B, S, KVH, D)                                       # [B, S, KVH, D]
        return softmax_attend(jnp.einsum("bkgd,bskd->bkgs", q, k), k, "bkgs,bskd->bkgd")

    def new_layout(q, cache):
        k = gather_kv(cache, 0, tables)                                               # [B, KVH, S, D]
        return softmax_attend(jnp.einsum("bkgd,bksd->bkgs", q, k), k, "bkgs,bksd->bkgd")

    np.testing.assert_allclose(old_layout(q, old_cache), new_layout(q, new_cache), rtol=1e-4, atol=1e-4)
    rows = [("decode attention, [NB, bs, KVH, D] einsum", timeit(jax.jit(old_layout), q, old_cache)),
            ("decode attention, kiln [NB, KVH, bs, D]", timeit(jax.jit(new_layout), q, new_cache))]
    logits = jax.random.normal(jax.random.key(0), (B, a.vocab)) * 3
    seeds, steps = jnp.arange(B, dtype=jnp.uint32), jnp.zeros(B, jnp.int32)
    gumbel = lambda x: jnp.argmax(x + jax.vmap(lambda s: jax.random.gumbel(
        jax.random.fold_in(jax.random.key(s), 0), (a.vocab,)))(seeds), -1)
    rows += [("argmax, jnp.argmax", timeit(jax.jit(lambda x: jnp.argmax(x, -1)), logits)),
             ("argmax, kiln (max + min index)", timeit(jax.jit(argmax), logits)),
             ("draw, gumbel-max", timeit(jax.jit(gumbel), logits)),
             ("draw, kiln inverse CDF", timeit(jax.jit(lambda x: draw(x, seeds, steps)), logits)),
             ("top-k/top-p, full sort", timeit(jax.jit(lambda x: jnp.sort(x, -1)), logits, reps=5)),
             (f"top-k/top-p, lax.top_k({TOP_CANDIDATES})",
              timeit(jax.jit(lambda x: jax.lax.top_k(x, TOP_CANDIDATES)), logits))]
    print(f"batch {B}, context {S}, vocab {a.vocab}; {jax.devices()[0].device_kind}")
    for name, ms in rows:
        print(f"{name:<46} {ms:9.2f} ms")


if __name__ == "__main__":
    main()
