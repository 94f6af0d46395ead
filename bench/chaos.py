"""Chaos campaigns: every role SIGKILLed in every phase on a seeded schedule, and a judge that fails on purpose.

Two campaigns of ``--rounds`` rounds (30 by default), each started as ``python -m nashray.cluster.cli run CONFIG`` in a
new session, with ``on_failure: retry`` for the generators and judges:

- **tabular**: INPO on ``builtin:random10`` (the config of ``tests/test_resume.py``, heavier rounds);
- **llm**: online DPO on the tiny random Llama of ``tests/helpers.py`` with the vLLM engine, judged through a local
  HTTP judge server (the ``http`` oracle kind) that this script runs: it answers with the ``readable`` rule's
  preference and fails a seeded fraction of requests with a timeout, an HTTP 500 or a malformed reply.

During each campaign a seeded schedule SIGKILLs a generator actor, a judge actor, a learner (Ray Train) worker, and
the driver together with its whole local Ray cluster (its process group); a killed driver is resumed with
``run --resume RUN_DIR``. A kill is triggered when the driver's progress line ``[round t] NAME …`` is read from its
stderr (generate, judge, train, push, eval) or when ``checkpoints/round-t.tmp`` appears (the checkpoint write, done
by the learner in the background); the phase a kill landed in is what was observed at that instant. Each campaign is
also run once without faults, same seed, as the reference.

Figures, read from the run directories afterwards: rounds completed; prompts lost (every round's prompts, the same
as the reference's, each with its K samples); comparisons paid for twice beyond the cache (HTTP judge: a question
answered by the server while its comparison was already in RUN_DIR/judge-cache); records trained twice (a round
recorded twice in metrics.jsonl, or trained to completion twice by drivers that went on to record it; rounds trained
again after the newest checkpoint, ``replayed_rounds``, are reported apart); the final metric against the reference.
Results: ``bench/results/chaos.json``.

    python -m bench.chaos            # both campaigns, 30 rounds, 15 kills (about an hour on 2 shared cores)
    python -m bench.chaos --quick    # a smoke run: 6 rounds each, a few kills
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import yaml

from bench.common import REPO, Run, setup_environment, summary_row
from nashray.layout import complete_checkpoints

PHASE_LINE = re.compile(r"^\[round (\d+)\] (\w+) (…|done in ([\d.]+)s)")
ROUND_LINE = re.compile(r"^round (\d+) \(")
PROCESS_TITLES = {"generator": "ray::GeneratorActor", "judge": "ray::JudgeActor", "learner": "ray::RayTrainWorker"}


# ------------------------------------------------------------------------------------------------ schedule

@dataclass
class Kill:
    role: str          # generator, judge, learner, driver
    phase: str         # generate, judge, train, push, eval, checkpoint (the target)
    round: int         # the first round at which the target is tried; later rounds if it was missed
    fired_round: int | None = None
    time_s: float | None = None            # since the campaign's start
    wall_time: str | None = None
    epoch: float | None = None
    pid: int | None = None
    observed_phase: str | None = None       # the driver's open phase when the kill was sent
    checkpoint_writing: int | None = None   # round whose checkpoint was being written (round-t.tmp present)
    confirmed: bool | None = None           # the target phase was in flight when the process died
    note: str = ""


def build_schedule(targets: list[tuple[str, str]], rounds: int, rng: random.Random) -> list[Kill]:
    """The targets in a seeded order, at seeded rounds spread over the campaign (at least 2 rounds apart, never the
    first round, whose baseline evaluation is not a round phase, nor the last)."""
    order = targets[:]
    rng.shuffle(order)
    slots = list(range(1, rounds - 1))
    spacing = max(2, len(slots) // len(order))
    starts = []
    for n in range(len(order)):
        low = 1 + n * spacing
        starts.append(min(rounds - 2, low + rng.randrange(max(1, spacing - 1))))
    return [Kill(role, phase, t) for (role, phase), t in zip(order, starts)]


# ------------------------------------------------------------------------------------------------ one driver

def session_members(session: int) -> list[int]:
    """Every live process of ``session`` (one getsid per process: fast enough to kill a cluster at once)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session:
                    members.append(int(entry))
            except OSError:
                continue
    return members


def in_session(pid: int, session: int) -> bool:
    try:
        return os.getsid(pid) == session
    except OSError:
        return False


def session_pids(session: int, title: str) -> list[int]:
    """Processes of the driver's session (its whole local Ray cluster) whose title is ``title`` (``ray::X`` or
    ``ray::X.method()``)."""
    import psutil
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(proc.info["pid"]) != session:
                continue
            head = (proc.info["cmdline"] or [""])[0]
        except (OSError, psutil.Error):
            continue
        if head.strip() and head.split()[0].split(".")[0] == title:
            found.append(proc.info["pid"])
    return sorted(found)


