"""Hostile clients, on the mock engine over loopback: mutual TLS (a client certificate from the right CA is served;
none, or one from another CA, fails the handshake on gRPC and HTTP), secrets and prompt bodies never reaching the
logs, and `prompt_token_ids` unable to slip past --max-model-len on any path (HTTP, gRPC, batch).

Certificates are made here with the `openssl` command line: a CA, a server certificate for 127.0.0.1/localhost
signed by it, a client certificate signed by it, and a client certificate of an unrelated CA.
"""
from __future__ import annotations

import json
import logging
import re
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from kiln.backends.mock import next_token
from kiln.entrypoints.client import KilnClient
from tests.entrypoints.serving import Servers, wait_idle
from tests.serving.engines import mock_async_engine

MAX_LEN = 64


@pytest.fixture(scope="module")
def engine():
    ae = mock_async_engine(max_num_seqs=8, max_model_len=MAX_LEN, num_blocks=256)
    yield ae
    ae.shutdown()


def hand_tokens(engine, prompt: str, n: int) -> list[int]:
    """The mock runner's greedy continuation of `prompt`: (3 * last + pos + 1) % vocab, up to EOS."""
    ids, vocab, eos = engine.tokenizer.encode(prompt), engine.engine.spec.vocab_size, engine.engine.spec.eos_token_ids
    out, last, pos = [], ids[-1], len(ids) - 1
    for _ in range(n):
        out.append(next_token(last, pos, vocab))
        if out[-1] in eos:
            break
        last, pos = out[-1], pos + 1
    return out


