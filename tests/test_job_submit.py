"""`ray job submit` of a campaign to a `ray start --head` cluster on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile

import pytest
import yaml

from tests.ray_jobs import RAY, assert_job_succeeded, free_port, submit_campaign, wait_for_job_server

pytestmark = pytest.mark.ray


@pytest.fixture
def head_node():
    """A real head node started with the `ray` CLI (blocking, in its own process group), dashboard on loopback."""
    temp = tempfile.mkdtemp(prefix="nashray-head-", dir="/tmp")
    port, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": temp}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=6",
         f"--temp-dir={temp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--object-store-memory={512 * 2**20}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    wait_for_job_server(url, env, head_alive=lambda: proc.poll() is None)
    yield url, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)  # `ray start --block` rarely exits on SIGTERM alone: the group is killed next
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
    done = submit_campaign(url, config, env)
    assert_job_succeeded(done)
    assert "campaign finished" in done.stdout
    state = json.loads((run_dir / "state.json").read_text())
    assert state["rounds_completed"] == 2
    assert [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1]
