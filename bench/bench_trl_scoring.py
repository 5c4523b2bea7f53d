"""TRL's scoring call with appo's head (bench/README.md): one `_get_per_token_logps_and_entropies`
call of GRPOTrainer as TRL makes it — `model(input_ids, attention_mask, labels, fused_lm_head=True)`
on P prompts × G completions, prompts left-padded, completions right-padded — forward (the old
and reference log-probs) and forward+backward (the loss), on a random Llama.

Providers, all in the same run, on copies of one model:
  trl            TRL's own head (`trl.trainer.utils.add_fused_lm_head`): the padded batch through
                 the model with sdpa, then its chunked log-softmax over the lm_head
  appo-padded    `add_appo_lm_head(tree=False)`: the same padded forward, statistics by
                 `linear_token_stats`
  appo-tree      `add_appo_lm_head()` (what `apply_appo_kernels_to_trl` installs): the call's rows
                 packed into one tree (each prompt once, no padding), tree attention,
                 `tree_linear_token_stats`

The work differs by design (that is the point of the tree): `extra_info` records the tokens each
provider's forward ran (`forward_tokens`) beside the time. Every provider's log-probs are checked
against TRL's on the scored tokens first (bf16: to 0.1; fp32: to 1e-4).
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
CPU_RATIOS = os.environ.get("APPO_BENCH_CPU_SHAPES", "0") not in ("", "0")
# (prompts, completions per prompt, prompt length, completion length, hidden, layers, vocab, dtype)
if ON_CUDA:  # a ~1B-parameter Llama at Qwen's vocabulary, GRPO's usual group of 8
    WORKLOADS = [(4, 8, 1024, 512, 2048, 16, 151936, torch.bfloat16)]
elif CPU_RATIOS:  # bench/README.md, CPU ratios
    WORKLOADS = [(2, 8, 384, 128, 256, 4, 32000, torch.float32)]
else:  # a smoke test
    WORKLOADS = [(2, 4, 48, 16, 64, 2, 512, torch.float32)]
MODES = ("fwd", "fwd_bwd")
PROVIDERS = ("trl", "appo-padded", "appo-tree")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
TEMPERATURE = 0.9


def trl_available() -> bool:
    if importlib.util.find_spec("trl") is None:
        return False
    from trl.trainer import utils

    return hasattr(utils, "add_fused_lm_head")


def grpo_call(prompts, group, prompt_len, completion_len, vocab, device, generator):
    """TRL's inputs for one scoring call: prompts of 3/4 to all of `prompt_len` tokens (left
    padding), completions of 1/2 to all of `completion_len` (right padding)."""
    width = prompt_len + completion_len
    ids = torch.zeros(prompts * group, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    row = 0
    for _ in range(prompts):
        n = int(torch.randint(3 * prompt_len // 4, prompt_len + 1, (), generator=generator))
        prompt = torch.randint(1, vocab, (n,), generator=generator)
        for _ in range(group):
            m = int(torch.randint(completion_len // 2, completion_len + 1, (),
                                  generator=generator))
            ids[row, prompt_len - n:prompt_len] = prompt
            ids[row, prompt_len:prompt_len + m] = torch.randint(1, vocab, (m,),
                                                               generator=generator)
            mask[row, prompt_len - n:prompt_len + m] = 1
            row += 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt_len] = -100
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": labels.to(device), "fused_lm_head": True}


def llama(hidden, layers, vocab, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 256), max_position_embeddings=8192,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


@pytest.fixture(scope="module")
def models(bench_device):
    """One random Llama per workload, and its copies with each provider's head."""
    from appo_kernels.integrations.trl import add_appo_lm_head
    from trl.trainer.utils import add_fused_lm_head

    built = {}
    for workload in WORKLOADS:
        *_, hidden, layers, vocab, dtype = workload
        base = llama(hidden, layers, vocab, dtype, bench_device)
        out = {}
        for provider in PROVIDERS:
            model = copy.deepcopy(base)
            if provider == "trl":
                add_fused_lm_head(model, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
            else:
                assert add_appo_lm_head(model, TEMPERATURE, outputs=("log_probs", "entropy"),
                                        tree=provider == "appo-tree")
            out[provider] = model
        built[workload] = out
        del base
    return built


def forward_tokens(provider, inputs) -> int:
    if provider != "appo-tree":
        return inputs["input_ids"].numel()
    from appo.forward import tree_size

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    return tree_size([row[m.bool()].tolist() for row, m in zip(ids, mask)])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: (
    f"P{w[0]}xG{w[1]}-Lp{w[2]}-Lc{w[3]}-H{w[4]}-L{w[5]}-V{w[6]}-{DTYPE_NAMES[w[7]]}"))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_trl_scoring(benchmark, measure, bench_device, models, provider, workload, mode):
    if not trl_available():
        pytest.skip("needs trl >= 1.16")
    prompts, group, prompt_len, completion_len, hidden, layers, vocab, dtype = workload
    model = models[workload][provider]
    inputs = grpo_call(prompts, group, prompt_len, completion_len, vocab, bench_device,
                       torch.Generator().manual_seed(0))
    scored = inputs["labels"][:, 1:] != -100
    with torch.no_grad():
        want = models[workload]["trl"](**inputs).log_probs[scored].float()
        got = model(**inputs).log_probs[scored].float()
    tolerance = 0.1 if dtype == torch.bfloat16 else 1e-4
    gap = float((got - want).abs().max())
    assert gap < tolerance, f"{provider}: log-probs {gap:.3g} from TRL's"
    model.train(mode == "fwd_bwd")
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        if mode == "fwd":
            with torch.no_grad():
                out = model(**inputs)
                return out.log_probs.sum() + out.entropy.sum()
        out = model(**inputs)
        return torch.autograd.grad(out.log_probs.sum() + out.entropy.sum(), params)

    measure(step, bytes_moved=sum(p.numel() * p.element_size() for p in params),
            op="trl_scoring", provider=provider, mode=mode, dtype=DTYPE_NAMES[dtype],
            shape=[prompts, group, prompt_len, completion_len, hidden, layers, vocab],
            forward_tokens=forward_tokens(provider, inputs),
            scored_tokens=int(scored.sum()), max_gap_vs_trl=gap)
