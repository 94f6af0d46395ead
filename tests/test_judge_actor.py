"""The judge actor as the driver runs it — ``ray.remote(JudgeActor)`` on a real local Ray cluster: on-disk cache
reuse across actors and restarts, call counting, bounded retries of dropped verdicts, reasons instead of
exceptions."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nashray.actors.judge import JudgeActor
from nashray.oracles.config import ModelOracleConfig, parse_oracle_config

pytestmark = pytest.mark.ray

RULE = {"kind": "rule", "rule": "concise_answer"}


def comparisons(n: int, prompt: str = "Say something.") -> list[dict]:
    return [{"prompt": prompt, "a": "short " * (i + 1), "b": "a much longer reply " * 3} for i in range(n)]


@pytest.fixture
def start_judge(ray_cluster):
    """Starts judge actors the way the driver does; kills them after the test (the cluster is shared)."""
    ray, started = ray_cluster, []

    def start(cfg: dict, cache_dir, retries: int = 2, game_spec: str | None = None):
        actor = ray.remote(JudgeActor).options(num_cpus=0.25).remote(  # a validated model, as the driver passes
            parse_oracle_config(cfg), str(cache_dir) if cache_dir else None, retries, game_spec)
        started.append(actor)
        info = ray.get(actor.ready.remote())
        assert info["node_id"] == ray.get_runtime_context().get_node_id() and info["pid"] > 0
        return actor

    yield start
    for actor in started:
        ray.kill(actor)


def test_cache_is_reused_across_calls_actors_and_restarts(ray_cluster, start_judge, tmp_path):
    ray, cache = ray_cluster, tmp_path / "judge-cache"
    first = start_judge(RULE, cache)
    judged = ray.get(first.judge.remote(comparisons(4)))
    assert [r["prob"] for r in judged] == [1.0] * 4 and not any(r["cached"] for r in judged)
    assert ray.get(first.calls.remote()) == 4
    again = ray.get(first.judge.remote(comparisons(5)))
    assert [r["cached"] for r in again] == [True] * 4 + [False]
    assert ray.get(first.calls.remote()) == 5

    # a second actor (another judge of the campaign, or the same after a resume) pays for none of them
    second = start_judge(RULE, cache)
    resumed = ray.get(second.judge.remote(comparisons(5)))
    assert all(r["cached"] for r in resumed) and [r["prob"] for r in resumed] == [r["prob"] for r in again]
    assert ray.get(second.calls.remote()) == 0
    # what the second one judges now, the first sees without restarting
    ray.get(second.judge.remote(comparisons(2, prompt="Another prompt.")))
    assert all(r["cached"] for r in ray.get(first.judge.remote(comparisons(2, prompt="Another prompt."))))
    assert len(list(cache.glob("*.jsonl"))) == 2   # one append-only file per writing actor
    # another oracle does not read these judgements
    other = start_judge({"kind": "rule", "rule": "concise_answer", "options": {"min_chars": 1}}, cache)
    assert not any(r["cached"] for r in ray.get(other.judge.remote(comparisons(2))))


def test_dropped_verdicts_are_retried_a_bounded_number_of_times(ray_cluster, start_judge, tmp_path):
    ray = ray_cluster
    judge = start_judge({"kind": "rule", "rule": "arithmetic"}, tmp_path / "judge-cache", retries=2)
    rows = ray.get(judge.judge.remote([{"prompt": "Tell me a story.", "a": "1", "b": "2"},
                                       {"prompt": "What is 2+3?", "a": "5", "b": "6"}]))
    assert rows[0]["prob"] is None and "not a 'What is <expression>?' question" in rows[0]["reason"]
    assert rows[1] == {"prob": 1.0, "reason": None, "cached": False, "votes": None}   # a single judge casts no panel votes
    assert ray.get(judge.calls.remote()) == 2 + 2   # both once, the dropped one twice more


class FailsEachQuestionOnce(BaseHTTPRequestHandler):
    """A judge endpoint that answers every question with a 503 the first time it is asked, then with ``A``."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = body["messages"][-1]["content"]
        with self.server.lock:
            seen = self.server.seen.get(question, 0)
            self.server.seen[question] = seen + 1
        if seen == 0:
            payload, status = b"busy", 503
        else:
            payload, status = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant",
                                                                              "content": "A"}}]}).encode(), 200
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def flaky_endpoint():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FailsEachQuestionOnce)
    httpd.daemon_threads, httpd.lock, httpd.seen = True, threading.Lock(), {}
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_the_actor_retries_what_the_endpoint_dropped(ray_cluster, start_judge, tmp_path, flaky_endpoint):
    ray = ray_cluster
    http = {"kind": "http", "url": flaky_endpoint, "retries": 0, "both_orders": False, "top_logprobs": 0}
    patient = start_judge(http, tmp_path / "a", retries=1)
    rows = ray.get(patient.judge.remote(comparisons(3)))
    assert [r["prob"] for r in rows] == [1.0] * 3
    assert ray.get(patient.calls.remote()) == 6

    impatient = start_judge(http, tmp_path / "b", retries=0)
    fresh = comparisons(2, prompt="Fresh prompt.")
    rows = ray.get(impatient.judge.remote(fresh))
    assert all(r["prob"] is None and "HTTP 503" in r["reason"] and not r["cached"] for r in rows)
    # dropped verdicts were not cached: asking again reaches the (now answering) endpoint
    rows = ray.get(impatient.judge.remote(fresh))
    assert [r["prob"] for r in rows] == [1.0, 1.0] and ray.get(impatient.calls.remote()) == 4


