"""Resume after the driver is killed (SIGKILL, with its whole local Ray cluster) during and between rounds."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nashray.oracles.games import load_game, regularized_exploitability
from tests.run_watch import rounds_completed

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


def tabular_config(tmp_path: Path, rounds: int, **storage) -> Path:
    cfg = {
        "seed": 0,
        "algorithm": {"name": "inpo"},
        "generators": {"count": 1, "engine": "tabular", "resources": {"num_cpus": 0.5}},
        "judges": {"count": 1, "oracle": {"kind": "matrix", "sample": True}, "resources": {"num_cpus": 0.5}},
        # Many epochs make training the longest phase, so a kill "during the round" lands in it.
        "learner": {"workers": 1, "precision": "fp32", "micro_batch_size": 64, "epochs_per_round": 40,
                    "threads_per_worker": 1, "optimizer": {"name": "adam", "lr": 0.05}},
        "data": {"game": "builtin:random10"},
        "schedule": {"rounds": rounds, "prompts_per_round": 1, "samples_per_prompt": 24},
        "storage": {"run_dir": str(tmp_path / "run"), **storage},
    }
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(*args: str, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """`nashray run ARGS` in its own process group (``stderr=subprocess.PIPE`` keeps its terminal output)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "nashray.cluster.cli", "run", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


def kill_when(proc: subprocess.Popen, condition, timeout_s: float = 300, kill: bool = True) -> None:
    """SIGKILL the driver and the whole Ray cluster it started (its session) once ``condition()``; with
    ``kill=False``, only wait for it."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, f"campaign exited ({proc.returncode}) before the kill point"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.05)
    if kill:
        kill_session(proc.pid)
        proc.wait()


def kill_session(session: int) -> None:
    """SIGKILL every process of ``session``: the driver, started as its leader, and the local Ray cluster it started,
    whose workers each lead a process group of their own (``killpg`` would leave them running and writing)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session:
                    os.kill(int(entry), signal.SIGKILL)
            except OSError:  # gone meanwhile
                continue


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_after_kills_during_and_between_rounds(tmp_path):
    config = tabular_config(tmp_path, rounds=4)
    run = tmp_path / "run"
    # The same campaign, never interrupted: the resumed one must reproduce it exactly (fp32, seeded streams).
    (tmp_path / "whole").mkdir()
    whole = tabular_config(tmp_path / "whole", rounds=4)
    uninterrupted = start(str(whole))
    assert uninterrupted.wait(timeout=600) == 0

    # 1. Killed during round 1, after its samples and judgements were persisted (training in flight).
    proc = start(str(config))
    kill_when(proc, lambda: rounds_completed(run) == 1 and (run / "rounds/0001/judgements.parquet").exists())
    assert rounds_completed(run) == 1
    persisted = {name: digest(run / "rounds/0001" / name) for name in ("samples.parquet", "judgements.parquet")}

    # 2. Resumed, then killed between rounds: right after round 2 completed.
    proc = start("--resume", str(run))
    kill_when(proc, lambda: rounds_completed(run) >= 2)
    assert rounds_completed(run) in (2, 3)

    # 3. Resumed to the end.
    proc = start("--resume", str(run))
    assert proc.wait(timeout=600) == 0

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]  # every round exactly once
    assert [m["version"] for m in metrics] == [0, 1, 2, 3]
    # Round 1 was finished from what the killed driver had persisted: the same samples, never judged again.
    assert {name: digest(run / "rounds/0001" / name) for name in persisted} == persisted
    assert json.loads((run / "state.json").read_text()) == {
        "rounds_completed": 4, "version": 4, "checkpoint": str(run / "checkpoints" / "round-0003")}
    for t in range(4):
        assert (run / f"rounds/{t:04d}/metrics.json").is_file()
    # Each round trained once: a round's learner result equals what its checkpoint recorded.
    last = json.loads((run / "checkpoints/round-0003/COMPLETE").read_text())["metrics"]
    assert last["loss"] == metrics[3]["loss"]
    # Training continued from the resumed checkpoints: every round's policy is nearer the regularised Nash than π_ref.
    game = load_game("builtin:random10")
    initial = regularized_exploitability(game.P, game.pi_ref, game.pi_ref, 0.1)
    assert all(m["regularized_exploitability"] < initial for m in metrics), (initial, metrics)
    # Exact resume: every round's samples, verdicts, training and policy as in the uninterrupted campaign — round 1
    # was trained again after the kill with the same data order from the restored optimizer state, and the rounds
    # after it were sampled by restarted generators, seeded per round.
    reference = [json.loads(line) for line in (tmp_path / "whole/run/metrics.jsonl").read_text().splitlines()]
    for t in range(4):
        assert digest(run / f"rounds/{t:04d}/judgements.parquet") == digest(
            tmp_path / f"whole/run/rounds/{t:04d}/judgements.parquet"), f"round {t} judgements"
        assert digest(run / f"rounds/{t:04d}/samples.parquet") == digest(
            tmp_path / f"whole/run/rounds/{t:04d}/samples.parquet"), f"round {t} samples"
        for key in ("loss", "steps", "train_records", "exploitability", "regularized_exploitability"):
            assert metrics[t][key] == reference[t][key], (t, key, metrics[t][key], reference[t][key])


