"""Bad input fails with an error naming what is wrong — the config field, the file and row, the judge reply's field,
the checkpoint file — and never costs data already collected: campaign configs, prompt datasets, judge replies,
cluster placement and checkpoints."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from nashray.cluster.config import ConfigError, load_config, parse_config
from nashray.cluster.prompts import PromptDataError, load_prompts

# ------------------------------------------------------------------------------------------ campaign configs

TABULAR = {"generators": {"engine": "tabular"}, "judges": {"oracle": {"kind": "matrix"}},
           "learner": {"precision": "fp32"}}
HTTP = {"kind": "http", "url": "http://127.0.0.1:9/v1"}


@pytest.mark.parametrize("config, names", [
    ({"learner": {"workers": "two"}}, ["learner.workers", "'two'"]),                      # wrong type
    ({"schedule": {"rounds": [3]}}, ["schedule.rounds"]),                                 # wrong type
    ({"learner": {"zero_stag": 2}}, ["learner.zero_stag", "Extra inputs"]),               # unknown key (typo)
    ({"learnr": {"workers": 2}}, ["learnr", "Extra inputs"]),                             # unknown section
    ({"algorithm": {"name": "ppo"}}, ["algorithm", "'ppo'"]),                             # unknown algorithm
    ({"algorithm": {"name": "online_dpo", "eta": 2}}, ["algorithm.online_dpo.eta"]),      # another algorithm's knob
    ({"generators": {"sampling": {"top_p": 1.5}}}, ["generators.sampling.top_p"]),        # out of range
    ({"schedule": {"samples_per_prompt": 1}}, ["schedule.samples_per_prompt"]),           # no pair to compare
    ({"judges": {"oracle": {"kind": "http"}}}, ["judges.oracle.http.url", "Field required"]),
    ({"judges": {"oracle": {"kind": "rule", "rule": "shortest"}}}, ["judges.oracle.rule", "concise_answer"]),
    ({"judges": {"oracle": {"kind": "rule", "rule": "concise_answer", "options": {"min_len": 3}}}},
     ["judges.oracle.rule", "min_len", "min_chars"]),
    ({"judges": {"oracle": {**HTTP, "template": "Which is better, {a} or {b}?"}}},
     ["judges.oracle.http.template", "missing ['prompt']"]),
    ({"judges": {"oracle": {**HTTP, "url": "ftp://judge.example/v1"}}}, ["judges.oracle.http.url", "http://"]),
    ({"cluster": {"bind_host": "localhost"}}, ["cluster.bind_host", "IP address"]),
    ({"judges": {"serve": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}},
     ["judges.serve.autoscaling", "min_replicas 3 > max_replicas 2"]),
    # impossible combinations
    ({"generators": {"engine": "tabular"}}, ["data.game"]),
    ({**TABULAR, "data": {"game": "builtin:rps"}, "learner": {"precision": "bf16"}}, ["learner.precision"]),
    ({"judges": {"oracle": {"kind": "matrix"}}}, ["judges.oracle.kind 'matrix'", "generators.engine"]),
    ({"algorithm": {"name": "nash_md", "beta": 1.5}}, ["algorithm.nash_md.beta"]),  # out of range
    ({"algorithm": {"name": "inpo", "eta": 5, "tau": 0.5}}, ["algorithm.inpo", "eta * tau = 2.5 > 1"]),
    ({"schedule": {"async_rounds": True, "max_staleness": 0}}, ["schedule.async_rounds", "max_staleness ≥ 1"]),
    ({"schedule": {"async_anchor": "judge"}}, ["schedule.async_anchor", "'generator' or 'learner'"]),
    ({"judges": {"oracle": {"kind": "reward_model", "model": "m", "engine": "vllm"}}},
     ["judges.oracle.reward_model", "engine 'vllm' serves kind 'llm_judge' only"]),
    # an algorithm's assumption broken: Nash-MD's on-policy surrogate trained past its sampling policy, ...
    ({"algorithm": {"name": "nash_md", "clip_ratio": None}, "generators": {"engine": "hf"},
      "schedule": {"prompts_per_round": 4, "samples_per_prompt": 2}, "learner": {"epochs_per_round": 30}},
     ["algorithm.clip_ratio null", "learner.epochs_per_round 30"]),
    ({"algorithm": {"name": "nash_md", "clip_ratio": None}, "generators": {"engine": "hf"},
      "schedule": {"prompts_per_round": 8, "samples_per_prompt": 4}, "learner": {"micro_batch_size": 8}},
     ["algorithm.clip_ratio null", "32 records per round", "learner.micro_batch_size"]),
    # ... its ratio taken to a policy that did not draw the samples, or to a tempered one
    ({"algorithm": {"name": "nash_md"}, "generators": {"engine": "hf"},
      "schedule": {"async_rounds": True, "async_anchor": "learner"}},
     ["algorithm.clip_ratio", "schedule.async_anchor 'generator'"]),
    ({"algorithm": {"name": "nash_md"}, "generators": {"engine": "hf", "sampling": {"temperature": 0.7}}},
     ["nash_md", "generators.sampling.temperature 1 and top_p 1"]),
    ({"algorithm": {"name": "nash_md", "beta": 0.0}, "generators": {"engine": "hf"}},
     ["algorithm.nash_md", "beta 0", "clip_ratio null"]),
    ({"algorithm": {"name": "nash_md", "beta": 0.2, "mixture": 0.2}},
     ["algorithm.nash_md", "give beta only"]),  # the deprecated name and the new one, both
    ({"algorithm": {"name": "nash_md", "clip_ratio": 1.5}, "generators": {"engine": "hf"}},
     ["algorithm.nash_md.clip_ratio"]),
])
def test_config_errors_name_the_field(config, names):
    with pytest.raises(ConfigError) as err:
        parse_config(config, "campaign.yaml")
    for name in names:
        assert name in str(err.value)
    assert "campaign.yaml" in str(err.value)


@pytest.mark.parametrize("field, value", [
    ("url", "https://judge-user:hunter2-secret@judge.example/v1"),
    ("api_key_env", "sk-live-hunter2-secret"),
])
def test_a_secret_in_the_wrong_field_is_refused_without_repeating_it(field, value):
    """A key pasted where the config wants a variable name (or inside the URL) would be written to config.yaml, the
    judge cache's oracle id and the logs; the error names the field and keeps the value out of the message."""
    with pytest.raises(ConfigError) as err:
        parse_config({"judges": {"oracle": {**HTTP, field: value}}})
    assert f"judges.oracle.http.{field}" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_config_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match="campaign.yaml: the top level must be a mapping, got list"):
        parse_config([{"learner": {}}], "campaign.yaml")


