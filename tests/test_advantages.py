"""group_advantages and procedure_advantages (docs/ops.md) against float64 loops written straight
from the definitions."""

import math

import pytest
import torch

from appo_kernels import _backend
from appo_kernels.advantages import group_advantages, procedure_advantages

from conftest import ON_GPU
from packed import cu_seqlens_of, random_lengths, spans

ABS_TOL, REL_TOL = 1e-5, 1e-5  # float32 results against float64 references


def brute_group_advantages(rewards, group_ids, eps, normalize_std, unbiased=False):
    members = {}
    for i, g in enumerate(group_ids.tolist()):
        members.setdefault(g, []).append(float(rewards[i]))
    out = torch.zeros(len(rewards), dtype=torch.float64)
    for i, g in enumerate(group_ids.tolist()):
        values = members[g]
        if len(values) == 1:
            continue
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - unbiased))
        centred = float(rewards[i]) - mean
        out[i] = centred / (std + eps) if normalize_std else centred
    return out


def brute_procedure_advantages(seq_adv, cu, parent, position, branch_adv):
    out = torch.zeros(int(cu[-1]), dtype=torch.float64)
    for r, (start, end) in enumerate(spans(cu)):
        for t in range(start, end):
            later = [float(branch_adv[b]) for b in range(len(parent))
                     if int(parent[b]) == r and int(position[b]) >= t - start]
            out[t] = float(seq_adv[r]) + (sum(later) / len(later) if later else 0.0)
    return out


def assert_close(actual, expected, what):
    assert actual.dtype == torch.float32, f"{what}: dtype {actual.dtype}"
    torch.testing.assert_close(actual.cpu().double(), expected, atol=ABS_TOL, rtol=REL_TOL,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_group_advantages_match_loops(device, normalize_std, dtype, unbiased):
    n = 40
    # unsorted, non-contiguous, negative and large ids; some groups are singletons
    ids = torch.randint(-4, 8, (n,)) * 10**12 + 3
    ids[:3] = torch.tensor([5, 6, 7]) * 10**15  # three singleton groups
    ids = ids[torch.randperm(n)]
    rewards = (torch.randn(n) * 2).to(dtype)
    adv = group_advantages(rewards.to(device), ids.to(device), normalize_std=normalize_std,
                           unbiased=unbiased)
    expected = brute_group_advantages(rewards.double(), ids, 1e-6, normalize_std, unbiased)
    if dtype == torch.float64:
        assert adv.dtype == torch.float64
        torch.testing.assert_close(adv.cpu(), expected)
    else:
        assert_close(adv, expected, "group advantages")


def test_group_advantages_binary_rewards_and_singletons(device):
    ids = torch.tensor([9, 2, 9, 9, 2, 4, 9, 2], device=device)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0], device=device)
    adv = group_advantages(rewards, ids)
    assert (adv == 0).all()  # every group is uniform or a singleton: exactly 0
    rewards[0] = 0.0  # group 9 becomes {0, 1, 1, 1}: mean 0.75, std √3/4
    adv = group_advantages(rewards, ids, eps=1e-30)
    std = math.sqrt(3) / 4
    want = torch.tensor([-0.75 / std, 0, 0.25 / std, 0.25 / std, 0, 0, 0.25 / std, 0])
    torch.testing.assert_close(adv.cpu(), want)


def test_group_advantages_batch_invariance(device):
    rewards = torch.randn(30, device=device)
    ids = torch.randint(0, 5, (30,), device=device)
    together = group_advantages(rewards, ids)
    keep = ids == 3
    alone = group_advantages(rewards[keep], ids[keep])
    assert torch.equal(together[keep], alone)


