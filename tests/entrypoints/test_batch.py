"""`kiln batch`: the OpenAI batch format (no model), the job loop on a fake engine (no model), then real jobs.

The model tests build one `kiln.LLM` per module (default GGUF, float32) and run jobs in-process on its engine
through `run_batch`, comparing against `LLM.generate` / `LLM.chat`. The kill-and-resume test runs the CLI in a
subprocess with the same engine settings and the same per-session graph cache (conftest's KILN_CACHE_DIR), so
the subprocess loads the graphs the module engine compiled; it loads the HF fp32 folder of the same weights
(bit-identical to the GGUF's dequantised tensors, loads in ~2s instead of ~20s).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.engine.outputs import CompletionOutput, RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.entrypoints import batch as B
from kiln.entrypoints import batch_format as F

REPO = Path(__file__).resolve().parents[2]
ENGINE = dict(dtype="float32", max_model_len=256, max_num_seqs=16)
ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "16"]


def line(cid, url, body, method="POST") -> str:
    return json.dumps({"custom_id": cid, "method": method, "url": url, "body": body})


def read_records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# -- the format, no model ---------------------------------------------------------------------------
def test_chat_line_to_params():
    req = F.parse_jsonl_line(line("a", F.CHAT_URL, {
        "model": "gpt-4o-mini", "messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.1,
        "n": 2, "seed": 3, "stop": "\n", "logprobs": True, "top_logprobs": 3, "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "repetition_penalty": 1.1, "logit_bias": {"42": 5}, "ignore_eos": True,
        "min_tokens": 2, "user": "ignored"}), 1)
    assert (req.custom_id, req.url, req.lineno) == ("a", F.CHAT_URL, 1)
    assert req.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.n, p.seed) == (7, 0.5, 0.9, 40, 0.1, 2, 3)
    assert (p.stop, p.logprobs, p.logit_bias, p.ignore_eos, p.min_tokens) == (["\n"], 3, {42: 5.0}, True, 2)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.1)
    # chat defaults: OpenAI's temperature 1, no token limit, no logprobs; logprobs without top_logprobs = 0 alternatives
    d = F.parse_jsonl_line(line("b", F.CHAT_URL, {"messages": [{"role": "user", "content": "x"}],
                                                   "logprobs": True}), 2).params
    assert (d.temperature, d.max_tokens, d.logprobs, d.n) == (1.0, None, 0, 1)


def test_completion_line_to_params():
    req = F.parse_jsonl_line(line("c", F.COMPLETIONS_URL, {"prompt": "Once", "logprobs": 2, "echo": False}), 4)
    assert (req.prompt, req.params.max_tokens, req.params.logprobs, req.params.temperature) == ("Once", 16, 2, 1.0)
    assert F.parse_jsonl_line(line("d", F.COMPLETIONS_URL, {"prompt": ["Once"]}), 5).prompt == "Once"
    assert F.parse_jsonl_line(line("e", F.COMPLETIONS_URL, {"prompt": [1, 2, 3]}), 6).prompt == [1, 2, 3]
    assert F.parse_jsonl_line(line("f", F.COMPLETIONS_URL, {"prompt": "x", "echo": True}), 7).echo
    t = F.parse_text_line("hello there", 9, SamplingParams(temperature=0))
    assert (t.custom_id, t.url, t.prompt, t.params.temperature) == ("line-9", F.COMPLETIONS_URL, "hello there", 0)


@pytest.mark.parametrize("raw, code, needle", [
    ("{not json", "invalid_json", "not valid JSON"),
    ("[1, 2]", "invalid_json", "not an object"),
    (json.dumps({"url": F.CHAT_URL, "body": {}}), "missing_custom_id", "custom_id"),
    (line("x", F.CHAT_URL, {"messages": []}, method="GET"), "invalid_method", "POST"),
    (line("x", "/v1/audio/speech", {"input": "a"}), "invalid_url", "/v1/audio/speech"),
    (line("x", F.CHAT_URL, None), "invalid_request", "body must be a JSON object"),
    (line("x", F.CHAT_URL, {"max_tokens": 3}), "invalid_request", "messages must be a non-empty list"),
    (line("x", F.CHAT_URL, {"messages": [{"content": "no role"}]}), "invalid_request", "role"),
    (line("x", F.CHAT_URL, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
     "invalid_request", "only text"),
    (line("x", F.COMPLETIONS_URL, {}), "invalid_request", "prompt must be"),
    (line("x", F.COMPLETIONS_URL, {"prompt": ["a", "b"]}), "invalid_request", "one prompt per batch line"),
    (line("x", F.COMPLETIONS_URL, {"prompt": "a", "temperature": -1}), "invalid_request",
     "temperature must be non-negative"),
    (line("x", F.COMPLETIONS_URL, {"prompt": "a", "temperature": "hot"}), "invalid_request", "must be a number"),
    (line("x", F.COMPLETIONS_URL, {"prompt": "a", "top_p": 0}), "invalid_request", "top_p must be in (0, 1]"),
    (line("x", F.COMPLETIONS_URL, {"prompt": "a", "n": 0}), "invalid_request", "n must be at least 1"),
    (line("x", F.COMPLETIONS_URL, {"prompt": "a", "max_tokens": 0}), "invalid_request", "max_tokens must be"),
    (line("x", F.COMPLETIONS_URL, {"prompt": "a", "logprobs": 50}), "invalid_request", "logprobs must be in"),
    (line("x", F.COMPLETIONS_URL, {"prompt": "a", "logprobs": True}), "invalid_request", "integer"),
    (line("x", F.COMPLETIONS_URL, {"prompt": "a", "stream": True}), "invalid_request", "stream"),
    (line("x", F.COMPLETIONS_URL, {"prompt": "a", "suffix": "b"}), "invalid_request", "suffix"),
    (line("x", F.COMPLETIONS_URL, {"prompt": "a", "logit_bias": {"a": 1}}), "invalid_request", "logit_bias"),
    (line("x", F.CHAT_URL, {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}),
     "invalid_request", "top_logprobs needs logprobs"),
    (line("x", F.CHAT_URL, {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2, "min_tokens": 3}),
     "invalid_request", "min_tokens must be <= max_tokens"),
])
def test_bad_lines(raw, code, needle):
    with pytest.raises(F.LineError) as ei:
        F.parse_jsonl_line(raw, 3)
    assert ei.value.code == code and needle in ei.value.message, ei.value.message
    if code not in ("invalid_json", "missing_custom_id"):
        assert ei.value.custom_id == "x"


def test_duplicate_custom_id():
    seen: set[str] = set()
    raw = line("same", F.COMPLETIONS_URL, {"prompt": "a"})
    F.parse_jsonl_line(raw, 1, seen)
    with pytest.raises(F.LineError) as ei:
        F.parse_jsonl_line(raw, 2, seen)
    assert (ei.value.code, ei.value.custom_id) == ("duplicate_custom_id", "same")


def _fake_output(n_prompt=3, outs=((" Paris", [5, 6], "stop"),), logprobs=None) -> RequestOutput:
    return RequestOutput("r", None, list(range(n_prompt)),
                         [CompletionOutput(i, t, ids, finish_reason=fr, logprobs=logprobs)
                          for i, (t, ids, fr) in enumerate(outs)], finished=True)


def test_output_records():
    decode = lambda t: f"<{t}>"
    chat = F.parse_jsonl_line(line("c", F.CHAT_URL, {"messages": [{"role": "user", "content": "q"}],
                                                     "logprobs": True, "top_logprobs": 1}), 1)
    out = _fake_output(logprobs=[{5: -0.1, 7: -3.0}, {6: float("-inf"), 8: -0.5}])
    body = F.response_body(chat, out, model="m", body_id="chatcmpl-1", created=7, decode=decode)
    assert body["object"] == "chat.completion" and body["model"] == "m"
    ch = body["choices"][0]
    assert ch["message"] == {"role": "assistant", "content": " Paris"} and ch["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    lp = ch["logprobs"]["content"]
    assert [x["token"] for x in lp] == ["<5>", "<6>"] and lp[1]["logprob"] == F.MIN_LOGPROB
    assert [x["token"] for x in lp[1]["top_logprobs"]] == ["<8>"]      # the top-1, not the sampled -inf one
    rec = F.ok_record(F.record_id("job", 1), "c", "req-1", body)
    assert rec["response"]["status_code"] == 200 and rec["error"] is None and F.lineno_of(rec) == 1
    json.loads(F.dumps(rec))                                            # strict JSON: no -Infinity

    comp = F.parse_jsonl_line(line("p", F.COMPLETIONS_URL, {"prompt": "The", "echo": True, "n": 2}), 2)
    body = F.response_body(comp, _fake_output(outs=((" a", [1], "length"), (" b", [2, 3], "stop"))), model="m",
                           body_id="cmpl-2", created=7, decode=decode)
    assert body["object"] == "text_completion"
    assert [(c["index"], c["text"], c["logprobs"]) for c in body["choices"]] == [(0, "The a", None), (1, "The b", None)]
    assert body["usage"]["completion_tokens"] == 3
    comp_lp = F.completion_logprobs([5, 6], [{5: -0.1, 7: -3.0}, {6: -0.2}], 1, decode)
    assert comp_lp == {"tokens": ["<5>", "<6>"], "token_logprobs": [-0.1, -0.2],
                       "top_logprobs": [{"<5>": -0.1}, {"<6>": -0.2}], "text_offset": [0, 3]}

    err = F.error_record(F.record_id("job", 12), None, "req-12", "invalid_json", "line 12 is not valid JSON")
    assert err["response"]["status_code"] == 400 and err["error"]["code"] == "invalid_json"
    assert err["response"]["body"]["error"]["message"] == err["error"]["message"] and F.lineno_of(err) == 12
    assert F.lineno_of({"id": "batch_abc"}) is None


def test_repair_torn_tail(tmp_path):
    p = tmp_path / "o.jsonl.partial"
    p.write_bytes(b'{"a":1}\n{"b":2}\n{"c":')
    fd = os.open(p, os.O_RDWR)
    try:
        assert B.repair_torn_tail(fd) == 5
    finally:
        os.close(fd)
    assert p.read_bytes() == b'{"a":1}\n{"b":2}\n'
    p.write_bytes(b'{"c":')                       # nothing complete at all
    fd = os.open(p, os.O_RDWR)
    B.repair_torn_tail(fd)
    os.close(fd)
    assert p.read_bytes() == b""


def test_usage_errors(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with pytest.raises(B.BatchUsageError, match="input file not found"):
        B.check_paths(str(inp), out)
    inp.write_text("hello\n")
    B.check_paths(str(inp), out)
    B.partial_path(out).write_text("")
    with pytest.raises(B.BatchUsageError, match="--resume"):
        B.check_paths(str(inp), out)
    B.check_paths(str(inp), out, resume=True)
    B.check_paths(str(inp), out, overwrite=True)
    B.partial_path(out).unlink()
    out.write_text("")
    with pytest.raises(B.BatchUsageError, match="--overwrite"):
        B.check_paths(str(inp), out)
    with pytest.raises(B.BatchUsageError, match="contradict"):
        B.check_paths(str(inp), out, resume=True, overwrite=True)
    assert B.sniff_format(b'  {"custom_id": 1}') == "jsonl" and B.sniff_format(b"Tell me a story") == "text"


def test_cli_usage_error_exit_2(tmp_path):
    """A usage error is reported before any model is loaded, with exit status 2."""
    r = subprocess.run([sys.executable, "-m", "kiln.entrypoints.cli", "batch", "-i", str(tmp_path / "nope.jsonl"),
                        "-o", str(tmp_path / "o.jsonl")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "input file not found" in r.stderr


# -- the job loop on a fake engine, no model ------------------------------------------------------
class _FakeTok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def apply_chat_template(self, messages):
        return self.encode(" ".join(m["content"] for m in messages))


class _FakeAsyncEngine:
    """The AsyncEngine face the serving core uses. encode: characters -> codes; the answer is the prompt's first
    3 token ids plus 1. Prompts holding "slow" finish last; "toolong" fails engine validation (as a too-long
    prompt does)."""

    def __init__(self):
        from types import SimpleNamespace as NS
        self.tokenizer = _FakeTok()
        self.engine = NS(config=NS(model=NS(model="fake"), scheduler=NS(max_num_seqs=2)), validate=self._validate)
        self.error = None
        self.served: list[str] = []

    @staticmethod
    def _validate(ids, params):
        if "toolong" in "".join(map(chr, ids)):
            raise ValueError("prompt is 9999 tokens; max_model_len is 256")

    async def generate(self, ids, params, request_id=None):
        import asyncio
        text = "".join(map(chr, ids))
        self.served.append(request_id)
        await asyncio.sleep(0.05 if "slow" in text else 0)
        toks = [i + 1 for i in ids[:3]]
        yield RequestOutput(request_id, text, ids, [CompletionOutput(0, self.tokenizer.decode(toks), toks,
                                                                      finish_reason="length")], finished=True)


def _fake_input(path: Path) -> list[str]:
    lines = [line(f"r{i}", F.COMPLETIONS_URL, {"prompt": ("slow " if i % 3 == 0 else "") + f"p{i}"})
             for i in range(12)]
    lines[4] = "{torn"
    lines[7] = line("r1", F.COMPLETIONS_URL, {"prompt": "dup"})
    lines[9] = line("r9", F.CHAT_URL, {"messages": [{"role": "user", "content": "toolong"}]})
    path.write_text("\n".join(lines[:6] + [""] + lines[6:]) + "\n")     # a blank line: no record
    return lines


def test_job_loop_resume_and_errors(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _fake_input(inp)
    eng = _FakeAsyncEngine()
    stats = B.run_batch(eng, str(inp), out, progress=False, max_in_flight=2)
    recs = read_records(out)
    assert not B.partial_path(out).exists()
    assert (stats.total, stats.ok, stats.failed) == (12, 9, 3) and len(recs) == 12
    by_line = {F.lineno_of(r): r for r in recs}
    assert sorted(by_line) == [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13]        # line 7 is blank
    assert by_line[5]["error"]["code"] == "invalid_json" and by_line[5]["custom_id"] is None
    assert by_line[9]["error"]["code"] == "duplicate_custom_id" and by_line[9]["custom_id"] == "r1"
    assert "max_model_len" in by_line[11]["error"]["message"]
    assert by_line[2]["response"]["body"]["choices"][0]["text"] == _FakeTok().decode([113, 50])  # "p1" + 1
    ok = {r["custom_id"]: r for r in recs if r["error"] is None}
    assert ok["r2"]["response"]["body"]["usage"]["prompt_tokens"] == 2
    order = [F.lineno_of(r) for r in recs]
    assert order != sorted(order)                                         # completion order, not input order

    # an existing output is refused; --resume of a finished job answers nothing again
    with pytest.raises(B.BatchUsageError):
        B.run_batch(_FakeAsyncEngine(), str(inp), out, progress=False)
    eng2 = _FakeAsyncEngine()
    st2 = B.run_batch(eng2, str(inp), out, resume=True, progress=False)
    assert eng2.served == [] and (st2.total, st2.resumed, st2.failed) == (12, 12, 3)
    assert read_records(out) == recs

    # a partial with some records, a torn tail: only the missing lines are served, once each
    part = B.partial_path(out)
    keep = recs[:5]
    out.unlink()
    part.write_text("".join(json.dumps(r) + "\n" for r in keep) + '{"id": "batch_req_x_3", "cust')
    eng3 = _FakeAsyncEngine()
    B.run_batch(eng3, str(inp), out, resume=True, progress=False)
    final = read_records(out)
    assert sorted(F.lineno_of(r) for r in final) == sorted(by_line)
    served_lines = {int(rid.rsplit("-", 1)[1]) for rid in eng3.served}
    assert not served_lines & {F.lineno_of(r) for r in keep}

    # resuming against a changed input is refused, and the partial is kept
    out.rename(part)
    inp.write_text(inp.read_text().replace('"r0"', '"zz"'))
    with pytest.raises(B.BatchUsageError, match="input was changed|was the input changed"):
        B.run_batch(_FakeAsyncEngine(), str(inp), out, resume=True, progress=False)
    assert part.exists() and not out.exists()


def test_text_input(tmp_path):
    inp, out = tmp_path / "prompts.txt", tmp_path / "out.jsonl"
    inp.write_text("first prompt\n\nsecond {prompt}\n")
    B.run_batch(_FakeAsyncEngine(), str(inp), out, progress=False)
    recs = sorted(read_records(out), key=F.lineno_of)
    assert [r["custom_id"] for r in recs] == ["line-1", "line-3"]
    assert all(r["response"]["body"]["object"] == "text_completion" for r in recs)


def test_stdin_input(tmp_path, monkeypatch):
    import io
    data = (line("a", F.COMPLETIONS_URL, {"prompt": "x"}) + "\n" + line("b", F.CHAT_URL, {"max_tokens": 1}) + "\n")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data.encode())))
    out = tmp_path / "out.jsonl"
    stats = B.run_batch(_FakeAsyncEngine(), "-", out)              # progress bar with an unknown total
    assert (stats.ok, stats.failed) == (1, 1) and len(read_records(out)) == 2


def test_job_on_the_mock_engine(tmp_path):
    """The job through the serving core on the mock engine: records equal the synchronous engine's outputs, a
    bogus chat role is the line's 400 naming the field, and an engine that dies aborts the job (resumable)."""
    from tests.serving.engines import kill_engine, mock_llm_engine
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = [line(f"c{i}", F.COMPLETIONS_URL, {"prompt": f"prompt {i}", "max_tokens": 5, "temperature": 0,
                                              "n": 1 + i % 2}) for i in range(6)]
    good[0] = line("c0", F.COMPLETIONS_URL, {"model": "mock", "prompt": "prompt 0", "max_tokens": 5,
                                             "temperature": 0, "n": 1})     # the served model, by name
    inp.write_text("\n".join(good + [line("bad", F.CHAT_URL, {"messages": [{"role": "bogus", "content": "x"}]}),
                                     line("other", F.COMPLETIONS_URL, {"model": "gpt-4o", "prompt": "x"})]) + "\n")
    eng = mock_llm_engine(max_num_seqs=4)
    stats = B.run_batch(eng, str(inp), out, progress=False)
    assert (stats.ok, stats.failed) == (6, 2)
    recs = {r["custom_id"]: r for r in read_records(out)}
    other = recs["other"]     # the HTTP API's answer to an unknown model
    assert other["response"]["status_code"] == 404 and other["error"]["code"] == "model_not_found"
    assert other["response"]["body"]["error"]["code"] == "model_not_found" and "gpt-4o" in other["error"]["message"]
    assert recs["bad"]["response"]["status_code"] == 400 and "messages[0].role" in recs["bad"]["error"]["message"]
    for i in range(6):
        ref = eng.add_request(f"prompt {i}", SamplingParams(max_tokens=5, temperature=0, n=1 + i % 2))
        done = None
        while done is None:
            done = next((o for o in eng.step() if o.request_id == ref and o.finished), None)
        got = [c["text"] for c in recs[f"c{i}"]["response"]["body"]["choices"]]
        assert got == [c.text for c in done.outputs]
    kill_engine(eng)
    with pytest.raises(B.BatchAborted, match="--resume"):
        B.run_batch(eng, str(inp), tmp_path / "again.jsonl", progress=False)
    assert B.partial_path(tmp_path / "again.jsonl").exists()


