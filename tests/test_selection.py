"""select_branch_points and vocab_flags (docs/ops.md) against a brute-force ranking written with
Python's sorted(), and hand-built tokenizers (byte-level BPE, SentencePiece, decode-only)."""

import math

import pytest
import torch

from appo_kernels.selection import select_branch_points
from appo_kernels.vocab import VocabFlags, vocab_flags

from packed import cu_seqlens_of, random_lengths, spans

BUDGETS = [0, 1, 3, 40]  # 40 exceeds the candidates of most groups: the ranking cycles


def brute_select(score, strict, eligible, cu, seq_group, budget, per):
    """Rank every group's eligible positions by (tier, −score, sequence, position) and take
    `budget` of them cyclically; groups in ascending id order."""
    groups = {}
    for s, (start, end) in enumerate(spans(cu)):
        key = s if per == "sequence" else int(seq_group[s])
        ranked = groups.setdefault(key, [])
        for t in range(start, end):
            if eligible[t]:
                value = float(score[t])
                value = -math.inf if math.isnan(value) else value
                ranked.append((0 if strict[t] else 1, -value, s, t - start))
    picks = []
    for key in sorted(groups):
        ranked = sorted(groups[key])
        if ranked:
            picks += [ranked[k % len(ranked)][2:] for k in range(budget)]
    return picks


def random_selection_inputs(device, dtype=torch.float32, n_seqs=24, max_len=30):
    cu = cu_seqlens_of(random_lengths(n_seqs, max_len))
    n = int(cu[-1])
    # few distinct values: many ties, which must break by (sequence, position)
    score = torch.where(torch.rand(n) < 0.5, torch.randint(-2, 3, (n,)).float(), torch.randn(n))
    strict = torch.rand(n) < 0.3
    eligible = torch.rand(n) < 0.6
    # arbitrary, unsorted, non-contiguous prompt ids; some groups get no eligible position
    seq_group = torch.randint(-3, 4, (n_seqs,)) * 1000 + 7
    for s in torch.randperm(n_seqs)[:3].tolist():
        start, end = spans(cu)[s]
        eligible[start:end] = False
    return (score.to(dtype).to(device), strict.to(device), eligible.to(device), cu.to(device),
            seq_group.to(device))


