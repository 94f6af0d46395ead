"""A quiet console for `nashray run`: the project's own lines on the terminal, everything else under RUN_DIR/logs/.

Ray, Ray Train, Ray Data, vLLM and DeepSpeed write to the process's file descriptors 1 and 2 — from Python loggers,
C++ and child processes alike — so the redirect is done on the descriptors, not on ``sys.stdout``. The actors' own
output stays in Ray's session logs (``log_to_driver=False``), reached through ``RUN_DIR/logs/ray``."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

DRIVER_LOG = "driver.log"


@contextmanager
def quiet_console(log_dir: Path):
    """Send fds 1 and 2 to ``log_dir/driver.log`` while inside; yields a text stream on the original terminal (the
    caller's stderr) for progress lines. Both descriptors are restored on the way out, exceptions included, so an
    error raised inside reaches the user on the terminal."""
    log_dir.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    with open(log_dir / DRIVER_LOG, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield console
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            console.close()


def link_ray_logs(log_dir: Path) -> Path | None:
    """``log_dir/ray`` → the running Ray session's log folder (every actor's stdout/stderr), when this process
    started or joined a Ray node whose logs are on this machine; the link, or None."""
    import ray
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return None
    target = Path(node.get_logs_dir_path())
    if not target.is_dir():  # a remote cluster's head: its logs are on that host (and in `ray job logs`)
        return None
    link = log_dir / "ray"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    return link
