"""appo's kernels inside TRL (1.16 and later): TRL's per-token log-probs and entropy computed by
`linear_token_stats` (docs/integration.md, TRL).

TRL's GRPO, RLOO and KTO trainers score completions through a *fused LM head*: they patch the
policy (and the reference) with `trl.trainer.utils.add_fused_lm_head`, then call
`model(..., labels=labels, fused_lm_head=True)` and read `log_probs` and `entropy` from the
`FusedCausalLMOutput` it returns. `add_appo_lm_head` keeps that contract and computes the fields
with `linear_token_stats` (the statistics straight from the last hidden states and the lm_head,
exact entropy over the whole vocabulary, no [tokens × V] logits). `apply_appo_kernels_to_trl`
installs it:

    from appo_kernels.integrations.trl import apply_appo_kernels_to_trl
    apply_appo_kernels_to_trl()            # every trainer built from now on
    trainer = GRPOTrainer(...)
    # or, on a trainer already built:  apply_appo_kernels_to_trl(trainer)

What appo does not compute keeps TRL's own head, with a warning that says why: the fields
`log_sum_sq_probs`, `mean_logits` and `is_top1`, models that soft-cap or rescale their logits
(`final_logit_softcapping`, `logit_scale` and the like), and MoE models that return a router loss.
"""

from __future__ import annotations

import functools
import types
import warnings
from contextlib import nullcontext

import torch

from appo_kernels.token_stats.linear import linear_token_stats

SUPPORTED_OUTPUTS = ("log_probs", "entropy")
# config keys of models whose logits are not the lm_head's output as it stands
RESCALING_KEYS = ("final_logit_softcapping", "logit_scale", "output_multiplier",
                  "lm_head_multiplier", "logits_scaling")
TRAINER_MODULES = ("grpo_trainer", "rloo_trainer", "kto_trainer")


def _trl_utils():
    try:
        from trl.trainer import utils
    except ImportError as err:  # pragma: no cover - only without trl
        raise ImportError("appo_kernels.integrations.trl needs trl (pip install 'trl>=1.16')") \
            from err
    if not hasattr(utils, "add_fused_lm_head"):
        import trl

        raise ImportError(f"trl {trl.__version__} has no fused LM head (add_fused_lm_head): "
                          f"appo plugs into it from trl 1.16 on")
    return utils


def _why_not(model, outputs) -> str | None:
    """Why appo cannot stand in for TRL's head on this model, or None."""
    extra = [name for name in outputs if name not in SUPPORTED_OUTPUTS]
    if extra:
        return f"outputs {extra} are not computed by appo"
    config = model.config.get_text_config()
    for key in RESCALING_KEYS:
        value = getattr(config, key, None)
        if value is not None and value != 1.0:
            return f"the model's config sets {key}={value} (its logits are not the lm_head's)"
    if getattr(config, "output_router_logits", False):
        return "the model returns a router (MoE) loss"
    return None


def add_appo_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                     outputs: tuple[str, ...] = ("log_probs",)) -> bool:
    """TRL's `add_fused_lm_head(model, temperature, cast_lm_head_to_fp32, outputs)`, computed by
    appo. Returns True where appo's head was installed, False where TRL's was (with a warning).

    The model's other calls are untouched: without `fused_lm_head=True` its forward runs as before.
    """
    utils = _trl_utils()
    reason = _why_not(model, outputs)
    if reason is not None:
        warnings.warn(f"appo: TRL's own fused LM head kept for {type(model).__name__}: {reason}",
                      stacklevel=2)
        utils.add_fused_lm_head(model, temperature=temperature,
                                cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=outputs)
        return False
    previous = model.forward  # what every other call keeps running
    want_entropy = "entropy" in outputs

    @functools.wraps(type(model).forward)  # generate() checks its kwargs against the signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            passed = {"labels": labels, "shift_labels": shift_labels,
                      "num_items_in_batch": num_items_in_batch}
            return previous(*args, **kwargs, **{k: v for k, v in passed.items() if v is not None})
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state  # looked up per call (FSDP)
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        return _scored(self.get_output_embeddings(), hidden, labels, temperature,
                       cast_lm_head_to_fp32, want_entropy, num_items_in_batch,
                       utils.FusedCausalLMOutput)

    model.forward = types.MethodType(forward, model)
    return True


def _scored(head, hidden, labels, temperature, in_fp32, want_entropy, num_items, output_type):
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):  # an FSDP2-sharded head (a DTensor): gathered once
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    hidden, labels = hidden.to(weight.device), labels.to(weight.device)
    device = weight.device.type
    if in_fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(device):  # what `hidden @ weight.T` would run in
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = hidden.dtype
    mask = labels != -100
    off = torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) \
        else nullcontext()
    with off:
        stats = linear_token_stats(hidden.to(dtype), weight.to(dtype), labels.clamp(min=0),
                                   bias=None if bias is None else bias.to(dtype),
                                   temperature=temperature, mask=mask)
    count = mask.sum().clamp(min=1) if num_items is None else num_items
    return output_type(loss=-stats.logprob.sum() / count, log_probs=stats.logprob,
                       entropy=stats.entropy if want_entropy else None, label_mask=mask)


def apply_appo_kernels_to_trl(trainer_or_class=None) -> None:
    """Make TRL's trainers score with appo's kernels.

    With no argument or a trainer class: trainers built afterwards patch their policy and
    reference with `add_appo_lm_head` instead of TRL's head. With a trainer that already exists:
    its policy (the base model under PEFT) and its reference are patched now, with the
    temperature the trainer scores at.
    """
    import importlib

    _trl_utils()
    if trainer_or_class is None or isinstance(trainer_or_class, type):
        for name in TRAINER_MODULES:
            module = importlib.import_module(f"trl.trainer.{name}")
            if hasattr(module, "add_fused_lm_head"):
                module.add_fused_lm_head = add_appo_lm_head
        return
    trainer = trainer_or_class
    if not hasattr(trainer, "model"):
        raise TypeError(f"trainer_or_class must be a TRL trainer or trainer class, got "
                        f"{type(trainer).__name__}")
    temperature = float(getattr(trainer, "temperature", 1.0))
    in_fp32 = bool(getattr(trainer.args, "cast_lm_head_to_fp32", False))
    model = trainer.model
    if callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    add_appo_lm_head(model, temperature, in_fp32, outputs=SUPPORTED_OUTPUTS)
    if getattr(trainer, "ref_model", None) is not None:
        add_appo_lm_head(trainer.ref_model, temperature, in_fp32)