def process_title(pid: int) -> str | None:
    """``ray::X`` of a live process whose title is ``ray::X`` or ``ray::X.method()``, else its first word."""
    try:
        head = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return None
    return head.split()[0].split(".")[0] if head.strip() else None


class Driver:
    """``nashray run`` in its own session; its stderr read line by line, kills fired from the reading thread the
    instant their progress line arrives (tabular phases last milliseconds)."""

    def __init__(self, args: list[str], log_path: Path, clock_start: float, run_dir: Path):
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        env.pop("RAY_ADDRESS", None)
        self.run_dir, self.clock_start = run_dir, clock_start
        self.proc = subprocess.Popen([sys.executable, "-m", "nashray.cluster.cli", "run", *args], cwd=REPO, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     start_new_session=True)
        self.log = open(log_path, "a", buffering=1)
        self.log.write(f"=== run {' '.join(args)} (pid {self.proc.pid})\n")
        self.lines: list[tuple[float, str]] = []
        self.open_phase: tuple[str, int] | None = None
        self.last_round_seen = -1
        self.on_line = None          # callback(driver, line) run in the reading thread
        self.killed_at: float | None = None
        self.members: list[int] = []  # the session's processes, looked up every half second
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def now(self) -> float:
        return time.monotonic() - self.clock_start

    def _read(self) -> None:
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            stamp = self.now()
            with self.lock:
                self.lines.append((stamp, line))
                m = PHASE_LINE.match(line)
                if m:
                    t, name = int(m.group(1)), m.group(2)
                    self.last_round_seen = max(self.last_round_seen, t)
                    self.open_phase = (name, t) if m.group(3) == "…" else None
            self.log.write(f"{stamp:8.3f} {line}\n")
            if self.on_line is not None and self.killed_at is None:
                self.on_line(self, line)

    def kill_group(self) -> None:
        """SIGKILL the driver and its whole local Ray cluster: every process of its session. Its process group alone
        is not enough: Ray starts each worker (actors, learner workers) in a process group of its own, which would
        outlive the driver, GCS and raylet for a while and could still write to the run directory. The group and the
        members known beforehand go at once (a scan of /proc takes longer than a tabular phase), then any others."""
        self.killed_at = self.now()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in self.members + session_members(self.proc.pid):
            try:
                if in_session(pid, self.proc.pid):  # still ours: a pid looked up earlier may have been reused
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait(self, timeout_s: float | None = None) -> int:
        rc = self.proc.wait(timeout=timeout_s)
        self.reader.join(30)
        self.log.close()
        return rc

    def phase_closed_before_death(self, name: str, t: int) -> bool:
        """Whether ``[round t] NAME done`` reached the pipe (so was written before the process died)."""
        return any(line.startswith(f"[round {t}] {name} done") for _, line in self.lines)

    def train_losses(self) -> dict[int, float]:
        """Round → loss of each ``[round t] train done …: loss X`` line."""
        out = {}
        for _, line in self.lines:
            m = re.match(r"^\[round (\d+)\] train done in [\d.]+s: loss ([-\d.naninf]+)", line)
            if m:
                out[int(m.group(1))] = float(m.group(2))
        return out


