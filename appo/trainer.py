"""The APPO training loop (docs/algorithm.md; docs/training.md). One step reads top to bottom as
the algorithm does:

    rollout -> score -> [APPO's order: first PPO mini-batch] -> branch -> reward -> advantages
    -> PPO mini-batches -> push weights

What differs between APPO, ARPO and GRPO lives in the algorithm objects (`appo.algorithms`),
behind the hooks the step calls. Every per-token quantity comes from `appo_kernels`: exact
entropy and log-probs from one packed tree pass (`appo.forward`), the clipped loss and the KL
penalty here; Ω, branching, advantages and future-KL scaling in the algorithms. Around the loop:
the policy and reference models (`appo.policy`), engines (`appo.rollout.engines`), the tool
protocol (`appo.rollout.protocol`), the output directory, checkpoints and signals (`appo.run`),
and what a run reports (`appo.report`).

Reproducibility: every random draw of step k (its prompts, the engine's sampling seeds, the
algorithm's branch draws, the mini-batch order) is seeded from (trainer.seed, k), never from
global state, so a run resumed from the checkpoint of step k makes the same step k + 1 as the
uninterrupted run.

Interrupts (SIGINT, SIGTERM): see `appo.run`; at most one step is lost. Once APPO's first
mini-batch has moved the policy, the step is completed before a signal is acted on.
"""

from __future__ import annotations

import copy
import math
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from appo import algorithms, distributed
from appo.algorithms import PackedRollouts, StepContext, masked_mean
from appo.config import Config, dump_yaml
from appo.evaluate import EvalResult, evaluate, response_text
from appo.forward import (RolloutStats, by_group, fused_head, micro_batches,
                          response_token_stats, rollout_token_stats, token_index)
from appo.policy import (load_policy, load_reference, wants_warm_start, warm_start_policy,
                         weights_dir)
from appo.report import ROLLOUTS_FILE, RolloutsPage, format_postfix, plot_metrics, progress
from appo.report.loggers import NoLoggers, RunLoggers
from appo.report.steps import (RANK_SUMS, StageClock, TimedEngine, UpdateLog, describe_eval,
                               first_eval, learning_signal, rollout_groups, rollout_metrics,
                               timed)
from appo.rollout.base import SamplingParams
from appo.rollout.engines import EngineContext, make_engine
from appo.rollout.protocol import make_protocol
from appo.rollout.tools import configure_python
from appo.run import CONFIG_FILE, Interrupts, RunDir, default_out_dir
from appo.tasks import get_task
from appo_kernels import kl_penalty, policy_loss, vocab_flags


@dataclass
class TrainResult:
    out_dir: Path
    step: int  # the last complete step
    interrupted: Optional[str]  # the signal that stopped the run early ("SIGINT", "SIGTERM")
    eval_before: Optional[float]  # held-out accuracy before the first RL step
    eval_after: Optional[float]  # ... after the last one
    seconds: float