# -- real jobs on the default model ---------------------------------------------------------------
WORDS = ["robot", "kiln", "river", "garden", "violin", "comet", "lantern", "harbor", "meadow", "engine"]


def _mixed_job(n_total: int = 140, seed: int = 0, n_each_bad: int = 3):
    """(input lines, expected) for a mixed job: expected[custom_id] = ("chat" | "completion", prompt, params)
    for good lines, or ("error", code) for bad ones. Blank lines are sprinkled in (no record)."""
    rng = random.Random(seed)
    lines, expected = [], {}
    bad_kinds = ["json", "url", "params", "too_long", "dup", "no_body", "no_messages", "no_custom_id"]
    n_bad = n_each_bad * len(bad_kinds)
    n_bad += 5 - n_each_bad                          # five bad-params lines: one for each of the five values
    kinds = ["bad:" + k for k in bad_kinds for _ in range(5 if k == "params" else n_each_bad)]
    kinds += ["good"] * (n_total - n_bad)
    rng.shuffle(kinds)
    good_ids: list[str] = []
    n_params = 0
    for i, kind in enumerate(kinds):
        cid = f"req-{i}"
        w = rng.choice(WORDS)
        if kind == "good" or (kind == "bad:dup" and not good_ids):
            chat = i % 2 == 0
            body: dict = {"max_tokens": 8}          # no model: the served one (a wrong one is a 404)
            sp = dict(max_tokens=8, temperature=0.0)
            variant = i % 5
            if variant == 1:
                body.update(temperature=0.8, top_p=0.9, top_k=20, seed=i)
                sp.update(temperature=0.8, top_p=0.9, top_k=20, seed=i)
            elif variant == 2:
                body.update(temperature=0, repetition_penalty=1.3, presence_penalty=0.5, stop=["."])
                sp.update(repetition_penalty=1.3, presence_penalty=0.5, stop=["."])
            elif variant == 3:
                body.update(temperature=0, ignore_eos=True, min_tokens=4, logit_bias={"13": -100})
                sp.update(ignore_eos=True, min_tokens=4, logit_bias={13: -100.0})
            elif variant == 4:
                body.update(temperature=0.7, seed=100 + i, n=2, min_p=0.05)
                sp.update(temperature=0.7, seed=100 + i, n=2, min_p=0.05)
            else:
                body.update(temperature=0)
            if i % 7 == 0:
                body.update(logprobs=True, top_logprobs=2) if chat else body.update(logprobs=2)
                sp.update(logprobs=2)
            if chat:
                msgs = [{"role": "user", "content": f"Write one sentence about a {w} (#{i})."}]
                body["messages"] = msgs
                lines.append(line(cid, F.CHAT_URL, body))
                expected[cid] = ("chat", msgs, SamplingParams(**sp))
            else:
                # ~37 tokens: the same prefill bucket (64) as the chat prompts, so fewer graphs to compile
                prompt = (f"Here is a short note about the {w} number {i}, written for a school newsletter by a "
                          f"student who likes science, music and long walks by the river on quiet Sunday mornings:")
                body["prompt"] = prompt
                lines.append(line(cid, F.COMPLETIONS_URL, body))
                expected[cid] = ("completion", prompt, SamplingParams(**sp))
            good_ids.append(cid)
            continue
        k = kind[4:]
        if k == "json":
            lines.append('{"custom_id": "%s", "method": "POST", "url": ' % cid)
            expected[f"@{i}"] = ("error", "invalid_json")
            continue
        if k == "no_custom_id":
            lines.append(json.dumps({"method": "POST", "url": F.COMPLETIONS_URL, "body": {"prompt": "x"}}))
            expected[f"@{i}"] = ("error", "missing_custom_id")
            continue
        if k == "dup":
            lines.append(line(rng.choice(good_ids), F.COMPLETIONS_URL, {"prompt": "again", "max_tokens": 8}))
            expected[f"@{i}"] = ("error", "duplicate_custom_id")
            continue
        code = "invalid_url" if k == "url" else "invalid_request"
        if k == "url":
            lines.append(line(cid, "/v1/audio/speech", {"input": "x"}))
        elif k == "params":
            bad = [{"temperature": -1}, {"top_p": 0}, {"n": 0}, {"logprobs": 50}, {"max_tokens": 0}][n_params % 5]
            n_params += 1
            lines.append(line(cid, F.COMPLETIONS_URL, {"prompt": "x", **bad}))
        elif k == "too_long":
            lines.append(line(cid, F.COMPLETIONS_URL, {"prompt": "lorem ipsum " * 200, "max_tokens": 8}))
        elif k == "no_body":
            lines.append(json.dumps({"custom_id": cid, "method": "POST", "url": F.CHAT_URL}))
        else:
            lines.append(line(cid, F.CHAT_URL, {"max_tokens": 8}))
        expected[cid] = ("error", code)
    for j in sorted(rng.sample(range(len(lines)), 5), reverse=True):
        lines.insert(j, "")
    return lines, expected


