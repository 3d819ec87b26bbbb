"""Incremental detokenization against the default model's real tokenizer."""

from __future__ import annotations

import pytest

from kiln.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! This is a plain ASCII sentence.",
    "héllo naïve café crème brûlée, Ærøskøbing, Straße",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 end",
    "中文测试：你好，世界！日本語のテキスト。한국어 문장입니다.",
    "Mixed 😀 中文 é \t tabs\nnewlines\n\n  double  spaces ",
    "Math ∑∫√∞ ≠ ≤ ≥ and arrows → ← ⇒, symbols ©®™ and Ω≈ç",
    "   leading spaces and trailing   ",
]


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    """The default model's own tokenizer, read from its GGUF in kiln's model directory (fetched once)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name,
                                                      local_files_only=True)


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> str:
    """Feed ids `chunk` at a time, then flush; return the concatenated deltas."""
    out = [detok.add_tokens(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    out.append(detok.flush())
    return "".join(out)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_matches_full_decode(tokenizer, text: str, chunk: int) -> None:
    prompt_ids = tokenizer.encode("The answer is:", add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    streamed = stream(detok, ids, chunk)
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert detok.output_text == streamed
    assert detok.stopped_by is None


def test_multibyte_character_is_never_split(tokenizer) -> None:
    ids = tokenizer.encode("😀中", add_special_tokens=False)
    assert len(ids) > 2  # the emoji and the CJK char each span more than one token
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = [detok.add_tokens([i]) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == "😀中"


def test_no_prompt_and_special_tokens(tokenizer) -> None:
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode(" Hi there", add_special_tokens=False) + [eos]
    assert stream(IncrementalDetokenizer(tokenizer, []), ids) == tokenizer.decode(ids, skip_special_tokens=True)
    kept = stream(IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False), ids)
    assert kept == tokenizer.decode(ids, skip_special_tokens=False)
    assert kept.endswith(tokenizer.eos_token)


def test_incomplete_tail_is_released_by_flush(tokenizer) -> None:
    ids = tokenizer.encode("ok 😀", add_special_tokens=False)[:-1]  # cut the emoji in half
    detok = IncrementalDetokenizer(tokenizer, [])
    assert "".join(detok.add_tokens([i]) for i in ids) == "ok"
    assert detok.flush() == tokenizer.decode(ids)[2:]


def test_stop_string_truncates(tokenizer) -> None:
    ids = tokenizer.encode("one two three four five", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["three"])
    streamed = stream(detok, ids)
    assert streamed == detok.output_text == "one two "
    assert detok.stopped_by == "three"
    assert detok.add_tokens(ids[:1]) == ""  # finished: later tokens are ignored


def test_stop_string_included(tokenizer) -> None:
    ids = tokenizer.encode("one two three four five", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["thr", "four"], include_stop_str_in_output=True)
    assert stream(detok, ids) == detok.output_text == "one two thr"
    assert detok.stopped_by == "thr"


def test_earliest_stop_string_wins(tokenizer) -> None:
    ids = tokenizer.encode("alpha beta gamma", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["gamma", "beta"])
    assert stream(detok, ids, chunk=len(ids)) == "alpha "
    assert detok.stopped_by == "beta"


def test_stop_string_split_across_tokens_is_never_emitted(tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog"
    stop = "ox jumps ov"  # starts inside the token ' fox' and spans several tokens
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], stop=[stop])
    emitted = ""
    for i in ids:
        emitted += detok.add_tokens([i])
        assert "The quick brown f".startswith(emitted)  # nothing past the cut point, ever
    emitted += detok.flush()
    assert emitted == detok.output_text == "The quick brown f"
    assert detok.stopped_by == stop


def test_stop_string_inside_multibyte_text(tokenizer) -> None:
    ids = tokenizer.encode("你好，世界！再见", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["世界"])
    assert stream(detok, ids) == "你好，"
    assert detok.stopped_by == "世界"


def test_held_back_text_released_without_stop(tokenizer) -> None:
    ids = tokenizer.encode("abc def", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["a long stop string"])
    streamed = "".join(detok.add_tokens([i]) for i in ids)
    assert streamed == ""  # all 7 characters are within the hold-back window
    assert detok.flush() == "abc def"
    assert detok.stopped_by is None
