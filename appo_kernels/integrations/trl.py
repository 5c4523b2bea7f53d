"""appo's kernels inside TRL (1.16 and later): TRL's per-token log-probs and entropy computed by
`linear_token_stats` (docs/integration.md, TRL).

TRL's GRPO, RLOO and KTO trainers score completions through a *fused LM head*: they patch the
policy (and the reference) with `trl.trainer.utils.add_fused_lm_head`, then call
`model(..., labels=labels, fused_lm_head=True)` and read `log_probs` and `entropy` from the
`FusedCausalLMOutput` it returns. `add_appo_lm_head` keeps that contract and computes the fields
with `linear_token_stats` (the statistics straight from the last hidden states and the lm_head,
exact entropy over the whole vocabulary, no [tokens × V] logits). Where the model's attention
allows it, the rows of a call are first merged into one packed tree (`TreeLayout`, "appo_tree"
attention): a prompt shared by its G completions, and the padding, are computed once.
`apply_appo_kernels_to_trl` installs it:

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

from appo_kernels.integrations.transformers import enable_tree_or_sdpa, tree_call
from appo_kernels.token_stats.linear import linear_token_stats
from appo_kernels.tree import TreeLayout, tree_linear_token_stats

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
                     outputs: tuple[str, ...] = ("log_probs",), *, tree: bool = True) -> bool:
    """TRL's `add_fused_lm_head(model, temperature, cast_lm_head_to_fp32, outputs)`, computed by
    appo. Returns True where appo's head was installed, False where TRL's was (with a warning).

    `tree`: run a call's rows as one packed tree where that is exact — a model that runs sdpa
    (it is switched to `TREE_OR_SDPA` for good: every call without a layout still runs sdpa),
    a call that passes only `input_ids` and `attention_mask`, each row's tokens contiguous
    (left- and right-padding) and positions not passed (the tree numbers each row from 0;
    rotary attention depends only on relative positions, so the values equal the padded
    forward's to rounding). Other calls run the rows padded, as TRL does.
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
    # tree attention on the calls that pass a layout, the model's sdpa on all others
    tree = tree and enable_tree_or_sdpa(model)

    @functools.wraps(type(model).forward)  # generate() checks its kwargs against the signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            passed = {"labels": labels, "shift_labels": shift_labels,
                      "num_items_in_batch": num_items_in_batch}
            return previous(*args, **kwargs, **{k: v for k, v in passed.items() if v is not None})
        kwargs["use_cache"] = False
        rows = _tree_rows(self, args, kwargs, labels, shift_labels) if tree else None
        if rows is not None:
            return _tree_scored(self, *rows, labels, temperature, cast_lm_head_to_fp32,
                                want_entropy, num_items_in_batch, utils.FusedCausalLMOutput)
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


def _head(head, hidden, in_fp32):
    """(weight, bias, dtype, autocast-off context) for the statistics of `hidden` under `head`:
    the dtype `hidden @ weight.T` would run in (float32 with `cast_lm_head_to_fp32`)."""
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):  # an FSDP2-sharded head (a DTensor): gathered once
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    device = weight.device.type
    if in_fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = hidden.dtype
    off = torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) \
        else nullcontext()
    return weight.to(dtype), None if bias is None else bias.to(dtype), dtype, off


def _scored(head, hidden, labels, temperature, in_fp32, want_entropy, num_items, output_type):
    weight, bias, dtype, off = _head(head, hidden, in_fp32)
    hidden, labels = hidden.to(weight.device), labels.to(weight.device)
    mask = labels != -100
    with off:
        stats = linear_token_stats(hidden.to(dtype), weight, labels.clamp(min=0), bias=bias,
                                   temperature=temperature, mask=mask)
    count = mask.sum().clamp(min=1) if num_items is None else num_items
    return output_type(loss=-stats.logprob.sum() / count, log_probs=stats.logprob,
                       entropy=stats.entropy if want_entropy else None, label_mask=mask)


