"""Rule oracles: preferences that are checked, not judged.

* ``arithmetic`` — "What is 12+7?": a response stating the right number beats one that does not.
* ``concise_answer`` — a non-empty response beats an empty one, and the shorter of two non-empty responses wins,
  down to ``min_chars`` (shorter than that earns nothing more, so brevity is not pushed to a single character).
* ``max_words`` — a response within the word limit beats one over it; no preference otherwise.
* ``matches_format`` — a response matching a regular expression beats one that does not.
* ``readable`` — the response easier to read wins: Flesch reading ease (Flesch 1948, "A new readability yardstick",
  J. Applied Psychology 32), syllables counted by ``pyphen``'s hyphenation dictionary; shorter sentences and
  shorter words read easier, whatever the response's length.
* ``cyclic`` — a synthetic intransitive preference for tests and benchmarks: responses fall in ``classes`` (odd)
  classes by a discrete feature (word count mod classes, word-count bins, or sentiment class), and each class beats
  the next (classes − 1)/2 classes cyclically (rock-paper-scissors for 3), so no response is best and the Nash
  equilibrium is mixed. It declares its matrix game over the classes (``feature_game``).

``RULES`` maps each name to its oracle class; :func:`build_rule` builds one with validated options.
"""

from __future__ import annotations

import ast
import inspect
import json
import operator
import re
from typing import Callable

from nashray.oracles.base import Comparison, PreferenceOracle, Verdict
from nashray.oracles.sentiment import sentiment_class


class Undecidable(ValueError):
    """The rule cannot judge this comparison; the message is the recorded reason."""


class RuleOracle(PreferenceOracle):
    """A deterministic rule: :meth:`prefer` gives P(a ≻ b) or raises :class:`Undecidable`."""

    name = "rule"

    def __init__(self, **options):
        self.oracle_id = f"rule:{self.name}:{json.dumps(options, sort_keys=True, default=str)}"

    def prefer(self, prompt: str, a: str, b: str) -> float:
        raise NotImplementedError

    def compare(self, comparisons: list[Comparison]) -> list[Verdict]:
        verdicts = []
        for c in comparisons:
            try:
                verdicts.append(Verdict(float(self.prefer(c.prompt, c.a, c.b))))
            except Undecidable as why:
                verdicts.append(Verdict(None, f"{self.name}: {why}"))
        return verdicts

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.oracle_id!r})"


def _by_flags(a_ok: bool, b_ok: bool) -> float:
    return 0.5 if a_ok == b_ok else (1.0 if a_ok else 0.0)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_QUESTION = re.compile(r"what\s+is\s+([-+*x×()\d\s]*\d[-+*x×()\d\s]*)", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\d.])-?\d+(?:\.\d+)?")


def _evaluate(expression: str) -> int:
    def walk(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise Undecidable(f"{expression!r} is not integer arithmetic with + - *")

    try:
        tree = ast.parse(expression.replace("×", "*").replace("x", "*"), mode="eval")
    except SyntaxError:
        raise Undecidable(f"{expression!r} is not an arithmetic expression") from None
    return walk(tree.body)


class Arithmetic(RuleOracle):
    """Correctness on "What is <integer expression>?" prompts. ``match='any'``: a response is right when any number
    in it equals the answer; ``match='last'``: when its last number does (the usual place of a final answer)."""

    name = "arithmetic"

    def __init__(self, match: str = "any"):
        if match not in ("any", "last"):
            raise ValueError(f"rule 'arithmetic': match must be 'any' or 'last', got {match!r}")
        super().__init__(match=match)
        self.match = match

    def answer(self, prompt: str) -> int:
        question = _QUESTION.search(prompt)
        if question is None:
            raise Undecidable(f"prompt {prompt[:80]!r} is not a 'What is <expression>?' question")
        return _evaluate(question.group(1).strip())

    def correct(self, response: str, answer: int) -> bool:
        numbers = [float(n) for n in _NUMBER.findall(response)]
        if self.match == "last":
            return bool(numbers) and numbers[-1] == answer
        return answer in numbers

    def prefer(self, prompt, a, b):
        answer = self.answer(prompt)
        return _by_flags(self.correct(a, answer), self.correct(b, answer))


class ConciseAnswer(RuleOracle):
    """Non-empty beats empty; the shorter non-empty response wins, lengths under ``min_chars`` counting as
    ``min_chars``; equal lengths tie at ½."""

    name = "concise_answer"

    def __init__(self, min_chars: int = 16):
        if not isinstance(min_chars, int) or min_chars < 1:
            raise ValueError(f"rule 'concise_answer': min_chars must be a positive integer, got {min_chars!r}")
        super().__init__(min_chars=min_chars)
        self.min_chars = min_chars

    def prefer(self, prompt, a, b):
        a, b = a.strip(), b.strip()
        if not a or not b:
            return _by_flags(bool(a), bool(b))
        length_a, length_b = max(len(a), self.min_chars), max(len(b), self.min_chars)
        return 0.5 if length_a == length_b else float(length_a < length_b)


class MaxWords(RuleOracle):
    """Within ``limit`` words beats over it; otherwise a tie."""

    name = "max_words"

    def __init__(self, limit: int = 50):
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"rule 'max_words': limit must be a positive integer, got {limit!r}")
        super().__init__(limit=limit)
        self.limit = limit

    def prefer(self, prompt, a, b):
        return _by_flags(len(a.split()) <= self.limit, len(b.split()) <= self.limit)


