"""Seeing a campaign from its run directory alone: where it stands (``nashray status``) and a report with plots
(``nashray report``).

Both read only files (metrics.jsonl, state.json, config.yaml, roles.json, the rounds' and checkpoints' files), so they
work the same on a finished run, on one in progress, and on the shared run directory of a campaign submitted to a
cluster. ``build_report`` writes RUN_DIR/report/: one PNG per plot, overview.png (every plot on one page) and
index.html, which embeds the PNGs (base64) and so opens anywhere as a single file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nashray.layout import (CHECKPOINT_DONE, DATASET_DONE, JUDGEMENTS_FILE, SAMPLES_FILE, RunDir, RunDirError,
                            read_table)

# ------------------------------------------------------------------------------------------------ plot data


@dataclass
class Series:
    label: str
    rounds: list[int]
    values: list[float]
    low: list[float] | None = None
    high: list[float] | None = None


@dataclass
class Plot:
    name: str
    title: str
    ylabel: str
    series: list[Series]
    stacked: bool = False
    log_y: bool = False
    reference_line: float | None = None
    note: str = ""


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(metrics: list[dict], key: str, label: str, band: bool = False) -> Series | None:
    """The rounds where ``key`` has a number, with its ``key_low``/``key_high`` interval when ``band``."""
    rows = [m for m in metrics if _finite(m.get(key))]
    if not rows:
        return None
    out = Series(label, [int(m["round"]) for m in rows], [float(m[key]) for m in rows])
    if band and all(_finite(m.get(f"{key}_low")) and _finite(m.get(f"{key}_high")) for m in rows):
        out.low = [float(m[f"{key}_low"]) for m in rows]
        out.high = [float(m[f"{key}_high"]) for m in rows]
    return out


PHASES = (("generate_s", "generate"), ("judge_s", "judge"), ("logprob_s", "π_t/π_ref log-probs"),
          ("train_s", "train"), ("encode_s", "encode weights"), ("push_s", "push"), ("eval_s", "evaluate"))


def plot_specs(metrics: list[dict]) -> list[Plot]:
    """Every plot the metrics have data for, in report order."""
    m = sorted(metrics, key=lambda r: r["round"])
    same_ref = any(_finite(r.get("win_rate_vs_ref")) and r.get("win_rate_vs_ref") == r.get("win_rate_vs_initial")
                   for r in m)
    initial = "initial policy (= π_ref)" if same_ref else "initial policy"
    judged = any(_finite(r.get("win_rate_vs_initial")) for r in m)  # an LLM campaign (tabular ones are exact)
    separate_ref = judged and not same_ref
    plots = [
        Plot("win_rates", "Held-out win rate of π_θ", "win rate", [
            series(m, "win_rate_vs_initial", f"vs {initial}", band=True),
            series(m, "lc_win_rate_vs_initial", f"length-controlled, vs {initial}", band=True),
            series(m, "win_rate_vs_ref", "vs π_ref", band=True) if separate_ref else None,
            series(m, "lc_win_rate_vs_ref", "length-controlled, vs π_ref", band=True) if separate_ref else None,
        ], reference_line=0.5, note="bands: 95% intervals (Wilson; LC: from the logistic fit)"),
        Plot("ranking_accuracy", "Ranking accuracy on the round's judged pairs", "accuracy",
             [series(m, "ranking_accuracy", "π_t vs π_ref log-ratio ranks the preferred response higher")],
             reference_line=0.5),
        Plot("loss", "Training loss", "loss (mean over steps)", [series(m, "loss", "loss")]),
        Plot("kl", "KL divergence to π_ref", "nats", [
            series(m, "kl_to_ref", "KL(π_θ ‖ π_ref), learner, training pairs"),
            series(m, "eval_kl_policy_to_ref", "KL(π_θ ‖ π_ref), held-out answers"),
            series(m, "eval_kl_ref_to_policy", "KL(π_ref ‖ π_θ), held-out initial answers")]),
        Plot("length", "Response length", "tokens", [
            series(m, "mean_response_tokens", "round samples"),
            series(m, "eval_mean_response_tokens", "held-out answers"),
            series(m, "eval_initial_mean_response_tokens", "held-out, initial policy")]),
        Plot("judge", "Judge work per round", "comparisons", [
            series(m, "judge_comparisons", "comparisons"), series(m, "judge_calls", "oracle calls"),
            series(m, "judge_cached", "cached"), series(m, "judge_dropped", "dropped")]),
        Plot("time", "Time per phase", "seconds",
             [_phase_series(m, key, label) for key, label in PHASES] + [_other_time(m)], stacked=True),
        Plot("throughput", "Throughput", "tokens / s", [
            series(m, "generate_tokens_per_s", "generation"), series(m, "train_tokens_per_s", "training")]),
        Plot("exploitability", "Exploitability of π_θ (tabular game)", "exploitability", [
            series(m, "exploitability", "exploitability"),
            series(m, "regularized_exploitability", "regularised exploitability"),
            series(m, "avg_exploitability", "exploitability, average iterate (π_1 + … + π_t)/t"),
            series(m, "avg_regularized_exploitability", "regularised exploitability, average iterate")],
             log_y=True, note="SPPO and DNO converge in the average iterate (their last iterates cycle); INPO and "
                            "Nash-MD in the last"),
        Plot("tabular_win_rate", "Win rate vs π_ref (tabular game, exact)", "win rate",
             [None if judged else series(m, "win_rate_vs_ref", "vs π_ref")], reference_line=0.5),
    ]
    for plot in plots:
        plot.series = [s for s in plot.series if s is not None]
    return [p for p in plots if p.series]


def _phase_series(metrics: list[dict], key: str, label: str) -> Series | None:
    """A phase's seconds in every round (0 where a round did not time it: a replayed phase read from its files)."""
    if not any(_finite(r.get(key)) for r in metrics):
        return None
    return Series(label, [int(r["round"]) for r in metrics],
                  [float(r[key]) if _finite(r.get(key)) else 0.0 for r in metrics])