def rounds_completed(run: Path) -> int:
    try:
        return json.loads((run / "state.json").read_text())["rounds_completed"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def complete_rounds(run: Path) -> list[int]:
    """Rounds with a complete checkpoint (its COMPLETE marker) under RUN_DIR/checkpoints."""
    return [int(p.name[len("round-"):]) for p in complete_checkpoints(run / "checkpoints")]


def writing_checkpoint(run: Path) -> int | None:
    """The round whose checkpoint is being written now (its ``round-t.tmp`` folder exists and it is newer than every
    complete checkpoint: an older one is a write cut off earlier), else None."""
    complete = complete_rounds(run)
    writing = [int(tmp.name[len("round-"):-len(".tmp")]) for tmp in (run / "checkpoints").glob("round-*.tmp")]
    writing = [t for t in writing if not complete or t > complete[-1]]
    return max(writing) if writing else None


class Campaign:
    """One campaign under a kill schedule: started, killed, resumed until its last round is recorded."""

    def __init__(self, name: str, config: Path, run: Path, schedule: list[Kill], log_path: Path,
                 timeout_s: float):
        self.name, self.config, self.run, self.schedule = name, config, run, schedule
        self.log_path, self.timeout_s = log_path, timeout_s
        self.attempts: list[dict] = []   # per driver process: what it trained, whether it was killed
        self.pending: list[Kill] = list(schedule)

    def execute(self) -> float:
        start = time.monotonic()
        args = [str(self.config)]
        while True:
            at_start, state_at_start = complete_checkpoints(self.run), rounds_completed(self.run)
            driver = Driver(args, self.log_path, start, self.run)
            rc = self._drive(driver, start)
            self.attempts.append({"args": args, "rc": rc, "killed_at_s": driver.killed_at,
                                  "rounds_completed_at_start": state_at_start,
                                  "complete_checkpoints_at_start": at_start,
                                  "rounds_completed_at_end": rounds_completed(self.run),
                                  "train_losses": driver.train_losses()})
            if driver.killed_at is None:
                if rc != 0:
                    raise RuntimeError(f"{self.name}: campaign exited with {rc}; see {self.log_path}")
                break
            args = ["--resume", str(self.run)]
        for kill in self.pending:
            kill.note = kill.note or "never fired: the campaign ended first"
        return time.monotonic() - start

    def _drive(self, driver: Driver, start: float) -> int | None:
        """Fire the pending kills on this driver; returns its exit code (None when it was killed)."""
        fired_here, lock, pids = [], threading.Lock(), {}

        def fire(kill: Kill, t: int) -> None:
            with lock:
                if not self.pending or self.pending[0] is not kill:
                    return
                self.pending.pop(0)
            kill.fired_round, kill.time_s = t, driver.now()
            kill.epoch = time.time()
            kill.wall_time = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(kill.epoch))
            with driver.lock:
                open_phase = driver.open_phase
            kill.observed_phase = open_phase[0] if open_phase else "between phases"
            kill.checkpoint_writing = writing_checkpoint(self.run)
            fired_here.append(kill)
            if kill.role == "driver":
                kill.pid = driver.proc.pid
                driver.kill_group()
            else:
                title = PROCESS_TITLES[kill.role]
                # the pids looked up beforehand (a scan of every process takes longer than a tabular phase)
                alive = [pid for pid in pids.get(kill.role, [])
                         if process_title(pid) == title and in_session(pid, driver.proc.pid)]
                alive = alive or session_pids(driver.proc.pid, title)
                if not alive:
                    kill.note = f"no {title} process found"
                    return
                kill.pid = alive[0]
                try:
                    os.kill(kill.pid, signal.SIGKILL)
                except ProcessLookupError:
                    kill.note = "the process was gone already"
            if kill.phase == "checkpoint":  # the write was cut off if its temporary folder outlived the process
                time.sleep(0.05)
                kill.confirmed = (self.run / f"checkpoints/round-{t:04d}.tmp").exists()

        def on_line(drv: Driver, line: str) -> None:
            kill = self.pending[0] if self.pending else None
            m = PHASE_LINE.match(line)
            if kill is None or m is None:
                return
            t, name, started = int(m.group(1)), m.group(2), m.group(3) == "…"
            if kill.phase == "checkpoint" and name == "train" and not started and t >= kill.round:
                # the learner answers, then writes the round's checkpoint: watch for its folder closely for a while
                folder, until = self.run / f"checkpoints/round-{t:04d}.tmp", time.monotonic() + 2.0
                while time.monotonic() < until:
                    if folder.exists():
                        fire(kill, t)
                        return
                    time.sleep(0.0002)
            elif kill.phase == name and started and t >= kill.round:
                fire(kill, t)

        driver.on_line = on_line
        deadline, next_scan = time.monotonic() + self.timeout_s, 0.0
        while driver.proc.poll() is None:
            if time.monotonic() > next_scan and self.pending:
                if self.pending[0].role in PROCESS_TITLES:
                    role = self.pending[0].role
                    pids[role] = session_pids(driver.proc.pid, PROCESS_TITLES[role])
                else:
                    driver.members = session_members(driver.proc.pid)
                next_scan = time.monotonic() + 0.5
            if time.monotonic() > deadline:
                driver.kill_group()
                raise RuntimeError(f"{self.name}: no end within {self.timeout_s:.0f}s; see {self.log_path}")
            time.sleep(0.02)
        rc = driver.wait()
        for kill in fired_here:  # what this driver's kills hit
            if kill.confirmed is None and kill.pid is not None:
                kill.confirmed = self._confirm(kill, driver)
        return None if driver.killed_at is not None else rc

    def _confirm(self, kill: Kill, driver: Driver) -> bool:
        t = kill.fired_round
        if kill.role == "driver":  # the phase's done line never reached the pipe: it was in flight at death
            return not driver.phase_closed_before_death(kill.phase, t)
        # an actor: the phase had started (the kill fired on its line) and ended after the kill, so the call in
        # flight (or the next one of this phase) met the dead actor
        ends = [s for s, line in driver.lines if line.startswith(f"[round {t}] {kill.phase} done")]
        return bool(ends) and ends[0] >= kill.time_s


