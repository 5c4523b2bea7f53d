"""A tiny chat model for the `chat` tool protocol: a character tokenizer with a ChatML chat
template (as SmolLM2's: `<|im_start|>role\\n...<|im_end|>\\n`, EOS `<|im_end|>`), the
`<tool_call>` markers as tokens, and a scripted Llama (tests/scripted_model.py) that answers each
assistant turn with a JSON tool call or with `ab...` text:

    <|im_start|>assistant\\n  ->  <tool_call>{"name": "e", "arguments": {"input": "ab"}}</tool_call>
                              or  abab...<|im_end|>

The whole JSON call is one token, so a bigram script can write it; the tool loop still reads it as
text. Built locally, nothing downloaded.
"""

from appo.models import char_tokenizer
from scripted_model import TOOL, scripted_llama

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CALL_JSON = '{"name": "%s", "arguments": {"input": "ab"}}' % TOOL
CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{'<|im_start|>assistant\\n'}}{% endif %}")
# the same, but the tools' schemas go into a system turn of their own (as Qwen's templates do)
CHATML_TOOLS = ("{% if tools %}{{'<|im_start|>system\\n# Tools\\n'}}{% for t in tools %}"
                "{{ t | tojson }}{{'\\n'}}{% endfor %}{{'<|im_end|>\\n'}}{% endif %}" + CHATML)
SCRIPT = {"\n": {"<tool_call>": 7.5, "a": 7.0}, "<tool_call>": {CALL_JSON: 8.0},
          CALL_JSON: {"</tool_call>": 8.0}, "a": {"b": 8.0}, "b": {IM_END: 4.0, "a": 4.0}}


def chat_tokenizer(template: str = CHATML):
    tok = char_tokenizer(tags=False)
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tok.add_tokens(["<tool_call>", "</tool_call>", CALL_JSON])
    tok.eos_token = IM_END
    tok.chat_template = template
    return tok


def chat_llama(tokenizer, **kwargs):
    return scripted_llama(script=SCRIPT, vocab=tokenizer.get_vocab(), **kwargs)
