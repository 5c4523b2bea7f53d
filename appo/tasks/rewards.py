"""Built-in rewards for tasks whose problems carry a reference answer (the jsonl task's
`reward_fn`): each reads a response and returns a `Grade` (reward and reason).

- `exact`: the `<answer>` text equals the reference: 1; else 0; bad format -1.
- `numeric`: the `<answer>` text read as a number (`read_number`) equals the reference: 1; else 0.
  Without a well-formed answer, the last number of the final model turn is read instead; -1 when
  there is no number at all.
- `math_verify`: `math-verify` (PyPI) finds the reference and the answer (the `<answer>` text, or
  the final model turn) equivalent: 1; else 0; -1 when it can read nothing.

Bad format is the task's `parse` (the run's tool protocol): a missing, repeated or unclosed
answer, text after it, a call without its result. `numeric` and `math_verify` grade a response
without a well-formed answer by what it says last, and say so in the reason ("..., read
leniently"), so a model that has not learnt the answer tag yet still gets a signal.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Callable, Optional

from appo.registry import Registry
from appo.rollout.format import RESULT_CLOSE
from appo.rollout.protocol import ParsedResponse

from .base import Grade, Problem

# fn(response_text, problem, parsed) -> Grade, `parsed` the task's reading of the response
BuiltinReward = Callable[[str, Problem, ParsedResponse], Grade]
REWARDS = Registry("reward", "fn(response_text, problem, parsed) -> Grade")
NUMERIC_REL_TOL = 1e-6  # two non-exact numbers are equal within this relative tolerance

# a number as people write it: sign, thousands separators, decimals, exponent, or a fraction a/b
_NUMBER_RE = re.compile(r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?"
                        r"(?:\s*/\s*\d+)?")
_WRAPPERS_RE = re.compile(r"\\boxed\{([^{}]*)\}|\\text\{([^{}]*)\}")
_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


def final_turn(response_text: str) -> str:
    """The model's text after the last tool result: what it said last."""
    return response_text.rsplit(RESULT_CLOSE, 1)[-1]


def read_number(text: str) -> Optional[Fraction]:
    """The number `text` states, leniently: `$1,234.50`, `12%` (as 12), `\\boxed{7}`,
    `\\frac{3}{4}`, `3/4`, `-2e3`, `x = 5.`; for longer text, its last number. None if none."""
    text = _FRAC_RE.sub(r"(\1)/(\2)", _WRAPPERS_RE.sub(lambda m: m.group(1) or m.group(2), text))
    text = text.replace("−", "-").replace("$", "").replace("\\", "").replace("(", "")
    text = text.replace(")", "")
    found = [m.group(0) for m in _NUMBER_RE.finditer(text) if any(c.isdigit() for c in m.group(0))]
    if not found:
        return None
    number = found[-1].replace(",", "").replace(" ", "").replace("−", "-")
    try:
        if "/" in number:
            top, bottom = number.split("/")
            return Fraction(top) / Fraction(bottom) if Fraction(bottom) else None
        return Fraction(number)
    except (ValueError, ZeroDivisionError):
        return None


def same_number(a: Fraction, b: Fraction) -> bool:
    return a == b or math.isclose(float(a), float(b), rel_tol=NUMERIC_REL_TOL)


def register_reward(name: str):
    """A decorator registering a built-in reward `fn(response_text, problem, parsed) -> Grade`."""
    def add(fn: BuiltinReward) -> BuiltinReward:
        return REWARDS.add(name, fn)

    return add


@register_reward("exact")
def exact_match(response_text: str, problem: Problem, parsed: ParsedResponse) -> Grade:
    """1 when the answer text equals the problem's answer (both stripped), else 0; -1 for bad
    format."""
    if parsed.error is not None:
        return Grade(-1.0, f"bad format: {parsed.error}")
    if parsed.answer == problem.answer.strip():
        return Grade(1.0, "correct")
    return Grade(0.0, "wrong answer", f"answered {parsed.answer!r}")


@register_reward("numeric")
def numeric_match(response_text: str, problem: Problem, parsed: ParsedResponse) -> Grade:
    """The answer read as a number (`read_number`) against the problem's, exact for exact
    numbers, else within `NUMERIC_REL_TOL`; without a well-formed answer, the last number of the
    final model turn (reason "..., read leniently"); -1 when there is no number to read."""
    expected = read_number(problem.answer)
    if expected is None:
        raise ValueError(f"reward 'numeric': the answer {problem.answer!r} of problem "
                         f"{problem.prompt[:60]!r} is not a number")
    text = parsed.answer if parsed.error is None else final_turn(response_text)
    got = read_number(text)
    lenient = "" if parsed.error is None else ", read leniently"
    if got is None:
        why = "no number in the answer" if parsed.error is None else f"{parsed.error}, no number"
        return Grade(-1.0, f"bad format: {why}")
    detail = f"read {float(got):g}" + (f" ({parsed.error})" if lenient else "")
    if same_number(got, expected):
        return Grade(1.0, "correct" + lenient, detail)
    return Grade(0.0, "wrong answer" + lenient, detail)


@register_reward("math_verify")
def math_verify_match(response_text: str, problem: Problem, parsed: ParsedResponse) -> Grade:
    """`math_verify.verify` of the problem's answer against the response's (the answer text, or
    the final model turn without a well-formed answer)."""
    from math_verify import parse, verify

    gold = parse(f"${problem.answer}$") or parse(problem.answer)
    if not gold:
        raise ValueError(f"reward 'math_verify': cannot read the answer {problem.answer!r} of "
                         f"problem {problem.prompt[:60]!r}")
    lenient = "" if parsed.error is None else ", read leniently"
    got = parse(parsed.answer if parsed.error is None else final_turn(response_text))
    if not got:
        why = "nothing math-verify can read" + (f" ({parsed.error})" if lenient else "")
        return Grade(-1.0, f"bad format: {why}")
    detail = f"read {got[-1]}"
    if verify(gold, got):
        return Grade(1.0, "correct" + lenient, detail)
    return Grade(0.0, "wrong answer" + lenient, detail)


def as_grade(value, where: str) -> Grade:
    """A user reward's result as a Grade: a Grade, (reward, reason) or a number."""
    if isinstance(value, Grade):
        grade = value
    elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
        grade = Grade(float(value[0]), value[1])
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        grade = Grade(float(value), f"reward {float(value):g}")
    else:
        raise TypeError(f"{where} must return a number, (number, reason) or a Grade, got "
                        f"{value!r}")
    if not math.isfinite(grade.reward):
        raise ValueError(f"{where} returned a non-finite reward {grade.reward!r}")
    return grade
