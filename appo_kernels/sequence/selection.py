"""Choosing where to branch (docs/ops.md; docs/algorithm.md): `select_branch_points`, and the
per-tokenizer
lookup tables (`vocab_flags`) that keep whitespace-only tokens out of the candidates.

Selection is sorting: candidates are ordered by the composite key (group, tier, −score, packed
index) with two stable sorts, each group's candidates then sit in one contiguous run, and the k-th
pick of a group is entry `k mod count` of its run. No loop over tokens or groups.
"""

from __future__ import annotations

import re
import string
import unicodedata
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from appo_kernels._checks import FLOAT_DTYPES, INDEX_DTYPES, cu_seqlens_arg, tensor_arg
from appo_kernels.sequence._groups import dense_group_ids
from appo_kernels.sequence.packing import token_segments

PER_MODES = ("group", "sequence")
TIERS = 2  # tier 0: strict and eligible; tier 1: the other eligible positions


def _check_selection_args(score, strict, eligible, cu_seqlens, seq_group, budget, per,
                          validate) -> int:
    tensor_arg("score", score, dtypes=FLOAT_DTYPES, ndim=1)
    tensor_arg("strict", strict, dtypes=(torch.bool,), shape=score.shape, like=score)
    tensor_arg("eligible", eligible, dtypes=(torch.bool,), shape=score.shape, like=score)
    n_seqs = cu_seqlens_arg(cu_seqlens, score.shape[0], like=score, validate=validate)
    if per not in PER_MODES:
        raise ValueError(f"per must be one of {PER_MODES}, got {per!r}")
    tensor_arg("seq_group", seq_group, dtypes=INDEX_DTYPES, shape=(n_seqs,), like=score,
               optional=per == "sequence")
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"budget must be a Python int, got {type(budget).__name__}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    return n_seqs


def select_branch_points(
    score: Tensor,
    strict: Tensor,
    eligible: Tensor,
    cu_seqlens: Tensor,
    seq_group: Optional[Tensor],
    budget: int,
    *,
    per: str = "group",
    validate: bool = False,
) -> tuple[Tensor, Tensor]:
    """Pick `budget` branch points per group of sequences (APPO's branching step).

    Within each group the positions are ranked: first those that are `strict` and `eligible`, by
    descending `score`; then the other `eligible` positions, by descending `score`; ties break by
    (sequence, position) ascending, and a NaN score ranks as −inf. The group takes the first
    `budget` of that ranking; when it has fewer candidates than `budget` the ranking is repeated
    cyclically (a position may be chosen several times). A group with no eligible position yields
    nothing.

    Args:
        score: float `[N]` packed branching scores (`branching_score(...).score`).
        strict: bool `[N]`, positions preferred first (`branching_score(...).strict`).
        eligible: bool `[N]`, the candidates, typically `mask & ~is_whitespace[token_ids]`.
        cu_seqlens: int32/int64 `[S+1]` offsets of the S packed sequences.
        seq_group: int32/int64 `[S]`, the group (prompt id) of every sequence: any integers, not
            necessarily contiguous or sorted. Ignored (may be None) with `per="sequence"`.
        budget: branch points per group, a Python int >= 0.
        per: "group", or "sequence" to make every sequence its own group (the APPO paper's
            variant, B points per rollout).
        validate: check `cu_seqlens` values on the GPU too (a device sync).

    Returns:
        `(seq_index, position)`, int64 `[M]` with M = budget × (groups with a candidate): the
        sequence of each pick and its position relative to the sequence start. Ordered by group
        (ascending `seq_group` id, or sequence index with `per="sequence"`), then by rank.

    The output size depends on the data, so this op syncs with the device (twice: to gather the
    candidates and to size the output). Not traceable by torch.compile.
    """
    n_seqs = _check_selection_args(score, strict, eligible, cu_seqlens, seq_group, budget, per,
                                   validate)
    device = score.device
    if per == "sequence":
        group_of_seq = torch.arange(n_seqs, device=device)
    else:
        group_of_seq = dense_group_ids(seq_group)
    seq_of_token = token_segments(cu_seqlens, score.shape[0])

    candidates = eligible.nonzero().squeeze(1)  # host sync: the number of candidates
    cand_seq = seq_of_token[candidates]
    cand_group = group_of_seq[cand_seq]
    cand_score = score[candidates]
    cand_score = torch.where(cand_score.isnan(), -torch.inf, cand_score)
    cand_key = cand_group * TIERS + (~strict[candidates]).long()

    # Stable sorts, least significant key first: candidates start in packed order, which is the
    # (sequence, position) tie-break; then descending score; then (group, tier).
    order = torch.sort(cand_score, descending=True, stable=True).indices
    order = order[torch.sort(cand_key[order], stable=True).indices]

    # Every group's candidates are one contiguous run of `order`: its start and length.
    count = torch.zeros(n_seqs, dtype=torch.long, device=device)
    count.index_add_(0, cand_group, torch.ones_like(cand_group))
    run_start = count.cumsum(0) - count
    with_candidates = (count > 0).nonzero().squeeze(1)  # host sync: the output size

    pick_group = with_candidates.repeat_interleave(budget)
    rank = torch.arange(budget, device=device).repeat(with_candidates.numel())
    # cycling through the run repeats the chosen positions until the budget is spent
    picks = order[run_start[pick_group] + rank % count[pick_group]]
    seq_index = cand_seq[picks]
    position = candidates[picks] - cu_seqlens.long()[seq_index]
    return seq_index, position


# ------------------------------------------------------------------ vocabulary flags


