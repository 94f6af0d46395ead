"""The learner: Ray Train ``TorchTrainer`` workers, each running one DeepSpeed engine, alive for the whole campaign.

``TorchTrainer.fit()`` is started once, in a background thread of the driver, and never returns until the campaign
ends: model, reference model and optimizer are built once, not per round. The driver (:class:`Learner`) and the
workers (:class:`LearnerWorker`) exchange typed messages through a small mailbox actor — :class:`TrainRound`,
:class:`ScoreSequences`, :class:`PublishWeights`, :class:`OpenBroadcast`, :class:`Stop` — each answered (by rank 0)
with a :class:`RoundResult`, :class:`SequenceLogprobs`, a :class:`~nashray.weights.WeightPush` or a
:class:`BroadcastAddress`.

One round on a worker: take its dataset shard; plan the epochs' micro-batches; compute the log-probs the algorithm
needs before the first update (π_t, π_ref from a frozen copy or the policy with its adapters off); train; rank 0
answers with the metrics and the encoded weights of version t+1, which the driver pushes to the generators; then,
every ``storage.checkpoint_every`` rounds, the round's checkpoint is written — while the driver pushes, evaluates and
prepares the next round. Rounds the campaign finished after the newest complete checkpoint (not checkpointed, or
cut off while writing) are trained again from their persisted datasets, with the same seeds, before anything else.

A prompt's records are scored and trained together: with K samples judged all-pairs, K(K−1)/2 records share K
sequences, and each distinct (prompt, response) goes through each pass (π_t, π_ref, each training epoch) once.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data
import ray.train
import torch
import torch.distributed as dist
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from nashray.cluster.config import CampaignConfig, LearnerConfig, OptimizerConfig
from nashray.cluster.placement import learner_scaling
from nashray.layout import (ADAPTER_DIR, CHECKPOINT_DONE, DATASET_DONE, DEEPSPEED_DIR, DEEPSPEED_TAG, RunDir,
                            newest_checkpoint)
from nashray.models import load_causal_lm, load_tokenizer, resolve_precision
from nashray.oracles.games import load_game
from nashray.trainers.algorithms import Algorithm, get_algorithm
from nashray.trainers.checkpoints import load_deepspeed_state
from nashray.trainers.logprobs import causal_lm_sequence_logprobs
from nashray.trainers.lora import AdaptersOff, add_adapters, adapter_files, is_adapted, merged_state_dict
from nashray.trainers.process_group import NodeAddressTorchConfig
from nashray.trainers.ranking import ranking_counts
from nashray.trainers.tabular import TabularPolicy
from nashray.weights import AdapterPayload, NcclBroadcastTransport, ObjectStoreTransport, WeightPush

SCORE_CHUNK = 16  # sequences per forward of a ScoreSequences message: bounds the [B, T, vocab] logits

# glibc's malloc in the learner workers: one arena, no chunk of its own mmap'd, nothing handed back to the kernel.
# Ray Train runs the training loop in a Python thread, to which glibc gives an arena of its own whose heaps go back
# to the kernel as soon as they empty, and any block over 32 MiB (the LM head's logits) is mmap'd afresh: every step
# page-faulted its activations in again. SmolLM2 end-to-end rounds (AVX512-BF16, 2 cores), one training step of 16
# sequences: 4.0–6.7 s with 0.9–4.2 s of it in the kernel → 3.3–4.3 s with 0.1–0.7 s. The heap then stays at the
# learner's peak, which it reaches every round anyway. Read at process start; other C libraries ignore it.
LEARNER_MALLOC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                           f"glibc.malloc.trim_threshold={16 * 2**30}")


# ------------------------------------------------------------------------------------------ messages

@dataclass(frozen=True)
class TrainRound:
    """Train round ``round`` on per-worker dataset shards and publish the new policy as ``version``; with
    ``checkpoint``, then write the round's checkpoint to ``checkpoint_dir``."""
    round: int
    shards: list
    version: int
    checkpoint_dir: str
    checkpoint: bool = True


@dataclass(frozen=True)
class ScoreSequences:
    """log π_θ and log π_ref of fixed sequences."""
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]


@dataclass(frozen=True)
class PublishWeights:
    """A push of the weights after round ``through_round`` (trained again from its data if the newest checkpoint is
    older), labelled ``version``."""
    version: int
    through_round: int


@dataclass(frozen=True)
class OpenBroadcast:
    """Open the weight broadcast group: learner rank 0 plus ``world_size`` − 1 generators."""
    world_size: int
    backend: str
    timeout_s: float


@dataclass(frozen=True)
class Stop:
    """End the training loop: the campaign is over. Answered once the last checkpoint is written."""


Message = TrainRound | ScoreSequences | PublishWeights | OpenBroadcast | Stop


@dataclass(frozen=True)
class Probe:
    """A short sequence of the round's and the new policy's log-prob of it: every generator must match this after
    the push."""
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[float]


