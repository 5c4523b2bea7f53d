"""The APPO training loop (SPEC §3, §4). One step reads top to bottom as the algorithm does:

    rollout -> score -> branch -> reward -> advantages -> PPO mini-batches -> push weights

Every per-token quantity comes from `appo_kernels`: exact entropy and log-probs from one packed
tree pass (`appo.packing`), Ω, branching scores, branch selection, group/procedure advantages,
future-KL scaling, the clipped loss and the KL penalty. Nothing here recomputes them by hand.

Reproducibility: every random draw of step k (its prompts, the engine's sampling seeds, ARPO's
branch draws, the mini-batch order) is seeded from (trainer.seed, k), never from global state, so
a run resumed from the checkpoint of step k makes the same step k + 1 as the uninterrupted run.

Interrupts: Ctrl-C during the rollout phase of a step abandons that step at once; during the
update phase (optimizer steps, weight push, log, checkpoint) it is held until the step is
complete. Either way the trainer then saves a checkpoint of the last complete step and returns,
so at most one step is lost.
"""

from __future__ import annotations

import copy
import math
import random
import shutil
import signal
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from appo import algorithms
from appo.algorithms import Branching, RolloutSet
from appo.config import Config, dump_yaml, load_yaml
from appo.evaluate import evaluate, response_text
from appo.packing import micro_batches, response_token_stats
from appo.prompting import encode_prompt
from appo.report import (METRICS_FILE, ROLLOUTS_FILE, MetricsLog, RolloutReport, format_postfix,
                         plot_metrics, progress)
from appo.rollout.base import SamplingParams
from appo.tasks import get_task
from appo_kernels import (branching_score, future_kl_scale, future_value, kl_penalty,
                          policy_loss, vocab_flags)

CHECKPOINTS = "checkpoints"
LATEST = "latest"  # checkpoints/latest holds the name of the newest complete checkpoint
CONFIG_FILE = "config.yaml"
WARM_START_DIR = "warm_start"  # the policy after the warm start: the reference model on resume
EXIT_INTERRUPTED = 130


@dataclass
class TrainResult:
    out_dir: Path
    step: int  # the last complete step
    interrupted: bool
    eval_before: Optional[float]  # held-out accuracy before the first RL step
    eval_after: Optional[float]  # ... after the last one
    seconds: float