class Trainer:
    def __init__(self, config: Config, *, out_dir=None, resume: bool = False, log=print):
        self.config = cfg = config.validate()
        # one process, or one rank of a torchrun launch (appo.distributed)
        self.dist = dist = distributed.from_env()
        _check_world(cfg, dist.world)
        self.log = log if dist.main else _quiet
        out = out_dir or cfg.trainer.default_local_dir
        self.run = RunDir(out or default_out_dir(cfg.algorithm.adv_estimator), resume=resume)
        self.out = self.run.path
        self.device = dist.start(cfg.trainer.device)
        threads = cfg.trainer.cpu_threads or (1 if cfg.model.path is None else None)
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        self.task = get_task(cfg.data.task, **cfg.data.task_options)
        self.train_problems = self.task.split("train")
        if len(self.train_problems) < cfg.data.train_batch_size:
            raise ValueError(f"data.train_batch_size = {cfg.data.train_batch_size} but task "
                             f"{cfg.data.task!r} has {len(self.train_problems)} train problems")
        self._bar = None
        self.loggers = RunLoggers(cfg.trainer.logger, self.out, config=cfg.to_dict(),
                                  project=cfg.trainer.project_name,
                                  experiment=cfg.trainer.experiment_name, write=self._write,
                                  console_lines=not cfg.trainer.progress) if dist.main \
            else NoLoggers()
        self.step = 0
        self.model, self.tokenizer = load_policy(cfg, self.device, self.run.resume_from)
        self.protocol = make_protocol(cfg.rollout.tool_format, self.tokenizer)
        cfg.rollout.tool_format = self.protocol.name
        self.task.format = self.protocol  # the task reads responses in the run's format
        if self.run.resume_from is None and wants_warm_start(cfg) and dist.main:
            warm_start_policy(self.model, self.tokenizer, self.task, cfg, self.protocol, self.run)
        dist.broadcast_module(self.model)  # every rank starts from rank 0's policy
        if dist.main:
            dump_yaml(cfg, self.run / CONFIG_FILE)  # with the tool format resolved
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                       else self.tokenizer.eos_token_id)
        self.whitespace = vocab_flags(self.tokenizer, vocab_size=self.vocab_size,
                                      device=self.device).is_whitespace
        self.ref_model = load_reference(cfg, self.device, self.model, self.run)
        # the policy that generates and scores: the trained module itself in one process; under
        # torchrun an unsharded copy, refreshed after every update (`_push_weights`)
        self.rollout_model = self.model
        if dist.sharded:
            if cfg.actor.fused_lm_head:
                fused_head(self.model)  # checked on the unsharded model, remembered
            self.rollout_model = copy.deepcopy(self.model)
            self.model = distributed.shard(self.model)
        tools = configure_python(self.task.tools(), **vars(cfg.tools.python))
        if "python" in tools and cfg.tools.python.sandbox == "rlimits":
            self.log("warning: tools.python.sandbox=rlimits: the policy's python code runs "
                     "WITHOUT a sandbox (it can read and write what the trainer can; "
                     "docs/sandbox.md)")
        self.clock = StageClock()  # time_generate, time_fork, time_score, ... per step
        self.engine = TimedEngine(make_engine(cfg.rollout.name, EngineContext(
            self.rollout_model, self.tokenizer, tools, self.protocol,
            lambda: weights_dir(cfg, self.run, self.rollout_model, self.tokenizer),
            seed=cfg.trainer.seed, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            device=self.device, model_is_copy=self.rollout_model is not self.model)), self.clock)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.actor.optim.lr, betas=tuple(cfg.actor.optim.betas),
            weight_decay=cfg.actor.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.algorithm = algorithms.get_algorithm(cfg.algorithm.adv_estimator, cfg.algorithm,
                                                  cfg.rollout.n, self.vocab_size)
        describe = self.protocol.describe()
        self.rollout_report = RolloutsPage(
            self.out / ROLLOUTS_FILE, info=f"tool format {describe['name']}: call "
            f"{describe.get('call', '-')}, result {describe.get('result', '-')}"
            + (" (rank 0's prompts)" if dist.sharded else "")) if dist.main else None
        if self.run.resume_from is not None:
            self._restore(self.run.resume_from)
        # under torchrun every signal waits for the end of the step: the ranks stop together
        self.interrupts = Interrupts(self.log, defer=dist.sharded)

    # ------------------------------------------------------------------------------------------
    # the loop

    def train(self) -> TrainResult:
        cfg = self.config.trainer
        started = time.monotonic()
        total = cfg.total_training_steps
        eval_before = eval_after = None
        interrupted = None
        self._bar = bar = progress(total, initial=self.step, desc=f"{self.algorithm.name} train",
                                   enabled=cfg.progress and self.dist.main)
        with self.interrupts:
            try:
                if self.step == 0 and cfg.val_before_train:
                    record = {"step": 0, **self._evaluate(0)}
                    eval_before = record.get("eval_accuracy")
                    self.loggers.log(record)
                    self._write(describe_eval(record))
                else:
                    eval_before = first_eval(self.loggers.metrics.records())
                while self.step < total:
                    record = self.train_step(self.step + 1)
                    self.interrupts.critical = True  # the step is complete: finish its bookkeeping
                    self.step += 1
                    last = self.step == total
                    timed_out = self.dist.any(cfg.max_time_s is not None and (
                        time.monotonic() - started > cfg.max_time_s))
                    if last or timed_out or (cfg.test_freq and self.step % cfg.test_freq == 0):
                        record.update(self._evaluate(self.step))
                        self._write(describe_eval(record))
                    self.loggers.log(record)
                    bar.set_postfix(format_postfix(record))
                    bar.update()
                    if last or timed_out or (cfg.save_freq and self.step % cfg.save_freq == 0):
                        self.save_checkpoint()
                    self.interrupts.critical = False
                    if "eval_accuracy" in record:
                        eval_after = record["eval_accuracy"]
                    requested = next((name for name in self.dist.gather(
                        self.interrupts.requested) if name), None)  # any rank's signal
                    if requested:
                        raise KeyboardInterrupt(requested)
                    if timed_out:
                        self._write(f"trainer.max_time_s = {cfg.max_time_s} reached after step "
                                  f"{self.step}")
                        break
            except KeyboardInterrupt as stop:  # Ctrl-C (no name) or our handler's signal name
                interrupted = stop.args[0] if stop.args else "SIGINT"
                self.interrupts.critical = True
                if self.dist.any(self.dist.main and self.run.latest_checkpoint()
                                 != self.run.checkpoint_dir(self.step)):  # rank 0's disk
                    self.save_checkpoint()
                self._write(f"interrupted: saved step {self.step}; continue with "
                          f"`appo train --resume {self.out}`")
            finally:
                bar.close()
                self._bar = None
                self.loggers.close()
                if self.dist.main:
                    plot_metrics(self.loggers.metrics.records(), self.out)
        return TrainResult(self.out, self.step, interrupted, eval_before, eval_after,
                           time.monotonic() - started)

    def train_step(self, step: int) -> dict:
        """One APPO/ARPO/GRPO step; returns its metrics."""
        cfg, algo = self.config, self.algorithm
        started, self.clock.seconds = time.monotonic(), {}
        problems = self._problems_for(step)
        prompts = [self.protocol.encode_prompt(p.prompt, self.task.instructions,
                                               self.task.tool_names) for p in problems]
        context = self._context(step, prompts, problems)

        # 1. rollout: n initial samples per prompt with the tool loop
        samples = self.engine.generate(prompts, algo.initial_rollouts(),
                                       self._sampling(step, phase=0))
        init = self._rollout_set(samples, [s.prompt_index for s in samples], problems)
        rollout_s = time.monotonic() - started

        # 2. score: exact entropy and log-probs under the training policy (the old log-probs)
        with torch.no_grad():
            old = self._stats(self.rollout_model, init, prompts)
            ref = (self._stats(self.ref_model, init, prompts) if self.ref_model is not None
                   else None)
        update = UpdateLog()
        policy = old
        if algo.updates_before_branching:  # APPO's order: learn from the initial rollouts first
            self.interrupts.critical = True  # the policy moves: the step completes from here on
            plan = self._minibatches(step, init)
            self._update(plan[:1], init, prompts, algo.initial_advantages(init), old.logprob,
                         ref and ref.logprob, algo, update)
            self._push_weights()  # forks sample from the updated policy
            with torch.no_grad():
                policy = self._stats(self.rollout_model, init, prompts)

        # 3. branch: the algorithm scores the tokens and forks through the context
        forked = time.monotonic()
        branched = algo.branch(init, policy, context)
        rollout_s += time.monotonic() - forked

        # 4-5. rewards are in the rollout sets; advantages per token of the trained sequences
        adv = algo.advantages(init, branched)
        train = adv.train
        signal = learning_signal(step, train, adv.adv_tok, init, branched.branches)
        if "warning" in signal:
            self._write(f"warning: {signal['warning']}")
        old_logprob, ref_logprob = old.logprob, ref and ref.logprob
        if train is not init:  # ARPO/GRPO train the branches too: their old and ref log-probs
            with torch.no_grad():
                old_logprob = torch.cat([old_logprob, self._stats(
                    self.rollout_model, branched.branches, prompts).logprob])
                if ref is not None:
                    ref_logprob = torch.cat([ref_logprob, self._stats(
                        self.ref_model, branched.branches, prompts).logprob])

        # 6. PPO update (held against signals from here: the step completes or never started)
        self.interrupts.critical = True
        plan = self._minibatches(step, train)
        self._update(plan[1:] if algo.updates_before_branching else plan, train, prompts,
                     adv.adv_tok, old_logprob, ref_logprob, algo, update)
        self.scheduler.step()
        self._push_weights()

        elapsed = time.monotonic() - started
        times = {"rollout": rollout_s, "train": elapsed - rollout_s}
        record = {"step": step, **rollout_metrics(init, branched.branches, old, times),
                  **branched.metrics, **signal, **update.means(), **self.clock.metrics(),
                  "lr": self.optimizer.param_groups[0]["lr"], "time_step": elapsed}
        record = _merge_ranks(self.dist.gather(record))
        if cfg.trainer.html_prompts > 0 and self.rollout_report is not None:
            self.rollout_report.add_step(step, rollout_groups(
                self.tokenizer.decode, problems, prompts, init, branched, policy.entropy,
                cfg.trainer.html_prompts))
        return record

    # ------------------------------------------------------------------------------------------
    # pieces of a step

    def _problems_for(self, step: int):
        """This process's prompts of step `step`: every rank draws the same batch and keeps every
        world-th prompt."""
        rng = random.Random(f"{self.config.trainer.seed}/prompts/{step}")
        batch = rng.sample(self.train_problems, self.config.data.train_batch_size)
        return batch[self.dist.rank::self.dist.world]

    def _push_weights(self) -> None:
        """The trained weights into the rollout copy (under torchrun) and the engine."""
        if self.rollout_model is not self.model:
            distributed.copy_full(self.model, self.rollout_model)
        self.engine.update_weights(self.rollout_model)

    def _sampling(self, step: int, phase: int) -> SamplingParams:
        cfg = self.config
        seed = _seed(cfg.trainer.seed, "sampling", step, phase)
        return SamplingParams(temperature=cfg.rollout.temperature,
                              max_response_len=cfg.data.max_response_length,
                              max_tool_calls=cfg.rollout.max_tool_calls, seed=seed)

    def _generator(self, step: int, purpose: str) -> torch.Generator:
        return torch.Generator().manual_seed(_seed(self.config.trainer.seed, purpose, step))

    def _rollout_set(self, samples, group, problems) -> PackedRollouts:
        grades = [self.task.grade(response_text(self.protocol, s), problems[g])
                  for s, g in zip(samples, group)]
        return PackedRollouts.of(samples, group, [g.reward for g in grades], self.device, grades)

    def _eligible(self, init: PackedRollouts):
        """Tokens a fork may keep: model tokens that are not whitespace and not a response's
        last token (nothing follows it: a fork there would only repeat the parent)."""
        last = torch.zeros_like(init.mask)
        last[init.cu_seqlens[1:][init.lengths > 0] - 1] = True
        return init.mask & ~self.whitespace[init.ids] & ~last

    def _context(self, step: int, prompts, problems) -> StepContext:
        """What the algorithm may ask for while it branches; each fork and generate call samples
        from its own seeded streams."""
        calls = iter(range(1, 1_000_000, 2))  # odd phases for forks (the first is phase 1)

        def fork(parents, positions, groups):
            forks = self.engine.fork(list(parents), list(positions), 1,
                                     self._sampling(step, next(calls)))
            return self._rollout_set(forks, list(groups), problems)

        def generate(wanted):
            extra = self.engine.generate([prompts[g] for g in wanted], 1, self._sampling(step, 2))
            return self._rollout_set(extra, [wanted[s.prompt_index] for s in extra], problems)

        return StepContext(fork, generate, lambda rollouts: self._stats(self.rollout_model,
                                                                        rollouts, prompts),
                           self._eligible, self._generator(step, "branch"))

    @timed("score")
    def _stats(self, model, rollouts: PackedRollouts, prompts) -> RolloutStats:
        """Per-token log-prob and entropy of `rollouts` under `model`, micro-batched."""
        return rollout_token_stats(
            model, [prompts[g] for g in rollouts.group.tolist()],
            [s.response_ids for s in rollouts.samples], rollouts.group,
            token_budget=self.config.actor.ppo_max_token_len_per_gpu,
            temperature=self.config.rollout.temperature, unrolled=self.config.actor.unrolled,
            pad_id=self.pad_id, fused=self.config.actor.fused_lm_head)

    def _forward(self, model, rollouts: PackedRollouts, prompts, batch: list[int]):
        return response_token_stats(
            model, [prompts[int(rollouts.group[i])] for i in batch],
            [rollouts.samples[i].response_ids for i in batch],
            temperature=self.config.rollout.temperature, unrolled=self.config.actor.unrolled,
            pad_id=self.pad_id, fused=self.config.actor.fused_lm_head)

    def _minibatches(self, step: int, train: PackedRollouts) -> list[list[list[int]]]:
        """The PPO epochs' mini-batches, in order: each a list of prompt groups (sequence indices
        of `train`), the prompts shuffled anew every epoch."""
        actor = self.config.actor
        groups = by_group(train.group)
        generator = self._generator(step, "minibatch")
        plan = []
        for _ in range(actor.ppo_epochs):
            order = torch.randperm(len(groups), generator=generator).tolist()
            size = actor.ppo_mini_batch_size // self.dist.world  # this rank's share of prompts
            for start in range(0, len(order), size):
                plan.append([groups[i] for i in order[start:start + size]])
        return plan

    @timed("update")
    def _update(self, plan, train: PackedRollouts, prompts, adv_tok, old_logprob, ref_logprob,
                algo, log: UpdateLog) -> None:
        """One optimizer step per mini-batch of `plan`, each micro-batched by token budget."""
        actor = self.config.actor
        seqs = [list(prompts[int(g)]) + s.response_ids
                for s, g in zip(train.samples, train.group)]
        self.model.train()
        for mini in plan:
            sums = self._accumulate(mini, train, prompts, seqs, adv_tok, old_logprob,
                                    ref_logprob, algo)
            grad_norm = distributed.local_value(
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), actor.grad_clip))
            if math.isfinite(grad_norm):
                self.optimizer.step()
            else:
                self.log("non-finite gradient norm: an update skipped")
            log.add({**sums, "grad_norm": grad_norm})
        self.model.eval()

    def _accumulate(self, mini, train: PackedRollouts, prompts, seqs, adv_tok, old_logprob,
                    ref_logprob, algo) -> dict[str, float]:
        """The gradient of one mini-batch's loss (its prompt groups on every rank) in the
        parameters' `.grad`, micro-batch by micro-batch (`seqs`: each trained sequence's prompt
        and response tokens); returns the loss terms, averaged over the mini-batch as the loss
        is."""
        actor, dist = self.config.actor, self.dist
        per_token = actor.loss_agg_mode in ("token-mean", "dapo")
        mine = [i for g in mini for i in g]
        # the micro-batch losses, weighted to the mean over the whole mini-batch (all ranks)
        tokens, sequences = dist.sum([float(train.mask[token_index(train.cu_seqlens, mine)].sum()),
                                      float(len(mine))])
        denominator = max(1.0, tokens) if per_token else sequences
        batches = micro_batches(mini, seqs, actor.ppo_max_token_len_per_gpu)
        # FSDP: every rank runs as many forward passes as the rank with the most micro-batches
        padding = int(dist.max(len(batches))) - len(batches)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for batch in batches:
            index = token_index(train.cu_seqlens, batch)
            stats = self._forward(self.model, train, prompts, batch)
            lengths = train.lengths[batch]
            cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
            mask, old = train.mask[index], old_logprob[index]
            adv = algo.adjust(adv_tok[index], stats.logprob, old, cu, mask, actor.clip_ratio_c)
            loss, metrics = policy_loss(
                stats.logprob, old, adv, mask, clip_low=actor.clip_ratio_low,
                clip_high=actor.clip_ratio_high, clip_c=actor.clip_ratio_c,
                agg=actor.loss_agg_mode, seq_filter=actor.seq_filter, cu_seqlens=cu)
            share = (int(mask.sum()) if per_token else len(batch)) / denominator
            token_mean = masked_mean(mask)
            if ref_logprob is not None:
                kl = token_mean(kl_penalty(stats.logprob, ref_logprob[index],
                                           kind=actor.kl_loss_type))
                loss = loss + actor.kl_loss_coef * kl
                metrics["kl_ref"] = kl.detach()
            if actor.entropy_coeff:
                loss = loss - actor.entropy_coeff * token_mean(stats.entropy)
            # FSDP averages the ranks' gradients: x world makes that average the sum
            (loss * (share * dist.world)).backward()
            metrics["loss"] = loss.detach()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value) * share
        for _ in range(padding):  # an empty pass: no gradient, the collectives in step
            stats = self._forward(self.model, train, prompts, batches[0][:1])
            (stats.logprob.sum() * 0.0).backward()
        keys = sorted(sums)
        return dict(zip(keys, dist.sum([sums[k] for k in keys])))

    def _evaluate(self, step: int) -> dict:
        cfg = self.config
        if cfg.data.val_size == 0:
            return {}
        sampling = SamplingParams(temperature=cfg.rollout.temperature,
                                  max_response_len=cfg.data.max_response_length,
                                  max_tool_calls=cfg.rollout.max_tool_calls,
                                  seed=_seed(cfg.trainer.seed, "eval"))
        # the same eval seed at every step: the differences are the policy's, not the draws'
        result = EvalResult.merge(self.dist.gather(evaluate(
            self.engine, self.task, n_problems=cfg.data.val_size, sampling=sampling,
            greedy=not cfg.rollout.val_kwargs.do_sample,
            shard=(self.dist.rank, self.dist.world))))  # each rank scores its share
        return {"eval_accuracy": result.accuracy, "eval_reward": result.mean_reward,
                "eval_bad_format": result.format_error_rate,
                "eval_tool_calls": result.mean_tool_calls, "eval_n": result.n}

    def _write(self, message: str) -> None:
        if self.dist.main:
            (self._bar.write if self._bar is not None else self.log)(message)

    # ------------------------------------------------------------------------------------------
    # schedule, checkpoints

    def _lr_factor(self, step: int) -> float:
        optim = self.config.actor.optim
        total = max(1, self.config.trainer.total_training_steps)
        if step < optim.lr_warmup_steps:
            return (step + 1) / optim.lr_warmup_steps
        if optim.lr_scheduler_type == "constant":
            return 1.0
        progress_ = min(1.0, (step - optim.lr_warmup_steps) /
                        max(1, total - optim.lr_warmup_steps))
        cosine = 0.5 * (1 + math.cos(math.pi * progress_))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * cosine

    def save_checkpoint(self) -> Path:
        """Save the policy, optimizer, schedule and step (`appo.run`), then the plots; under
        torchrun the full state dicts, written by rank 0. The optimizer's state is keyed by
        parameter name, so any number of processes can resume it."""
        optimizer = (distributed.full_optimizer_state(self.model, self.optimizer)
                     if self.dist.sharded else distributed.named_optimizer_state(
                         self.model, self.optimizer))
        path = self.run.checkpoint_dir(self.step)
        if self.dist.main:  # the rollout copy holds the trained weights (`_push_weights`)
            path = self.run.save_checkpoint(
                self.step, self.rollout_model, self.tokenizer,
                {"optimizer": optimizer, "scheduler": self.scheduler.state_dict()},
                keep=self.config.trainer.max_actor_ckpt_to_keep)
            plot_metrics(self.loggers.metrics.records(), self.out)
        self.dist.barrier()
        return path

    def _restore(self, checkpoint: Path) -> None:
        state = self.run.load_state(checkpoint, self.device)
        distributed.load_optimizer_state(self.model, self.optimizer, state["optimizer"],
                                         broadcast=self.dist.sharded)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        dropped = self.loggers.metrics.truncate_after(self.step)
        self.log(f"resumed {self.out} at step {self.step}"
                 + (f" ({dropped} later metric records dropped)" if dropped else ""))


