"""The ``judges.oracle`` config models: one pydantic model per oracle kind, :data:`OracleConfig` their union on
``kind``, and :func:`parse_oracle_config`, the one place a plain dict becomes a validated oracle config.

Every model forbids unknown keys (:class:`Strict`, the base of the campaign config's sections too), so a typo fails
at load with its path. A model validates what can be checked without loading anything: a rule's name and options, a
judging template's fields, an HTTP URL without credentials.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from nashray.oracles.judging import check_template
from nashray.oracles.rules import build_rule

__all__ = ["EnsembleOracleConfig", "HTTPOracleConfig", "MatrixOracleConfig", "ModelOracleConfig", "OracleConfig",
           "RuleOracleConfig", "SentimentOracleConfig", "Strict", "parse_oracle_config"]


class Strict(BaseModel):
    """A config section: unknown keys are errors, and so is an invalid value assigned later."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MatrixOracleConfig(Strict):
    """A tabular game: P[i, j] = probability that response i beats response j, per prompt."""
    kind: Literal["matrix"]
    game: str | None = Field(None, description="a JSON game file; omitted: the game of data.game")
    sample: bool = Field(True, description="judge with a Bernoulli(P) draw, as a noisy human would")


class RuleOracleConfig(Strict):
    kind: Literal["rule"]
    rule: str = Field(..., description="a rule oracle's name, see nashray.oracles.rules.RULES")
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _buildable(self) -> "RuleOracleConfig":
        build_rule(self.rule, self.options)  # an unknown rule or option fails at load, naming what exists
        return self


def _judging_template(template: str | None) -> str | None:
    if template is not None:
        check_template(template)
    return template


class ModelOracleConfig(Strict):
    """A judge backed by a model: an LLM judge, a reward model or a pairwise preference model (oracles/)."""
    kind: Literal["llm_judge", "reward_model", "pairwise_model"]
    model: str
    engine: Literal["hf", "vllm"] = Field("hf", description="vllm: llm_judge only")
    template: str | None = Field(None, description="judging message with {prompt}, {a}, {b}; omitted: the default")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    both_orders: bool = Field(True, description="ask in both orders and average (removes position bias)")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass (hf engine)")
    max_length: int = Field(2048, ge=16, description="tokens; longer judging prompts are dropped (llm_judge) or "
                                                     "cut from the left (reward/pairwise models)")
    kv_cache_gib: int = Field(1, ge=1, description="vLLM-CPU KV cache (VLLM_CPU_KVCACHE_SPACE), vllm engine")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vllm engine on a GPU")
    trust_remote_code: bool = False

    _template = field_validator("template")(_judging_template)

    @model_validator(mode="after")
    def _engine_fits_kind(self) -> "ModelOracleConfig":
        if self.engine == "vllm" and self.kind != "llm_judge":
            raise ValueError(f"engine 'vllm' serves kind 'llm_judge' only; kind {self.kind!r} needs engine 'hf'")
        return self


class HTTPOracleConfig(Strict):
    kind: Literal["http"]
    url: str
    model: str = "judge"
    api_key_env: str | None = Field(None, description="environment variable holding the API key; never the key")
    timeout_s: float = Field(30, gt=0)
    retries: int = Field(3, ge=0)
    concurrency: int = Field(8, ge=1)
    template: str | None = None
    both_orders: bool = Field(True, description="ask in both orders and average (removes position bias)")
    backoff_s: float = Field(0.5, ge=0, description="retry k waits backoff_s * 2**(k-1)")
    top_logprobs: int = Field(20, ge=0, le=20, description="0: do not ask for log-probabilities, parse the text")

    _template = field_validator("template")(_judging_template)

    @field_validator("url")
    @classmethod
    def _http_url_without_credentials(cls, url: str) -> str:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parsed.username is not None or parsed.password is not None:
            # the URL is written to config.yaml, cache keys and logs: a password in it would be too
            raise ValueError("must not carry credentials (user:password@); name the environment variable holding "
                             "the key in api_key_env")
        return url

    @field_validator("api_key_env")
    @classmethod
    def _variable_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError("must be the NAME of an environment variable holding the key (letters, digits, _), "
                             "never the key itself")
        return name


class SentimentOracleConfig(Strict):
    """VADER's lexicon sentiment (oracles/sentiment.py): P(a ≻ b) = σ(sharpness·(s_a − s_b)) on compound scores."""
    kind: Literal["sentiment"]
    prefer: Literal["positive", "negative"] = "positive"
    sharpness: float = Field(4.0, gt=0)


class EnsembleOracleConfig(Strict):
    """A panel of oracles voting on each comparison (oracles/ensemble.py); intransitive where its members disagree."""
    kind: Literal["ensemble"]
    members: list["OracleConfig"] = Field(..., min_length=1)
    combine: Literal["mean", "majority"] = "mean"
    weights: list[float] | None = Field(None, description="one positive weight per member (omitted: equal)")

    @model_validator(mode="after")
    def _one_weight_per_member(self) -> "EnsembleOracleConfig":
        if self.weights is not None and (len(self.weights) != len(self.members) or min(self.weights) <= 0):
            raise ValueError(f"weights must be {len(self.members)} positive numbers, one per member; got "
                             f"{self.weights}")
        return self


OracleConfig = Annotated[
    Union[MatrixOracleConfig, RuleOracleConfig, ModelOracleConfig, HTTPOracleConfig, SentimentOracleConfig,
          EnsembleOracleConfig],
    Field(discriminator="kind")]
EnsembleOracleConfig.model_rebuild()


ORACLE_CONFIGS = (MatrixOracleConfig, RuleOracleConfig, ModelOracleConfig, HTTPOracleConfig, SentimentOracleConfig,
                  EnsembleOracleConfig)
_ADAPTER: TypeAdapter = TypeAdapter(OracleConfig)

# Fields whose rejected value may be a secret put in the wrong place: never repeated in an error.
_UNECHOED = ("api_key_env", "url")


def parse_oracle_config(value: Any) -> OracleConfig:
    """The validated oracle config of ``value``: an oracle config model (returned as it is: models validate on
    construction and on assignment) or a plain mapping such as a ``judges.oracle`` section read from YAML or JSON.

    Raises ValueError naming every bad field with its path (``ensemble.members.0.rule.rule: Field required``)."""
    if isinstance(value, ORACLE_CONFIGS):
        return value
    if isinstance(value, BaseModel):
        raise ValueError(f"invalid oracle config: a {type(value).__name__} is not an oracle config (one of "
                         f"{', '.join(c.__name__ for c in ORACLE_CONFIGS)})")
    if not isinstance(value, dict):
        raise ValueError(f"invalid oracle config: expected a mapping with a 'kind', got {type(value).__name__}")
    try:
        return _ADAPTER.validate_python(value)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            path = ".".join(str(p) for p in e["loc"]) or "<root>"
            echo = (e["type"] != "missing" and not isinstance(e.get("input"), dict)
                    and not (e["loc"] and e["loc"][-1] in _UNECHOED))
            problems.append(f"{path}: {e['msg']}" + (f" (got {e['input']!r})" if echo else ""))
        raise ValueError("invalid oracle config: " + "; ".join(problems)) from None
