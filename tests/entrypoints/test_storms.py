"""Cancel and overload storms over real loopback sockets, on the mock engine with slowed steps (streams last a while).

200 clients at once on each transport (a thread each) against max_num_seqs 16 and --max-queued 32, so the server
admits 48 sequences at a time and refuses the rest. A seeded random half of the clients close their stream after
a few chunks; some of the others are slow consumers (read one chunk, stop reading for a while, read the rest).

    refused                      429 / RESOURCE_EXHAUSTED, with a message naming --max-queued
    admitted, not cancelled      the hand-computed text, finish `length`, within a latency bound derived from
                                 steps x step_seconds (printed)
    afterwards                   every KV block free (engine stats and the /metrics gauge kiln_kv_blocks_used),
                                 no admitted slot left, the in-flight registry empty

A last test stalls a consumer for good while a long answer is produced: the engine finishes the request at its
own pace and its admission slot and blocks are freed without waiting for the consumer, which then gets the whole
text (the serving core keeps only the newest cumulative output for a consumer that fell behind). And a storm with
poisoned rows (steps that hold them raise) fails exactly those requests mid-stream, on both transports, while
every other stream completes and the server serves on.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from kiln.backends.mock import next_token
from kiln.entrypoints.client import KilnClient
from tests.entrypoints.serving import Servers, wait_idle
from tests.serving.engines import mock_async_engine

CLIENTS, MAX_NUM_SEQS, MAX_QUEUED = 200, 16, 32
MAX_TOKENS, STEP_SECONDS, SLOW_SECONDS = 24, 0.005, 0.5
ARRIVALS = 1.0                                     # seconds over which the clients arrive
POISON = 4242                                      # the seed of requests whose rows make a step raise
CANCEL_AFTER = 3                                   # chunks a cancelling client reads before it closes


@pytest.fixture(scope="module")
def engine():
    ae = mock_async_engine(max_num_seqs=MAX_NUM_SEQS, max_model_len=1024, num_blocks=512)
    yield ae
    ae.shutdown()


def prompt(i: int) -> str:
    return f"storm {i}: tell me a story"


def hand_text(engine, text: str, n: int) -> str:
    """The mock runner's greedy continuation: token (3 * last + pos + 1) % vocab, n tokens (ignore_eos)."""
    ids, vocab = engine.tokenizer.encode(text), engine.engine.spec.vocab_size
    out, last, pos = [], ids[-1], len(ids) - 1
    for _ in range(n):
        out.append(next_token(last, pos, vocab))
        last, pos = out[-1], pos + 1
    return engine.tokenizer.decode(out)