def _other_time(metrics: list[dict]) -> Series | None:
    """What a round's wall time (``round_s``) spent outside the timed phases: persisting the training data, saving
    the checkpoint, waiting on actors."""
    if not all(_finite(r.get("round_s")) for r in metrics):
        return None
    return Series("other (data, checkpoint, waits)", [int(r["round"]) for r in metrics],
                  [max(0.0, r["round_s"] - sum(r[k] for k, _ in PHASES if _finite(r.get(k)))) for r in metrics])


# ------------------------------------------------------------------------------------------------ rendering

def render(plot: Plot, ax=None):
    """Draw ``plot`` on ``ax`` (a new 6.4×3.6 in figure when None); returns the figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    fig = ax.figure if ax is not None else Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = ax if ax is not None else fig.add_subplot()
    if plot.stacked:
        bottom = [0.0] * len(plot.series[0].rounds)
        for s in plot.series:
            ax.bar(s.rounds, s.values, bottom=bottom, label=s.label, width=0.7)
            bottom = [b + v for b, v in zip(bottom, s.values)]
    else:
        for s in plot.series:
            (line,) = ax.plot(s.rounds, s.values, marker="o", label=s.label)
            if s.low is not None:
                ax.fill_between(s.rounds, s.low, s.high, color=line.get_color(), alpha=0.18, linewidth=0)
    if plot.reference_line is not None:
        ax.axhline(plot.reference_line, color="0.5", linestyle=":", linewidth=1)
    if plot.log_y:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(plot.ylabel)
    ax.set_title(plot.title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def overview(plots: list[Plot], title: str):
    """Every plot on one figure, two per row."""
    from matplotlib.figure import Figure
    rows = math.ceil(len(plots) / 2)
    fig = Figure(figsize=(12.8, 3.6 * rows + 0.6), dpi=90, layout="constrained")
    fig.suptitle(title, fontsize=13)
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    for plot, ax in zip(plots, axes):
        render(plot, ax)
    for ax in axes[len(plots):]:
        ax.set_visible(False)
    return fig


# ------------------------------------------------------------------------------------------------ status

def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _round_index(path: Path) -> int | None:
    try:
        return int(path.name.split("-")[-1].split(".")[0])
    except ValueError:
        return None


def _newest(paths) -> tuple[int, float] | None:
    """(round, mtime) of the newest of ``paths`` (files under rounds/t/)."""
    found = [(int(p.parent.name), _mtime(p)) for p in paths if p.parent.name.isdigit() and _mtime(p) is not None]
    return max(found) if found else None


def campaign_status(run_dir: str | Path, now: float | None = None) -> dict:
    """Where a campaign stands, from its run directory: rounds done, the round in flight and its finished phases,
    the last metrics, each role's last output, complete and torn checkpoints, and the time of the last write."""
    run = RunDir(run_dir)
    state = run.read_state()
    now = time.time() if now is None else now
    cfg = yaml.safe_load(run.config_path.read_text()) if run.config_path.exists() else {}
    metrics = run.metrics()
    rounds_root = run.rounds_root
    round_dirs = sorted((p for p in rounds_root.glob("*") if p.is_dir() and p.name.isdigit()), key=lambda p: p.name)
    planned = (cfg.get("schedule") or {}).get("rounds")

    in_flight = None
    if round_dirs and int(round_dirs[-1].name) >= state.rounds_completed:
        t = int(round_dirs[-1].name)
        steps = [("generated", run.samples_path(t).exists()), ("judged", run.judgements_path(t).exists()),
                 ("dataset written", (run.train_dir(t) / DATASET_DONE).exists()),
                 ("trained", run.complete_checkpoint(t) is not None), ("evaluated", run.eval_path(t).exists()),
                 ("metrics written", run.round_metrics_path(t).exists())]
        in_flight = {"round": t, "done": [name for name, ok in steps if ok]}

    checkpoints_root = run.checkpoints_root
    complete, torn = [], []
    for path in sorted(checkpoints_root.glob("round-*")):
        (complete if (path / CHECKPOINT_DONE).is_file() else torn).append(path.name)

    roles_file = run.roles_path
    placed = json.loads(roles_file.read_text()) if roles_file.exists() else {}
    outputs = {
        "generators": _newest(rounds_root.glob(f"*/{SAMPLES_FILE}")),
        "judges": _newest(rounds_root.glob(f"*/{JUDGEMENTS_FILE}")),
        "learner": max(((_round_index(checkpoints_root / n), _mtime(checkpoints_root / n / CHECKPOINT_DONE))
                        for n in complete), default=None),
    }
    what = {"generators": "samples", "judges": "judgements", "learner": "complete checkpoint"}
    roles = {}
    for role in ("generators", "judges", "learner"):
        members = placed.get(role, [])
        newest = outputs[role]
        roles[role] = {"count": len(members), "nodes": sorted({str(m.get("node_id", "?"))[:12] for m in members}),
                       "pids": [m.get("pid") for m in members], "last_output": what[role],
                       "last_round": newest[0] if newest else None,
                       "last_output_age_s": now - newest[1] if newest else None}

    watched = [run.state_path, run.metrics_path] + ([p for p in round_dirs[-1].rglob("*")] if round_dirs else []) + \
        [p for p in checkpoints_root.glob("*")]
    stamps = [(t, p) for p in watched if (t := _mtime(p)) is not None]
    last_write = max(stamps) if stamps else None
    return {
        "run_dir": str(run.root),
        "algorithm": (cfg.get("algorithm") or {}).get("name"),
        "model": (cfg.get("model") or {}).get("path"),
        "rounds_planned": planned,
        "rounds_completed": state.rounds_completed,
        "version": state.version,
        "checkpoint": state.checkpoint,
        "finished": planned is not None and state.rounds_completed >= planned,
        "in_flight": in_flight,
        "last_write": {"path": str(last_write[1].relative_to(run.root)), "age_s": now - last_write[0]}
        if last_write else None,
        "checkpoints": {"complete": complete, "torn": torn},
        "roles": roles,
        "last_metrics": metrics[-1] if metrics else None,
    }


