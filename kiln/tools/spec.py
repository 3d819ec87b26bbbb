"""The tools a chat request offers and how it wants them used; the grammar constraint that `required` and a
named choice impose, so that their output always parses (the schemas vLLM builds for the same choices)."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from kiln.structured.params import StructuredOutputsParams


@dataclasses.dataclass
class Function:
    name: str
    description: str | None
    parameters: dict                      # a JSON Schema of the arguments object


@dataclasses.dataclass
class ToolSpec:
    functions: list[Function]
    choice: str                           # "auto" | "none" | "required" | "named"
    named: str | None = None              # the function a named choice forces
    parallel: bool = True

    def template_tools(self) -> list[dict]:
        """The tools as the chat template takes them (OpenAI's shape)."""
        return [{"type": "function", "function": {"name": f.name, "description": f.description or "",
                                                  "parameters": f.parameters}} for f in self.functions]

    def function(self, name: str) -> Function | None:
        return next((f for f in self.functions if f.name == name), None)

    def constraint(self) -> StructuredOutputsParams | None:
        """The output grammar: named -> the function's arguments object; required -> a JSON array of
        {name, parameters} calls (one unless parallel); auto / none -> nothing."""
        if self.choice == "named":
            return StructuredOutputsParams(json=self.function(self.named).parameters)
        if self.choice != "required":
            return None
        calls = [{"type": "object", "properties": {"name": {"enum": [f.name]}, "parameters": f.parameters},
                  "required": ["name", "parameters"], "additionalProperties": False} for f in self.functions]
        array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            array["maxItems"] = 1
        return StructuredOutputsParams(json=array)


def _function(i: int, tool: Any) -> Function:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise ValueError(f"{where} must be an object of type function.")
    fn = tool.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{where}.function must be an object with a non-empty string name.")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict):
        raise ValueError(f"{where}.function.parameters must be a JSON Schema object.")
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise ValueError(f"{where}.function.description must be a string.")
    return Function(fn["name"], desc, params)


def from_body(body: dict) -> ToolSpec | None:
    """The request's tools and tool_choice, or None when it offers none; ValueError naming the field."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ValueError("parallel_tool_calls must be true or false.")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise ValueError("tool_choice needs tools.")
        return None
    if not isinstance(tools, list):
        raise ValueError("tools must be a list of function tools.")
    functions = [_function(i, t) for i, t in enumerate(tools)]
    if len({f.name for f in functions}) != len(functions):
        raise ValueError("tools holds two functions of the same name.")
    if choice is None:
        choice = "auto"
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise ValueError(f"tool_choice must be auto, none, required or a named function, got {choice!r}.")
        return ToolSpec(functions, choice, None, parallel)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise ValueError('tool_choice must be auto, none, required or {"type": "function", "function": '
                         '{"name": ...}}.')
    spec = ToolSpec(functions, "named", name, parallel)
    if spec.function(name) is None:
        raise ValueError(f"tool_choice names {name[:60]!r}, which is not among the tools.")
    return spec


def calls_from_constrained(spec: ToolSpec, text: str) -> list[tuple[str, str]]:
    """(name, arguments JSON) of the output of a required / named choice (its grammar guarantees the shape)."""
    if spec.choice == "named":
        return [(spec.named, json.dumps(json.loads(text), ensure_ascii=False))]
    return [(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in json.loads(text)]
