"""End to end on loopback: Ray Serve runs the judge (an LLM judge on the tiny model, and a reward model) behind an
OpenAI-compatible chat-completions route; the HTTP judge calls it and gets the same judgements as the in-process
oracle."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from nashray.cluster.config import AutoscalingConfig, JudgeServeConfig
from nashray.oracles import build_oracle
from nashray.oracles.base import Comparison
from nashray.oracles.http_judge import HTTPJudge

pytestmark = pytest.mark.ray

CASES = [Comparison("What is 2+2?", "4", "five"), Comparison("Say hello.", "hello world", "the quick brown fox"),
         Comparison("Name a number.", "seven", "7 8 9 10 11 12"), Comparison("Why?", "because", "")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_reward_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    torch.manual_seed(2)
    target = tmp_path_factory.mktemp("tiny-rm")
    LlamaForSequenceClassification(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(target)
    return str(target)


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_model_dir, tiny_reward_model_dir):
    """Both judges deployed on one Serve proxy bound to 127.0.0.1; base URLs by name."""
    from ray import serve
    from nashray.oracles.serve import serve_judge
    port = free_port()
    resources = {"num_cpus": 0.25}
    llm_cfg = {"kind": "llm_judge", "model": tiny_model_dir}
    rm_cfg = {"kind": "reward_model", "model": tiny_reward_model_dir}
    urls = {
        "llm": serve_judge(llm_cfg, JudgeServeConfig(name="llm-judge", port=port, route_prefix="/llm",
                                                     max_batch_size=4, resources=resources)),
        "rm": serve_judge(rm_cfg, JudgeServeConfig(name="rm-judge", port=port, route_prefix="/rm",
                                                   autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=2),
                                                   resources=resources)),
    }
    yield urls, {"llm": llm_cfg, "rm": rm_cfg}
    serve.shutdown()


def test_served_llm_judge_gives_the_in_process_judgements(served):
    urls, cfgs = served
    assert urls["llm"].startswith("http://127.0.0.1:")
    remote = HTTPJudge(urls["llm"], concurrency=8).compare(CASES)
    local = build_oracle(cfgs["llm"]).compare(CASES)
    assert all(v.prob is not None for v in remote)
    assert [v.prob for v in remote] == pytest.approx([v.prob for v in local], abs=1e-5)
    swapped = HTTPJudge(urls["llm"]).compare([Comparison(c.prompt, c.b, c.a) for c in CASES])
    assert all(v.prob + w.prob == pytest.approx(1.0) for v, w in zip(remote, swapped))


def test_served_reward_model_answers_with_its_bradley_terry_probability(served):
    urls, cfgs = served
    remote = HTTPJudge(urls["rm"]).compare(CASES)
    local = build_oracle(cfgs["rm"]).compare(CASES)
    assert [v.prob for v in remote] == pytest.approx([v.prob for v in local], abs=1e-5)
    assert len({round(v.prob, 6) for v in remote}) == len(CASES)


def test_deployments_follow_judges_serve(served):
    from ray import serve
    status = serve.status().applications
    assert status["llm-judge"].status == "RUNNING" and status["rm-judge"].status == "RUNNING"
    llm = status["llm-judge"].deployments["llm-judge"]
    rm = status["rm-judge"].deployments["rm-judge"]
    assert llm.replica_states.get("RUNNING") == 1 and rm.replica_states.get("RUNNING") == 1


def test_deployment_options_come_from_the_config():
    from nashray.oracles.serve import deployment_options
    fixed = deployment_options(JudgeServeConfig(replicas=3, resources={"num_cpus": 2, "custom": {"inference": 1}}))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0, "resources": {"inference": 1}}
    scaled = deployment_options(JudgeServeConfig(autoscaling={"min_replicas": 0, "max_replicas": 4}))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 4}


def test_the_route_speaks_openai_chat_completions(served):
    urls, _ = served

    def post(body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(urls["llm"] + "/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    status, reply = post({"model": "judge", "messages": [{"role": "user", "content": "A or B?"}],
                          "max_tokens": 1, "logprobs": True, "top_logprobs": 5})
    assert status == 200 and reply["object"] == "chat.completion"
    choice = reply["choices"][0]
    first = choice["logprobs"]["content"][0]
    assert choice["message"]["content"] == first["token"] in ("A", "B")
    assert {e["token"] for e in first["top_logprobs"]} == {"A", "B"}
    assert all(e["logprob"] < 0 for e in first["top_logprobs"])
    status, reply = post({"messages": [{"role": "user", "content": "A or B?"}]})
    assert status == 200 and "logprobs" not in reply["choices"][0]
    status, reply = post({"messages": [], "max_tokens": 1})
    assert status == 400 and "messages must be a non-empty list" in reply["error"]["message"]
    status, reply = post({"messages": [{"role": "user", "content": "x"}], "stream": True})
    assert status == 400 and "streaming" in reply["error"]["message"]
    with urllib.request.urlopen(urls["llm"] + "/models", timeout=30) as response:
        assert json.loads(response.read())["data"][0]["object"] == "model"


def test_a_message_outside_the_template_is_a_422_for_a_reward_model(served):
    urls, _ = served
    dropped = HTTPJudge(urls["rm"], template="Q: {prompt}\n1) {a}\n2) {b}", retries=0).compare(CASES[:1])[0]
    assert dropped.prob is None and "HTTP 422" in dropped.reason and "does not follow the judging template" in \
        dropped.reason


# ------------------------------------------------------------------------------------- `nashray serve-judge`

def _campaign(tmp_path, **sections) -> str:
    import yaml
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(sections))
    return str(path)


def test_serve_judge_help_names_the_section_it_deploys():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "nashray.cli", "serve-judge", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: nashray serve-judge" in done.stdout and "--detach" in done.stdout and "--set" in done.stdout
    assert "judges.serve" in done.stdout


@pytest.mark.parametrize("case", ["unservable oracle", "typo in judges.serve", "missing judge model", "detach locally"])
def test_serve_judge_names_what_makes_the_config_unusable(tmp_path, capsys, monkeypatch, case):
    """Each mistake is named with its field (or flag), without a traceback, before Ray or Serve is started."""
    from nashray.cluster.cli import main
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = []
    if case == "unservable oracle":
        config = _campaign(tmp_path, judges={"oracle": {"kind": "http", "url": "http://127.0.0.1:9/v1"}})
        named = ("judges.oracle: oracle kind 'http' cannot be served: serving an HTTP judge would only proxy another "
                 "endpoint; serve-judge deploys judges.oracle per judges.serve: set it to the oracle to serve")
    elif case == "typo in judges.serve":
        config = _campaign(tmp_path, judges={"serve": {"prot": 8001}})
        named = "judges.serve.prot"
    elif case == "missing judge model":
        config = _campaign(tmp_path, judges={"oracle": {"kind": "reward_model", "model": str(tmp_path / "no-rm")}})
        named = f"judges.oracle.model: no model folder at {tmp_path / 'no-rm'}"
    else:
        config, argv = _campaign(tmp_path), ["--detach"]
        named = "--detach needs a running Ray cluster to leave the judge on: set cluster.address (or RAY_ADDRESS)"
    assert main(["serve-judge", config, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nashray serve-judge: ") and named in err and "Traceback" not in err, err


def test_serve_judge_deploys_judges_oracle_per_judges_serve(served, tmp_path, capsys):
    """`nashray serve-judge CONFIG --detach` on the running cluster: the campaign's rule judge, on the proxy the
    module's judges already use, named and routed by judges.serve."""
    import ray
    from ray import serve
    urls, _ = served
    port = int(urls["llm"].split(":")[2].split("/")[0])
    config = _campaign(tmp_path, judges={"oracle": {"kind": "rule", "rule": "concise_answer"},
                                         "serve": {"name": "cli-judge", "port": port, "route_prefix": "/cli",
                                                   "resources": {"num_cpus": 0.25}}})
    from nashray.cluster.cli import main
    address = ray.get_runtime_context().gcs_address
    try:
        assert main(["serve-judge", config, "--detach", "--set", f"cluster.address={address}"]) == 0
        url = f"http://127.0.0.1:{port}/cli/v1"
        assert capsys.readouterr().out.strip() == f"judge 'cli-judge' (rule) serving at {url}"
        assert serve.status().applications["cli-judge"].status == "RUNNING"
        verdict = HTTPJudge(url).compare([Comparison("Say hi.", "hi", "a much longer answer than needed")])[0]
        assert verdict.prob is not None and verdict.prob > 0.5  # the concise answer wins
    finally:
        serve.delete("cli-judge")
