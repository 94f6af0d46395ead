"""A judge behind any OpenAI-compatible ``/v1/chat/completions`` endpoint (a hosted API, vLLM's server, or our own
Ray Serve judge in :mod:`nashray.oracles.serve`).

Each comparison is asked in both orders with the judging template (:mod:`nashray.oracles.judging`), ``max_tokens=1``,
``temperature=0`` and ``logprobs`` on. P(A) is the softmax over the verdict tokens' log-probabilities when the first
token's ``top_logprobs`` list both (variants such as ``" A"`` pooled); otherwise the reply's text must say ``A`` or
``B`` and counts as P(A) = 1 or 0.

Bad replies — HTTP errors, timeouts, connection failures, non-JSON, malformed fields, no verdict, positive
log-probabilities (a probability above 1), more than a MiB — are retried ``retries`` times with exponential backoff
(``backoff_s``·2^attempt), except client errors that cannot improve (400, 401, 403, 404, 422), then dropped with the
last reason. The API key is read from the environment variable named by ``api_key_env`` at each request: it is not
stored on the object, and is redacted from every reason and log line.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from nashray.oracles.base import Comparison, PreferenceOracle, Verdict
from nashray.oracles.judging import (DEFAULT_TEMPLATE, VERDICTS, check_template, judging_messages, order_questions,
                             parse_verdict_text, two_token_probability, verdicts_from_orders)

log = logging.getLogger(__name__)

_RETRYABLE_STATUS = {408, 409, 425, 429}
_LOGPROB_TOLERANCE = 1e-6
MAX_REPLY_BYTES = 1 << 20  # a one-token verdict is a few hundred bytes; more is a wrong endpoint, not a verdict


class BadReply(ValueError):
    """A reply that carries no usable verdict; the message is the reason recorded."""


def chat_completions_url(url: str) -> str:
    """``url`` itself when it ends in ``/chat/completions``; ``…/v1`` or a bare host get the route appended."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"HTTP judge url {url!r} is not an http(s) URL")
    path = parsed.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions" if path.endswith("/v1") else "/v1/chat/completions"
    return urllib.parse.urlunparse(parsed._replace(path=path))


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


def verdict_probability(reply: dict) -> float:
    """P(A) from a chat-completions reply (see the module docstring); raises :class:`BadReply`."""
    try:
        choice = reply["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise BadReply("reply has no choices") from None
    if not isinstance(choice, dict):
        raise BadReply("reply's first choice is not an object")
    logprobs = choice.get("logprobs") or {}
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("content") or [], list):
        raise BadReply("reply's choices[0].logprobs is not an object with a content list")
    first_token = (logprobs.get("content") or [None])[0]
    if isinstance(first_token, dict):
        top = first_token.get("top_logprobs") or []
        if not isinstance(top, list) or not all(isinstance(entry, dict) for entry in top):
            raise BadReply("reply's choices[0].logprobs.content[0].top_logprobs is not a list of objects")
        listed: dict[str, float] = {}  # the chosen token is usually listed again among the top ones: count it once
        for entry in [first_token] + top:
            token = str(entry.get("token", ""))
            if token.strip() not in VERDICTS or token in listed:
                continue
            logprob = entry.get("logprob")
            if not isinstance(logprob, (int, float)) or math.isnan(logprob):
                raise BadReply(f"log-probability {logprob!r} of verdict token {token!r} is not a number")
            if logprob > _LOGPROB_TOLERANCE:
                raise BadReply(f"log-probability {logprob} of verdict token {token!r} is positive: a probability "
                               "above 1 is out of range")
            listed[token] = min(float(logprob), 0.0)
        pooled = {v: [lp for t, lp in listed.items() if t.strip() == v] for v in VERDICTS}
        if all(pooled.values()):
            try:
                return two_token_probability(_logsumexp(pooled["A"]), _logsumexp(pooled["B"]))
            except ValueError as err:
                raise BadReply(str(err)) from None
    message = choice.get("message") or {}
    if not isinstance(message, dict):
        raise BadReply("reply's choices[0].message is not an object")
    content = message.get("content")
    verdict = parse_verdict_text(content if isinstance(content, str) else "")
    if verdict is None:
        raise BadReply(f"reply {str(content)[:60]!r} names neither A nor B and its log-probabilities list "
                       "neither both verdict tokens")
    return 1.0 if verdict == "A" else 0.0


