"""Security: a judge API key never reaches anything a campaign writes or prints; everything the project starts by
default listens on loopback only; files a user can hand in (checkpoints, parquet) are read without running code."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import yaml

from nashray.oracles.judging import DEFAULT_TEMPLATE, parse_judging_message

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "NASHRAY_PLANTED_JUDGE_KEY"
PLANTED_KEY = "sk-planted-" + hashlib.sha256(os.urandom(16)).hexdigest()[:24]
# Set at import, before the session's Ray cluster starts: Ray's workers (the judge actors) inherit the driver's
# environment, as they inherit a Kubernetes secret's environment on KubeRay.
os.environ[KEY_ENV] = PLANTED_KEY


# ---------------------------------------------------------------------------------------------- helpers

class KeyedJudge(BaseHTTPRequestHandler):
    """A judge endpoint that wants the planted key and prefers the shorter response. Like a careless server, it
    echoes the request's Authorization header in its error pages: every question fails once that way (so the
    judge logs a retry), and questions about an ``unlucky`` prompt always fail (so reasons are persisted)."""

    def log_message(self, *args):
        pass

    def send(self, status: int, payload: bytes):
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][-1]["content"]
        auth = self.headers.get("Authorization")
        with self.server.lock:
            seen = self.server.seen.get(content, 0)
            self.server.seen[content] = seen + 1
            self.server.auth.add(auth)
        prompt, first, second = parse_judging_message(DEFAULT_TEMPLATE, content)
        if auth != f"Bearer {PLANTED_KEY}":
            self.send(401, b'{"error": "wrong key"}')
        elif seen == 0 or "unlucky" in prompt:
            self.send(500, f"internal error; your header was {auth}".encode())
        else:
            lp_a, lp_b = -len(first) / 10, -len(second) / 10
            top = [{"token": "A", "logprob": lp_a}, {"token": "B", "logprob": lp_b}]
            verdict = top[0] if lp_a >= lp_b else top[1]
            reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": verdict["token"]},
                                  "logprobs": {"content": [dict(verdict, top_logprobs=top)]}}]}
            self.send(200, json.dumps(reply).encode())


@contextmanager
def keyed_judge_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), KeyedJudge)
    httpd.daemon_threads, httpd.lock, httpd.seen, httpd.auth = True, threading.Lock(), {}, set()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


class Listeners:
    """Every listening TCP socket and bound UDP socket of this process and its descendants (the local Ray cluster:
    GCS, raylet, agents, workers and the actors in them), sampled until stopped."""

    def __init__(self):
        self.seen: dict[tuple[int, str, int, str], str] = {}

    def sample(self) -> None:
        me = psutil.Process()
        for proc in [me] + me.children(recursive=True):
            try:
                name, conns = proc.name(), proc.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            for c in conns:
                kind = "tcp" if c.type == socket.SOCK_STREAM else "udp"
                if (kind == "tcp" and c.status == psutil.CONN_LISTEN) or (kind == "udp" and not c.raddr):
                    self.seen[(proc.pid, c.laddr.ip, c.laddr.port, kind)] = name

    def exposed(self) -> list[str]:
        return sorted(f"{name} (pid {pid}) {kind} {ip}:{port}" for (pid, ip, port, kind), name in self.seen.items()
                      if not is_loopback(ip))


@contextmanager
def watching_listeners(interval_s: float = 0.5):
    listeners, stop = Listeners(), threading.Event()

    def loop():
        while not stop.is_set():
            listeners.sample()
            stop.wait(interval_s)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield listeners
    finally:
        stop.set()
        thread.join()
        listeners.sample()


def files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:
                continue
    return hits


class Payload:
    """Creates ``marker`` if ever unpickled: ``pickle`` calls ``open(marker, "w")`` to rebuild it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


# ---------------------------------------------------------------------------------------------- the key

