"""StructuredOutputsParams and the request-body spellings that map to it: exactly one constraint, errors naming
the body's own field."""
from __future__ import annotations

import pytest

from kiln.engine.sampling_params import SamplingParams
from kiln.structured.params import StructuredOutputsParams as S
from kiln.structured.params import from_body

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_body_spellings_map_to_one_constraint():
    assert from_body({"response_format": {"type": "json_object"}}).kind == "json_object"
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    assert from_body({"response_format": rf}).json == SCHEMA
    assert from_body({"guided_json": SCHEMA}).json == SCHEMA
    assert from_body({"guided_json": '{"type": "string"}'}).json == {"type": "string"}
    assert from_body({"guided_regex": "a+"}).regex == "a+"
    assert from_body({"guided_choice": ["x", "y"]}).choice == ["x", "y"]
    assert from_body({"guided_grammar": 'root ::= "a"'}).grammar == 'root ::= "a"'
    assert from_body({"structured_outputs": {"choice": ["x"]}}).choice == ["x"]
    assert from_body({"response_format": {"type": "text"}}) is None
    assert from_body({}) is None


@pytest.mark.parametrize("body, starts", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"guided_json": "{not json"}, "guided_json is not valid JSON"),
    ({"guided_json": 3}, "guided_json must be"),
    ({"guided_choice": []}, "guided_choice must be"),
    ({"guided_choice": ["a", 1]}, "guided_choice must be"),
    ({"guided_regex": ""}, "guided_regex must be"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex cannot be combined"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs must set exactly one"),
    ({"structured_outputs": {"bogus": 1}}, "structured_outputs has unknown"),
    ({"structured_outputs": 5}, "structured_outputs must be an object"),
])
def test_bad_bodies_name_their_field(body, starts):
    with pytest.raises(ValueError) as e:
        from_body(body)
    assert str(e.value).startswith(starts)


def test_sampling_params_take_a_dict_or_the_object_and_the_key_keeps_property_order():
    a = SamplingParams(structured_outputs={"json": {"b": 1, "a": 2}})
    b = SamplingParams(structured_outputs=S(json='{"b": 1,  "a": 2}'))
    assert a.structured_outputs.key() == b.structured_outputs.key()
    assert a.structured_outputs.key() != S(json={"a": 2, "b": 1}).key()   # the output's order differs
    assert S(json=SCHEMA).key() != S(json=SCHEMA, disable_any_whitespace=False).key()
    with pytest.raises(ValueError, match="^structured_outputs must set exactly one"):
        SamplingParams(structured_outputs={})


def test_min_tokens_is_refused_with_a_grammar():
    """A grammar that can end before min_tokens would leave the sampler no allowed token (every grammar token
    masked, the stop tokens banned): refused at the edge, naming both fields."""
    with pytest.raises(ValueError, match="^min_tokens must be 0 when structured_outputs is set, got 4"):
        SamplingParams(min_tokens=4, structured_outputs={"regex": "[ab]{1,3}"})
    assert SamplingParams(min_tokens=0, structured_outputs={"regex": "[ab]{1,3}"}).min_tokens == 0
