"""The learner: Ray Train ``TorchTrainer`` workers, each running one DeepSpeed engine, alive for the whole campaign.

``TorchTrainer.fit()`` is started once, in a background thread of the driver, and never returns until the campaign
ends: model, reference model and optimizer are built once, not per round. The driver and the workers talk through a
small mailbox actor: the driver posts "train round t on these dataset shards"; every worker takes its shard, computes
the log-probs the algorithm needs (π_t before the round's first update, π_ref from a frozen copy), trains the
configured epochs, and saves the round's checkpoint; rank 0 then posts the metrics and the encoded weights of version
t+1, which the driver pushes to the generators.

A prompt's records are scored and trained together: with K samples judged all-pairs, K(K−1)/2 records share K
sequences, and each distinct (prompt, response) goes through each pass (π_t, π_ref, each training epoch) once.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nashray.layout import ADAPTER_DIR, CHECKPOINT_DONE, DEEPSPEED_DIR, DEEPSPEED_TAG, RunDir, newest_checkpoint

STOP = "stop"
WEIGHTS = "weights"
SCORE = "score"
BROADCAST = "broadcast"
SCORE_CHUNK = 16  # sequences per forward of a SCORE task


class LearnerMailbox:
    """Driver ↔ learner-worker messages. Made an async Ray actor, so waiting workers never block the driver's posts."""

    def __init__(self):
        self._tasks: dict[int, dict] = {}
        self._results: dict[int, dict] = {}
        self._errors: list[str] = []
        self._workers: dict[int, str] = {}
        self._answered: set[int] = set()
        self._changed = asyncio.Condition()

    async def _notify(self):
        async with self._changed:
            self._changed.notify_all()

    async def post_task(self, seq: int, task: dict) -> None:
        self._tasks[seq] = task
        await self._notify()

    async def next_task(self, seq: int, timeout_s: float = 30.0) -> dict | None:
        """The task numbered ``seq``, or None after ``timeout_s`` (the worker asks again: short polls survive RPC
        timeouts and let a worker notice a dead driver)."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: seq in self._tasks), timeout_s)
            except asyncio.TimeoutError:
                return None
        return self._tasks[seq]

    async def register(self, rank: int, worker: dict) -> None:
        self._workers[rank] = worker
        await self._notify()

    async def workers(self, world_size: int, timeout_s: float) -> dict[int, dict] | None:
        """Node and pid of each learner worker, once all ``world_size`` have built their engine."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(
                    lambda: len(self._workers) == world_size or self._errors), timeout_s)
            except asyncio.TimeoutError:
                return None
        if self._errors:
            raise RuntimeError("learner worker failed: " + " | ".join(self._errors))
        return dict(self._workers)

    async def first_open(self) -> int:
        """The first task without a result: where a (re)started worker begins."""
        return min((seq for seq in self._tasks if seq not in self._answered), default=len(self._tasks))

    async def post_result(self, seq: int, result: dict) -> None:
        self._answered.add(seq)
        self._results[seq] = result
        await self._notify()

    async def post_error(self, message: str) -> None:
        self._errors.append(message)
        await self._notify()

    async def wait_result(self, seq: int, timeout_s: float) -> dict | None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: seq in self._results or self._errors),
                                       timeout_s)
            except asyncio.TimeoutError:
                return None
        if self._errors:
            raise RuntimeError("learner worker failed: " + " | ".join(self._errors))
        return self._results.pop(seq)


# ------------------------------------------------------------------------------------------ worker side

