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
