"""The default task: multi-step integer arithmetic solved step by step with the calculator.

A problem is an expression tree with 2-3 operations (+ - * /) over small positive integers, asked
either compactly ("Compute 3 + 4 * (5 - 2)") or as a short word problem ("Ann has 3 boxes of 12
pens and gives 7 away. Pens?"). Precedence and parentheses make the order of the steps a real
decision: an operation can run only once both its operands are numbers. The intended response
computes one operation per calculator call, feeding each result into a later step:

    <calculator>5-2</calculator><result>3</result><calculator>4*3</calculator><result>12</result>
    <calculator>3+12</calculator><result>15</result><answer>15</answer>      (one line in reality)

Every intermediate value is an integer in [0, max_value] (divisions are exact), prompts and
responses are printable ASCII, and prompts stay under 60 characters, for the character-level
default model.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from fractions import Fraction
from typing import Optional, Union

from appo.rollout.format import format_tool_result
from appo.rollout.tools import FlakyTool, get_tool

from .base import Grade, Problem, Task, register_task

EVAL_SHARE = 0.1  # fraction of all possible prompts that belong to the eval split
_MAX_REDRAWS = 10_000  # operand draws for one problem shape before the options count as too tight
OPERATORS = ("+", "-", "*", "/")
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_DECIMAL_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_AST_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}

Expr = Union[int, tuple]  # an operand, or (operator, left Expr, right Expr)

NAMES = ("Ann", "Bob", "Cal", "Dee", "Eve", "Fay", "Gus", "Ivy")
# (prompt, expression, slot ranges): n is a name; other slots are numbers in 1..max_operand
# unless a range is given
WORD_PROBLEMS = (
    ("{n} has {a} boxes of {b} pens and gives {c} away. Pens?", "{a} * {b} - {c}", {}),
    ("{n} buys {a} bags of {b} nuts and {c} more nuts. Nuts?", "{a} * {b} + {c}", {}),
    ("{a} boxes of {b} eggs, {c} broken in each box. Good eggs?", "{a} * ({b} - {c})", {}),
    ("{n} splits {a} cards among {b} kids, each adds {c}. Each?", "{a} / {b} + {c}",
     {"a": (10, 99)}),
    ("{a} rows of {b} seats and {c} more, {d} taken. Free seats?", "{a} * {b} + {c} - {d}", {}),
    ("{a} pens at {b} and {c} pads at {d}. Total cost?", "{a} * {b} + {c} * {d}", {}),
    ("{a} teams of {b} and {c} kids, in groups of {d}. Groups?", "({a} * {b} + {c}) / {d}", {}),
    ("{n} had {a} coins, spent {b} a day for {c} days. Coins?", "{a} - {b} * {c}", {"a": (20, 99)}),
    ("{n} pays {e} for {a} pens at {b} and {c} pads at {d}. Change?",
     "{e} - ({a} * {b} + {c} * {d})", {"e": (50, 200)}),
    ("{a} crates of {b} and {c} of {d} apples, {e} eaten. Left?",
     "{a} * {b} + {c} * {d} - {e}", {}),
)
STYLES = ("expr", "words", "mixed")
# how a demonstration writes a call, then its retries after a failure (a flaky calculator)
RETRY_SPELLINGS = ("{a}{op}{b}", "{a} {op} {b}", "({a}{op}{b})", "({a} {op} {b})",
                   "{a}{op} {b}", "{a} {op}{b}", "(({a}{op}{b}))", "(({a} {op} {b}))")


@register_task("calc")
class CalcTask(Task):
    """Multi-step arithmetic with the calculator tool (the default task of `appo train`).

    Options: `seed`; `n_train`, `n_eval` (split sizes); `min_ops`, `max_ops` (operations per
    problem, 2-3 by default); `max_operand` (operands drawn from 1..max_operand); `max_value`
    (bound on every intermediate value); `style`: "expr" (compact expressions, the default),
    "words" (word problems from `WORD_PROBLEMS`) or "mixed" (half each); `bad_format_reward`
    (-1 by default; 0 makes the reward 0/1 for the answer).

    A flaky calculator: with `failure_share` > 0 the calculator answers "error: busy" on that
    share of call texts (`appo.rollout.tools.FlakyTool`, a hash of the text: the same call
    always fails, the same operation written differently is another draw). Demonstrations then
    retry a failed call written another way (`RETRY_SPELLINGS`), or, on `give_up_share` of the
    failures, give up and answer at once (the guess an agent makes when its tool fails): what
    the model does after a tool result becomes a decision RL can learn.

    Splits: a prompt belongs to eval when a hash of (seed, prompt) falls in the lowest
    `EVAL_SHARE` of its range, so the splits are disjoint by construction and the eval split does
    not depend on `n_train`; each split draws distinct prompts from its own seeded stream.

    Reward: -1 for bad format (`Task.parse` with the calculator as the only tool: exactly one
    non-empty answer at the end, well-formed calls each followed by its result); otherwise 1 when
    the answer is a number equal to the problem's answer ("15", "15.0" and "+15" all count for
    15), else 0. Reasons: "bad format: <what is wrong>", "correct", "wrong answer".
    """

    name = "calc"
    tool_names = ("calculator",)
    instructions = ("Solve the problem one operation at a time with the calculator tool. "
                    "Then write the final number as <answer>number</answer>.")

    def __init__(self, seed: int = 0, n_train: int = 10_000, n_eval: int = 200, min_ops: int = 2,
                 max_ops: int = 3, max_operand: int = 20, max_value: int = 999,
                 style: str = "expr", bad_format_reward: float = -1.0,
                 failure_share: float = 0.0, give_up_share: float = 0.0):
        if not 1 <= min_ops <= max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got min_ops={min_ops}, "
                             f"max_ops={max_ops}")
        if n_train < 0 or n_eval < 0:
            raise ValueError(f"split sizes must be >= 0, got n_train={n_train}, n_eval={n_eval}")
        if max_operand < 2 or max_value < max_operand:
            raise ValueError(f"need 2 <= max_operand <= max_value, got max_operand={max_operand}, "
                             f"max_value={max_value}")
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        if not 0.0 <= give_up_share <= 1.0:
            raise ValueError(f"give_up_share must be in [0, 1], got {give_up_share}")
        self.calculator = (FlakyTool(get_tool("calculator"), failure_share, seed)
                           if failure_share else get_tool("calculator"))
        self.templates = [t for t in WORD_PROBLEMS if min_ops <= _template_ops(t[1]) <= max_ops]
        if style == "words" and not self.templates:
            raise ValueError(f"no word problem has {min_ops}..{max_ops} operations")
        self.seed, self.n_train, self.n_eval = seed, n_train, n_eval
        self.min_ops, self.max_ops = min_ops, max_ops
        self.max_operand, self.max_value, self.style = max_operand, max_value, style
        self.bad_format_reward, self.give_up_share = float(bad_format_reward), give_up_share
        self._splits: dict[str, list[Problem]] = {}

    def split(self, name: str) -> list[Problem]:
        self._check_split(name)
        if name not in self._splits:
            self._splits[name] = self._generate(name)
        return list(self._splits[name])

    def grade(self, response_text: str, problem: Problem) -> Grade:
        parsed = self.parse(response_text)
        if parsed.error is not None:
            return Grade(self.bad_format_reward, f"bad format: {parsed.error}")
        if _same_number(parsed.answer, problem.answer):
            return Grade(1.0, "correct")
        return Grade(0.0, "wrong answer", f"answered {parsed.answer!r}, expected {problem.answer}")

    def tools(self) -> dict:
        return {"calculator": self.calculator}

    def demonstration(self, problem: Problem, rng: random.Random) -> str:
        """One calculator call per operation, each on operands that are already numbers; `rng`
        picks which of the ready operations goes next. Before each call the demonstration writes
        the expression still to compute (first the problem's, then after each result the same
        expression with that operation replaced by its value), so every call and the answer are
        read off the text just before them: a scratchpad that a small model learns to follow far
        sooner than tracking the remaining expression unwritten. Results come from the registered
        calculator, exactly as the rollout's tool loop would append them."""
        if "expression" not in problem.meta:
            raise ValueError("demonstration needs a calc problem (meta['expression'] is missing)")
        tree = _parse(problem.meta["expression"])
        parts = []
        while isinstance(tree, tuple):
            path = rng.choice(_ready_operations(tree))
            op, left, right = _at(tree, path)
            parts.append(_render(tree))
            for spelling in RETRY_SPELLINGS:
                step = spelling.format(a=left, op=op, b=right)
                result = self.calculator(step)
                parts.append(f"<calculator>{step}</calculator>{format_tool_result(result)}")
                if not result.startswith("error"):
                    break
                if rng.random() < self.give_up_share:  # answer from memory after a failure
                    parts.append(f"<answer>{problem.answer}</answer>")
                    return "".join(parts)
            else:
                raise ValueError(f"calc: every spelling of {left}{op}{right} fails; lower "
                                 f"failure_share")
            tree = _replace(tree, path, int(result))
        parts.append(f"<answer>{tree}</answer>")
        return "".join(parts)

    def _generate(self, split: str) -> list[Problem]:
        n = self.n_train if split == "train" else self.n_eval
        rng = random.Random(f"calc/{self.seed}/{split}")
        problems, seen = [], set()
        max_draws = 1000 * n + 10_000
        for _ in range(max_draws):
            if len(problems) == n:
                return problems
            problem = self._draw(rng)
            if problem.prompt in seen or self._split_of(problem.prompt) != split:
                continue
            seen.add(problem.prompt)
            problems.append(problem)
        if len(problems) == n:
            return problems
        raise ValueError(f"calc: found only {len(problems)} distinct {split} problems of {n} "
                         f"asked; lower n_{split} or widen max_ops/max_operand")

    def _split_of(self, prompt: str) -> str:
        digest = hashlib.blake2b(f"{self.seed}:{prompt}".encode(), digest_size=8).digest()
        return "eval" if int.from_bytes(digest, "big") < EVAL_SHARE * 2**64 else "train"

    def _draw(self, rng: random.Random) -> Problem:
        """One random problem. The shape (operation count or template) is drawn first and kept
        while operands are redrawn until every constraint holds, so shapes whose constraints
        fail more often (divisions) are not under-represented."""
        words = self.style == "words" or (self.style == "mixed" and rng.random() < 0.5)
        if words:
            text, expression_format, ranges = rng.choice(self.templates)
        else:
            n_ops = rng.randint(self.min_ops, self.max_ops)
        for _ in range(_MAX_REDRAWS):
            if words:
                slots = {s: rng.randint(*ranges.get(s, (1, self.max_operand))) for s in "abcde"}
                expression = expression_format.format(**slots)
                prompt = text.format(n=rng.choice(NAMES), **slots)
                tree = _parse(expression)
            else:
                tree = _random_tree(rng, n_ops, self.max_operand)
                expression = _render(tree)
                prompt = f"Compute {expression}"
            value = _value(tree, self.max_value)
            if value is not None:
                meta = {"expression": expression, "n_ops": _count_ops(tree)}
                return Problem(prompt, str(value), meta)
        raise ValueError(f"calc: no valid problem in {_MAX_REDRAWS} draws; "
                         f"widen max_value or max_operand")