def roles(seed: int) -> tuple[list[str], list[float]]:
    """A seeded random half cancel; every fourth of the rest is a slow consumer. Arrivals are spread over
    ARRIVALS seconds, so that slots freed by finished and cancelled streams admit later arrivals."""
    rng = random.Random(seed)
    cancel = set(rng.sample(range(CLIENTS), CLIENTS // 2))
    keep = [i for i in range(CLIENTS) if i not in cancel]
    slow = set(keep[::4])
    who = ["cancel" if i in cancel else "slow" if i in slow else "read" for i in range(CLIENTS)]
    return who, [rng.uniform(0, ARRIVALS) for _ in range(CLIENTS)]


def http_client(port: int, i: int, role: str, delay: float, go: threading.Barrier, seed: int | None = None) -> tuple:
    body = json.dumps({"prompt": prompt(i), "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                       "stream": True, "seed": seed})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        go.wait()
        time.sleep(delay)
        t0 = time.monotonic()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            return "refused", r.status, json.loads(r.read())["error"]["message"]
        text, chunks, finish = "", 0, None
        for line in r:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return "error", 0, chunk["error"]["message"]
            text += chunk["choices"][0]["text"]
            finish = chunk["choices"][0]["finish_reason"] or finish
            chunks += 1
            if role == "cancel" and chunks == CANCEL_AFTER:
                return "cancelled", 0, text
            if role == "slow" and chunks == 1:
                time.sleep(SLOW_SECONDS)
        return "done", finish, text, time.monotonic() - t0, chunks
    finally:
        conn.close()                # for a cancelling client: gone mid-stream


def grpc_client(channels: list[grpc.Channel], i: int, role: str, delay: float, go: threading.Barrier,
                seed: int | None = None) -> tuple:
    c = KilnClient.__new__(KilnClient)          # share a few channels instead of 200 connections
    c.channel = channels[i % len(channels)]
    from kiln.proto import inference_pb2_grpc as pb_grpc
    c.stub, c.metadata = pb_grpc.InferenceStub(c.channel), ()
    go.wait()
    time.sleep(delay)
    t0 = time.monotonic()
    call = c.generate(prompt(i), temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, seed=seed, timeout=60)
    text, chunks, finish = "", 0, None
    try:
        for d in call:
            text += d.text
            finish = d.finish_reason or finish
            chunks += 1
            if role == "cancel" and chunks == CANCEL_AFTER:
                call.cancel()
                return "cancelled", 0, text
            if role == "slow" and chunks == 1:
                time.sleep(SLOW_SECONDS)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return "refused", 429, e.details()
        return "error", e.code().name, e.details()
    return "done", finish, text, time.monotonic() - t0, chunks


def check_storm(engine, s: Servers, results: list[tuple], who: list[str], scrape) -> None:
    kinds = [r[0] for r in results]
    counts = {k: kinds.count(k) for k in ("done", "cancelled", "refused", "error")}
    # a request waits for at most capacity / max_num_seqs rounds of the running batch, each a prefill and
    # MAX_TOKENS decode steps; x10 for a loaded 2-core machine, plus the slow consumers' pause and startup
    steps = -(-(MAX_NUM_SEQS + MAX_QUEUED) // MAX_NUM_SEQS) * (MAX_TOKENS + 1)
    bound = 10 * steps * STEP_SECONDS + SLOW_SECONDS + 5.0
    done = [r[3] for r in results if r[0] == "done"]
    print(f"\n{counts}; {steps} steps x {STEP_SECONDS}s -> bound {bound:.2f}s; completed streams took "
          f"max {max(done):.2f}s, mean {sum(done) / len(done):.2f}s")
    assert counts["error"] == 0, [r for r in results if r[0] == "error"][:3]
    assert counts["refused"] > 0 and counts["done"] > MAX_NUM_SEQS // 2 and counts["cancelled"] > 0, counts
    for r in results:
        if r[0] == "refused":
            assert r[1] == 429 and "max-queued" in r[2], r
    for i, r in enumerate(results):
        if r[0] == "done":
            # a cancelling client reads CANCEL_AFTER chunks, unless a slow read let the server coalesce the
            # whole stream into fewer (serving/latest.py): then it has all of it
            assert who[i] != "cancel" or r[4] < CANCEL_AFTER, r
            assert r[1] == "length" and r[2] == hand_text(engine, prompt(i), MAX_TOKENS), r
            assert r[3] < bound, (i, who[i], r[3], bound)
        if r[0] == "cancelled":
            assert hand_text(engine, prompt(i), MAX_TOKENS).startswith(r[2])
    assert any(r[0] == "done" and who[i] == "slow" for i, r in enumerate(results))
    st = wait_idle(engine)
    assert st["blocks_used"] == 0
    deadline = time.monotonic() + 10          # handlers of closed streams unwind on the server loop
    while (len(s.core.inflight) or s.core.admission.used) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(s.core.inflight) == 0 and s.core.admission.used == 0
    m = re.search(r"^kiln_kv_blocks_used (\S+)$", scrape(), re.M)
    assert m and float(m.group(1)) == 0


def test_http_storm(engine):
    s = Servers(engine, grpc=False, http=True, max_queued=MAX_QUEUED)
    engine.engine.runner.step_seconds = STEP_SECONDS
    (who, delays), go = roles(1), threading.Barrier(CLIENTS, timeout=60)
    try:
        with ThreadPoolExecutor(CLIENTS) as ex:
            results = list(ex.map(lambda i: http_client(s.http_port, i, who[i], delays[i], go), range(CLIENTS)))
        check_storm(engine, s, results, who, lambda: s.get("/metrics")[1])
    finally:
        engine.engine.runner.step_seconds = 0.0
        s.close()


def test_grpc_storm(engine):
    s = Servers(engine, metrics_port=0, max_queued=MAX_QUEUED)
    engine.engine.runner.step_seconds = STEP_SECONDS
    (who, delays), go = roles(2), threading.Barrier(CLIENTS, timeout=60)
    channels = [grpc.insecure_channel(s.target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(8)]
    try:
        with ThreadPoolExecutor(CLIENTS) as ex:
            results = list(ex.map(lambda i: grpc_client(channels, i, who[i], delays[i], go), range(CLIENTS)))
        check_storm(engine, s, results, who, s.scrape)
    finally:
        for ch in channels:
            ch.close()
        engine.engine.runner.step_seconds = 0.0
        s.close()



def test_a_stalled_consumer_holds_no_engine_resources(engine):
    """A transport that stops taking outputs (its client stopped reading and the socket buffers are full; on
    loopback they hold megabytes, so this drives the core's stream directly): the engine still finishes the
    request at full speed, its blocks and admission slot are freed and the engine queues nothing for it
    (num_pending 0) while the consumer waits; the consumer then gets the newest output at once (outputs are
    cumulative), and the gRPC deltas of what it took are the whole hand-computed text."""
    from kiln.engine.sampling_params import SamplingParams
    from kiln.entrypoints.grpc_proto import Deltas
    from kiln.serving.core import ServingCore
    from kiln.serving.options import ServingOptions
    from tests.entrypoints.serving import call
    n = 600
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=5)

    async def stalled():
        core = ServingCore(ServingOptions(max_queued=0))
        core.attach(engine)
        core.start_serving()
        req = core.submit([prompt(0)], params)
        stream = req.outputs()
        taken = [(await anext(stream))[1]]
        deadline = time.monotonic() + 20
        while engine.num_pending and time.monotonic() < deadline:   # the consumer takes nothing meanwhile
            await asyncio.sleep(0.02)
        during = (engine.num_pending, engine.stats()["blocks_used"], core.admission.used, len(core.inflight))
        taken += [out async for _, out in stream]
        return during, taken, (core.admission.used, len(core.inflight))

    engine.engine.runner.step_seconds = 0.001
    try:
        during, taken, after = call(stalled(), timeout=60)
    finally:
        engine.engine.runner.step_seconds = 0.0
    assert during == (0, 0, 0, 1) and after == (0, 0)
    assert len(taken) == 2 and taken[-1].finished and len(taken[-1].outputs[0].token_ids) == n
    deltas = Deltas(params)
    msgs = [m for out in taken for m in deltas(out)]
    assert "".join(m.text for m in msgs) == hand_text(engine, prompt(0), n)
    assert sum(len(m.token_ids) for m in msgs) == sum(len(m.logprobs) for m in msgs) == n
    assert msgs[-1].finish_reason == "length" and msgs[-1].usage.completion_tokens == n


def test_poisoned_rows_mid_storm_fail_only_their_requests(engine):
    """48 streams at once, half HTTP, half gRPC (all admitted: 16 running + 32 queued); four of them (seed POISON)
    make every step that holds them raise once they are three tokens in. The engine isolates those rows, so
    exactly those four fail mid-stream, with INTERNAL / an SSE error event naming the failure; every other stream
    completes with the hand-computed text; the server serves on, with every block, slot and in-flight entry free
    and health still SERVING."""
    s = Servers(engine, http=True, max_queued=MAX_QUEUED)
    runner, poison, n = engine.engine.runner, {5, 6, 17, 30}, MAX_NUM_SEQS + MAX_QUEUED

    def fault(step):
        if any(r.sampling_params.seed == POISON and r.output_index >= 3 for r in step.rows):
            raise RuntimeError("injected: a poisoned row")
    go = threading.Barrier(n, timeout=60)
    channels = [grpc.insecure_channel(s.target) for _ in range(4)]
    runner.step_seconds, runner.fault = STEP_SECONDS, fault
    try:
        with ThreadPoolExecutor(n) as ex:
            results = list(ex.map(lambda i: (http_client if i % 2 else grpc_client)(
                s.http_port if i % 2 else channels, i, "read", 0.0, go, POISON if i in poison else None), range(n)))
        assert {i for i, r in enumerate(results) if r[0] == "error"} == poison, results
        for i, r in enumerate(results):
            if i in poison:
                assert r[1] in (0, "INTERNAL") and "the engine failed this request" in r[2] and "injected" in r[2]
            else:
                assert r[:3] == ("done", "length", hand_text(engine, prompt(i), MAX_TOKENS)), (i, r)
        with KilnClient(s.target) as c:
            assert c.generate_unary(prompt(0), max_tokens=4, temperature=0.0, ignore_eos=True).completions[0].text == \
                hand_text(engine, prompt(0), 4)
        assert wait_idle(engine)["blocks_used"] == 0 and s.get("/health")[0] == 200
        deadline = time.monotonic() + 10
        while (len(s.core.inflight) or s.core.admission.used) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(s.core.inflight) == 0 and s.core.admission.used == 0
    finally:
        runner.step_seconds, runner.fault = 0.0, None
        for ch in channels:
            ch.close()
        s.close()
