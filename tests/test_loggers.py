"""Round metrics reach W&B and MLflow (``logging`` in the campaign config) beside TensorBoard, offline: every metric
the report plots is read back from W&B's offline run files and MLflow's file store, round by round; a resumed
campaign logs into the same runs; a W&B or MLflow target that cannot be reached warns once and the campaign goes on."""

from __future__ import annotations

import json
import logging
import socket
import struct

import pytest

from nashray.cluster.config import ConfigError, parse_config
from nashray.cluster.metrics import RUN_IDS_FILE, RoundLoggers, tag

ROUNDS = 3


class _Reads(dict):
    """A metrics row that records which keys are read from it."""

    def __init__(self, row: dict, read: set[str]):
        super().__init__(row)
        self.read = read

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def _plotted_keys(rows: list[dict]) -> set[str]:
    from nashray.cluster.report import plot_specs
    read: set[str] = set()
    plot_specs([_Reads(r, read) for r in rows])
    return read - {"round"}


def _rounds() -> list[dict]:
    """Metrics rows shaped like the driver's, holding every metric the report plots (with its interval, where it
    draws one) plus the driver's bookkeeping (version, counts, a None and a text value, which are not scalars)."""
    keys: set[str] = set()
    while True:  # until the rows hold every key the report reads of them (some plots read more once others have data)
        rows = []
        for t in range(ROUNDS):
            row = {"round": t, "version": t + 1, "generators": 1, "learner_workers": 1, "judge_reason": "ok",
                   "lc_length_coef": None}
            for i, key in enumerate(sorted(keys)):
                row[key] = round(0.5 + 0.01 * i + 0.1 * t, 6)
            rows.append(row)
        if _plotted_keys(rows) <= keys:
            break
        keys |= _plotted_keys(rows)
    assert {"win_rate_vs_initial", "loss", "kl_to_ref", "ranking_accuracy", "judge_comparisons", "generate_s",
            "round_s", "train_tokens_per_s", "regularized_exploitability"} <= keys
    return rows


def _config(tmp_path, rounds: int = ROUNDS, **logging_section):
    return parse_config({"schedule": {"rounds": rounds}, "storage": {"run_dir": str(tmp_path / "run")},
                         "algorithm": {"name": "inpo"}, "logging": logging_section})


def _wandb_records(run_file):
    """The protobuf records of a W&B run file (``run-ID.wandb``): a 7-byte header (":W&B", magic, version), then
    LevelDB's log format — 32 KiB blocks of chunks, each a 7-byte header (CRC, length, type) and its bytes; types
    FULL (1) or FIRST (2), MIDDLE (3), LAST (4) make one record."""
    from wandb.proto import wandb_internal_pb2
    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero-filled preallocated space
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_history(wandb_dir, run_id: str) -> tuple[dict[int, dict], list]:
    """Step → logged values, over every offline run directory of ``run_id`` (one per process that logged into it),
    and the run records (config, name)."""
    history, runs = {}, []
    for run_file in sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for record in _wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                # an item names its key in `key` or, as W&B's core does for some, in `nested_key` (one part: flat)
                history[record.history.step.num] = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                                    for item in record.history.item}
            elif kind == "run":
                runs.append(record.run)
    return history, runs


def _mlflow_client(run_root):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=(run_root / "mlruns").as_uri())


def test_every_plotted_metric_is_in_the_offline_wandb_run_and_the_mlflow_file_store(tmp_path):
    """A two-round campaign, then the same campaign resumed for a third round (``--set schedule.rounds=3``) by
    another driver: W&B and MLflow hold all three rounds in one run each, finished after the last."""
    rows = _rounds()
    trackers = {"wandb": {"project": "nashray-test", "mode": "offline"}, "mlflow": {}}
    root = tmp_path / "run"
    first = RoundLoggers(_config(tmp_path, rounds=2, **trackers), root)
    for row in rows[:2]:
        first.log_round(row)
    ids = json.loads((root / RUN_IDS_FILE).read_text())
    RoundLoggers(_config(tmp_path, **trackers), root).log_round(rows[2])
    assert json.loads((root / RUN_IDS_FILE).read_text()) == ids
    plotted = _plotted_keys(rows)

    history, runs = _wandb_history(root / "wandb", ids["wandb"])
    assert sorted(history) == [0, 1, 2]
    for t, row in enumerate(rows):
        for key in plotted:
            assert history[t][tag(key)] == pytest.approx(row[key]), (t, key)
        assert "judge_reason" not in json.dumps(history[t]) and "other/lc_length_coef" not in history[t]
    assert len(runs) == 2 and {(r.run_id, r.display_name, r.project) for r in runs} == {
        (ids["wandb"], "run", "nashray-test")}  # the resumed driver went on in the same run
    config = {item.key: json.loads(item.value_json) for item in runs[0].config.update}
    assert config["algorithm"]["name"] == "inpo" and config["schedule"]["rounds"] == 2

    client = _mlflow_client(root)
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.data.params["algorithm.name"] == "inpo"
    assert run.data.params["schedule.rounds"] == "2"  # the config the run was opened with
    for key in plotted:
        got = [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], tag(key))]
        assert sorted(got) == [(t, pytest.approx(row[key])) for t, row in enumerate(rows)], key
    assert list((root / "tb").glob("events.out.tfevents.*"))  # TensorBoard, as before


def test_tensorboard_alone_by_default_and_none_at_all_when_off(tmp_path):
    rows = _rounds()
    RoundLoggers(_config(tmp_path), tmp_path / "run").log_round(rows[0])
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["tb"]
    RoundLoggers(_config(tmp_path / "off", tensorboard=False), tmp_path / "off" / "run").log_round(rows[0])
    assert not (tmp_path / "off" / "run").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_target_warns_once_and_the_campaign_goes_on(tmp_path, monkeypatch, caplog):
    """W&B online without an account and an MLflow server that is not there: each says so once, as a warning, and
    the rounds are logged to the rest (TensorBoard) without an error."""
    port = _closed_port()
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "10")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = _config(tmp_path, wandb={"project": "nashray-test", "mode": "online"},
                  mlflow={"tracking_uri": f"http://127.0.0.1:{port}"})
    loggers = RoundLoggers(cfg, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="nashray.cluster.metrics"):
        for row in _rounds():
            loggers.log_round(row)
    warnings = [r.getMessage() for r in caplog.records if r.name == "nashray.cluster.metrics"]
    assert len(warnings) == 2, warnings
    assert any(w.startswith("W&B logging failed and is off for the rest of this campaign") for w in warnings)
    assert any(w.startswith("MLflow logging failed") and str(port) in w for w in warnings)
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("section, names", [
    ({"wandb": {"mode": "offline"}}, ["logging.wandb.project", "Field required"]),
    ({"wandb": {"project": "p", "mode": "cloud"}}, ["logging.wandb.mode", "'offline' or 'online'"]),
    ({"mlflow": {"tracking_uri": "s3://bucket/mlruns"}}, ["logging.mlflow.tracking_uri", "file store"]),
    ({"mlflow": {"tracking_uri": "https://me:hunter2@mlflow.example"}},
     ["logging.mlflow.tracking_uri", "MLFLOW_TRACKING_PASSWORD"]),
    ({"mlflow": {"experiment": ""}}, ["logging.mlflow.experiment"]),
    ({"tensorboards": True}, ["logging.tensorboards", "Extra inputs"]),
])
def test_logging_config_errors_name_the_field(section, names):
    with pytest.raises(ConfigError) as err:
        parse_config({"logging": section})
    for name in names:
        assert name in str(err.value)
    assert "hunter2" not in str(err.value)