@pytest.mark.parametrize("text, names", [
    ("learner:\n  workers: 2\n  zero_stage: [1\n", ["is not valid YAML", "line 3"]),                   # syntax
    ("learner:\n  workers: 2\nlearner:\n  workers: 4\n", ["key 'learner' appears twice", "line 3"]),  # duplicate
    (b"seed: 0\nmodel:\n  path: caf\xe9\n", ["is not valid YAML", "utf-8"]),                            # encoding
    ("- seed: 0\n", ["the top level must be a mapping, got list"]),
])
def test_config_file_errors_name_the_file_and_line(tmp_path, text, names):
    path = tmp_path / "campaign.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    for name in names:
        assert name in str(err.value)


def test_missing_config_file_and_override_into_a_value(tmp_path):
    with pytest.raises(ConfigError, match=f"campaign config {tmp_path / 'nope.yaml'} does not exist"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "campaign.yaml"
    path.write_text("learner:\n  workers: 2\n")
    with pytest.raises(ConfigError, match="override learner.workers.count: learner.workers is a int, not a section"):
        load_config(path, {"learner.workers.count": 3})
    with pytest.raises(ConfigError, match="learner.workers"):
        load_config(path, {"learner.workers": -1})


# ------------------------------------------------------------------------------------------------ placement

@pytest.mark.parametrize("config, nodes, names", [
    ({"learner": {"workers": 8, "resources": {"num_cpus": 1}}}, [{"CPU": 4}, {"CPU": 2}],
     ["learner.workers=8", "CPU=6"]),                                      # more workers than the cluster holds
    ({"generators": {"count": 2, "resources": {"num_gpus": 1}}}, [{"CPU": 16}],
     ["generators.count=2", "GPU=0"]),                                     # GPUs asked of a CPU-only cluster
    ({"learner": {"workers": 2, "resources": {"num_cpus": 3}}}, [{"CPU": 2}, {"CPU": 2}, {"CPU": 2}],
     ["learner.workers=2", "each needs all of it on one node"]),          # enough in total, on no single node
    ({"generators": {"count": 2, "resources": {"num_cpus": 2}}, "judges": {"count": 2, "resources": {"num_cpus": 2}},
      "learner": {"workers": 1, "resources": {"num_cpus": 2}}}, [{"CPU": 8}],
     ["together need CPU=10", "generators CPU=4", "judges CPU=4", "learner CPU=2", "the cluster has CPU=8"]),
    ({"judges": {"resources": {"custom": {"CPU": 2}}}}, [{"CPU": 8}], ["judges.resources.custom", "'CPU'"]),
    ({"generators": {"resources": {"num_cpus": 2}}, "judges": {"resources": {"num_cpus": 2}},
      "learner": {"resources": {"num_cpus": 2}}, "evaluation": {"oracle": {"kind": "rule", "rule": "concise_answer"}}},
     [{"CPU": 6}], ["together need CPU=8", "eval judge CPU=2"]),            # the evaluation's own judge counts too
])
def test_unplaceable_campaigns_name_the_role_and_resource(config, nodes, names):
    from nashray.cluster.placement import NodeShape, check_placeable
    with pytest.raises(ValueError) as err:
        check_placeable(parse_config(config), shapes=[NodeShape(n) for n in nodes])
    for name in names:
        assert name in str(err.value)


# ------------------------------------------------------------------------------------------- prompt datasets

def _write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(content) if content else pa.table({"prompt": pa.array([], pa.string())}),
                       path)
    return path


