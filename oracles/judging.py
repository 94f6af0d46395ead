"""The pairwise judging protocol shared by every judge that reads a verdict token: the LLM judge, the HTTP judge and
the served judge.

A judge is asked, through a chat message built from a template, which of two responses is better and answers with one
verdict token, ``A`` or ``B``. P(A) is the softmax over just those two tokens' log-probabilities. Judges prefer one
position (usually the first) regardless of content, so the question is asked in both orders and averaged:

    p(a ≻ b) = ½ [P(A | a, b) + 1 − P(A | b, a)]

which makes p(a ≻ b) + p(b ≻ a) = 1 exactly, whatever the judge's position bias.
"""

from __future__ import annotations

import math
import re
import string

from nashray.oracles.base import Comparison, Verdict

VERDICTS = ("A", "B")

DEFAULT_TEMPLATE = (
    "You are comparing two responses to the same request. Decide which response answers the request better: "
    "more correct, more helpful and clearer.\n\n"
    "[Request]\n{prompt}\n\n"
    "[Response A]\n{a}\n\n"
    "[Response B]\n{b}\n\n"
    "Which response is better? Answer with a single letter: A or B.")

_FIELDS = ("prompt", "a", "b")


def check_template(template: str) -> str:
    """The template itself, once it is known to name exactly the fields ``{prompt}``, ``{a}`` and ``{b}``."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ValueError(f"judging template is not a valid format string ({err}); escape literal braces as {{{{ }}}}")
    missing, unknown = set(_FIELDS) - names, names - set(_FIELDS)
    if missing or unknown:
        raise ValueError(f"judging template must use the fields {{prompt}}, {{a}} and {{b}}: "
                         + ", ".join(filter(None, [missing and f"missing {sorted(missing)}",
                                                   unknown and f"unknown {sorted(unknown)}"])))
    return template


def judging_messages(template: str, prompt: str, first: str, second: str) -> list[dict[str, str]]:
    """The chat conversation asking the judge to compare ``first`` (shown as A) with ``second`` (shown as B)."""
    return [{"role": "user", "content": template.format_map({"prompt": prompt, "a": first, "b": second})}]


def parse_judging_message(template: str, content: str) -> tuple[str, str, str]:
    """(prompt, first, second) back from a message rendered with ``template``: what a judge that scores responses
    itself (a reward model served behind the chat route) needs. Ambiguous only when a response contains the
    template's own separators; raises ValueError when ``content`` does not follow the template."""
    pattern = []
    for literal, name, _, _ in string.Formatter().parse(template):
        pattern.append(re.escape(literal))
        if name is not None:
            pattern.append(f"(?P<{name}>.*?)" if name != "b" else f"(?P<{name}>.*)")
    match = re.fullmatch("".join(pattern), content, re.DOTALL)
    if match is None:
        raise ValueError("the message does not follow the judging template")
    return match.group("prompt"), match.group("a"), match.group("b")


def order_questions(comparisons: list[Comparison], both_orders: bool) -> list[tuple[str, str, str]]:
    """(prompt, first, second) for each comparison as given, then (``both_orders``) each comparison swapped."""
    swapped = [(c.prompt, c.b, c.a) for c in comparisons] if both_orders else []
    return [(c.prompt, c.a, c.b) for c in comparisons] + swapped


def verdicts_from_orders(answers: list[float | str], both_orders: bool) -> list[Verdict]:
    """Verdicts from the answers P(A) (or drop reasons) to :func:`order_questions`: debiased over both orders, or
    as they are. A comparison is dropped when either of its questions was."""
    n = len(answers) // 2 if both_orders else len(answers)
    verdicts = []
    for i in range(n):
        asked = (answers[i], answers[i + n]) if both_orders else (answers[i],)
        reason = next((a for a in asked if isinstance(a, str)), None)
        if reason is not None:
            verdicts.append(Verdict(None, reason))
        else:
            verdicts.append(Verdict(debiased(*asked) if both_orders else asked[0]))
    return verdicts


def two_token_probability(logprob_a: float, logprob_b: float) -> float:
    """P(A) from the log-probabilities of the two verdict tokens: the softmax over just those two."""
    if not (math.isfinite(logprob_a) or math.isfinite(logprob_b)):
        raise ValueError("both verdict tokens have zero probability")
    top = max(logprob_a, logprob_b)
    ea, eb = math.exp(logprob_a - top), math.exp(logprob_b - top)
    return ea / (ea + eb)


def debiased(p_first: float, p_swapped: float) -> float:
    """p(a ≻ b) = ½ [P(A | a, b) + 1 − P(A | b, a)]."""
    return 0.5 * (p_first + 1.0 - p_swapped)


_VERDICT_TEXT = re.compile(r"^(?:response\s*)?([AB])$", re.IGNORECASE)


def parse_verdict_text(text: str) -> str | None:
    """``A`` or ``B`` when the reply says exactly that (``A``, ``b.``, ``Response B``, ``[[A]]``), else None."""
    stripped = re.sub(r"[^\w\s]", "", text or "").strip()
    match = _VERDICT_TEXT.match(stripped)
    return match.group(1).upper() if match else None
