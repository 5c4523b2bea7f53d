"""Tasks with verifiable rewards, registered by name.

    get_task("calc")                                  # the default task
    get_task("jsonl", path="rows.jsonl", reward_fn="numeric")
    get_task("jsonl", path="rows.jsonl", reward_fn="my_module:score")
"""

from .base import (SPLITS, Grade, ParsedResponse, Problem, Task, get_task, parse_response,
                   register_task, task_names)
from .calc import CalcTask
from .jsonl import JsonlTask
from .rewards import REWARDS, read_number, register_reward

__all__ = ["SPLITS", "CalcTask", "Grade", "JsonlTask", "ParsedResponse", "Problem", "REWARDS",
           "Task", "get_task", "parse_response", "read_number", "register_reward",
           "register_task", "task_names"]
