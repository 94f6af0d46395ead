"""A campaign's round metrics as TensorBoard scalars under RUN_DIR/tb/ (``tensorboard --logdir RUN_DIR/tb``), and in
a W&B run and an MLflow run where the config's ``logging`` section asks for them.

metrics.jsonl (written by :meth:`nashray.layout.RunDir.record_metrics`) stays the record of truth; the others are
views of it: one scalar per numeric metric, step = round, tagged ``GROUP/metric`` so that related curves share a
section.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.parse
from pathlib import Path

from nashray.layout import atomic_write_json

log = logging.getLogger(__name__)

TB_SUBDIR = "tb"
RUN_IDS_FILE = "loggers.json"  # the W&B and MLflow run ids: a resumed campaign logs into the same runs

# The section of each metric, by prefix or name; the first match wins, anything else goes to "other".
GROUPS = (
    ("time", ("generate_s", "judge_s", "logprob_s", "train_s", "push_s", "encode_s", "eval_s", "prepare_s",
              "train_phase_s", "overlap_wait_s", "round_s")),
    ("eval", ("win_rate", "lc_win_rate", "lc_length_coef", "eval_", "exploitability", "regularized_exploitability",
              "ranking_accuracy")),
    ("train", ("loss", "kl_to_ref", "rows", "steps", "train_", "mean_response_tokens", "tau")),
    ("judge", ("judge_",)),
    ("generate", ("generate", "generated_")),
    ("push", ("push_", "weights_")),
    ("roles", ("generators", "judges", "learner_workers", "generator_restarts")),
)
UNPLOTTED = ("round", "version")


def tag(name: str) -> str:
    """``GROUP/name`` for a metric name."""
    for group, prefixes in GROUPS:
        if any(name == p or name.startswith(p) for p in prefixes):
            return f"{group}/{name}"
    return f"other/{name}"


def scalars(metrics: dict) -> dict[str, float]:
    """The finite numeric metrics of a round, by tag (booleans as 0/1; None, text and lists are not scalars)."""
    out = {}
    for name, value in metrics.items():
        if name in UNPLOTTED or isinstance(value, (str, list, dict)) or value is None:
            continue
        value = float(value)
        if math.isfinite(value):
            out[tag(name)] = value
    return out


def write_tensorboard(run_root: Path, metrics: dict) -> None:
    """Add a round's metrics (a metrics.jsonl line, with its ``round``) to RUN_DIR/tb/, in an event file of its own
    that starts by purging the steps ≥ this round: a round replayed after a crash replaces its first try."""
    from torch.utils.tensorboard import SummaryWriter
    if "round" not in metrics:
        raise ValueError(f"round metrics need a 'round' key (the TensorBoard step); got keys {sorted(metrics)}")
    step = int(metrics["round"])
    writer = SummaryWriter(str(Path(run_root) / TB_SUBDIR), purge_step=step)
    try:
        for name, value in scalars(metrics).items():
            writer.add_scalar(name, value, step)
    finally:
        writer.close()


def _flat(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys → text (MLflow parameters are flat strings)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return out


class _WandbRun:
    def __init__(self, cfg, run_root: Path, run_id: str | None):
        import wandb
        section = cfg.logging.wandb
        # reinit="create_new": several campaigns in one process (a notebook, the tests) each get their own run
        self.run = wandb.init(project=section.project, entity=section.entity, mode=section.mode,
                              dir=section.dir or str(run_root), id=run_id, resume="allow", reinit="create_new",
                              name=run_root.name, config=cfg.model_dump(mode="json"))
        self.id = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step, commit=True)  # written now, not when the next round's step arrives

    def finish(self) -> None:
        self.run.finish()


class _MLflowRun:
    MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call

    def __init__(self, cfg, run_root: Path, run_id: str | None):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        section = cfg.logging.mlflow
        uri = section.tracking_uri or (run_root / "mlruns").as_uri()
        if urllib.parse.urlparse(uri).scheme in ("", "file"):
            # MLflow 3 keeps its file store behind this opt-in (it suggests a database, which mlflow-skinny lacks)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            try:
                self.id = self.client.get_run(run_id).info.run_id
                return
            except MlflowException:  # not in this store (tracking_uri changed since): a new run
                pass
        experiment = self.client.get_experiment_by_name(section.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(section.experiment))
        self.id = self.client.create_run(experiment_id, run_name=run_root.name,
                                         tags={"nashray.run_dir": str(run_root)}).info.run_id
        params = [Param(k, v) for k, v in _flat(cfg.model_dump(mode="json")).items()]
        for i in range(0, len(params), self.MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.id, params=params[i:i + self.MAX_PARAMS_PER_BATCH])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now_ms = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, v, now_ms, step) for k, v in values.items()])

    def finish(self) -> None:
        self.client.set_terminated(self.id)


class RoundLoggers:
    """Each round's metrics to TensorBoard, W&B and MLflow, as the campaign config ``cfg``'s ``logging`` says.

    The W&B and MLflow runs are opened at the first round logged, their ids kept in RUN_DIR/loggers.json so that a
    resumed campaign goes on in the same runs, and finished after the campaign's last round. A W&B or MLflow target
    that fails — unreachable, refusing, misconfigured — is reported once, as a warning, and dropped: the campaign goes
    on, and metrics.jsonl holds every round."""

    TARGETS = {"wandb": ("W&B", _WandbRun), "mlflow": ("MLflow", _MLflowRun)}

    def __init__(self, cfg, run_root: Path):
        self.cfg = cfg
        self.root = Path(run_root)
        self.pending = [name for name in self.TARGETS if getattr(cfg.logging, name) is not None]
        self.runs: dict[str, _WandbRun | _MLflowRun] = {}

    def _run_ids(self) -> dict[str, str]:
        path = self.root / RUN_IDS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _drop(self, name: str, err: Exception) -> None:
        label = self.TARGETS[name][0]
        log.warning("%s logging failed and is off for the rest of this campaign (metrics.jsonl has every round): "
                    "%s: %s", label, type(err).__name__, err)
        self.runs.pop(name, None)

    def _open(self) -> None:
        ids = self._run_ids()
        for name in self.pending:
            try:
                self.runs[name] = self.TARGETS[name][1](self.cfg, self.root, ids.get(name))
            except Exception as err:  # whatever a tracking service raises must not stop the campaign
                self._drop(name, err)
        self.pending = []
        if self.runs:
            atomic_write_json(self.root / RUN_IDS_FILE, {**ids, **{name: run.id for name, run in self.runs.items()}})

    def log_round(self, metrics: dict) -> None:
        """Log a round's metrics (a metrics.jsonl line, with its ``round``)."""
        if self.cfg.logging.tensorboard:
            write_tensorboard(self.root, metrics)
        if self.pending:
            self._open()
        step, values = int(metrics["round"]), scalars(metrics)
        for name, run in list(self.runs.items()):
            try:
                run.log(values, step)
                if step == self.cfg.schedule.rounds - 1:
                    run.finish()
                    del self.runs[name]
            except Exception as err:  # as in _open
                self._drop(name, err)
