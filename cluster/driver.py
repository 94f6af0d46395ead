"""The campaign driver: the round loop of an online preference-alignment campaign, top to bottom.

    prompts  → generators sample K responses from π_t          (samples.parquet)
             → judges label the planned comparisons             (judgements.parquet, judge-cache/)
             → the algorithm turns them into training records   (train/, a Ray Data parquet dataset)
             → the learner trains on its shards of that dataset (checkpoints/round-t/)
             → weights of π_{t+1} are pushed to every generator
             → evaluation, metrics, and state.json, last

Every phase's output is persisted before the next phase starts and is reused when a resumed campaign finds it, so a
crash loses at most the work of the phase in flight and nothing judged is ever paid for twice. The driver never
touches model weights: it moves references to them.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray

from nashray.actors.generator import GeneratorActor
from nashray.actors.judge import JudgeActor
from nashray.cluster.actor_pool import ActorPool
from nashray.cluster.config import CampaignConfig, dump_config, load_config
from nashray.cluster.console import QuietConsole, link_ray_logs
from nashray.cluster.evaluation import ensure_baseline, evaluate_round
from nashray.cluster.metrics import RoundLoggers
from nashray.cluster.placement import actor_options, check_placeable
from nashray.cluster.progress import Progress
from nashray.cluster.prompts import (PromptSplit, check_prompts_fit_model, load_prompts, split_campaign_prompts,
                                     stream_prompts)
from nashray.cluster.ray_util import init_local_ray
from nashray.cluster.roles import (Roles, generate, judge, push_weights, round_seed, score_comparisons,
                                   verify_push)
from nashray.layout import (DATASET_DONE, CampaignState, RunDir, RunDirError, atomic_write_bytes,
                            atomic_write_json, newest_checkpoint, read_table, write_table)
from nashray.trainers.algorithms import get_algorithm
from nashray.trainers.checkpoints import validate_checkpoint
from nashray.trainers.learner import Learner, round_shards
from nashray.trainers.pairs import cyclic_triads


# ------------------------------------------------------------------------------------------------ phases

def panel_member_names(oracle) -> list[str]:
    """``i:kind`` (rules: ``i:rule-name``) of each member of a panel (ensemble) oracle; [] for any other oracle."""
    if oracle.kind != "ensemble":
        return []
    return [f"{i}:{getattr(m, 'rule', None) or m.kind}" for i, m in enumerate(oracle.members)]


def judge_round(roles: Roles, cfg: CampaignConfig, algorithm, by_prompt: dict[str, list[dict]],
                rng: np.random.Generator, seed: int | None = None) -> tuple[list[dict], dict[str, dict]]:
    """Plan each prompt's comparisons and judge them all in one batch (or derive them from per-response scores);
    judgement rows and {prompt: {(i, j): p}}."""
    budget = cfg.judges.budget_per_round
    per_prompt = None if budget is None else max(1, budget // max(1, len(by_prompt)))
    scoring = cfg.judges.strategy == "score"
    planned = []
    for prompt_id, samples in by_prompt.items():
        # Scores give every pair for the price of one call per response: plan all of them.
        for i, j in algorithm.plan(samples, "all_pairs" if scoring else cfg.judges.strategy, per_prompt, rng):
            planned.append((prompt_id, i, j))
    if scoring:
        verdicts = score_comparisons(roles, by_prompt, planned)
    else:
        verdicts = judge(roles.judges, [{"prompt": by_prompt[p][i]["prompt"], "a": by_prompt[p][i]["response"],
                                  "b": by_prompt[p][j]["response"]} for p, i, j in planned],
                         batch_size=roles.judge_batch, seed=seed)
    rows, judged = [], {p: {} for p in by_prompt}
    for (prompt_id, i, j), verdict in zip(planned, verdicts):
        rows.append({"prompt_id": prompt_id, "i": i, "j": j, "prob": verdict["prob"], "reason": verdict["reason"],
                     "cached": verdict["cached"], "votes": verdict.get("votes")})
        if verdict["prob"] is not None:
            judged[prompt_id][(i, j)] = verdict["prob"]
    return rows, judged


def judged_from_rows(rows: list[dict], prompt_ids) -> dict[str, dict]:
    judged = {p: {} for p in prompt_ids}
    for row in rows:
        if row["prob"] is not None:
            judged[row["prompt_id"]][(row["i"], row["j"])] = row["prob"]
    return judged


def judge_statistics(rows: list[dict], judged: dict[str, dict], by_prompt: dict[str, list[dict]],
                     member_names: list[str]) -> dict:
    """How far the round's judge is from Bradley-Terry — the share of cyclic triads among each prompt's policy
    samples — and, for a panel, how often each member's vote agrees with the panel's verdict (fresh verdicts,
    both decided)."""
    cyclic = decided = 0
    for prompt_id, samples in by_prompt.items():
        policy = [n for n, s in enumerate(samples) if s["source"] == "policy"]
        local = {pos: n for n, pos in enumerate(policy)}
        c, d = cyclic_triads(len(policy), {(local[i], local[j]): p for (i, j), p in judged[prompt_id].items()
                                           if i in local and j in local})
        cyclic, decided = cyclic + c, decided + d
    out = {"judge_cyclic_triads": cyclic / decided if decided else None, "judge_decided_triads": decided}
    for m, name in enumerate(member_names):
        out[f"judge_agreement/{name}"] = member_agreement(rows, m)
    return out


def member_agreement(verdicts: list[dict], m: int) -> float | None:
    """Share of the verdicts where panel member ``m`` and the panel both decided (≠ ½) and agreed; None if none."""
    agree = [(v["votes"][m] > 0.5) == (v["prob"] > 0.5) for v in verdicts
             if v.get("votes") is not None and v["prob"] is not None and v["prob"] != 0.5
             and v["votes"][m] is not None and v["votes"][m] != 0.5]
    return float(np.mean(agree)) if agree else None


def group_by_prompt(samples: list[dict]) -> dict[str, list[dict]]:
    """Samples per prompt in a stable order: policy samples by index, then ref, then mixture samples."""
    order = {"policy": 0, "ref": 1, "mixture": 2}
    grouped: dict[str, list[dict]] = {}
    for s in sorted(samples, key=lambda s: (s["prompt_id"], order[s["source"]], s["sample_index"])):
        grouped.setdefault(s["prompt_id"], []).append(s)
    return grouped


# ------------------------------------------------------------------------------------------------ the loop

class Campaign:
    def __init__(self, cfg: CampaignConfig, run: RunDir, progress: Progress | None = None):
        self.cfg = cfg
        self.run = run
        self.algorithm = get_algorithm(cfg.algorithm.name)
        self.progress = progress or Progress()
        self.loggers = RoundLoggers(cfg, run.root)
        self.tabular = cfg.generators.engine == "tabular"
        self.panel_members = panel_member_names(cfg.judges.oracle)
        self.source = f"game:{cfg.data.game}" if self.tabular else cfg.data.prompts
        self.split: PromptSplit | None = None
        if not cfg.data.streaming:  # a streamed set is read by Ray Data, once Ray is up: stream_prompts()
            prompts = load_prompts(self.source, cfg.data.prompt_field, cfg.data.split)
            if not self.tabular:
                check_prompts_fit_model(prompts, cfg, self.source)  # before any generation is paid for
            self.split = split_campaign_prompts(prompts, cfg, self.source)

    def stream_prompts(self) -> None:
        """data.streaming: the prompt set read through Ray Data into RUN_DIR/prompts (once; a resume reopens it),
        checked row by row as in memory, before any generation is paid for."""
        sharded = stream_prompts(self.cfg, self.source, self.run.prompts_dir)
        self.split = split_campaign_prompts(sharded, self.cfg, self.source)

    # ---------------------------------------------------------------- one round
    def prepare(self, roles: Roles, t: int, train_version: int) -> tuple[dict, object]:
        """Round t's data, up to its persisted training dataset: generate with the generators' current policy, judge,
        build records. ``train_version`` is the policy version that will train on it (the generators' own, or one
        ahead with asynchronous rounds). Returns the round's metrics so far and its Ray Data dataset."""
        cfg, run, algo, progress = self.cfg, self.run, self.algorithm, self.progress
        rng = np.random.default_rng([cfg.seed, t])
        metrics: dict = {"round": t, "version": train_version, "generators": len(roles.generators),
                         "judges": len(roles.judges), "learner_workers": cfg.learner.workers}
        timer = time.perf_counter
        restarts, prepare_start = (roles.generators.restarts, roles.judges.restarts), timer()

        prompts = [p.as_dict() for p in self.split.for_round(t, cfg.schedule.prompts_per_round)]
        samples_path = run.samples_path(t)
        with progress.phase("generate", t) as ph:
            if samples_path.exists():
                samples = read_table(samples_path)
            else:
                t0 = timer()
                # Asynchronous rounds train on these samples after the learner has moved on: the generators also
                # score them under the policy that drew them, which the losses then use as π_t.
                score = cfg.schedule.async_rounds and cfg.schedule.async_anchor == "generator"
                # Seeded per round and source: a resumed round, or one sampled by a replaced generator, draws what
                # the uninterrupted campaign drew.
                samples = generate(roles, prompts, cfg.schedule.samples_per_prompt, "policy", score,
                                   seed=round_seed(cfg, t, "policy"))
                if algo.ref_samples:
                    samples += generate(roles, prompts, algo.ref_samples, "ref", seed=round_seed(cfg, t, "ref"))
                if algo.mixture_samples:
                    samples += generate(roles, prompts, cfg.schedule.samples_per_prompt * algo.mixture_samples,
                                        "mixture", seed=round_seed(cfg, t, "mixture"))
                metrics["generate_s"] = timer() - t0
                metrics["generated_tokens"] = sum(len(s["response_ids"]) for s in samples)
                metrics["generate_tokens_per_s"] = metrics["generated_tokens"] / max(metrics["generate_s"], 1e-9)
                write_table(samples_path, samples)
            ph.done(f"{len(samples)} samples")
        by_prompt = group_by_prompt(samples)
        policy = [s for s in samples if s["source"] == "policy"]
        metrics["mean_response_tokens"] = float(np.mean([len(s["response_ids"]) for s in policy]))
        metrics["staleness"] = train_version - min(int(s["version"]) for s in policy)

        judgements_path = run.judgements_path(t)
        with progress.phase("judge", t) as ph:
            if judgements_path.exists():
                rows = read_table(judgements_path)
                judged = judged_from_rows(rows, by_prompt)
            else:
                t0, calls = timer(), sum(roles.judges.broadcast("calls"))
                rows, judged = judge_round(roles, cfg, algo, by_prompt, rng, round_seed(cfg, t, "judge"))
                metrics["judge_s"] = timer() - t0
                # Oracle calls this round (retries included, cache hits not); a replaced judge starts at 0.
                metrics["judge_calls"] = max(0, sum(roles.judges.broadcast("calls")) - calls)
                write_table(judgements_path, rows)
            metrics["judge_comparisons"] = len(rows)
            metrics["judge_cached"] = sum(bool(r["cached"]) for r in rows)
            metrics["judge_dropped"] = sum(r["prob"] is None for r in rows)
            metrics.update(judge_statistics(rows, judged, by_prompt, self.panel_members))
            cycles = metrics["judge_cyclic_triads"]
            ph.done(f"{len(rows)} comparisons, {metrics['judge_dropped']} dropped"
                    + (f", {cycles:.0%} of {metrics['judge_decided_triads']} triads cyclic" if cycles is not None
                       else ""))

        records = [r for p, s in by_prompt.items() for r in algo.build_records(s, judged[p], cfg.algorithm)]
        fresh = [r for r in records if train_version - min_version(r) <= cfg.schedule.max_staleness]
        metrics["train_records"], metrics["stale_records_dropped"] = len(fresh), len(records) - len(fresh)
        if not fresh:
            raise RuntimeError(f"round {t}: no training records (of {len(rows)} comparisons: "
                               f"{metrics['judge_dropped']} dropped, {len(records)} records, "
                               f"{metrics['stale_records_dropped']} more than schedule.max_staleness="
                               f"{cfg.schedule.max_staleness} versions old); see {judgements_path}")
        shards = self._persist_dataset(fresh, run.train_dir(t))
        metrics["prepare_s"] = timer() - prepare_start
        metrics["generator_restarts"] = roles.generators.restarts - restarts[0]
        metrics["judge_restarts"] = roles.judges.restarts - restarts[1]
        return metrics, shards

    def train_and_push(self, roles: Roles, t: int, prepared: tuple[dict, object], ahead=None) -> dict:
        """Train round t on its prepared (metrics, dataset); once ``ahead`` (the next round's preparation, running
        meanwhile on the generators and judges) is done, push the new policy to every generator and evaluate it."""
        cfg, progress, timer = self.cfg, self.progress, time.perf_counter
        metrics, shards = dict(prepared[0]), prepared[1]
        version, start = metrics["version"], timer()
        checkpoint = (t + 1) % cfg.storage.checkpoint_every == 0 or t == cfg.schedule.rounds - 1
        with progress.phase("train", t) as ph:  # a round whose checkpoint is complete is not trained again
            result = roles.learner.train_round(t, shards, self.run.checkpoint_dir(t), version + 1, checkpoint)
            ph.done(f"loss {result.metrics['loss']:.4f}")
        metrics["train_phase_s"] = timer() - start
        weights, probe = result.weights, result.probe
        metrics.update(result.metrics)
        if ahead is not None:
            ahead.result()  # a generator cannot take weights in the middle of a generate call
            metrics["overlap_wait_s"] = timer() - start - metrics["train_phase_s"]

        with progress.phase("push", t) as ph:
            metrics["push_s"] = push_weights(roles, weights, version + 1)
            metrics["push_logprob_max_abs_diff"] = verify_push(roles, probe)
            ph.done(f"version {version + 1}, generator log-probs within "
                    f"{metrics['push_logprob_max_abs_diff']:.1e} of the learner's")
        if cfg.evaluation.every_rounds and (t + 1) % cfg.evaluation.every_rounds == 0:
            with progress.phase("eval", t) as ph:
                metrics.update(self.evaluate(roles, weights))
                ph.done(_eval_summary(metrics))
        return metrics

    def _persist_dataset(self, records: list[dict], train_dir: Path) -> list:
        """The round's training data as a Ray Data dataset, written as parquet before any training starts; returns
        it split into one shard per learner worker."""
        if not (train_dir / DATASET_DONE).exists():
            tmp = train_dir.with_name(train_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            # Written here, where the records are: a Ray Data write of the same file is a streaming execution that
            # costs ~0.08 s a round for kilobytes (a fifth of a small model's round).
            tmp.mkdir(parents=True)
            write_table(tmp / "records-0.parquet", records)
            (tmp / DATASET_DONE).write_text(str(len(records)))
            shutil.rmtree(train_dir, ignore_errors=True)
            tmp.rename(train_dir)
        # The files are read here and handed over as one materialized dataset: a round's records are megabytes, and
        # `read_parquet` + `split` costs a 4-5 s execution per round on a small cluster, more than training them.
        return round_shards(train_dir, self.cfg.learner.workers)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, roles: Roles, push) -> dict:
        return evaluate_round(self.cfg, self.run, roles, push)

    # ---------------------------------------------------------------- the campaign
    def start_roles(self, state: CampaignState) -> Roles:
        cfg, run = self.cfg, self.run
        check_placeable(cfg)
        gen_cls = ray.remote(GeneratorActor).options(**actor_options(cfg.generators.resources))
        judge_cls = ray.remote(JudgeActor).options(**actor_options(cfg.judges.resources))

        def bring_to_current(generator) -> None:
            if roles.current_push is not None:
                ray.get(generator.apply_weights.remote(roles.current_push, roles.current_push.version))

        generators = ActorPool("generators", lambda rank: gen_cls.remote(cfg, rank), cfg.generators.count,
                               cfg.generators.on_failure, cfg.generators.max_restarts, cfg.generators.timeout_s,
                               prepare=bring_to_current)
        judges = ActorPool("judges", lambda rank: judge_cls.remote(cfg.judges.oracle, str(run.judge_cache),
                                                                   cfg.judges.retries,
                                                                   cfg.data.game, seed=cfg.seed + rank),
                           cfg.judges.count, cfg.judges.on_failure, cfg.judges.max_restarts, cfg.judges.timeout_s)
        # The learner starts from the newest complete checkpoint, which can be one round ahead of state.json (a crash
        # between the two): that round is then finished from its files, not trained again.
        learner = Learner(cfg, run.root)
        roles = Roles(generators, judges, learner, cfg.judges.batch_size)
        try:
            placed = {"generators": generators.broadcast("ready", what="start",
                                                         timeout_s=cfg.generators.start_timeout_s),
                      "judges": judges.broadcast("ready", what="start", timeout_s=cfg.judges.start_timeout_s),
                      "learner": [{"rank": r, **w} for r, w in enumerate(learner.workers())]}
        except BaseException:
            roles.shutdown()
            raise
        atomic_write_json(run.roles_path, placed)  # where each role runs, for `nashray status`
        if cfg.generators.weight_transport == "broadcast":
            address = learner.open_broadcast(len(generators), cfg.generators.broadcast_backend,
                                             cfg.generators.timeout_s)
            generators.broadcast("join_weight_broadcast", address.host, address.port,
                                 what="joining the weight broadcast",
                                 per_rank=lambda rank: (rank + 1, len(generators) + 1,
                                                        cfg.generators.broadcast_backend, cfg.generators.timeout_s))
        return roles

    def run_rounds(self, roles: Roles, state: CampaignState) -> CampaignState:
        """The rounds, one after another; with ``schedule.async_rounds``, round t+1 is generated and judged by π_t
        on the generators and judges while the learner trains round t (one-step-off)."""
        cfg, run = self.cfg, self.run
        if state.rounds_completed:  # generators start from the base model: bring them to the resumed version
            push_weights(roles, roles.learner.current_weights(state.version, state.rounds_completed - 1),
                         state.version)
        elif cfg.evaluation.every_rounds:
            ensure_baseline(self.cfg, self.run, self.split.eval, roles)
        overlap = ThreadPoolExecutor(1, thread_name_prefix="nashray-next-round") if cfg.schedule.async_rounds else None
        prepared = None
        try:
            for t in range(state.rounds_completed, cfg.schedule.rounds):
                stop = storage_stop(run, cfg.storage.min_free_gib)
                if stop is not None:
                    raise stop
                start = time.perf_counter()
                prepared = prepared or self.prepare(roles, t, state.version)
                ahead = (overlap.submit(self.prepare, roles, t + 1, state.version + 1)
                         if overlap is not None and t + 1 < cfg.schedule.rounds else None)
                metrics = self.train_and_push(roles, t, prepared, ahead)
                prepared = ahead.result() if ahead is not None else None
                metrics["round_s"] = time.perf_counter() - start
                if t == cfg.schedule.rounds - 1:  # the learner is done: its last checkpoint is written when it stops
                    roles.learner.shutdown()
                # A round's checkpoint is written while the next round runs: state.json names the newest complete one.
                newest = newest_checkpoint(run.checkpoints_root)
                state = CampaignState(rounds_completed=t + 1, version=state.version + 1,
                                      checkpoint=str(newest) if newest is not None else None)
                atomic_write_json(run.round_metrics_path(t), metrics)
                run.record_metrics(metrics)
                self.loggers.log_round(metrics)  # RUN_DIR/tb/, W&B, MLflow: views of metrics.jsonl
                run.write_state(state)  # last: a crash before this line replays (from its files) only this round
                run.prune_checkpoints(cfg.storage.keep_checkpoints, protect=t)
                self.progress.round_summary(metrics)
        finally:
            if overlap is not None:  # on an error, the next round's calls fail with the actors shut down after this
                overlap.shutdown(wait=False, cancel_futures=True)
        return state


