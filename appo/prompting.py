"""Turning a task's prompt into the token ids a rollout starts from: one place, so that the warm
start, the rollouts and the trainer see identical prompts."""

from __future__ import annotations

from typing import Optional

PROMPT_END = "\n"  # for tokenizers without a chat template: the response starts on a new line


def encode_prompt(tokenizer, prompt: str, instructions: Optional[str] = None) -> list[int]:
    """Prompt ids: through the tokenizer's chat template when it has one (instructions as the
    system message), else `prompt + PROMPT_END` with the tokenizer's special tokens (the embedded
    character-level model, where every prompt character costs compute, gets no instructions)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        if instructions:
            messages.insert(0, {"role": "system", "content": instructions})
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True))
    return list(tokenizer(prompt + PROMPT_END).input_ids)
