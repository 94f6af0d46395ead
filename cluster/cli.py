"""The `nashray` command: run, resume and submit campaigns; see where they stand, report them, compare models."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import traceback
from contextlib import nullcontext
from pathlib import Path

import yaml

from nashray.cluster.config import ConfigError, load_config
from nashray.cluster.console import QuietConsole
from nashray.cluster.export import ExportError, export_model
from nashray.cluster.progress import Progress
from nashray.cluster.ray_util import init_local_ray
from nashray.cluster.report import build_report, campaign_status, format_status
from nashray.layout import RunDir, RunDirError
from nashray.models import resolve_model_path
from nashray.trainers.checkpoints import CheckpointError


def _overrides(pairs: list[str]) -> dict:
    """`--set a.b=value` pairs; values are parsed as YAML scalars (numbers, booleans, null, strings)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE (dotted key), got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def _input_errors() -> tuple[type[Exception], ...]:
    """Errors that name a mistake in what the user gave — a config field, a prompt file and row, a model, a
    checkpoint file, a run directory: printed as their one message, without a traceback (``--verbose`` adds it)."""
    from nashray.cluster.prompts import PromptDataError  # lazy: prompts imports scipy (oracles.games), seconds
    return ConfigError, PromptDataError, CheckpointError, RunDirError, ExportError


def model_problem(ref: str) -> str | None:
    """Why the model ``ref`` (a local HF folder, an HF hub id or ``smollm2-135m-instruct``) cannot be loaded on this
    machine, or None. Unchecked: a hub id while downloads are allowed (whether it exists is the hub's to say)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    try:
        resolved = resolve_model_path(ref)
    except (FileNotFoundError, RuntimeError) as err:  # a folder without config.json; SmolLM2 without its package
        return str(err)
    if Path(resolved).is_dir():
        return None
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return f"no model folder at {Path(ref).expanduser().absolute()}, and {ref!r} is not an HF hub id either"
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(ref, "config.json"), str):
        return (f"{ref!r} is not a local folder, and as an HF hub id it is not in the local HF cache "
                f"({constants.HF_HUB_CACHE}); HF_HUB_OFFLINE=1 forbids downloading it")
    return None


def _oracle_models(field: str, oracle) -> list[tuple[str, str]]:
    """(field, model) of every local or hub model an oracle config loads (HTTP judges name a served model)."""
    if oracle.kind == "ensemble":
        return [m for i, member in enumerate(oracle.members) for m in _oracle_models(f"{field}.members.{i}", member)]
    return [(f"{field}.model", oracle.model)] if oracle.kind in ("llm_judge", "reward_model", "pairwise_model") else []


def check_models(cfg, judges_only: bool = False) -> None:
    """Raise ConfigError naming the field when a model the campaign loads — the policy, a model judge — is not
    available here: before any actor starts, where transformers would fail inside one, its traceback about repo ids.
    ``judges_only``: the judge's models only (``judges.oracle``, what ``serve-judge`` loads)."""
    refs = [("model.path", cfg.model.path)] if cfg.generators.engine != "tabular" and not judges_only else []
    refs += _oracle_models("judges.oracle", cfg.judges.oracle)
    if cfg.evaluation.oracle is not None and not judges_only:
        refs += _oracle_models("evaluation.oracle", cfg.evaluation.oracle)
    for field, ref in refs:
        problem = model_problem(ref)
        if problem:
            raise ConfigError(f"{field}: {problem}")


def cmd_run(args) -> int:
    from nashray.cluster.driver import run_campaign  # lazy: the driver imports Ray, Ray Train, vLLM and torch
    overrides = _overrides(args.set)
    if args.run_dir:
        overrides["storage.run_dir"] = args.run_dir
    # Without --verbose the libraries' output (model conversion, Ray, vLLM, DeepSpeed) goes to RUN_DIR/logs/.
    with QuietConsole() if not args.verbose else nullcontext() as console:
        cfg = (load_config(RunDir(args.resume).config_path, overrides) if args.resume
               else load_config(args.config, overrides))
        check_models(cfg)
        progress = Progress(cfg.schedule.rounds, stream=console.stream if console else None)
        run = run_campaign(args.config, resume=args.resume, overrides=overrides, progress=progress, console=console)
        report = build_report(run.root)  # every campaign ends with its report
    print(f"campaign finished: {run.root}\nreport: {report.path}")
    return 0