def deepspeed_config(learner: dict, world_size: int) -> dict:
    """The DeepSpeed config a learner section asks for. The optimizer is a torch one passed to ``initialize`` (a
    config-defined optimizer compiles a C++ op on CPU)."""
    from nashray.models import resolve_precision
    precision = resolve_precision(learner["precision"])
    return {
        "train_micro_batch_size_per_gpu": learner["micro_batch_size"],
        "gradient_accumulation_steps": learner["gradient_accumulation"],
        "train_batch_size": learner["micro_batch_size"] * learner["gradient_accumulation"] * world_size,
        "gradient_clipping": learner["optimizer"]["grad_clip"],
        "zero_optimization": {"stage": learner["zero_stage"]},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_optimizer(params, opt: dict):
    import torch
    kinds = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    return kinds[opt["name"]](params, lr=opt["lr"], weight_decay=opt["weight_decay"])


class SequenceScorer:
    """log π(y | x) for a batch of (prompt_ids, response_ids), for an HF causal LM or a tabular policy, through the
    DeepSpeed engine's forward when one is given (ZeRO-3 needs its hooks)."""

    def __init__(self, tabular: bool, pad_id: int = 0):
        self.tabular = tabular
        self.pad_id = pad_id

    def __call__(self, model, prompt_ids: list[list[int]], response_ids: list[list[int]]):
        if self.tabular:
            module = getattr(model, "module", model)
            return module.sequence_logprobs(prompt_ids, response_ids)
        from nashray.trainers.logprobs import causal_lm_sequence_logprobs
        return causal_lm_sequence_logprobs(model, prompt_ids, response_ids, self.pad_id)


def build_policy(config: dict):
    """(policy module, reference module or None, scorer, tokenizer or None) for a campaign config; no reference
    module for a LoRA policy, whose π_ref is its own forward with the adapters off."""
    from nashray.trainers.lora import add_adapters
    from nashray.models import load_causal_lm, load_tokenizer
    model_cfg = config["model"]
    if config["generators"]["engine"] == "tabular":
        from nashray.oracles.games import load_game
        from nashray.trainers.tabular import TabularPolicy
        game = load_game(config["data"]["game"])
        # float32: DeepSpeed reduces no float64 gradients.
        return (TabularPolicy(game.pi_ref).float(), TabularPolicy(game.pi_ref).float(), SequenceScorer(tabular=True),
                None)
    tokenizer = load_tokenizer(model_cfg["path"])
    scorer = SequenceScorer(tabular=False, pad_id=tokenizer.pad_token_id)
    policy = load_causal_lm(model_cfg["path"], "float32", model_cfg["trust_remote_code"])
    lora = config["learner"]["lora"]
    if lora is not None:  # π_ref is the policy with its adapters off (AdaptersOff, once the engine exists)
        return add_adapters(policy, lora), None, scorer, tokenizer
    reference = load_causal_lm(model_cfg["path"], model_cfg["dtype"], model_cfg["trust_remote_code"])
    return policy, reference, scorer, tokenizer


@dataclass
class RoundData:
    """A worker's shard of the round's training records, held by column: token-id lists and float64 arrays."""
    columns: dict

    @classmethod
    def from_shard(cls, shard) -> "RoundData":
        import pyarrow as pa
        blocks = list(shard.iter_batches(batch_size=None, batch_format="pyarrow"))
        table = pa.concat_tables(blocks) if blocks else None
        columns = {}
        for name in ("prompt_ids", "a_ids", "b_ids", "x_ids"):
            columns[name] = table.column(name).to_pylist() if table is not None else []
        for name in ("target", "a_score", "b_score", "a_policy_logprob", "b_policy_logprob", "a_version",
                     "b_version"):
            # Datasets persisted before the generating policy's log-probs were recorded lack them: NaN, unknown.
            present = table is not None and name in table.column_names
            columns[name] = (table.column(name).to_numpy().astype("float64") if present
                             else np.full(len(table) if table is not None else 0, np.nan))
        return cls(columns)

    def __len__(self) -> int:
        return len(self.columns["target"])

    def sequences(self, key: str, idx) -> tuple[list[list[int]], list[list[int]]]:
        return [self.columns["prompt_ids"][i] for i in idx], [self.columns[f"{key}_ids"][i] for i in idx]

    def tensors(self, idx) -> dict:
        import torch
        return {name: torch.from_numpy(self.columns[name][idx]) for name in ("target", "a_score", "b_score")}

    def oldest_version(self) -> float:
        """The oldest policy version that generated a sample of this shard (NaN when unknown or empty)."""
        versions = np.concatenate([self.columns["a_version"], self.columns["b_version"]])
        versions = versions[versions >= 0]  # -1: a record without b
        return float(versions.min()) if len(versions) else math.nan

    def policy_logprobs(self, idx, keys: tuple[str, ...]) -> dict:
        """``t_*``: the generating policy's log-probs as its generator recorded them."""
        import torch
        out = {}
        for key in keys:
            values = self.columns[f"{key}_policy_logprob"][idx]
            if np.isnan(values).any():
                raise ValueError(f"training records lack {key}_policy_logprob, the log-prob of the policy that "
                                 "generated them, which the learner no longer holds: were they generated with "
                                 "schedule.async_rounds off and trained with it on?")
            out[f"t_{key}"] = torch.from_numpy(values.copy())
        return out

    def tokens(self, idx) -> int:
        return sum(len(self.columns[c][i]) for c in ("prompt_ids", "a_ids", "b_ids", "x_ids") for i in idx)


def prompt_groups(prompt_ids: list[list[int]]) -> list[np.ndarray]:
    """Record indices grouped by prompt (equal token ids), in first-seen order. A prompt's K samples judged all-pairs
    make K(K−1)/2 records over only K sequences, so the records of one prompt are scored and trained together."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, prompt in enumerate(prompt_ids):
        groups.setdefault(tuple(prompt), []).append(row)
    return [np.asarray(rows, dtype=np.int64) for rows in groups.values()]


def pack_groups(groups: list[np.ndarray], min_records: int) -> list[np.ndarray]:
    """Consecutive groups joined into micro-batches of whole groups, each closed once it holds at least
    ``min_records`` records (the last may hold fewer): record indices per micro-batch."""
    batches, current, size = [], [], 0
    for group in groups:
        current.append(group)
        size += len(group)
        if size >= min_records:
            batches.append(np.concatenate(current))
            current, size = [], 0
    if current:
        batches.append(np.concatenate(current))
    return batches


def unique_sequences(data: RoundData, idx, keys: tuple[str, ...]
                     ) -> tuple[list[list[int]], list[list[int]], dict[str, np.ndarray]]:
    """The distinct (prompt_ids, response_ids) that records ``idx`` need under ``keys`` (a, b, x), and for each key
    the position of every record's sequence among them."""
    position: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    prompts, responses, where = [], [], {}
    for key in keys:
        rows = []
        for i in idx:
            prompt, response = data.columns["prompt_ids"][i], data.columns[f"{key}_ids"][i]
            seen = position.setdefault((tuple(prompt), tuple(response)), len(prompts))
            if seen == len(prompts):
                prompts.append(prompt)
                responses.append(response)
            rows.append(seen)
        where[key] = np.asarray(rows, dtype=np.int64)
    return prompts, responses, where


def _score(scorer, model, data: RoundData, idx, keys: tuple[str, ...], prefix: str) -> dict:
    """One forward over the distinct sequences that records ``idx`` need (a, b, x together), each scored once and
    indexed back per record and key. The indexing is part of the autograd graph: one backward through a sequence
    serves every pair it is in, and the gradient equals scoring the records pair by pair."""
    import torch
    prompts, responses, where = unique_sequences(data, idx, keys)
    logps = scorer(model, prompts, responses).double()
    return {f"{prefix}_{key}": logps[torch.from_numpy(where[key])] for key in keys}


def score_sequences(scorer, model, sequences: tuple[list, list, dict[str, np.ndarray]], prefix: str,
                    forwards: int) -> dict:
    """No-grad log-probs per record and key from ``unique_sequences``: the distinct sequences, ordered by length (a
    forward's rows then pad little), scored in ``forwards`` forwards. Every rank must run the same number of forwards
    of a DeepSpeed engine (ZeRO-3 gathers parameters across ranks in each): a rank with fewer distinct sequences
    than ``forwards`` scores its first one again."""
    import torch
    prompts, responses, where = sequences
    order = np.asarray(sorted(range(len(prompts)), key=lambda s: (len(prompts[s]) + len(responses[s]),
                                                                   len(prompts[s]))), dtype=np.int64)
    logps = torch.zeros(len(prompts), dtype=torch.float64)
    for part in np.array_split(order, max(forwards, 1)):
        part = part if len(part) else order[:1]
        if len(part):
            logps[torch.from_numpy(part)] = scorer(model, [prompts[s] for s in part],
                                                   [responses[s] for s in part]).double()
    return {f"{prefix}_{key}": logps[torch.from_numpy(rows)] for key, rows in where.items()}


def _gathered_state_dict(engine, zero_stage: int) -> dict:
    """The full module state dict (all ranks must call this under ZeRO-3; only rank 0's result is used)."""
    import deepspeed

    from nashray.trainers.lora import is_adapted, merged_state_dict
    module = engine.module
    if is_adapted(module):  # ZeRO-3 is refused with LoRA at config load: the weights are whole here
        return merged_state_dict(module)
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _save_checkpoint(engine, state: dict, tokenizer, ckpt_dir: Path, rank: int, metrics: dict) -> None:
    """checkpoints/round-t/: HF safetensors (+ tokenizer) and DeepSpeed's optimizer state, written to a temporary
    folder and renamed, with a COMPLETE marker last: a torn checkpoint is never picked on resume."""
    import torch.distributed as dist
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    dist.barrier()
    if rank == 0:
        from nashray.trainers.lora import is_adapted
        module = engine.module
        if is_adapted(module):  # the adapters for peft and vLLM; the merged model below for everything else
            module.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)
            module = module.get_base_model()
        if hasattr(module, "save_pretrained"):
            module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        else:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        (tmp / CHECKPOINT_DONE).write_text(json.dumps({"round": metrics["round"], "metrics": metrics}))
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        os.replace(tmp, ckpt_dir)
    dist.barrier()


