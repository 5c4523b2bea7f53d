"""The training loop (appo/trainer.py) and the packed training pass (appo/forward.py) on the
embedded tiny model: every algorithm runs, tree and unrolled passes agree, resume repeats the
next step exactly, a run leaves its files, Ctrl-C saves, and the reward rises."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from appo import models  # noqa: E402
from appo.config import Config, apply_overrides  # noqa: E402
from appo.forward import micro_batches, response_token_stats, tree_size  # noqa: E402
from appo.tasks import Problem, Task, register_task  # noqa: E402
from appo.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(model_cache, monkeypatch):
    monkeypatch.setenv("APPO_CACHE", str(model_cache))
    return model_cache


def tiny(out, *overrides, algo="appo"):
    """A few seconds a step on the tiny model: 2 prompts, 2 rollouts + 2 branches each."""
    config = Config()
    apply_overrides(config, [
        f"algorithm.adv_estimator={algo}", "data.train_batch_size=2",
        "data.max_response_length=20", "data.val_size=4", "actor_rollout_ref.rollout.n=2",
        "algorithm.branch_budget=2", "actor_rollout_ref.actor.ppo_mini_batch_size=1",
        "actor_rollout_ref.model.warm_start_steps=0", "trainer.total_training_steps=2",
        "trainer.progress=false", "trainer.test_freq=0", "trainer.save_freq=1",
        "trainer.device=cpu", f"trainer.default_local_dir={out}", *overrides])
    return config


# ----------------------------------------------------------------------------------------------
# the training pass

def branched_sequences(vocab, generator):
    """Two prompts; rollouts; branches that copy a prefix of their parent's response."""
    def draw(n):
        return torch.randint(4, vocab, (n,), generator=generator).tolist()

    prompts, responses = [], []
    for prompt_len in (5, 7):
        prompt = draw(prompt_len)
        rollouts = [draw(n) for n in (9, 1, 6)]
        for r in rollouts:
            prompts.append(prompt)
            responses.append(r)
        prompts.append(prompt)
        responses.append(rollouts[0][:4] + draw(5))  # a branch kept 4 tokens of rollout 0
        prompts.append(prompt)
        responses.append(rollouts[2][:1] + draw(3))
    return prompts, responses


def passes_of(model, settings: list[dict]):
    """response_token_stats of one set of branched sequences under each keyword set, with the
    model's gradients of a random weighting of the log-probs and entropies."""
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    prompts, responses = branched_sequences(model.config.vocab_size, generator)
    n = sum(len(r) for r in responses)
    w_lp, w_ent = torch.randn(n), torch.randn(n)
    results = []
    for kwargs in settings:
        model.zero_grad()
        stats = response_token_stats(model, prompts, responses, temperature=0.7, **kwargs)
        ((stats.logprob * w_lp).sum() + (stats.entropy * w_ent).sum()).backward()
        results.append((stats, [p.grad.clone() for p in model.parameters()]))
    return results, sum(len(p) + len(r) for p, r in zip(prompts, responses))


