"""A task read from the user's own file: one JSON object per line with "prompt" and "answer".

    get_task("jsonl", path="problems.jsonl", reward_fn="my_rewards:score", tools=("python",))

Other fields of a row go to `Problem.meta` (with its 1-based "line"). Blank lines are skipped; a
row that is not a JSON object, or lacks a string "prompt" or a string/number "answer", raises
ValueError naming the file and line.
"""

from __future__ import annotations

import importlib
import json
import random
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from appo.rollout.tools import get_tool

from .base import Problem, Task, parse_response, register_task

RewardFn = Callable[[str, Problem], float]


@register_task("jsonl")
class JsonlTask(Task):
    """Prompt/answer rows from `path` with a user reward.

    Options: `path`; `reward_fn`: a callable or "module:function" (imported; called as
    `fn(response_text, problem) -> float`), by default `exact_match_reward`; `tools`: the tool
    names responses may call (registered tools); `eval_fraction`: the share of distinct prompts
    held out for eval; `seed`: which prompts those are (rows with the same prompt stay together,
    so no prompt is in both splits; each split keeps the file's order); `instructions`: text for a
    system prompt. There are no demonstrations, so no warm start.
    """

    name = "jsonl"

    def __init__(self, path: Union[str, Path], reward_fn: Union[str, RewardFn, None] = None,
                 tools: Sequence[str] = ("calculator", "python"), eval_fraction: float = 0.1,
                 seed: int = 0, instructions: str = ""):
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        for tool in tools:
            get_tool(tool)  # raises ValueError for an unknown tool
        self.path = Path(path)
        self.tool_names = tuple(tools)
        self.instructions = instructions
        self.reward_fn = (partial(exact_match_reward, tool_names=self.tool_names)
                          if reward_fn is None else _load_reward(reward_fn))
        self._splits = _split(read_rows(self.path), eval_fraction, seed)

    def split(self, name: str) -> list[Problem]:
        self._check_split(name)
        return list(self._splits[name])

    def reward(self, response_text: str, problem: Problem) -> float:
        return float(self.reward_fn(response_text, problem))


def exact_match_reward(response_text: str, problem: Problem, *, tool_names: Sequence[str]) -> float:
    """The default reward: -1 for bad format (`parse_response` with the task's tools), 1 when
    the answer text equals the problem's answer (both stripped), else 0."""
    parsed = parse_response(response_text, tool_names)
    if parsed.error is not None:
        return -1.0
    return 1.0 if parsed.answer == problem.answer.strip() else 0.0


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


def _load_reward(spec: Union[str, RewardFn]) -> RewardFn:
    if callable(spec):
        return spec
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"reward_fn must be a callable or 'module:function', got {spec!r}")
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward_fn {spec!r}: cannot import {module_name!r} ({e})") from e
    fn: Optional[RewardFn] = getattr(module, function_name, None)
    if not callable(fn):
        raise ValueError(f"reward_fn {spec!r}: {module_name} has no function {function_name!r}")
    return fn
