"""The markdown table of every benchmark result: ``bench/results/README.md``, and the same table in the project
README and ``docs/benchmarks.md`` between their ``<!-- results:begin -->`` / ``<!-- results:end -->`` markers.

    .venv/bin/python bench/report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
TABLE_PAGES = (ROOT / "README.md", ROOT / "docs" / "benchmarks.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
ALGORITHMS = ("<!-- algorithms:begin -->", "<!-- algorithms:end -->")
ORDER = ("demo", "algorithms", "feature_game", "mixture_sampling", "push", "generation", "learner", "end_to_end", "async_rounds", "scaling")


def _fmt(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def load_results() -> list[dict]:
    found = {p.stem: {**json.loads(p.read_text()), "file": p.name} for p in RESULTS_DIR.glob("*.json")}
    return [found[name] for name in sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else 99, n))]


def table(results: list[dict]) -> str:
    lines = ["| result file | metric | nashray | baseline | ratio | target | met | load (1 min, start → end) | "
             "notes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        load = r.get("load", {})
        load_text = f"{_fmt(load.get('start', [None])[0])} → {_fmt(load.get('end', [None])[0])}"
        for row in r.get("summary", []):
            baseline = _fmt(row["baseline"]) + (f" ({row['baseline_name']})" if row.get("baseline_name") else "")
            lines.append(f"| `{r['file']}` | {row['metric']} | {_fmt(row['nashray'])} {row['unit']} | "
                         f"{baseline} | {_fmt(row['ratio'])} | {_fmt(row['target'])} | {_fmt(row['met'])} | "
                         f"{load_text} | {row.get('note') or ''} |")
    return "\n".join(lines)


def machine_line(results: list[dict]) -> str:
    if not results:
        return ""
    m = max((r["machine"] for r in results if "machine" in r), key=len)  # the fullest description
    files_by_cpu: dict[str, list[str]] = {}
    for r in results:
        if "machine" in r:
            files_by_cpu.setdefault(r["machine"]["cpu_model"], []).append(r["file"])
    most = max(files_by_cpu, key=lambda cpu: len(files_by_cpu[cpu]))
    others = "".join(f"; {cpu} for {', '.join(f'`{f}`' for f in files)}"
                     for cpu, files in files_by_cpu.items() if cpu != most)
    packages = ", ".join(f"{k} {v}" for k, v in m.get("packages", {}).items())
    return (f"Machine: {most}{' for the other files' if others else ''}{others}; {m['nproc']} cores, "
            f"{m['mem_total_gib']} GiB, {m['platform']}; {packages}. Each row gives the 1-minute load average at "
            f"the start and end of its benchmark (2.0 = both cores busy).")


def algorithms_table(result: dict) -> str:
    """The tournament of ``algorithms.json``: one row per entrant, best mean win rate first."""
    t = result["tournament"]
    lines = ["| entrant | win rate vs initial (95 % CI) | mean win rate vs the field | exploitability in population "
             "(best response) | KL to π_ref | response tokens |", "|---|---|---|---|---|---|"]
    for row in sorted(result["table"], key=lambda r: -r["mean_win_rate"]):
        vs = ("—" if row["win_rate_vs_initial"] is None else
              f"{row['win_rate_vs_initial']:.2f} [{row['win_rate_vs_initial_low']:.2f}, "
              f"{row['win_rate_vs_initial_high']:.2f}]")
        kl = "—" if row["kl_to_ref"] is None else f"{'≤ ' if row['kl_is_upper_bound'] else ''}{row['kl_to_ref']:.2f}"
        lines.append(f"| {row['entrant']} | {vs} | {row['mean_win_rate']:.3f} | "
                     f"{row['exploitability_in_population']:.2f} ({row['best_response']}) | {kl} | "
                     f"{row['mean_response_tokens']:.1f} |")
    cyc = t["judge_intransitivity"]
    members = "; ".join(f"{name}: agrees with the panel on {m['agreement_with_panel']:.0%} of its decided votes"
                        for name, m in t["panel_members"].items() if m["agreement_with_panel"] is not None)
    lines += ["", f"Judge: {t['comparisons']} comparisons on {result['prompts']} held-out prompts; "
                  f"{cyc['cyclic_triads_share']:.1%} of the {cyc['decided_triads']} decided answer triads are cyclic "
                  f"(a Bradley-Terry judge has none); {cyc['policy_level_cyclic_triads']} of "
                  f"{cyc['policy_level_decided_triads']} entrant triads are cyclic in the win-rate matrix. {members}."]
    return "\n".join(lines) + "\n"


def render(results: list[dict]) -> str:
    return "\n\n".join([table(results), machine_line(results)]) + "\n"


def main() -> None:
    results = load_results()
    if not results:
        sys.exit(f"no results in {RESULTS_DIR}")
    block = render(results)
    readme = ("# Benchmark results\n\nGenerated by `bench/report.py` from the JSON files in this folder; how each "
              "number is measured, and what limits it, is in [docs/benchmarks.md](../../docs/benchmarks.md).\n\n"
              + block)
    (RESULTS_DIR / "README.md").write_text(readme)
    blocks = {(BEGIN, END): block}
    algorithms = RESULTS_DIR / "algorithms.json"
    if algorithms.exists():
        blocks[ALGORITHMS] = algorithms_table(json.loads(algorithms.read_text()))
    for page in TABLE_PAGES:
        text = page.read_text() if page.exists() else ""
        for (begin, end), content in blocks.items():
            if begin in text and end in text:
                head, rest = text.split(begin, 1)
                _, tail = rest.split(end, 1)
                text = f"{head}{begin}\n{content}{end}{tail}"
        page.write_text(text)
    print(readme)


if __name__ == "__main__":
    main()