def test_resume_with_sparse_checkpoints_trains_the_rounds_after_the_newest_again_from_their_data(tmp_path):
    """storage.checkpoint_every=2: checkpoints after rounds 1, 3 and the last (4). Killed once round 2 has completed
    (no checkpoint of it), the resumed learner starts from round 1's checkpoint and trains round 2 again from its
    persisted dataset, to exactly the loss it had (fp32, same batches, same seeds), before round 3; nothing is sampled
    or judged again and every round is recorded once."""
    config = tabular_config(tmp_path, rounds=5, checkpoint_every=2, keep_checkpoints=5)
    run = tmp_path / "run"
    proc = start(str(config))
    kill_when(proc, lambda: rounds_completed(run) >= 3)
    assert rounds_completed(run) == 3
    persisted = {t: {name: digest(run / f"rounds/{t:04d}" / name) for name in ("samples.parquet", "judgements.parquet")}
                 for t in range(3)}
    assert not (run / "checkpoints/round-0002").exists()
    proc = start("--resume", str(run))
    assert proc.wait(timeout=600) == 0

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2, 3, 4]
    # Round 2 trained again, on resume, before round 3: to the loss it had, so the weights came out as they were.
    assert metrics[3]["replayed_rounds"] == 1 and metrics[3]["replay_max_loss_diff"] == 0.0
    assert all("replayed_rounds" not in m for i, m in enumerate(metrics) if i != 3)
    for t, names in persisted.items():  # rounds 0-2 were never sampled or judged again
        assert {name: digest(run / f"rounds/{t:04d}" / name) for name in names} == names
    written = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert written == ["round-0001", "round-0003", "round-0004"], written
    assert json.loads((run / "state.json").read_text())["checkpoint"] == str(run / "checkpoints" / "round-0004")


def test_resumed_campaign_reuses_cached_judgements_within_budget(tmp_path, tiny_model_dir):
    """An LLM judge (deterministic, so cached) killed mid-judging: the resumed round pays only for what was not yet
    judged, and no round judges more comparisons than its budget."""
    cfg = {
        "seed": 0,
        "model": {"path": tiny_model_dir, "dtype": "float32", "max_prompt_tokens": 96},
        "algorithm": {"name": "online_dpo"},
        "generators": {"count": 1, "engine": "hf", "sampling": {"max_new_tokens": 16}},
        # One comparison per call: every verdict reaches the cache as soon as it is made.
        "judges": {"count": 1, "batch_size": 1, "budget_per_round": 40,
                   "oracle": {"kind": "llm_judge", "model": tiny_model_dir, "engine": "hf", "batch_size": 1}},
        "learner": {"workers": 1, "precision": "fp32", "micro_batch_size": 8, "threads_per_worker": 1},
        "schedule": {"rounds": 2, "prompts_per_round": 8, "samples_per_prompt": 4},
        "storage": {"run_dir": str(tmp_path / "run")},
        "evaluation": {"every_rounds": 0},
    }
    config = tmp_path / "campaign.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"

    def cached_verdicts() -> int:
        return sum(len(p.read_text().splitlines()) for p in (run / "judge-cache").glob("*") if p.is_file())

    proc = start(str(config))
    kill_when(proc, lambda: (run / "rounds/0000/samples.parquet").exists() and cached_verdicts() >= 5)
    assert not (run / "rounds/0000/judgements.parquet").exists()  # killed mid-judging
    paid_before = cached_verdicts()

    proc = start("--resume", str(run))
    assert proc.wait(timeout=600) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1]
    first = metrics[0]
    assert first["judge_comparisons"] <= 40 and metrics[1]["judge_comparisons"] <= 40  # the budget holds
    assert first["judge_cached"] >= paid_before  # what the killed run paid for was not paid again
    assert first["judge_calls"] == first["judge_comparisons"] - first["judge_cached"]