def test_sampled_matrix_verdicts_are_never_cached(ray_cluster, start_judge, tmp_path):
    ray = ray_cluster
    cache = tmp_path / "judge-cache"
    judge = start_judge({"kind": "matrix", "sample": True}, cache, game_spec="builtin:rps")
    pairs = [{"prompt": "rps", "a": "0", "b": "1"}] * 40
    rows = ray.get(judge.judge.remote(pairs)) + ray.get(judge.judge.remote(pairs))
    assert not any(r["cached"] for r in rows) and ray.get(judge.calls.remote()) == 80
    assert {r["prob"] for r in rows} == {0.0, 1.0}       # Bernoulli(0.1) draws: a noisy judge stays noisy
    assert not list(cache.glob("*.jsonl"))


def test_bad_input_is_an_error_naming_the_comparison(ray_cluster, start_judge):
    ray = ray_cluster
    judge = start_judge(RULE, None)
    with pytest.raises(Exception, match=r"comparison 1 lacks string field\(s\) \['b'\]"):
        ray.get(judge.judge.remote([{"prompt": "p", "a": "x", "b": "y"}, {"prompt": "p", "a": "x"}]))


def test_a_crashing_oracle_drops_the_attempt_instead_of_raising():
    class Crashing:
        oracle_id = "crashing"
        attempts = 0

        def compare(self, comparisons):
            Crashing.attempts += 1
            raise RuntimeError("CUDA out of memory")

    judge = JudgeActor(parse_oracle_config(RULE), None, retries=1)
    judge.oracle = Crashing()
    rows = judge.judge(comparisons(2))
    assert all(r["prob"] is None and r["reason"] == "oracle raised RuntimeError: CUDA out of memory" for r in rows)
    assert Crashing.attempts == 2 and judge.calls() == 4


def test_scores_come_from_oracles_that_score(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from tests.helpers import build_tiny_model
    folder = build_tiny_model(tmp_path / "tiny")
    config = LlamaConfig.from_pretrained(folder)
    config.num_labels = 1
    torch.manual_seed(3)
    LlamaForSequenceClassification(config).save_pretrained(folder)   # same tokenizer, a scalar head instead
    items = [{"prompt": "Say hi.", "response": "hi"}, {"prompt": "Say hi.", "response": "hello there"}]
    reward_judge = JudgeActor(ModelOracleConfig(kind="reward_model", model=str(folder)), None)
    scored = reward_judge.score(items)
    assert all(isinstance(r["score"], float) and r["reason"] is None for r in scored)
    assert scored[0]["score"] != scored[1]["score"] and reward_judge.calls() == 2
    rule_judge = JudgeActor(parse_oracle_config(RULE), None)
    assert all(r["score"] is None and "does not score single responses" in r["reason"]
               for r in rule_judge.score(items))
