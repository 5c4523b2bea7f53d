"""One mini-batch's gradient through `Trainer._accumulate`, then one optimizer step, on a fixed
synthetic batch: run alone (one process) or under `torchrun --nproc_per_node N` (FSDP2 over
gloo), it writes the loss terms, the full gradients and the updated parameters to OUT (rank 0).
tests/test_distributed.py compares the two.

    python tests/distributed_worker.py OUT [DEVICE]
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py OUT
    APPO_FSDP=1 torchrun --standalone --nproc_per_node 1 tests/distributed_worker.py OUT cuda

DEVICE: cpu (default) or cuda; the model is float32 on either.

The batch: 4 prompts with 2 responses each, some tokens tool results (mask 0); prompts 0 and 2
are long and 1 and 3 short, so that with a small token budget rank 0 of 2 runs two micro-batches
and rank 1 one (the padded forward pass is exercised). Old log-probs are the policy's own,
perturbed, and advantages random: each drawn per sequence from its global index, so every
process sees the same values for the sequences it holds.
"""

import sys

import torch

from appo import distributed
from appo.algorithms import PackedRollouts
from appo.config import Config, apply_overrides
from appo.forward import by_group
from appo.rollout.base import Sample
from appo.trainer import Trainer

PROMPTS = 4
RESPONSE_LENGTHS = {0: (30, 26), 1: (5, 7), 2: (28, 24), 3: (6, 4)}  # per prompt


def config(out: str, device: str = "cpu") -> Config:
    c = Config()
    apply_overrides(c, [
        "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=48", "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.model.warm_start_steps=0", "data.val_size=0", f"trainer.device={device}",
        "actor_rollout_ref.model.dtype=float32",
        "trainer.progress=false", "trainer.test_freq=0", f"trainer.default_local_dir={out}",
        "actor_rollout_ref.actor.kl_loss_coef=0.1", "actor_rollout_ref.actor.entropy_coeff=0.01",
        "actor_rollout_ref.actor.optim.lr=1e-3", "actor_rollout_ref.actor.optim.lr_warmup_steps=0",
        "actor_rollout_ref.actor.ppo_epochs=2"])  # (APPO needs two mini-batches; one is run)
    return c


def sequence(index: int, length: int, vocab: int, generator: torch.Generator) -> Sample:
    ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
    mask = [0 if 3 <= t < 6 else 1 for t in range(length)]  # tokens 3-5: a tool result
    return Sample(prompt_ids=[], response_ids=ids, response_mask=mask,
                  response_logprobs=[0.0] * length, prompt_index=index)


def main(out: str, device: str = "cpu") -> None:
    trainer = Trainer(config(out + "/run", device), log=lambda *a: None)
    dist = trainer.dist
    mine = list(range(dist.rank, PROMPTS, dist.world))  # this rank's prompts, as in a step
    prompts, samples, group, seeds = [], [], [], []
    for local, p in enumerate(mine):
        g = torch.Generator().manual_seed(1000 + p)
        prompts.append(torch.randint(3, trainer.vocab_size, (7 + p,), generator=g).tolist())
        for k, length in enumerate(RESPONSE_LENGTHS[p]):
            samples.append(sequence(local, length, trainer.vocab_size, g))
            group.append(local)
            seeds.append(10 * p + k)
    train = PackedRollouts.of(samples, group, [0.0] * len(samples), trainer.device)
    with torch.no_grad():
        old = trainer._stats(trainer.rollout_model, train, prompts).logprob
        ref = trainer._stats(trainer.ref_model, train, prompts).logprob
    noise, adv = [], []
    for seed, s in zip(seeds, samples):
        g = torch.Generator().manual_seed(seed)
        noise.append(0.2 * torch.randn(len(s.response_ids), generator=g))
        adv.append(torch.randn((), generator=g).expand(len(s.response_ids)))
    old = old + torch.cat(noise)
    adv_tok = torch.cat(adv)

    trainer.model.train()
    seqs = [prompts[g] + s.response_ids for s, g in zip(samples, group)]
    sums = trainer._accumulate(by_group(train.group), train, prompts, seqs, adv_tok, old, ref,
                               trainer.algorithm)
    grads = {name: _full(p.grad) for name, p in trainer.model.named_parameters()}
    norm = distributed.local_value(torch.nn.utils.clip_grad_norm_(trainer.model.parameters(),
                                                                  1e9))
    trainer.optimizer.step()
    params = (distributed.full_state(trainer.model) if dist.sharded
              else trainer.model.state_dict())
    trainer._push_weights()  # the rollout copy (under torchrun) takes the trained weights
    copy = trainer.rollout_model.state_dict()
    pushed = max(float((copy[k] - v).abs().max()) for k, v in params.items())
    if dist.main:
        torch.save({"sums": sums, "grads": grads, "grad_norm": norm, "pushed": pushed,
                    "sharded": dist.sharded,
                    "params": {k: v.detach().cpu().clone() for k, v in params.items()},
                    "world": dist.world}, out + "/result.pt")
    dist.close()


def _full(tensor):
    full = getattr(tensor, "full_tensor", None)
    return (full() if full is not None else tensor).detach().cpu().clone()


if __name__ == "__main__":
    main(*sys.argv[1:3])