def _random_tree(rng: random.Random, n_ops: int, max_operand: int) -> Expr:
    if n_ops == 0:
        return rng.randint(1, max_operand)
    n_left = rng.randint(0, n_ops - 1)
    return (rng.choice(OPERATORS), _random_tree(rng, n_left, max_operand),
            _random_tree(rng, n_ops - 1 - n_left, max_operand))


def _render(tree: Expr) -> str:
    """The expression text that parses back to exactly this tree: parentheses around a child of
    lower precedence, and around a right child of equal precedence (operators associate left)."""
    if not isinstance(tree, tuple):
        return str(tree)
    op, left, right = tree
    left_text, right_text = _render(left), _render(right)
    if isinstance(left, tuple) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
        left_text = f"({left_text})"
    if isinstance(right, tuple) and _PRECEDENCE[right[0]] <= _PRECEDENCE[op]:
        right_text = f"({right_text})"
    return f"{left_text} {op} {right_text}"


def _parse(expression: str) -> Expr:
    def convert(node: ast.AST) -> Expr:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPERATORS:
            return (_AST_OPERATORS[type(node.op)], convert(node.left), convert(node.right))
        raise ValueError(f"not a calc expression: {expression!r}")

    return convert(ast.parse(expression, mode="eval").body)


def _value(tree: Expr, max_value: int) -> Optional[int]:
    """The value of the tree when every intermediate value is an integer in [0, max_value]."""
    if not isinstance(tree, tuple):
        return tree if 0 <= tree <= max_value else None
    op, left, right = tree
    a, b = _value(left, max_value), _value(right, max_value)
    if a is None or b is None:
        return None
    if op == "/":
        if b == 0 or a % b:
            return None
        value = a // b
    else:
        value = a + b if op == "+" else a - b if op == "-" else a * b
    return value if 0 <= value <= max_value else None


