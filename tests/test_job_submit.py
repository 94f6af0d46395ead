"""`ray job submit` of a campaign to a `ray start --head` cluster on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node():
    """A real head node started with the `ray` CLI (blocking, in its own process group), dashboard on loopback."""
    temp = tempfile.mkdtemp(prefix="nashray-head-", dir="/tmp")
    port, dashboard = free_port(), free_port()
    # One auth mode for the head and its clients: a token file left in ~/.ray by an earlier cluster would otherwise
    # make the head demand a token that the job CLI (auth mode unset) does not send.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": temp, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=6",
         f"--temp-dir={temp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--object-store-memory={512 * 2**20}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while subprocess.call([RAY, "job", "list", "--address", url], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) != 0:
        assert proc.poll() is None, "ray start --head exited"
        assert time.monotonic() < deadline, "the head's job server did not come up"
        time.sleep(2)
    yield url, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_a_campaign(head_node, tmp_path):
    url, env = head_node
    run_dir = tmp_path / "run"
    config = tmp_path / "campaign.yaml"
    config.write_text(yaml.safe_dump({
        "algorithm": {"name": "inpo"},
        "generators": {"count": 1, "engine": "tabular"},
        "judges": {"count": 1, "oracle": {"kind": "matrix"}},
        "learner": {"workers": 1, "precision": "fp32", "micro_batch_size": 64, "threads_per_worker": 1,
                    "optimizer": {"name": "adam", "lr": 0.05}},
        "data": {"game": "builtin:rps"},
        "schedule": {"rounds": 2, "prompts_per_round": 1, "samples_per_prompt": 16},
        "storage": {"run_dir": str(run_dir)},
    }))
    done = subprocess.run(
        [RAY, "job", "submit", "--address", url, "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "runs"]}),
         "--", sys.executable, "-m", "cluster.cli", "run", str(config)],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "campaign finished" in done.stdout
    state = json.loads((run_dir / "state.json").read_text())
    assert state["rounds_completed"] == 2
    assert [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1]