@dataclass
class RoundResult:
    """A trained round: its ``metrics`` (loss, steps, timings, …; what the round's checkpoint marker records), the
    push of the new policy and the probe that checks the push."""
    metrics: dict[str, Any]
    weights: WeightPush
    probe: Probe


@dataclass(frozen=True)
class SequenceLogprobs:
    """log π_θ (the learner's current policy) and log π_ref of fixed sequences, in their order."""
    policy: list[float]
    reference: list[float]


@dataclass(frozen=True)
class BroadcastAddress:
    """Where the generators join the weight broadcast group (``GeneratorActor.join_weight_broadcast``)."""
    host: str
    port: int


class LearnerMailbox:
    """Driver ↔ learner-worker messages, numbered in posting order. Made an async Ray actor, so waiting workers never
    block the driver's posts. A message is dropped once it is answered and every worker has read it (a restarted
    worker group begins at the first unanswered one): a round's message holds its dataset shards, whose blocks would
    otherwise stay in the object store for the whole campaign."""

    def __init__(self):
        self._messages: dict[int, Message] = {}
        self._answers: dict[int, Any] = {}
        self._errors: list[str] = []
        self._workers: dict[int, dict] = {}
        self._answered: set[int] = set()
        self._read_by: dict[int, set[int]] = {}  # seq -> the ranks that have read it
        self._next_seq = 0
        self._changed = asyncio.Condition()

    async def _notify(self):
        async with self._changed:
            self._changed.notify_all()

    async def _wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), timeout_s)
                return True
            except asyncio.TimeoutError:
                return False

    def _raise_worker_errors(self) -> None:
        if self._errors:
            raise RuntimeError("learner worker failed: " + " | ".join(self._errors))

    async def post(self, seq: int, message: Message) -> None:
        self._messages[seq] = message
        self._next_seq = max(self._next_seq, seq + 1)
        await self._notify()

    async def next_message(self, seq: int, rank: int, timeout_s: float = 30.0) -> Message | None:
        """Message ``seq``, or None after ``timeout_s``: the worker asks again (short waits survive RPC timeouts and
        let a worker notice a dead driver)."""
        if not await self._wait_for(lambda: seq in self._messages, timeout_s):
            return None
        message = self._messages[seq]
        self._read_by.setdefault(seq, set()).add(rank)
        self._drop_if_done(seq)
        return message

    def _drop_if_done(self, seq: int) -> None:
        """Forget message ``seq`` once it is answered and read by every registered worker."""
        if seq in self._answered and self._workers and self._read_by.get(seq, set()) >= set(self._workers):
            self._messages.pop(seq, None)
            self._read_by.pop(seq, None)

    async def register(self, rank: int, worker: dict) -> None:
        self._workers[rank] = worker
        await self._notify()

    async def workers(self, world_size: int, timeout_s: float) -> dict[int, dict] | None:
        """Node and pid of each learner worker, once all ``world_size`` have built their engine."""
        if not await self._wait_for(lambda: len(self._workers) == world_size or self._errors, timeout_s):
            return None
        self._raise_worker_errors()
        return dict(self._workers)

    async def first_open(self) -> int:
        """The first message without an answer: where a (re)started worker begins."""
        return min((seq for seq in self._messages if seq not in self._answered), default=self._next_seq)

    async def answer(self, seq: int, answer: Any) -> None:
        self._answered.add(seq)
        self._answers[seq] = answer
        self._drop_if_done(seq)
        await self._notify()

    async def fail(self, message: str) -> None:
        self._errors.append(message)
        await self._notify()

    async def wait_answer(self, seq: int, timeout_s: float) -> tuple[bool, Any]:
        """(True, the answer to message ``seq``), or (False, None) after ``timeout_s``."""
        if not await self._wait_for(lambda: seq in self._answers or self._errors, timeout_s):
            return False, None
        self._raise_worker_errors()
        return True, self._answers.pop(seq)


# ------------------------------------------------------------------------------------------ building blocks

