"""The judge as a Ray Serve deployment speaking OpenAI's chat-completions protocol, so that HTTP judges
(:mod:`nashray.oracles.http_judge`) anywhere in the cluster — or outside it — can call it.

``POST {route_prefix}/v1/chat/completions`` answers with one token, the verdict ``A`` or ``B``: the judge decodes
under a verdict constraint (as vLLM's structured outputs with a choice would), so its single token is always a
verdict, and ``logprobs.content[0].top_logprobs`` lists both verdict tokens with their log-probabilities.

* An LLM judge serves any conversation: the verdict tokens' log-probabilities come from the model's next-token
  distribution after the chat template (full-vocabulary log-probabilities, not renormalised).
* Any other oracle (reward model, pairwise model, rule, ensemble) reads the last user message back through the
  judging template (the oracle config's ``template``, else the default) and answers with log P(a ≻ b) and
  log P(b ≻ a), floored at -9999 as OpenAI does for impossible tokens. A comparison the oracle drops is a 422.

Concurrent requests are batched into one forward pass (``max_batch_size``, ``batch_wait_timeout_s``); replicas are
fixed or autoscaled from ``judges.serve``. The proxy binds ``judges.serve.host`` (loopback by default), each replica's
inter-deployment gRPC server the node's Ray address (loopback on a local cluster).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from nashray.internals import bind_serve_replica_grpc_on_node_address
from nashray.oracles import build_oracle
from nashray.oracles.base import Comparison
from nashray.oracles.config import parse_oracle_config
from nashray.oracles.judging import DEFAULT_TEMPLATE, VERDICTS, parse_judging_message
from nashray.oracles.llm_judge import LLMJudge

LOGPROB_FLOOR = -9999.0
_UNSERVABLE = {"http": "serving an HTTP judge would only proxy another endpoint",
               "matrix": "a matrix oracle judges tabular actions, not text"}

api = FastAPI(title="nashray judge")


class ParsedComparisonJudge:
    """Serves an oracle that judges (prompt, a, b) itself, by reading the comparison back from the message."""

    def __init__(self, oracle, template: str):
        self.oracle, self.template = oracle, template

    def verdict_logprobs(self, conversations: list[list[dict[str, str]]]) -> list[tuple[float, float] | str]:
        answers: list[tuple[float, float] | str | None] = [None] * len(conversations)
        parsed: list[tuple[int, Comparison]] = []
        for i, messages in enumerate(conversations):
            try:
                parsed.append((i, Comparison(*parse_judging_message(self.template, messages[-1]["content"]))))
            except ValueError as err:
                answers[i] = str(err)
        verdicts = self.oracle.compare([c for _, c in parsed]) if parsed else []
        for (i, _), verdict in zip(parsed, verdicts, strict=True):
            if verdict.prob is None:
                answers[i] = verdict.reason
            else:
                answers[i] = (_log(verdict.prob), _log(1.0 - verdict.prob))
        return answers


def _log(p: float) -> float:
    return max(math.log(p), LOGPROB_FLOOR) if p > 0 else LOGPROB_FLOOR


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error",
                                                               "code": status}})


def request_problem(body) -> str | None:
    """What makes ``body`` an invalid judge request, or None."""
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"messages[{i}] must be an object with string role and content"
    if messages[-1]["role"] != "user":
        return "the last message must be the user's judging request"
    if body.get("stream"):
        return "streaming is not supported by the judge"
    if body.get("n", 1) != 1:
        return "n must be 1"
    return None


def completion(model: str, logprob_a: float, logprob_b: float, with_logprobs: bool) -> dict:
    """A chat.completion object whose one token is the more probable verdict."""
    entries = sorted(({"token": v, "logprob": lp, "bytes": list(v.encode())}
                      for v, lp in zip(VERDICTS, (logprob_a, logprob_b))), key=lambda e: -e["logprob"])
    choice = {"index": 0, "message": {"role": "assistant", "content": entries[0]["token"]}, "finish_reason": "length"}
    if with_logprobs:
        choice["logprobs"] = {"content": [dict(entries[0], top_logprobs=entries)]}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [choice]}


def unservable_reason(oracle_cfg) -> str | None:
    """Why the oracle ``oracle_cfg`` (an ``OracleConfig`` or dict) cannot be served as a judge, or None."""
    cfg = parse_oracle_config(oracle_cfg)
    if cfg.kind in _UNSERVABLE:
        return f"oracle kind {cfg.kind!r} cannot be served: {_UNSERVABLE[cfg.kind]}"
    return None


# Serve captures the class (with the globals its methods name) when it is decorated: define those above it.
@serve.deployment
@serve.ingress(api)
class JudgeServer:
    def __init__(self, oracle_cfg: dict, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01,
                 seed: int = 0):
        # Serve starts the replica's gRPC server after this constructor: rebind it before (see nashray.internals).
        bind_serve_replica_grpc_on_node_address()
        cfg = parse_oracle_config(oracle_cfg)
        problem = unservable_reason(cfg)
        if problem:
            raise ValueError(problem)
        oracle = build_oracle(cfg, seed=seed)
        self.judge = oracle if isinstance(oracle, LLMJudge) else ParsedComparisonJudge(
            oracle, getattr(cfg, "template", None) or DEFAULT_TEMPLATE)
        self.model_name = getattr(cfg, "model", None) or oracle.oracle_id
        self._verdicts.set_max_batch_size(max_batch_size)
        self._verdicts.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch
    async def _verdicts(self, conversations: list[list[dict[str, str]]]) -> list[tuple[float, float] | str]:
        return await asyncio.to_thread(self.judge.verdict_logprobs, conversations)

    @api.get("/v1/models")
    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "nashray"}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON")
        problem = request_problem(body)
        if problem:
            return _error(400, problem)
        answer = await self._verdicts(body["messages"])
        if isinstance(answer, str):
            return _error(422, answer)
        return completion(body.get("model") or self.model_name, *answer, with_logprobs=bool(body.get("logprobs")))


def deployment_options(serve_cfg) -> dict:
    """Ray Serve deployment options from ``judges.serve``: fixed ``replicas``, or ``autoscaling`` when set."""
    resources = serve_cfg.resources
    options = {"name": serve_cfg.name, "max_ongoing_requests": serve_cfg.max_ongoing_requests,
               "ray_actor_options": {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus,
                                     "resources": dict(resources.custom)}}
    if serve_cfg.autoscaling is not None:
        options["autoscaling_config"] = serve_cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = serve_cfg.replicas
    return options


def judge_application(oracle_cfg, serve_cfg, seed: int = 0):
    """The bound Serve application for ``oracle_cfg`` (an ``OracleConfig`` or dict) under ``serve_cfg``
    (``judges.serve``). Raises ValueError for an oracle that cannot be served."""
    cfg = parse_oracle_config(oracle_cfg)
    problem = unservable_reason(cfg)
    if problem:
        raise ValueError(problem)
    return JudgeServer.options(**deployment_options(serve_cfg)).bind(
        cfg.model_dump(), serve_cfg.max_batch_size, serve_cfg.batch_wait_timeout_s, seed)


def serve_judge(oracle_cfg, serve_cfg, seed: int = 0) -> str:
    """Start Serve's HTTP proxy on ``serve_cfg.host:port`` (Ray must be initialised), deploy the judge, and return
    the base URL to give an HTTP judge (``http://host:port/<prefix>/v1``)."""
    serve.start(http_options={"host": serve_cfg.host, "port": serve_cfg.port})
    serve.run(judge_application(oracle_cfg, serve_cfg, seed), name=serve_cfg.name,
              route_prefix=serve_cfg.route_prefix)
    return f"http://{serve_cfg.host}:{serve_cfg.port}{serve_cfg.route_prefix.rstrip('/')}/v1"


def stop_judge(serve_cfg) -> None:
    """Delete the judge application ``serve_cfg.name`` (what :func:`serve_judge` deployed); Serve's proxy stays up
    for any other application."""
    serve.delete(serve_cfg.name)
