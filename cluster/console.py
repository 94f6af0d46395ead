"""A quiet console for `nashray run`: the project's own lines on the terminal, everything else under RUN_DIR/logs/.

Ray, Ray Train, Ray Data, vLLM, DeepSpeed and transformers write to the process's file descriptors 1 and 2 — from
Python loggers, C++ and child processes alike — so the redirect is done on the descriptors, not on ``sys.stdout``.
Until the run directory exists (the model check, loading the config) the output collects in a temporary file that
then moves into it. The actors' own output stays in Ray's session logs (``log_to_driver=False``), reached through
``RUN_DIR/logs/ray``."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

DRIVER_LOG = "driver.log"


class QuietConsole:
    """While entered, fds 1 and 2 go to a log file; ``stream`` writes to the terminal (the original stderr). Both
    descriptors are restored on the way out, exceptions included, so an error raised inside reaches the user."""

    def __init__(self):
        self.stream = None
        self.log_path: Path | None = None
        self._saved: tuple[int, int] | None = None

    def __enter__(self) -> "QuietConsole":
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = os.dup(1), os.dup(2)
        self.stream = os.fdopen(os.dup(self._saved[1]), "w", buffering=1)
        fd, path = tempfile.mkstemp(prefix="nashray-driver-", suffix=".log")
        self._point_at(fd)
        self.log_path = Path(path)
        return self

    def _point_at(self, fd: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    def move_to(self, log_dir: Path) -> Path:
        """Go on writing in ``log_dir/driver.log``, after what was written so far."""
        log_dir.mkdir(parents=True, exist_ok=True)
        target = log_dir / DRIVER_LOG
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        with open(self.log_path, "rb") as early, open(fd, "ab", closefd=False) as out:
            shutil.copyfileobj(early, out)
        self._point_at(fd)
        self.log_path.unlink(missing_ok=True)
        self.log_path = target
        return target

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for target, saved in zip((1, 2), self._saved):
            os.dup2(saved, target)
            os.close(saved)
        self.stream.close()
        if self.log_path is not None and self.log_path.name != DRIVER_LOG:  # no run dir was made: nothing to keep
            self.log_path.unlink(missing_ok=True)


def link_ray_logs(log_dir: Path) -> Path | None:
    """``log_dir/ray`` → the running Ray session's log folder (every actor's stdout/stderr), when this process
    started or joined a Ray node whose logs are on this machine; the link, or None."""
    import ray
    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    target = Path(context.get_temp_dir()) / context.get_session_name() / "logs"
    if not target.is_dir():  # a remote cluster's head: its logs are on that host (and in `ray job logs`)
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    link = log_dir / "ray"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return link