def deepspeed_config(learner: LearnerConfig, world_size: int) -> dict:
    """The DeepSpeed config a learner section asks for. The optimizer is a torch one passed to ``initialize`` (a
    config-defined optimizer compiles a C++ op on CPU)."""
    precision = resolve_precision(learner.precision)
    return {
        "train_micro_batch_size_per_gpu": learner.micro_batch_size,
        "gradient_accumulation_steps": learner.gradient_accumulation,
        "train_batch_size": learner.micro_batch_size * learner.gradient_accumulation * world_size,
        "gradient_clipping": learner.optimizer.grad_clip,
        "zero_optimization": {"stage": learner.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_optimizer(params, optimizer: OptimizerConfig) -> torch.optim.Optimizer:
    """Adam(W) with torch's fused kernel: one pass over each tensor instead of one per operation of the update
    (SmolLM2's AdamW step on 2 CPU threads: 0.08 s against 0.30 s)."""
    if optimizer.name == "sgd":
        return torch.optim.SGD(params, lr=optimizer.lr, weight_decay=optimizer.weight_decay)
    kind = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[optimizer.name]
    return kind(params, lr=optimizer.lr, weight_decay=optimizer.weight_decay, fused=True)


class SequenceScorer:
    """log π(y | x) for a batch of (prompt_ids, response_ids), for an HF causal LM or a tabular policy, through the
    DeepSpeed engine's forward when one is given (ZeRO-3 needs its hooks)."""

    def __init__(self, tabular: bool, pad_id: int = 0):
        self.tabular = tabular
        self.pad_id = pad_id

    def __call__(self, model, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
        if self.tabular:
            module = getattr(model, "module", model)
            return module.sequence_logprobs(prompt_ids, response_ids)
        return causal_lm_sequence_logprobs(model, prompt_ids, response_ids, self.pad_id)


def build_policy(cfg: CampaignConfig):
    """(policy module, reference module or None, scorer, tokenizer or None) for a campaign; no reference module for
    a LoRA policy, whose π_ref is its own forward with the adapters off."""
    if cfg.generators.engine == "tabular":
        game = load_game(cfg.data.game)
        # float32: DeepSpeed reduces no float64 gradients.
        return (TabularPolicy(game.pi_ref).float(), TabularPolicy(game.pi_ref).float(), SequenceScorer(tabular=True),
                None)
    model = cfg.model
    tokenizer = load_tokenizer(model.path)
    scorer = SequenceScorer(tabular=False, pad_id=tokenizer.pad_token_id)
    policy = load_causal_lm(model.path, "float32", model.trust_remote_code)
    if cfg.learner.lora is not None:  # π_ref is the policy with its adapters off (AdaptersOff, once the engine exists)
        return add_adapters(policy, cfg.learner.lora), None, scorer, tokenizer
    reference = load_causal_lm(model.path, model.dtype, model.trust_remote_code)
    return policy, reference, scorer, tokenizer


# ------------------------------------------------------------------------------------------ a round's records

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
        return {name: torch.from_numpy(self.columns[name][idx]) for name in ("target", "a_score", "b_score")}

    def oldest_version(self) -> float:
        """The oldest policy version that generated a sample of this shard (NaN when unknown or empty)."""
        versions = np.concatenate([self.columns["a_version"], self.columns["b_version"]])
        versions = versions[versions >= 0]  # -1: a record without b
        return float(versions.min()) if len(versions) else math.nan

    def policy_logprobs(self, idx, keys: tuple[str, ...]) -> dict:
        """``t_*``: the generating policy's log-probs as its generator recorded them."""
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


def round_shards(train_dir: Path, workers: int) -> list:
    """A round's persisted training dataset, one equal shard per learner worker. The driver hands these to the
    learner, and a worker training the round again later splits the same files the same way."""
    return ray.data.from_arrow(pq.read_table(train_dir)).split(workers, equal=True)


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


def score_records(scorer, model, data: RoundData, idx, keys: tuple[str, ...], prefix: str) -> dict:
    """One forward over the distinct sequences that records ``idx`` need (a, b, x together), each scored once and
    indexed back per record and key. The indexing is part of the autograd graph: one backward through a sequence
    serves every pair it is in, and the gradient equals scoring the records pair by pair."""
    prompts, responses, where = unique_sequences(data, idx, keys)
    logps = scorer(model, prompts, responses).double()
    return {f"{prefix}_{key}": logps[torch.from_numpy(where[key])] for key in keys}


def score_sequences(scorer, model, sequences: tuple[list, list, dict[str, np.ndarray]], prefix: str,
                    forwards: int) -> dict:
    """No-grad log-probs per record and key from ``unique_sequences``: the distinct sequences, a prompt's together
    (a forward lays its prompt out once) and the prompts by their sequences' length (a forward's rows then pad
    little), scored in ``forwards`` forwards. Every rank must run the same number of forwards of a DeepSpeed engine
    (ZeRO-3 gathers parameters across ranks in each): a rank with fewer distinct sequences than ``forwards`` scores
    its first one again."""
    prompts, responses, where = sequences
    longest: dict[tuple[int, ...], int] = {}
    for p, r in zip(prompts, responses):
        longest[tuple(p)] = max(longest.get(tuple(p), 0), len(p) + len(r))
    order = np.asarray(sorted(range(len(prompts)), key=lambda s: (longest[tuple(prompts[s])], tuple(prompts[s]),
                                                                   len(responses[s]))), dtype=np.int64)
    logps = torch.zeros(len(prompts), dtype=torch.float64)
    for part in np.array_split(order, max(forwards, 1)):
        part = part if len(part) else order[:1]
        if len(part):
            logps[torch.from_numpy(part)] = scorer(model, [prompts[s] for s in part],
                                                   [responses[s] for s in part]).double()
    return {f"{prefix}_{key}": logps[torch.from_numpy(rows)] for key, rows in where.items()}


# ------------------------------------------------------------------------------------------ one round, worker side

@dataclass(frozen=True)
class RoundPlan:
    """How every worker trains a round: each epoch's micro-batches (record indices of whole prompt groups), cut to
    the number of steps every worker takes (collectives in lockstep), and where π_t comes from."""
    epochs: list[list[np.ndarray]]
    pi_t_keys: tuple[str, ...]     # the sequences whose π_t log-probs the round needs (the loss's or the ranking's)
    pi_t_from_generators: bool     # the generators' recorded log-probs stand in for π_t
    ranked: bool                   # ranking accuracy of π_t against π_ref is measured


@dataclass
class StepTotals:
    """Sums over one worker's optimizer steps of a round."""
    loss: float = 0.0
    steps: int = 0
    kl: float = 0.0
    kl_steps: int = 0
    tokens: int = 0


def plan_round(data: RoundData, algorithm: Algorithm, cfg: CampaignConfig, version: int,
               rng: np.random.Generator) -> RoundPlan:
    """Groups, not records, are shuffled each epoch, so a prompt's pairs share one forward and one backward of its
    sequences. Every worker must also take π_t from the same place, so the shards agree on whether any sample comes
    from an older policy."""
    learner = cfg.learner
    groups = prompt_groups(data.columns["prompt_ids"])
    epochs = [pack_groups([groups[g] for g in rng.permutation(len(groups))], learner.micro_batch_size)
              for _ in range(learner.epochs_per_round)]
    oldest = data.oldest_version()
    shard_facts = torch.tensor([oldest if not math.isnan(oldest) else 1e9] + [len(epoch) for epoch in epochs])
    dist.all_reduce(shard_facts, op=dist.ReduceOp.MIN)
    steps_per_epoch = [int(steps) for steps in shard_facts[1:].tolist()]
    # π_t is the policy that generated the round. The learner holds it unless the round was generated while the
    # previous one trained (asynchronous rounds): then the generators' recorded log-probs of their samples stand in,
    # or, with the "learner" anchor, the learner's newest policy takes its place.
    pi_t_from_generators = (shard_facts[0].item() < version - 1 and cfg.schedule.async_anchor == "generator"
                            and algorithm.needs_pi_t)
    pi_t_keys = tuple(k for k in algorithm.sequences if k != "x") if algorithm.needs_pi_t else ()
    # Where the loss needs no π_t (the DPO family) the ranking costs one more no-grad forward, by the learner's policy.
    ranked = cfg.evaluation.ranking_accuracy and algorithm.needs_ref and "b" in algorithm.sequences
    if ranked and not pi_t_keys:
        pi_t_keys = ("a", "b")
    return RoundPlan([epoch[:steps] for epoch, steps in zip(epochs, steps_per_epoch)], pi_t_keys,
                     bool(pi_t_from_generators), bool(ranked))


def fixed_logprobs(plan: RoundPlan, data: RoundData, algorithm: Algorithm, scorer, engine, reference,
                   micro_batch_size: int) -> dict[str, torch.Tensor]:
    """π_t and π_ref log-probs per record (``t_*``, ``ref_*``), computed once, before the round's first update: each
    distinct sequence scored once, at most as many per forward as a micro-batch of records has sequences."""
    every_record = np.arange(len(data))
    fixed = {}
    if plan.pi_t_keys and plan.pi_t_from_generators:
        fixed.update(data.policy_logprobs(every_record, plan.pi_t_keys))
    elif plan.pi_t_keys:
        t_sequences = unique_sequences(data, every_record, plan.pi_t_keys)
        t_forwards = torch.tensor([math.ceil(len(t_sequences[0]) / (micro_batch_size * len(plan.pi_t_keys)))])
        dist.all_reduce(t_forwards, op=dist.ReduceOp.MAX)
        fixed.update(score_sequences(scorer, engine, t_sequences, "t", int(t_forwards.item())))
    if algorithm.needs_ref:
        keys = algorithm.sequences
        ref_sequences = unique_sequences(data, every_record, keys)
        fixed.update(score_sequences(scorer, reference, ref_sequences, "ref",
                                     math.ceil(len(ref_sequences[0]) / (micro_batch_size * len(keys)))))
    return fixed


def train_steps(plan: RoundPlan, data: RoundData, fixed: dict[str, torch.Tensor], algorithm: Algorithm,
                cfg: CampaignConfig, scorer, engine) -> StepTotals:
    """The round's optimizer steps: each micro-batch's distinct sequences scored by π_θ in one forward, the
    algorithm's loss over its records, one backward and one step."""
    totals = StepTotals()
    for epoch in plan.epochs:
        for idx in epoch:
            lp = score_records(scorer, engine, data, idx, algorithm.sequences, "theta")
            lp.update({name: values[torch.as_tensor(idx)] for name, values in fixed.items()})
            loss = algorithm.loss(lp, data.tensors(idx), cfg.algorithm).mean()
            engine.backward(loss)
            engine.step()
            totals.loss += float(loss.detach())
            totals.steps += 1
            if "ref_a" in lp:
                totals.kl += float((lp["theta_a"].detach() - lp["ref_a"]).mean())
                totals.kl_steps += 1
            totals.tokens += data.tokens(idx)
    return totals


# The push check scores one of the round's sequences, its response cut to this many tokens: every token goes through
# every layer and the LM head, so one short sequence shows whether a generator serves the pushed weights, and the
# check costs a forward of a few dozen tokens on each side instead of two whole sequences (SmolLM2: 0.2 s on the
# learner and 0.25 s on a vLLM generator, each round).
PROBE_RESPONSE_TOKENS = 8


def probe_sequences(data: RoundData, scorer, engine) -> Probe:
    """The new policy's log-prob of the round's first sequence, its response cut to
    :data:`PROBE_RESPONSE_TOKENS` tokens (a generator scores non-empty responses only: the first non-empty one)."""
    first = next((i for i in range(len(data)) if data.columns["a_ids"][i]), 0)
    prompts, responses = data.sequences("a", [first])
    responses = [list(r[:PROBE_RESPONSE_TOKENS]) for r in responses]
    return Probe(prompts, responses, scorer(engine, prompts, responses).double().tolist())


def round_metrics(plan: RoundPlan, data: RoundData, totals: StepTotals, ranking: tuple[float, int],
                  logprob_s: float, train_s: float) -> dict[str, Any]:
    """The round's metrics over all workers (an all-reduce: every worker calls this)."""
    right, decided = ranking
    stats = torch.tensor([totals.loss, totals.steps, totals.kl, totals.kl_steps, totals.tokens, len(data), right,
                          decided], dtype=torch.float64)
    dist.all_reduce(stats)
    return {
        "ranking_accuracy": float(stats[6] / stats[7]) if stats[7] else None,
        "pi_t_from_generators": plan.pi_t_from_generators,
        "rows": int(stats[5]),
        "steps": sum(len(epoch) for epoch in plan.epochs),
        "loss": float(stats[0] / max(stats[1], 1)),
        "kl_to_ref": float(stats[2] / stats[3]) if stats[3] else None,
        "train_tokens": int(stats[4]),
        "logprob_s": logprob_s,
        "train_s": train_s,
        "train_tokens_per_s": float(stats[4]) / max(train_s, 1e-9),
    }


def gathered_state_dict(engine, zero_stage: int) -> dict:
    """The full module state dict (all ranks must call this under ZeRO-3; only rank 0's result is used)."""
    import deepspeed
    module = engine.module
    if is_adapted(module):  # ZeRO-3 is refused with LoRA at config load: the weights are whole here
        return merged_state_dict(module)
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(engine, state: dict, tokenizer, ckpt_dir: Path, rank: int, round_index: int,
                    metrics: dict, probe: Probe) -> None:
    """checkpoints/round-t/: HF safetensors (+ tokenizer) and DeepSpeed's optimizer state, written to a temporary
    folder and renamed, with the COMPLETE marker (round, metrics, probe) last: a torn checkpoint is never picked on
    resume, and a round whose checkpoint is complete is answered from it, not trained again."""
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    dist.barrier()
    if rank == 0:
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
        (tmp / CHECKPOINT_DONE).write_text(json.dumps({"round": round_index, "metrics": metrics,
                                                       "probe": asdict(probe)}))
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        os.replace(tmp, ckpt_dir)
        # A write of another round cut off by a crash (that round is trained again from its data, never written
        # again) is garbage, a whole model and optimizer state: this learner is the only writer, so it goes now.
        for torn in ckpt_dir.parent.glob("round-*.tmp"):
            shutil.rmtree(torn, ignore_errors=True)
    dist.barrier()


def read_finished_round(done: Path) -> tuple[dict, Probe]:
    """The metrics and probe a complete checkpoint's marker recorded (markers written before the probe had its own
    key hold it among the metrics)."""
    saved = json.loads(done.read_text())
    metrics = {k: v for k, v in saved["metrics"].items() if k not in ("round", "probe")}
    return metrics, Probe(**(saved.get("probe") or saved["metrics"]["probe"]))


# ------------------------------------------------------------------------------------------ the worker

@dataclass(frozen=True)
class WorkerSetup:
    """What every learner worker is started with (Ray Train's ``train_loop_config``)."""
    cfg: CampaignConfig
    mailbox: str          # the mailbox actor's name, in ``namespace``
    namespace: str
    run_root: str         # the run directory: checkpoints to resume from, rounds' datasets to train again
    threads: int


class LearnerWorker:
    """One learner rank: its DeepSpeed engine, π_ref and weight transport, built once; then one method per message.
    Each method runs on every rank (collectives in lockstep); rank 0 answers through ``reply``."""

    def __init__(self, setup: WorkerSetup, rank: int, world_size: int):
        import deepspeed
        cfg = self.cfg = setup.cfg
        self.rank, self.world_size = rank, world_size
        self.run = RunDir(setup.run_root)
        torch.set_num_threads(setup.threads)
        torch.manual_seed(cfg.seed + rank)  # LoRA adapters' initialisation
        self.algorithm = get_algorithm(cfg.algorithm.name)
        policy, reference, self.scorer, self.tokenizer = build_policy(cfg)
        if reference is not None:
            reference.requires_grad_(False).eval()
        optimizer = build_optimizer([p for p in policy.parameters() if p.requires_grad], cfg.learner.optimizer)
        self.engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer,
                                               config=deepspeed_config(cfg.learner, world_size))
        self.reference = reference if reference is not None else AdaptersOff(self.engine)
        # The newest complete round checkpoint, looked up at every (re)start: after Ray Train restarts a failed worker
        # group, the workers continue from the last round checkpointed, not from where the campaign began.
        resume_from = newest_checkpoint(self.run.checkpoints_root)
        self.trained_through = -1  # the last round the engine's weights include
        if resume_from is not None:
            load_deepspeed_state(self.engine, resume_from)  # weights-only unpickling: a planted file runs nothing
            self.trained_through = json.loads((resume_from / CHECKPOINT_DONE).read_text())["round"]
        self.replayed: list[tuple[int, float]] = []  # (round, |loss trained again − loss recorded|), not yet reported
        self.transport = ObjectStoreTransport()
        self.adapter_push = cfg.learner.lora is not None and cfg.learner.lora.push == "adapter"

    def serve(self, mailbox) -> None:
        """Answer the mailbox's messages in order until :class:`Stop`; a restarted group picks up the one in flight."""
        handlers = {TrainRound: self.train_round, ScoreSequences: self.score, PublishWeights: self.publish_weights,
                    OpenBroadcast: self.open_broadcast}
        seq = ray.get(mailbox.first_open.remote())
        while True:
            message = ray.get(mailbox.next_message.remote(seq, rank=self.rank))
            if message is None:
                continue
            if isinstance(message, Stop):  # every earlier message, checkpoint writes included, is done
                if self.rank == 0:
                    ray.get(mailbox.answer.remote(seq, None))
                return
            try:
                handlers[type(message)](message, lambda answer, seq=seq: ray.get(mailbox.answer.remote(seq, answer)))
            except Exception as err:
                where = f", round {message.round}" if isinstance(message, TrainRound) else ""
                ray.get(mailbox.fail.remote(f"rank {self.rank}, {type(message).__name__}{where}: "
                                            f"{type(err).__name__}: {err}"))
                raise
            seq += 1

    def train_round(self, message: TrainRound, reply) -> None:
        checkpoint_dir = Path(message.checkpoint_dir)
        done = checkpoint_dir / CHECKPOINT_DONE
        written = done.is_file()
        if written:  # finished before a restart: the engine was just loaded from it; never train twice
            metrics, probe = read_finished_round(done)
        else:
            self.catch_up(message.round - 1)
            metrics, probe = self._train(message.round, message.shards[self.rank], message.version)
        self.trained_through = message.round
        state = None if self.adapter_push else gathered_state_dict(self.engine, self.cfg.learner.zero_stage)
        if self.rank == 0:
            t0 = time.perf_counter()
            push = self.publish(state, message.version)
            metrics = {**metrics, "encode_s": time.perf_counter() - t0, "weights_nbytes": push.nbytes,
                       **self._replay_metrics()}
            reply(RoundResult(metrics, push, probe))
            self.transport.deliver()  # a broadcast completes once the driver hands the push to the generators
        if message.checkpoint and not written:  # off the critical path: the driver goes on meanwhile
            if state is None:  # the push carried the adapters; the checkpoint holds the merged model too
                state = gathered_state_dict(self.engine, self.cfg.learner.zero_stage)
            save_checkpoint(self.engine, state, self.tokenizer, checkpoint_dir, self.rank, message.round, metrics,
                            probe)

    def catch_up(self, through: int) -> None:
        """Train again, from their persisted datasets, the rounds up to ``through`` that the campaign finished after
        the newest complete checkpoint (``storage.checkpoint_every`` > 1, a checkpoint cut off while it was written,
        a restarted worker group). Same data, same order, same seeds: the weights come out as they were."""
        for t in range(self.trained_through + 1, through + 1):
            train_dir = self.run.train_dir(t)
            if not (train_dir / DATASET_DONE).is_file():
                raise RuntimeError(f"round {t} must be trained again from {train_dir}, which is incomplete or missing: "
                                   f"its newest checkpoint is older (storage.checkpoint_every) and the round's data "
                                   f"is gone")
            metrics, _ = self._train(t, round_shards(train_dir, self.world_size)[self.rank], t + 1)
            recorded = self.run.round_metrics_path(t)
            loss = json.loads(recorded.read_text())["loss"] if recorded.is_file() else math.nan
            self.replayed.append((t, abs(metrics["loss"] - loss)))
            self.trained_through = t

    def _replay_metrics(self) -> dict:
        """What ``catch_up`` did since the last answer: rounds trained again, and how far their losses were from the
        ones recorded the first time (0 when the weights came out as they were)."""
        if not self.replayed:
            return {}
        replayed, self.replayed = self.replayed, []
        return {"replayed_rounds": len(replayed), "replay_max_loss_diff": max(diff for _, diff in replayed)}

    def _train(self, round_index: int, shard, version: int) -> tuple[dict, Probe]:
        # The round's data order and torch draws depend on (seed, rank, round) alone, not on how many rounds this
        # process has trained: a round trained again after a restart takes the same batches in order.
        rng = np.random.default_rng([self.cfg.seed, self.rank, round_index])
        torch.manual_seed(int(rng.integers(2 ** 63)))
        start = time.perf_counter()
        data = RoundData.from_shard(shard)
        plan = plan_round(data, self.algorithm, self.cfg, version, rng)
        self.engine.eval()
        with torch.no_grad():
            fixed = fixed_logprobs(plan, data, self.algorithm, self.scorer, self.engine, self.reference,
                                   self.cfg.learner.micro_batch_size)
        ranking = (ranking_counts(fixed["t_a"], fixed["t_b"], fixed["ref_a"], fixed["ref_b"], data.columns["target"])
                   if plan.ranked and len(data) else (0.0, 0))
        if not self.algorithm.needs_pi_t:  # computed for the ranking only: the loss must not see it
            fixed = {name: values for name, values in fixed.items() if not name.startswith("t_")}
        logprob_s = time.perf_counter() - start
        self.engine.train()
        totals = train_steps(plan, data, fixed, self.algorithm, self.cfg, self.scorer, self.engine)
        train_s = time.perf_counter() - start - logprob_s
        self.engine.eval()
        with torch.no_grad():
            probe = probe_sequences(data, self.scorer, self.engine)
        return round_metrics(plan, data, totals, ranking, logprob_s, train_s), probe

    def score(self, message: ScoreSequences, reply) -> None:
        """Every rank runs the forwards (ZeRO-3 gathers parameters across ranks in each)."""
        policy, reference = [], []
        self.engine.eval()
        with torch.no_grad():
            for n in range(0, len(message.prompt_ids), SCORE_CHUNK):
                part = message.prompt_ids[n:n + SCORE_CHUNK], message.response_ids[n:n + SCORE_CHUNK]
                policy += self.scorer(self.engine, *part).double().tolist()
                reference += self.scorer(self.reference, *part).double().tolist()
        if self.rank == 0:
            reply(SequenceLogprobs(policy, reference))

    def publish_weights(self, message: PublishWeights, reply) -> None:
        self.catch_up(message.through_round)
        state = None if self.adapter_push else gathered_state_dict(self.engine, self.cfg.learner.zero_stage)
        if self.rank == 0:
            reply(self.publish(state, message.version))
            self.transport.deliver()

    def publish(self, state: dict | None, version: int) -> WeightPush:
        """Rank 0: the push of the policy's weights, ``state``, or of its adapters alone (``learner.lora.push:
        adapter``; LoRA holds the weights whole on every rank, so rank 0 has them)."""
        if not self.adapter_push:
            return self.transport.publish(state, version)
        adapter = AdapterPayload(adapter_files(self.engine.module))
        trained = [p for p in self.engine.module.parameters() if p.requires_grad]
        return WeightPush(version=version, payload=ray.put(adapter), n_params=sum(p.numel() for p in trained),
                          nbytes=adapter.nbytes,
                          dtype=",".join(sorted({str(p.dtype).removeprefix("torch.") for p in trained})))

    def open_broadcast(self, message: OpenBroadcast, reply) -> None:
        """Rank 0 serves the group's rendezvous: it answers with host and port, then waits for the generators."""
        if self.rank != 0:
            return
        host = ray.util.get_node_ip_address()
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        reply(BroadcastAddress(host, port))
        self.transport = NcclBroadcastTransport(host, port, 0, message.world_size, backend=message.backend,
                                                timeout_s=message.timeout_s)


def learner_loop(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker: build once, then serve messages until told to stop."""
    setup: WorkerSetup = loop_config["setup"]
    mailbox = ray.get_actor(setup.mailbox, namespace=setup.namespace)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    try:
        worker = LearnerWorker(setup, rank, context.get_world_size())
    except Exception as err:  # the driver waits on the mailbox: tell it why, then let Ray Train see the failure
        ray.get(mailbox.fail.remote(f"rank {rank} could not start: {type(err).__name__}: {err}"))
        raise
    ray.get(mailbox.register.remote(rank, {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}))
    worker.serve(mailbox)


# ------------------------------------------------------------------------------------------ driver side

class Learner:
    """The driver's handle on the persistent learner: each method posts one message and waits for its answer."""

    def __init__(self, cfg: CampaignConfig, run_dir: Path):
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        run = RunDir(run_dir)
        self.timeout_s = cfg.learner.timeout_s
        self.world_size = cfg.learner.workers
        mailbox_name = f"nashray-learner-mailbox-{os.getpid()}-{time.time_ns()}"
        # On the driver's node: a 0-CPU actor placed by default may land on any worker node, and the learner must not
        # depend on a node other than its own and the driver's (a lost inference host would take its mailbox along).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.mailbox = ray.remote(LearnerMailbox).options(name=mailbox_name, num_cpus=0, max_concurrency=64,
                                                          scheduling_strategy=here).remote()
        setup = WorkerSetup(cfg, mailbox_name, ray.get_runtime_context().namespace, str(run.root),
                            cfg.learner.threads_per_worker or max(1, int(cfg.learner.resources.num_cpus)))
        self.trainer = TorchTrainer(
            learner_loop,
            torch_config=NodeAddressTorchConfig(),  # the rendezvous server listens on the node's address only
            train_loop_config={"setup": setup},
            scaling_config=ScalingConfig(**learner_scaling(cfg.learner)),
            run_config=RunConfig(name="learner", storage_path=str(run.ray_train_dir),
                                 failure_config=FailureConfig(max_failures=cfg.learner.max_failures),
                                 worker_runtime_env={"env_vars": {"GLIBC_TUNABLES": LEARNER_MALLOC_TUNABLES}}),
        )
        self._seq = 0
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._fit, name="nashray-learner", daemon=True)
        self._thread.start()

    def _fit(self):
        try:
            self.trainer.fit()
        except BaseException as err:  # surfaced by the next call
            self._failure = err

    def train_round(self, round_index: int, shards: list, checkpoint_dir: Path, version: int,
                    checkpoint: bool = True) -> RoundResult:
        """Train one round on per-worker dataset shards (one per worker); the result carries the push of the new
        policy ``version``. With ``checkpoint``, the round's checkpoint is written after the answer."""
        return self._ask(TrainRound(round_index, shards, version, str(checkpoint_dir), checkpoint),
                         f"finishing round {round_index}")

    def sequence_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> SequenceLogprobs:
        """log π_θ and log π_ref of fixed sequences, both computed by the learner with the same numerics."""
        return self._ask(ScoreSequences(prompt_ids, response_ids), "scoring sequences")

    def current_weights(self, version: int, through_round: int) -> WeightPush:
        """A push of the policy after round ``through_round``, labelled ``version``: on resume, the learner's
        checkpoint weights brought forward through any rounds finished after it."""
        return self._ask(PublishWeights(version, through_round), "publishing its weights")

    def open_broadcast(self, generators: int, backend: str, timeout_s: float) -> BroadcastAddress:
        """Start the weight broadcast group (learner rank 0 + ``generators``), which every generator must join
        before the first push."""
        return self._ask(OpenBroadcast(generators + 1, backend, timeout_s), "opening the weight broadcast")

    def workers(self) -> list[dict]:
        """Node id and pid of each learner worker (rank order), waiting until every worker has started."""
        deadline = time.monotonic() + self.timeout_s
        while True:  # short waits: a learner that died while starting is noticed within seconds
            self._raise_if_stopped("starting")
            nodes = ray.get(self.mailbox.workers.remote(self.world_size, 5.0))
            if nodes is not None:
                return [nodes[rank] for rank in range(self.world_size)]
            if time.monotonic() > deadline:
                raise TimeoutError(f"learner: workers did not start within learner.timeout_s={self.timeout_s:g}s")

    def _ask(self, message: Message, what: str):
        seq = self._seq
        ray.get(self.mailbox.post.remote(seq, message))
        self._seq += 1
        deadline = time.monotonic() + self.timeout_s
        while True:  # short waits: a learner whose fit() ended is noticed within seconds, not at the timeout
            self._raise_if_stopped(what)
            answered, answer = ray.get(self.mailbox.wait_answer.remote(seq, 5.0))
            if answered:
                return answer
            if time.monotonic() > deadline:
                raise TimeoutError(f"learner: no answer {what} within learner.timeout_s={self.timeout_s:g}s")

    def _raise_if_stopped(self, what: str) -> None:
        if self._failure is not None:
            raise RuntimeError(f"learner failed: {self._failure}") from self._failure
        if not self._thread.is_alive():
            raise RuntimeError(f"learner stopped before {what}")

    def shutdown(self, timeout_s: float = 60) -> None:
        if self._thread.is_alive():
            try:  # answered once the last checkpoint is written
                self._ask(Stop(), "stopping")
            except (RuntimeError, TimeoutError):  # a learner that failed: nothing left to wait for
                pass
            self._thread.join(timeout_s)
        ray.kill(self.mailbox)