def _count_ops(tree: Expr) -> int:
    return 1 + _count_ops(tree[1]) + _count_ops(tree[2]) if isinstance(tree, tuple) else 0


def _ready_operations(tree: Expr, path: tuple = ()) -> list[tuple]:
    """Paths (1 = left, 2 = right) to the operations whose operands are both numbers."""
    if not isinstance(tree, tuple):
        return []
    _, left, right = tree
    if not isinstance(left, tuple) and not isinstance(right, tuple):
        return [path]
    return _ready_operations(left, path + (1,)) + _ready_operations(right, path + (2,))


def _at(tree: Expr, path: tuple) -> Expr:
    for i in path:
        tree = tree[i]
    return tree


def _replace(tree: Expr, path: tuple, value: Expr) -> Expr:
    if not path:
        return value
    parts = list(tree)
    parts[path[0]] = _replace(tree[path[0]], path[1:], value)
    return tuple(parts)


def _template_ops(expression_format: str) -> int:
    return _count_ops(_parse(expression_format.format(**dict.fromkeys("abcde", 1))))


def _same_number(text: str, answer: str) -> bool:
    """Whether `text` is a plain decimal number equal to `answer` (not an expression like 30/2)."""
    return _DECIMAL_RE.fullmatch(text) is not None and Fraction(text) == Fraction(answer)