class VocabFlags(NamedTuple):
    is_whitespace: Tensor  # bool [V]: the token's text is non-empty and all whitespace
    is_punct: Tensor  # bool [V]: non-whitespace characters exist and are all punctuation


SENTENCEPIECE_SPACE = "\u2581"  # '▁': SentencePiece writes a leading space as this character
BYTE_LEVEL_SPACE = "\u0120"  # 'Ġ': byte-level BPE (GPT-2, Llama 3, Qwen) writes a space as this
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback pieces


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves and
    the other bytes, in increasing order, for chr(256), chr(257), ... ('Ġ' = space, 'Ċ' = \\n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in alphabet.values()]
    alphabet.update({chr(256 + k): b for k, b in enumerate(others)})
    return alphabet


BYTE_LEVEL_ALPHABET = _byte_level_alphabet()


def _piece_text(piece: str, byte_level: bool) -> str:
    """The text a vocabulary piece stands for (bytes that are not valid UTF-8 alone become
    U+FFFD, which is neither whitespace nor punctuation)."""
    if byte_level:
        if all(c in BYTE_LEVEL_ALPHABET for c in piece):
            return bytes(BYTE_LEVEL_ALPHABET[c] for c in piece).decode("utf-8", errors="replace")
        return piece  # an added token, stored as plain text
    match = BYTE_FALLBACK.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)]).decode("utf-8", errors="replace")
    return piece.replace(SENTENCEPIECE_SPACE, " ")


def _token_texts(tokenizer, n_ids: int) -> list[str]:
    ids = list(range(n_ids))
    if not hasattr(tokenizer, "convert_ids_to_tokens"):
        return [tokenizer.decode([i]) for i in ids]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    # byte-level BPE marks word starts with 'Ġ', SentencePiece with '▁': the majority decides
    n_byte_level = sum(1 for p in pieces if p is not None and p.startswith(BYTE_LEVEL_SPACE))
    n_sentencepiece = sum(1 for p in pieces if p is not None and p.startswith(SENTENCEPIECE_SPACE))
    byte_level = n_byte_level > n_sentencepiece
    return [tokenizer.decode([i]) if p is None else _piece_text(p, byte_level)
            for i, p in zip(ids, pieces)]


def _is_whitespace(text: str) -> bool:
    return text != "" and text.isspace()


def _is_punct_char(c: str) -> bool:
    return c in string.punctuation or unicodedata.category(c).startswith("P")


def _is_punct(text: str) -> bool:
    rest = [c for c in text if not c.isspace()]
    return bool(rest) and all(_is_punct_char(c) for c in rest)


def _tokenizer_size(tokenizer) -> int:
    if hasattr(tokenizer, "__len__"):
        return len(tokenizer)
    size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int):
        return size
    raise TypeError("tokenizer must define __len__ or an int vocab_size (or pass vocab_size=)")


def vocab_flags(tokenizer, *, vocab_size: Optional[int] = None, device=None) -> VocabFlags:
    """Whitespace-only and punctuation-only lookup tables over a tokenizer's vocabulary.

    Build once per tokenizer (a Python pass over the vocabulary) and index with token ids:
    `eligible = mask & ~flags.is_whitespace[token_ids]`.

    The text of id i is, for a Hugging Face tokenizer (anything with `convert_ids_to_tokens`),
    its vocabulary piece with the tokenizer's markers resolved: byte-level BPE pieces are mapped
    back to their bytes ('Ġ' = space, 'Ċ' = newline, 'ĉ' = tab) and decoded as UTF-8;
    SentencePiece's '▁' is a space and its byte-fallback pieces `<0xNN>` are the byte NN. The
    scheme is byte-level when more pieces start with 'Ġ' than with '▁'. Pieces are used rather
    than `decode([i])` because decoders strip a leading space, which would turn '▁' into ''.
    Any other object needs `decode(list[int]) -> str` and `__len__` or `vocab_size`; its text is
    `decode([i])`.

    - `is_whitespace[i]`: the text is non-empty and every character is whitespace
      (`str.isspace`: space, \\t, \\n, \\r, \\v, \\f, U+0085, U+00A0, U+2000–U+200A, ...).
    - `is_punct[i]`: after removing whitespace the text is non-empty and every character is ASCII
      punctuation (`string.punctuation`, which includes symbols such as `$+<=>^|~`) or in a
      Unicode punctuation category (P*). Whitespace-only tokens are not punctuation; special
      tokens such as `<|im_end|>` (letters inside) and undecodable partial UTF-8 bytes are
      neither.

    Args:
        tokenizer: a Hugging Face tokenizer or any object with `decode` and a size.
        vocab_size: length of the tables, default the tokenizer's size (`len(tokenizer)`,
            which counts added tokens). Pass the model's vocabulary size when it is padded
            beyond the tokenizer; ids past the tokenizer are neither.
        device: where the tables live (default CPU).

    Returns:
        VocabFlags(is_whitespace, is_punct), bool `[vocab_size]`.
    """
    if not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(f"tokenizer must have a decode(list[int]) method, got "
                        f"{type(tokenizer).__name__}")
    known = _tokenizer_size(tokenizer)
    size = known if vocab_size is None else vocab_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"vocab_size must be an int >= 0, got {vocab_size!r}")
    texts = _token_texts(tokenizer, min(size, known))
    is_whitespace = torch.zeros(size, dtype=torch.bool)
    is_punct = torch.zeros(size, dtype=torch.bool)
    is_whitespace[:len(texts)] = torch.tensor([_is_whitespace(t) for t in texts], dtype=torch.bool)
    is_punct[:len(texts)] = torch.tensor([_is_punct(t) for t in texts], dtype=torch.bool)
    return VocabFlags(is_whitespace.to(device), is_punct.to(device))
