"""Tasks: problems with a verifiable reward (docs/algorithm.md, issue 5 item 5), registered by name.

A task gives seeded, disjoint train/eval splits of `Problem`s, the grade of a response (a reward
with the reason for it), the tools its responses may call and, for the supervised warm start, a
demonstration: a complete, correct response in the tool format. `response_text` is always the
canonical text of the response alone (model text, and each tool result as `<result>...</result>`;
`appo.rollout.protocol`), without the prompt; `Task.parse` reads it in the task's `format`, the
tool protocol of the run (the trainer sets it; tags by default).
"""

from __future__ import annotations

import inspect
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Optional

from appo.registry import Registry
from appo.rollout.format import ANSWER_CLOSE, ANSWER_OPEN
from appo.rollout.protocol import TAGS, ParsedResponse, ToolProtocol, parse_response

__all__ = ["Grade", "ParsedResponse", "Problem", "SPLITS", "Task", "get_task", "parse_response",
           "register_task", "task_names"]

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict)  # task-specific, JSON-serialisable


@dataclass(frozen=True)
class Grade:
    """A reward and why: `reason` is short and shared by like responses ("correct", "wrong
    answer", "bad format: no <answer>"), so a step can say what its rollouts had in common;
    `detail` is free text (the answer that was read, say)."""

    reward: float
    reason: str
    detail: str = ""


class Task(ABC):
    """A source of problems with a verifiable reward. Subclasses set `name` and `tool_names` and
    implement `split` and `grade` (or only `reward`, then the reason is the reward's value)."""

    name: str = ""
    tool_names: tuple[str, ...] = ()  # the tools a response may call (the engine's stop tags)
    # what to do and how to write the answer, for a system prompt (the tool protocol adds how
    # to call the tools)
    instructions: str = ""
    format: ToolProtocol = TAGS  # how responses are read (`parse`); the trainer sets the run's

    @abstractmethod
    def split(self, name: str) -> list[Problem]:
        """The problems of split `name` ("train" or "eval"): the same for the same options and
        seed, and no prompt in both splits."""

    def grade(self, response_text: str, problem: Problem) -> Grade:
        """The verifiable reward of a response with its reason (see the task's documentation)."""
        if type(self).reward is Task.reward:
            raise NotImplementedError(f"task {self.name!r} implements neither grade() nor reward()")
        value = float(self.reward(response_text, problem))
        return Grade(value, f"reward {value:g}")

    def reward(self, response_text: str, problem: Problem) -> float:
        """The reward alone: `grade(...).reward`."""
        return self.grade(response_text, problem).reward

    def tools(self) -> dict:
        """The tools a response may call, by name: the registered ones by default."""
        from appo.rollout.tools import get_tool

        return {name: get_tool(name) for name in self.tool_names}

    def parse(self, response_text: str) -> ParsedResponse:
        """The response's calls and answer, or why its format is bad, in the task's `format`."""
        return self.format.parse(response_text, self.tool_names)

    def demonstration(self, problem: Problem, rng: random.Random) -> str:
        """A complete, correct response to `problem` in the tool format, tool results included
        exactly as the tools write them; `rng` picks among equally correct responses."""
        raise NotImplementedError(
            f"task {self.name!r} has no demonstrations, so it cannot be used for a warm start")

    def direct_answer(self, problem: Problem) -> str:
        """A response that states the answer at once, with no tool call: what a model writes when
        it answers from memory. The warm start mixes these in (`WarmStartConfig.direct_share`)."""
        return f"{ANSWER_OPEN}{problem.answer}{ANSWER_CLOSE}"

    @staticmethod
    def _check_split(name: str) -> None:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")


# --------------------------------------------------------------------------------------------------
# registry

TaskFactory = Callable[..., Task]
_TASKS = Registry("task", "a Task class or a factory")


def register_task(name: str, factory: Optional[TaskFactory] = None, *, replace: bool = False):
    """Register a task class (or any `factory(**options) -> Task`) under `name`; without
    `factory`, return a decorator that does. Returns `factory` unchanged."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"task name must be a non-empty string, got {name!r}")

    def add(task_factory: TaskFactory) -> TaskFactory:
        return _TASKS.add(name, task_factory, replace=replace)

    return add if factory is None else add(factory)


def get_task(name: str, **options) -> Task:
    """A new instance of task `name` built with `options` (e.g. `get_task("calc", seed=1)`)."""
    factory = _TASKS.get(name)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as e:
        raise ValueError(f"data.task_options of task {name!r}: {e}; its options: "
                         f"{inspect.signature(factory)}") from None
    return factory(**options)


def task_names() -> tuple[str, ...]:
    return _TASKS.names()