class MatchesFormat(RuleOracle):
    """A response in which ``pattern`` is found (``fullmatch``: which ``pattern`` matches whole, after stripping)
    beats one without; otherwise a tie."""

    name = "matches_format"

    def __init__(self, pattern: str, fullmatch: bool = False):
        try:
            self.regex = re.compile(pattern, re.DOTALL)
        except re.error as err:
            raise ValueError(f"rule 'matches_format': pattern {pattern!r} is not a regular expression: {err}") from None
        super().__init__(pattern=pattern, fullmatch=fullmatch)
        self.fullmatch = fullmatch

    def _ok(self, response: str) -> bool:
        return bool(self.regex.fullmatch(response.strip()) if self.fullmatch else self.regex.search(response))

    def prefer(self, prompt, a, b):
        return _by_flags(self._ok(a), self._ok(b))


class Readable(RuleOracle):
    """Higher Flesch reading ease, 206.835 − 1.015·words/sentences − 84.6·syllables/words, wins; scores within
    ``margin`` of each other tie at ½, and so does a comparison where either response is empty (no words to
    read): on its own it is transitive, a panel member whose ordering is neither length's nor sentiment's.

    A word's syllables are its hyphenation points plus one (pyphen's en_US dictionary, hyphens allowed one letter
    from either end), which needs no pronouncing dictionary, so any word a model makes up is counted too."""

    name = "readable"
    _WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
    _SENTENCE_END = re.compile(r"[.!?]+")

    def __init__(self, margin: float = 0.0):
        if not isinstance(margin, (int, float)) or margin < 0:
            raise ValueError(f"rule 'readable': margin must be a number ≥ 0, got {margin!r}")
        try:
            import pyphen
        except ImportError as err:  # a panel member that cannot load must say which package is missing
            raise ValueError("rule 'readable' needs the pyphen package (pip install pyphen)") from err
        super().__init__(margin=float(margin))
        self.margin, self._hyphenator = float(margin), pyphen.Pyphen(lang="en_US", left=1, right=1)

    def reading_ease(self, text: str) -> float | None:
        """Flesch reading ease of ``text``; None when it has no words."""
        words = self._WORD.findall(text)
        if not words:
            return None
        # a last sentence without its full stop still counts
        sentences = max(len(self._SENTENCE_END.findall(text.rstrip(" .!?\n") + ".")), 1)
        syllables = sum(len(self._hyphenator.positions(w.lower())) + 1 for w in words)
        return 206.835 - 1.015 * len(words) / sentences - 84.6 * syllables / len(words)

    def prefer(self, prompt, a, b):
        ease_a, ease_b = self.reading_ease(a), self.reading_ease(b)
        if ease_a is None or ease_b is None:
            return 0.5
        gap = ease_a - ease_b
        return 0.5 if abs(gap) <= self.margin else float(gap > 0)