class HTTPJudge(PreferenceOracle):
    def __init__(self, url: str, model: str = "judge", api_key_env: str | None = None, timeout_s: float = 30,
                 retries: int = 3, concurrency: int = 8, template: str | None = None, both_orders: bool = True,
                 backoff_s: float = 0.5, top_logprobs: int = 20):
        self.url = chat_completions_url(url)
        if api_key_env is not None and not os.environ.get(api_key_env):
            raise ValueError(f"HTTP judge: environment variable {api_key_env!r} (api_key_env) is not set or empty")
        if retries < 0 or concurrency < 1 or timeout_s <= 0 or backoff_s < 0 or not 0 <= top_logprobs <= 20:
            raise ValueError(f"HTTP judge: need retries ≥ 0, concurrency ≥ 1, timeout_s > 0, backoff_s ≥ 0 and "
                             f"0 ≤ top_logprobs ≤ 20; got {retries}, {concurrency}, {timeout_s}, {backoff_s}, "
                             f"{top_logprobs}")
        self.model, self.api_key_env = model, api_key_env
        self.timeout_s, self.retries, self.concurrency, self.backoff_s = timeout_s, retries, concurrency, backoff_s
        self.template = check_template(template or DEFAULT_TEMPLATE)
        self.both_orders, self.top_logprobs = both_orders, top_logprobs
        template_hash = hashlib.sha256(self.template.encode()).hexdigest()[:12]
        self.oracle_id = f"http:{self.url}:{model}:{template_hash}:{'both' if both_orders else 'first'}"

    def __repr__(self) -> str:
        return f"HTTPJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _redact(self, text: str) -> str:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return text.replace(key, "[redacted]") if key else text

    def _post(self, messages: list[dict[str, str]]) -> dict:
        body = {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0.0}
        if self.top_logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.api_key_env, '')}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            raw = response.read(MAX_REPLY_BYTES + 1)
        if len(raw) > MAX_REPLY_BYTES:
            raise BadReply(f"reply is larger than {MAX_REPLY_BYTES} bytes: not a verdict")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise BadReply(f"reply is not JSON: {raw[:60]!r}") from None

    def _attempt(self, messages: list[dict[str, str]]) -> tuple[float | None, str | None, bool]:
        """(P(A), None, _) on success, else (None, reason, whether retrying may help)."""
        try:
            return verdict_probability(self._post(messages)), None, False
        except BadReply as err:
            return None, str(err), True
        except urllib.error.HTTPError as err:
            detail = err.read()[:200].decode("utf-8", "replace") if err.fp else ""
            return None, f"HTTP {err.code} {err.reason}: {detail}", err.code in _RETRYABLE_STATUS or err.code >= 500
        except (TimeoutError, socket.timeout):
            return None, f"no reply within {self.timeout_s:g} s", True
        except urllib.error.URLError as err:
            if isinstance(err.reason, (TimeoutError, socket.timeout)):
                return None, f"no reply within {self.timeout_s:g} s", True
            return None, f"connection failed: {err.reason}", True
        except (OSError, http.client.HTTPException) as err:
            return None, f"connection failed: {type(err).__name__}: {err}", True

    def ask(self, messages: list[dict[str, str]]) -> float | str:
        """P(A) for one judging conversation, or the reason it was dropped after the allowed attempts."""
        attempts = 0
        while True:
            prob, reason, retryable = self._attempt(messages)
            if prob is not None:
                return prob
            reason, attempts = self._redact(reason), attempts + 1
            if not retryable or attempts > self.retries:
                return f"HTTP judge: {reason} (attempt {attempts} of {self.retries + 1})"
            log.warning("HTTP judge attempt %d of %d failed, retrying: %s", attempts, self.retries + 1, reason)
            time.sleep(self.backoff_s * 2 ** (attempts - 1))

    def compare(self, comparisons: list[Comparison]) -> list[Verdict]:
        conversations = [judging_messages(self.template, *q) for q in order_questions(comparisons, self.both_orders)]
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="http-judge") as pool:
            return verdicts_from_orders(list(pool.map(self.ask, conversations)), self.both_orders)