@pytest.mark.parametrize("name, content, names", [
    ("empty.jsonl", "", ["holds no rows"]),
    ("blank.jsonl", "\n\n", ["holds no rows"]),
    ("empty.json", "[]", ["holds no rows"]),
    ("empty.parquet", [], ["holds no rows"]),
    ("missing.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', ["row 2 has no field 'prompt'", "['text']"]),
    ("missing.parquet", [{"question": "a"}], ["row 1 has no field 'prompt'"]),
    ("latin1.jsonl", '{"prompt": "ok"}\n'.encode() + b'{"prompt": "caf\xe9"}\n', ["is not UTF-8", "line 2"]),
    ("broken.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": \n', ["line 3 is not JSON"]),
    ("number.jsonl", '{"prompt": 42}\n', ["row 1: field 'prompt' must be a non-empty string"]),
    ("whitespace.json", '[{"prompt": "a"}, {"prompt": "   "}]', ["row 2: field 'prompt' must be a non-empty"]),
    ("duplicate.jsonl", '{"prompt_id": "x", "prompt": "a"}\n{"prompt_id": "y", "prompt": "b"}\n'
                        '{"prompt_id": "x", "prompt": "c"}\n', ["row 3: duplicate prompt_id 'x'"]),
    ("strings.json", '["just a string"]', ["row 1 is a str, not an object"]),
    ("object.json", '{"prompt": "a"}', ["must hold a JSON list of rows"]),
    ("invalid.json", '[{"prompt": "a"},]', ["is not JSON", "line 1"]),
    ("prompts.csv", "prompt\na\n", ["unsupported extension '.csv'"]),
    ("corrupt.parquet", b"PAR1 this is not a parquet file", ["is not a readable parquet file"]),
])
def test_prompt_file_errors_name_the_file_and_row(tmp_path, name, content, names):
    path = _write(tmp_path / name, content)
    with pytest.raises(PromptDataError) as err:
        load_prompts(str(path))
    assert str(path) in str(err.value)
    for name in names:
        assert name in str(err.value)


def test_prompt_source_errors(tmp_path):
    with pytest.raises(PromptDataError, match=f"prompt file {tmp_path / 'absent.jsonl'} does not exist"):
        load_prompts(str(tmp_path / "absent.jsonl"))
    with pytest.raises(PromptDataError, match="unknown embedded prompt set 'builtin:dmeo'; known: builtin:demo"):
        load_prompts("builtin:dmeo")
    path = _write(tmp_path / "p.jsonl", '{"question": "a"}\n')
    with pytest.raises(PromptDataError, match="row 1 has no field 'instruction'"):
        load_prompts(str(path), field="instruction")


def test_prompts_longer_than_the_model_context_fail_before_generation(tmp_path, tiny_model_dir):
    from nashray.cluster.prompts import check_prompts_fit_model

    path = _write(tmp_path / "p.jsonl", '{"prompt": "what is two plus two?"}\n'
                                        '{"prompt_id": "essay", "prompt": "' + "the quick brown fox " * 40 + '"}\n')
    prompts = load_prompts(str(path))
    cfg = parse_config({"model": {"path": tiny_model_dir, "max_prompt_tokens": 64}})
    with pytest.raises(PromptDataError) as err:
        check_prompts_fit_model(prompts, cfg, str(path))
    assert str(path) in str(err.value) and "prompt 'essay'" in str(err.value)
    assert "over model.max_prompt_tokens = 64" in str(err.value)
    check_prompts_fit_model(prompts[:1], cfg, str(path))  # the short one fits

    # the tiny model's context is 512 tokens: 500 + 64 + 1 cannot be held
    too_long = parse_config({"model": {"path": tiny_model_dir, "max_prompt_tokens": 500}})
    with pytest.raises(PromptDataError, match=r"model.max_prompt_tokens \(500\) \+ generators.sampling."
                                              r"max_new_tokens \(64\) \+ 1 exceeds the context .* \(512 tokens\)"):
        check_prompts_fit_model(prompts[:1], too_long, str(path))


def test_a_generator_refuses_a_prompt_longer_than_max_prompt_tokens(tiny_model_dir):
    from nashray.actors.engines import HFEngine, PromptTooLong
    engine = HFEngine(parse_config({"model": {"path": tiny_model_dir, "dtype": "float32", "max_prompt_tokens": 16},
                                    "generators": {"engine": "hf"}}))
    with pytest.raises(PromptTooLong, match=r"prompt 'row-7' is \d+ tokens with its chat template, over "
                                            r"model.max_prompt_tokens = 16"):
        engine.encode_prompt("row-7", "the quick brown fox jumps over the lazy dog " * 3)


def test_an_eval_split_that_leaves_no_training_prompt():
    from nashray.cluster.prompts import Prompt, split_prompts
    with pytest.raises(PromptDataError, match="2 prompts leave none for training with eval_fraction=0.9"):
        split_prompts([Prompt("a", "a"), Prompt("b", "b")], 0.9, seed=0)


# --------------------------------------------------------------------------------------------- judge replies

def _reply(content="A", logprobs=None, **choice) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         **({"logprobs": logprobs} if logprobs is not None else {}), **choice}]}


