"""Seeing a campaign: the per-round evaluation, TensorBoard events, `nashray status` and the HTML report with its
plots, all checked against the files of real campaigns (a 2-round tiny-LLM one and a tabular one) run once here."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.ray

EVAL_ORACLE = {"kind": "rule", "rule": "cyclic", "options": {"strength": 0.8}}


@pytest.fixture(scope="module")
def llm_run(ray_cluster, tiny_model_dir, tmp_path_factory):
    """Online DPO on the tiny model for 2 rounds, vLLM generator, evaluated every round by its own judge (a cyclic
    rule, whose verdicts 0.1/0.5/0.9 cannot be mistaken for the campaign judge's 0/0.5/1)."""
    from nashray.cluster.driver import run_campaign
    root = tmp_path_factory.mktemp("llm-campaign")
    config = root / "campaign.yaml"
    config.write_text(yaml.safe_dump(dict(
        seed=0,
        model={"path": tiny_model_dir, "dtype": "float32", "max_prompt_tokens": 96},
        algorithm={"name": "online_dpo"},
        generators={"count": 1, "engine": "vllm", "sampling": {"max_new_tokens": 12}, "kv_cache_gib": 0.25},
        judges={"count": 1, "oracle": {"kind": "rule", "rule": "concise_answer"}},
        learner={"workers": 1, "precision": "fp32", "micro_batch_size": 4, "optimizer": {"lr": 1e-3},
                 "threads_per_worker": 1},
        schedule={"rounds": 2, "prompts_per_round": 4, "samples_per_prompt": 3},
        storage={"run_dir": str(root / "run")},
        evaluation={"every_rounds": 1, "prompts": 4, "oracle": EVAL_ORACLE})))
    return run_campaign(str(config))


@pytest.fixture(scope="module")
def tabular_run(ray_cluster, tmp_path_factory):
    from nashray.cluster.driver import run_campaign
    root = tmp_path_factory.mktemp("tabular-campaign")
    config = root / "campaign.yaml"
    config.write_text(yaml.safe_dump(dict(
        seed=0, algorithm={"name": "inpo"},
        generators={"count": 1, "engine": "tabular"},
        judges={"count": 1, "oracle": {"kind": "matrix", "sample": True}, "strategy": "round_robin",
                "budget_per_round": 1000},
        learner={"workers": 1, "precision": "fp32", "micro_batch_size": 1024, "epochs_per_round": 10,
                 "threads_per_worker": 1, "optimizer": {"name": "adam", "lr": 0.05, "grad_clip": 100.0}},
        data={"game": "builtin:rps"},
        schedule={"rounds": 3, "prompts_per_round": 1, "samples_per_prompt": 400},
        storage={"run_dir": str(root / "run")})))
    return run_campaign(str(config))


# ------------------------------------------------------------------------------------------ evaluation

def test_each_round_is_evaluated_on_held_out_prompts_by_the_evaluation_judge(llm_run):
    from nashray.cluster.evaluation import compare_answers
    from nashray.layout import read_table
    from nashray.oracles.rules import build_rule

    metrics = llm_run.metrics()
    baseline = read_table(llm_run.eval_dir / "baseline.parquet")
    assert len(baseline) == 4
    train_prompts = {s["prompt_id"] for t in range(2) for s in read_table(llm_run.round_dir(t) / "samples.parquet")}
    assert not train_prompts & {b["prompt_id"] for b in baseline}  # held out
    rule = build_rule("cyclic", EVAL_ORACLE["options"])
    for m in metrics:
        rows = read_table(llm_run.round_dir(m["round"]) / "eval.parquet")
        assert [r["initial_response"] for r in rows] == [b["response"] for b in baseline]
        # verdicts are the evaluation oracle's on exactly these answers
        assert [r["prob"] for r in rows] == [rule.prefer(r["prompt"], r["response"], r["initial_response"])
                                             for r in rows]
        expected = compare_answers([r["prob"] for r in rows], [r["response"] for r in rows],
                                   [r["initial_response"] for r in rows], "vs_initial")
        for key, value in expected.items():
            assert m[key] == pytest.approx(value, abs=1e-12), key
        # π_ref is the initial policy: the same judgements under both names
        assert m["win_rate_vs_ref"] == m["win_rate_vs_initial"]
        assert m["lc_win_rate_vs_ref_high"] == m["lc_win_rate_vs_initial_high"]
        assert m["eval_comparisons"] == 4 and m["eval_judge_dropped"] == 0
        assert m["eval_mean_response_tokens"] == np.mean([r["response_tokens"] for r in rows])
        assert m["eval_s"] > 0


def test_eval_kl_is_the_mean_log_ratio_of_the_checkpoint_and_the_base_model(llm_run, tiny_model_dir):
    """log π_ref and log π_θ of the initial answers, recomputed with transformers from the base model and each
    round's checkpoint, agree with what the generators reported, and the KL metric is their mean difference."""
    import torch
    from transformers import AutoModelForCausalLM

    from nashray.layout import read_table
    from nashray.trainers.logprobs import causal_lm_sequence_logprobs

    baseline = read_table(llm_run.eval_dir / "baseline.parquet")
    prompts, responses = [b["prompt_ids"] for b in baseline], [b["response_ids"] for b in baseline]

    def logprobs(folder, prompts=prompts, responses=responses):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            return causal_lm_sequence_logprobs(model, prompts, responses, model.config.pad_token_id).double().numpy()

    ref = logprobs(tiny_model_dir)
    assert np.allclose([b["ref_logprob"] for b in baseline], ref, atol=2e-3)
    for m in llm_run.metrics():
        policy = logprobs(llm_run.checkpoint_dir(m["round"]))
        rows = read_table(llm_run.round_dir(m["round"]) / "eval.parquet")
        assert np.allclose([r["initial_policy_logprob"] for r in rows], policy, atol=2e-3)
        assert m["eval_kl_ref_to_policy"] == pytest.approx(float(np.mean(ref - policy)), abs=2e-3)
        assert abs(m["eval_kl_ref_to_policy"]) > 1e-4  # lr 1e-3 moved the policy
        # The forward KL on the policy's own held-out answers, recomputed from the checkpoint and the base model.
        prompts_t, answers_t = [r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows]
        own = (logprobs(llm_run.checkpoint_dir(m["round"]), prompts_t, answers_t)
               - logprobs(tiny_model_dir, prompts_t, answers_t))
        assert m["eval_kl_policy_to_ref"] == pytest.approx(float(np.mean(own)), abs=2e-3)


def test_tensorboard_events_are_the_round_metrics(llm_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nashray.cluster.metrics import scalars
    events = EventAccumulator(str(llm_run.root / "tb"))
    events.Reload()
    metrics = llm_run.metrics()
    expected = {}
    for m in metrics:
        for name, value in scalars(m).items():
            expected.setdefault(name, []).append((m["round"], value))
    assert set(events.Tags()["scalars"]) == set(expected)
    assert {"eval/win_rate_vs_initial", "eval/lc_win_rate_vs_initial", "train/loss", "time/train_s",
            "judge/judge_comparisons", "eval/eval_kl_ref_to_policy"} <= set(expected)
    for name, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in points], name
        assert np.allclose([v for _, v in got], [v for _, v in points], rtol=1e-6, atol=1e-6), name


# ------------------------------------------------------------------------------------------ report

def _png(data: bytes):
    from PIL import Image
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _assert_figure_shows(plot, fig):
    ax = fig.axes[0]
    if plot.stacked:
        assert len(ax.containers) == len(plot.series)
        for bars, s in zip(ax.containers, plot.series):
            assert [b.get_height() for b in bars] == pytest.approx(s.values)
            assert [b.get_x() + b.get_width() / 2 for b in bars] == pytest.approx(s.rounds)
    else:
        lines = [line for line in ax.lines if line.get_label() in {s.label for s in plot.series}]
        assert [line.get_label() for line in lines] == [s.label for s in plot.series]
        for line, s in zip(lines, plot.series):
            assert list(line.get_xdata()) == s.rounds and list(line.get_ydata()) == pytest.approx(s.values)


def test_report_plots_are_the_metrics(llm_run, capsys):
    from nashray.cluster.cli import main
    from nashray.cluster.report import build_report, render
    metrics = llm_run.metrics()
    assert main(["report", str(llm_run.root)]) == 0
    assert str(llm_run.root / "report" / "index.html") in capsys.readouterr().out
    report = build_report(llm_run.root)
    plots = {p.name: p for p in report.plots}
    assert {"win_rates", "loss", "kl", "length", "judge", "time", "throughput"} <= set(plots)
    assert "exploitability" not in plots
    win = {s.label: s for s in plots["win_rates"].series}
    raw = win["vs initial policy (= π_ref)"]
    lc = win["length-controlled, vs initial policy (= π_ref)"]
    assert raw.rounds == [0, 1] and raw.values == [m["win_rate_vs_initial"] for m in metrics]
    assert raw.low == [m["win_rate_vs_initial_low"] for m in metrics]
    assert lc.high == [m["lc_win_rate_vs_initial_high"] for m in metrics]
    assert plots["loss"].series[0].values == [m["loss"] for m in metrics]
    time_plot = {s.label: s.values for s in plots["time"].series}
    assert time_plot["train"] == [m["train_s"] for m in metrics]
    assert time_plot["evaluate"] == [m["eval_s"] for m in metrics]
    judge = {s.label: s.values for s in plots["judge"].series}
    assert judge["comparisons"] == [m["judge_comparisons"] for m in metrics] == [12, 12]
    for name, plot in plots.items():
        _assert_figure_shows(plot, render(plot))
        image = _png(report.images[name].read_bytes())
        assert image.shape == (360, 640, 3)
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20  # drawn, not blank
    page = report.path.read_text()
    assert page.count("data:image/png;base64,") == len(plots)
    assert "Held-out answers, round 1" in page


def test_time_plot_shows_the_untimed_rest_of_a_round():
    """Given the round's wall time, the stacked time bars end at it: the rest is drawn as its own part."""
    from nashray.cluster.report import plot_specs
    metrics = [{"round": 0, "generate_s": 1.0, "train_s": 2.0, "round_s": 5.0, "ranking_accuracy": 0.6},
               {"round": 1, "generate_s": 1.5, "judge_s": 0.5, "train_s": 2.0, "round_s": 4.5,
                "ranking_accuracy": 0.7}]
    plots = {p.name: p for p in plot_specs(metrics)}
    assert {s.label: s.values for s in plots["time"].series} == {
        "generate": [1.0, 1.5], "judge": [0.0, 0.5], "train": [2.0, 2.0],
        "other (data, checkpoint, waits)": [2.0, 0.5]}
    assert plots["ranking_accuracy"].series[0].values == [0.6, 0.7]
    assert set(plots) == {"time", "ranking_accuracy"}


def test_report_of_a_tabular_game_shows_exploitability(tabular_run):
    from nashray.cluster.report import build_report, render
    metrics = tabular_run.metrics()
    report = build_report(tabular_run.root)
    plots = {p.name: p for p in report.plots}
    assert "win_rates" not in plots and "length" in plots
    expl = {s.label: s for s in plots["exploitability"].series}
    assert expl["regularised exploitability"].values == [m["regularized_exploitability"] for m in metrics]
    assert expl["exploitability"].rounds == [0, 1, 2]
    assert plots["exploitability"].log_y and render(plots["exploitability"]).axes[0].get_yscale() == "log"
    assert plots["tabular_win_rate"].series[0].values == [m["win_rate_vs_ref"] for m in metrics]
    _assert_figure_shows(plots["exploitability"], render(plots["exploitability"]))


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed (Debian package 'chromium'; "
                                                "docker/install-cpu.sh installs it when it runs as root)")
def test_report_opens_in_a_browser_with_every_image(llm_run, tmp_path):
    from nashray.cluster.report import build_report
    report = build_report(llm_run.root)
    # a copy of the page with a probe that writes, once loaded, each image's decoded width into the DOM
    probe = tmp_path / "probe.html"
    probe.write_text(report.path.read_text().replace("</body>", (
        "<script>window.addEventListener('load', () => document.body.setAttribute('data-images', "
        "JSON.stringify([...document.images].map(i => i.complete ? i.naturalWidth : -1))));</script></body>")))
    profile = tmp_path / "profile"
    dom = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    widths = json.loads(dom.stdout.split('data-images="', 1)[1].split('"', 1)[0].replace("&quot;", '"'))
    assert widths == [640] * len(report.plots)

    shot = tmp_path / "report.png"
    done = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
                           "--window-size=1200,2000", report.path.as_uri()], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    image = _png(shot.read_bytes())
    assert image.shape == (2000, 1200, 3)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 200  # text and plots, not a blank page


