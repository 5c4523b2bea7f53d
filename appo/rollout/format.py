"""The tags of appo's tool format (the ARPO/APPO text format; `appo.rollout.protocol` holds the
protocols built on them).

The model calls a tool by writing `<name>arguments</name>` for a registered tool name; generation
pauses at the closing tag, the tool runs, and `<result>text</result>` is appended as tool tokens
(mask 0). The final answer is written as `<answer>text</answer>`, which ends the sample.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_ANSWER_RE = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.S)


def tool_call_at_end(text: str, tool_names: Iterable[str]) -> Optional[tuple[str, str]]:
    """(tool name, arguments) when `text` ends with a complete call `<name>args</name>`."""
    for name in tool_names:
        close = f"</{name}>"
        if text.endswith(close):
            start = text.rfind(f"<{name}>", 0, len(text) - len(close))
            if start >= 0:
                return name, text[start + len(name) + 2:len(text) - len(close)]
    return None


_PROTOCOL_TAGS = (RESULT_OPEN, RESULT_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


def escape_protocol_tags(text: str, extra: Iterable[str] = ()) -> str:
    """`text` with the protocol's tags (and `extra` ones) written with square brackets."""
    for tag in (*_PROTOCOL_TAGS, *extra):
        text = text.replace(tag, "[" + tag[1:-1] + "]")
    return text


def format_tool_result(result: str) -> str:
    """`<result>text</result>`; protocol tags inside the tool's text are written with square
    brackets, so a tool's output can never close the result block or fake an answer."""
    return f"{RESULT_OPEN}{escape_protocol_tags(result)}{RESULT_CLOSE}"


def ends_answer(text: str) -> bool:
    return text.endswith(ANSWER_CLOSE)


def extract_answer(text: str) -> Optional[str]:
    """The text of the last `<answer>...</answer>`, or None when there is none."""
    found = _ANSWER_RE.findall(text)
    return found[-1].strip() if found else None