# -- mutual TLS -------------------------------------------------------------------------------------
def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    cert, key = d / f"{name}.pem", d / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _leaf(d: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    cert, key, csr, extfile = d / f"{name}.pem", d / f"{name}.key", d / f"{name}.csr", d / f"{name}.ext"
    extfile.write_text(ext + "\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-set_serial",
             str(abs(hash(name)) % 10**9 + 1), "-days", "1", "-out", str(cert), "-extfile", str(extfile))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("pki")
    ca, other = _ca(d, "kiln-test-ca"), _ca(d, "other-ca")
    return {"ca": ca, "server": _leaf(d, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                                           "extendedKeyUsage=serverAuth"),
            "client": _leaf(d, "client", ca, "extendedKeyUsage=clientAuth"),
            "stranger": _leaf(d, "stranger", other, "extendedKeyUsage=clientAuth")}


def _https(port: int, ca: Path, cert: tuple[Path, Path] | None) -> dict:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    body = json.dumps({"prompt": "mtls", "max_tokens": 3, "temperature": 0}).encode()
    req = urllib.request.Request(f"https://127.0.0.1:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=ctx, timeout=20) as r:
        return json.loads(r.read())


def test_mutual_tls_serves_only_clients_of_the_ca(engine, pki, capsys):
    """--tls-client-ca: the CA's client certificate is served (gRPC, the `kiln client` CLI, HTTP); no certificate
    or a certificate of another CA fails the handshake (gRPC UNAVAILABLE, HTTP a TLS error)."""
    from kiln.entrypoints.args import options_from_args
    from kiln.entrypoints.cli import build_parser, main
    ca, (cert, key) = pki["ca"][0], pki["server"]
    opts = options_from_args(build_parser().parse_args([
        "serve", "--port", "0", "--http-port", "0", "--tls-cert", str(cert), "--tls-key", str(key),
        "--tls-client-ca", str(ca)]))
    assert opts.tls_client_ca == str(ca)
    want = hand_tokens(engine, "mtls", 3)
    s = Servers(engine, http=True, tls_cert=opts.tls_cert, tls_key=opts.tls_key, tls_client_ca=opts.tls_client_ca)
    try:
        good = dict(tls_ca=str(ca), tls_cert=str(pki["client"][0]), tls_key=str(pki["client"][1]))
        with KilnClient(s.target, **good) as c:
            assert list(c.generate_unary("mtls", max_tokens=3, temperature=0, timeout=20)
                        .completions[0].token_ids) == want
        assert main(["client", "mtls", "--target", s.target, "--max-tokens", "3", "--tls-ca", good["tls_ca"],
                     "--tls-cert", good["tls_cert"], "--tls-key", good["tls_key"]]) == 0
        assert capsys.readouterr().out == engine.tokenizer.decode(want) + "\n"
        refused = [dict(tls_ca=str(ca)),
                   dict(tls_ca=str(ca), tls_cert=str(pki["stranger"][0]), tls_key=str(pki["stranger"][1]))]
        for kw in refused:
            with KilnClient(s.target, **kw) as c:
                with pytest.raises(grpc.RpcError) as e:
                    c.generate_unary("mtls", max_tokens=3, timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE, kw
        assert _https(s.http_port, ca, pki["client"])["choices"][0]["text"] == engine.tokenizer.decode(want)
        for client_cert in (None, pki["stranger"]):
            with pytest.raises(OSError):        # ssl.SSLError, a reset, or urllib's URLError around them
                _https(s.http_port, ca, client_cert)
        wait_idle(engine)
    finally:
        s.close()
    with pytest.raises(ValueError, match="--tls-client-ca needs --tls-cert"):
        options_from_args(build_parser().parse_args(["serve", "--tls-client-ca", str(ca)]))
    with pytest.raises(ValueError, match="go together"):
        KilnClient(s.target, tls_ca=str(ca), tls_cert=str(pki["client"][0]))


# -- secrets and bodies never in the logs -----------------------------------------------------------
SECRET_PROMPT = "zebra-quartz-umbrella 7731"       # distinctive: appears nowhere in kiln's own messages
KEY, WRONG_KEY, FILE_KEY = "sk-right-Q9x7Vw2", "sk-wrong-Jd8Lp0", "sk-from-a-file-M3nb6"


def _serve_in_process(argv: list[str], caplog):
    """`kiln serve ARGV` as serve() runs it, on the test server loop with a mock engine; yields (grpc target, HTTP
    base) once it has logged `ready`, and stops it (a drain) on the way out."""
    import asyncio
    import time
    from kiln.entrypoints.args import options_from_args
    from kiln.entrypoints.cli import build_parser
    from kiln.entrypoints.serve import serve
    from tests.entrypoints.serving import server_loop
    from tests.serving.engines import mock_llm_engine
    opts = options_from_args(build_parser().parse_args(["serve", "--port", "0", "--http-port", "0", *argv]))
    loop = server_loop()
    stop = asyncio.Event()
    done = asyncio.run_coroutine_threadsafe(
        serve(opts, {"model": "mock"}, build=lambda: mock_llm_engine(max_num_seqs=4, max_model_len=MAX_LEN),
              stop=stop), loop)
    deadline = time.monotonic() + 60
    while not any(r.getMessage().startswith("ready") for r in caplog.records):
        assert time.monotonic() < deadline and not done.done(), caplog.text
        time.sleep(0.02)
    text = "\n".join(r.getMessage() for r in caplog.records)
    grpc_port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", text).group(1))
    http_port = int(re.search(r"HTTP API on http://127\.0\.0\.1:(\d+)", text).group(1))

    def stop_it() -> int:
        loop.call_soon_threadsafe(stop.set)
        return done.result(30)
    return f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", stop_it


def _post(base: str, path: str, body: dict | bytes, key: str | None) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(base + path, data, headers), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _traffic(target: str, base: str, key: str) -> None:
    """Requests carrying SECRET_PROMPT, with the right key, a wrong one and none, over both transports; good and
    bad input; a stream the client leaves early."""
    chat = [{"role": "user", "content": SECRET_PROMPT}]
    for k, want in ((key, 200), (WRONG_KEY, 401), (None, 401)):
        assert _post(base, "/v1/completions", {"prompt": SECRET_PROMPT, "max_tokens": 3}, k)[0] == want
        assert _post(base, "/v1/chat/completions", {"messages": chat, "max_tokens": 3, "stream": True}, k)[0] == want
    bad = [{"prompt": SECRET_PROMPT, "max_tokens": -1}, {"prompt": SECRET_PROMPT * 40, "max_tokens": 3},
           {"messages": [{"role": SECRET_PROMPT, "content": SECRET_PROMPT}]}]
    for body in bad:
        assert _post(base, "/v1/completions" if "prompt" in body else "/v1/chat/completions", body, key)[0] == 400
    assert _post(base, "/v1/completions", f'{{"prompt": "{SECRET_PROMPT}", '.encode(), key)[0] == 400
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    r = urllib.request.urlopen(urllib.request.Request(base + "/v1/completions", json.dumps(
        {"prompt": SECRET_PROMPT, "max_tokens": 40, "stream": True}).encode(), headers), timeout=30)
    r.readline()
    r.close()                                           # gone mid-stream
    with KilnClient(target, api_key=key) as c:
        assert c.generate_unary(SECRET_PROMPT, max_tokens=3).completions[0].token_ids
        assert "".join(d.text for d in c.generate(chat, max_tokens=3)) is not None
        assert c.tokenize(SECRET_PROMPT)
        for bad_prompt in (SECRET_PROMPT * 40, [{"role": SECRET_PROMPT, "content": SECRET_PROMPT}]):
            with pytest.raises(grpc.RpcError) as e:
                c.generate_unary(bad_prompt, max_tokens=3)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for k in (WRONG_KEY, None):
        with KilnClient(target, api_key=k) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.generate_unary(SECRET_PROMPT, max_tokens=3)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _leaks(caplog, capfd, secrets: list[str]) -> list[str]:
    """Every log record at INFO or above (message, arguments, traceback) and every byte written to the process's
    stdout/stderr that contains one of `secrets`."""
    found = []
    for r in caplog.records:
        if r.levelno < logging.INFO:
            continue
        text = r.getMessage() + (logging.Formatter().formatException(r.exc_info) if r.exc_info else "") + \
            (r.stack_info or "")
        found += [f"{r.name} {r.levelname}: {text[:300]}" for s in secrets if s in text]
    out, err = capfd.readouterr()
    found += [f"stdio: ...{s}..." for s in secrets if s in out + err]
    return found


def test_keys_and_prompts_never_reach_the_logs(tmp_path, caplog, capfd):
    """`kiln serve --api-key` and `--api-key-file` (INFO logging, as the CLI sets it): a session of requests with a
    distinctive prompt and right, wrong and missing keys leaves neither the keys nor the prompt in any log record
    at INFO or above, nor on stdout/stderr; the logs are not empty (so the capture works). The options' repr
    leaves the key out, should they ever be logged."""
    from kiln.entrypoints.args import options_from_args
    from kiln.entrypoints.cli import build_parser
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="kiln")
    key_file = tmp_path / "key"
    key_file.write_text(FILE_KEY + "\n")
    for argv, key in ((["--api-key", KEY], KEY), (["--api-key-file", str(key_file)], FILE_KEY)):
        opts = options_from_args(build_parser().parse_args(["serve", *argv]))
        assert opts.api_key == key and key not in repr(opts) and key not in repr(opts.serving())
        caplog.clear()
        target, base, stop = _serve_in_process(argv, caplog)
        try:
            _traffic(target, base, key)
        finally:
            assert stop() == 0
        assert any(r.name.startswith("kiln") and "listening on" in r.getMessage() for r in caplog.records)
        assert _leaks(caplog, capfd, [KEY, WRONG_KEY, FILE_KEY, SECRET_PROMPT]) == []


# -- prompt_token_ids cannot slip past --max-model-len --------------------------------------------
def _too_long(message: str, n: int) -> None:
    assert message.startswith(f"prompt is {n} tokens; max_model_len is {MAX_LEN}"), message


def test_token_ids_are_held_to_max_model_len(engine, tmp_path):
    """A prompt given as token ids gets the same check as text: HTTP completions (one prompt, or one of several),
    gRPC token_ids and a batch line each refuse a list of max_model_len or more ids with 400 / INVALID_ARGUMENT /
    an invalid_request record naming the prompt and the limit; one id shorter is served."""
    from kiln.entrypoints import batch as B
    from kiln.entrypoints import batch_format as F
    from tests.serving.engines import mock_llm_engine
    ok, long_ids, exact = [5] * (MAX_LEN - 1), [7] * (MAX_LEN + 36), [7] * MAX_LEN
    s = Servers(engine, http=True)
    try:
        for prompt, n in ((long_ids, len(long_ids)), (exact, MAX_LEN), ([ok[:3], long_ids], len(long_ids))):
            status, raw = _post(s.base, "/v1/completions", {"prompt": prompt, "max_tokens": 1}, None)
            err = json.loads(raw)["error"]
            assert (status, err["param"], err["type"]) == (400, "prompt", "invalid_request_error"), raw
            _too_long(err["message"], n)
        status, raw = _post(s.base, "/v1/completions", {"prompt": ok, "max_tokens": 4}, None)
        assert status == 200 and json.loads(raw)["choices"][0]["finish_reason"] == "length", raw
        with KilnClient(s.target) as c:
            for ids in (long_ids, exact):
                with pytest.raises(grpc.RpcError) as e:
                    c.generate_unary(ids, max_tokens=1, timeout=20)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                _too_long(e.value.details(), len(ids))
                with pytest.raises(grpc.RpcError) as e:
                    list(c.generate(ids, max_tokens=1, timeout=20))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len(c.generate_unary(ok, max_tokens=4, timeout=20).completions[0].token_ids) == 1
        wait_idle(engine)
    finally:
        s.close()
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [("long", long_ids), ("exact", exact), ("one-of-one", [long_ids]), ("ok", ok[:8])]
    inp.write_text("".join(json.dumps({"custom_id": cid, "method": "POST", "url": F.COMPLETIONS_URL,
                                       "body": {"prompt": p, "max_tokens": 2}}) + "\n" for cid, p in lines))
    stats = B.run_batch(mock_llm_engine(max_num_seqs=4, max_model_len=MAX_LEN), str(inp), out, progress=False)
    records = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert (stats.ok, stats.failed) == (1, 3) and records["ok"]["error"] is None
    for cid, n in (("long", len(long_ids)), ("exact", MAX_LEN), ("one-of-one", len(long_ids))):
        assert records[cid]["error"]["code"] == "invalid_request"
        assert records[cid]["response"]["status_code"] == 400
        _too_long(records[cid]["error"]["message"], n)