def _top(*entries) -> dict:
    return {"content": [{"token": entries[0][0], "logprob": entries[0][1],
                         "top_logprobs": [{"token": t, "logprob": lp} for t, lp in entries]}]}


@pytest.mark.parametrize("reply, reason", [
    ([1, 2, 3], "reply has no choices"),                                                       # garbage JSON
    ({"choices": "A"}, "first choice is not an object"),
    ({"choices": [{"message": "A"}]}, "choices[0].message is not an object"),
    (_reply(logprobs=["A"]), "choices[0].logprobs is not an object"),
    (_reply(logprobs={"content": [{"token": "A", "logprob": -0.1, "top_logprobs": ["A", "B"]}]}),
     "top_logprobs is not a list of objects"),
    (_reply(logprobs=_top(("A", float("nan")), ("B", -1.0))), "log-probability nan of verdict token 'A'"),
    (_reply(logprobs=_top(("A", "-0.5"), ("B", -1.0))), "log-probability '-0.5' of verdict token 'A' is not a number"),
    (_reply(logprobs=_top(("A", 0.4), ("B", -1.0))), "is positive: a probability above 1 is out of range"),
    (_reply(logprobs=_top(("A", -math.inf), ("B", -math.inf))), "both verdict tokens have zero probability"),
    (_reply(content="Both are fine."), "names neither A nor B"),
])
def test_bad_judge_replies_are_refused_naming_the_field(reply, reason):
    from nashray.oracles.http_judge import BadReply, verdict_probability
    with pytest.raises(BadReply) as err:
        verdict_probability(reply)
    assert reason in str(err.value)


def test_an_out_of_range_verdict_is_refused():
    from nashray.oracles.base import Verdict
    with pytest.raises(ValueError, match=r"verdict probability 1.5 is outside \[0, 1\]"):
        Verdict(1.5)
    with pytest.raises(ValueError, match="a dropped verdict needs a reason"):
        Verdict(None)


