"""The `nashray` command: run, resume, submit and inspect campaigns."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import yaml


def _overrides(pairs: list[str]) -> dict:
    """`--set a.b=value` pairs; values are parsed as YAML scalars (numbers, booleans, null, strings)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE (dotted key), got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def cmd_run(args) -> int:
    from cluster.config import ConfigError, load_config
    from cluster.driver import run_campaign
    from cluster.progress import Progress
    from cluster.run_dir import RunDir
    overrides = _overrides(args.set)
    if args.run_dir:
        overrides["storage.run_dir"] = args.run_dir
    try:
        rounds = (load_config(RunDir(args.resume).config_path, overrides) if args.resume
                  else load_config(args.config, overrides)).schedule.rounds
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    run = run_campaign(args.config, resume=args.resume, overrides=overrides, progress=Progress(rounds))
    print(f"campaign finished: {run.root}")
    return 0


def cmd_submit(args) -> int:
    """`ray job submit` of `nashray run CONFIG` to a running cluster, with this checkout as the working dir."""
    address = args.address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    entry = ["python", "-m", "cluster.cli", "run", os.path.basename(args.config)] + sum(
        (["--set", s] for s in args.set or []), [])
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray_cli, "job", "submit", "--address", address, "--working-dir", args.working_dir,
           "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "runs"]})] + (
        ["--no-wait"] if args.no_wait else []) + ["--"] + entry
    print(" ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)


def cmd_status(args) -> int:
    from cluster.run_dir import RunDir
    run = RunDir(args.run_dir)
    state = run.read_state()
    metrics = run.metrics()
    print(json.dumps({"run_dir": str(run.root), "rounds_completed": state.rounds_completed,
                      "version": state.version, "checkpoint": state.checkpoint,
                      "last_metrics": metrics[-1] if metrics else None}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nashray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a campaign (no CONFIG: the embedded SmolLM2 demo)")
    run.add_argument("config", nargs="?", help="campaign YAML")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the campaign in RUN_DIR at its next round")
    run.add_argument("--run-dir", help="storage.run_dir for a new campaign")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (dotted key)")
    run.set_defaults(func=cmd_run)
    submit = sub.add_parser("submit", help="ray job submit a campaign to a running Ray cluster")
    submit.add_argument("config")
    submit.add_argument("--address", help="Ray dashboard address (default: $RAY_ADDRESS or 127.0.0.1:8265)")
    submit.add_argument("--working-dir", default=".")
    submit.add_argument("--no-wait", action="store_true")
    submit.add_argument("--set", action="append", metavar="KEY=VALUE")
    submit.set_defaults(func=cmd_submit)
    status = sub.add_parser("status", help="where a campaign stands")
    status.add_argument("run_dir")
    status.set_defaults(func=cmd_status)
    args = parser.parse_args(argv)
    if getattr(args, "config", None) and getattr(args, "resume", None):
        parser.error("give either CONFIG or --resume RUN_DIR, not both")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
