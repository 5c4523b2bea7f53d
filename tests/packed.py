"""Random packed layouts for the sequence-op tests: `cu_seqlens` with empty and length-1
sequences among longer ones, and the (start, end) spans that brute-force references loop over."""

import torch

EDGE_LENGTHS = (0, 1)  # every random packing holds an empty and a length-1 sequence


def random_lengths(n_seqs: int, max_len: int) -> list[int]:
    lengths = torch.randint(0, max_len + 1, (n_seqs,)).tolist()
    lengths[:len(EDGE_LENGTHS)] = EDGE_LENGTHS
    return [lengths[i] for i in torch.randperm(n_seqs).tolist()]


def cu_seqlens_of(lengths, dtype=torch.int32, device="cpu") -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=dtype)
    cu[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
    return cu.to(device)


def spans(cu) -> list[tuple[int, int]]:
    cu = cu.tolist()
    return list(zip(cu[:-1], cu[1:]))
