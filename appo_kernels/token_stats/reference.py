"""Float64 torch reference for `token_stats`: what the kernels and the CPU path (`cpu.py`) are held
to; it runs float64 logits (gradcheck) and `APPO_BACKEND=torch` on a GPU.

Accumulates in float64. Sums over the vocabulary are taken with `cumsum`, a sequential scan per
row, because torch's CPU reductions split a single long row across threads and so would give a row
a different rounding alone than inside a batch; the scan does not (docs/ops.md: batch invariance).
"""

from __future__ import annotations

import torch

from appo_kernels._backend import new_output

# Rows processed at once, so the float64 temporaries stay near 32 MB whatever T is.
CHUNK_ELEMENTS = 1 << 22


def _row_chunks(n_rows: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


def _row_sum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, dim=-1)[..., -1]


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(logits, target, mask, inv_temperature, want_varentropy, want_top2):
    """Returns (logprob, entropy, lse, varentropy, top2_margin, row_max, log_norm) over rows.

    `row_max` (max raw logit) and `log_norm` (log Σ exp((x - row_max)/T)) are what the backward
    needs to recompute probabilities without cancellation at large logit magnitudes.
    Unrequested outputs are empty tensors.
    """
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    n_rows = rows.shape[0]
    out_dtype = _out_dtype(logits.dtype)
    dev = logits.device
    names = ("logprob", "entropy", "lse", "varentropy", "top2", "row_max", "log_norm")
    out = {n: new_output(n_rows, out_dtype, dev) for n in names}
    tgt = None if target is None else target.reshape(-1)
    keep = None if mask is None else mask.reshape(-1)

    for a, b in _row_chunks(n_rows, vocab):
        x = rows[a:b].to(torch.float64)
        m = x.amax(dim=-1, keepdim=True)  # max is exact in any order
        finite = torch.isfinite(m)
        m_safe = torch.where(finite, m, torch.zeros_like(m))
        d = (x - m_safe) * inv_temperature  # −inf logits stay −inf
        e = torch.exp(d)
        ed = torch.where(e > 0, e * d, torch.zeros_like(d))  # 0·(−inf) contributes 0
        s = _row_sum(e)
        a_sum = _row_sum(ed)
        log_s = torch.log(s)
        mean_d = a_sum / s
        nan = torch.full_like(s, float("nan"))
        ok = finite.squeeze(-1)
        out["lse"][a:b] = torch.where(ok, m_safe.squeeze(-1) * inv_temperature + log_s, nan)
        out["entropy"][a:b] = torch.where(ok, log_s - mean_d, nan)
        out["row_max"][a:b] = m_safe.squeeze(-1)
        out["log_norm"][a:b] = torch.where(ok, log_s, nan)
        if tgt is not None:
            t = tgt[a:b].to(torch.int64)
            in_range = (t >= 0) & (t < vocab)
            picked = d.gather(-1, t.clamp(0, vocab - 1).unsqueeze(-1)).squeeze(-1)
            out["logprob"][a:b] = torch.where(in_range & ok, picked - log_s, nan)
        if want_varentropy:
            edd = torch.where(e > 0, ed * d, torch.zeros_like(d))
            var = _row_sum(edd) / s - mean_d * mean_d
            out["varentropy"][a:b] = torch.where(ok, var.clamp_min(0.0), nan)
        if want_top2:
            out["top2"][a:b] = torch.where(ok, top2_gap(x, inv_temperature), nan)

    return finish(out, names, {"logprob": tgt is not None, "varentropy": want_varentropy,
                               "top2": want_top2}, keep, logits.shape[:-1])


def top2_gap(x: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """(z(1) − z(2))/T per row of x [R, V]; inf where there is no second finite logit."""
    if x.shape[-1] < 2:
        return torch.full(x.shape[:1], float("inf"), dtype=x.dtype, device=x.device)
    top = x.topk(2, dim=-1).values
    return torch.where(top[:, 1] > -torch.inf, (top[:, 0] - top[:, 1]) * inv_temperature,
                       float("inf"))


def finish(out: dict, names, wanted: dict, keep, lead) -> tuple:
    """The outputs in `names` order, shaped `lead`, masked rows 0, unrequested ones empty."""
    result = []
    for n in names:
        if not wanted.get(n, True):
            result.append(out[n][:0])
            continue
        t = out[n] if keep is None else torch.where(keep, out[n], torch.zeros_like(out[n]))
        result.append(t.reshape(lead))
    return tuple(result)


def backward(logits, target, mask, row_max, log_norm, entropy, g_logprob, g_entropy, g_lse,
             inv_temperature):
    """Gradient with respect to `logits` from upstream gradients of logprob, entropy and lse.

    With z = x/T, p = softmax(z), H = −Σ p log p:
      ∂lse/∂z = p,  ∂logprob/∂z = onehot(target) − p,  ∂H/∂z_j = −p_j (log p_j + H).
    """
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    n_rows = rows.shape[0]
    grad = new_output((n_rows, vocab), logits.dtype, logits.device)

    def flat(t):
        return None if t is None else t.reshape(-1).to(torch.float64)

    m_all, log_s_all, h_all = flat(row_max), flat(log_norm), flat(entropy)
    g_lp_all, g_h_all, g_lse_all = flat(g_logprob), flat(g_entropy), flat(g_lse)
    tgt = None if target is None else target.reshape(-1).to(torch.int64)
    keep = None if mask is None else mask.reshape(-1)

    for a, b in _row_chunks(n_rows, vocab):
        x = rows[a:b].to(torch.float64)
        d = (x - m_all[a:b, None]) * inv_temperature
        log_p = d - log_s_all[a:b, None]
        p = torch.exp(log_p)
        g = torch.zeros_like(x)
        if g_lse_all is not None:
            g += g_lse_all[a:b, None] * p
        if g_h_all is not None:
            p_log_p = torch.where(p > 0, p * (log_p + h_all[a:b, None]), torch.zeros_like(p))
            g -= g_h_all[a:b, None] * p_log_p
        if g_lp_all is not None and tgt is not None:
            g -= g_lp_all[a:b, None] * p
            t = tgt[a:b]
            in_range = (t >= 0) & (t < vocab)
            hit = torch.where(in_range, g_lp_all[a:b], torch.zeros_like(g_lp_all[a:b]))
            g.scatter_add_(-1, t.clamp(0, vocab - 1).unsqueeze(-1), hit.unsqueeze(-1))
        g = g * inv_temperature
        if keep is not None:
            g = torch.where(keep[a:b, None], g, torch.zeros_like(g))
        grad[a:b] = g.to(logits.dtype)
    return grad.reshape(logits.shape)
