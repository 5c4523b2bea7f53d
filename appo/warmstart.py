"""Supervised warm start ("cold start", docs/training.md): a short fine-tune on task demonstrations
in the
tool format, so that RL starts from a policy that writes the protocol and can call the tools.
A share of the demonstrations (`direct_share`) answers at once without a tool, so the policy RL
starts from uses the tool only some of the time: learning when the tool pays is left to RL.

The loss covers the model's own tokens of each demonstration and its end-of-sequence token;
tool results (`<result>...</result>`) are masked out, as they are in rollouts.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import torch

from appo.rollout.format import RESULT_CLOSE, RESULT_OPEN
from appo.rollout.protocol import TagProtocol
from appo_kernels import token_stats

_RESULT_RE = re.compile(re.escape(RESULT_OPEN) + ".*?" + re.escape(RESULT_CLOSE), re.S)


@dataclass(frozen=True)
class WarmStartConfig:
    # with the default model and task: 1500 steps of 32 demonstrations, 60% of them answering
    # from memory, leave a policy that calls the calculator in about a third of its samples and
    # is right in about half of those (docs/training.md); RL's first lesson is to use the tool
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # share of demonstrations that answer at once without the tool (`Task.direct_answer`)
    direct_share: float = 0.6
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.direct_share <= 1.0:
            raise ValueError(f"direct_share must be in [0, 1], got {self.direct_share}")


def lr_factor(step: int, config: WarmStartConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `final_lr_ratio` x lr at the end."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.final_lr_ratio + (1 - config.final_lr_ratio) * cosine


def encode_demonstration(tokenizer, prompt_ids: list[int], response: str) -> tuple[list[int],
                                                                                   list[int]]:
    """(ids, loss_mask) of prompt + response + EOS; mask 1 on model-written response tokens and on
    EOS, 0 on the prompt and on tool results."""
    ids, mask = list(prompt_ids), [0] * len(prompt_ids)
    cursor = 0
    for match in list(_RESULT_RE.finditer(response)) + [None]:
        end = len(response) if match is None else match.start()
        pieces = [(response[cursor:end], 1)]
        if match is not None:
            pieces.append((match.group(0), 0))
            cursor = match.end()
        for text, is_model in pieces:
            if text:
                piece = tokenizer(text, add_special_tokens=False).input_ids
                ids += piece
                mask += [is_model] * len(piece)
    ids.append(tokenizer.eos_token_id)
    mask.append(1)
    return ids, mask


def accumulate_loss(model, examples, pad_id: int, max_ratio: float = 1.5) -> float:
    """Backpropagate the mean negative log-likelihood per loss token of `examples` ((ids,
    loss_mask) pairs) and return it. The examples run in parts of similar length (sorted; within
    a part the longest is at most `max_ratio` x the shortest), so that short answer-only
    demonstrations are not padded to the width of long tool-using ones; the gradient is the same
    as from one padded batch."""
    device = next(model.parameters()).device
    n_loss = max(1, sum(sum(mask[1:]) for _, mask in examples))
    parts = []
    for example in sorted(examples, key=lambda e: len(e[0])):
        if parts and len(example[0]) <= max_ratio * len(parts[-1][0][0]):
            parts[-1].append(example)
        else:
            parts.append([example])
    total = torch.zeros((), dtype=torch.float64, device=device)
    for part in parts:
        ids, loss_mask, attention = _batch(part, pad_id, device)
        logits = model(input_ids=ids, attention_mask=attention).logits
        # the logits at position t predict token t + 1
        stats = token_stats(logits[:, :-1], ids[:, 1:], mask=loss_mask[:, 1:])
        part_loss = -stats.logprob.sum() / n_loss
        part_loss.backward()
        total += part_loss.detach()
    return total.item()  # one host sync per batch, not per part


def _batch(examples, pad_id: int, device):
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (seq, mask) in enumerate(examples):
        ids[row, :len(seq)] = torch.tensor(seq)
        loss_mask[row, :len(seq)] = torch.tensor(mask, dtype=torch.bool)
        attention[row, :len(seq)] = 1
    return ids.to(device), loss_mask.to(device), attention.to(device)


def warm_start(model, tokenizer, task, config: WarmStartConfig = WarmStartConfig(), *,
               progress: bool = True) -> list[float]:
    """Fine-tune `model` in place on `config.steps` batches of demonstrations of `task`'s train
    split; returns the loss of every step (mean negative log-likelihood per loss token)."""
    problems = task.split("train")
    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
              else tokenizer.eos_token_id)
    protocol = TagProtocol(tokenizer)  # demonstrations are written in the tags format
    was_training = model.training
    model.train()
    losses = []
    bar = _progress(config.steps, progress)
    for _ in range(config.steps):
        examples = []
        for problem in rng.sample(problems, min(config.batch_size, len(problems))):
            prompt_ids = protocol.encode_prompt(problem.prompt)
            if config.direct_share > 0 and rng.random() < config.direct_share:
                response = task.direct_answer(problem)
            else:
                response = task.demonstration(problem, rng)
            examples.append(encode_demonstration(tokenizer, prompt_ids, response))
        optimizer.zero_grad(set_to_none=True)
        loss = accumulate_loss(model, examples, pad_id)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss)
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    if bar is not None:
        bar.close()
    model.train(was_training)
    return losses


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="warm start", unit="step")