def as_pairs(seq_index, position):
    assert seq_index.dtype == torch.int64 and position.dtype == torch.int64
    assert seq_index.shape == position.shape
    return list(zip(seq_index.tolist(), position.tolist()))


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("per", ["group", "sequence"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_brute_force(device, budget, per, dtype):
    score, strict, eligible, cu, seq_group = random_selection_inputs(device, dtype)
    got = select_branch_points(score, strict, eligible, cu, seq_group, budget, per=per)
    want = brute_select(score.cpu(), strict.cpu(), eligible.cpu(), cu.cpu(), seq_group.cpu(),
                        budget, per)
    assert as_pairs(*got) == want


def test_strict_first_then_score_then_cycle(device):
    # one group, two sequences [4, 3]; eligible: all but token 1; strict: tokens 3 and 5
    cu = torch.tensor([0, 4, 7], device=device)
    score = torch.tensor([0.5, 9.0, 0.5, -1.0, 2.0, 0.1, 0.5], device=device)
    strict = torch.tensor([0, 0, 0, 1, 0, 1, 0], dtype=torch.bool, device=device)
    eligible = torch.tensor([1, 0, 1, 1, 1, 1, 1], dtype=torch.bool, device=device)
    group = torch.tensor([42, 42], device=device)
    got = as_pairs(*select_branch_points(score, strict, eligible, cu, group, 9))
    ranking = [(1, 1), (0, 3),  # strict, by score
               (1, 0), (0, 0), (0, 2), (1, 2)]  # the others: 2.0, then the 0.5 ties in order
    assert got == ranking + ranking[:3]


def test_group_without_eligible_position_yields_nothing(device):
    cu = torch.tensor([0, 3, 5, 9], device=device)
    score = torch.randn(9, device=device)
    strict = torch.ones(9, dtype=torch.bool, device=device)
    eligible = torch.zeros(9, dtype=torch.bool, device=device)
    eligible[5:] = torch.rand(4, device=device) < 2  # only the third sequence has candidates
    group = torch.tensor([1, 1, 0], device=device)
    seq_index, position = select_branch_points(score, strict, eligible, cu, group, 5)
    assert seq_index.tolist() == [2] * 5 and sorted(set(position.tolist())) == list(range(4))
    none = select_branch_points(score, strict, torch.zeros_like(eligible), cu, group, 5)
    assert none[0].numel() == 0 and none[1].numel() == 0


def test_nan_scores_rank_last(device):
    cu = torch.tensor([0, 4], device=device)
    score = torch.tensor([math.nan, -5.0, math.nan, 1.0], device=device)
    flags = torch.ones(4, dtype=torch.bool, device=device)
    got = select_branch_points(score, ~flags, flags, cu, torch.tensor([0], device=device), 4)
    assert got[1].tolist() == [3, 1, 0, 2]


def test_per_sequence_ignores_groups_and_takes_budget_per_sequence(device):
    score, strict, eligible, cu, seq_group = random_selection_inputs(device)
    with_groups = select_branch_points(score, strict, eligible, cu, seq_group, 2, per="sequence")
    without = select_branch_points(score, strict, eligible, cu, None, 2, per="sequence")
    assert all(torch.equal(a, b) for a, b in zip(with_groups, without))
    lengths_with_candidates = [bool(eligible[a:b].any()) for a, b in spans(cu.cpu())]
    assert with_groups[0].numel() == 2 * sum(lengths_with_candidates)


def test_batch_invariance(device):
    """A group's picks do not depend on the other groups in the call."""
    score, strict, eligible, cu, _ = random_selection_inputs(device, n_seqs=10)
    group = torch.tensor([0] * 4 + [1] * 6, device=device)
    together = as_pairs(*select_branch_points(score, strict, eligible, cu, group, 7))
    end = int(cu[4])
    alone = as_pairs(*select_branch_points(score[:end], strict[:end], eligible[:end], cu[:5],
                                           group[:4], 7))
    assert together[:len(alone)] == alone


BAD = [
    ("budget must be >= 0", ValueError, dict(budget=-1)),
    ("budget must be a Python int", TypeError, dict(budget=2.0)),
    ("budget must be a Python int", TypeError, dict(budget=True)),
    ("per must be one of", ValueError, dict(per="prompt")),
    ("seq_group must have shape \\(2,\\)", ValueError, dict(seq_group=torch.tensor([0, 1, 2]))),
    ("seq_group must be a torch.Tensor", TypeError, dict(seq_group=None)),
    ("seq_group must have dtype int32 or int64", TypeError,
     dict(seq_group=torch.tensor([0.0, 1.0]))),
    ("score must have dtype", TypeError, dict(score=torch.arange(5))),
    ("strict must have dtype bool", TypeError, dict(strict=torch.ones(5))),
    ("eligible must have shape \\(5,\\)", ValueError,
     dict(eligible=torch.ones(4, dtype=torch.bool))),
    ("cu_seqlens must be non-decreasing", ValueError, dict(cu_seqlens=torch.tensor([0, 4, 3, 5]),
                                                          seq_group=torch.tensor([0, 0, 0]))),
    ("cu_seqlens\\[-1\\] must equal the number of packed tokens 5", ValueError,
     dict(cu_seqlens=torch.tensor([0, 2, 4]))),
    ("cu_seqlens must have dtype int32 or int64", TypeError,
     dict(cu_seqlens=torch.tensor([0.0, 2.0, 5.0]))),
]


@pytest.mark.parametrize("message,error,change", BAD, ids=[m[:30] for m, _, _ in BAD])
def test_bad_inputs_raise(message, error, change):
    args = dict(score=torch.randn(5), strict=torch.rand(5) < 0.5, eligible=torch.rand(5) < 0.5,
                cu_seqlens=torch.tensor([0, 2, 5]), seq_group=torch.tensor([3, 1]), budget=2)
    args.update(change)
    per = args.pop("per", "group")
    with pytest.raises(error, match=message):
        select_branch_points(**args, per=per)


# ------------------------------------------------------------------ vocab_flags

# (piece, is_whitespace, is_punct)
BYTE_LEVEL_VOCAB = [
    ("Ġ", True, False), ("ĠĠĠ", True, False), ("Ċ", True, False), ("ĊĊ", True, False),
    ("ĉ", True, False), ("čĊ", True, False), ("Ġthe", False, False), ("hello", False, False),
    (".", False, True), ("Ġ.", False, True), ("),", False, True), ("Ġ+", False, True),
    ("...Ċ", False, True), ("Ġ'", False, True), ("<|im_end|>", False, False),
    ("ĠâĢľ", False, True),  # ' “': U+201C, a Unicode punctuation character (Pi)
    ("ĠÂ¿", False, True),  # ' ¿': bytes 20 C2 BF (Po)
    ("¿", False, False),  # its last byte alone (BF, a continuation byte): undecodable
    ("ð", False, False),  # a lone UTF-8 lead byte: undecodable, neither
    ("Ġ1", False, False), ("中文", False, False),  # an added token stored as plain text
]
SENTENCEPIECE_VOCAB = [
    ("<unk>", False, False), ("<s>", False, False), ("▁", True, False), ("▁▁", True, False),
    ("<0x0A>", True, False), ("<0x09>", True, False), ("<0x2E>", False, True),
    ("<0xE2>", False, False), ("▁the", False, False), ("▁,", False, True), ("?!", False, True),
    ("ğ", False, False),  # a letter that byte-level decoding would misread as a control byte
    ("Ġ", False, False),  # in a SentencePiece vocabulary 'Ġ' is just a letter
]


class PieceTokenizer:
    """The part of a Hugging Face tokenizer that vocab_flags uses; decode strips the leading
    space of a lone piece, as real decoders do."""

    def __init__(self, pieces):
        self.pieces = pieces

    def __len__(self):
        return len(self.pieces)

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids).replace("▁", " ").lstrip()


class DecodeOnlyTokenizer:
    """Anything with decode(list[int]) and vocab_size, e.g. a character-level tokenizer."""

    chars = [" ", "\n", "\t", "a", "B", "7", ".", ",", "—", "€", "", "  \n", " !?", "x."]
    vocab_size = len(chars)

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def expected_flags(vocab):
    return ([w for _, w, _ in vocab], [p for _, _, p in vocab])


def with_markers(vocab, marker, copies=3):
    """Enough word-start pieces to make the marker the majority scheme."""
    return vocab + [(f"{marker}word{i}", False, False) for i in range(copies)]


@pytest.mark.parametrize("vocab,marker", [(BYTE_LEVEL_VOCAB, "Ġ"), (SENTENCEPIECE_VOCAB, "▁")],
                         ids=["byte_level", "sentencepiece"])
def test_vocab_flags_of_hf_style_tokenizers(vocab, marker):
    vocab = with_markers(vocab, marker, copies=len(vocab))
    flags = vocab_flags(PieceTokenizer([p for p, _, _ in vocab]))
    assert isinstance(flags, VocabFlags)
    assert flags.is_whitespace.dtype == torch.bool and flags.is_whitespace.shape == (len(vocab),)
    whitespace, punct = expected_flags(vocab)
    pieces = [p for p, _, _ in vocab]
    assert dict(zip(pieces, flags.is_whitespace.tolist())) == dict(zip(pieces, whitespace))
    assert dict(zip(pieces, flags.is_punct.tolist())) == dict(zip(pieces, punct))


def test_vocab_flags_of_decode_only_tokenizer():
    flags = vocab_flags(DecodeOnlyTokenizer())
    chars = DecodeOnlyTokenizer.chars
    assert flags.is_whitespace.tolist() == [c != "" and c.isspace() for c in chars]
    assert flags.is_punct.tolist() == [c in (".", ",", "—", " !?") for c in chars]


def test_vocab_flags_pads_to_the_model_vocabulary():
    vocab = with_markers(BYTE_LEVEL_VOCAB, "Ġ")
    padded = vocab_flags(PieceTokenizer([p for p, _, _ in vocab]), vocab_size=len(vocab) + 5)
    assert padded.is_whitespace.shape == (len(vocab) + 5,)
    assert not padded.is_whitespace[len(vocab):].any() and not padded.is_punct[len(vocab):].any()
    whitespace, _ = expected_flags(vocab)
    assert padded.is_whitespace[:len(vocab)].tolist() == whitespace


def test_vocab_flags_bad_tokenizer():
    with pytest.raises(TypeError, match="tokenizer must have a decode"):
        vocab_flags(object())
    with pytest.raises(ValueError, match="vocab_size must be >= 0"):
        vocab_flags(DecodeOnlyTokenizer(), vocab_size=-1)


def test_eligible_from_flags_feeds_selection(device):
    """The trainer's recipe (docs/algorithm.md): candidates exclude whitespace-only and
    non-model tokens."""
    vocab = with_markers(BYTE_LEVEL_VOCAB, "Ġ")
    flags = vocab_flags(PieceTokenizer([p for p, _, _ in vocab]), device=device)
    token_ids = torch.randint(0, len(vocab), (40,), device=device)
    mask = torch.rand(40, device=device) < 0.8
    eligible = mask & ~flags.is_whitespace[token_ids]
    seq_index, position = select_branch_points(
        torch.randn(40, device=device), torch.zeros(40, dtype=torch.bool, device=device),
        eligible, torch.tensor([0, 40], device=device), torch.tensor([0], device=device), 4)
    assert all(bool(eligible[p]) for p in position.tolist())
