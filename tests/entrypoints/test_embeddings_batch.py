"""`kiln batch` lines with "url": "/v1/embeddings" on the mock engine: the records hold the OpenAI embeddings
body (vectors against hand-computed pools of the mock's hidden states, base64 decoded as the OpenAI client
does, usage), beside completion lines of the same job; bad embeddings lines and `dimensions` other than the
hidden size get error records; another model gets the HTTP API's 404 model_not_found record."""
from __future__ import annotations

import base64
import json

import numpy as np

from kiln.entrypoints import batch as B
from kiln.entrypoints import batch_format as F
from tests.mock_engine import mock_engine

D = 64        # the mock spec's hidden size


def expected(ids, pooling="last"):
    hs = np.stack([((t + np.arange(D)) % 5 - 2).astype(np.float64) for t in ids])
    v = hs[-1] if pooling == "last" else hs.mean(0)
    return v / np.linalg.norm(v)


def test_embeddings_lines(tmp_path):
    eng = mock_engine()
    tok = eng.tokenizer
    lines = [
        {"custom_id": "a", "url": F.EMBEDDINGS_URL, "body": {"model": "mock", "input": "hello"}},
        {"custom_id": "b", "url": F.EMBEDDINGS_URL, "body": {"input": [[5, 6, 7], [8, 9]], "pooling": "mean",
                                                             "encoding_format": "base64"}},
        {"custom_id": "c", "url": F.COMPLETIONS_URL, "body": {"prompt": "x", "max_tokens": 2}},
        {"custom_id": "d", "url": F.EMBEDDINGS_URL, "body": {"input": "x", "dimensions": 8}},
        {"custom_id": "e", "url": F.EMBEDDINGS_URL, "body": {"input": []}},
        {"custom_id": "f", "url": F.EMBEDDINGS_URL, "body": {"model": "other", "input": "x"}},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"method": "POST", **x}) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    B.run_batch(eng, str(inp), out, progress=False)
    recs = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(recs) == len(lines)
    a = recs["a"]["response"]["body"]
    ids = tok.encode("hello")
    assert recs["a"]["error"] is None and a["object"] == "list" and a["usage"]["prompt_tokens"] == len(ids)
    np.testing.assert_allclose(a["data"][0]["embedding"], expected(ids), atol=1e-6)
    b = recs["b"]["response"]["body"]
    for d, want in zip(b["data"], ([5, 6, 7], [8, 9])):
        np.testing.assert_allclose(np.frombuffer(base64.b64decode(d["embedding"]), "<f4"), expected(want, "mean"),
                                   atol=1e-6)
    assert b["usage"]["prompt_tokens"] == 5
    assert recs["c"]["response"]["body"]["object"] == "text_completion"
    assert recs["d"]["response"]["status_code"] == 400 and "dimensions" in recs["d"]["error"]["message"]
    assert recs["e"]["response"]["status_code"] == 400 and "input must be" in recs["e"]["error"]["message"]
    assert recs["f"]["response"]["status_code"] == 404 and recs["f"]["error"]["code"] == "model_not_found"
    assert eng.scheduler.kv.stats()["blocks_used"] == 0