def _fmt(value, spec: str = ".3f") -> str:
    return format(value, spec) if _finite(value) else "–"


def _age(seconds) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def metrics_line(m: dict) -> str:
    parts = [f"loss {_fmt(m.get('loss'), '.4f')}"]
    if _finite(m.get("win_rate_vs_initial")):
        parts.append(f"win vs initial {_fmt(m['win_rate_vs_initial'])} "
                     f"[{_fmt(m.get('win_rate_vs_initial_low'), '.2f')}, "
                     f"{_fmt(m.get('win_rate_vs_initial_high'), '.2f')}]")
    for key, label, spec in (("lc_win_rate_vs_initial", "LC", ".3f"), ("win_rate_vs_ref", "win vs π_ref", ".3f"),
                             ("kl_to_ref", "KL", ".4f"), ("eval_kl_policy_to_ref", "KL(θ‖ref)", ".4f"),
                             ("eval_kl_ref_to_policy", "KL(ref‖θ)", ".4f"),
                             ("ranking_accuracy", "rank acc", ".3f"), ("mean_response_tokens", "len", ".1f"),
                             ("regularized_exploitability", "reg. expl", ".2e"),
                             ("judge_comparisons", "judged", "d"), ("judge_dropped", "dropped", "d")):
        if key == "win_rate_vs_ref" and "win_rate_vs_initial" in m:
            continue
        if _finite(m.get(key)):
            parts.append(f"{label} {format(m[key], spec)}")
    return " | ".join(parts)


