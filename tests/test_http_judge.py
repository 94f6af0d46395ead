"""The HTTP judge against a real local server on 127.0.0.1 that answers like a judge — or misbehaves on purpose:
garbage, HTTP errors, silence, impossible log-probabilities, prose instead of a verdict."""

from __future__ import annotations

import json
import logging
import math
import pickle
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nashray.oracles import build_oracle
from nashray.oracles.base import Comparison
from nashray.oracles.config import parse_oracle_config
from nashray.oracles.http_judge import HTTPJudge, chat_completions_url
from nashray.oracles.judging import DEFAULT_TEMPLATE, parse_judging_message

KEY_ENV = "NASHRAY_TEST_JUDGE_KEY"
SECRET = "sk-test-3f9c1e-never-print-me"


def reply(content: str, logprobs: list[tuple[str, float]] | None = None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "length"}
    if logprobs is not None:  # the chosen token is the listed one that spells the content
        token, logprob = next((t, lp) for t, lp in logprobs if t.strip() == content)
        choice["logprobs"] = {"content": [{"token": token, "logprob": logprob,
                                           "top_logprobs": [{"token": t, "logprob": lp} for t, lp in logprobs]}]}
    return {"id": "x", "object": "chat.completion", "model": "judge", "choices": [choice]}


class JudgeHandler(BaseHTTPRequestHandler):
    """The first path segment picks the behaviour: ``/<mode>/v1/chat/completions``."""

    def log_message(self, *args):
        pass

    def send(self, status: int, payload: bytes, content_type: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = self.path.split("/")[1]
        with server.lock:
            server.requests.append({"mode": mode, "auth": self.headers.get("Authorization"), "body": body})
            server.in_flight += 1
            server.peak = max(server.peak, server.in_flight)
            seen = server.seen.get(body["messages"][-1]["content"], 0)
            server.seen[body["messages"][-1]["content"]] = seen + 1
        try:
            self.answer(mode, body, seen)
        finally:
            with server.lock:
                server.in_flight -= 1

    def answer(self, mode: str, body: dict, seen: int):
        content = body["messages"][-1]["content"]
        if mode == "shorter":  # log P(A) = -len(first)/10, log P(B) = -len(second)/10, plus noise tokens
            _, first, second = parse_judging_message(DEFAULT_TEMPLATE, content)
            verdict = "A" if len(first) <= len(second) else "B"
            self.send(200, json.dumps(reply(verdict, [("A", -len(first) / 10), (" B", -len(second) / 10),
                                                      ("The", -0.01)])).encode())
        elif mode == "always_a":
            self.send(200, json.dumps(reply("A")).encode())
        elif mode == "garbage":
            self.send(200, b"<html>upstream hiccup</html>", "text/html")
        elif mode == "error500":  # a careless server echoing the request's credentials in its error page
            self.send(500, f"internal error; your header was {self.headers.get('Authorization')}".encode(),
                      "text/plain")
        elif mode == "unauthorized":
            self.send(401, b'{"error": "bad key"}')
        elif mode == "slow":
            time.sleep(1.5)
            self.send(200, json.dumps(reply("A")).encode())
        elif mode == "slow_ok":
            time.sleep(0.2)
            self.send(200, json.dumps(reply("B")).encode())
        elif mode == "positive":
            self.send(200, json.dumps(reply("A", [("A", 0.7), ("B", -2.0)])).encode())
        elif mode == "prose":
            self.send(200, json.dumps(reply("Both responses have merit.")).encode())
        elif mode == "flaky":  # every question fails once, then is answered
            if seen == 0:
                self.send(503, b"warming up", "text/plain")
            else:
                self.send(200, json.dumps(reply("A", [("A", -0.1), ("B", -2.5)])).encode())
        else:
            self.send(404, b"no such mode", "text/plain")


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    httpd.daemon_threads, httpd.block_on_close = True, False
    httpd.lock, httpd.requests, httpd.seen, httpd.in_flight, httpd.peak = threading.Lock(), [], {}, 0, 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = lambda mode: f"http://127.0.0.1:{httpd.server_address[1]}/{mode}/v1"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


CASES = [Comparison("What is 2+2?", "4", "it is four, I am fairly sure"),
         Comparison("Say hi.", "hello there, how are you doing today", "hi")]


def test_logprob_verdicts_are_two_token_softmaxes_averaged_over_orders(server):
    judge = HTTPJudge(server.url("shorter"), retries=0)
    verdicts = judge.compare(CASES)
    for c, v in zip(CASES, verdicts):
        # P(A | first, second) = σ((len(second) − len(first)) / 10), antisymmetric, so debiasing keeps it
        assert v.prob == pytest.approx(1 / (1 + math.exp(-(len(c.b) - len(c.a)) / 10)), abs=1e-12)
    assert len(server.requests) == 4
    sent = server.requests[0]["body"]
    assert sent["max_tokens"] == 1 and sent["logprobs"] is True and sent["top_logprobs"] == 20
    assert sent["temperature"] == 0.0 and sent["messages"][0]["role"] == "user"
    asked = {parse_judging_message(DEFAULT_TEMPLATE, r["body"]["messages"][0]["content"])[1:]
             for r in server.requests}
    assert asked == {(c.a, c.b) for c in CASES} | {(c.b, c.a) for c in CASES}


def test_debiasing_makes_an_always_A_judge_symmetric(server):
    swapped = [Comparison(c.prompt, c.b, c.a) for c in CASES]
    single = HTTPJudge(server.url("always_a"), both_orders=False, top_logprobs=0)
    assert [v.prob for v in single.compare(CASES + swapped)] == [1.0] * 4   # a ≻ b and b ≻ a, both certain
    assert "logprobs" not in server.requests[0]["body"]
    debiased = HTTPJudge(server.url("always_a"))
    assert [v.prob for v in debiased.compare(CASES + swapped)] == [0.5] * 4


@pytest.mark.parametrize("mode, reason, attempts", [
    ("garbage", "reply is not JSON", 3),
    ("error500", "HTTP 500", 3),
    ("positive", "is positive: a probability above 1 is out of range", 3),
    ("prose", "names neither A nor B", 3),
    ("unauthorized", "HTTP 401", 1),          # a client error cannot improve by asking again
    ("slow", "no reply within 0.3 s", 3),
])
def test_bad_replies_are_retried_then_dropped_with_their_reason(server, mode, reason, attempts):
    judge = HTTPJudge(server.url(mode), retries=2, backoff_s=0.01, timeout_s=0.3, both_orders=False)
    verdicts = judge.compare(CASES[:1])
    assert verdicts[0].prob is None
    assert reason in verdicts[0].reason and f"attempt {attempts} of 3" in verdicts[0].reason
    assert len(server.requests) == attempts


def test_a_flaky_server_is_survived_by_retrying(server):
    assert [v.prob for v in HTTPJudge(server.url("flaky"), retries=0).compare(CASES)] == [None, None]
    server.seen.clear()
    verdicts = HTTPJudge(server.url("flaky"), retries=1, backoff_s=0.01).compare(CASES)
    p_a = 1 / (1 + math.exp(-2.4))
    assert [v.prob for v in verdicts] == pytest.approx([0.5 * (p_a + 1 - p_a)] * 2)


def test_backoff_doubles(server):
    judge = HTTPJudge(server.url("error500"), retries=2, backoff_s=0.2, both_orders=False)
    start = time.monotonic()
    judge.compare(CASES[:1])
    assert time.monotonic() - start >= 0.2 + 0.4


def test_concurrency_is_bounded(server):
    judge = HTTPJudge(server.url("slow_ok"), concurrency=3, both_orders=False, top_logprobs=0)
    verdicts = judge.compare([Comparison("q", f"a{i}", "b") for i in range(9)])
    assert [v.prob for v in verdicts] == [0.0] * 9
    assert server.peak == 3


def test_api_key_is_sent_but_never_logged_kept_or_written(server, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    cfg = {"kind": "http", "url": server.url("shorter"), "api_key_env": KEY_ENV, "retries": 1, "backoff_s": 0.01}
    judge = build_oracle(parse_oracle_config(cfg), run_dir=tmp_path)  # cached: verdicts are written under tmp_path
    assert all(v.prob is not None for v in judge.compare(CASES))
    failing = build_oracle(parse_oracle_config(dict(cfg, url=server.url("error500"))), run_dir=tmp_path)
    dropped = failing.compare(CASES)
    assert all(r["auth"] == f"Bearer {SECRET}" for r in server.requests)
    assert all(v.prob is None and "[redacted]" in v.reason for v in dropped)   # the server echoed it back
    exposed = [repr(judge), repr(failing), str(vars(judge)), str(vars(judge.oracle)), caplog.text,
               str(dropped), json.dumps(cfg)]
    exposed += [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    assert "retrying" in caplog.text and list(tmp_path.rglob("*.jsonl"))
    assert not [text for text in exposed if SECRET in text]
    assert SECRET.encode() not in pickle.dumps(judge.oracle)   # what Ray would ship to an actor


def test_configuration_errors_are_precise(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"environment variable '{KEY_ENV}' \\(api_key_env\\) is not set"):
        HTTPJudge("http://127.0.0.1:1/v1", api_key_env=KEY_ENV)
    with pytest.raises(ValueError, match="is not an http"):
        HTTPJudge("ftp://example/v1")
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/judge/v1/") == "http://h:1/judge/v1/chat/completions"
    assert chat_completions_url("https://h/v1/chat/completions") == "https://h/v1/chat/completions"


def test_unreachable_endpoint_is_dropped_not_raised():
    verdict = HTTPJudge("http://127.0.0.1:9/v1", retries=1, backoff_s=0.01).compare(CASES[:1])[0]
    assert verdict.prob is None and "connection failed" in verdict.reason


def test_verdict_token_variants_are_pooled_and_text_is_the_fallback():
    from nashray.oracles.http_judge import BadReply, verdict_probability
    pooled = verdict_probability(reply("A", [("A", -1.0), (" A", -2.0), ("B", -1.5), ("C", -0.1)]))
    assert pooled == pytest.approx((math.exp(-1) + math.exp(-2)) / (math.exp(-1) + math.exp(-2) + math.exp(-1.5)))
    assert verdict_probability(reply("B", [("B", -0.2), ("The", -1.0)])) == 0.0   # A not listed: the text decides
    with pytest.raises(BadReply, match="no choices"):
        verdict_probability({"choices": []})
