"""The grammar compiler and matcher on the tiny byte-level tokenizer: masks allow exactly what the constraint
allows next (checked by hand on bytes), compiled grammars are cached by key, bad specs are ValueErrors naming
the problem, and the bitmask unpacking is the samplers' reference."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.structured.grammar import Grammars, allowed, bitmask_width, unpack
from kiln.structured.params import StructuredOutputsParams as S
from tests.mock_engine import tiny_tokenizer
from tests.tiny import EOS, VOCAB


@pytest.fixture(scope="module")
def grammars():
    return Grammars(tiny_tokenizer().hf, VOCAB, [EOS])


def byte_id(ch: str) -> int:
    (tid,) = tiny_tokenizer().encode(ch, add_special_tokens=False)
    return tid


def allowed_text(mask) -> set[str]:
    """The single characters a mask allows (byte tokens), EOS as '<eos>'."""
    out = set()
    for c in map(chr, range(32, 127)):
        if allowed(mask, byte_id(c)):
            out.add(c)
    if allowed(mask, EOS):
        out.add("<eos>")
    return out


def test_choice_masks_follow_the_prefix_and_end_with_eos(grammars):
    m = grammars.matcher(S(choice=["yes", "yak", "no"]))
    assert allowed_text(m.fill()) == {"y", "n"}
    assert m.accept(byte_id("y"))
    assert allowed_text(m.fill()) == {"e", "a"}
    for ch in "ak":
        assert m.accept(byte_id(ch))
    assert allowed_text(m.fill()) == {"<eos>"}
    assert not m.terminated
    assert m.accept(EOS) and m.terminated


def test_regex_and_refused_tokens(grammars):
    m = grammars.matcher(S(regex="[0-9]{2}x"))
    assert allowed_text(m.fill()) == set("0123456789")
    assert not m.accept(byte_id("x"))         # refused, state unchanged
    for ch in "42":
        assert m.accept(byte_id(ch))
    assert allowed_text(m.fill()) == {"x"}


def test_compiled_grammars_are_cached_by_key(grammars):
    before = grammars.misses
    a = grammars.compile(S(json={"type": "object", "properties": {"k": {"type": "string"}}}))
    b = grammars.compile(S(json='{"type": "object",  "properties": {"k": {"type": "string"}}}'))
    assert a is b and grammars.misses == before + 1 and grammars.hits >= 1


@pytest.mark.parametrize("spec, words", [
    (S(json={"type": "frobnicate"}), ["structured_outputs.json", "frobnicate"]),
    (S(json={"$ref": "#/definitions/missing"}), ["structured_outputs.json", "missing"]),
    (S(regex="(ab"), ["structured_outputs.regex", "parenthesis"]),
    (S(grammar="root ::= ("), ["structured_outputs.grammar", "EBNF"]),
])
def test_uncompilable_specs_name_the_problem(grammars, spec, words):
    with pytest.raises(ValueError) as e:
        grammars.compile(spec)
    msg = str(e.value)
    assert all(w in msg for w in words), msg
    assert "/project/" not in msg            # xgrammar's source location is stripped


def test_unpack_is_bit_t_of_word_t_over_32():
    rng = np.random.default_rng(0)
    V = 70
    masks = rng.integers(-2**31, 2**31, size=(3, bitmask_width(V)), dtype=np.int64).astype(np.int32)
    bools = unpack(masks, V)
    assert bools.shape == (3, V)
    for r in range(3):
        for t in range(V):
            assert bools[r, t] == bool((int(masks[r, t // 32]) >> (t % 32)) & 1) == allowed(masks[r], t)
