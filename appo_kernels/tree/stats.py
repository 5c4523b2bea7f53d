"""Next-token statistics of a packed tree (docs/ops.md, tree attention): the logits that predict
token t of a tree forward sit at row `parent[t]`; `tree_token_stats` gathers them and runs
`token_stats` on them."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from appo_kernels._checks import INDEX_DTYPES, tensor_arg
from appo_kernels.token_stats import TokenStats, token_stats
from appo_kernels.token_stats.linear import linear_token_stats
from appo_kernels.tree.layout import TreeLayout


def tree_token_stats(logits: Tensor, layout: TreeLayout, token_ids: Tensor, *,
                     temperature: float = 1.0, mask: Optional[Tensor] = None,
                     extras: tuple[str, ...] = ()) -> TokenStats:
    """Next-token statistics of a packed tree, per token: `token_stats` of the distribution that
    predicts token t, which sits at row `parent[t]` of `logits` (docs/ops.md, tree attention).

    Args:
        logits: [N, V] or [1, N, V] (a tree forward's output), in the layout's order.
        layout: the tree; token_ids: int [N], the packed tokens (from `TreeLayout.from_sequences`).
        temperature, extras: as for `token_stats`.
        mask: bool [N]; tokens where it is False are not scored.

    Returns:
        TokenStats over the N tokens: logprob[t] = log p(token_ids[t] | ancestors of t), and the
        entropy, lse (and extras) of that distribution. Roots have no prediction: like masked
        tokens they give 0 and get no gradient. A tree token stands for one token of every
        sequence through it: to match a sum over the unrolled sequences, weight token t by
        `torch.bincount(torch.cat(paths), minlength=N)[t]`.
    """
    logits = _rows_of_tree("logits", logits, layout, token_ids, mask)
    scored, rows_needed, next_token = _rows_to_score(layout, token_ids, mask)
    rows = token_stats(logits, next_token, temperature=temperature, mask=rows_needed,
                       extras=extras)
    return _per_token(rows, layout, token_ids, scored, temperature,
                      lambda rows_, tokens: logits[rows_, tokens].float())


def tree_linear_token_stats(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                            layout: TreeLayout, token_ids: Tensor, *, temperature: float = 1.0,
                            mask: Optional[Tensor] = None) -> TokenStats:
    """`tree_token_stats` of the logits `hidden @ weight.T + bias` without making them
    (`linear_token_stats`): hidden [N, H] or [1, N, H], a tree forward's last hidden states."""
    hidden = _rows_of_tree("hidden", hidden, layout, token_ids, mask)
    scored, rows_needed, next_token = _rows_to_score(layout, token_ids, mask)
    rows = linear_token_stats(hidden, weight, next_token, bias=bias, temperature=temperature,
                              mask=rows_needed)

    def logit(rows_, tokens):  # one logit per branch start, rounded as the product would be
        z = (hidden[rows_].float() * weight[tokens].float()).sum(-1)
        if bias is not None:
            z = z + bias[tokens].float()
        return z.to(hidden.dtype).float()

    return _per_token(rows, layout, token_ids, scored, temperature, logit)


def _rows_of_tree(name: str, rows: Tensor, layout, token_ids: Tensor, mask) -> Tensor:
    """`rows` ([N, ·] or [1, N, ·]) as [N, ·], with the layout, token ids and mask checked."""
    if rows.dim() == 3 and rows.shape[0] == 1:
        rows = rows[0]
    tensor_arg(name, rows, ndim=2)
    if not isinstance(layout, TreeLayout):
        raise TypeError(f"layout must be a TreeLayout, got {type(layout).__name__}")
    n = layout.n_tokens
    tensor_arg("token_ids", token_ids, dtypes=INDEX_DTYPES, shape=(n,), like=rows)
    tensor_arg("mask", mask, dtypes=(torch.bool,), shape=(n,), like=rows, optional=True)
    if rows.shape[0] != n:
        raise ValueError(f"{name} must have one row per layout token ({n}), got "
                         f"{tuple(rows.shape)}")
    return rows


def _rows_to_score(layout: TreeLayout, token_ids: Tensor, mask: Optional[Tensor]):
    """(tokens scored, rows whose distribution is needed, the token after each row)."""
    parent = layout.parent.to(token_ids.device)
    scored = parent >= 0 if mask is None else (parent >= 0) & mask
    # in DFS pre-order a row's first child is the next token: row p is scored against token p + 1,
    # and only the first tokens of branches (parent[t] != t - 1) need a second lookup into row p
    rows_needed = torch.zeros(layout.n_tokens, dtype=torch.bool, device=token_ids.device)
    rows_needed[parent[scored]] = True
    next_token = torch.cat([token_ids[1:], token_ids.new_zeros(1)])
    return scored, rows_needed, next_token


def _per_token(rows: TokenStats, layout: TreeLayout, token_ids: Tensor, scored: Tensor,
               temperature: float, logit) -> TokenStats:
    """Row statistics moved to the tokens they predict; `logit(rows, tokens)` gives the raw
    logits of branch starts, whose token is not the row's next one."""
    parent = layout.parent.to(token_ids.device)
    src = parent.clamp_min(0)
    fields = {name: torch.where(scored, value[src], 0.0)
              for name, value in rows._asdict().items() if value is not None and name != "logprob"}
    logprob = torch.cat([rows.logprob.new_zeros(1), rows.logprob[:-1]])  # row t - 1 predicts t
    starts = layout.segment_starts().to(token_ids.device)
    starts = starts[scored[starts]]
    z = logit(parent[starts], token_ids[starts]) * (1.0 / float(temperature))
    logprob = logprob.index_put((starts,), z - rows.lse[parent[starts]])
    fields["logprob"] = torch.where(scored, logprob, 0.0)
    return TokenStats(**fields)
