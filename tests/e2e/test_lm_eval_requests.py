"""The /v1/completions requests lm-eval-harness's `local-completions` model sends, as it sends them (a list of
token-id prompts, `echo`, `logprobs: 1`, `temperature: 0`, a seed; `max_tokens: 1` in lm-eval 0.4.x, 0 in
others) on the mock engine, read back the way lm-eval reads them (`sum(token_logprobs[ctxlen:-1])` and its
greediness check), against the mock's hand-computable prompt logprobs. lm-eval itself is not imported (the
`eval` extra); scripts/lm_eval_run.py runs it against `kiln serve`."""
from __future__ import annotations

import json
import urllib.request

import pytest

from kiln.backends.mock import mock_logprob
from tests.entrypoints.serving import mock_servers, wait_idle

MODEL = "mock-model"
DOCS = [("Question: What is two plus two?\nAnswer:", [" four", " five", " six"]),
        ("Question: Which animal barks?\nAnswer:", [" a dog", " a cat"])]


@pytest.fixture(scope="module")
def servers():
    yield from mock_servers(grpc=False, http=True, model_name=MODEL, max_num_seqs=8)


def post(s, body: dict) -> dict:
    req = urllib.request.Request(f"{s.base}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def requests_of(tok) -> list[tuple[list[int], int, list[int]]]:
    """(context + continuation ids, ctxlen, continuation ids) of every (document, choice), as lm-eval builds them."""
    out = []
    for ctx, choices in DOCS:
        c = tok.encode(ctx)
        for choice in choices:
            cont = tok.encode(ctx + choice)[len(c):]
            out.append((c + cont, len(c), cont))
    return out


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_loglikelihood_requests_as_lm_eval_sends_them(servers, max_tokens):
    reqs = requests_of(servers.engine_.tokenizer)
    body = post(servers, {"model": MODEL, "prompt": [ids for ids, _, _ in reqs], "temperature": 0,
                          "max_tokens": max_tokens, "logprobs": 1, "seed": 1234, "echo": True})
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == list(range(len(reqs)))
    for choice, (ids, ctxlen, cont) in zip(choices, reqs):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + max_tokens and lp["token_logprobs"][0] is None
        end = len(lp["token_logprobs"]) - max_tokens       # lm-eval 0.4.x drops the generated token ([:-1])
        scored, tops = lp["token_logprobs"][ctxlen:end], lp["top_logprobs"][ctxlen:end]
        assert sum(scored) == pytest.approx(sum(mock_logprob(t) for t in cont))
        assert all(t == max(top.values()) for t, top in zip(scored, tops))   # the mock's top-1 is the token
        assert choice["text"].startswith(servers.engine_.tokenizer.decode(ids))
    assert body["usage"]["completion_tokens"] == len(reqs) * max_tokens
    wait_idle(servers.engine_)


def test_generate_until_request(servers):
    """lm-eval's generate_until body: token-id prompts, max_tokens, temperature 0, its stop strings."""
    tok = servers.engine_.tokenizer
    ids = tok.encode(DOCS[0][0])
    body = post(servers, {"model": MODEL, "prompt": [ids], "max_tokens": 8, "temperature": 0,
                          "stop": ["\n\n", "Question:"], "seed": 1234})
    (choice,) = body["choices"]
    direct = post(servers, {"model": MODEL, "prompt": ids, "max_tokens": 8, "temperature": 0})["choices"][0]["text"]
    cut = min((direct.find(s) for s in ("\n\n", "Question:") if s in direct), default=len(direct))
    assert choice["text"] == direct[:cut]
    wait_idle(servers.engine_)
