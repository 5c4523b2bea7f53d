"""appo inside verl (0.9 and later): an advantage estimator and a policy loss registered in verl's
registries, and verl's log-prob and entropy helpers computed by `token_stats`
(docs/integration.md, verl).

    from appo_kernels.integrations.verl import register
    register()   # then algorithm.adv_estimator=appo, actor_rollout_ref.actor.policy_loss.loss_mode=appo

- **Estimator `appo`**: GRPO group advantages within each `uid`, with verl's own conventions by
  default (the unbiased std, a lone response in its group divided by 1 + ε, as verl's GRPO
  does), so that it equals verl's `grpo` on verl's data. Where the batch carries branch metadata
  (`non_tensor_batch` keys `appo_branch_parent`: the row a branch forked from, −1 for an initial
  rollout; `appo_branch_position`: the response position where it starts), it computes APPO's
  dual-group advantages: initial rollouts against their group, branches against theirs, and
  each rollout's tokens get the mean branch advantage of the branches that left it at or after
  them (`procedure_advantages`); branch rows get 0 (they lend credit, as in appo's trainer).
  verl 0.9 hands custom estimators only rewards, mask, `uid` and config, so its stock trainer
  never passes branches: that needs a trainer that forks rollouts.
- **Policy loss `appo`**: appo's `policy_loss` (clip-higher, dual clip, optionally the filter
  of sequences hit twice by the dual clip and APPO's future-KL scaling of the advantages), with
  verl's aggregation over the global batch (`config.global_batch_info`: the global token or
  sequence count, times the data-parallel size). With `future_kl=False, seq_filter=False` it
  equals verl's `vanilla` loss to rounding, in every `loss_agg_mode`.
- **Helpers**: `verl.utils.torch_functional.logprobs_from_logits`, `entropy_from_logits` and
  `entropy_from_logits_with_chunking` (and the modules that imported them by name) computed by
  `token_stats`: float32 statistics, exact entropy over the vocabulary, one pass.
- **Fused kernels** (`actor_rollout_ref.model.use_fused_kernels=True`): verl's model forward
  then takes log-probs and entropy from the last hidden states and the lm_head weight, through
  `FusedLinearForPPO` (`fused_kernel_options.impl_backend` torch or liger) or the Triton
  `linear_cross_entropy`; both become `linear_token_stats` (float32 log-probs and entropy, no
  [tokens × V] logits). verl imports both inside its forward functions, so patching their
  defining modules reaches every model; the Megatron modules that bind `linear_cross_entropy`
  at import are patched where they import.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from appo_kernels.advantages import group_advantages, procedure_advantages
from appo_kernels.losses import policy_loss
from appo_kernels.scan import future_kl_scale
from appo_kernels.token_stats import token_stats
from appo_kernels.token_stats.linear import linear_token_stats

NAME = "appo"
# verl modules that bind the helpers by name at import time (patched where they import)
HELPER_MODULES = ("verl.utils.torch_functional", "verl.workers.engine.fsdp.transformer_impl",
                  "verl.workers.engine.utils")
HELPERS = ("logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking")
# where verl defines (or binds at import) its fused linear log-prob/entropy kernels
FUSED_MODULES = {"verl.utils.experimental.torch_functional": "FusedLinearForPPO",
                 "verl.utils.kernel.linear_cross_entropy": "linear_cross_entropy",
                 "verl.models.mcore.model_forward_fused": "linear_cross_entropy",
                 "verl.models.mcore.model_forward_1f1b_overlap": "linear_cross_entropy"}


def _core_algos():
    try:
        return importlib.import_module("verl.trainer.ppo.core_algos")
    except ImportError as err:
        raise ImportError("appo_kernels.integrations.verl needs verl (pip install 'verl>=0.9'); "
                          f"importing verl.trainer.ppo.core_algos failed: {err}") from err


def _option(config, key, default):
    if config is None:
        return default
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


# ------------------------------------------------------------------------------------------------
# the advantage estimator


def appo_advantage(token_level_rewards: Tensor, response_mask: Tensor, index=None,
                   config=None, epsilon: float = 1e-6, norm_adv_by_std_in_grpo: Optional[bool] = None,
                   non_tensor_batch: Optional[dict] = None, verl_std: bool = True,
                   **_unused) -> tuple[Tensor, Tensor]:
    """verl's advantage-estimator signature: (advantages, returns), both `[B, L]`."""
    if index is None:
        raise ValueError("appo advantage estimator: index (verl's `uid`, the prompt of each "
                         "response) is required")
    normalize = bool(_option(config, "norm_adv_by_std_in_grpo", True)
                     if norm_adv_by_std_in_grpo is None else norm_adv_by_std_in_grpo)
    scores = token_level_rewards.sum(-1)
    groups = torch.as_tensor(np.unique(np.asarray(index), return_inverse=True)[1],
                             device=scores.device).reshape(-1)
    extra = non_tensor_batch or {}
    if "appo_branch_parent" in extra:
        advantages = _dual_group(scores, groups, response_mask, extra, epsilon, normalize,
                                 verl_std)
    else:
        seq = _group(scores, groups, epsilon, normalize, verl_std)
        advantages = seq[:, None] * response_mask
    advantages = advantages.to(token_level_rewards.dtype)
    return advantages, advantages