def learner_loop(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker: build once, then serve rounds from the mailbox until told to stop."""
    import deepspeed
    import ray
    import ray.train
    import torch

    from nashray.trainers.algorithms import get_algorithm
    from nashray.weights import ObjectStoreTransport

    config = loop_config["config"]
    learner_cfg = config["learner"]
    mailbox = ray.get_actor(loop_config["mailbox"], namespace=loop_config["namespace"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    threads = learner_cfg["threads_per_worker"] or max(1, int(loop_config["cpus_per_worker"]))
    torch.set_num_threads(threads)
    torch.manual_seed(config["seed"] + rank)  # LoRA adapters' initialisation

    try:
        algorithm = get_algorithm(config["algorithm"]["name"])
        from nashray.cluster.config import CampaignConfig
        algo_cfg = CampaignConfig.model_validate(config).algorithm
        policy, reference, scorer, tokenizer = build_policy(config)
        if reference is not None:
            reference.requires_grad_(False).eval()
        optimizer = build_optimizer([p for p in policy.parameters() if p.requires_grad], learner_cfg["optimizer"])
        engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer,
                                          config=deepspeed_config(learner_cfg, world))
        if reference is None:  # a LoRA policy
            from nashray.trainers.lora import AdaptersOff
            reference = AdaptersOff(engine)
        # The newest complete round checkpoint, looked up at every (re)start: after Ray Train restarts a failed worker
        # group, the workers continue from the last round that finished, not from where the campaign began.
        resume_from = newest_checkpoint(Path(loop_config["checkpoints"]))
        if resume_from is not None:
            from nashray.trainers.checkpoints import load_deepspeed_state
            load_deepspeed_state(engine, resume_from)  # weights-only unpickling: a planted file runs nothing
    except Exception as err:  # the driver waits on the mailbox: tell it why, then let Ray Train see the failure
        ray.get(mailbox.post_error.remote(f"rank {rank} could not start: {type(err).__name__}: {err}"))
        raise

    ray.get(mailbox.register.remote(rank, {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}))
    keys = algorithm.sequences
    transport = ObjectStoreTransport()
    seq = ray.get(mailbox.first_open.remote())  # a restarted group picks up the task in flight
    while True:
        task = ray.get(mailbox.next_task.remote(seq))
        if task is None:
            continue
        seq += 1
        if task["kind"] == STOP:
            return
        try:
            if task["kind"] == BROADCAST:  # rank 0 serves the group's rendezvous; the generators join it
                if rank == 0:
                    transport = _open_broadcast(task, mailbox, seq - 1)
                continue
            if task["kind"] == SCORE:  # every rank runs the forward (ZeRO-3 gathers across them); rank 0 answers
                with torch.no_grad():
                    engine.eval()
                    scored = {"policy": [], "reference": []}
                    for n in range(0, len(task["prompt_ids"]), SCORE_CHUNK):  # bounds the [B, T, vocab] logits
                        part = task["prompt_ids"][n:n + SCORE_CHUNK], task["response_ids"][n:n + SCORE_CHUNK]
                        scored["policy"] += scorer(engine, *part).double().tolist()
                        scored["reference"] += scorer(reference, *part).double().tolist()
                if rank == 0:
                    ray.get(mailbox.post_result.remote(seq - 1, scored))
                continue
            if task["kind"] == WEIGHTS:
                state = _gathered_state_dict(engine, learner_cfg["zero_stage"])
                if rank == 0:
                    ray.get(mailbox.post_result.remote(seq - 1, {"weights": transport.publish(state,
                                                                                              task["version"])}))
                    transport.deliver()
                continue
            done = Path(task["checkpoint_dir"]) / CHECKPOINT_DONE
            if done.is_file():  # finished before a restart: the engine was just loaded from it; never train twice
                result = json.loads(done.read_text())["metrics"]
                state = _gathered_state_dict(engine, learner_cfg["zero_stage"])
            else:
                # The round's data order and torch draws depend on (seed, rank, round) alone, not on how many rounds
                # this process has trained: a round trained again after a restart takes the same batches in order.
                rng = np.random.default_rng([config["seed"], rank, task["round"]])
                torch.manual_seed(int(rng.integers(2 ** 63)))
                result = _train_round(task, rank, engine, reference, scorer, algorithm, algo_cfg, keys, rng,
                                      learner_cfg, config["evaluation"]["ranking_accuracy"],
                                      config["schedule"]["async_anchor"])
                state = _gathered_state_dict(engine, learner_cfg["zero_stage"])
                _save_checkpoint(engine, state, tokenizer, Path(task["checkpoint_dir"]), rank, result)
            if rank == 0:
                t0 = time.perf_counter()
                push = transport.publish(state, task["version"])
                result.update(weights=push, encode_s=time.perf_counter() - t0, weights_nbytes=push.nbytes)
                ray.get(mailbox.post_result.remote(seq - 1, result))
                transport.deliver()  # a broadcast completes once the driver hands the push to the generators
        except Exception as err:
            ray.get(mailbox.post_error.remote(f"rank {rank}, round {task.get('round')}: "
                                              f"{type(err).__name__}: {err}"))
            raise


def _open_broadcast(task: dict, mailbox, seq: int):
    """Learner rank 0's end of the weight broadcast: post host and port, then wait for the generators to join."""
    import socket

    import ray

    from nashray.weights import NcclBroadcastTransport
    host = ray.util.get_node_ip_address()
    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    ray.get(mailbox.post_result.remote(seq, {"host": host, "port": port}))
    return NcclBroadcastTransport(host, port, 0, task["world_size"], backend=task["backend"],
                                  timeout_s=task["timeout_s"])


def _train_round(task, rank, engine, reference, scorer, algorithm, algo_cfg, keys, rng, learner_cfg,
                 ranking: bool, anchor: str) -> dict:
    import torch
    import torch.distributed as dist

    from nashray.cluster.evaluation import ranking_counts

    t_start = time.perf_counter()
    data = RoundData.from_shard(task["shards"][rank])
    mbs = learner_cfg["micro_batch_size"]
    # A step trains whole prompt groups, so a prompt's pairs share one forward and one backward of its sequences;
    # groups, not records, are shuffled each epoch.
    groups = prompt_groups(data.columns["prompt_ids"])
    plans = [pack_groups([groups[g] for g in rng.permutation(len(groups))], mbs)
             for _ in range(learner_cfg["epochs_per_round"])]
    # Every worker must take the same number of optimizer steps (collectives in lockstep); every worker must also
    # take π_t from the same place, so the shards agree on whether any sample comes from an older policy.
    oldest = data.oldest_version()
    shard_facts = torch.tensor([oldest if not math.isnan(oldest) else 1e9] + [len(plan) for plan in plans])
    dist.all_reduce(shard_facts, op=dist.ReduceOp.MIN)
    steps_per_epoch = [int(steps) for steps in shard_facts[1:].tolist()]
    # π_t is the policy that generated the round. The learner holds it unless the round was generated while the
    # previous one trained (asynchronous rounds): then the generators' recorded log-probs of their samples stand in,
    # or, with the "learner" anchor, the learner's newest policy takes its place.
    learner_version = task["version"] - 1
    pi_t_from_generators = (shard_facts[0].item() < learner_version and anchor == "generator"
                            and algorithm.needs_pi_t)
    pi_t_keys = tuple(k for k in keys if k != "x") if algorithm.needs_pi_t else ()
    # Ranking accuracy compares π_t with π_ref; where the loss needs no π_t (the DPO family) it costs one more
    # no-grad forward, by the learner's own policy.
    ranked = ranking and algorithm.needs_ref and "b" in keys
    if ranked and not pi_t_keys:
        pi_t_keys = ("a", "b")

    # π_t and π_ref log-probs, computed once, before the round's first update: each distinct sequence scored once,
    # at most as many per forward as a micro-batch of records has sequences.
    every_record = np.arange(len(data))
    fixed = {}
    engine.eval()
    with torch.no_grad():
        if pi_t_keys and pi_t_from_generators:
            fixed.update(data.policy_logprobs(every_record, pi_t_keys))
        elif pi_t_keys:
            t_sequences = unique_sequences(data, every_record, pi_t_keys)
            t_forwards = torch.tensor([math.ceil(len(t_sequences[0]) / (mbs * len(pi_t_keys)))])
            dist.all_reduce(t_forwards, op=dist.ReduceOp.MAX)
            fixed.update(score_sequences(scorer, engine, t_sequences, "t", int(t_forwards.item())))
        if algorithm.needs_ref:
            ref_sequences = unique_sequences(data, every_record, keys)
            fixed.update(score_sequences(scorer, reference, ref_sequences, "ref",
                                         math.ceil(len(ref_sequences[0]) / (mbs * len(keys)))))
    right, decided = (ranking_counts(fixed["t_a"], fixed["t_b"], fixed["ref_a"], fixed["ref_b"],
                                     data.columns["target"]) if ranked and len(data) else (0.0, 0))
    if not algorithm.needs_pi_t:  # computed for the ranking only: the loss must not see it
        fixed = {name: values for name, values in fixed.items() if not name.startswith("t_")}
    t_logprobs = time.perf_counter() - t_start

    engine.train()
    losses, kls, tokens = [], [], 0
    for plan, steps in zip(plans, steps_per_epoch):
        for idx in plan[:steps]:
            lp = _score(scorer, engine, data, idx, keys, "theta")
            lp.update({name: values[torch.as_tensor(idx)] for name, values in fixed.items()})
            loss = algorithm.loss(lp, data.tensors(idx), algo_cfg).mean()
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            if "ref_a" in lp:
                kls.append(float((lp["theta_a"].detach() - lp["ref_a"]).mean()))
            tokens += data.tokens(idx)
    train_s = time.perf_counter() - t_start - t_logprobs
    engine.eval()
    with torch.no_grad():  # the new policy's log-probs of two fixed sequences: generators must match them
        probe_idx = np.arange(min(2, len(data)))
        probe_prompts, probe_responses = data.sequences("a", probe_idx)
        probe = {"prompt_ids": probe_prompts, "response_ids": probe_responses,
                 "logprobs": scorer(engine, probe_prompts, probe_responses).double().tolist()}
    stats = torch.tensor([sum(losses), len(losses), sum(kls), len(kls), tokens, len(data), right, decided],
                         dtype=torch.float64)
    dist.all_reduce(stats)
    return {
        "round": task["round"],
        "ranking_accuracy": float(stats[6] / stats[7]) if stats[7] else None,
        "pi_t_from_generators": bool(pi_t_from_generators),
        "rows": int(stats[5]),
        "steps": sum(steps_per_epoch),
        "loss": float(stats[0] / max(stats[1], 1)),
        "kl_to_ref": float(stats[2] / stats[3]) if stats[3] else None,
        "train_tokens": int(stats[4]),
        "logprob_s": t_logprobs,
        "train_s": train_s,
        "train_tokens_per_s": float(stats[4]) / max(train_s, 1e-9),
        "probe": probe,
    }


# ------------------------------------------------------------------------------------------ driver side

class Learner:
    """The driver's handle on the persistent learner: ``train_round`` posts a round and waits for its result."""

    def __init__(self, config: dict, run_dir: Path):
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from nashray.cluster.config import LearnerConfig
        from nashray.cluster.placement import learner_scaling
        from nashray.trainers.process_group import NodeAddressTorchConfig

        self.config = config
        self.timeout_s = config["learner"]["timeout_s"]
        self.world_size = config["learner"]["workers"]
        self.namespace = ray.get_runtime_context().namespace
        self.mailbox_name = f"nashray-learner-mailbox-{os.getpid()}-{time.time_ns()}"
        self.mailbox = ray.remote(LearnerMailbox).options(
            name=self.mailbox_name, num_cpus=0, max_concurrency=64).remote()
        scaling = learner_scaling(LearnerConfig.model_validate(config["learner"]))
        self.trainer = TorchTrainer(
            learner_loop,
            torch_config=NodeAddressTorchConfig(),  # the rendezvous server listens on the node's address only
            train_loop_config={"config": config, "mailbox": self.mailbox_name, "namespace": self.namespace,
                               "checkpoints": str(RunDir(run_dir).checkpoints_root),
                               "cpus_per_worker": config["learner"]["resources"]["num_cpus"]},
            scaling_config=ScalingConfig(**scaling),
            run_config=RunConfig(name="learner", storage_path=str(RunDir(run_dir).ray_train_dir),
                                 failure_config=FailureConfig(max_failures=config["learner"]["max_failures"])),
        )
        self._seq = 0
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._fit, name="nashray-learner", daemon=True)
        self._thread.start()

    def _fit(self):
        try:
            self.trainer.fit()
        except BaseException as err:  # surfaced by the next train_round
            self._failure = err

    def _post(self, task: dict) -> int:
        import ray
        seq = self._seq
        ray.get(self.mailbox.post_task.remote(seq, task))
        self._seq += 1
        return seq

    def workers(self) -> list[dict]:
        """Node id and pid of each learner worker (rank order), waiting until every worker has started."""
        import ray
        deadline = time.monotonic() + self.timeout_s
        while True:
            self._raise_if_stopped("starting")
            nodes = ray.get(self.mailbox.workers.remote(self.world_size, 5.0))
            if nodes is not None:
                return [nodes[rank] for rank in range(self.world_size)]
            if time.monotonic() > deadline:
                raise TimeoutError(f"learner: workers did not start within learner.timeout_s={self.timeout_s:g}s")

    def _raise_if_stopped(self, what: str) -> None:
        if self._failure is not None:
            raise RuntimeError(f"learner failed: {self._failure}") from self._failure
        if not self._thread.is_alive():
            raise RuntimeError(f"learner stopped before {what}")

    def open_broadcast(self, generators: int, backend: str, timeout_s: float) -> tuple[str, int]:
        """Start the weight broadcast group (learner rank 0 + ``generators``); returns the rendezvous host and port,
        which every generator must join (``GeneratorActor.join_weight_broadcast``) before the first push."""
        answer = self._wait(self._post({"kind": BROADCAST, "world_size": generators + 1, "backend": backend,
                                        "timeout_s": timeout_s}), "opening the weight broadcast")
        return answer["host"], answer["port"]

    def sequence_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> dict[str, list]:
        """log π_θ (the learner's current policy) and log π_ref of fixed sequences, both computed by the learner with
        the same numerics: ``{"policy": [...], "reference": [...]}``."""
        return self._wait(self._post({"kind": SCORE, "prompt_ids": prompt_ids, "response_ids": response_ids}),
                          "scoring sequences")

    def current_weights(self, version: int):
        """A push of the learner's current weights (those it resumed from), labelled ``version``."""
        return self._wait(self._post({"kind": WEIGHTS, "version": version}), "publishing its weights")["weights"]

    def train_round(self, round_index: int, shards: list, checkpoint_dir: Path, version: int) -> dict:
        """Train one round on per-worker dataset shards; returns the metrics and ``weights``, the
        :class:`~nashray.weights.WeightPush` of the new policy ``version``."""
        import ray
        seq = self._post({"kind": "train", "round": round_index, "shards": shards, "version": version,
                          "checkpoint_dir": str(checkpoint_dir)})
        return self._wait(seq, f"finishing round {round_index}")

    def _wait(self, seq: int, what: str) -> dict:
        import ray
        deadline = time.monotonic() + self.timeout_s
        while True:
            self._raise_if_stopped(what)
            result = ray.get(self.mailbox.wait_result.remote(seq, 5.0))
            if result is not None:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"learner: no answer {what} within learner.timeout_s={self.timeout_s:g}s")

    def shutdown(self, timeout_s: float = 60) -> None:
        import ray
        if self._thread.is_alive():
            self._post({"kind": STOP})
            self._thread.join(timeout_s)
        ray.kill(self.mailbox)
