"""`token_stats` on the CPU for float32, bfloat16 and float16 logits (docs/ops.md, token_stats).

Float32 throughout, no float64 working copy: rows go through in chunks small enough to stay in
the core's cache (about 2^16 logits), and each chunk is a handful of in-place passes: the row max;
d = (x − max)/T; e = exp(d); Σe; then e·d and Σe·d in the same buffer. Entropy is
log Σe − Σe·d / Σe: both terms are ≥ 0 relative to the max, so nothing cancels. Extra memory is
two chunk buffers, whatever T is.

Batch invariance (docs/ops.md): torch's CPU reduction of a single row splits it across threads,
while the rows of a larger tensor are reduced one thread per row; a chunk therefore never reduces
a lone row (a one-row chunk is summed as two identical rows), so a row's result is the same
alone or in any batch. The float64 `reference.py` stays what the tests and the kernels are held to.
"""

from __future__ import annotations

import torch

from appo_kernels._backend import new_output
from appo_kernels.token_stats.reference import finish, top2_gap

CHUNK_ELEMENTS = 1 << 16  # logits per chunk: two float32 buffers of 256 KiB stay in L2
# d = (x − max)/T is floored here: exp(FLOOR) is exactly 0 in float32, so a −inf logit gives e = 0
# and e·d = 0 (not 0·(−inf) = NaN), and a finite multiplier in the backward; only terms with e = 0
# see the floor (the target's log-prob is taken from x)
FLOOR = -1.0e4


def _chunks(n_rows: int, vocab: int):
    step = max(2, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def _row_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over the last dim of [R, V], the same rounding for a row whatever R is (module doc)."""
    if x.shape[0] == 1:
        return x.expand(2, -1).sum(-1)[:1]
    return x.sum(-1)


def _scaled_shift(x: torch.Tensor, m: torch.Tensor, inv_temperature: float,
                  in_place: bool = False) -> torch.Tensor:
    d = x.sub_(m) if in_place else torch.sub(x, m)
    if inv_temperature != 1.0:
        d.mul_(inv_temperature)
    return d.clamp_min_(FLOOR)


def forward(logits, target, mask, inv_temperature, want_varentropy, want_top2):
    """Same contract as `reference.forward`, float32 outputs."""
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    n_rows = rows.shape[0]
    dev = logits.device
    names = ("logprob", "entropy", "lse", "varentropy", "top2", "row_max", "log_norm")
    out = {n: new_output(n_rows, torch.float32, dev) for n in names}
    tgt = None if target is None else target.reshape(-1)
    keep = None if mask is None else mask.reshape(-1)
    nan = float("nan")

    for a, b in _chunks(n_rows, vocab):
        x = rows[a:b].float()  # no copy for float32 logits
        m = x.amax(dim=-1, keepdim=True)
        ok = torch.isfinite(m)
        m = torch.where(ok, m, 0.0)
        ok = ok.squeeze(-1)
        d = _scaled_shift(x, m, inv_temperature)
        e = torch.exp(d)
        s = _row_sum(e)
        log_s = torch.log(s)
        e.mul_(d)  # e·d from here on
        mean_d = _row_sum(e) / s
        m = m.squeeze(-1)
        out["lse"][a:b] = torch.where(ok, m * inv_temperature + log_s, nan)
        out["entropy"][a:b] = torch.where(ok, log_s - mean_d, nan)
        out["row_max"][a:b] = m
        out["log_norm"][a:b] = torch.where(ok, log_s, nan)
        if tgt is not None:
            t = tgt[a:b].to(torch.int64)
            in_range = (t >= 0) & (t < vocab)
            picked = x.gather(-1, t.clamp(0, vocab - 1).unsqueeze(-1)).squeeze(-1)
            shifted = (picked - m) * inv_temperature  # from x: d is floored
            out["logprob"][a:b] = torch.where(in_range & ok, shifted - log_s, nan)
        if want_varentropy:
            e.mul_(d)  # e·d²
            var = _row_sum(e) / s - mean_d * mean_d
            out["varentropy"][a:b] = torch.where(ok, var.clamp_min(0.0), nan)
        if want_top2:
            out["top2"][a:b] = torch.where(ok, top2_gap(x, inv_temperature), nan)

    return finish(out, names, {"logprob": tgt is not None, "varentropy": want_varentropy,
                               "top2": want_top2}, keep, logits.shape[:-1])


def backward(logits, target, mask, row_max, log_norm, entropy, g_logprob, g_entropy, g_lse,
             inv_temperature, *, in_place: bool = False):
    """∂/∂x of g_lp·logprob + g_H·H + g_lse·lse, with p = softmax((x − max)/T):
    p·(g_lse − g_lp − g_H·(log p + H))/T, plus g_lp/T at the target. `in_place` writes the
    gradient over float32 logits that the caller no longer needs (no second [rows, V] buffer)."""
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    n_rows = rows.shape[0]
    in_place = in_place and logits.dtype == torch.float32 and rows.data_ptr() == logits.data_ptr()
    grad = rows if in_place else new_output((n_rows, vocab), logits.dtype, logits.device)

    def flat(t):
        return None if t is None else t.reshape(-1).float()

    m_all, log_s_all, h_all = flat(row_max), flat(log_norm), flat(entropy)
    g_lp_all, g_h_all, g_lse_all = flat(g_logprob), flat(g_entropy), flat(g_lse)
    if target is None:
        g_lp_all = None
    tgt = None if target is None else target.reshape(-1).to(torch.int64)
    keep = None if mask is None else mask.reshape(-1)

    for a, b in _chunks(n_rows, vocab):
        x = rows[a:b].float()
        # log p: in the logits' own rows when in place
        log_p = _scaled_shift(x, m_all[a:b, None], inv_temperature, in_place)
        log_p.sub_(log_s_all[a:b, None]).clamp_min_(FLOOR)
        p = torch.exp(log_p)
        # per-row coefficient of p, with 1/T folded in
        coef = torch.zeros(b - a, dtype=torch.float32, device=x.device)
        if g_lse_all is not None:
            coef += g_lse_all[a:b]
        if g_lp_all is not None:
            coef -= g_lp_all[a:b]
        coef *= inv_temperature
        if g_h_all is not None:
            g_h = g_h_all[a:b, None] * inv_temperature
            g = log_p.add_(h_all[a:b, None]).mul_(-g_h).add_(coef[:, None]).mul_(p)
        else:
            g = p.mul_(coef[:, None])
        if g_lp_all is not None:
            t = tgt[a:b]
            in_range = (t >= 0) & (t < vocab)
            hit = torch.where(in_range, g_lp_all[a:b] * inv_temperature, 0.0)
            g.scatter_add_(-1, t.clamp(0, vocab - 1).unsqueeze(-1), hit.unsqueeze(-1))
        if keep is not None:
            g.masked_fill_(~keep[a:b, None], 0.0)
        if g is not x:  # in place, g may already be the logits' rows
            grad[a:b] = g
    return grad.reshape(logits.shape)