@pytest.fixture(scope="module")
def llm(default_gguf):
    import kiln
    return kiln.LLM(model=str(default_gguf), **ENGINE)


@pytest.fixture(scope="module")
def mixed(llm, tmp_path_factory):
    """The 140-line mixed job, run once in-process on the module's engine (the kill test reuses its results)."""
    import contextlib
    import io
    lines, expected = _mixed_job()
    d = tmp_path_factory.mktemp("batch")
    inp, out = d / "requests.jsonl", d / "results.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        stats = B.run_batch(llm.engine, str(inp), out)
    return dict(lines=lines, expected=expected, stats=stats, stderr=err.getvalue(), recs=read_records(out))


def _check_against_llm(llm, recs: list[dict], expected: dict) -> None:
    """Every good greedy record equals what LLM.generate / LLM.chat gives for the same input and params."""
    good = {r["custom_id"]: r for r in recs if r["error"] is None}
    greedy = {c: e for c, e in expected.items() if e[0] != "error" and e[2].greedy}
    comp = [c for c, e in greedy.items() if e[0] == "completion"]
    chat = [c for c, e in greedy.items() if e[0] == "chat"]
    assert len(comp) > 25 and len(chat) > 25
    ref = dict(zip(comp, llm.generate([expected[c][1] for c in comp], [expected[c][2] for c in comp])))
    ref.update(zip(chat, llm.chat([expected[c][1] for c in chat], [expected[c][2] for c in chat])))
    for cid, out in ref.items():
        body = good[cid]["response"]["body"]
        got = [c["message"]["content"] if "message" in c else c["text"] for c in body["choices"]]
        assert got == [o.text for o in out.outputs], cid
        assert [c["finish_reason"] for c in body["choices"]] == [o.finish_reason for o in out.outputs], cid
        assert body["usage"]["prompt_tokens"] == len(out.prompt_token_ids), cid
        assert body["usage"]["completion_tokens"] == sum(len(o.token_ids) for o in out.outputs), cid