# ----------------------------------------------------------------------------------------------
# helpers

def _check_world(config: Config, world: int) -> None:
    """What a torchrun launch of `world` processes needs of the config."""
    if world == 1:
        return
    for key, value in (("data.train_batch_size", config.data.train_batch_size),
                       ("actor_rollout_ref.actor.ppo_mini_batch_size",
                        config.actor.ppo_mini_batch_size)):
        if value % world:
            raise ValueError(f"{key} = {value}: under torchrun it must be a multiple of the "
                             f"number of processes ({world}), each taking an equal share")
    if config.rollout.name != "hf":
        raise ValueError(f"actor_rollout_ref.rollout.name = {config.rollout.name!r}: under "
                         f"torchrun appo generates with the hf engine only (one vLLM per rank is "
                         f"not supported yet; docs/training.md, \"Several GPUs\")")


def _quiet(*args, **kwargs) -> None:
    """The log of every rank but 0."""


def _merge_ranks(records: list[dict]) -> dict:
    """One step record from every rank's: counts (`RANK_SUMS`) summed, times (`time_*`) and
    `*_max` their maximum (the slowest rank sets the pace), `*_min` their minimum, other numbers
    averaged over the ranks that have them (each rank holds an equal share of the prompts),
    anything else rank 0's (or the first rank's that has it)."""
    if len(records) == 1:
        return records[0]
    merged: dict = {}
    for key in dict.fromkeys(k for r in records for k in r):
        values = [r[key] for r in records if key in r]
        if key == "step" or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                    for v in values):
            merged[key] = values[0]
        elif key in RANK_SUMS:
            merged[key] = sum(values)
        elif key.startswith("time") or key.endswith("_max"):
            merged[key] = max(values)
        elif key.endswith("_min"):
            merged[key] = min(values)
        else:
            merged[key] = sum(values) / len(values)
    return merged

def _seed(*parts) -> int:
    """A 32-bit seed from ints and strings, the same in every process (no `hash()`)."""
    words = [p if isinstance(p, int) else zlib.crc32(str(p).encode()) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0])
