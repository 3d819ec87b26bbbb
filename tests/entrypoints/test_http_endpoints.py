"""The smaller OpenAI / vLLM endpoints on the mock engine: /tokenize and /detokenize (vLLM's shapes, checked
against the tokenizer itself), GET /v1/models/{id} (404 model_not_found for another id), /version; and the
vLLM prompt dicts of LLM.generate."""
from __future__ import annotations

import json

import pytest

from kiln.engine.llm import LLM
from kiln.engine.sampling_params import SamplingParams
from tests.entrypoints.serving import mock_servers, post_json
from tests.mock_engine import mock_engine

MODEL = "mock-model"


@pytest.fixture(scope="module")
def server():
    yield from mock_servers(grpc=False, http=True, model_name=MODEL)


def post(s, path, body) -> tuple[int, dict]:
    return post_json(s.base + path, body)


def test_tokenize_and_detokenize(server):
    tok = server.engine_.tokenizer
    st, r = post(server, "/tokenize", {"model": MODEL, "prompt": "héllo", "return_token_strs": True})
    assert st == 200 and r["tokens"] == tok.encode("héllo") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256 and r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    st, r2 = post(server, "/tokenize", {"prompt": "héllo", "add_special_tokens": False})
    assert r2["tokens"] == tok.encode("héllo", add_special_tokens=False) and r2["token_strs"] is None
    msgs = [{"role": "user", "content": "hi"}]
    st, r3 = post(server, "/tokenize", {"messages": msgs})
    assert st == 200 and r3["tokens"] == tok.apply_chat_template(msgs)
    st, d = post(server, "/detokenize", {"tokens": r2["tokens"]})
    assert st == 200 and d == {"prompt": "héllo"}
    st, e = post(server, "/detokenize", {"tokens": [10**6]})
    assert st == 400 and e["error"]["param"] == "tokens"
    st, e = post(server, "/tokenize", {"prompt": 5})
    assert st == 400 and e["error"]["param"] == "prompt"
    st, e = post(server, "/tokenize", {"model": "other", "prompt": "x"})
    assert st == 404 and e["error"]["code"] == "model_not_found"


def test_model_by_id_and_version(server):
    st, body = server.get(f"/v1/models/{MODEL}")
    card = json.loads(body)
    assert st == 200 and card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == 256
    st, body = server.get("/v1/models/gpt-4")
    assert st == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    st, body = server.get("/version")
    assert st == 200 and isinstance(json.loads(body)["version"], str)


def test_llm_generate_takes_vllms_prompt_dicts():
    llm = LLM.__new__(LLM)
    llm.engine = mock_engine()
    llm.tokenizer = llm.engine.tokenizer
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    ids = llm.tokenizer.encode("abc")
    a, b, c = llm.generate(["abc", {"prompt": "abc"}, {"prompt_token_ids": ids}], sp)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
    (d,) = llm.generate({"prompt_token_ids": ids}, sp)
    assert d.prompt_token_ids == ids
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"prompt_token_ids": ["x"]}, sp)
    with pytest.raises(ValueError, match="needs `prompt`"):
        llm.generate({"text": "x"}, sp)
