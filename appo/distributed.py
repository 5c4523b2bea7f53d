"""`appo train` on several processes: `torchrun --nproc_per_node N -m appo train ...`
(docs/training.md, "Several GPUs").

The data-parallel layout, one process per GPU (or per CPU slot, with gloo):

- every rank draws the same prompts of a step and keeps its share (`prompt k` goes to rank
  `k % world`); a prompt's rollouts and branches stay on one rank, so group statistics (Ω,
  dual-group advantages) are whole;
- the policy is trained as an FSDP2 module (`fully_shard` on every decoder layer, then on the
  model); each rank also holds one unsharded copy of the policy that generates and scores (the
  rollout copy: generation calls the model a different number of times on every rank, which a
  sharded module cannot do) and is refreshed from the trained weights after every update;
- the KL reference is unsharded on every rank (it only scores);
- the update: each mini-batch's loss is normalised by the token (or sequence) count of the whole
  mini-batch over all ranks, every rank runs the same number of forward passes (the ranks with
  fewer micro-batches run empty ones), and FSDP's averaged gradient is scaled back to a sum, so
  the gradient equals the one-process gradient of the same batch (tests/test_distributed.py);
- rank 0 writes the run directory (metrics, plots, checkpoints with full state dicts, rollout
  pages); `--resume` reads the checkpoint on every rank (a file system every node sees).

`Solo` is the one-process case: every collective is the identity and nothing is sharded, so the
trainer has one code path.
"""

from __future__ import annotations

import datetime
import os
import types
from typing import Any, Optional

import torch

WORLD_ENV = "WORLD_SIZE"


class Solo:
    """One process: no collectives, nothing sharded."""

    rank, world, local_rank = 0, 1, 0
    main = True
    sharded = False

    def start(self, name: str) -> torch.device:
        """The device of `trainer.device` = `name` for this process (collectives from here on)."""
        return torch.device(name if name != "auto" else
                            ("cuda" if torch.cuda.is_available() else "cpu"))

    def sum(self, values: list[float]) -> list[float]:
        return list(values)

    def max(self, value: float) -> float:
        return value

    def gather(self, obj: Any) -> list:
        return [obj]

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def broadcast_module(self, module: torch.nn.Module) -> None:
        pass

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class Group(Solo):
    """The ranks of a torchrun launch (the default process group)."""

    sharded = True

    def __init__(self):
        import torch.distributed as dist

        if "RANK" not in os.environ or WORLD_ENV not in os.environ:
            raise ValueError(f"{WORLD_ENV}={os.environ.get(WORLD_ENV)}, RANK="
                             f"{os.environ.get('RANK')}: start the processes with torchrun")
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ[WORLD_ENV])
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.main = self.rank == 0
        self._dist = dist

    def start(self, name: str) -> torch.device:
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if device.type == "cuda":
            if device.index is not None:
                raise ValueError(f"trainer.device = {name!r}: under torchrun each process takes "
                                 f"the GPU of its LOCAL_RANK; pass cuda or auto")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not self._dist.is_initialized():
            self._dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                          timeout=datetime.timedelta(hours=1))
        self._device = device
        return device

    def _tensor(self, values, dtype=torch.float64) -> torch.Tensor:
        # gloo reduces CPU tensors, nccl CUDA ones
        return torch.tensor(values, dtype=dtype, device=self._device)

    def sum(self, values: list[float]) -> list[float]:
        t = self._tensor(values)
        self._dist.all_reduce(t)
        return t.tolist()

    def max(self, value: float) -> float:
        t = self._tensor([value])
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX)
        return float(t[0])

    def gather(self, obj: Any) -> list:
        out: list = [None] * self.world
        self._dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        return self.max(1.0 if flag else 0.0) > 0

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank."""
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                self._dist.broadcast(tensor.data, src=0)

    def barrier(self) -> None:
        self._dist.barrier()

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


def world_size() -> int:
    """The number of processes of this launch (torchrun's WORLD_SIZE; 1 without it)."""
    world = os.environ.get(WORLD_ENV)
    try:
        return int(world) if world is not None else 1
    except ValueError:
        raise ValueError(f"{WORLD_ENV}={world!r} is not an integer") from None


FORCE_ENV = "APPO_FSDP"  # "1": the sharded path even with one process (under torchrun)


def from_env() -> Solo:
    """`Group` when started by torchrun with more than one process (or with APPO_FSDP=1, which
    checks the sharded path on one GPU), else `Solo`."""
    forced = os.environ.get(FORCE_ENV, "0") not in ("", "0")
    return Group() if world_size() > 1 or forced else Solo()


# ----------------------------------------------------------------------------------------------
# the sharded policy

FUSED_METHOD = "appo_fused_forward"


def _fused_forward(self, inputs: dict, stats):
    """`stats(hidden, head_weight, head_bias)` on the model's last hidden states: one method of
    the model so that FSDP gathers the head's weights (and gathers them again for the backward)."""
    hidden = self.base_model(**inputs).last_hidden_state
    head = self.get_output_embeddings()
    return stats(hidden, head.weight, head.bias)


def fused_forward(model, inputs: dict, stats):
    """`_fused_forward` through the model's registered method when it is sharded."""
    method = getattr(model, FUSED_METHOD, None)
    if method is None:
        return _fused_forward(model, inputs, stats)
    return method(inputs, stats)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 over the ranks: each decoder layer a unit, the rest (embeddings, final norm, head;
    tied embeddings stay one parameter) the root's. Check `appo.forward.fused_head` before: it
    runs the unsharded model."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    layers = _decoder_layers(model)
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    setattr(model, FUSED_METHOD, types.MethodType(_fused_forward, model))
    register_fsdp_forward_method(model, FUSED_METHOD)
    return model


def _decoder_layers(model) -> list:
    base = getattr(model, "base_model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no base_model.layers to shard; appo's torchrun "
                         f"mode knows decoder-only transformers models")
    return list(layers)


def copy_full(sharded, target: torch.nn.Module) -> None:
    """The trained parameters of `sharded` into the unsharded `target` of the same architecture,
    one parameter gathered at a time (a collective)."""
    params = dict(target.named_parameters())
    with torch.no_grad():
        for name, param in sharded.named_parameters():
            full = getattr(param, "full_tensor", None)
            params[name].copy_(full() if full is not None else param)


def full_state(model) -> dict:
    """The full (unsharded) parameters and buffers on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def named_optimizer_state(model, optimizer) -> dict:
    """The optimizer's state keyed by parameter name (one process)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict)

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(model, optimizer) -> dict:
    """The sharded optimizer's full state keyed by parameter name, on rank 0 (on the CPU); an
    empty dict on the other ranks (a collective)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict)

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict, *, broadcast: bool) -> None:
    """Load a checkpoint's optimizer state: keyed by parameter name (any number of processes;
    `broadcast`: the ranks take rank 0's copy), or by index as checkpoints written before
    torchrun support were (one process only)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_optimizer_state_dict)

    params = [p for group in state.get("param_groups", []) for p in group.get("params", [])]
    if params and isinstance(params[0], int):
        if broadcast:
            raise ValueError("this checkpoint's optimizer state is keyed by parameter index (an "
                             "older appo): resume it with one process, then under torchrun")
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=broadcast))


def local_value(value) -> float:
    """A DTensor's full value (e.g. a gradient norm over sharded parameters) as a float."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)
