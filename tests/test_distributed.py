"""`appo train` under torchrun (appo/distributed.py; docs/training.md, "Several GPUs"), on 2 CPU
processes over gloo: one mini-batch's gradient with FSDP2 equals the one-process gradient of the
same batch; the CLI trains, checkpoints and resumes, and its checkpoint resumes in one process;
and the pieces that hold the ranks together (merged metrics, sharded evaluation, deferred
signals, optimizer state keyed by name)."""

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

from appo import distributed, models  # noqa: E402
from appo.config import Config, apply_overrides  # noqa: E402
from appo.evaluate import EvalResult, evaluate  # noqa: E402
from appo.rollout.base import SamplingParams  # noqa: E402
from appo.tasks import get_task  # noqa: E402
from appo.trainer import _check_world, _merge_ranks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


@pytest.fixture(scope="module")
def env(model_cache):
    """The environment of the child processes: a private model cache, built once."""
    env = dict(os.environ, APPO_CACHE=str(model_cache), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)
    return env


def run(args, env, timeout=600):
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return done.returncode, done.stdout, done.stderr


# ----------------------------------------------------------------------------------------------
# the gradient

def test_two_processes_give_the_one_process_gradient(env, tmp_path):
    """tests/distributed_worker.py: the same 4-prompt mini-batch, alone and as 2 FSDP2 ranks of
    2 prompts (rank 0 two micro-batches, rank 1 one and an empty pass)."""
    worker = str(REPO / "tests" / "distributed_worker.py")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    code, out, err = run([sys.executable, worker, str(one)], env)
    assert code == 0, err[-3000:]
    code, out, err = run(TORCHRUN + ["2", worker, str(two)], env)
    assert code == 0, err[-3000:]
    a = torch.load(one / "result.pt", weights_only=True)
    b = torch.load(two / "result.pt", weights_only=True)
    assert (a["world"], b["world"]) == (1, 2)
    assert a["sums"].keys() == b["sums"].keys()
    for key in a["sums"]:  # the loss and its terms over the whole mini-batch
        assert b["sums"][key] == pytest.approx(a["sums"][key], rel=1e-5, abs=1e-7), key
    assert a["sums"]["loss"] != 0 and a["sums"]["clip_frac"] > 0
    assert a["grads"].keys() == b["grads"].keys()
    for name, g in a["grads"].items():
        scale = float(g.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(b["grads"][name], g, rtol=0, atol=1e-5 * scale, msg=name)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    # one AdamW step from the same start: lr 1e-3 moves every entry by up to ~1e-3; entries
    # whose gradient is near zero move by a rounding-sensitive fraction of that
    for name, p in a["params"].items():
        torch.testing.assert_close(b["params"][name], p, rtol=0, atol=1e-4, msg=name)
    assert b["pushed"] == 0  # the rollout copy holds the trained weights after the push


def test_one_sharded_process_gives_the_same_gradient(env, tmp_path):
    """APPO_FSDP=1 with one torchrun process: the sharded path (FSDP2 over one rank, the
    rollout copy, the collectives) where only one device is at hand, as on a one-GPU machine."""
    worker = str(REPO / "tests" / "distributed_worker.py")
    one, forced = tmp_path / "one", tmp_path / "forced"
    one.mkdir(), forced.mkdir()
    assert run([sys.executable, worker, str(one)], env)[0] == 0
    code, out, err = run(TORCHRUN + ["1", worker, str(forced)], dict(env, APPO_FSDP="1"))
    assert code == 0, err[-3000:]
    a = torch.load(one / "result.pt", weights_only=True)
    b = torch.load(forced / "result.pt", weights_only=True)
    assert (a["world"], b["world"], b["sharded"]) == (1, 1, True)
    for name, g in a["grads"].items():
        torch.testing.assert_close(b["grads"][name], g, rtol=0,
                                   atol=1e-5 * float(g.abs().max()), msg=name)
    assert b["pushed"] == 0


# ----------------------------------------------------------------------------------------------
# the command line

def test_torchrun_trains_checkpoints_and_resumes(env, tmp_path):
    out = tmp_path / "run"
    common = ["--no-progress", "actor_rollout_ref.model.warm_start_steps=0", "data.val_size=6",
              "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
              "trainer.device=cpu", "trainer.save_freq=1"]
    code, stdout, err = run(TORCHRUN + ["2", "-m", "appo", "train", "--steps", "2", "--out",
                                        str(out), *common], env)
    assert code == 0, err[-3000:]
    assert stdout.count("appo: appo on task 'calc', 2 steps on 2 processes") == 1  # rank 0 only
    assert stdout.count("2 steps in") == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[0]["eval_n"] == 6  # both ranks' shares of the held-out problems
    step = records[1]
    assert step["branches"] == 4 * 4  # 4 prompts x branch budget 4, counted over both ranks
    assert 0 <= step["zero_variance_groups"] <= 4
    assert (out / "checkpoints" / "step_000002" / "model" / "config.json").exists()
    state = torch.load(out / "checkpoints" / "step_000002" / "trainer.pt", weights_only=True)
    assert state["step"] == 2
    assert all(isinstance(k, str) for k in state["optimizer"]["state"])  # keyed by name

    code, stdout, err = run(TORCHRUN + ["2", "-m", "appo", "train", "--resume", str(out),
                                        "--no-progress", "trainer.total_training_steps=3"], env)
    assert code == 0, err[-3000:]
    assert "resumed" in stdout and stdout.count("3 steps in") == 1
    # the same checkpoint in one process
    code, stdout, err = run([sys.executable, "-m", "appo", "train", "--resume", str(out),
                             "--no-progress", "trainer.total_training_steps=4"], env)
    assert code == 0, err[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert all(r.get("grad_norm", 1) > 0 for r in records)


def test_sigterm_to_torchrun_saves_the_step_every_rank_finished(env, tmp_path):
    out = tmp_path / "run"
    launch = subprocess.Popen(
        TORCHRUN + ["2", "-m", "appo", "train", "--steps", "100", "--out", str(out),
                    "--no-progress", "actor_rollout_ref.model.warm_start_steps=0",
                    "data.val_size=0", "data.train_batch_size=4", "trainer.device=cpu",
                    "actor_rollout_ref.actor.ppo_mini_batch_size=2", "trainer.save_freq=0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"

    def steps():
        text = metrics.read_text() if metrics.exists() else ""
        return [json.loads(line)["step"] for line in text.splitlines() if line.endswith("}")]

    deadline = time.monotonic() + 300
    while max(steps(), default=0) < 1 and launch.poll() is None:  # step 0: the record before
        assert time.monotonic() < deadline, "no step finished in 300 s"
        time.sleep(0.5)
    launch.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    stdout, stderr = launch.communicate(timeout=300)
    done = steps()
    assert done == list(range(done[-1] + 1)) and 1 <= done[-1] < 100
    assert f"interrupted: saved step {done[-1]}" in stdout, stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == f"step_{done[-1]:06d}"
    # "... on every process" in the rollout phase, "... this step's update" in the update
    assert "SIGTERM: finishing this step" in stdout


def test_torchrun_rejects_an_uneven_batch(env, tmp_path):
    code, stdout, err = run(TORCHRUN + ["2", "-m", "appo", "train", "--out", str(tmp_path / "r"),
                                        "data.train_batch_size=10",
                                        "actor_rollout_ref.actor.ppo_mini_batch_size=5"], env)
    assert code != 0
    assert err.count("appo: error: actor_rollout_ref.actor.ppo_mini_batch_size = 5: under "
                     "torchrun it must be a multiple of the number of processes (2)") == 2
    assert "appo/trainer.py" not in err  # no traceback of ours (torchrun prints its own)


# ----------------------------------------------------------------------------------------------
# the pieces

def test_world_checks_name_the_key():
    config = Config()
    _check_world(config, 1)
    _check_world(config, 2)  # 16 prompts, mini-batches of 8
    apply_overrides(config, ["actor_rollout_ref.actor.ppo_mini_batch_size=3",
                             "data.train_batch_size=12"])
    with pytest.raises(ValueError, match="ppo_mini_batch_size = 3: under torchrun"):
        _check_world(config, 2)
    config = Config()
    apply_overrides(config, ["actor_rollout_ref.rollout.name=vllm"])
    with pytest.raises(ValueError, match="rollout.name = 'vllm': under torchrun"):
        _check_world(config, 2)


def test_step_records_merge_counts_times_and_means():
    ranks = [{"step": 3, "reward_mean": 0.5, "branches": 4, "time_step": 2.0, "warning": "w0",
              "arpo_beta_dh_min": 0.1, "arpo_beta_dh_max": 0.4, "only_here": 1.0},
             {"step": 3, "reward_mean": -0.5, "branches": 6, "time_step": 3.0,
              "arpo_beta_dh_min": 0.2, "arpo_beta_dh_max": 0.9, "flag": True}]
    merged = _merge_ranks(ranks)
    assert merged == {"step": 3, "reward_mean": 0.0, "branches": 10, "time_step": 3.0,
                      "warning": "w0", "arpo_beta_dh_min": 0.1, "arpo_beta_dh_max": 0.9,
                      "only_here": 1.0, "flag": True}
    assert _merge_ranks(ranks[:1]) is ranks[0]


class EchoEngine:
    """Answers problem i of the eval split correctly when i is even (by its prompt text)."""

    def __init__(self, task, protocol):
        self.protocol, self.task = protocol, task
        self.answers = {p.prompt: (i, p.answer) for i, p in enumerate(task.split("eval"))}

    def generate(self, prompts, n, sampling):
        from appo.rollout.base import Sample
        out = []
        for k, prompt in enumerate(prompts):
            text = self.protocol.tokenizer.decode(prompt)
            i, answer = next(v for p, v in self.answers.items() if p in text)
            reply = f"<answer>{answer if i % 2 == 0 else 'x'}</answer>"
            ids = self.protocol.tokenizer(reply, add_special_tokens=False).input_ids
            out.append(Sample(prompt_ids=list(prompt), response_ids=ids,
                              response_mask=[1] * len(ids), response_logprobs=[0.0] * len(ids),
                              prompt_index=k, finish_reason="stop"))
        return out


def test_sharded_evaluation_merges_to_the_whole():
    from appo.rollout.protocol import TagProtocol

    task = get_task("calc", n_eval=7)
    task.format = protocol = TagProtocol(models.char_tokenizer())
    engine = EchoEngine(task, protocol)
    whole = evaluate(engine, task, sampling=SamplingParams(seed=0))
    assert whole.n == 7 and whole.accuracy == pytest.approx(4 / 7)
    parts = [evaluate(engine, task, sampling=SamplingParams(seed=0), shard=(k, 3))
             for k in range(3)]
    assert [p.n for p in parts] == [3, 2, 2]
    merged = EvalResult.merge(parts)
    assert merged.n == 7
    for field in ("accuracy", "format_error_rate", "mean_reward", "mean_response_len"):
        assert getattr(merged, field) == pytest.approx(getattr(whole, field)), field
    empty = evaluate(engine, task, n_problems=2, shard=(2, 3))
    assert empty.n == 0
    assert EvalResult.merge([empty, whole]) == whole
    with pytest.raises(ValueError, match="shard must be"):
        evaluate(engine, task, shard=(3, 3))


def test_deferred_signals_wait_for_the_step():
    from appo.run import Interrupts

    said = []
    with Interrupts(said.append, defer=True) as interrupts:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # no KeyboardInterrupt though nothing is critical
    assert interrupts.requested == "SIGTERM"


def test_optimizer_state_by_name_and_by_index():
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)

    model, optimizer = make()
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    named = distributed.named_optimizer_state(model, optimizer)
    assert set(named["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    for state in (named, optimizer.state_dict()):  # by name, and as older checkpoints hold it
        fresh, fresh_optimizer = make()
        distributed.load_optimizer_state(fresh, fresh_optimizer, state, broadcast=False)
        torch.testing.assert_close(fresh_optimizer.state_dict()["state"][1]["exp_avg_sq"],
                                   optimizer.state_dict()["state"][1]["exp_avg_sq"])
    with pytest.raises(ValueError, match="keyed by parameter index"):
        distributed.load_optimizer_state(model, optimizer, optimizer.state_dict(), broadcast=True)


def test_one_process_is_solo(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert isinstance(distributed.from_env(), distributed.Solo)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.from_env().sharded
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        distributed.from_env()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("APPO_FSDP", "1")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="start the processes with torchrun"):
        distributed.from_env()


def test_compare_refuses_torchrun(monkeypatch, capsys):
    from appo.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as stop:
        main(["compare", "--seeds", "0"])
    assert stop.value.code == 2
    assert "appo compare runs its arms in one process" in capsys.readouterr().err