@pytest.mark.slow
def test_mixed_job_matches_llm(llm, mixed):
    lines, expected, stats, recs = mixed["lines"], mixed["expected"], mixed["stats"], mixed["recs"]
    assert "kiln batch" in mixed["stderr"]                # the progress bar
    n_lines = sum(1 for x in lines if x.strip())
    assert n_lines == 140 and len(recs) == 140 and stats.total == 140
    assert sorted(F.lineno_of(r) for r in recs) == [i + 1 for i, x in enumerate(lines) if x.strip()]
    by_cid: dict[str, dict] = {}
    by_line = {F.lineno_of(r): r for r in recs}
    for i, x in enumerate(lines):
        if x.strip() and by_line[i + 1]["error"] is None:
            by_cid[by_line[i + 1]["custom_id"]] = by_line[i + 1]
    errors = [r for r in recs if r["error"] is not None]
    want_err = sorted(e[1] for e in expected.values() if e[0] == "error")
    assert sorted(r["error"]["code"] for r in errors) == want_err
    assert stats.failed == len(want_err) == 26 and stats.ok == 114
    for r in errors:
        assert r["response"]["status_code"] == 400 and r["error"]["message"]
    msgs = " | ".join(r["error"]["message"] for r in errors)
    for needle in ("max_model_len", "temperature must be non-negative", "top_p must be in (0, 1]",
                   "n must be at least 1", "logprobs must be in", "max_tokens must be at least 1",
                   "messages must be a non-empty list", "body must be a JSON object", "not valid JSON",
                   "is used by an earlier line", "url must be one of", "custom_id must be a non-empty string"):
        assert needle in msgs, needle
    for r in by_cid.values():
        body = r["response"]["body"]
        assert r["response"]["status_code"] == 200 and body["model"] == llm.engine.config.model.model
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    lp = [r for cid, r in by_cid.items() if expected[cid][2].logprobs is not None]
    assert lp
    for r in lp:
        body = r["response"]["body"]
        if body["object"] == "chat.completion":
            content = [t for c in body["choices"] for t in c["logprobs"]["content"]]
            assert all(len(t["top_logprobs"]) == 2 for t in content)
        else:
            content = [t for c in body["choices"] for t in c["logprobs"]["tokens"]]
            assert all(len(t) <= 2 for c in body["choices"] for t in c["logprobs"]["top_logprobs"])
        assert len(content) == body["usage"]["completion_tokens"]
    _check_against_llm(llm, recs, expected)


