"""What a request's output must match: vLLM's `StructuredOutputsParams` (exactly one of json, regex, choice,
grammar, json_object), and the OpenAI / vLLM request-body spellings that map to it.

    response_format {"type": "json_object"}                      -> json_object=True
    response_format {"type": "json_schema", "json_schema": {"schema": S}}  -> json=S
    structured_outputs {"json" | "regex" | "choice" | "grammar" | "json_object": ...}   (vLLM >= 0.11)
    guided_json / guided_regex / guided_choice / guided_grammar / guided_json_object     (vLLM's older names)

Every error is a ValueError whose message starts with the field name, as SamplingParams' are.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")
MAX_SPEC_CHARS = 64 * 1024
"""Longest schema / regex / grammar text kiln compiles (a compile is host time spent before admission)."""
MAX_CHOICES = 1024


@dataclasses.dataclass
class StructuredOutputsParams:
    """Exactly one constraint. `json` is a JSON Schema (an object, or its JSON text); `json_object` any JSON
    object; `regex` a regular expression the whole output matches; `choice` a list of literal strings;
    `grammar` an EBNF (GBNF) grammar with a `root` rule. `disable_any_whitespace` (default True in kiln:
    compact JSON, so a small model cannot spend its tokens on whitespace) is vLLM's flag of that name."""
    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = True

    def __post_init__(self) -> None:
        self.verify()

    def verify(self) -> None:
        """Check the fields' types and that exactly one constraint is set; normalise `json` to its text's
        object. Raises ValueError starting with `structured_outputs`."""
        set_ = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(set_) or 'none'}.")
        if isinstance(self.json, str):
            if len(self.json) > MAX_SPEC_CHARS:
                raise ValueError(f"structured_outputs.json is longer than {MAX_SPEC_CHARS} characters.")
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError(f"structured_outputs.json must be a JSON Schema object, got "
                             f"{type(self.json).__name__}.")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string.")
            if isinstance(v, str) and len(v) > MAX_SPEC_CHARS:
                raise ValueError(f"structured_outputs.{name} is longer than {MAX_SPEC_CHARS} characters.")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice or \
                    not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings.")
            if len(self.choice) > MAX_CHOICES:
                raise ValueError(f"structured_outputs.choice may hold at most {MAX_CHOICES} strings.")
            self.choice = list(self.choice)
        if self.json_object not in (None, True, False):
            raise ValueError("structured_outputs.json_object must be true or false.")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured_outputs.disable_any_whitespace must be true or false.")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str, bool]:
        """What the compiled grammar depends on: the grammar cache's key (a schema's property order is kept: it
        is the order the output's properties take)."""
        kind = self.kind
        value = getattr(self, kind)
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        return kind, text, self.disable_any_whitespace

    @classmethod
    def of(cls, value: Any) -> StructuredOutputsParams | None:
        """A StructuredOutputsParams from itself, a dict of its fields, or None."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs must be an object, got {type(value).__name__}.")
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)} - {"whitespace_pattern", "backend",
                                                                            "structural_tag"}
        if unknown:
            raise ValueError(f"structured_outputs has unknown field(s) {', '.join(sorted(unknown))}.")
        if value.get("structural_tag") is not None:
            raise ValueError("structured_outputs.structural_tag is not supported.")
        fields = {k: v for k, v in value.items() if k in {f.name for f in dataclasses.fields(cls)}}
        return cls(**fields)


GuidedDecodingParams = StructuredOutputsParams
"""vLLM's older name for the same thing."""

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar",
           "guided_json_object": "json_object"}


def from_body(body: dict) -> StructuredOutputsParams | None:
    """The constraint an OpenAI / vLLM request body asks for (response_format, structured_outputs, guided_*),
    or None. Raises ValueError naming the field for a malformed one or for more than one spelling."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
            raise ValueError("response_format must be an object with a type.")
        t = rf["type"]
        if t == "json_object":
            found.append(("response_format", StructuredOutputsParams(json_object=True)))
        elif t == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or "schema" not in js:
                raise ValueError("response_format.json_schema must be an object with a schema.")
            schema = js["schema"]
            if not isinstance(schema, (dict, str)):
                raise ValueError("response_format.json_schema.schema must be a JSON Schema object.")
            found.append(("response_format", _named("response_format", json=schema)))
        elif t != "text":
            raise ValueError(f"response_format.type must be text, json_object or json_schema, got {t!r}.")
    so = body.get("structured_outputs")
    if so is not None:
        found.append(("structured_outputs", StructuredOutputsParams.of(so)))
    ws = body.get("guided_whitespace_pattern")
    for key, kind in _GUIDED.items():
        v = body.get(key)
        if v is None or v is False:
            continue
        found.append((key, _named(key, **{kind: v})))
    if ws is not None and not isinstance(ws, str):
        raise ValueError("guided_whitespace_pattern must be a string.")
    if len(found) > 1:
        raise ValueError(f"{found[0][0]} cannot be combined with {found[1][0]}: ask for one output constraint.")
    return found[0][1] if found else None


def _named(field: str, **kw) -> StructuredOutputsParams:
    """StructuredOutputsParams(**kw) with its error messages naming the body's own field."""
    try:
        return StructuredOutputsParams(**kw)
    except ValueError as e:
        msg = str(e)
        for k in KINDS:
            msg = msg.replace(f"structured_outputs.{k}", field)
        raise ValueError(msg) from None