def cmd_submit(args) -> int:
    """`ray job submit` of `nashray run CONFIG` to a running cluster, with this checkout as the working dir."""
    address = args.address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    entry = ["python", "-m", "nashray.cluster.cli", "run", os.path.basename(args.config)] + sum(
        (["--set", s] for s in args.set or []), [])
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray_cli, "job", "submit", "--address", address, "--working-dir", args.working_dir,
           "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "runs"]})] + (
        ["--no-wait"] if args.no_wait else []) + ["--"] + entry
    print(" ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)


def cmd_status(args) -> int:
    status = campaign_status(args.run_dir)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_report(args) -> int:
    report = build_report(args.run_dir)
    print(f"report: {report.path} ({len(report.plots)} plots; overview: {report.images['overview']})")
    return 0


def cmd_export(args) -> int:
    out = export_model(args.run_dir, args.out, args.round)
    print(f"exported: {out} (HF model folder with README.md model card)")
    return 0


def _eval_oracle(args, campaign) -> dict:
    """The judge of `nashray eval`: --oracle (rule:NAME or a YAML mapping), --oracle-config FILE, the campaign's
    evaluation (else judges') oracle, or the rule judge that prefers concise answers."""
    if args.oracle and args.oracle.startswith("rule:"):
        return {"kind": "rule", "rule": args.oracle[len("rule:"):]}
    if args.oracle:
        spec = yaml.safe_load(args.oracle)
        if not isinstance(spec, dict):
            raise SystemExit(f"--oracle expects rule:NAME or a YAML mapping of an oracle config, got {args.oracle!r}")
        return spec
    if args.oracle_config:
        with open(args.oracle_config, encoding="utf-8") as f:
            return yaml.safe_load(f)
    if campaign is not None:
        return (campaign.evaluation.oracle or campaign.judges.oracle).model_dump(mode="json")
    return {"kind": "rule", "rule": "concise_answer"}


def cmd_eval(args) -> int:
    """Two models head to head on held-out prompts, judged by an oracle: A's win rate over B."""
    from nashray.cluster.evaluation import head_to_head  # lazy: evaluation imports Ray, the actors and torch
    from nashray.cluster.prompts import load_prompts, split_prompts  # lazy: imports scipy (oracles.games)
    campaign = load_config(args.config) if args.config else None
    if args.prompts or campaign is None:
        prompts = load_prompts(args.prompts or "builtin:demo", args.prompt_field)
    else:  # the campaign's held-out split: prompts its policy never trained on
        prompts = split_prompts(load_prompts(campaign.data.prompts, campaign.data.prompt_field, campaign.data.split),
                                campaign.data.eval_fraction, campaign.data.shuffle_seed).eval
    prompts = [p.as_dict() for p in prompts[:args.limit]]
    sampling = campaign.generators.sampling.model_dump() if campaign else {}
    for key in ("temperature", "top_p", "max_new_tokens"):
        if getattr(args, key) is not None:
            sampling[key] = getattr(args, key)
    engine = args.engine or (campaign.generators.engine if campaign and campaign.generators.engine != "tabular"
                             else "hf")
    result = head_to_head(args.model_a, args.model_b, prompts, _eval_oracle(args, campaign), engine=engine,
                          sampling=sampling, dtype=args.dtype or (campaign.model.dtype if campaign else "float32"),
                          max_prompt_tokens=args.max_prompt_tokens or (campaign.model.max_prompt_tokens
                                                                        if campaign else 256),
                          seed=args.seed)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    summary = {k: v for k, v in result.items() if k != "rows"}
    print(json.dumps(summary, indent=2))
    if "win_rate_a_vs_b" in result:
        print(f"A wins {result['win_rate_a_vs_b']:.3f} [{result['win_rate_a_vs_b_low']:.3f}, "
              f"{result['win_rate_a_vs_b_high']:.3f}] of {result['prompts'] - result['dropped']} judged prompts; "
              f"length-controlled {result['lc_win_rate_a_vs_b']:.3f} [{result['lc_win_rate_a_vs_b_low']:.3f}, "
              f"{result['lc_win_rate_a_vs_b_high']:.3f}]", file=sys.stderr)
    else:
        print("every comparison was dropped: no win rate", file=sys.stderr)
    return 0


def cmd_serve_judge(args) -> int:
    """Deploy the campaign's judge (``judges.oracle``) as a Ray Serve app per ``judges.serve``, print its URL (what an
    HTTP judge's ``url`` takes), and keep it up until Ctrl-C (``--detach``: leave it running on the cluster)."""
    from nashray.oracles.serve import serve_judge, stop_judge, unservable_reason  # lazy: imports Ray Serve, FastAPI
    cfg = load_config(args.config, _overrides(args.set))
    oracle = cfg.judges.oracle
    problem = unservable_reason(oracle)
    if problem:
        raise ConfigError(f"judges.oracle: {problem}; serve-judge deploys judges.oracle per judges.serve: set it "
                          f"to the oracle to serve")
    if args.detach and cfg.cluster.address is None and not os.environ.get("RAY_ADDRESS"):
        raise ConfigError("--detach needs a running Ray cluster to leave the judge on: set cluster.address (or "
                          "RAY_ADDRESS); a local cluster started here stops when this command exits")
    check_models(cfg, judges_only=True)
    init_local_ray(num_cpus=None, object_store_gib=cfg.cluster.object_store_gib, address=cfg.cluster.address,
                   bind_host=cfg.cluster.bind_host)
    url = serve_judge(oracle, cfg.judges.serve, seed=cfg.seed)
    print(f"judge {cfg.judges.serve.name!r} ({oracle.kind}) serving at {url}", flush=True)
    if args.detach:
        return 0
    print("Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_judge(cfg.judges.serve)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nashray", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="show Ray's, vLLM's and DeepSpeed's output on the console (by default it goes to "
                             "RUN_DIR/logs/), and the traceback of an input error")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common], help="run a campaign (no CONFIG: the embedded SmolLM2 demo)")
    run.add_argument("config", nargs="?", help="campaign YAML")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the campaign in RUN_DIR at its next round")
    run.add_argument("--run-dir", help="storage.run_dir for a new campaign")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (dotted key)")
    run.set_defaults(func=cmd_run)
    submit = sub.add_parser("submit", parents=[common], help="ray job submit a campaign to a running Ray cluster")
    submit.add_argument("config")
    submit.add_argument("--address", help="Ray dashboard address (default: $RAY_ADDRESS or 127.0.0.1:8265)")
    submit.add_argument("--working-dir", default=".")
    submit.add_argument("--no-wait", action="store_true")
    submit.add_argument("--set", action="append", metavar="KEY=VALUE")
    submit.set_defaults(func=cmd_submit)
    status = sub.add_parser("status", parents=[common],
                            help="where a campaign stands (rounds, last metrics, each role's last output)")
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=cmd_status)
    report = sub.add_parser("report", parents=[common], help="write RUN_DIR/report/index.html and PNG plots")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)
    export = sub.add_parser("export", parents=[common], help="a round checkpoint as a plain HF model folder with a "
                                                             "model card (transformers, vLLM)")
    export.add_argument("run_dir")
    export.add_argument("out", help="the folder to write (must not exist, or be empty)")
    export.add_argument("--round", type=int, help="the round whose checkpoint to export (default: the newest)")
    export.set_defaults(func=cmd_export)
    evaluate = sub.add_parser("eval", parents=[common], help="two models head to head, judged: A's win rate over B")
    evaluate.add_argument("model_a", help="a checkpoint folder, a run directory (its newest checkpoint), an HF "
                                          "folder or id, or smollm2-135m-instruct")
    evaluate.add_argument("model_b")
    evaluate.add_argument("--oracle", help="rule:NAME or a YAML mapping of an oracle config")
    evaluate.add_argument("--oracle-config", help="a YAML file of an oracle config")
    evaluate.add_argument("--config", help="a campaign YAML: its held-out prompts, sampling and evaluation judge")
    evaluate.add_argument("--prompts", help="a prompt source (builtin:demo or a JSONL/JSON/parquet file)")
    evaluate.add_argument("--prompt-field", default="prompt")
    evaluate.add_argument("--limit", type=int, default=64, help="at most this many prompts")
    evaluate.add_argument("--engine", choices=["hf", "vllm"])
    evaluate.add_argument("--temperature", type=float)
    evaluate.add_argument("--top-p", type=float)
    evaluate.add_argument("--max-new-tokens", type=int)
    evaluate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    evaluate.add_argument("--max-prompt-tokens", type=int)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", help="write the result, with every answer and verdict, as JSON")
    evaluate.set_defaults(func=cmd_eval)
    serve_judge = sub.add_parser("serve-judge", parents=[common],
                                 help="deploy the campaign's judge (judges.oracle) with Ray Serve per judges.serve: "
                                      "an OpenAI-compatible chat-completions route for HTTP judges")
    serve_judge.add_argument("config", help="campaign YAML (its judges, judges.serve and cluster sections)")
    serve_judge.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (dotted key)")
    serve_judge.add_argument("--detach", action="store_true",
                             help="return once deployed, leaving the judge on the cluster at cluster.address "
                                  "(stop it with `serve shutdown` or `serve delete NAME`)")
    serve_judge.set_defaults(func=cmd_serve_judge)
    args = parser.parse_args(argv)
    if getattr(args, "config", None) and getattr(args, "resume", None):
        parser.error("give either CONFIG or --resume RUN_DIR, not both")
    try:
        return args.func(args)
    except _input_errors() as err:
        if args.verbose:
            traceback.print_exc()
        print(f"nashray {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