# ------------------------------------------------------------------------------------------------ HTTP judge

class FaultyJudge:
    """A local HTTP judge on 127.0.0.1 (OpenAI chat-completions shape, as the ``http`` oracle asks): the ``readable``
    rule's preference as the verdict tokens' log-probabilities; a seeded fraction of requests fails with a timeout
    (no answer within the client's timeout), an HTTP 500 or a malformed reply (non-JSON, no choices, prose). Every
    request is logged with its outcome and whether the comparison was in the run's judge cache when it was asked."""

    def __init__(self, fault_rate: float, seed: int, client_timeout_s: float):
        from http.server import BaseHTTPRequestHandler

        from nashray.oracles import build_oracle
        from nashray.oracles.config import parse_oracle_config
        self.rule = build_oracle(parse_oracle_config({"kind": "rule", "rule": "readable"}))
        self.fault_rate, self.seed, self.client_timeout_s = fault_rate, seed, client_timeout_s
        self.lock = threading.Lock()
        self.log: list[dict] = []
        self.asked: dict[str, int] = {}
        self.cache = None
        self.cache_dir: Path | None = None
        self.oracle_id: str | None = None
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                judge.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads, self.httpd.block_on_close = True, False
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def attach(self, run: Path, oracle_cfg: dict) -> None:
        """Watch this run's judge cache (the campaign's HTTP oracle id names its entries) and start a fresh log."""
        from nashray.oracles.http_judge import HTTPJudge
        cfg = {k: v for k, v in oracle_cfg.items() if k != "kind"}
        self.oracle_id = HTTPJudge(**cfg).oracle_id
        self.cache_dir, self.cache = run / "judge-cache", None
        with self.lock:
            self.log, self.asked = [], {}

    def _cached(self, prompt: str, first: str, second: str) -> bool:
        from nashray.oracles.base import Comparison
        from nashray.oracles.cache import VerdictCache
        if self.cache is None:
            if self.cache_dir is None or not self.cache_dir.is_dir():
                return False
            self.cache = VerdictCache(self.cache_dir, self.oracle_id, writer="chaos-reader-never-writes")
        # the question is the comparison (prompt, a, b) as given or swapped (the second order of a comparison)
        found = self.cache.get([Comparison(prompt, first, second), Comparison(prompt, second, first)])
        return any(p is not None for p in found)

    def _fault(self, question: str, attempt: int) -> str | None:
        digest = hashlib.sha256(f"{self.seed}|{attempt}|{question}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2 ** 64
        if u >= self.fault_rate:
            return None
        return ("timeout", "http500", "not_json", "no_choices", "prose")[digest[8] % 5]

    def handle(self, request) -> None:
        from nashray.oracles.base import Comparison
        from nashray.oracles.judging import DEFAULT_TEMPLATE, parse_judging_message
        from tests.test_http_judge import reply
        body = json.loads(request.rfile.read(int(request.headers["Content-Length"])))
        content = body["messages"][-1]["content"]
        prompt, first, second = parse_judging_message(DEFAULT_TEMPLATE, content)
        question = hashlib.sha256(content.encode()).hexdigest()
        with self.lock:
            attempt = self.asked.get(question, 0)
            self.asked[question] = attempt + 1
            cached = self._cached(prompt, first, second)
        fault = self._fault(question, attempt)
        entry = {"time": time.time(), "question": question, "attempt": attempt, "fault": fault,
                 "cached_before": cached, "answered": False}
        try:
            if fault == "timeout":
                time.sleep(self.client_timeout_s + 0.5)
                self._send(request, 200, json.dumps(reply("A")).encode())
            elif fault == "http500":
                self._send(request, 500, b"internal error", "text/plain")
            elif fault == "not_json":
                self._send(request, 200, b"<html>upstream hiccup</html>", "text/html")
            elif fault == "no_choices":
                self._send(request, 200, json.dumps({"id": "x", "choices": []}).encode())
            elif fault == "prose":
                self._send(request, 200, json.dumps(reply("Both responses have merit.")).encode())
            else:
                p = self.rule.compare([Comparison(prompt, first, second)])[0].prob
                p = min(max(0.5 if p is None else p, 1e-4), 1 - 1e-4)
                verdict = "A" if p >= 0.5 else "B"
                self._send(request, 200, json.dumps(reply(verdict, [("A", math.log(p)),
                                                                    ("B", math.log(1 - p))])).encode())
                entry["answered"] = True
        except (BrokenPipeError, ConnectionResetError):
            entry["answered"] = False
            entry["fault"] = entry["fault"] or "client gone"
        with self.lock:
            self.log.append(entry)

    @staticmethod
    def _send(request, status: int, payload: bytes, content_type: str = "application/json") -> None:
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        request.wfile.write(payload)

    def figures(self, kills: list[Kill] = ()) -> dict:
        """Requests, faults, and the questions answered more than once: beyond the cache (the comparison was cached
        when asked again: paid twice for nothing), or never cached — answered to a judge or driver killed before it
        wrote the verdict (within 10 s before a kill), or else the other order of a comparison dropped once (a
        comparison is cached only when both orders were answered, and asked again whole)."""
        with self.lock:
            log = list(self.log)
        answered = [e for e in log if e["answered"]]
        per_question: dict[str, int] = {}
        for e in answered:
            per_question[e["question"]] = per_question.get(e["question"], 0) + 1
        deaths = [k.epoch for k in kills if k.epoch is not None and k.role in ("judge", "driver")]
        first_answer: dict[str, float] = {}
        again = {"answered_to_a_process_killed_before_caching": 0, "other_order_of_a_dropped_comparison": 0}
        for e in sorted(answered, key=lambda e: e["time"]):
            if e["question"] not in first_answer:
                first_answer[e["question"]] = e["time"]
            elif not e["cached_before"]:
                t0 = first_answer[e["question"]]
                key = ("answered_to_a_process_killed_before_caching" if any(0 <= d - t0 <= 10 for d in deaths)
                       else "other_order_of_a_dropped_comparison")
                again[key] += 1
        faults: dict[str, int] = {}
        for e in log:
            if e["fault"]:
                faults[e["fault"]] = faults.get(e["fault"], 0) + 1
        return {"requests": len(log), "answered": len(answered), "unique_questions_answered": len(per_question),
                "faults": faults,
                "answered_again_never_cached": sum(n - 1 for n in per_question.values())
                - sum(e["cached_before"] for e in answered), "answered_again_never_cached_by_cause": again,
                "paid_twice_beyond_cache": sum(e["cached_before"] for e in answered)}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------------------------------------ configs

def tabular_sections(run: Path, rounds: int, seed: int) -> dict:
    """tests/test_resume.py's tabular campaign, with rounds of about a second (more samples and learner steps) and
    room for every kill: retry policies, restarts and learner worker-group restarts to spare."""
    from tests.test_resume import tabular_config
    with tempfile.TemporaryDirectory() as tmp:
        cfg = yaml.safe_load(tabular_config(Path(tmp), rounds).read_text())
    cfg["seed"] = seed
    cfg["generators"].update(on_failure="retry", max_restarts=20)
    cfg["judges"].update(on_failure="retry", max_restarts=20)
    cfg["learner"].update(max_failures=20, micro_batch_size=16)
    cfg["schedule"]["samples_per_prompt"] = 48
    cfg["storage"] = {"run_dir": str(run), "keep_checkpoints": 3}
    return cfg


def llm_sections(run: Path, rounds: int, seed: int, model_dir: Path, judge_url: str) -> dict:
    """tests/test_campaign.py's ``llm_config`` (vLLM engine, online DPO) with few new tokens, judged by the HTTP
    judge at ``judge_url``."""
    from tests.test_campaign import llm_config
    with tempfile.TemporaryDirectory() as tmp:
        cfg = yaml.safe_load(Path(llm_config(Path(tmp), str(model_dir), {"name": "online_dpo"},
                                             rounds=rounds)).read_text())
    cfg["seed"] = seed
    cfg["generators"].update(sampling={"max_new_tokens": 8}, on_failure="retry", max_restarts=20,
                             resources={"num_cpus": 0.5}, timeout_s=120)
    cfg["judges"] = {"count": 1, "on_failure": "retry", "max_restarts": 20, "batch_size": 4, "timeout_s": 120,
                     "resources": {"num_cpus": 0.5}, "oracle": llm_oracle(judge_url)}
    cfg["learner"].update(max_failures=20)
    cfg["storage"] = {"run_dir": str(run), "keep_checkpoints": 3}
    cfg["evaluation"] = {"every_rounds": 1, "prompts": 8}
    return cfg


def llm_oracle(url: str) -> dict:
    return {"kind": "http", "url": url, "timeout_s": 1.0, "retries": 3, "backoff_s": 0.1, "concurrency": 4}


def write_config(root: Path, sections: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "campaign.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path


# ------------------------------------------------------------------------------------------------ figures

def metrics_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def redrawn_samples(run: Path, rounds: int) -> dict:
    """Policy samples (prompt, response text) identical to one of an earlier round, and the rounds they repeat: a
    language-model policy that moves every round draws the same 8 tokens again by chance only."""
    from nashray.layout import read_table
    seen: dict[tuple, int] = {}
    repeats, pairs = 0, {}
    for t in range(rounds):
        drawn = {(s["prompt_id"], s["response"]) for s in read_table(run / f"rounds/{t:04d}/samples.parquet")
                 if s["source"] == "policy"}
        for key in drawn:
            if key in seen:
                repeats += 1
                pairs[f"{t} repeats {seen[key]}"] = pairs.get(f"{t} repeats {seen[key]}", 0) + 1
            else:
                seen[key] = t
    return {"samples": repeats, "by_round": pairs}


def campaign_figures(run: Path, reference: Path, rounds: int, k: int, prompts: int, attempts: list[dict],
                     final_keys: tuple[str, ...]) -> dict:
    from nashray.layout import read_table
    metrics, ref_metrics = metrics_of(run), metrics_of(reference)
    recorded = [m["round"] for m in metrics]
    lost, extra = 0, 0
    for t in range(rounds):
        path = run / f"rounds/{t:04d}/samples.parquet"
        if not path.exists():
            lost += prompts
            continue
        policy = [s for s in read_table(path) if s["source"] == "policy"]
        ref = [s for s in read_table(reference / f"rounds/{t:04d}/samples.parquet") if s["source"] == "policy"]
        want = {s["prompt_id"] for s in ref}
        got: dict[str, set] = {}
        for s in policy:
            got.setdefault(s["prompt_id"], set()).add(s["sample_index"])
        lost += sum(1 for p in want if len(got.get(p, ())) != k)
        extra += len(set(got) - want)
    # Trained twice: a round recorded twice, or trained to completion by two drivers that both went on to record it
    # (a driver killed before recording round t trained it for nothing: its weights died with it).
    twice = sum(recorded.count(t) - 1 for t in set(recorded))
    completed_by = {}
    for a in attempts:
        for t in a["train_losses"]:
            if int(t) < a["rounds_completed_at_end"]:
                completed_by.setdefault(int(t), []).append(a)
    twice += sum(len(v) - 1 for v in completed_by.values())
    # The round in flight when a driver was killed, run again by the next: answered from its checkpoint when that
    # was complete (not trained), else trained again from its persisted dataset (|loss − the killed driver's|).
    retrained = {}
    for a, b in zip(attempts, attempts[1:]):
        for t, loss in a["train_losses"].items():
            if t in b["train_losses"]:
                retrained[t] = ("answered from its checkpoint" if t in b["complete_checkpoints_at_start"]
                                else {"trained_again_loss_diff": abs(loss - b["train_losses"][t])})
    final = {key: {"chaos": metrics[-1].get(key), "reference": ref_metrics[-1].get(key)} for key in final_keys}
    return {"rounds_completed": rounds_completed(run), "rounds_recorded": recorded == list(range(rounds)),
            "prompts_lost": lost, "unexpected_prompts": extra, "records_trained_twice": twice,
            "rounds_trained_again_after_a_killed_driver": {str(t): d for t, d in sorted(retrained.items())},
            "replayed_rounds": {str(m["round"]): {"replayed_rounds": m["replayed_rounds"],
                                                  "replay_max_loss_diff": m["replay_max_loss_diff"]}
                                for m in metrics if "replayed_rounds" in m},
            "generator_restarts": sum(m.get("generator_restarts", 0) for m in metrics),
            "judge_restarts": sum(m.get("judge_restarts", 0) for m in metrics),
            "judge_comparisons": sum(m.get("judge_comparisons", 0) for m in metrics),
            "judge_cached": sum(m.get("judge_cached", 0) for m in metrics),
            "judge_calls": sum(m.get("judge_calls", 0) for m in metrics),
            "judge_dropped": sum(m.get("judge_dropped", 0) for m in metrics),
            "driver_starts": len(attempts), "final": final}


# ------------------------------------------------------------------------------------------------ main

TABULAR_TARGETS = [("driver", "generate"), ("driver", "judge"), ("driver", "train"), ("driver", "push"),
                   ("driver", "eval"), ("driver", "checkpoint"), ("generator", "generate"), ("judge", "judge"),
                   ("learner", "train")]
LLM_TARGETS = [("generator", "generate"), ("generator", "eval"), ("generator", "push"), ("judge", "judge"),
               ("judge", "eval"), ("learner", "train"), ("learner", "checkpoint"), ("driver", "judge"),
               ("driver", "eval"), ("driver", "checkpoint")]
QUICK_TABULAR = [("driver", "train"), ("driver", "checkpoint"), ("judge", "judge")]
QUICK_LLM = [("generator", "generate"), ("learner", "checkpoint"), ("driver", "eval")]


def run_segment(name: str, sections_for, rounds: int, targets, rng: random.Random, work: Path, timeout_s: float,
                before=None) -> dict:
    """The reference campaign, then the faulted one; their figures."""
    out = {}
    ref_run, chaos_run = work / name / "reference" / "run", work / name / "chaos" / "run"
    ref_cfg = write_config(ref_run.parent, sections_for(ref_run, faults=False))
    if before:
        before(ref_run, faults=False)
    ref = Campaign(f"{name}-reference", ref_cfg, ref_run, [], work / f"{name}-reference.log", timeout_s)
    out["reference_wall_s"] = round(ref.execute(), 1)
    print(f"{name}: reference done in {out['reference_wall_s']}s", flush=True)
    schedule = build_schedule(targets, rounds, rng)
    chaos_cfg = write_config(chaos_run.parent, sections_for(chaos_run, faults=True))
    if before:
        before(chaos_run, faults=True)
    chaos = Campaign(f"{name}-chaos", chaos_cfg, chaos_run, schedule, work / f"{name}-chaos.log", timeout_s)
    out["chaos_wall_s"] = round(chaos.execute(), 1)
    print(f"{name}: chaos done in {out['chaos_wall_s']}s", flush=True)
    out["schedule"] = [asdict(k) for k in schedule]
    out["attempts"] = [{k: v for k, v in a.items() if k != "train_losses"} for a in chaos.attempts]
    out["runs"] = {"reference": str(ref_run), "chaos": str(chaos_run)}
    out["_campaign"] = chaos
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 6 rounds per campaign, 3 kills each")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per campaign (default 30; quick 6)")
    parser.add_argument("--seed", type=int, default=0, help="the kill schedule's and the judge faults' seed")
    parser.add_argument("--fault-rate", type=float, default=0.2, help="share of HTTP judge requests that fail")
    parser.add_argument("--only", choices=("tabular", "llm"), default=None)
    parser.add_argument("--work", default=None, help="where the run directories go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    setup_environment()
    rounds = args.rounds or (6 if args.quick else 30)
    work = Path(args.work or tempfile.mkdtemp(prefix="nashray-chaos-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    bench = Run("chaos", {"quick": args.quick, "rounds": rounds, "seed": args.seed, "fault_rate": args.fault_rate})
    result = bench.result
    result["work"] = str(work)
    segments = {}
    try:
        if args.only in (None, "tabular"):
            seg = run_segment("tabular", lambda run, faults: tabular_sections(run, rounds, args.seed), rounds,
                              QUICK_TABULAR if args.quick else TABULAR_TARGETS, rng, work, 3600)
            chaos = seg.pop("_campaign")
            seg["figures"] = campaign_figures(Path(seg["runs"]["chaos"]), Path(seg["runs"]["reference"]), rounds,
                                              48, 1, chaos.attempts, ("regularized_exploitability", "loss"))
            final = seg["figures"]["final"]["regularized_exploitability"]
            from nashray.oracles.games import load_game, regularized_exploitability
            game = load_game("builtin:random10")
            final["initial"] = float(regularized_exploitability(game.P, game.pi_ref, game.pi_ref, 0.1))
            # The sample streams of restarted generators start afresh: the faulted campaign is a different draw of
            # the same process, so "as good as the reference" means within a factor 2, and well below the start.
            final["ok"] = final["chaos"] <= 2 * final["reference"] + 1e-3 and final["chaos"] < final["initial"] / 2
            segments["tabular"] = seg
        if args.only in (None, "llm"):
            from tests.helpers import build_tiny_model
            model_dir = build_tiny_model(work / "tiny-llama")
            judges = {True: FaultyJudge(args.fault_rate, args.seed, llm_oracle("http://x")["timeout_s"]),
                      False: FaultyJudge(0.0, args.seed, llm_oracle("http://x")["timeout_s"])}
            try:
                def sections(run, faults):
                    return llm_sections(run, rounds, args.seed, model_dir, judges[faults].url)

                def before(run, faults):
                    judges[faults].attach(run, llm_oracle(judges[faults].url))

                seg = run_segment("llm", sections, rounds, QUICK_LLM if args.quick else LLM_TARGETS, rng, work,
                                  3600, before)
                chaos = seg.pop("_campaign")
                k, prompts = 3, 4
                seg["figures"] = campaign_figures(Path(seg["runs"]["chaos"]), Path(seg["runs"]["reference"]),
                                                  rounds, k, prompts, chaos.attempts,
                                                  ("win_rate_vs_initial", "loss", "kl_to_ref"))
                seg["figures"]["http_judge"] = judges[True].figures(chaos.schedule)
                seg["figures"]["samples_redrawn_from_an_earlier_round"] = {
                    "chaos": redrawn_samples(Path(seg["runs"]["chaos"]), rounds),
                    "reference": redrawn_samples(Path(seg["runs"]["reference"]), rounds)}
                seg["figures"]["http_judge_reference"] = judges[False].figures()
                final = seg["figures"]["final"]["win_rate_vs_initial"]
                # 8 held-out prompts judged once each: a win rate moves by 1/8 per answer; the tiny random model's
                # answers are noise, so the check is loose: the faulted campaign ends within 0.25 of the reference.
                final["ok"] = abs(final["chaos"] - final["reference"]) <= 0.25
                segments["llm"] = seg
            finally:
                for judge in judges.values():
                    judge.close()
    finally:
        result["segments"] = segments
        result.update(summarize(segments, full=not args.quick))
        bench.write(args.out)
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if result.get("pass") else 1


def summarize(segments: dict, full: bool = True) -> dict:
    """Coverage (roles × phases actually hit), the totals, and pass/fail (coverage is checked on a full run only)."""
    kills = [dict(k, campaign=name) for name, seg in segments.items() for k in seg.get("schedule", [])]
    fired = [k for k in kills if k["time_s"] is not None]
    hit = sorted({(k["role"], k["phase"]) for k in fired if k["confirmed"]})
    roles = {"generator", "judge", "learner", "driver"}
    phases = {"generate", "judge", "train", "push", "eval", "checkpoint"}
    checks = {
        "kills_fired_at_least_12": len(fired) >= 12,
        "every_role_hit": roles <= {r for r, _ in hit},
        "every_phase_hit": phases <= {p for _, p in hit},
    } if full else {}
    for name, seg in segments.items():
        f = seg.get("figures")
        if f is None:
            continue
        checks[f"{name}_all_rounds"] = f["rounds_recorded"]
        checks[f"{name}_no_prompt_lost"] = f["prompts_lost"] == 0 and f["unexpected_prompts"] == 0
        checks[f"{name}_nothing_trained_twice"] = f["records_trained_twice"] == 0
        checks[f"{name}_final_metric"] = bool(next(iter(f["final"].values())).get("ok"))
        if "http_judge" in f:
            checks[f"{name}_nothing_paid_twice_beyond_cache"] = f["http_judge"]["paid_twice_beyond_cache"] == 0
    rows = [summary_row("SIGKILLs that landed in their target phase", sum(bool(k["confirmed"]) for k in fired),
                        None, "kills", "≥ 12, every role and phase", checks.get("every_phase_hit"),
                        note=f"{len(fired)} fired; " + ", ".join(f"{r}@{p}" for r, p in hit))]
    for name, seg in segments.items():
        f = seg.get("figures")
        if f is None:
            continue
        rows += [summary_row(f"{name}: prompts lost", f["prompts_lost"], None, "prompts", "0",
                             f["prompts_lost"] == 0),
                 summary_row(f"{name}: records trained twice", f["records_trained_twice"], None, "rounds", "0",
                             f["records_trained_twice"] == 0, note=f"{len(f['replayed_rounds'])} replays after the "
                             f"newest checkpoint (allowed)")]
        if "http_judge" in f:
            rows.append(summary_row(f"{name}: comparisons paid twice beyond the cache",
                                    f["http_judge"]["paid_twice_beyond_cache"], None, "questions", "0",
                                    f["http_judge"]["paid_twice_beyond_cache"] == 0,
                                    note=f"HTTP judge faults: {f['http_judge']['faults']}"))
        if "samples_redrawn_from_an_earlier_round" in f:
            redrawn = f["samples_redrawn_from_an_earlier_round"]
            rows.append(summary_row(f"{name}: policy samples identical to an earlier round's",
                                    redrawn["chaos"]["samples"], redrawn["reference"]["samples"], "samples",
                                    baseline_name="unfaulted", note="restarted generators replaying their stream"))
        key, final = next(iter(f["final"].items()))
        rows.append(summary_row(f"{name}: final {key}", final["chaos"], final["reference"], "",
                                baseline_name="unfaulted, same seed", met=final.get("ok")))
    return {"kills_fired": len(fired), "kills_confirmed": sum(bool(k["confirmed"]) for k in fired),
            "coverage": [f"{r}@{p}" for r, p in hit], "checks": checks,
            "pass": bool(segments) and all(checks.values()), "summary": rows}


if __name__ == "__main__":
    sys.exit(main())