def random_branches(cu, n_branches):
    """Branches on random non-empty sequences, at random positions, always including the first
    and the last token of a sequence and two branches at the same position."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    nonempty = [s for s, length in enumerate(lengths) if length > 0]
    parent = torch.tensor(nonempty)[torch.randint(0, len(nonempty), (n_branches,))]
    length = torch.tensor(lengths)[parent]
    position = (torch.rand(n_branches) * length).long()
    position[0] = 0
    position[1] = length[1] - 1
    parent[2], position[2] = parent[3], position[3]
    return parent, position, torch.randn(n_branches) * 2


@pytest.mark.parametrize("n_branches", [4, 60])
def test_procedure_advantages_match_loops(backend, device, n_branches):
    n_seqs = 6 if backend == "triton" and not ON_GPU else 16  # the interpreter is slow
    cu = cu_seqlens_of(random_lengths(n_seqs, 25))
    parent, position, branch_adv = random_branches(cu, n_branches)
    seq_adv = torch.randn(n_seqs)
    with _backend.poisoned_outputs():
        adv = procedure_advantages(seq_adv.to(device), cu.to(device), parent.to(device),
                                   position.to(device), branch_adv.to(device))
    assert adv.shape == (int(cu[-1]),)
    assert_close(adv, brute_procedure_advantages(seq_adv, cu, parent, position, branch_adv),
                 "procedure advantages")


def test_procedure_advantages_without_branches_is_seq_adv(device):
    cu = cu_seqlens_of([3, 0, 1, 4], dtype=torch.int64, device=device)
    seq_adv = torch.randn(4, device=device)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    adv = procedure_advantages(seq_adv, cu, empty, empty, torch.zeros(0, device=device))
    assert torch.equal(adv, seq_adv.repeat_interleave(torch.tensor([3, 0, 1, 4], device=device)))


def test_procedure_advantages_first_and_last_token(device):
    cu = torch.tensor([0, 4, 5], device=device)
    seq_adv = torch.tensor([1.0, -1.0], device=device)
    parent = torch.tensor([0, 0, 1], device=device)
    position = torch.tensor([3, 0, 0], device=device)
    branch_adv = torch.tensor([0.5, 2.5, 4.0], device=device)
    adv = procedure_advantages(seq_adv, cu, parent, position, branch_adv)
    # sequence 0: t=0 sees both of its branches (mean 1.5), t=1..3 only the one at position 3
    assert adv.tolist() == [2.5, 1.5, 1.5, 1.5, 3.0]


def test_procedure_advantages_n_tokens_and_int32_offsets(device):
    cu = cu_seqlens_of(random_lengths(6, 9), device=device)
    parent, position, branch_adv = (t.to(device) for t in random_branches(cu.cpu(), 8))
    seq_adv = torch.randn(6, device=device)
    read = procedure_advantages(seq_adv, cu, parent.int(), position.int(), branch_adv)
    given = procedure_advantages(seq_adv, cu.long(), parent, position, branch_adv,
                                 n_tokens=int(cu[-1]))
    assert torch.equal(read, given)


def test_advantages_compile_without_graph_breaks(device):
    rewards, ids = torch.randn(12, device=device), torch.randint(0, 4, (12,), device=device)
    compiled = torch.compile(group_advantages, fullgraph=True, backend="eager")
    assert torch.equal(compiled(rewards, ids), group_advantages(rewards, ids))
    cu = cu_seqlens_of([3, 0, 5], device=device)
    branches = (torch.tensor([0, 2], device=device), torch.tensor([1, 4], device=device),
                torch.randn(2, device=device))
    seq_adv = torch.randn(3, device=device)
    # with n_tokens given, nothing syncs with the device
    compiled = torch.compile(lambda *a: procedure_advantages(*a, n_tokens=8), fullgraph=True,
                             backend="eager")
    assert torch.equal(compiled(seq_adv, cu, *branches),
                       procedure_advantages(seq_adv, cu, *branches))


def bad_procedure_call(**change):
    args = dict(seq_adv=torch.randn(2), cu_seqlens=torch.tensor([0, 3, 5]),
                branch_parent=torch.tensor([0, 1]), branch_position=torch.tensor([2, 1]),
                branch_adv=torch.randn(2))
    args.update(change)
    return lambda: procedure_advantages(**args)


BAD = [
    ("branch_parent\\[1\\] = 2 is not a sequence index in \\[0, 2\\)", ValueError,
     bad_procedure_call(branch_parent=torch.tensor([0, 2]))),
    ("branch_parent\\[0\\] = -1", ValueError,
     bad_procedure_call(branch_parent=torch.tensor([-1, 0]))),
    ("branch_position\\[0\\] = 3 is outside its parent sequence 0, of length 3", ValueError,
     bad_procedure_call(branch_position=torch.tensor([3, 0]))),
    ("branch_position\\[1\\] = -1", ValueError,
     bad_procedure_call(branch_position=torch.tensor([0, -1]))),
    ("branch_position must have shape \\(2,\\)", ValueError,
     bad_procedure_call(branch_position=torch.tensor([0]))),
    ("branch_adv must have shape \\(2,\\)", ValueError,
     bad_procedure_call(branch_adv=torch.randn(3))),
    ("branch_adv must have dtype", TypeError,
     bad_procedure_call(branch_adv=torch.tensor([1, 2]))),
    ("branch_parent must have dtype int32 or int64", TypeError,
     bad_procedure_call(branch_parent=torch.tensor([0.0, 1.0]))),
    ("cu_seqlens must have S\\+1 = 3 entries", ValueError,
     bad_procedure_call(cu_seqlens=torch.tensor([0, 5]))),
    ("cu_seqlens must be non-decreasing", ValueError,
     bad_procedure_call(cu_seqlens=torch.tensor([0, 6, 5]))),
    ("cu_seqlens\\[-1\\] must equal the number of packed tokens 7", ValueError,
     bad_procedure_call(n_tokens=7)),
    ("cu_seqlens\\[0\\] must be 0", ValueError,
     bad_procedure_call(cu_seqlens=torch.tensor([1, 3, 5]))),
    ("seq_adv must be 1-D", ValueError, bad_procedure_call(seq_adv=torch.randn(2, 1))),
    ("rewards must have dtype", TypeError,
     lambda: group_advantages(torch.tensor([1, 0]), torch.tensor([0, 0]))),
    ("group_ids must have shape \\(2,\\)", ValueError,
     lambda: group_advantages(torch.randn(2), torch.tensor([0, 0, 1]))),
    ("group_ids must have dtype int32 or int64", TypeError,
     lambda: group_advantages(torch.randn(2), torch.tensor([0.0, 1.0]))),
    ("eps must be > 0.0", ValueError,
     lambda: group_advantages(torch.randn(2), torch.tensor([0, 0]), eps=0.0)),
]


@pytest.mark.parametrize("message,error,call", BAD, ids=[m[:30] for m, _, _ in BAD])
def test_bad_inputs_raise(message, error, call):
    with pytest.raises(error, match=message):
        call()


def test_group_advantages_keep_precision_at_large_rewards():
    """Means and deviations in float64: rewards 1e8 and 1e8 + 8 are ±1 standard deviation."""
    adv = group_advantages(torch.tensor([1e8, 1e8 + 8, 5.0, 7.0]), torch.tensor([0, 0, 1, 1]))
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
