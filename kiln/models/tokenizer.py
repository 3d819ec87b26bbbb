"""Tokenizer: a thin wrapper over a transformers tokenizer, loaded from local files only.

Chat prompts are rendered with the model's own Jinja template (from `tokenizer_config.json` /
`chat_template.jinja` for an HF folder, from the `tokenizer.chat_template` metadata key for GGUF) to text, then
encoded without adding special tokens again, which is what `apply_chat_template(tokenize=True)` does too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.models.spec import ModelError


class Tokenizer:
    """Encode/decode and chat-template rendering for one model."""

    def __init__(self, hf_tokenizer: Any):
        self._tok = hf_tokenizer

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> "Tokenizer":
        """Load from an HF model folder (tokenizer.json / tokenizer_config.json)."""
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise ModelError(f"model folder not found: {path}")
        try:
            return cls(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load tokenizer from {path}: {str(e).splitlines()[0]}") from None

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        """Load the tokenizer embedded in a GGUF file (vocab, merges, special ids, chat template)."""
        from transformers import AutoTokenizer

        from kiln.models.gguf_loader import open_gguf

        path = Path(path)
        reader = open_gguf(path)  # validates the file with a clear ModelError first
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot load tokenizer from {path}: {str(e).splitlines()[0]}") from None
        field = reader.fields.get("tokenizer.chat_template")
        if not tok.chat_template and field is not None:
            tok.chat_template = field.contents()
        return cls(tok)

    @property
    def hf(self) -> Any:
        """The wrapped transformers tokenizer."""
        return self._tok

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self._tok.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce: base vocabulary plus added tokens."""
        return len(self._tok)

    @property
    def all_special_ids(self) -> list[int]:
        return list(self._tok.all_special_ids)

    @property
    def chat_template(self) -> str | None:
        return self._tok.chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return list(self._tok.convert_ids_to_tokens(list(ids)))

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> str:
        """The chat prompt as text, rendered by the model's own template (with `tools`, OpenAI-shaped, when
        given: templates that support tools render them)."""
        if not self._tok.chat_template:
            raise ModelError("this model's tokenizer has no chat template; send a plain prompt instead")
        kw = {"tools": tools} if tools else {}
        return self._tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                             **kw)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        """Token ids of the chat prompt (the template already holds any BOS, so none is added)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, tools), add_special_tokens=False)
