"""Tool-call protocols: how a model calls a tool, and how the result comes back (docs/training.md,
"Tool formats").

Two protocols, chosen by `actor_rollout_ref.rollout.tool_format` (`auto`: `chat` for a tokenizer
with a chat template, `tags` otherwise):

- `tags`: appo's own text format, which the embedded default model learns in its warm start. A
  call is `<name>argument</name>` for a tool `name`; generation pauses at the closing tag and the
  result is appended as `<result>text</result>`.
- `chat`: the format instruct models are trained on (Hermes / Qwen style). A call is
  `<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>`; generation
  pauses at `</tool_call>` and the result comes back as a `tool` turn rendered by the model's own
  chat template, followed by the template's opening of the next assistant turn. The prompt
  carries the tools' schemas through the template (`apply_chat_template(tools=...)`), or, for a
  template that ignores tools, as a description in the system message.

In both the final answer is `<answer>text</answer>`, which ends the sample. Protocol tags inside a
tool's result are written with square brackets, so a tool can never close its result or fake an
answer. What the tool loop appends is tool tokens (mask 0); what the model wrote, model tokens.

Rewards read a response as canonical text (`response_text`): the model's text with each tool
result as `<result>text</result>` (for `tags` the decoded tokens themselves; for `chat` the chat
template's turn markup around a result is replaced by the result tags), and `parse` checks that
text against the protocol: calls, results and one final answer.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from appo.registry import Registry

from .format import (ANSWER_CLOSE, ANSWER_OPEN, RESULT_CLOSE, RESULT_OPEN, escape_protocol_tags,
                     extract_answer, format_tool_result, tool_call_at_end)

PROMPT_END = "\n"  # tags without a chat template: the response starts on a new line
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
AUTO = "auto"


@dataclass(frozen=True)
class ToolCall:
    """A call the model completed: the tool's name and its one argument, or why it cannot run."""

    name: str
    argument: str
    error: Optional[str] = None  # set for a malformed call: the text that comes back as its result


@dataclass(frozen=True)
class ParsedResponse:
    answer: Optional[str]  # the stripped text of the answer tag; None when the format is bad
    calls: tuple[tuple[str, str, str], ...]  # (tool name, argument, result text), in order
    error: Optional[str]  # why the format is bad; None when the response is well-formed


