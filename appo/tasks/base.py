"""Tasks: problems with a verifiable reward (SPEC §3.4, issue 5 item 5), registered by name.

A task gives seeded, disjoint train/eval splits of `Problem`s, the reward of a response, the tools
its responses may call and, for the supervised warm start, a demonstration: a complete, correct
response in the tool format. `response_text` is always the decoded response alone (model text and
the `<result>` blocks the tool loop appended), without the prompt.
"""

from __future__ import annotations

import inspect
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from appo.registry import Registry
from appo.rollout.format import ANSWER_CLOSE, ANSWER_OPEN, RESULT_CLOSE, RESULT_OPEN, extract_answer

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict)  # task-specific, JSON-serialisable


class Task(ABC):
    """A source of problems with a verifiable reward. Subclasses set `name` and `tool_names`."""

    name: str = ""
    tool_names: tuple[str, ...] = ()  # the tools a response may call (the engine's stop tags)
    instructions: str = ""  # how to use the tools and the answer tag, for a system prompt

    @abstractmethod
    def split(self, name: str) -> list[Problem]:
        """The problems of split `name` ("train" or "eval"): the same for the same options and
        seed, and no prompt in both splits."""

    @abstractmethod
    def reward(self, response_text: str, problem: Problem) -> float:
        """The verifiable reward of a response (see the task's documentation)."""

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


@dataclass(frozen=True)
class ParsedResponse:
    answer: Optional[str]  # the stripped text of the answer tag; None when the format is bad
    calls: tuple[tuple[str, str, str], ...]  # (tool name, arguments, result text), in order
    error: Optional[str]  # why the format is bad; None when the response is well-formed


def parse_response(text: str, tool_names: Iterable[str]) -> ParsedResponse:
    """Check a response against the tool format and return its calls and answer.

    Protocol tags are `<t>`/`</t>` for the given tool names t, `<result>`/`</result>` and
    `<answer>`/`</answer>`; any other text (reasoning, a `<` in a formula) is free text. Reading
    left to right, a response is well-formed when:
    1. every tool call `<t>arguments</t>` is closed before any other protocol tag, and is followed
       immediately (nothing in between) by `<result>`; the result text is the tool's, not parsed,
       and runs to the first `</result>`;
    2. no other protocol tag appears outside those structures (no stray `<result>`, closing tag,
       or call to a tool the task does not use);
    3. there is exactly one `<answer>`, closed by `</answer>` before any other protocol tag, with
       non-empty text, and nothing but whitespace after `</answer>`.
    So a response cut off mid-call, a call whose result is missing (tool-call limit reached), a
    missing, empty, repeated or unclosed answer, and text after the answer are all bad format.
    """
    names = tuple(tool_names)
    protocol = (*names, RESULT_OPEN[1:-1], ANSWER_OPEN[1:-1])
    tag_re = re.compile(r"<(/?)(" + "|".join(map(re.escape, protocol)) + r")>")
    calls: list[tuple[str, str, str]] = []

    def bad(why: str) -> ParsedResponse:
        return ParsedResponse(None, tuple(calls), why)

    pos = 0
    while (tag := tag_re.search(text, pos)) is not None:
        closing, name = tag.group(1), tag.group(2)
        if closing:
            return bad(f"stray {tag.group(0)}")
        if tag.group(0) == RESULT_OPEN:
            return bad(f"{RESULT_OPEN} without a tool call before it")
        end = tag_re.search(text, tag.end())
        if end is None or end.group(0) != f"</{name}>":
            return bad(f"<{name}> not closed by </{name}>")
        if tag.group(0) == ANSWER_OPEN:
            if text[end.end():].strip():
                return bad(f"text after {ANSWER_CLOSE}")
            answer = extract_answer(text[tag.start():])  # tool results before it are opaque
            return ParsedResponse(answer, tuple(calls), None) if answer else bad("empty answer")
        if not text.startswith(RESULT_OPEN, end.end()):
            return bad(f"<{name}> call not followed by its {RESULT_OPEN}")
        result_start = end.end() + len(RESULT_OPEN)
        result_end = text.find(RESULT_CLOSE, result_start)
        if result_end < 0:
            return bad(f"{RESULT_OPEN} not closed")
        calls.append((name, text[tag.end():end.start()], text[result_start:result_end]))
        pos = result_end + len(RESULT_CLOSE)
    return bad(f"no {ANSWER_OPEN}")


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
        raise TypeError(f"task {name!r}: {e}; its options: {inspect.signature(factory)}") from None
    return factory(**options)


def task_names() -> tuple[str, ...]:
    return _TASKS.names()
