"""The run directory: a clear error before work when it cannot be used, atomic files, torn checkpoints never picked."""

from __future__ import annotations

import json
import os

import pytest

from nashray.layout import CampaignState, RunDir, RunDirError, atomic_write_bytes
from nashray.layout import CHECKPOINT_DONE, newest_checkpoint


def test_a_run_dir_that_cannot_be_created_is_refused_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run = RunDir(blocker / "run")
    with pytest.raises(RunDirError, match=r"run directory .*a-file/run is not writable"):
        run.create("seed: 0\n")


def test_a_run_dir_without_room_for_a_round_is_refused_before_any_work(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(RunDirError, match=r"GiB free, under storage.min_free_gib = 1e\+06 GiB"):
        run.check_writable(min_free_gib=1_000_000)
    assert not (tmp_path / "run" / "state.json").exists()


def test_a_write_that_fails_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    atomic_write_bytes(path, b'{"rounds_completed": 1}')

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(RunDirError, match="No space left on device"):
        atomic_write_bytes(path, b'{"rounds_completed": 2}')
    assert path.read_bytes() == b'{"rounds_completed": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left behind


def test_a_campaign_is_never_created_twice_in_one_run_dir(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create("seed: 0\n")
    assert run.read_state() == CampaignState()
    with pytest.raises(RunDirError, match="already holds a campaign: resume it with `nashray run --resume"):
        run.create("seed: 0\n")


def test_a_corrupt_state_file_is_named(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create("seed: 0\n")
    run.state_path.write_text("{torn")
    with pytest.raises(RunDirError, match=r"state.json is corrupt"):
        run.read_state()


def test_a_torn_checkpoint_is_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    for t, complete in ((0, True), (1, True), (2, False)):
        folder = root / f"round-{t:04d}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"...")
        if complete:
            (folder / CHECKPOINT_DONE).write_text(json.dumps({"round": t, "metrics": {}}))
    (root / "round-0003.tmp").mkdir()
    assert newest_checkpoint(root) == root / "round-0001"


def test_a_replayed_round_replaces_its_metrics_line(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create("seed: 0\n")
    run.record_metrics({"round": 0, "loss": 1.0})
    run.record_metrics({"round": 1, "loss": 0.9})
    run.record_metrics({"round": 1, "loss": 0.8})  # the round finished again after a crash before state.json
    assert run.metrics() == [{"round": 0, "loss": 1.0}, {"round": 1, "loss": 0.8}]
