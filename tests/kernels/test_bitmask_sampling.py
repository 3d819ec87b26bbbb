"""Grammar bitmasks in both samplers (kernels/sampling for jax, backends/torch/sampler): a masked row's greedy
token is numpy's argmax over the tokens its mask allows, every sampled token is an allowed one (whatever the
temperature, top-k, top-p or bias), unmasked rows are untouched, and the logprobs stay those of the raw logits."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from kiln.backends.inputs import build_sampling_tensors
from kiln.backends.torch import sampler as TS
from kiln.engine.sampling_params import SamplingParams
from kiln.kernels.sampling import sample
from kiln.structured.grammar import bitmask_width, unpack

V, B = 200, 8
sample_jit = jax.jit(sample, static_argnames="num_logprobs")


def case(seed: int):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, V)).astype(np.float32) * 3
    masks = [None] * B
    for i in range(0, B, 2):          # even rows masked: a few allowed tokens, never the row's argmax
        m = np.zeros(V, bool)
        m[rng.choice(V, size=rng.integers(1, 6), replace=False)] = True
        m[int(logits[i].argmax())] = False
        if not m.any():
            m[(int(logits[i].argmax()) + 1) % V] = True
        words = np.zeros(bitmask_width(V), np.uint32)
        for t in np.nonzero(m)[0]:
            words[t // 32] |= np.uint32(1 << (t % 32))
        masks[i] = words.view(np.int32)
        assert (unpack(masks[i], V) == m).all()
    params = [SamplingParams(temperature=0.0) if i % 4 < 2 else
              SamplingParams(temperature=1.5, top_k=50, top_p=0.9, logit_bias={3: 50.0}) for i in range(B)]
    st = build_sampling_tensors(params, [None] * B, [0] * B, [()] * B, list(range(B)), list(range(B)), B, 1,
                                vocab_size=V, bitmasks=masks)
    return logits, masks, params, st


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_both_samplers_obey_the_mask(seed):
    logits, masks, params, st = case(seed)
    j = jax.device_get(sample_jit(logits, st, num_logprobs=0))
    t = TS.sample(torch.from_numpy(logits.copy()), st, num_logprobs=1)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    for i in range(B):
        for tok in (int(j.tokens[i]), int(t.tokens[i])):
            if masks[i] is not None:
                ok = unpack(masks[i], V)
                assert ok[tok], (i, tok)
                if params[i].greedy:
                    assert tok == int(np.where(ok, logits[i], -np.inf).argmax())
            elif params[i].greedy:
                assert tok == int(logits[i].argmax())
        # logprobs under the raw logits, not the masked ones
        assert abs(float(t.logprobs[i]) - (logits[i, int(t.tokens[i])] - lse[i])) < 1e-4
        assert abs(float(j.logprobs[i]) - (logits[i, int(j.tokens[i])] - lse[i])) < 1e-4


def test_without_a_vocabulary_size_nothing_is_masked_and_a_mask_is_refused():
    st = build_sampling_tensors([SamplingParams(temperature=0.0)], [None], [0], [()], [0], [0], 2, 1)
    assert st.bitmask.shape == (2, 0)
    with pytest.raises(ValueError, match="bitmask"):
        build_sampling_tensors([SamplingParams()], [None], [0], [()], [0], [0], 2, 1,
                               bitmasks=[np.zeros(7, np.int32)])
