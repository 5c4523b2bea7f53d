"""Tasks with verifiable rewards, registered by name.

    get_task("calc")                                  # the default task
    get_task("jsonl", path="rows.jsonl", reward_fn="my_module:score")
"""

from .base import (SPLITS, ParsedResponse, Problem, Task, get_task, parse_response, register_task,
                   task_names)
from .calc import CalcTask
from .jsonl import JsonlTask, exact_match_reward

__all__ = ["SPLITS", "CalcTask", "JsonlTask", "ParsedResponse", "Problem", "Task",
           "exact_match_reward", "get_task", "parse_response", "register_task", "task_names"]