@pytest.mark.ray
def test_campaign_leaks_no_judge_key_and_listens_on_loopback_only(ray_cluster, tmp_path, tiny_model_dir, capfd):
    """A tiny-LLM campaign (vLLM generator, ZeRO-2 DeepSpeed learner) judged over HTTP with a planted API key, by a
    server that echoes the key back in its error pages. Afterwards the key is in no file of the run directory or of
    the Ray session (logs included) and in no captured output; every socket the campaign's processes listened on
    while it ran was on loopback."""
    import ray

    from nashray.trainers.checkpoints import load_deepspeed_file, validate_checkpoint
    from nashray.cluster.config import load_config
    from nashray.cluster.driver import run_campaign
    from nashray.layout import read_table

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": pid, "prompt": text}) + "\n" for pid, text in
                               [("lucky", "what is two plus two?"), ("unlucky", "an unlucky question")]))
    with keyed_judge_server() as server:
        config = tmp_path / "campaign.yaml"
        config.write_text(yaml.safe_dump(dict(
            seed=0,
            model={"path": tiny_model_dir, "dtype": "float32", "max_prompt_tokens": 96},
            algorithm={"name": "online_dpo"},
            generators={"count": 1, "engine": "vllm", "sampling": {"max_new_tokens": 8}, "kv_cache_gib": 0.25},
            judges={"count": 1, "retries": 1, "oracle": {
                "kind": "http", "url": f"http://127.0.0.1:{server.server_address[1]}/v1", "api_key_env": KEY_ENV,
                "retries": 1, "backoff_s": 0.01, "timeout_s": 10}},
            learner={"workers": 1, "zero_stage": 2, "precision": "fp32", "micro_batch_size": 4,
                     "optimizer": {"lr": 1e-4}, "threads_per_worker": 1},
            data={"prompts": str(prompts), "eval_fraction": 0.0},
            schedule={"rounds": 1, "prompts_per_round": 2, "samples_per_prompt": 3},
            evaluation={"every_rounds": 0},
            storage={"run_dir": str(tmp_path / "run")})))
        with watching_listeners() as listeners:
            run = run_campaign(str(config))
        assert server.auth == {f"Bearer {PLANTED_KEY}"}  # the key was in play on every request

    # The judge failed as planned: the lucky prompt's pairs judged after a retry, the unlucky ones dropped with the
    # server's error page — key redacted — as their reason.
    rows = read_table(run.round_dir(0) / "judgements.parquet")
    lucky = [r for r in rows if r["prompt_id"] == "lucky"]
    unlucky = [r for r in rows if r["prompt_id"] == "unlucky"]
    assert lucky and all(r["prob"] is not None for r in lucky)
    assert unlucky and all(r["prob"] is None and "[redacted]" in r["reason"] for r in unlucky)

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    # The judge actor logged its retries with the server's error page: the key went through the logging path.
    assert files_containing(session / "logs", b"your header was Bearer [redacted]"), "no retry warning logged"
    needle = PLANTED_KEY.encode()
    leaks = files_containing(run.root, needle) + files_containing(session, needle)
    captured = capfd.readouterr()
    assert not leaks, f"the planted judge key is written in {leaks}"
    assert PLANTED_KEY not in captured.out + captured.err, "the planted judge key was printed"

    # The round's checkpoint is one a resume accepts, and its DeepSpeed files load through the weights-only reader.
    checkpoint = run.checkpoint_dir(0)
    validate_checkpoint(checkpoint, load_config(run.config_path))
    optim = load_deepspeed_file(checkpoint / "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert optim["optimizer_state_dict"]

    assert listeners.seen, "no listening socket observed: the sampler is broken"
    assert not listeners.exposed(), f"listening beyond loopback: {listeners.exposed()}"


@pytest.mark.ray
def test_served_judge_and_local_cluster_listen_on_loopback_by_default(ray_cluster):
    """The local Ray cluster (``init_local_ray``) and the Ray Serve judge with the default ``judges.serve.host``."""
    import urllib.request

    from ray import serve

    from nashray.cluster.config import JudgeServeConfig
    from nashray.oracles.config import RuleOracleConfig
    from nashray.oracles.serve import serve_judge

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve_cfg = JudgeServeConfig(port=port, name="security-judge")
    assert serve_cfg.host == JudgeServeConfig().host
    try:
        with watching_listeners() as listeners:
            url = serve_judge(RuleOracleConfig(kind="rule", rule="concise_answer"), serve_cfg)
            request = urllib.request.Request(url + "/models")
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(request, timeout=5) as response:
                        assert response.status == 200
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"served judge at {url} never answered"
                    time.sleep(0.5)
    finally:
        serve.shutdown()
    assert any(p == port for (_, _, p, _) in listeners.seen), "the Serve proxy's port was not observed"
    assert not listeners.exposed(), f"listening beyond loopback: {listeners.exposed()}"


# ------------------------------------------------------------------------------------ code from files

RESUME_SCRIPT = """
import json, os, socket, sys
from pathlib import Path
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed, torch
import torch.distributed as dist
from safetensors.torch import load_file
from nashray.trainers.checkpoints import CheckpointError, load_deepspeed_state
from nashray.cluster.config import parse_config
from nashray.trainers.learner import Probe, build_optimizer, build_policy, deepspeed_config, gathered_state_dict, save_checkpoint
sys.path.insert(0, {tests!r})
from test_security import Payload

checkpoint, marker = Path(sys.argv[1]), Path(sys.argv[2])
cfg = parse_config(json.loads(sys.argv[3]))
dist.init_process_group("gloo")

def engine():
    policy, _, _, tokenizer = build_policy(cfg)
    optimizer = build_optimizer(policy.parameters(), cfg.learner.optimizer)
    engine = deepspeed.initialize(model=policy, optimizer=optimizer, config=deepspeed_config(cfg.learner, 1))[0]
    return engine, tokenizer

trained, tokenizer = engine()   # one step, then the learner's own checkpoint writer
ids = torch.randint(0, 100, (2, 8))
trained.backward(trained(input_ids=ids, labels=ids).loss)
trained.step()
save_checkpoint(trained, gathered_state_dict(trained, cfg.learner.zero_stage), tokenizer, checkpoint, 0, 0, {{}},
                Probe([], [], []))

resumed, _ = engine()
load_deepspeed_state(resumed, checkpoint)
saved = load_file(str(checkpoint / "model.safetensors"))
clean = {{"steps": resumed.global_steps,
          "max_abs_diff": max(float((resumed.module.state_dict()[k] - v).abs().max()) for k, v in saved.items())}}

planted = checkpoint / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
state = torch.load(planted, weights_only=True)   # the learner's own file, just written
state["planted"] = Payload(marker)
torch.save(state, planted)
try:
    load_deepspeed_state(engine()[0], checkpoint)
    error = None
except CheckpointError as err:
    error = str(err)
print("RESULT " + json.dumps({{"clean": clean, "error": error}}))
"""


def test_deepspeed_resume_refuses_a_planted_pickle_without_running_it(tmp_path, tiny_model_dir):
    """DeepSpeed reads its checkpoint with plain unpickling; the learner's resume path reads it weights-only. A real
    engine resumes the learner's real checkpoint; then, with an object that would create a file if unpickled planted
    in it, the resume fails naming the file and the object's callable, and nothing ran."""
    from nashray.trainers.checkpoints import CheckpointError, validate_checkpoint

    checkpoint, marker = tmp_path / "round-0000", tmp_path / "payload-ran"
    cfg = {"model": {"path": tiny_model_dir, "dtype": "float32"}, "generators": {"engine": "hf"},
           "learner": {"workers": 1, "zero_stage": 2, "precision": "fp32", "threads_per_worker": 1}}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", RESUME_SCRIPT.format(tests=str(ROOT / "tests")), str(checkpoint),
                           str(marker), json.dumps(cfg)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["clean"] == {"steps": 1, "max_abs_diff": 0.0}
    assert result["error"] is not None and "mp_rank_00_model_states.pt" in result["error"]
    assert "io.open" in result["error"]  # the callable that would have run
    assert not marker.exists(), "the planted object was unpickled: its code ran"

    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt names \['io\.open'\]"):
        validate_checkpoint(checkpoint, cfg)
    assert not marker.exists()


def test_deepspeed_state_types_round_trip_through_the_weights_only_reader(tmp_path):
    """What DeepSpeed pickles for fp16 and ZeRO (loss scalers, the stage enum, fragment addresses) comes back equal;
    a real learner's fp32 ZeRO-2 files are read in the campaign test above."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from nashray.trainers.checkpoints import load_deepspeed_file

    scaler = DynamicLossScaler(init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False, raise_error_at_min_scale=True, dtype=torch.float16)
    state = {"loss_scaler": scaler, "static": LossScaler(4.0), "zero_stage": ZeroStageEnum.gradients,
             "param_slice_mappings": [{"w": fragment_address(numel=6, start=2)}], "exp_avg": torch.arange(4.0)}
    torch.save(state, tmp_path / "optim_states.pt")
    loaded = load_deepspeed_file(tmp_path / "optim_states.pt")
    assert vars(loaded["loss_scaler"]) == vars(scaler) and vars(loaded["static"]) == vars(state["static"])
    assert loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["param_slice_mappings"] == state["param_slice_mappings"]
    assert torch.equal(loaded["exp_avg"], state["exp_avg"])


def test_a_pickle_named_safetensors_is_refused_without_running_it(tmp_path, tiny_model_dir):
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from nashray.trainers.checkpoints import CheckpointError, validate_checkpoint

    checkpoint, marker = tmp_path / "round-0000", tmp_path / "payload-ran"
    shutil.copytree(tiny_model_dir, checkpoint)
    (checkpoint / "COMPLETE").write_text(json.dumps({"round": 0, "metrics": {}}))
    (checkpoint / "model.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    cfg = {"model": {"path": tiny_model_dir}, "generators": {"engine": "hf"}}
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        validate_checkpoint(checkpoint, cfg)
    with pytest.raises(SafetensorError):  # what the driver's push from a checkpoint reads it with
        load_file(str(checkpoint / "model.safetensors"))
    assert not marker.exists()


def test_parquet_with_a_pickled_extension_type_is_read_without_unpickling(tmp_path):
    """Arrow once rebuilt ``arrow.py_extension_type`` columns by unpickling their metadata (CVE-2023-47248): a
    round's parquet files and prompt files must read such a column as plain data."""
    import pickle

    import pyarrow as pa
    import pyarrow.parquet as pq

    from nashray.cluster.prompts import load_prompts
    from nashray.layout import read_table

    marker = tmp_path / "payload-ran"
    field = pa.field("blob", pa.binary(), metadata={b"ARROW:extension:name": b"arrow.py_extension_type",
                                                    b"ARROW:extension:metadata": pickle.dumps(Payload(marker))})
    table = pa.Table.from_arrays([pa.array(["hi"]), pa.array([b"x"], pa.binary())],
                                 schema=pa.schema([pa.field("prompt", pa.string()), field]))
    path = tmp_path / "prompts.parquet"
    pq.write_table(table, path)
    assert read_table(path) == [{"prompt": "hi", "blob": b"x"}]
    assert [p.prompt for p in load_prompts(str(path))] == ["hi"]
    assert not marker.exists()