def _env() -> dict:
    env = dict(os.environ)             # conftest's KILN_MODELS_DIR, per-session KILN_CACHE_DIR, KILN_SKIP_WARMUP
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_sigkill_then_resume(mixed, default_hf_dir, tmp_path):
    """Kill a CLI job with SIGKILL mid-way, tear its last line, resume: one record per line, same content
    as the uninterrupted in-process run of the same lines (the mixed job; line numbers are the same)."""
    lines = mixed["lines"][:50]
    want = {F.lineno_of(r): r for r in mixed["recs"] if F.lineno_of(r) <= len(lines)}
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    n_lines = sum(1 for x in lines if x.strip())
    assert len(want) == n_lines and any(r["error"] for r in want.values())
    part = B.partial_path(out)
    cmd = [sys.executable, "-m", "kiln.entrypoints.cli", "--log-level", "WARNING", "batch", "-i", str(inp),
           "-o", str(out), "--model", str(default_hf_dir), *ENGINE_FLAGS, "--no-progress"]
    proc = subprocess.Popen(cmd + ["--max-in-flight", "1"], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if part.exists() and part.read_bytes().count(b"\n") >= 12:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    done_before = part.read_bytes().count(b"\n")
    assert 12 <= done_before < n_lines
    with open(part, "ab") as f:                                   # a record torn mid-write
        f.write(b'{"id":"batch_req_deadbeef_7","custom_id":"req-')

    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--resume" in r.stderr           # without --resume the partial is not touched
    r = subprocess.run(cmd + ["--resume"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]                    # the input holds bad lines
    assert f"{n_lines} records" in r.stderr and f"{done_before} from before the resume" in r.stderr
    assert not part.exists()
    recs = read_records(out)                                      # every line is valid JSON
    got = {F.lineno_of(r): r for r in recs}
    assert len(recs) == len(got) == n_lines and got.keys() == want.keys()
    ok_ids = [r["custom_id"] for r in recs if r["error"] is None]
    assert len(ok_ids) == len(set(ok_ids))
    for n, w in want.items():
        g = got[n]
        assert g["custom_id"] == w["custom_id"], n
        assert (g["error"] or {}).get("code") == (w["error"] or {}).get("code"), n
        if w["error"] is None:
            _assert_same_choices(g["response"]["body"]["choices"], w["response"]["body"]["choices"])
            assert g["response"]["body"]["usage"] == w["response"]["body"]["usage"], n


def _assert_same_choices(got: list[dict], want: list[dict]) -> None:
    """Equal text, tokens and finish reasons; logprob values equal up to float noise (other batch shapes)."""
    def split(x):
        if isinstance(x, float):
            return "<float>", [x]
        if isinstance(x, dict):
            parts = {k: split(v) for k, v in x.items()}
            return {k: v[0] for k, v in parts.items()}, [f for v in parts.values() for f in v[1]]
        if isinstance(x, list):
            parts = [split(v) for v in x]
            return [v[0] for v in parts], [f for v in parts for f in v[1]]
        return x, []
    (gs, gf), (ws, wf) = split(got), split(want)
    assert gs == ws
    assert gf == pytest.approx(wf, abs=2e-3)