class Cyclic(RuleOracle):
    """A discrete feature of the response puts it in one of ``classes`` (odd) classes; class c beats classes
    c+1 … c+(classes−1)/2 (mod classes) with probability ½ + ``strength``/2. Intransitive for every odd ``classes``
    ≥ 3. The feature:

    - ``words_mod``: the word count mod ``classes``;
    - ``words``: word-count bins, ``bins`` the increasing lower edges of classes 1, 2, … (classes = len(bins) + 1);
    - ``sentiment``: VADER's negative / neutral / positive (oracles/sentiment.py), 3 classes.

    The preference depends on the classes alone, so it induces the matrix game :meth:`feature_game` over them, in
    which a policy's exploitability depends only on its class distribution."""

    name = "cyclic"
    FEATURES = ("words_mod", "words", "sentiment")

    def __init__(self, classes: int | None = None, strength: float = 1.0, feature: str = "words_mod",
                 bins: list[int] | None = None):
        if feature not in self.FEATURES:
            raise ValueError(f"rule 'cyclic': feature must be one of {self.FEATURES}, got {feature!r}")
        if (bins is not None) != (feature == "words"):
            raise ValueError("rule 'cyclic': bins (word-count class edges) go with feature 'words', and only with it")
        if bins is not None and (not bins or any(not isinstance(b, int) for b in bins)
                                 or any(b <= a for a, b in zip([0] + list(bins), bins))):
            raise ValueError(f"rule 'cyclic': bins must be increasing positive integers, got {bins!r}")
        implied = {"words": len(bins) + 1 if bins else None, "sentiment": 3}.get(feature)
        if classes is None:
            classes = implied or 3
        elif implied is not None and classes != implied:
            raise ValueError(f"rule 'cyclic': feature {feature!r} gives {implied} classes, but classes = {classes}")
        if not isinstance(classes, int) or classes < 3 or classes % 2 == 0:
            raise ValueError(f"rule 'cyclic': classes must be an odd integer ≥ 3, got {classes!r}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"rule 'cyclic': strength must be in [0, 1], got {strength!r}")
        options = {"classes": classes, "strength": strength}
        if feature != "words_mod":  # the original rule keeps its cache id
            options.update(feature=feature, bins=bins)
        super().__init__(**options)
        self.classes, self.strength, self.feature_name, self.bins = classes, float(strength), feature, bins
        self._game = self.feature_game()
        if feature == "sentiment":
            self._sentiment = sentiment_class

    def feature(self, response: str) -> int:
        words = len(response.split())
        if self.feature_name == "words_mod":
            return words % self.classes
        if self.feature_name == "words":
            return sum(words >= edge for edge in self.bins)
        return self._sentiment(response)

    def feature_game(self):
        """M[c, c'] = P(a response of class c ≻ one of class c')."""
        import numpy as np
        ahead = (np.arange(self.classes)[None, :] - np.arange(self.classes)[:, None]) % self.classes
        wins = (ahead > 0) & (ahead <= (self.classes - 1) // 2)
        losses = ahead > (self.classes - 1) // 2
        return 0.5 + 0.5 * self.strength * (wins.astype(float) - losses.astype(float))

    def prefer(self, prompt, a, b):
        return float(self._game[self.feature(a), self.feature(b)])


RULES: dict[str, Callable[..., RuleOracle]] = {
    cls.name: cls for cls in (Arithmetic, ConciseAnswer, MaxWords, MatchesFormat, Readable, Cyclic)}


def build_rule(name: str, options: dict | None = None) -> RuleOracle:
    """The rule oracle ``name`` with ``options``; an unknown name or option fails naming what exists."""
    if name not in RULES:
        raise ValueError(f"unknown rule oracle {name!r}; known rules: {sorted(RULES)}")
    factory, options = RULES[name], dict(options or {})
    accepted = set(inspect.signature(factory).parameters)
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(f"rule {name!r} has no option(s) {sorted(unknown)}; its options are {sorted(accepted)}")
    try:
        return factory(**options)
    except TypeError as err:
        raise ValueError(f"rule {name!r}: {err}") from None