class ToolProtocol(ABC):
    """One tool-call format for one tokenizer: prompts, pauses, calls, results and parsing."""

    name = ""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    # ---- prompts

    def encode_prompt(self, prompt: str, instructions: str = "",
                      tools: Sequence[str] = ()) -> list[int]:
        """Prompt ids: the tokenizer's chat template (system message: `instructions` and, where
        the protocol needs it, how to call `tools`; then the user's `prompt`; then the opening
        of the assistant turn), else `prompt + PROMPT_END` (the embedded character model, where
        every prompt character costs compute, gets no system message)."""
        tokenizer = self.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            return [int(t) for t in tokenizer(prompt + PROMPT_END).input_ids]
        system = "\n\n".join(t for t in (instructions, self.tool_instructions(tools)) if t)
        messages = [{"role": "user", "content": prompt}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        encoded = tokenizer.apply_chat_template(
            messages, tools=self.template_tools(tools), add_generation_prompt=True,
            tokenize=True, return_dict=True)
        # transformers 5 returns a BatchEncoding; its ids are ints (not the dict's keys)
        return [int(t) for t in encoded["input_ids"]]

    def tool_instructions(self, tools: Sequence[str]) -> str:
        """How to call `tools`, for the system message ("" when the template says it)."""
        return ""

    def template_tools(self, tools: Sequence[str]) -> Optional[list[dict]]:
        """The tools' schemas for `apply_chat_template(tools=...)`, or None."""
        return None

    # ---- the tool loop

    @abstractmethod
    def pause_texts(self, tools: Iterable[str]) -> list[str]:
        """Texts whose end may end a sample or complete a call: where generation pauses."""

    @abstractmethod
    def call_at_end(self, text: str, tools: Iterable[str]) -> Optional[ToolCall]:
        """The call that `text` (the model's text since the last tool result) completes, if any."""

    @abstractmethod
    def result_ids(self, result: str) -> list[int]:
        """The tool tokens that carry `result` back to the model."""

    @staticmethod
    def ends_answer(text: str) -> bool:
        return text.rstrip().endswith(ANSWER_CLOSE)

    # ---- rewards

    @abstractmethod
    def response_text(self, ids: Sequence[int], mask: Sequence[int]) -> str:
        """The canonical text of a response (see the module docstring)."""

    def parse(self, text: str, tools: Iterable[str]) -> ParsedResponse:
        """Check a canonical response text against the protocol (see `parse_response`)."""
        return parse_response(text, tools)

    def describe(self) -> dict:
        """What the format looks like, for config.yaml and rollouts.html."""
        return {"name": self.name}


class TagProtocol(ToolProtocol):
    """`<name>argument</name>` calls, `<result>text</result>` results."""

    name = "tags"

    def tool_instructions(self, tools):
        if not tools:
            return ""
        from .tools import tool_spec

        lines = [f"- <{t}>{tool_spec(t).parameter}</{t}>: {tool_spec(t).description}"
                 for t in tools]
        return ("You can call these tools by writing the call, after which you get its result "
                f"as {RESULT_OPEN}text{RESULT_CLOSE}:\n" + "\n".join(lines))

    def pause_texts(self, tools):
        return [f"</{name}>" for name in tools] + [ANSWER_CLOSE]

    def call_at_end(self, text, tools):
        found = tool_call_at_end(text.rstrip(), tools)
        return None if found is None else ToolCall(*found)

    def result_ids(self, result):
        # split_special_tokens: a result saying "<eos>" is text, not the end of the sample
        return self.tokenizer.encode(format_tool_result(result), add_special_tokens=False,
                                     split_special_tokens=True)

    def response_text(self, ids, mask):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def describe(self):
        return {"name": self.name, "call": "<name>argument</name>",
                "result": f"{RESULT_OPEN}text{RESULT_CLOSE}",
                "answer": f"{ANSWER_OPEN}text{ANSWER_CLOSE}"}


class ChatProtocol(ToolProtocol):
    """Hermes/Qwen-style JSON calls; results as `tool` turns of the model's chat template."""

    name = "chat"
    _ASSISTANT, _TOOL = "APPOASSISTANTTURN", "APPOTOOLRESULT"  # placeholders no template alters

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("actor_rollout_ref.rollout.tool_format=chat needs a tokenizer with "
                             "a chat template; this one has none (use tool_format=tags)")
        self.result_open, self.result_close = self._tool_turn()
        self._open_ids, self._close_ids = (tokenizer.encode(text, add_special_tokens=False)
                                           for text in (self.result_open, self.result_close))
        self._renders_tools: Optional[bool] = None

    def _render(self, messages, tools=None, generation_prompt=False) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _tool_turn(self) -> tuple[str, str]:
        """The template's text between the end of an assistant turn's content and a tool
        result, and between the result and the next assistant turn's content."""
        messages = [{"role": "system", "content": "system"}, {"role": "user", "content": "user"},
                    {"role": "assistant", "content": self._ASSISTANT},
                    {"role": "tool", "content": self._TOOL}]
        try:
            text = self._render(messages, generation_prompt=True)
        except Exception as e:
            raise ValueError(f"the chat template cannot render a tool message ({type(e).__name__}:"
                             f" {e}); use actor_rollout_ref.rollout.tool_format=tags") from None
        start, at = text.find(self._ASSISTANT), text.find(self._TOOL)
        if not 0 <= start < at:
            raise ValueError("the chat template drops the content of assistant or tool messages; "
                             "use actor_rollout_ref.rollout.tool_format=tags")
        return text[start + len(self._ASSISTANT):at], text[at + len(self._TOOL):]

    def renders_tools(self) -> bool:
        """Whether the template shows the tool schemas it is given (SmolLM2's does not)."""
        if self._renders_tools is None:
            from .tools import tool_schema

            messages = [{"role": "user", "content": "user"}]
            schema = [tool_schema("calculator")]
            self._renders_tools = self._render(messages, schema) != self._render(messages)
        return self._renders_tools

    def template_tools(self, tools):
        if not tools or not self.renders_tools():
            return None
        from .tools import tool_schema

        return [tool_schema(t) for t in tools]

    def tool_instructions(self, tools):
        if not tools or self.renders_tools():
            return ""
        from .tools import tool_schema, tool_spec

        schemas = "\n".join(json.dumps(tool_schema(t)["function"]) for t in tools)
        first = list(tools)[0]
        example = json.dumps({"name": first, "arguments": {tool_spec(first).parameter: "..."}})
        return (f"You can call these functions:\n{schemas}\nTo call one, write "
                f"{CALL_OPEN}{example}{CALL_CLOSE}; its result comes back in a tool message.")

    def pause_texts(self, tools):
        return ([CALL_CLOSE] if tools else []) + [ANSWER_CLOSE]

    def call_at_end(self, text, tools):
        text = text.rstrip()
        if not text.endswith(CALL_CLOSE):
            return None
        start = text.rfind(CALL_OPEN)
        if start < 0:
            return None  # a stray closing tag is text (and bad format for the reward)
        return read_call(text[start + len(CALL_OPEN):-len(CALL_CLOSE)], tools)

    def result_ids(self, result):
        encode = self.tokenizer.encode
        body = encode(escape_protocol_tags(result, extra=(CALL_OPEN, CALL_CLOSE)),
                      add_special_tokens=False, split_special_tokens=True)
        return self._open_ids + body + self._close_ids

    def response_text(self, ids, mask):
        decode, parts = self.tokenizer.decode, []
        for is_model, run in _runs(list(ids), list(mask)):
            if is_model:
                parts.append(decode(run, skip_special_tokens=True))
                continue
            body, closed = _strip(run, self._open_ids, self._close_ids)
            parts.append(RESULT_OPEN + decode(body) + (RESULT_CLOSE if closed else ""))
        return "".join(parts)

    def parse(self, text, tools):
        tools = tuple(tools)
        parsed = parse_response(text, ("tool_call",))
        calls = []
        for _, body, result in parsed.calls:
            call = read_call(body, tools)
            calls.append((call.name, call.argument, result))
        return ParsedResponse(parsed.answer, tuple(calls), parsed.error)

    def describe(self):
        return {"name": self.name,
                "call": f'{CALL_OPEN}{{"name": ..., "arguments": {{...}}}}{CALL_CLOSE}',
                "result": f"{self.result_open}text{self.result_close}",
                "answer": f"{ANSWER_OPEN}text{ANSWER_CLOSE}",
                "tools_in_template": self.renders_tools()}


def read_call(body: str, tools: Iterable[str]) -> ToolCall:
    """A JSON call `{"name": ..., "arguments": {...}}`: the tool and its one argument (the value
    of the only parameter, or of the tool's declared parameter), or the error the model gets."""
    tools = tuple(tools)
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall("", body, f"error: the tool call is not valid JSON ({e.msg})")
    name = call.get("name") if isinstance(call, dict) else None
    if not isinstance(name, str):
        return ToolCall("", body, 'error: a tool call must be {"name": ..., "arguments": {...}}')
    if name not in tools:
        return ToolCall(name, body, f"error: unknown tool {name!r} (tools: {', '.join(tools)})")
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return ToolCall(name, arguments)
    if isinstance(arguments, dict):
        from .tools import tool_names, tool_spec

        declared = tool_spec(name).parameter if name in tool_names() else None
        if declared in arguments:
            arguments = arguments[declared]
        elif len(arguments) == 1:
            arguments = next(iter(arguments.values()))
    if isinstance(arguments, (str, int, float)) and not isinstance(arguments, bool):
        return ToolCall(name, str(arguments))
    return ToolCall(name, body, f"error: {name} takes one string argument, got "
                                f"{json.dumps(arguments)[:200]}")


def _runs(ids: list[int], mask: list[int]):
    """(is model text, ids) for each run of equal mask."""
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or bool(mask[i]) != bool(mask[start]):
            yield bool(mask[start]), ids[start:i]
            start = i


def _strip(run: list[int], head: list[int], tail: list[int]) -> tuple[list[int], bool]:
    """`run` without the template markup around a result; whether its closing part is all there
    (a result cut at the length limit lacks it)."""
    k = 0
    while k < min(len(head), len(run)) and run[k] == head[k]:
        k += 1
    body = run[k:]
    closed = len(body) >= len(tail) and body[len(body) - len(tail):] == tail
    return (body[:len(body) - len(tail)] if closed else body), closed


def parse_response(text: str, tool_names: Iterable[str]) -> ParsedResponse:
    """Check a canonical response text against the tool format and return its calls and answer.

    Protocol tags are `<t>`/`</t>` for the given call tags t (the tool names in the tag format,
    `tool_call` in the chat format), `<result>`/`</result>` and `<answer>`/`</answer>`; any other
    text (reasoning, a `<` in a formula) is free text. Reading left to right, a response is
    well-formed when:
    1. every call `<t>arguments</t>` is closed before any other protocol tag, and is followed
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


PROTOCOLS = Registry("tool format", "a ToolProtocol class")
PROTOCOLS.add(TagProtocol.name, TagProtocol)
PROTOCOLS.add(ChatProtocol.name, ChatProtocol)
TAGS = TagProtocol()  # parsing only (no tokenizer): the default response format of tasks


def protocol_names() -> tuple[str, ...]:
    return (AUTO, *PROTOCOLS.names())


def make_protocol(name: str, tokenizer) -> ToolProtocol:
    """The protocol `name` for `tokenizer`; `auto`: chat when it has a chat template, else tags."""
    if name == AUTO:
        name = ChatProtocol.name if getattr(tokenizer, "chat_template", None) else TagProtocol.name
    try:
        cls = PROTOCOLS.get(name)
    except ValueError:
        raise ValueError(f"actor_rollout_ref.rollout.tool_format must be one of "
                         f"{protocol_names()}, got {name!r}") from None
    return cls(tokenizer)