def format_status(s: dict) -> str:
    lines = [f"campaign   {s['run_dir']}",
             f"           {s['algorithm']} on {s['model']}"]
    planned = s["rounds_planned"]
    progress = f"{s['rounds_completed']} of {planned} rounds done" if planned else \
        f"{s['rounds_completed']} rounds done"
    progress += f", policy version {s['version']}"
    if s["finished"]:
        progress += " — finished"
    lines.append(f"progress   {progress}")
    if s["in_flight"]:
        done = ", ".join(s["in_flight"]["done"]) or "nothing written yet"
        lines.append(f"in flight  round {s['in_flight']['round']}: {done} "
                     f"(state.json is behind the newest round directory)")
    if s["last_write"]:
        lines.append(f"last write {_age(s['last_write']['age_s'])} ({s['last_write']['path']})")
    if s["last_metrics"]:
        lines.append(f"round {s['last_metrics']['round']:<4}  {metrics_line(s['last_metrics'])}")
    lines.append("roles")
    for role, r in s["roles"].items():
        where = f"{r['count']} on node(s) {', '.join(r['nodes'])}, pids {r['pids']}" if r["count"] else \
            "placement unknown (no roles.json)"
        last = (f"last {r['last_output']}: round {r['last_round']}, {_age(r['last_output_age_s'])}"
                if r["last_round"] is not None else f"no {r['last_output']} yet")
        lines.append(f"  {role:<11}{where}; {last}")
    ck = s["checkpoints"]
    lines.append(f"checkpoints complete: {', '.join(ck['complete']) or 'none'}; "
                 f"torn: {', '.join(ck['torn']) or 'none'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ report

@dataclass
class Report:
    path: Path
    plots: list[Plot] = field(default_factory=list)
    images: dict[str, Path] = field(default_factory=dict)


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _eval_examples(run: RunDir, t: int, limit: int = 6) -> str:
    path = run.eval_path(t)
    if not path.exists():
        return ""
    cells = []
    for r in read_table(path)[:limit]:
        verdict = _fmt(r["prob"], ".2f") if r["prob"] is not None else f"dropped: {r['reason']}"
        cells.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            r["prompt"], r["response"], r["initial_response"], verdict)) + "</tr>")
    return (f"<h2>Held-out answers, round {t}</h2><table class='examples'><tr><th>prompt</th><th>π_θ</th>"
            f"<th>initial policy</th><th>P(π_θ ≻ initial)</th></tr>{''.join(cells)}</table>")


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; padding: 0 24px; max-width: 1320px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; font-weight: 600; }
.plots { display: grid; grid-template-columns: repeat(2, 1fr); gap: 12px; }
.plots figure { margin: 0; } .plots img { width: 100%; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #666; }
table.examples td { max-width: 420px; white-space: pre-wrap; }
pre { background: #f8f8f8; padding: 8px; font-size: 12px; overflow: auto; }
"""


def build_report(run_dir: str | Path) -> Report:
    """Write RUN_DIR/report/ (PNGs, overview.png, index.html) from the run directory's files."""
    run = RunDir(run_dir)
    status = campaign_status(run.root)
    metrics = run.metrics()
    if not metrics:
        raise RunDirError(f"{run.root} has no completed round yet (metrics.jsonl is empty): nothing to report")
    out = run.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out / "index.html", plot_specs(metrics))
    title = f"{status['algorithm']} on {Path(status['model'] or '?').name} — {run.root.name}"
    figures = []
    for plot in report.plots:
        data = png_bytes(render(plot))
        (out / f"{plot.name}.png").write_bytes(data)
        report.images[plot.name] = out / f"{plot.name}.png"
        caption = html.escape(plot.note)
        figures.append(f"<figure><img alt='{html.escape(plot.title)}' src='data:image/png;base64,"
                       f"{base64.b64encode(data).decode()}'><figcaption>{caption}</figcaption></figure>")
    (out / "overview.png").write_bytes(png_bytes(overview(report.plots, title)))
    report.images["overview"] = out / "overview.png"

    last = metrics[-1]
    summary = _table([
        ("run directory", html.escape(status["run_dir"])),
        ("algorithm / model", html.escape(f"{status['algorithm']} / {status['model']}")),
        ("rounds", html.escape(f"{status['rounds_completed']} of {status['rounds_planned']} done"
                               + (" (finished)" if status["finished"] else ""))),
        ("policy version", str(status["version"])),
        ("last round", html.escape(metrics_line(last))),
        ("report written", time.strftime("%Y-%m-%d %H:%M:%S")),
    ])
    last_table = _table([(k, html.escape(_fmt(v, ".6g") if _finite(v) else json.dumps(v)))
                         for k, v in sorted(last.items())])
    config_text = run.config_path.read_text() if run.config_path.exists() else ""
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{summary}"
            f"<h2>By round</h2><div class='plots'>{''.join(figures)}</div>"
            f"{_eval_examples(run, int(last['round']))}"
            f"<h2>Status</h2><pre>{html.escape(format_status(status))}</pre>"
            f"<h2>Metrics of round {last['round']}</h2>{last_table}"
            f"<details><summary>config.yaml</summary><pre>{html.escape(config_text)}</pre></details>"
            f"</body></html>")
    report.path.write_text(page, encoding="utf-8")
    return report