class Trainer:
    def __init__(self, config: Config, *, out_dir=None, resume: bool = False, log=print):
        self.config = config.validate()
        self.log = log
        cfg = config
        self.out = Path(out_dir or cfg.trainer.default_local_dir or _default_out(cfg))
        self.device = torch.device(cfg.trainer.device if cfg.trainer.device != "auto" else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu" and cfg.trainer.cpu_threads:
            torch.set_num_threads(cfg.trainer.cpu_threads)
        self.task = get_task(cfg.data.task, **cfg.data.task_options)
        self.train_problems = self.task.split("train")
        if len(self.train_problems) < cfg.data.train_batch_size:
            raise ValueError(f"data.train_batch_size = {cfg.data.train_batch_size} but task "
                             f"{cfg.data.task!r} has {len(self.train_problems)} train problems")
        self.step = 0
        checkpoint = _latest_checkpoint(self.out) if resume else None
        if resume and checkpoint is None:
            raise ValueError(f"--resume: no checkpoint in {self.out / CHECKPOINTS}")
        if not resume and (self.out / CHECKPOINTS).exists():
            raise ValueError(f"{self.out} already holds a run: pass --resume to continue it, or "
                             f"choose another output directory")
        self.out.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, self.out / CONFIG_FILE)

        self.model, self.tokenizer = self._load_policy(checkpoint)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                       else self.tokenizer.eos_token_id)
        self.whitespace = vocab_flags(self.tokenizer, vocab_size=self.vocab_size,
                                      device=self.device).is_whitespace
        self.stop_ids = {self.tokenizer.eos_token_id}
        self.ref_model = self._load_reference()
        self.engine = self._make_engine()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.actor.optim.lr, betas=tuple(cfg.actor.optim.betas),
            weight_decay=cfg.actor.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.algorithm = algorithms.get_algorithm(cfg.algorithm.adv_estimator, cfg.algorithm,
                                                  cfg.rollout.n, self.vocab_size)
        self.metrics = MetricsLog(self.out / METRICS_FILE)
        self.rollout_report = RolloutReport(self.out / ROLLOUTS_FILE)
        if checkpoint is not None:
            self._restore(checkpoint)
        self._interrupt_requested = False
        self._critical = False

    # ------------------------------------------------------------------------------------------
    # the loop

    def train(self) -> TrainResult:
        cfg = self.config.trainer
        started = time.monotonic()
        total = cfg.total_training_steps
        eval_before = eval_after = None
        interrupted = False
        bar = progress(total, initial=self.step, desc=f"{self.algorithm.name} train",
                       enabled=cfg.progress)
        with self._interrupts():
            try:
                if self.step == 0:
                    record = {"step": 0, **self._evaluate(0)}
                    eval_before = record.get("eval_accuracy")
                    self.metrics.log(record)
                    bar.write(_describe_eval(record))
                else:
                    eval_before = _first_eval(self.metrics.records())
                while self.step < total:
                    record = self.train_step(self.step + 1)
                    self._critical = True  # the step is complete: finish its bookkeeping
                    self.step += 1
                    last = self.step == total
                    timed_out = cfg.max_time_s is not None and (
                        time.monotonic() - started > cfg.max_time_s)
                    if last or timed_out or (cfg.test_freq and self.step % cfg.test_freq == 0):
                        record.update(self._evaluate(self.step))
                        bar.write(_describe_eval(record))
                    self.metrics.log(record)
                    bar.set_postfix(format_postfix(record))
                    bar.update()
                    if last or timed_out or (cfg.save_freq and self.step % cfg.save_freq == 0):
                        self.save_checkpoint()
                    self._critical = False
                    if "eval_accuracy" in record:
                        eval_after = record["eval_accuracy"]
                    if self._interrupt_requested:
                        raise KeyboardInterrupt
                    if timed_out:
                        bar.write(f"trainer.max_time_s = {cfg.max_time_s} reached after step "
                                  f"{self.step}")
                        break
            except KeyboardInterrupt:
                interrupted = True
                self._critical = True
                if _latest_checkpoint(self.out) != self._checkpoint_dir(self.step):
                    self.save_checkpoint()
                bar.write(f"interrupted: saved step {self.step}; continue with "
                          f"`appo train --resume {self.out}`")
            finally:
                bar.close()
                self._write_plots()
        return TrainResult(self.out, self.step, interrupted, eval_before, eval_after,
                           time.monotonic() - started)

    def train_step(self, step: int) -> dict:
        """One APPO/ARPO/GRPO step; returns its metrics."""
        cfg, algo = self.config, self.algorithm
        times = {}
        t0 = time.monotonic()
        problems = self._problems_for(step)
        prompts = [encode_prompt(self.tokenizer, p.prompt, self.task.instructions)
                   for p in problems]

        # 1. rollout: n initial samples per prompt with the tool loop
        samples = self.engine.generate(prompts, algo.initial_rollouts(),
                                       self._sampling(step, phase=0))
        init = self._rollout_set(samples, [s.prompt_index for s in samples], problems)

        # 2. score: exact entropy and log-probs under the training policy (also the old log-probs)
        with torch.no_grad():
            old = self._stats(self.model, init, prompts)
        omega = future_value(old.logprob, init.rollout_logprob, init.cu_seqlens, gamma=1.0,
                             mask=init.mask, clip=tuple(cfg.algorithm.omega_clip))
        scores = branching_score(old.entropy, omega, init.cu_seqlens, mask=init.mask)

        # 3. branch: fork the chosen positions (and ARPO's independent fillers)
        branching = algo.branch_points(init, old.entropy, scores, self._eligible(init),
                                       self._generator(step, "branch"))
        branches = self._branch(step, init, branching, prompts, problems)
        times["rollout"] = time.monotonic() - t0

        # 4-5. rewards are in the rollout sets; advantages per token of the trained sequences
        adv = algo.advantages(init, branches, branching)
        train = adv.train
        t1 = time.monotonic()
        with torch.no_grad():
            if train is init:
                old_logprob = old.logprob
            else:  # ARPO/GRPO train branches too: their old log-probs
                old_logprob = torch.cat([old.logprob,
                                         self._stats(self.model, branches, prompts).logprob])
            ref_logprob = (self._stats(self.ref_model, train, prompts).logprob
                           if self.ref_model is not None else None)

        # 6. PPO update (held against Ctrl-C from here: the step completes or never started)
        self._critical = True
        update = self._update(step, train, prompts, adv.adv_tok, old_logprob, ref_logprob,
                              adv.future_kl)
        self.scheduler.step()
        self.engine.update_weights(self.model)
        times["train"] = time.monotonic() - t1

        record = {"step": step, **self._rollout_metrics(init, branches, old, times),
                  **update, "lr": self.optimizer.param_groups[0]["lr"],
                  "time_step": time.monotonic() - t0}
        self._report_rollouts(step, problems, init, branches, branching, scores, old)
        return record

    # ------------------------------------------------------------------------------------------
    # pieces of a step

    def _problems_for(self, step: int):
        rng = random.Random(f"{self.config.trainer.seed}/prompts/{step}")
        return rng.sample(self.train_problems, self.config.data.train_batch_size)

    def _sampling(self, step: int, phase: int) -> SamplingParams:
        cfg = self.config
        seed = _seed(cfg.trainer.seed, "sampling", step, phase)
        return SamplingParams(temperature=cfg.rollout.temperature,
                              max_response_len=cfg.data.max_response_length,
                              max_tool_calls=cfg.rollout.max_tool_calls, seed=seed)

    def _generator(self, step: int, purpose: str) -> torch.Generator:
        return torch.Generator().manual_seed(_seed(self.config.trainer.seed, purpose, step))

    def _rollout_set(self, samples, group, problems) -> RolloutSet:
        rewards = [self.task.reward(response_text(self.tokenizer, s), problems[g])
                   for s, g in zip(samples, group)]
        return RolloutSet.of(samples, group, rewards, self.device)

    def _eligible(self, init: RolloutSet):
        """Tokens a fork may keep: model tokens that are not whitespace and not a response's
        last token (nothing follows it: a fork there would only repeat the parent)."""
        last = torch.zeros_like(init.mask)
        last[init.cu_seqlens[1:][init.lengths > 0] - 1] = True
        return init.mask & ~self.whitespace[init.ids] & ~last

    def _branch(self, step, init: RolloutSet, branching: Branching, prompts, problems):
        forks, group = [], []
        if len(branching.parent):
            parents = branching.parent.tolist()
            forks = self.engine.fork([init.samples[p] for p in parents],
                                     branching.position.tolist(), 1, self._sampling(step, 1))
            group = [int(init.group[p]) for p in parents]
        if branching.fill is not None and int(branching.fill.sum()) > 0:
            wanted = [g for g, k in enumerate(branching.fill.tolist()) for _ in range(k)]
            extra = self.engine.generate([prompts[g] for g in wanted], 1, self._sampling(step, 2))
            forks += extra
            group += [wanted[s.prompt_index] for s in extra]
        if not forks:
            return None
        return self._rollout_set(forks, group, problems)

    def _stats(self, model, rollouts: RolloutSet, prompts, with_grad: bool = False):
        """Per-token log-prob and entropy of `rollouts` under `model`, micro-batched."""
        seqs = [list(prompts[int(g)]) + s.response_ids
                for s, g in zip(rollouts.samples, rollouts.group)]
        groups = _by_group(rollouts.group)
        n = int(rollouts.cu_seqlens[-1])
        logprob = torch.zeros(n, device=self.device)
        entropy = torch.zeros(n, device=self.device)
        work = 0
        for batch in micro_batches(groups, seqs, self.config.actor.ppo_max_token_len_per_gpu):
            stats = self._forward(model, rollouts, prompts, batch)
            index = _token_index(rollouts.cu_seqlens, batch)
            logprob[index], entropy[index] = stats.logprob, stats.entropy
            work += stats.forward_tokens
        return _Stats(logprob, entropy, work, sum(len(s) for s in seqs))

    def _forward(self, model, rollouts: RolloutSet, prompts, batch: list[int]):
        return response_token_stats(
            model, [prompts[int(rollouts.group[i])] for i in batch],
            [rollouts.samples[i].response_ids for i in batch],
            temperature=self.config.rollout.temperature, unrolled=self.config.actor.unrolled,
            pad_id=self.pad_id)

    def _update(self, step, train: RolloutSet, prompts, adv_tok, old_logprob, ref_logprob,
                future_kl: bool) -> dict:
        """PPO epochs over mini-batches of prompts, each micro-batched by token budget."""
        cfg, actor = self.config, self.config.actor
        seqs = [list(prompts[int(g)]) + s.response_ids
                for s, g in zip(train.samples, train.group)]
        groups = _by_group(train.group)
        generator = self._generator(step, "minibatch")
        sums: dict[str, float] = {}
        n_updates = 0
        self.model.train()
        for _ in range(actor.ppo_epochs):
            order = torch.randperm(len(groups), generator=generator).tolist()
            for start in range(0, len(order), actor.ppo_mini_batch_size):
                mini = [groups[i] for i in order[start:start + actor.ppo_mini_batch_size]]
                mini_index = _token_index(train.cu_seqlens, [i for g in mini for i in g])
                # the micro-batch losses, weighted to the mean over the whole mini-batch
                denominator = max(1, int(train.mask[mini_index].sum()))
                if actor.loss_agg_mode not in ("token-mean", "dapo"):
                    denominator = sum(len(g) for g in mini)
                self.optimizer.zero_grad(set_to_none=True)
                for batch in micro_batches(mini, seqs, actor.ppo_max_token_len_per_gpu):
                    index = _token_index(train.cu_seqlens, batch)
                    stats = self._forward(self.model, train, prompts, batch)
                    lengths = train.lengths[batch]
                    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
                    mask, old, adv = train.mask[index], old_logprob[index], adv_tok[index]
                    if future_kl:
                        alg = cfg.algorithm
                        adv = future_kl_scale(adv, stats.logprob.detach(), old, cu, mask,
                                              gamma=alg.future_kl_gamma,
                                              weight=alg.future_kl_weight, clip=alg.future_kl_clip,
                                              clip_c=actor.clip_ratio_c)
                    loss, metrics = policy_loss(
                        stats.logprob, old, adv, mask, clip_low=actor.clip_ratio_low,
                        clip_high=actor.clip_ratio_high, clip_c=actor.clip_ratio_c,
                        agg=actor.loss_agg_mode, seq_filter=actor.seq_filter, cu_seqlens=cu)
                    share = (int(mask.sum()) if actor.loss_agg_mode in ("token-mean", "dapo")
                             else len(batch)) / denominator
                    masked_mean = _masked_mean(mask)
                    if ref_logprob is not None:
                        kl = masked_mean(kl_penalty(stats.logprob, ref_logprob[index],
                                                    kind=actor.kl_loss_type))
                        loss = loss + actor.kl_loss_coef * kl
                        metrics["kl_ref"] = kl.detach()
                    if actor.entropy_coeff:
                        loss = loss - actor.entropy_coeff * masked_mean(stats.entropy)
                    (loss * share).backward()
                    metrics["loss"] = loss.detach()
                    for key, value in metrics.items():
                        sums[key] = sums.get(key, 0.0) + float(value) * share
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                           actor.grad_clip)
                if torch.isfinite(grad_norm):
                    self.optimizer.step()
                else:
                    self.log(f"step {step}: non-finite gradient norm, update skipped")
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
                n_updates += 1
        self.model.eval()
        return {key if key in ("loss", "grad_norm") else _METRIC_NAMES.get(key, key):
                value / n_updates for key, value in sums.items()}

    def _rollout_metrics(self, init: RolloutSet, branches, old, times) -> dict:
        rewards = init.rewards
        model_mean = _masked_mean(init.mask)
        generated = int(init.cu_seqlens[-1]) + (0 if branches is None else _new_tokens(branches))
        record = {
            "reward_mean": float(rewards.mean()),
            "accuracy": float((rewards >= 1).float().mean()),
            "bad_format": float((rewards <= -1).float().mean()),
            "entropy_mean": float(model_mean(old.entropy)),
            # engine vs trainer log-probs of the same tokens under the same weights: ~0 unless
            # the two disagree (misaligned tokens, another temperature, lower-precision sampling)
            "rollout_logprob_gap": float(model_mean((old.logprob - init.rollout_logprob).abs())),
            "response_length_mean": float(init.lengths.float().mean()),
            "tool_calls_mean": float(np.mean([s.n_tool_calls for s in init.samples])),
            "branches": 0 if branches is None else len(branches),
            "tokens_per_s": generated / max(times["rollout"], 1e-9),
            "tree_tokens": old.forward_tokens,
            "unrolled_tokens": old.sequence_tokens,
            "time_rollout": times["rollout"],
            "time_train": times["train"],
        }
        if branches is not None:
            record["reward_branch_mean"] = float(branches.rewards.mean())
        return record

    def _report_rollouts(self, step, problems, init, branches, branching, scores, old) -> None:
        k = self.config.trainer.html_prompts
        if k <= 0:
            return
        decode = self.tokenizer.decode
        bounds = init.cu_seqlens.tolist()
        groups = []
        for g in range(min(k, len(problems))):
            members = [s for s in range(len(init)) if int(init.group[s]) == g]
            rollouts, branch_rows = [], []
            for r, s in enumerate(members):
                lo, hi = bounds[s], bounds[s + 1]
                sample = init.samples[s]
                model = init.mask[lo:hi].tolist()
                rollouts.append({
                    "tokens": [decode([t]) for t in sample.response_ids],
                    "model": model,
                    "score": [v if m else None for v, m in zip(scores.score[lo:hi].tolist(),
                                                                 model)],
                    "entropy": [v if m else None for v, m in zip(old.entropy[lo:hi].tolist(),
                                                                   model)],
                    "reward": float(init.rewards[s]),
                    "branch_points": [int(p) for b, p in enumerate(branching.position.tolist())
                                      if int(branching.parent[b]) == s],
                })
                for b, (parent, position) in enumerate(zip(branching.parent.tolist(),
                                                           branching.position.tolist())):
                    if parent == s:
                        fork = branches.samples[b]
                        branch_rows.append({
                            "parent": r, "position": position,
                            "text": decode(fork.response_ids[position + 1:]),
                            "reward": float(branches.rewards[b])})
            groups.append({"prompt": problems[g].prompt, "answer": problems[g].answer,
                           "rollouts": rollouts, "branches": branch_rows})
        self.rollout_report.add_step(step, groups)

    def _evaluate(self, step: int) -> dict:
        cfg = self.config
        if cfg.data.val_size == 0:
            return {}
        sampling = SamplingParams(temperature=cfg.rollout.temperature,
                                  max_response_len=cfg.data.max_response_length,
                                  max_tool_calls=cfg.rollout.max_tool_calls,
                                  seed=_seed(cfg.trainer.seed, "eval"))
        # the same eval seed at every step: the differences are the policy's, not the draws'
        result = evaluate(self.engine, self.task, self.tokenizer, n_problems=cfg.data.val_size,
                          sampling=sampling, instructions=self.task.instructions)
        return {"eval_accuracy": result.accuracy, "eval_reward": result.mean_reward,
                "eval_bad_format": result.format_error_rate,
                "eval_tool_calls": result.mean_tool_calls, "eval_n": result.n}

    # ------------------------------------------------------------------------------------------
    # models, engine, checkpoints

    def _load_policy(self, checkpoint: Optional[Path]):
        cfg = self.config
        dtype = _dtype(cfg.model.dtype, self.device)
        if checkpoint is not None:
            return _load_pretrained(checkpoint / "model", dtype, self.device)
        if cfg.model.path is None:
            from appo.models import load_default

            model, tokenizer = load_default(device=self.device, dtype=dtype)
        else:
            model, tokenizer = _load_pretrained(Path(cfg.model.path), dtype, self.device)
        steps = cfg.model.warm_start_steps
        if steps is None:
            from appo.warmstart import WarmStartConfig

            steps = WarmStartConfig().steps if cfg.model.path is None else 0
        if steps > 0:
            from appo.warmstart import WarmStartConfig, warm_start

            warm = replace(WarmStartConfig(), steps=steps, seed=cfg.trainer.seed)
            if cfg.model.warm_start_direct_share is not None:
                warm = replace(warm, direct_share=cfg.model.warm_start_direct_share)
            warm_start(model, tokenizer, self.task, warm, progress=cfg.trainer.progress)
            self._save_model(model, tokenizer, self.out / WARM_START_DIR)
        return model.eval(), tokenizer

    def _reference_dir(self) -> Optional[Path]:
        warm = self.out / WARM_START_DIR
        if warm.exists():
            return warm
        return Path(self.config.model.path) if self.config.model.path else None

    def _load_reference(self):
        actor = self.config.actor
        if not (actor.use_kl_loss and actor.kl_loss_coef > 0):
            return None
        path = self._reference_dir()
        if path is None:  # the embedded model without a warm start: its initial weights
            from appo.models import load_default

            ref, _ = load_default(device=self.device, dtype=_dtype(self.config.model.dtype,
                                                                   self.device))
        else:
            ref, _ = _load_pretrained(path, _dtype(self.config.model.dtype, self.device),
                                      self.device)
        return ref.eval().requires_grad_(False)

    def _make_engine(self):
        cfg = self.config
        from appo.rollout.tools import get_tool

        tools = {name: get_tool(name) for name in self.task.tool_names}
        if cfg.rollout.name == "hf":
            from appo.rollout.hf import HFEngine

            # the engine samples with its own copy: the training model runs tree attention
            engine_model = copy.deepcopy(self.model).eval().requires_grad_(False)
            return HFEngine(engine_model, self.tokenizer, tools)
        from appo.rollout.vllm import VLLMEngine

        path = self._reference_dir()
        if path is None:
            from appo.models import default_model_dir

            path = default_model_dir()
        # on a CPU, vLLM's graph compilation costs more start-up time than it saves
        engine = VLLMEngine(str(path), self.tokenizer, tools, seed=cfg.trainer.seed,
                            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                            enforce_eager=self.device.type == "cpu")
        engine.update_weights(self.model)
        return engine

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

    def _checkpoint_dir(self, step: int) -> Path:
        return self.out / CHECKPOINTS / f"step_{step:06d}"

    def save_checkpoint(self) -> Path:
        """Save the policy, optimizer, schedule and step; `checkpoints/latest` names it once it
        is complete."""
        final = self._checkpoint_dir(self.step)
        tmp = final.with_name(final.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        self._save_model(self.model, self.tokenizer, tmp / "model")
        torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}, tmp / "trainer.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        latest = self.out / CHECKPOINTS / LATEST
        latest.with_suffix(".tmp").write_text(final.name)
        latest.with_suffix(".tmp").rename(latest)
        keep = self.config.trainer.max_actor_ckpt_to_keep
        if keep:
            for old in sorted((self.out / CHECKPOINTS).glob("step_*"))[:-keep]:
                if old != final and not old.name.endswith(".partial"):
                    shutil.rmtree(old, ignore_errors=True)
        self._write_plots()
        return final

    def _restore(self, checkpoint: Path) -> None:
        state = torch.load(checkpoint / "trainer.pt", map_location=self.device,
                           weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        dropped = self.metrics.truncate_after(self.step)
        self.log(f"resumed {self.out} at step {self.step}"
                 + (f" ({dropped} later metric records dropped)" if dropped else ""))

    @staticmethod
    def _save_model(model, tokenizer, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)

    def _write_plots(self) -> None:
        plot_metrics(self.metrics.records(), self.out)

    @contextmanager
    def _interrupts(self):
        """Ctrl-C: abandon the step now, or after it when in its update phase (see module doc)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._critical:
                self._interrupt_requested = True
                self.log("Ctrl-C: finishing this step's update, then saving")
            else:
                raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------------------------
# helpers

@dataclass
class _Stats:
    logprob: torch.Tensor
    entropy: torch.Tensor
    forward_tokens: int  # what the model computed
    sequence_tokens: int  # what unrolled sequences would have been


# policy_loss metric names -> the metrics log's (verl's names where it has them)
_METRIC_NAMES = {"clip_frac": "clip_frac", "dual_clip_frac": "dual_clip_frac",
                 "approx_kl": "approx_kl", "kl_ref": "kl_ref_mean"}


def _masked_mean(mask):
    count = mask.sum().clamp_min(1)
    return lambda x: (x * mask).sum() / count


def _by_group(group: torch.Tensor) -> list[list[int]]:
    out: dict[int, list[int]] = {}
    for i, g in enumerate(group.tolist()):
        out.setdefault(g, []).append(i)
    return list(out.values())


def _token_index(cu_seqlens: torch.Tensor, seqs: list[int]) -> torch.Tensor:
    bounds = cu_seqlens.tolist()
    return torch.cat([torch.arange(bounds[s], bounds[s + 1]) for s in seqs]).to(
        cu_seqlens.device)


def _new_tokens(branches: RolloutSet) -> int:
    """Tokens the engine sampled for branches (a fork's copied prefix is not new)."""
    return sum(len(s.response_ids) - (s.fork_of[1] + 1 if s.fork_of else 0)
               for s in branches.samples)


def _seed(*parts) -> int:
    """A 32-bit seed from ints and strings, the same in every process (no `hash()`)."""
    words = [p if isinstance(p, int) else zlib.crc32(str(p).encode()) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return getattr(torch, name)
    except AttributeError:
        raise ValueError(f"actor_rollout_ref.model.dtype: unknown dtype {name!r}") from None


def _load_pretrained(path: Path, dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist (a local transformers model "
                         f"directory is needed; nothing is downloaded)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _latest_checkpoint(out: Path) -> Optional[Path]:
    latest = out / CHECKPOINTS / LATEST
    if not latest.exists():
        return None
    path = out / CHECKPOINTS / latest.read_text().strip()
    return path if path.exists() else None


def _first_eval(records: list[dict]) -> Optional[float]:
    return next((r["eval_accuracy"] for r in records if "eval_accuracy" in r), None)


def _describe_eval(record: dict) -> str:
    if "eval_accuracy" not in record:
        return f"step {record['step']}: no evaluation (data.val_size = 0)"
    return (f"step {record['step']}: held-out accuracy {record['eval_accuracy']:.3f}, "
            f"reward {record['eval_reward']:+.3f}, bad format {record['eval_bad_format']:.3f} "
            f"({record['eval_n']} problems)")


def _default_out(config: Config) -> Path:
    return Path("runs") / f"{config.algorithm.adv_estimator}-{datetime.now():%Y%m%d-%H%M%S}"


def load_run_config(out_dir) -> Config:
    """The config a run in `out_dir` was started with (for --resume)."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.exists():
        raise ValueError(f"--resume: {out_dir} has no {CONFIG_FILE}; is it an appo run directory?")
    return load_yaml(path)