def assert_same_pass(a, b):
    (stats_a, grads_a), (stats_b, grads_b) = a, b
    torch.testing.assert_close(stats_a.cu_seqlens, stats_b.cu_seqlens)
    torch.testing.assert_close(stats_a.logprob, stats_b.logprob, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(stats_a.entropy, stats_b.entropy, atol=2e-5, rtol=1e-5)
    for x, y in zip(grads_a, grads_b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_tree_and_unrolled_passes_agree_in_values_and_gradients(env):
    torch.manual_seed(0)
    model, _ = models.load_default()
    model.float()
    (tree, flat), unrolled_tokens = passes_of(model, [{"unrolled": False}, {"unrolled": True}])
    assert tree[0].forward_tokens < unrolled_tokens
    assert_same_pass(tree, flat)


@pytest.mark.parametrize("unrolled", [False, True])
def test_the_fused_lm_head_gives_the_logits_paths_values_and_gradients(env, unrolled):
    """Statistics from the last hidden states (linear_token_stats, no [tokens × V] logits)
    against the logits path, tree-packed and unrolled."""
    from appo.forward import fused_head

    torch.manual_seed(1)
    model, _ = models.load_default()
    model.float()
    assert fused_head(model) is not None
    (fused, plain), _ = passes_of(model, [{"unrolled": unrolled, "fused": True},
                                          {"unrolled": unrolled, "fused": False}])
    assert_same_pass(fused, plain)


def test_a_head_that_is_not_a_plain_linear_layer_keeps_the_logits_path(env):
    """A model that post-processes its logits (soft-capping, scaling) is seen on its own logits
    and gets no fused head."""
    from transformers import LlamaForCausalLM

    from appo.forward import fused_head

    class Capped(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 30.0 * torch.tanh(out.logits / 30.0) * 1.5
            return out

    model, _ = models.load_default()
    capped = Capped(model.config)
    capped.load_state_dict(model.state_dict())
    assert fused_head(capped) is None and fused_head(model) is not None


def test_micro_batches_respect_the_token_budget_and_keep_groups_whole():
    seqs = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9], [7, 8], [7, 8, 9, 9, 9]]
    assert tree_size(seqs) == 11
    groups = [[0, 1, 2], [3, 4]]
    assert micro_batches(groups, seqs, token_budget=100) == [[0, 1, 2, 3, 4]]
    assert micro_batches(groups, seqs, token_budget=6) == [[0, 1, 2], [3, 4]]
    assert micro_batches(groups, seqs, token_budget=2) == [[0, 1, 2], [3, 4]]  # never cut


def test_response_token_stats_rejects_bad_input(env):
    model, _ = models.load_default()
    with pytest.raises(ValueError, match="prompts and responses must pair up"):
        response_token_stats(model, [[1]], [[2], [3]])
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
        response_token_stats(model, [[]], [[2]])


# ----------------------------------------------------------------------------------------------
# the loop

@pytest.mark.parametrize("algo", ["appo", "arpo", "grpo"])
def test_each_algorithm_runs_a_step(env, tmp_path, algo):
    # an untrained model earns -1 everywhere (no advantage): the entropy bonus still moves it
    trainer = Trainer(tiny(tmp_path / algo, "actor_rollout_ref.actor.entropy_coeff=0.01",
                           algo=algo), log=lambda *_: None)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    record = trainer.train_step(1)
    budget, prompts = 2, 2
    if algo == "grpo":
        assert record["branches"] == 0
    else:  # APPO forks B per prompt; ARPO forks after tool results and fills the rest
        assert record["branches"] == budget * prompts
    for key in ("reward_mean", "accuracy", "entropy_mean", "loss", "clip_frac", "approx_kl",
                "kl_ref_mean", "grad_norm", "tokens_per_s", "tree_tokens"):
        assert key in record and record[key] == record[key], key  # present, not NaN
    assert record["tree_tokens"] <= record["unrolled_tokens"]
    stages = ("generate", "score", "update", "sync") + (("fork",) if algo == "appo" else ())
    times = [record[f"time_{stage}"] for stage in stages]
    assert all(t > 0 for t in times) and sum(times) <= record["time_step"], record
    # the engine sampled with the weights the trainer scored with: the same log-probs
    assert record["rollout_logprob_gap"] < 1e-4
    assert 0 < record["entropy_mean"] <= torch.log(torch.tensor(float(trainer.vocab_size)))
    changed = any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert changed
    # the engine samples with the updated weights
    engine_params = dict(trainer.engine.model.named_parameters())
    for name, p in trainer.model.named_parameters():
        assert torch.equal(engine_params[name], p.detach()), name


def test_tree_and_unrolled_training_steps_agree(env, tmp_path):
    records = []
    for unrolled in (False, True):
        # one mini-batch: the update sees the sequences packed as the old-log-prob pass did
        config = tiny(tmp_path / str(unrolled), f"actor_rollout_ref.actor.unrolled={unrolled}",
                      "actor_rollout_ref.actor.ppo_mini_batch_size=2",
                      "algorithm.branch_after_update=false")
        records.append(Trainer(config, log=lambda *_: None).train_step(1))
    tree, flat = records
    for key in ("reward_mean", "branches", "response_length_mean"):
        assert tree[key] == flat[key], key  # the same rollouts and branch points
    for key in ("entropy_mean", "loss", "approx_kl", "kl_ref_mean", "grad_norm"):
        assert tree[key] == pytest.approx(flat[key], rel=1e-3, abs=1e-6), key
    assert tree["tree_tokens"] < flat["tree_tokens"]  # the unrolled pass computes padding too


def test_resume_repeats_the_next_step_exactly(env, tmp_path):
    straight = Trainer(tiny(tmp_path / "a"), log=lambda *_: None)
    straight.train()
    first = Trainer(tiny(tmp_path / "b", "trainer.total_training_steps=1"), log=lambda *_: None)
    first.train()
    resumed = Trainer(tiny(tmp_path / "b"), resume=True, log=lambda *_: None)
    assert resumed.step == 1
    result = resumed.train()
    assert result.step == 2 and not result.interrupted

    def step2(path):
        return next(r for r in read(path / "metrics.jsonl") if r["step"] == 2)

    a, b = step2(tmp_path / "a"), step2(tmp_path / "b")
    timing = {k for k in a if k.startswith("time") or k == "tokens_per_s"}
    assert {k: v for k, v in a.items() if k not in timing} == \
        {k: v for k, v in b.items() if k not in timing}
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_a_run_leaves_metrics_plots_rollouts_and_checkpoints(env, tmp_path):
    out = tmp_path / "run"
    result = Trainer(tiny(out, "trainer.html_prompts=1"), log=lambda *_: None).train()
    assert result.step == 2 and result.eval_before is not None and result.eval_after is not None
    records = read(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert "eval_accuracy" in records[0] and "eval_accuracy" in records[2]
    assert records[0]["eval_tool_calls"] >= 0
    for name in ("reward.png", "accuracy.png", "entropy.png", "kl.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name
    html = (out / "rollouts.html").read_text()
    assert "Step 2" in html or "step 2" in html
    assert (out / "checkpoints" / "latest").read_text() == "step_000002"
    assert (out / "checkpoints" / "step_000001" / "model" / "config.json").exists()
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(tiny(out), log=lambda *_: None)
    with pytest.raises(ValueError, match="no checkpoint"):
        Trainer(tiny(tmp_path / "empty"), resume=True, log=lambda *_: None)


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_resume_continues(env, tmp_path, signum, status):
    out = tmp_path / "run"
    flags = ["data.train_batch_size=2", "data.max_response_length=20", "data.val_size=2",
             "actor_rollout_ref.rollout.n=2", "algorithm.branch_budget=2",
             "actor_rollout_ref.actor.ppo_mini_batch_size=1",
             "actor_rollout_ref.model.warm_start_steps=0", "trainer.save_freq=0",
             "trainer.test_freq=0", "trainer.device=cpu"]
    cmd = [sys.executable, "-m", "appo", "train", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(cmd + ["--steps", "1000"] + flags, cwd=REPO, env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(r["step"] >= 1 for r in read(metrics)):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signum)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == status, output
    assert "interrupted: saved step" in output
    saved = int((out / "checkpoints" / "latest").read_text().removeprefix("step_"))
    logged = max(r["step"] for r in read(metrics))
    assert saved == logged >= 1  # the last complete step is saved: nothing logged is lost
    done = subprocess.run(cmd[:5] + ["--resume", str(out), "--steps", str(saved + 1)],
                          cwd=REPO, env=os.environ.copy(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [r["step"] for r in read(metrics)][-1] == saved + 1


# ----------------------------------------------------------------------------------------------
# learning

class DigitsTask(Task):
    """Reward: the share of digits in the response (0.1 of a uniform policy's tokens) — dense,
    so a few steps of RL visibly raise it."""

    name = "digits-test"

    def split(self, name):
        self._check_split(name)
        return [Problem(prompt=f"say {i}", answer="0") for i in range(40)]

    def reward(self, response_text, problem):
        return sum(c.isdigit() for c in response_text) / max(1, len(response_text))


register_task("digits-test", DigitsTask, replace=True)


def test_reward_rises(env, tmp_path):
    config = tiny(tmp_path / "learn", "data.task=digits-test", "trainer.total_training_steps=12",
                  "trainer.save_freq=0", "data.val_size=0", "data.train_batch_size=4",
                  "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.optim.lr=1e-2",
                  "actor_rollout_ref.actor.ppo_mini_batch_size=2", "trainer.html_prompts=0")
    Trainer(config, log=lambda *_: None).train()
    rewards = [r["reward_mean"] for r in read(tmp_path / "learn" / "metrics.jsonl")
               if "reward_mean" in r]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.1, rewards


def test_vllm_engine_trains(env, tmp_path):
    pytest.importorskip("vllm")
    # word problems: every prompt fills at least one of vLLM's 32-token cache blocks, so each fork
    # has a cached prefix to read whatever its branch position
    config = tiny(tmp_path / "run", "actor_rollout_ref.rollout.name=vllm",
                  "data.task_options={style: words}", "trainer.total_training_steps=1",
                  "actor_rollout_ref.actor.entropy_coeff=0.01")
    trainer = Trainer(config, log=lambda *_: None)
    result = trainer.train()
    assert result.step == 1 and result.eval_after is not None
    record = read(tmp_path / "run" / "metrics.jsonl")[1]
    assert record["branches"] == 4
    # vLLM's kernels round differently from transformers' forward (tests/test_vllm_engine.py)
    assert record["rollout_logprob_gap"] < 1e-3
    assert trainer.engine.stats["cached_tokens"] > 0  # forks read their parents' cached prefix


def test_model_path_trains_any_local_causal_lm(env, tmp_path):
    """`--model PATH`: a transformers model directory other than the embedded one (here a
    2-layer Llama with 32-dim heads and grouped-query attention), no warm start by default."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = models.load_default()
    vocab = len(tokenizer)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    run = tiny(tmp_path / "run", f"actor_rollout_ref.model.path={tmp_path / 'model'}",
               "actor_rollout_ref.model.warm_start_steps=null", "trainer.total_training_steps=1")
    result = Trainer(run, log=lambda *_: None).train()
    assert result.step == 1 and not (tmp_path / "run" / "warm_start").exists()
    assert (tmp_path / "run" / "checkpoints" / "step_000001").exists()
    with pytest.raises(ValueError, match="model.path must be an existing model directory"):
        Trainer(tiny(tmp_path / "run2", f"actor_rollout_ref.model.path={tmp_path / 'nope'}"),
                log=lambda *_: None)


def test_warm_start_options_reach_the_warm_start(tmp_path, env, monkeypatch):
    import appo.warmstart

    seen = []
    monkeypatch.setattr(appo.warmstart, "warm_start",
                        lambda model, tokenizer, task, config, progress: seen.append(config))
    Trainer(tiny(tmp_path / "run", "actor_rollout_ref.model.warm_start_steps=3",
                 "actor_rollout_ref.model.warm_start_direct_share=0.25", "trainer.seed=5"),
            log=lambda *_: None)
    assert seen == [appo.warmstart.WarmStartConfig(steps=3, direct_share=0.25, seed=5)]
    Trainer(tiny(tmp_path / "run2", "actor_rollout_ref.model.warm_start_steps=3",
                 "actor_rollout_ref.model.warm_start_seed=2", "trainer.seed=5"),
            log=lambda *_: None)
    assert seen[1].seed == 2  # a fixed warm start whatever the RL seed


# ----------------------------------------------------------------------------------------------
# what a run says and keeps

class FlatTask(DigitsTask):
    """Every response gets the same grade: no group has a learning signal."""

    name = "flat-test"

    def grade(self, response_text, problem):
        from appo.tasks import Grade

        return Grade(-1.0, "bad format: no <answer>")


register_task("flat-test", FlatTask, replace=True)


def test_a_step_without_learning_signal_says_why(env, tmp_path):
    said = []
    trainer = Trainer(tiny(tmp_path / "flat", "data.task=flat-test", "data.val_size=0"),
                      log=said.append)
    record = trainer.train_step(1)
    assert record["zero_variance_groups"] == 2  # both prompts
    expected = ("step 1: no learning signal, every group's rewards are equal "
                "(all 4 rollouts: bad format: no <answer>)")
    assert record["warning"] == expected and f"warning: {expected}" in said
    digits = Trainer(tiny(tmp_path / "digits", "data.task=digits-test", "data.val_size=0"),
                     log=said.append).train_step(1)
    assert digits["zero_variance_groups"] < 2 and "warning" not in digits


def test_only_the_newest_checkpoints_are_kept(env, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny(out, "trainer.total_training_steps=3", "data.val_size=0"),
            log=lambda *_: None).train()
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == \
        ["step_000002", "step_000003"]  # trainer.max_actor_ckpt_to_keep = 2


def test_tensorboard_and_wandb_loggers(env, tmp_path, monkeypatch):
    import importlib.machinery
    import types

    pytest.importorskip("tensorboard")
    runs = []

    class FakeRun:
        def __init__(self, **kwargs):
            self.kwargs, self.logged, self.finished = kwargs, [], False
            runs.append(self)

        def log(self, values, step):
            self.logged.append((step, values))

        def finish(self):
            self.finished = True

    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    wandb.init = lambda **kwargs: FakeRun(**kwargs)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    Trainer(tiny(out, "trainer.total_training_steps=1",
                 "trainer.logger=[console, jsonl, tensorboard, wandb]"),
            log=lambda *_: None).train()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    (run,) = runs
    assert run.kwargs["mode"] == "offline" and run.kwargs["project"] == "appo"
    assert run.kwargs["name"] == "run" and run.finished
    steps = [step for step, _ in run.logged]
    assert steps == [0, 1] and "reward_mean" in run.logged[1][1]
    assert all(isinstance(v, float) for _, values in run.logged for v in values.values())


def test_a_missing_logger_package_is_named(env, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="trainer.logger includes wandb.*pip install wandb"):
        Trainer(tiny(tmp_path / "run", "trainer.logger=[wandb]"), log=lambda *_: None)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_at_once_or_after_the_update(signum):
    from appo.run import Interrupts

    said = []
    with pytest.raises(KeyboardInterrupt):
        with Interrupts(said.append):
            os.kill(os.getpid(), signum)
            time.sleep(1)  # the handler raises before this returns
    with Interrupts(said.append) as interrupts:
        interrupts.critical = True
        os.kill(os.getpid(), signum)
        time.sleep(0.1)
    assert interrupts.requested == signal.Signals(signum).name
    assert said == [f"{signal.Signals(signum).name}: finishing this step's update, then saving"]
    assert signal.getsignal(signum) is not interrupts._handler  # the previous handler is back


def test_a_chat_model_trains_with_its_own_tool_format(env, tmp_path):
    """A model whose tokenizer has a chat template: prompts through the template, tool calls as
    <tool_call> JSON, results as tool turns; config.yaml and rollouts.html name the format."""
    from chat_model import chat_llama, chat_tokenizer

    tokenizer = chat_tokenizer()
    chat_llama(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    run = tiny(tmp_path / "run", f"actor_rollout_ref.model.path={tmp_path / 'model'}",
               "data.task=jsonl", f"data.task_options={{path: {tmp_path / 'rows.jsonl'}, "
               f"tools: [calculator], reward_fn: numeric}}", "data.max_response_length=48",
               "trainer.total_training_steps=1")
    (tmp_path / "rows.jsonl").write_text("".join(
        json.dumps({"prompt": f"What is {i} + 1?", "answer": i + 1}) + "\n" for i in range(12)))
    result = Trainer(run, log=lambda *_: None).train()
    assert result.step == 1
    assert "tool_format: chat" in (tmp_path / "run" / "config.yaml").read_text()
    html = (tmp_path / "run" / "rollouts.html").read_text()
    assert "tool format chat" in html
    assert "You can call these functions:" in html  # the system prompt, as the model saw it
    with pytest.raises(ValueError, match="warm start's demonstrations are written in the tags"):
        Trainer(tiny(tmp_path / "run2", f"actor_rollout_ref.model.path={tmp_path / 'model'}",
                     "actor_rollout_ref.model.warm_start_steps=2"), log=lambda *_: None)


# ----------------------------------------------------------------------------------------------
# APPO's order: update, then score and branch with the updated policy

def test_appo_scores_and_forks_with_the_updated_policy(env, tmp_path):
    """In the paper's order the first mini-batch moves the policy before scoring: Ω measures a
    real likelihood gain (log Ω varies along a rollout) and the forks sample from the updated
    weights; in the reference code's order Ω compares two copies of the same weights."""
    records = {}
    for after in (True, False):
        trainer = Trainer(tiny(tmp_path / str(after), "data.task=digits-test", "data.val_size=0",
                               f"algorithm.branch_after_update={after}",
                               "actor_rollout_ref.actor.optim.lr=1e-2"), log=lambda *_: None)
        initial = [p.detach().clone() for p in trainer.model.parameters()]
        seen = []
        fork = trainer.engine.fork

        def spy(*args, **kwargs):
            weights = list(trainer.engine.model.parameters())
            seen.append((all(torch.equal(a, b) for a, b in zip(weights, trainer.model.parameters())),
                         any(not torch.equal(a, b) for a, b in zip(weights, initial))))
            return fork(*args, **kwargs)

        trainer.engine.fork = spy
        records[after] = trainer.train_step(1)
        assert seen and all(same for same, _ in seen)  # forks sample from the training weights
        assert all(moved == after for _, moved in seen)  # ... updated ones in the paper's order
    assert records[True]["omega_log_std"] >= 1e-3
    assert records[False]["omega_log_std"] < 1e-4
    for key in ("branch_strict_fraction", "branch_position_mean", "zero_variance_groups"):
        assert key in records[True], key
    assert 0 < records[True]["branch_position_mean"] <= 1


def test_the_python_tool_is_sandboxed_or_the_run_refuses(env, tmp_path, monkeypatch):
    """A task that uses the python tool gets it with `tools.python.*`; where the sandbox cannot
    run, the run stops before any work, naming the setting; `rlimits` warns that it is none."""
    from appo.rollout import sandbox, tools

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": i}) + "\n" for i in range(8)))
    options = [f"data.task_options={{path: {rows}, tools: [python]}}", "data.task=jsonl",
               "tools.python.timeout_s=3", "tools.python.max_processes=2"]
    monkeypatch.setattr(sandbox, "available", lambda: "bwrap is not installed: install it")
    with pytest.raises(ValueError, match="tools.python.sandbox=bwrap: .*bwrap is not installed"):
        Trainer(tiny(tmp_path / "refused", *options), log=lambda *_: None)
    said = []
    trainer = Trainer(tiny(tmp_path / "rlimits", *options, "tools.python.sandbox=rlimits"),
                      log=said.append)
    assert any("sandbox=rlimits" in line and "WITHOUT a sandbox" in line for line in said)
    tool = trainer.engine.tools["python"]
    assert isinstance(tool, tools.PythonTool)
    assert (tool.sandbox, tool.timeout_s, tool.max_processes) == ("rlimits", 3.0, 2)
