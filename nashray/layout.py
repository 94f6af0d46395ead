"""The run directory and the checkpoint layout: every file name a campaign persists, in one place that the driver,
the roles and the reports all import. Written so that a crash at any point loses at most the round in flight.

    RUN_DIR/
      config.yaml               resolved config (secrets are never in it: only names of environment variables)
      state.json                last completed round and policy version — written atomically, last in a round
      roles.json                where each role's actors run (`nashray status`)
      rounds/t/                 samples.parquet, judgements.parquet, train/ (Ray Data parquet, _SUCCESS last),
                                metrics.json, eval.parquet, average_policy.json (tabular)
      checkpoints/round-t/      HF safetensors + tokenizer, deepspeed/state/ optimizer state, adapter/ (LoRA),
                                COMPLETE marker last
      judge-cache/              judgements by (prompt, a, b, oracle)
      eval/                     baseline.parquet + baseline.json: the initial policy's answers to the held-out prompts
      policy.json               tabular campaigns: the current policy
      metrics.jsonl             one line per round
      logs/, tb/, mlruns/, ray-train/
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

CHECKPOINT_DONE = "COMPLETE"
"""A checkpoint's marker, written last: JSON {"round", "metrics"}; a folder without it is torn and never used."""
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"
"""DeepSpeed's part of a checkpoint: ``round-t/deepspeed/state/*.pt``."""
ADAPTER_DIR = "adapter"
"""A LoRA checkpoint's adapters (peft's format, loadable by vLLM's LoRA support), beside the merged weights."""
DATASET_DONE = "_SUCCESS"
"""A round's training dataset's marker (``rounds/t/train/_SUCCESS``, its record count), written last."""
AVERAGE_POLICY = "average_policy.json"
STATE_FILE = "state.json"
SAMPLES_FILE = "samples.parquet"
JUDGEMENTS_FILE = "judgements.parquet"


def complete_checkpoints(root: Path) -> list[Path]:
    """The round checkpoints under ``root`` (``RUN_DIR/checkpoints``) that have their COMPLETE marker, oldest first;
    never a ``round-t.tmp`` folder, which holds its marker for a moment before it is renamed."""
    return sorted(p for p in Path(root).glob("round-[0-9][0-9][0-9][0-9]") if (p / CHECKPOINT_DONE).is_file())


def newest_checkpoint(root: Path) -> Path | None:
    """The newest complete round checkpoint under ``root``."""
    done = complete_checkpoints(root)
    return done[-1] if done else None


class RunDirError(RuntimeError):
    """The run directory cannot be used (unwritable, full, or not a nashray run); ``filename`` and ``strerror`` name
    a write that failed, as an OSError's do."""

    def __init__(self, message: str, filename: Path | None = None, strerror: str | None = None):
        super().__init__(message)
        self.filename, self.strerror = filename, strerror


@dataclass
class CampaignState:
    """What a resumed campaign needs beyond the files of its rounds. The prompt cursor and per-round RNG seeds are
    derived from ``rounds_completed`` and the config's seed, so they cannot drift from it."""
    rounds_completed: int = 0
    version: int = 0
    checkpoint: str | None = None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise RunDirError(f"cannot write {path}: {err.strerror or err}", path, err.strerror) from err


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_table(path: Path, rows: list[dict]) -> None:
    """A parquet file written whole or not at all."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_table(path: Path) -> list[dict]:
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowInvalid, OSError) as err:
        raise RunDirError(f"{path} is not a readable parquet file: {err}") from err


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    # ------------------------------------------------------------------ layout
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def judge_cache(self) -> Path:
        return self.root / "judge-cache"

    @property
    def prompts_dir(self) -> Path:
        """The prompt set's parquet shards when data.streaming is on."""
        return self.root / "prompts"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def rounds_root(self) -> Path:
        return self.root / "rounds"

    def round_dir(self, t: int) -> Path:
        return self.rounds_root / f"{t:04d}"

    def checkpoint_dir(self, t: int) -> Path:
        return self.checkpoints_root / f"round-{t:04d}"

    @property
    def checkpoints_root(self) -> Path:
        return self.root / "checkpoints"

    @property
    def roles_path(self) -> Path:
        return self.root / "roles.json"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def ray_train_dir(self) -> Path:
        return self.root / "ray-train"

    @property
    def policy_path(self) -> Path:
        return self.root / "policy.json"

    @property
    def baseline_path(self) -> Path:
        return self.eval_dir / "baseline.parquet"

    @property
    def baseline_info_path(self) -> Path:
        return self.eval_dir / "baseline.json"

    def samples_path(self, t: int) -> Path:
        return self.round_dir(t) / SAMPLES_FILE

    def judgements_path(self, t: int) -> Path:
        return self.round_dir(t) / JUDGEMENTS_FILE

    def train_dir(self, t: int) -> Path:
        return self.round_dir(t) / "train"

    def round_metrics_path(self, t: int) -> Path:
        return self.round_dir(t) / "metrics.json"

    def eval_path(self, t: int) -> Path:
        return self.round_dir(t) / "eval.parquet"

    def average_policy_path(self, t: int) -> Path:
        return self.round_dir(t) / AVERAGE_POLICY

    # ------------------------------------------------------------------ lifecycle
    def create(self, config_yaml: str, min_free_gib: float = 1.0) -> None:
        if self.state_path.exists():
            raise RunDirError(f"{self.root} already holds a campaign: resume it with `nashray run --resume "
                              f"{self.root}` or choose another storage.run_dir")
        self.check_writable(min_free_gib)
        atomic_write_bytes(self.config_path, config_yaml.encode())
        self.write_state(CampaignState())

    def check_writable(self, min_free_gib: float = 1.0) -> None:
        """Fail before any work (a campaign, a round) if the run directory cannot take a round's files: it cannot be
        written, or its filesystem has less than ``min_free_gib`` (storage.min_free_gib) free."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-probe"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as err:
            raise RunDirError(f"run directory {self.root} is not writable: {err.strerror or err}") from err
        free = shutil.disk_usage(self.root).free / 2**30
        if free < min_free_gib:
            raise RunDirError(f"run directory {self.root} has {free:.3f} GiB free, under storage.min_free_gib = "
                              f"{min_free_gib:g} GiB (a round's files and checkpoint)")

    def read_state(self) -> CampaignState:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            raise RunDirError(f"{self.root} is not a nashray run directory: no state.json") from None
        except json.JSONDecodeError as err:
            raise RunDirError(f"{self.state_path} is corrupt: {err}") from None
        try:
            return CampaignState(**data)
        except TypeError as err:
            raise RunDirError(f"{self.state_path} has unexpected fields: {err}") from None

    def write_state(self, state: CampaignState) -> None:
        atomic_write_json(self.state_path, asdict(state))

    def complete_checkpoint(self, t: int) -> Path | None:
        path = self.checkpoint_dir(t)
        return path if (path / CHECKPOINT_DONE).is_file() else None

    def prune_checkpoints(self, keep: int, protect: int) -> None:
        """Keep the newest ``keep`` complete checkpoints (never the one of round ``protect``)."""
        for path in complete_checkpoints(self.checkpoints_root)[:-keep]:
            if path.name != f"round-{protect:04d}":
                shutil.rmtree(path, ignore_errors=True)

    def record_metrics(self, metrics: dict) -> None:
        """Add a round's line to metrics.jsonl, replacing a line of the same round that a crash after this call (and
        before state.json) left behind: a replayed round is never counted twice."""
        lines = [m for m in self.metrics() if m["round"] != metrics["round"]] + [metrics]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(m, sort_keys=True) + "\n" for m in lines).encode())

    def metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