def min_version(record: dict) -> int:
    """The oldest policy version among a training record's samples (b_version is -1 for single-response records)."""
    return min(v for v in (record["a_version"], record["b_version"]) if v >= 0)


def _eval_summary(m: dict) -> str:
    parts = []
    if m.get("win_rate_vs_initial") is not None:
        parts.append(f"win rate vs initial {m['win_rate_vs_initial']:.3f}")
    if m.get("regularized_exploitability") is not None:
        parts.append(f"reg. exploitability {m['regularized_exploitability']:.2e}")
    return ", ".join(parts)


def run_campaign(config_path: str | None = None, resume: str | None = None, overrides: dict | None = None,
                 progress: Progress | None = None, console: QuietConsole | None = None) -> RunDir:
    """Start (or resume) a campaign and run it to its last round; returns its run directory. With a ``console``
    (`nashray run` without ``--verbose``) the driver's output moves into RUN_DIR/logs/ and the actors' stays in Ray's
    logs: the terminal shows only the progress lines."""
    if resume:
        run = RunDir(resume)
        cfg = load_config(run.config_path, overrides)
        run.check_writable(cfg.storage.min_free_gib)
        state = run.read_state()
        # The learner resumes from the newest complete checkpoint and trains the rounds after it again from their
        # datasets; a torn newer one (cut off while written in the background) is ignored.
        checkpoint = newest_checkpoint(run.checkpoints_root)
        if checkpoint is not None:
            validate_checkpoint(checkpoint, cfg)  # names the bad file before any actor starts
        if overrides:  # the resumed config, e.g. with more generators, is the one in force from now on
            atomic_write_bytes(run.config_path, dump_config(cfg).encode())
    else:
        cfg = load_config(config_path, overrides)
        # "{time}" in storage.run_dir gives every new campaign its own folder (the demo's default).
        cfg.storage.run_dir = cfg.storage.run_dir.replace("{time}", time.strftime("%Y%m%d-%H%M%S"))
        run = RunDir(cfg.storage.run_dir)
        run.create(dump_config(cfg), cfg.storage.min_free_gib)
        state = run.read_state()
    campaign = Campaign(cfg, run, progress)
    log_dir = run.logs_dir
    if console is not None:
        console.move_to(log_dir)
        campaign.progress.note(f"logs (Ray, vLLM, DeepSpeed): {log_dir}/")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # the campaign prints its own progress
    init_local_ray(num_cpus=_local_cpus(cfg), object_store_gib=cfg.cluster.object_store_gib,
                   address=cfg.cluster.address, bind_host=cfg.cluster.bind_host, log_to_driver=console is None)
    link_ray_logs(log_dir)
    if cfg.data.streaming:
        campaign.stream_prompts()
    roles = campaign.start_roles(state)
    try:
        campaign.run_rounds(roles, state)
    except Exception as err:
        stop = storage_stop(run, cfg.storage.min_free_gib, err)
        if stop is None:
            raise
        raise stop from err
    finally:
        roles.shutdown()
    return run


