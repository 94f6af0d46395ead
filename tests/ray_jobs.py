"""`ray job submit` of a campaign from a test: the `ray` CLI next to this interpreter, free loopback ports, waiting
for a head's job server."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_job_server(url: str, env: dict, head_alive: Callable[[], bool], timeout_s: float = 120) -> None:
    """Until `ray job list` answers at ``url``; fails at once if the head died."""
    deadline = time.monotonic() + timeout_s
    while subprocess.call([RAY, "job", "list", "--address", url], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) != 0:
        assert head_alive(), "the head node exited"
        assert time.monotonic() < deadline, f"the head's job server at {url} did not come up in {timeout_s} s"
        time.sleep(2)


def submit_campaign(url: str, config: str | Path, env: dict, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """`ray job submit` of `nashray run CONFIG` with this checkout as the job's working dir; waits for the job's end."""
    return subprocess.run(
        [RAY, "job", "submit", "--address", url, "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "runs"]}),
         "--", sys.executable, "-m", "nashray.cli", "run", str(config)],
        env=env, capture_output=True, text=True, timeout=timeout_s)


def assert_job_succeeded(done: subprocess.CompletedProcess) -> None:
    """The CLI exits 1 on FAILED only (0 on STOPPED too): read the final status it logs as well."""
    output = done.stdout + done.stderr
    assert done.returncode == 0 and re.search(r"Job '\S+' succeeded", output), output[-6000:]