def _tree_rows(model, args, kwargs, labels, shift_labels):
    """(input_ids, start, length) per row when this call can run as one packed tree, else None:
    only input_ids and attention_mask passed, labels (unshifted) given, each row's tokens one
    contiguous run, every label the row's own token (not its first), no attention dropout in
    training."""
    passed = {k: v for k, v in kwargs.items() if v is not None and k != "use_cache"}
    if args or set(passed) - {"input_ids", "attention_mask"} or "input_ids" not in passed:
        return None
    if labels is None or shift_labels is not None or model.training and _dropout(model):
        return None
    ids = passed["input_ids"]
    mask = passed.get("attention_mask")
    if ids.dim() != 2 or labels.shape != ids.shape:
        return None
    mask = torch.ones_like(ids) if mask is None else mask
    if mask.shape != ids.shape:
        return None
    real = mask != 0
    length = real.sum(1)
    start = real.int().argmax(1)
    # contiguous: the real tokens fill [start, start + length) of every row
    columns = torch.arange(ids.shape[1], device=ids.device)
    run = (columns >= start[:, None]) & (columns < (start + length)[:, None])
    if not bool((run == real).all()) or not bool((length > 0).all()):
        return None
    # every scored label is the row's own next token, after the row's first token
    scored = labels != -100
    after_first = columns[None, :] > start[:, None]
    if bool((scored & ~(run & after_first)).any()) or bool((scored & (labels != ids)).any()):
        return None
    return ids, start, length


def _dropout(model) -> bool:
    config = model.config.get_text_config()
    return any(float(getattr(config, key, 0) or 0) > 0
               for key in ("attention_dropout", "attn_pdrop"))


def _tree_scored(model, ids, start, length, labels, temperature, in_fp32, want_entropy,
                 num_items, output_type):
    """FusedCausalLMOutput of the padded call from one tree-packed forward: the rows become a
    trie (`TreeLayout.from_sequences`), each scored token's statistics are taken at its tree
    row and scattered back to [rows, T - 1], zero where labels are -100, as TRL's head gives."""
    rows, width = ids.shape
    starts, lengths = start.tolist(), length.tolist()
    seqs = [ids[b, s:s + n].tolist() for b, (s, n) in enumerate(zip(starts, lengths))]
    layout, token_ids, paths = TreeLayout.from_sequences(seqs)
    device = ids.device
    layout, token_ids = layout.to(device), token_ids.to(device)
    targets = labels[:, 1:]  # target [b, t] is token t + 1 of the padded row
    label_mask = targets != -100
    # the scored (row, column) pairs and the tree rows that predict them
    b_idx, t_idx = label_mask.nonzero(as_tuple=True)
    # the target's index within its sequence, into the rows' paths laid end to end
    firsts = torch.nn.functional.pad(length.cumsum(0), (1, 0))[:-1]
    tree_rows = torch.cat(paths).to(device)[firsts[b_idx] + t_idx + 1 - start[b_idx]]
    scored = torch.zeros(layout.n_tokens, dtype=torch.bool, device=device)
    scored[tree_rows] = True
    with tree_call():
        hidden = model.base_model(input_ids=token_ids[None], position_ids=layout.depth[None],
                                  appo_tree=layout, use_cache=False).last_hidden_state[0]
    weight, bias, dtype, off = _head(model.get_output_embeddings(), hidden, in_fp32)
    with off:
        stats = tree_linear_token_stats(hidden.to(dtype), weight, bias, layout, token_ids,
                                        temperature=temperature, mask=scored)
    logprob = stats.logprob.new_zeros(rows, width - 1)
    logprob = logprob.index_put((b_idx, t_idx), stats.logprob[tree_rows])
    entropy = None
    if want_entropy:
        entropy = stats.entropy.new_zeros(rows, width - 1).index_put(
            (b_idx, t_idx), stats.entropy[tree_rows])
    count = label_mask.sum().clamp(min=1) if num_items is None else num_items
    return output_type(loss=-logprob.sum() / count, log_probs=logprob, entropy=entropy,
                       label_mask=label_mask)


def apply_appo_kernels_to_trl(trainer_or_class=None, *, tree: bool = True) -> None:
    """Make TRL's trainers score with appo's kernels.

    With no argument or a trainer class: trainers built afterwards patch their policy and
    reference with `add_appo_lm_head` instead of TRL's head. With a trainer that already exists:
    its policy (the base model under PEFT) and its reference are patched now, with the
    temperature the trainer scores at. `tree`: tree-pack each scoring call where that is exact
    (`add_appo_lm_head`).
    """
    import importlib

    _trl_utils()
    if trainer_or_class is None or isinstance(trainer_or_class, type):
        for name in TRAINER_MODULES:
            module = importlib.import_module(f"trl.trainer.{name}")
            if hasattr(module, "add_fused_lm_head"):
                module.add_fused_lm_head = functools.partial(add_appo_lm_head, tree=tree)
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
    add_appo_lm_head(model, temperature, in_fp32, outputs=SUPPORTED_OUTPUTS, tree=tree)
    if getattr(trainer, "ref_model", None) is not None:
        add_appo_lm_head(trainer.ref_model, temperature, in_fp32, tree=tree)