def test_resumed_llm_round_trains_the_same_batches_in_the_same_order(tmp_path, tiny_model_dir):
    """A language-model campaign killed during round 1's training: the resumed round trains the persisted records in
    the uninterrupted campaign's batch order from the same restored state, and round 2, sampled by a restarted
    generator seeded per round, draws what the uninterrupted one drew: every round matches it exactly."""
    def config(root: Path) -> Path:
        cfg = {
            "seed": 3,
            "model": {"path": tiny_model_dir, "dtype": "float32", "max_prompt_tokens": 96},
            "algorithm": {"name": "online_dpo"},
            "generators": {"count": 1, "engine": "hf", "sampling": {"max_new_tokens": 12}},
            # the tiny random model's answers all run to max_new_tokens: length would tie them, readability does not
            "judges": {"count": 1, "oracle": {"kind": "rule", "rule": "readable"}},
            # Several epochs of small batches: the order matters to the loss, and training is the longest phase.
            "learner": {"workers": 1, "precision": "fp32", "micro_batch_size": 2, "epochs_per_round": 6,
                        "threads_per_worker": 1, "optimizer": {"name": "adamw", "lr": 1e-3}},
            "schedule": {"rounds": 3, "prompts_per_round": 6, "samples_per_prompt": 3},
            "storage": {"run_dir": str(root / "run")},
            "evaluation": {"every_rounds": 0},
        }
        root.mkdir(exist_ok=True)
        (root / "campaign.yaml").write_text(yaml.safe_dump(cfg))
        return root / "campaign.yaml"

    whole = start(str(config(tmp_path / "whole")))
    assert whole.wait(timeout=600) == 0
    run = tmp_path / "killed/run"
    proc = start(str(config(tmp_path / "killed")))
    kill_when(proc, lambda: rounds_completed(run) == 1 and (run / "rounds/0001/train/_SUCCESS").exists())
    assert not (run / "checkpoints/round-0001/COMPLETE").exists()  # killed before round 1's training finished
    proc = start("--resume", str(run))
    assert proc.wait(timeout=600) == 0

    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "whole/run/metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in resumed] == [0, 1, 2]
    for t in range(3):
        assert digest(run / f"rounds/{t:04d}/samples.parquet") == digest(
            tmp_path / f"whole/run/rounds/{t:04d}/samples.parquet"), f"round {t} samples"
        for key in ("loss", "steps", "train_records", "kl_to_ref"):
            assert resumed[t][key] == reference[t][key], (t, key, resumed[t][key], reference[t][key])


@pytest.fixture
def small_filesystem(tmp_path):
    """A 48 MiB tmpfs (root only): a run directory that can fill up, and be made read-only under a running
    campaign through a read-only bind mount over it (files the campaign already holds open stay writable)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    yield mnt
    subprocess.run(["umount", "-R", "-l", str(mnt)], check=False)


def fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last block."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 2**20)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_then_read_only_run_directory_stops_the_campaign_and_it_resumes(tmp_path, small_filesystem):
    """The run directory's filesystem fills up while round 1 trains, then, resumed, turns read-only after round 3:
    each time the campaign stops with one error naming the directory, keeps everything persisted, and resumes to
    the end once space returns (storage.min_free_gib, here 8 MiB, also stops it before a round that could not fit)."""
    run = small_filesystem / "run"
    config = tabular_config(tmp_path, rounds=6, run_dir=str(run), min_free_gib=0.008)

    def stopped(proc: subprocess.Popen) -> str:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode != 0, err
        return err.decode()

    proc = start(str(config), stderr=subprocess.PIPE)
    kill_when(proc, lambda: rounds_completed(run) == 1 and (run / "rounds/0001/judgements.parquet").exists(),
              kill=False)
    persisted = {p: digest(p) for p in sorted((run / "rounds").rglob("*.parquet"))
                 if not any(part.endswith(".tmp") for part in p.parts)}  # a dataset being written is not yet
    filler = fill(small_filesystem)
    error = stopped(proc)
    assert f"run directory {run} " in error and "resume with `nashray run --resume" in error, error
    assert "Traceback" not in error, error
    assert {p: digest(p) for p in persisted} == persisted  # nothing persisted was lost or torn
    assert rounds_completed(run) in (1, 2)

    filler.unlink()
    proc = start("--resume", str(run), stderr=subprocess.PIPE)
    kill_when(proc, lambda: rounds_completed(run) >= 3, kill=False)
    subprocess.run(["mount", "--bind", str(run), str(run)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(run)], check=True)
    error = stopped(proc)
    assert f"run directory {run} is not writable: Read-only file system" in error, error
    subprocess.run(["umount", str(run)], check=True)

    proc = start("--resume", str(run), stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(6)) and [m["version"] for m in metrics] == list(range(6))
    assert {p: digest(p) for p in persisted} == persisted