def _group(scores, groups, epsilon, normalize, verl_std):
    adv = group_advantages(scores.float(), groups, eps=epsilon, normalize_std=normalize,
                           unbiased=verl_std)
    if verl_std:  # verl: a lone response has mean 0 and std 1
        lone = torch.bincount(groups, minlength=int(groups.max()) + 1)[groups] == 1
        adv = torch.where(lone, scores.float() / (1 + epsilon if normalize else 1), adv)
    return adv


def _dual_group(scores, groups, response_mask, extra, epsilon, normalize, verl_std):
    parent = torch.as_tensor(np.asarray(extra["appo_branch_parent"], dtype=np.int64),
                             device=scores.device)
    position = torch.as_tensor(np.asarray(extra["appo_branch_position"], dtype=np.int64),
                               device=scores.device)
    initial = (parent < 0).nonzero().squeeze(1)
    branch = (parent >= 0).nonzero().squeeze(1)
    if bool((parent[branch] >= len(parent)).any()) or bool((parent[parent[branch]] >= 0).any()):
        raise ValueError("appo_branch_parent must name an initial rollout's row (or −1)")
    width = response_mask.shape[1]
    seq_adv = _group(scores[initial], groups[initial], epsilon, normalize, verl_std)
    branch_adv = _group(scores[branch], groups[branch], epsilon, normalize, verl_std)
    row_of = torch.full_like(parent, -1)
    row_of[initial] = torch.arange(len(initial), device=scores.device)
    cu = torch.arange(len(initial) + 1, device=scores.device) * width
    adv_tok = procedure_advantages(seq_adv, cu, row_of[parent[branch]], position[branch],
                                   branch_adv, n_tokens=len(initial) * width)
    out = torch.zeros(response_mask.shape, dtype=torch.float32, device=scores.device)
    out[initial] = adv_tok.view(len(initial), width)
    return out * response_mask


# ------------------------------------------------------------------------------------------------
# the policy loss


def make_policy_loss(*, future_kl: bool = True, seq_filter: bool = True, gamma: float = 2 ** (-1 / 64),
                     weight: float = 1.0, clip: float = 0.2):
    """verl's policy-loss signature over appo's `policy_loss` (see the module doc)."""

    def appo_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                         response_mask: Tensor, loss_agg_mode: str = "token-mean",
                         config: Any = None, rollout_is_weights: Optional[Tensor] = None
                         ) -> tuple[Tensor, dict[str, Any]]:
        batch, width = log_prob.shape
        mask = response_mask.bool().reshape(-1)
        cu = torch.arange(batch + 1, device=log_prob.device) * width  # every padded row a sequence
        lp, old = log_prob.reshape(-1), old_log_prob.reshape(-1)
        adv = advantages.reshape(-1)
        if future_kl:
            adv = future_kl_scale(adv, lp.detach(), old, cu, mask, gamma=gamma, weight=weight,
                                  clip=clip, clip_c=float(_option(config, "clip_ratio_c", 3.0)))
        if rollout_is_weights is not None:  # the loss is positively homogeneous in A
            adv = adv * rollout_is_weights.reshape(-1)
        clip_ratio = _option(config, "clip_ratio", 0.2)
        info = dict(_option(config, "global_batch_info", {}) or {})
        dp_size = int(info.get("dp_size") or 1)
        denominator = (info.get("batch_num_tokens") if loss_agg_mode == "token-mean"
                       else info.get("global_batch_size") if loss_agg_mode.startswith("seq-mean")
                       else None)
        if denominator is None and dp_size > 1 and loss_agg_mode != "token-sum":
            raise ValueError(f"appo policy loss: global_batch_info must give the global count for "
                             f"loss_agg_mode={loss_agg_mode!r} when dp_size > 1")
        if denominator is None and loss_agg_mode.startswith("seq-mean"):
            # verl's count on one rank leaves fully masked rows out
            denominator = (response_mask.sum(-1) > 0).sum().clamp_min(1)
        loss, metrics = policy_loss(
            lp, old, adv, mask, clip_low=_option(config, "clip_ratio_low", clip_ratio),
            clip_high=_option(config, "clip_ratio_high", clip_ratio),
            clip_c=float(_option(config, "clip_ratio_c", 3.0)), agg=loss_agg_mode,
            seq_filter=seq_filter, cu_seqlens=cu,
            loss_scale_factor=info.get("loss_scale_factor") or float(width),
            denominator=None if denominator is None else float(denominator))
        return loss * dp_size, {"actor/pg_clipfrac": metrics["clip_frac"].item(),
                                "actor/ppo_kl": metrics["approx_kl"].item(),
                                "actor/pg_clipfrac_lower": metrics["dual_clip_frac"].item(),
                                "actor/appo_dropped_seqs": metrics["dropped_seqs"].item()}

    return appo_policy_loss