def storage_stop(run: RunDir, min_free_gib: float, err: Exception | None = None) -> RunDirError | None:
    """The error that stops a campaign whose run directory can no longer take its files (full, read-only), naming
    the directory and, for ``err`` (a round that failed writing), the file; None while the directory is usable. What
    was persisted stays valid (every file is written whole or not at all), so the campaign resumes once it is."""
    try:
        run.check_writable(min_free_gib)
    except RunDirError as problem:
        failed = _failed_write(err)
        where = f"; the round stopped writing {failed.filename}: {failed.strerror}" \
            if failed is not None and failed.filename else ""
        return RunDirError(f"{problem}{where}. Nothing persisted is lost: free space (or make it writable) and "
                           f"resume with `nashray run --resume {run.root}`")
    return None


def _failed_write(err: BaseException | None) -> OSError | RunDirError | None:
    """The outermost error behind ``err`` that names a file (an atomic write's target before its temporary file),
    through exception chains and Ray's task and actor errors."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (OSError, RunDirError)) and err.filename:
            return err
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def _local_cpus(cfg: CampaignConfig) -> int:
    """Logical CPUs for a local cluster: what the actors reserve plus room for Ray Data's read/write tasks (the
    phases run one after another, so the cores are shared in time, not oversubscribed)."""
    reserved = (cfg.generators.count * cfg.generators.resources.num_cpus
                + cfg.judges.count * cfg.judges.resources.num_cpus
                + cfg.learner.workers * cfg.learner.resources.num_cpus)
    return int(math.ceil(reserved)) + 2