class MixedJudge(BaseHTTPRequestHandler):
    """Answers by the prompt of the judging message: ``status NNN`` → that HTTP status, ``huge`` → a 2 MiB body,
    ``garbage`` → not JSON, ``malformed`` → a message that is a string, ``positive`` → P(A) > 1; else a verdict
    for the shorter response."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        from nashray.oracles.judging import DEFAULT_TEMPLATE, parse_judging_message
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt, first, _ = parse_judging_message(DEFAULT_TEMPLATE, body["messages"][-1]["content"])
        with self.server.lock:
            self.server.asked.append(prompt)
        status, payload = 200, json.dumps(_reply("A" if first == "short" else "B")).encode()
        if prompt.startswith("status "):
            status, payload = int(prompt.split()[1]), b'{"error": "no"}'
        elif prompt == "huge":
            payload = json.dumps(_reply("A", padding="x" * (2 << 20))).encode()
        elif prompt == "garbage":
            payload = b"<html>502 Bad Gateway</html>"
        elif prompt == "malformed":
            payload = json.dumps({"choices": [{"message": "A"}]}).encode()
        elif prompt == "positive":
            payload = json.dumps(_reply("A", _top(("A", 0.3), ("B", -2.0)))).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def mixed_judge():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), MixedJudge)
    httpd.daemon_threads, httpd.lock, httpd.asked = True, threading.Lock(), []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("prompt, reason, attempts", [
    ("status 404", "HTTP 404", 1),            # the wrong route: asking again cannot help
    ("status 422", "HTTP 422", 1),
    ("status 429", "HTTP 429", 2),            # rate limited: retried
    ("status 503", "HTTP 503", 2),
    ("huge", "reply is larger than 1048576 bytes", 2),
    ("garbage", "reply is not JSON", 2),
])
def test_http_errors_and_oversized_replies_become_reasons(mixed_judge, prompt, reason, attempts):
    from nashray.oracles.base import Comparison
    from nashray.oracles.http_judge import HTTPJudge
    judge = HTTPJudge(mixed_judge.url, retries=1, backoff_s=0.01, both_orders=False, top_logprobs=0)
    verdict = judge.compare([Comparison(prompt, "short", "a longer answer")])[0]
    assert verdict.prob is None and reason in verdict.reason and f"attempt {attempts} of 2" in verdict.reason
    assert len(mixed_judge.asked) == attempts


@pytest.mark.ray
def test_bad_replies_cost_only_their_own_comparisons_and_judged_ones_are_kept(ray_cluster, mixed_judge, tmp_path):
    """One batch mixing good questions with garbage, malformed, out-of-range and failing replies: each bad reply
    drops its own comparison with a reason, the rest are judged and persisted in the judge cache, so a restarted judge
    asks the endpoint only about the dropped ones."""
    from nashray.actors.judge import JudgeActor
    from nashray.oracles.config import parse_oracle_config

    ray, cache = ray_cluster, tmp_path / "judge-cache"
    oracle = parse_oracle_config({"kind": "http", "url": mixed_judge.url, "retries": 0, "both_orders": False,
                                  "top_logprobs": 0})
    bad = ["garbage", "malformed", "positive", "status 500"]
    batch = [{"prompt": p, "a": "short", "b": "a longer answer"} for p in ["q1", *bad, "q2"]]
    batch.append({"prompt": "q3", "a": "a longer answer", "b": "short"})
    judge = ray.remote(JudgeActor).options(num_cpus=0.25).remote(oracle, str(cache), 0)
    try:
        rows = ray.get(judge.judge.remote(batch))
    finally:
        ray.kill(judge)
    assert [r["prob"] for r in rows] == [1.0, None, None, None, None, 1.0, 0.0]
    reasons = [r["reason"] for r in rows[1:5]]
    for reason, expected in zip(reasons, ["not JSON", "choices[0].message is not an object",
                                          "is positive", "HTTP 500"]):
        assert expected in reason
    assert sum(len(p.read_text().splitlines()) for p in cache.glob("*.jsonl")) == 3

    mixed_judge.asked.clear()
    restarted = ray.remote(JudgeActor).options(num_cpus=0.25).remote(oracle, str(cache), 0)
    try:
        again = ray.get(restarted.judge.remote(batch))
    finally:
        ray.kill(restarted)
    assert [r["cached"] for r in again] == [True, False, False, False, False, True, True]
    assert sorted(mixed_judge.asked) == sorted(bad)


# ------------------------------------------------------------------------------------------------ checkpoints

@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> str:
    from tests.helpers import build_tiny_model
    return str(build_tiny_model(tmp_path_factory.mktemp("other-llama"), seed=1, hidden=96))


@pytest.fixture
def checkpoint(tmp_path, tiny_model_dir):
    """A round checkpoint in the learner's layout for the tiny model and a one-worker ZeRO-0 learner (the DeepSpeed
    state file holds a plain state dict: these tests check names, headers and pickle opcodes, never DeepSpeed)."""
    import torch
    from safetensors.torch import load_file
    ckpt = tmp_path / "checkpoints" / "round-0003"
    shutil.copytree(tiny_model_dir, ckpt)
    (ckpt / "COMPLETE").write_text(json.dumps({"round": 3, "metrics": {"loss": 0.5}}))
    (ckpt / "deepspeed" / "state").mkdir(parents=True)
    torch.save({"module": load_file(str(ckpt / "model.safetensors"))},
               ckpt / "deepspeed" / "state" / "mp_rank_00_model_states.pt")
    return ckpt


def _llm(model_dir, **learner) -> dict:
    return {"model": {"path": model_dir}, "learner": {"zero_stage": 0, "precision": "fp32", **learner}}


def test_a_checkpoint_in_the_learner_layout_is_valid(checkpoint, tiny_model_dir):
    from nashray.trainers.checkpoints import validate_checkpoint
    validate_checkpoint(checkpoint, _llm(tiny_model_dir))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _garble_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{not json" + data[17:])


def _config_of(model_dir: str):
    def swap(ckpt: Path) -> None:
        shutil.copy(Path(model_dir) / "config.json", ckpt / "config.json")
    return swap


def _weights_of(model_dir: str):
    def swap(ckpt: Path) -> None:
        shutil.copy(Path(model_dir) / "model.safetensors", ckpt / "model.safetensors")
    return swap


def _rename_tensor(ckpt: Path) -> None:
    from safetensors.torch import load_file, save_file
    state = load_file(str(ckpt / "model.safetensors"))
    state["model.extra_head.weight"] = state.pop("lm_head.weight")
    save_file(state, str(ckpt / "model.safetensors"))


def _drop_tensor(ckpt: Path) -> None:
    from safetensors.torch import load_file, save_file
    state = load_file(str(ckpt / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(ckpt / "model.safetensors"))


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "COMPLETE").unlink(), r"round-0003/COMPLETE is missing: the checkpoint was never completed"),
    (lambda c: (c / "COMPLETE").write_text("{\"round\": 3, "), r"round-0003/COMPLETE is not valid JSON"),
    (lambda c: (c / "COMPLETE").write_text("[3]"), r"round-0003/COMPLETE must be a JSON object"),
    (lambda c: (c / "config.json").unlink(), r"round-0003/config.json is missing"),
    (lambda c: (c / "model.safetensors").unlink(), r"round-0003/model.safetensors is missing"),
    (lambda c: _truncate(c / "model.safetensors"),
     r"round-0003/model.safetensors is not a readable safetensors file \(corrupted or truncated\)"),
    (lambda c: _garble_header(c / "model.safetensors"), r"round-0003/model.safetensors is not a readable safetensors"),
    (lambda c: _rename_tensor(c), r"round-0003/model.safetensors: tensors \['model.extra_head.weight'\] are not in"),
    (lambda c: _drop_tensor(c), r"round-0003/model.safetensors: tensors \['model.norm.weight'\] .* are missing"),
    (lambda c: shutil.rmtree(c / "deepspeed"), r"round-0003/deepspeed/state is missing: .* no optimizer state"),
    (lambda c: (c / "deepspeed/state/mp_rank_00_model_states.pt").write_bytes(b"not a zip"),
     r"mp_rank_00_model_states.pt is not a readable torch.save file"),
])
def test_damaged_checkpoints_name_the_file(checkpoint, tiny_model_dir, damage, message):
    from nashray.trainers.checkpoints import CheckpointError, validate_checkpoint
    damage(checkpoint)
    with pytest.raises(CheckpointError, match=message):
        validate_checkpoint(checkpoint, _llm(tiny_model_dir))


def test_a_checkpoint_of_another_model_is_refused(checkpoint, tiny_model_dir, other_model_dir):
    from nashray.trainers.checkpoints import CheckpointError, validate_checkpoint
    cfg = _llm(tiny_model_dir)
    _config_of(other_model_dir)(checkpoint)  # the other model's config.json
    with pytest.raises(CheckpointError, match=r"round-0003/config.json: hidden_size is 96 but the campaign's model "
                                              r".* has 64: the checkpoint is of another model"):
        validate_checkpoint(checkpoint, cfg)
    _config_of(tiny_model_dir)(checkpoint)  # this model's config.json, the other model's weights
    _weights_of(other_model_dir)(checkpoint)
    with pytest.raises(CheckpointError, match=r"round-0003/model.safetensors: tensor '.*' has shape \[.*96.*\] but "
                                              r"the campaign's model .* has \[.*64.*\]"):
        validate_checkpoint(checkpoint, cfg)


def test_a_checkpoint_of_another_learner_layout_is_refused(checkpoint, tiny_model_dir):
    from nashray.trainers.checkpoints import CheckpointError, validate_checkpoint
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states.pt is missing: .* "
                                              r"\(learner.workers=2, learner.zero_stage=2"):
        validate_checkpoint(checkpoint, _llm(tiny_model_dir, workers=2, zero_stage=2))
    with pytest.raises(CheckpointError, match=f"checkpoint {checkpoint.parent / 'round-0009'} does not exist"):
        validate_checkpoint(checkpoint.parent / "round-0009", _llm(tiny_model_dir))


def test_a_tabular_checkpoint_of_another_game_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from nashray.trainers.checkpoints import CheckpointError, validate_checkpoint
    from nashray.oracles.games import load_game
    from nashray.trainers.tabular import TabularPolicy

    cfg = {**TABULAR, "data": {"game": "builtin:rps"}}
    ckpt = tmp_path / "round-0000"
    (ckpt / "deepspeed" / "state").mkdir(parents=True)
    (ckpt / "COMPLETE").write_text(json.dumps({"round": 0, "metrics": {}}))
    torch.save({"module": {}}, ckpt / "deepspeed" / "state" / "mp_rank_00_model_states.pt")
    save_file(TabularPolicy.from_game(load_game("builtin:rps")).state_dict(), str(ckpt / "model.safetensors"))
    validate_checkpoint(ckpt, cfg)
    save_file(TabularPolicy.from_game(load_game("builtin:random10")).state_dict(), str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'logits' has shape \[1, 10\] but the "
                                              r"campaign's model .* has \[1, 3\]"):
        validate_checkpoint(ckpt, cfg)


# ---------------------------------------------------------------------------------- nothing collected is lost

def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_resume_with_an_invalid_config_leaves_the_run_directory_untouched(tmp_path):
    """A campaign two rounds in; resuming it with a bad override, or after a bad hand edit of its config.yaml,
    fails naming the field before anything is started or written."""
    from nashray.cluster.config import dump_config
    from nashray.cluster.driver import run_campaign
    from nashray.layout import CampaignState, RunDir, write_table

    cfg = parse_config({**TABULAR, "data": {"game": "builtin:rps"}, "storage": {"run_dir": str(tmp_path / "run")}})
    run = RunDir(cfg.storage.run_dir)
    run.create(dump_config(cfg))
    for t in range(2):
        write_table(run.round_dir(t) / "samples.parquet", [{"prompt_id": "rps", "response": str(t)}])
        write_table(run.round_dir(t) / "judgements.parquet", [{"prompt_id": "rps", "i": 0, "j": 1, "prob": 0.5}])
        run.record_metrics({"round": t, "loss": 0.1 * t})
    run.write_state(CampaignState(rounds_completed=2, version=2, checkpoint=None))
    before = _digests(run.root)

    with pytest.raises(ConfigError, match="learner.workers"):
        run_campaign(resume=str(run.root), overrides={"learner.workers": "many"})
    assert _digests(run.root) == before

    edited = run.config_path.read_text().replace("zero_stage:", "zero_stag:")
    run.config_path.write_text(edited)
    before = _digests(run.root)
    with pytest.raises(ConfigError, match=f"{run.config_path}:\n  learner.zero_stag: Extra inputs"):
        run_campaign(resume=str(run.root))
    assert _digests(run.root) == before
    assert yaml.safe_load(run.config_path.read_text())["learner"]["zero_stag"] == 0


# ------------------------------------------------------------------------------- what `nashray run` prints

ROOT = Path(__file__).resolve().parents[1]


def _nashray(*argv: str, env: dict | None = None):
    import os
    import subprocess
    import sys
    env = {key: value for key, value in {**os.environ, **(env or {})}.items() if value is not None}  # None: unset
    return subprocess.run([sys.executable, "-m", "nashray.cluster.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.parametrize("case", ["prompt file", "model path"])
def test_nashray_run_names_the_bad_input_in_one_line(tiny_model_dir, tmp_path, case):
    """The message is the whole output — no traceback ending in it — and the exit status says it failed;
    ``--verbose`` adds the traceback."""
    model, prompts = tiny_model_dir, "builtin:demo"
    if case == "prompt file":
        prompts, named = str(tmp_path / "prompts.jsonl"), f"prompt file {tmp_path / 'prompts.jsonl'} does not exist"
    else:
        model, named = "./models/my-sft", (f"model.path: no model folder at {ROOT / 'models' / 'my-sft'}, and "
                                           f"'./models/my-sft' is not an HF hub id either")
    config = tmp_path / "campaign.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": model, "dtype": "float32"}, "data": {"prompts": prompts},
                                      "storage": {"run_dir": str(tmp_path / "run")}}))
    done = _nashray("run", str(config))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"nashray run: {named}"], done.stderr
    if case == "model path":  # found before anything is started or written
        assert not (tmp_path / "run").exists()
        verbose = _nashray("run", str(config), "--verbose")
        assert verbose.returncode == 2 and "Traceback (most recent call last)" in verbose.stderr
        assert verbose.stderr.splitlines()[-1] == f"nashray run: {named}"


@pytest.mark.ray
def test_nashray_run_console_holds_only_the_projects_lines(tmp_path):
    """A whole (tabular) campaign through `nashray run`: the terminal gets the progress lines and the result, while
    Ray's, Ray Train's and DeepSpeed's output lands in RUN_DIR/logs/driver.log and the actors' in RUN_DIR/logs/ray;
    ``--verbose`` puts the actors' output back on the console."""
    import re
    config = tmp_path / "campaign.yaml"
    config.write_text(yaml.safe_dump({
        "algorithm": {"name": "inpo"},
        "generators": {"count": 1, "engine": "tabular", "resources": {"num_cpus": 0.5}},
        "judges": {"count": 1, "oracle": {"kind": "matrix"}, "resources": {"num_cpus": 0.5}},
        "learner": {"workers": 1, "precision": "fp32", "threads_per_worker": 1},
        "data": {"game": "builtin:rps"},
        "schedule": {"rounds": 1, "prompts_per_round": 1, "samples_per_prompt": 8},
        "storage": {"run_dir": str(tmp_path / "run")}}))
    done = _nashray("run", str(config), env={"RAY_ADDRESS": None})
    assert done.returncode == 0, done.stderr[-3000:]
    ours = re.compile(r"^(\[round \d+\] |round \d+ \(|logs \(Ray, vLLM, DeepSpeed\): |campaign finished: |report: )")
    lines = (done.stdout + done.stderr).splitlines()
    assert lines and all(ours.match(line) for line in lines), [line for line in lines if not ours.match(line)]
    logs = tmp_path / "run" / "logs"
    assert "Ray" in (logs / "driver.log").read_text()          # the driver's own Ray/Train output went there
    assert (logs / "ray").is_symlink() and any((logs / "ray").glob("worker-*.out"))
    verbose = _nashray("run", "--resume", str(tmp_path / "run"), "--set", "schedule.rounds=2", "--verbose",
                       env={"RAY_ADDRESS": None})
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert any(not ours.match(line) for line in (verbose.stdout + verbose.stderr).splitlines())