# ------------------------------------------------------------------------------------------ status

def test_status_of_a_finished_campaign(llm_run, capsys):
    from nashray.cluster.cli import main
    assert main(["status", str(llm_run.root), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["rounds_completed"], status["rounds_planned"], status["finished"]) == (2, 2, True)
    assert status["in_flight"] is None and status["checkpoints"]["torn"] == []
    assert status["checkpoints"]["complete"] == ["round-0000", "round-0001"]
    assert status["last_metrics"] == llm_run.metrics()[-1]
    assert status["roles"]["generators"]["count"] == 1 and status["roles"]["generators"]["last_round"] == 1
    assert status["roles"]["learner"]["last_round"] == 1
    assert main(["status", str(llm_run.root)]) == 0
    text = capsys.readouterr().out
    assert "2 of 2 rounds done, policy version 2 — finished" in text
    assert "win vs initial" in text and "torn: none" in text


def test_status_of_a_campaign_behind_its_newest_round(llm_run, tmp_path):
    """A copy of the run as a crash would leave it: round 1's files written but state.json still at round 0, and a
    checkpoint torn mid-write."""
    from nashray.cluster.report import campaign_status, format_status
    from nashray.layout import RunDir
    copy = tmp_path / "run"
    shutil.copytree(llm_run.root, copy, ignore=shutil.ignore_patterns("ray-train", "judge-cache"))
    run = RunDir(copy)
    state = run.read_state()
    state.rounds_completed, state.version = 1, 1
    run.write_state(state)
    (copy / "rounds" / "0001" / "metrics.json").unlink()
    (copy / "rounds" / "0001" / "eval.parquet").unlink()
    (copy / "checkpoints" / "round-0002.tmp").mkdir()
    status = campaign_status(copy)
    assert status["in_flight"] == {"round": 1, "done": ["generated", "judged", "dataset written", "trained"]}
    assert status["checkpoints"]["torn"] == ["round-0002.tmp"] and not status["finished"]
    text = format_status(status)
    assert "in flight  round 1: generated, judged, dataset written, trained" in text
    assert "torn: round-0002.tmp" in text
