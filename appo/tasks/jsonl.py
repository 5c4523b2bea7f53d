"""A task read from the user's own file: one JSON object per line with "prompt" and "answer".

    get_task("jsonl", path="problems.jsonl", reward_fn="numeric", tools=("python",))

Other fields of a row go to `Problem.meta` (with its 1-based "line"). Blank lines are skipped; a
row that is not a JSON object, or lacks a string "prompt" or a string/number "answer", raises
ValueError naming the file and line.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import random
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from appo.rollout.format import ANSWER_CLOSE, ANSWER_OPEN
from appo.rollout.tools import get_tool

from .base import Grade, Problem, Task, register_task
from .rewards import REWARDS, as_grade

UserReward = Callable[[str, Problem], object]  # -> a number, (number, reason) or a Grade
DEFAULT_REWARD = "exact"


def default_instructions(tools: Sequence[str]) -> str:
    """What the jsonl task asks for when the user gives no instructions: the answer format, and
    that the tools may be used (the tool protocol adds how to call them)."""
    use = (f" You may use the {' and '.join(tools)} tool{'s' if len(tools) > 1 else ''}."
           if tools else "")
    return (f"Solve the problem.{use} End your response with the final answer written as "
            f"{ANSWER_OPEN}answer{ANSWER_CLOSE}.")


@register_task("jsonl")
class JsonlTask(Task):
    """Prompt/answer rows from `path` with a reward.

    Options: `path`; `reward_fn`: a built-in reward by name (`appo.tasks.rewards`: "exact", the
    default, "numeric", "math_verify") or the user's, as a callable or "module:function"
    (imported; called as `fn(response_text, problem)`, returning a number, (number, reason) or
    a `Grade`); `tools`: the tool names responses may call (registered tools); `eval_fraction`:
    the share of distinct prompts held out for eval; `seed`: which prompts those are (rows with
    the same prompt stay together, so no prompt is in both splits; each split keeps the file's
    order); `instructions`: text for the system prompt, by default `default_instructions` (the
    answer format and the tools). There are no demonstrations, so no warm start.
    """

    name = "jsonl"

    def __init__(self, path: Union[str, Path], reward_fn: Union[str, UserReward, None] = None,
                 tools: Sequence[str] = ("calculator", "python"), eval_fraction: float = 0.1,
                 seed: int = 0, instructions: Optional[str] = None):
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        for tool in tools:
            get_tool(tool)  # raises ValueError for an unknown tool
        self.path = Path(path)
        self.tool_names = tuple(tools)
        self.instructions = default_instructions(self.tool_names) if instructions is None \
            else instructions
        self.reward_name = reward_fn if isinstance(reward_fn, str) else None
        self._builtin, self._user = _load_reward(DEFAULT_REWARD if reward_fn is None else reward_fn)
        rows = read_rows(self.path)
        if self._builtin is not None:  # a reference answer it cannot read fails now, not mid-run
            for problem in rows[:1] + [p for p in rows[1:] if self.reward_name == "numeric"]:
                self._builtin("", problem, self.parse(""))
        self._splits = _split(rows, eval_fraction, seed)

    def split(self, name: str) -> list[Problem]:
        self._check_split(name)
        return list(self._splits[name])

    def grade(self, response_text: str, problem: Problem) -> Grade:
        if self._builtin is not None:
            return self._builtin(response_text, problem, self.parse(response_text))
        return as_grade(self._user(response_text, problem), "reward_fn")


def read_rows(path: Path) -> list[Problem]:
    problems = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object with \"prompt\" and \"answer\", "
                                 f"got {type(row).__name__}")
            for key in ("prompt", "answer"):
                if key not in row:
                    raise ValueError(f"{where}: missing field {key!r}")
            prompt, answer = row.pop("prompt"), row.pop("answer")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{where}: \"prompt\" must be a non-empty string, got {prompt!r}")
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise ValueError(f"{where}: \"answer\" must be a string or a number, "
                                 f"got {answer!r}")
            problems.append(Problem(prompt, str(answer), {**row, "line": line_number}))
    if not problems:
        raise ValueError(f"{path}: no rows")
    return problems


def _split(problems: list[Problem], eval_fraction: float, seed: int) -> dict[str, list[Problem]]:
    prompts = list(dict.fromkeys(p.prompt for p in problems))  # distinct, in file order
    random.Random(f"jsonl/{seed}").shuffle(prompts)
    held_out = set(prompts[:round(len(prompts) * eval_fraction)])
    return {"train": [p for p in problems if p.prompt not in held_out],
            "eval": [p for p in problems if p.prompt in held_out]}


def _load_reward(spec: Union[str, UserReward]):
    """(built-in reward, None) for a registered name, (None, user function) otherwise."""
    if callable(spec):
        return None, spec
    if isinstance(spec, str) and spec in REWARDS.names():
        if spec == "math_verify" and importlib.util.find_spec("math_verify") is None:
            raise ValueError("reward_fn 'math_verify' needs the math-verify package "
                             "(pip install math-verify)")
        return REWARDS.get(spec), None
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"reward_fn must be one of {REWARDS.names()}, a callable or "
                         f"'module:function', got {spec!r}")
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward_fn {spec!r}: cannot import {module_name!r} ({e})") from e
    fn: Optional[UserReward] = getattr(module, function_name, None)
    if not callable(fn):
        raise ValueError(f"reward_fn {spec!r}: {module_name} has no function {function_name!r}")
    return None, fn