def test_a_yaml_syntax_error_names_the_file_and_line_on_one_line(tmp_path):
    path = tmp_path / "campaign.yaml"
    path.write_text("learner:\n  workers: 2\n    zero_stage: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"campaign config {path} is not valid YAML: mapping values are not allowed here "
                              f"(line 3, column 15)")


def test_a_model_not_available_here_is_named_by_its_field(tiny_model_dir, tmp_path, monkeypatch):
    """Every model the campaign loads is checked: the policy and each model judge, inside ensembles too. A hub id
    is accepted offline only when the local HF cache holds it."""
    from huggingface_hub import constants

    from nashray.cluster.cli import check_models
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--org--cached" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    (tmp_path / "no-config").mkdir()
    judge = {"kind": "reward_model", "model": tiny_model_dir}
    check_models(parse_config({"model": {"path": "org/cached"}, "judges": {"oracle": judge}}))
    for config, named in [
        ({"model": {"path": "org/not-cached"}}, "model.path: 'org/not-cached' is not a local folder, and as an HF "
                                                "hub id it is not in the local HF cache"),
        ({"model": {"path": str(tmp_path / "no-config")}}, f"model.path: model folder {tmp_path / 'no-config'} has "
                                                           f"no config.json"),
        ({"model": {"path": tiny_model_dir}, "judges": {"oracle": {"kind": "ensemble", "members": [
            judge, {"kind": "llm_judge", "model": str(tmp_path / "judge")}]}}},
         f"judges.oracle.members.1.model: no model folder at {tmp_path / 'judge'}"),
        ({"model": {"path": tiny_model_dir}, "evaluation": {"oracle": {**judge, "model": "a/b/c"}}},
         "evaluation.oracle.model: no model folder at"),
    ]:
        with pytest.raises(ConfigError) as err:
            check_models(parse_config(config))
        assert str(err.value).startswith(named), err.value


@pytest.mark.parametrize("config", [
    {"algorithm": {"name": "nash_md", "clip_ratio": None},                             # one on-policy step a round
     "schedule": {"prompts_per_round": 4, "samples_per_prompt": 2}, "learner": {"micro_batch_size": 8}},
    {"algorithm": {"name": "nash_md"}, "learner": {"epochs_per_round": 30}},        # clipped ratios: many steps
    {"algorithm": {"name": "nash_md"}, "schedule": {"async_rounds": True}},         # ratio to the generators' policy
])
def test_nash_md_configs_that_keep_its_assumptions_load(config):
    parse_config({**config, "generators": {"engine": "hf"}})
