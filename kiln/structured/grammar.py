"""Compiling constraints to token-level grammars (xgrammar), cached, and one matcher per sample.

    Grammars(tokenizer, vocab_size, stop_ids)      one per engine; the tokenizer's vocabulary is read once, lazily
        .compile(StructuredOutputsParams) ─> CompiledGrammar   cached by (kind, text, whitespace); ValueError
                                                                naming the problem for what does not compile
        .matcher(params) ─> Matcher                             per sample: its state follows accepted tokens
    Matcher.fill(out [W] i32)   the next token's bitmask (bit t of word t // 32: token t allowed)
    Matcher.accept(token)       advance; False for a token the grammar refuses
    Matcher.terminated          the grammar has ended (after its stop token): the request is done

Why xgrammar: measured on this machine (SmolLM2's 49152-token vocabulary, a nested schema, 32 tokens) its
next-token mask takes 8 us on average (0.11 ms at worst) against llguidance 1.9's 143 us (2.4 ms), an 18x
difference paid per constrained row per step; compiling was 32 ms against 8 ms, paid once per schema (cached).

Known xgrammar 0.2.9 gap: a string with `maxLength` / `minLength` admits raw control characters (U+0000-U+001F
except \n and \r), which strict JSON parsers refuse; a `pattern` bound (`^[^\x00-\x1f]{0,8}$`) does not.
"""
from __future__ import annotations

import collections
import json
import re
import threading
from typing import Any, Sequence

import numpy as np

from kiln.structured.params import StructuredOutputsParams

_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")

CACHE_SIZE = 256
"""Compiled grammars kept (least recently used dropped first)."""


def bitmask_width(vocab_size: int) -> int:
    """32-bit words of one row's token bitmask."""
    return (vocab_size + 31) // 32


def _choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose language is exactly `choices`."""
    def lit(s: str) -> str:
        out = []
        for ch in s:
            if ch in '"\\':
                out.append("\\" + ch)
            elif ord(ch) < 0x20:
                out.append(f"\\x{ord(ch):02x}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    return "root ::= " + " | ".join(lit(c) for c in choices)


class Grammars:
    """Compiles constraints against one tokenizer; thread-safe (validation runs on the callers' threads)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]):
        self._hf, self.vocab_size, self._stop = hf_tokenizer, vocab_size, list(stop_token_ids)
        self._compiler = None
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr
                info = xgr.TokenizerInfo.from_huggingface(self._hf, vocab_size=self.vocab_size,
                                                          stop_token_ids=self._stop or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar of `params` (cached); ValueError `structured_outputs.<kind>: <problem>`."""
        key = params.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
        compiler = self._get_compiler()
        kind = key[0]
        try:
            if kind == "json":
                g = compiler.compile_json_schema(key[1], any_whitespace=not params.disable_any_whitespace)
            elif kind == "json_object":          # any JSON object (as vLLM compiles it for xgrammar)
                g = compiler.compile_json_schema('{"type": "object"}',
                                                 any_whitespace=not params.disable_any_whitespace)
            elif kind == "regex":
                g = compiler.compile_regex(params.regex)
            elif kind == "choice":
                g = compiler.compile_grammar(_choice_grammar(params.choice))
            else:
                g = compiler.compile_grammar(params.grammar)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError / ValueError / its own
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            first = _SOURCE_PREFIX.sub("", first)          # "[time] /project/cpp/x.cc:94: " carries nothing
            raise ValueError(f"structured_outputs.{kind} cannot be compiled: {first[:300]}") from None
        with self._lock:
            self.misses += 1
            self._cache[key] = g
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return g

    def matcher(self, params: StructuredOutputsParams) -> Matcher:
        return Matcher(self.compile(params), self.vocab_size)


class Matcher:
    """The grammar state of one sample."""

    def __init__(self, compiled, vocab_size: int):
        import torch
        import xgrammar as xgr
        self._m = xgr.GrammarMatcher(compiled)
        self._buf = torch.zeros((1, bitmask_width(vocab_size)), dtype=torch.int32)   # xgrammar fills torch
        self.vocab_size = vocab_size

    def fill(self) -> np.ndarray:
        """The next token's bitmask [W] i32 (a fresh array)."""
        self._m.fill_next_token_bitmask(self._buf, 0)
        return self._buf.numpy()[0].copy()

    def accept(self, token: int) -> bool:
        return bool(self._m.accept_token(int(token)))

    @property
    def terminated(self) -> bool:
        return bool(self._m.is_terminated())


def allowed(bitmask: np.ndarray, token: int) -> bool:
    """Whether `bitmask` [W] i32 allows `token`."""
    return bool((int(bitmask[token >> 5]) >> (token & 31)) & 1)


def unpack(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """[..., W] i32 bitmasks -> [..., V] bool (the reference the samplers' in-graph unpacking is tested against)."""
    bits = (bitmask[..., :, None].astype(np.int64) >> np.arange(32)) & 1      # [..., W, 32]
    return bits.reshape(*bitmask.shape[:-1], -1)[..., :vocab_size].astype(bool)


def describe(params: StructuredOutputsParams) -> str:
    return json.dumps({params.kind: getattr(params, params.kind)})[:200]
