"""A role's actors (generators or judges) that survive death and hangs of their members.

Work is sent as chunks, one call per chunk. A chunk whose actor dies (SIGKILL, node loss) or does not answer within
the role's timeout is never half-counted: it has no result, and it is sent again, whole, per the role's policy:

- ``retry``: the actor is replaced by a fresh one of the same rank (brought to the current policy version by the
  ``prepare`` hook) and the chunk goes to it; at most ``max_restarts`` replacements per role per campaign (a
  replacement that dies while being prepared, e.g. placed on a lost node the GCS still counts, uses one more);
- ``drop``: the actor leaves the pool and the chunk goes to a surviving member (the round is re-balanced);
- ``abort``: the campaign stops with an error naming the role.

So each chunk is answered exactly once: no prompt is lost, none is answered twice.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger(__name__)


class RoleFailure(RuntimeError):
    """A role could not finish its work under its failure policy."""


class ActorPool:
    def __init__(self, role: str, create: Callable[[int], Any], count: int, policy: str, max_restarts: int,
                 timeout_s: float, prepare: Callable[[Any], None] | None = None):
        self.role, self.create, self.policy = role, create, policy
        self.max_restarts, self.timeout_s = max_restarts, timeout_s
        self.prepare = prepare
        self.restarts = 0
        self.members: dict[int, Any] = {rank: create(rank) for rank in range(count)}

    def __len__(self) -> int:
        return len(self.members)

    @property
    def actors(self) -> list:
        return list(self.members.values())

    def map(self, method: str, chunks: list[tuple], what: str | None = None) -> list:
        """``method(*chunk)`` for every chunk, spread over the members; results in chunk order."""
        import ray
        results: dict[int, Any] = {}
        todo = list(range(len(chunks)))
        while todo:
            ranks = sorted(self.members)
            if not ranks:
                raise RoleFailure(f"{self.role}: no actor left to {what or method}")
            calls = {}
            for n, index in enumerate(todo):
                rank = ranks[n % len(ranks)]
                calls[getattr(self.members[rank], method).remote(*chunks[index])] = (index, rank)
            done, hung = ray.wait(list(calls), num_returns=len(calls), timeout=self.timeout_s)
            failed: dict[int, str] = {}
            for ref in done:
                index, rank = calls[ref]
                try:
                    results[index] = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                    failed[rank] = f"died: {_brief(err)}"
            for ref in hung:
                failed[calls[ref][1]] = f"did not answer {what or method} within {self.timeout_s:g}s"
            for rank, why in failed.items():
                self._handle_failure(rank, why)
            todo = [index for index in todo if index not in results]
        return [results[i] for i in range(len(chunks))]

    def broadcast(self, method: str, *args, what: str | None = None,
                  per_rank: Callable[[int], tuple] | None = None, timeout_s: float | None = None) -> list:
        """``method(*args, *per_rank(rank))`` on every member (replacements included), e.g. a weight push;
        ``timeout_s`` overrides the role's call timeout (an engine's start takes longer than a call)."""
        import ray
        timeout_s = timeout_s or self.timeout_s
        while True:
            calls = {getattr(actor, method).remote(*args, *(per_rank(rank) if per_rank else ())): rank
                     for rank, actor in self.members.items()}
            done, hung = ray.wait(list(calls), num_returns=len(calls), timeout=timeout_s)
            failed, results = {}, {}
            for ref in done:
                try:
                    results[calls[ref]] = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                    failed[calls[ref]] = f"died: {_brief(err)}"
            for ref in hung:
                failed[calls[ref]] = f"did not answer {what or method} within {timeout_s:g}s"
            if not failed:
                return [results[rank] for rank in sorted(results)]
            for rank, why in failed.items():
                self._handle_failure(rank, why)

    def _handle_failure(self, rank: int, why: str) -> None:
        import ray
        message = f"{self.role} {rank} {why}"
        actor = self.members.pop(rank)
        ray.kill(actor, no_restart=True)  # a hung actor must not answer later
        if self.policy == "abort":
            raise RoleFailure(f"{message}; {self.role}.on_failure is 'abort'")
        if self.policy == "drop":
            log.warning("%s: dropped, its work goes to the %d others", message, len(self.members))
            return
        while True:
            if self.restarts >= self.max_restarts:
                raise RoleFailure(f"{message}; {self.role}.max_restarts={self.max_restarts} already used")
            self.restarts += 1
            log.warning("%s: replaced (restart %d of %d)", message, self.restarts, self.max_restarts)
            replacement = self.create(rank)
            try:
                if self.prepare is not None:
                    self.prepare(replacement)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                # The replacement died too: after a node is lost, Ray can place it on that node before the GCS
                # has noticed the loss (its health checks take seconds). It counts as one more failure.
                ray.kill(replacement, no_restart=True)
                message = f"{self.role} {rank}'s replacement died: {_brief(err)}"
                continue
            self.members[rank] = replacement
            return

    def shutdown(self) -> None:
        import ray
        for actor in self.members.values():
            ray.kill(actor, no_restart=True)
        self.members.clear()



def _brief(err: Exception, limit: int = 2000) -> str:
    """The actor's own error (a constructor's traceback, say), cut to a readable length."""
    text = str(err).strip()
    return text if len(text) <= limit else text[:limit] + " …"