# ------------------------------------------------------------------------------------------------
# the helpers


def logprobs_from_logits(logits: Tensor, labels: Tensor, inplace_backward: bool = True) -> Tensor:
    return token_stats(logits, labels).logprob


def entropy_from_logits(logits: Tensor) -> Tensor:
    return token_stats(logits).entropy


def entropy_from_logits_with_chunking(logits: Tensor, chunk_size: int = 2048) -> Tensor:
    return token_stats(logits).entropy  # token_stats bounds its own working memory


def patch_helpers() -> list[str]:
    """verl's log-prob and entropy helpers → appo's, in every module of HELPER_MODULES that
    imports here; returns the `module.name`s patched."""
    ours = {name: globals()[name] for name in HELPERS}
    patched = []
    for module_name in HELPER_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # an engine whose own dependencies are missing here: not in use
            continue
        for name, fn in ours.items():
            if hasattr(module, name):
                setattr(module, name, fn)
                patched.append(f"{module_name}.{name}")
    return patched


class FusedLinearForPPO(torch.nn.Module):
    """verl's `FusedLinearForPPO` module: (log_probs, entropy) of `input_ids` (already shifted)
    under softmax(hidden_states @ vocab_weights.T / temperature), shaped like `input_ids`, both
    float32. `chunk_size` and `impl_backend` are accepted for verl's constructor call and unused
    (`linear_token_stats` picks its own tiles)."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        self.chunk_size, self.impl_backend = chunk_size, impl_backend

    def forward(self, hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor,
                temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        stats = linear_token_stats(hidden_states, vocab_weights, input_ids.long(),
                                   temperature=float(temperature))
        return stats.logprob, stats.entropy


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor,
                         temperature: float = 1.0, reduction: str = "none",
                         dist_process_group=None) -> tuple[Tensor, Tensor]:
    """verl's Triton `linear_cross_entropy`: flat (log_probs, entropy) of `labels`, float32.
    Only what verl's model forwards call: `reduction="none"`, a vocabulary on one rank."""
    if reduction != "none":
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r}; appo's replacement "
                         f"returns per-token values only (reduction='none')")
    if dist_process_group is not None:
        raise NotImplementedError("linear_cross_entropy: a vocabulary split over a tensor-"
                                  "parallel group is not supported by appo's replacement; "
                                  "register(fused=False) keeps verl's kernel")
    stats = linear_token_stats(hidden.reshape(-1, hidden.shape[-1]), weight,
                               labels.reshape(-1).long(), temperature=float(temperature))
    return stats.logprob, stats.entropy


def patch_fused() -> list[str]:
    """verl's fused linear log-prob/entropy kernels → `linear_token_stats`, in every module of
    FUSED_MODULES that imports here; returns the `module.name`s patched."""
    ours = {"FusedLinearForPPO": FusedLinearForPPO, "linear_cross_entropy": linear_cross_entropy}
    patched = []
    for module_name, name in FUSED_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except Exception:  # Megatron and other engines whose dependencies are missing here
            continue
        if hasattr(module, name):
            setattr(module, name, ours[name])
            patched.append(f"{module_name}.{name}")
    return patched


def register(name: str = NAME, *, future_kl: bool = True, seq_filter: bool = True,
             helpers: bool = True, fused: bool = True, **future_kl_options) -> dict:
    """Register the `appo` estimator and policy loss with verl (under `name`); with `helpers`,
    patch its log-prob and entropy helpers, with `fused` its fused-kernel forward's kernels.
    Call it in every process that builds verl's workers (e.g. at the top of your entry script
    and in a Ray worker's setup)."""
    core = _core_algos()
    estimators, losses = core.ADV_ESTIMATOR_REGISTRY, core.POLICY_LOSS_REGISTRY
    if name not in estimators:
        core.register_adv_est(name)(appo_advantage)
    core.register_policy_loss(name)(make_policy_loss(future_kl=future_kl, seq_filter=seq_filter,
                                                     **future_kl_options))
    return {"estimator": estimators[name], "policy_loss": losses[name],
            "helpers": patch_helpers() if helpers else [],
            "fused": patch_fused() if fused else []}
