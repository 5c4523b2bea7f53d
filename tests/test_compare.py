"""`appo compare` (appo/compare.py): the statistics against hand computations, and a small
comparison on the tiny model that runs, pairs its seeds, writes its table and continues
instead of starting over."""

import json
import math

import pytest

from appo import compare as cmp
from appo.config import Config, apply_overrides


def test_mean_and_t_interval():
    mean, half = cmp.mean_ci([0.50, 0.56, 0.53])
    sd = math.sqrt(((0.50 - 0.53) ** 2 + (0.56 - 0.53) ** 2 + 0) / 2)
    assert mean == pytest.approx(0.53) and half == pytest.approx(4.303 * sd / math.sqrt(3))
    assert cmp.mean_ci([0.4]) == (0.4, math.inf)
    assert cmp.mean_ci([0.1] * 40)[1] == pytest.approx(0.0, abs=1e-12)
    _, half = cmp.mean_ci([0.0, 1.0] * 20)  # df 39: beyond the table, 1.96
    assert half == pytest.approx(1.96 * math.sqrt(sum((x - 0.5) ** 2 for x in [0, 1] * 20) / 39)
                                 / math.sqrt(40))


def test_area_under_the_curve_is_the_trapezoidal_mean():
    assert cmp.area_under_curve([0, 20, 40, 60], [0.2, 0.4, 0.4, 0.6]) == pytest.approx(
        (20 * 0.3 + 20 * 0.4 + 20 * 0.5) / 60)
    assert cmp.area_under_curve([0, 10, 60], [0.0, 1.0, 1.0]) == pytest.approx((5 + 50) / 60)


def test_summary_pairs_seeds_against_grpo():
    data = {"grpo": {0: ([0, 10], [0.2, 0.3]), 1: ([0, 10], [0.1, 0.3]), 2: ([0, 10], [0.2, 0.4])},
            "appo": {0: ([0, 10], [0.2, 0.5]), 1: ([0, 10], [0.1, 0.4]), 2: ([0, 5], [0.2, 0.9])}}
    summary = cmp.summarise(data, ["grpo", "appo"], [0, 1, 2], total=10)
    assert summary["arms"]["appo"]["n"] == 2  # seed 2 did not reach step 10
    paired = summary["paired"]["appo"]
    assert paired["n"] == 2 and paired["final"][0] == pytest.approx((0.2 + 0.1) / 2)
    assert summary["arms"]["grpo"]["gain"][0] == pytest.approx((0.1 + 0.2 + 0.2) / 3)
    text = cmp.table(summary)
    assert "| appo | 2 |" in text and "+15.0 ±" in text
    assert "| grpo | 3 | 33.3 ± 14.3 | +16.7 ± 14.3 * |" in text  # gain over the warm start


def test_a_shared_warm_start_serves_every_seed(tmp_path):
    config = apply_overrides(Config(), ["actor_rollout_ref.model.warm_start_seed=5"]).validate()
    jobs = cmp.plan(config, tmp_path / "c.yaml", ["grpo", "appo"], [0, 1, 2], tmp_path)
    warm = [job for job in jobs if job.name.startswith("warm-start")]
    assert [job.name for job in warm] == ["warm-start-w5"] and len(jobs) == 1 + 2 * 3
    assert all(job.needs == "warm-start-w5" for job in jobs[1:])
    shared = str(tmp_path / "warm_start" / "w5" / "warm_start")
    assert all(f"actor_rollout_ref.model.path={shared}" in job.args for job in jobs[1:])
    assert {job.args[job.args.index("--seed") + 1] for job in jobs[1:]} == {"0", "1", "2"}
    own = cmp.plan(Config(), tmp_path / "c.yaml", ["grpo"], [0, 1], tmp_path)
    assert [job.name for job in own] == ["warm-start-s0", "grpo-s0", "warm-start-s1", "grpo-s1"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("APPO_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_a_small_comparison_runs_and_continues(env, tmp_path):
    config = apply_overrides(Config(), [
        "data.train_batch_size=2", "data.max_response_length=20", "data.val_size=4",
        "actor_rollout_ref.rollout.n=2", "algorithm.branch_budget=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=1",
        "actor_rollout_ref.model.warm_start_steps=2", "trainer.total_training_steps=2",
        "trainer.test_freq=1", "trainer.save_freq=1"]).validate()
    out = tmp_path / "cmp"
    said = []
    summary = cmp.compare(config, ["grpo", "appo"], [0, 1], out, n_jobs=2, progress=False,
                          write=said.append)
    assert summary["failed"] == []
    assert set(summary["arms"]) == {"grpo", "appo"} and summary["paired"]["appo"]["n"] == 2
    saved = json.loads((out / "compare.json").read_text())
    for arm in ("grpo", "appo"):
        for seed in ("0", "1"):
            steps, accuracy = saved["curves"][arm][seed]
            assert steps == [0, 1, 2] and len(accuracy) == 3
    # the arms of a seed start from the same warm start and see the same prompts
    starts = {saved["curves"][arm]["0"][1][0] for arm in ("grpo", "appo")}
    assert len(starts) == 1
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert "| appo | 2 |" in (out / "compare.md").read_text()
    configs = [(out / "runs" / f"{arm}-s0" / "config.yaml").read_text() for arm in ("grpo", "appo")]
    assert "adv_estimator: grpo" in configs[0] and "adv_estimator: appo" in configs[1]
    assert f"path: {out / 'warm_start' / 's0' / 'warm_start'}" in configs[0]
    # run again: everything is done, nothing runs
    said.clear()
    again = cmp.compare(config, ["grpo", "appo"], [0, 1], out, n_jobs=2, progress=False,
                        write=said.append)
    assert "6 done already" in said[0] and again["arms"].keys() == summary["arms"].keys()


def test_bad_arms_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown arm.*'ppo'"):
        cmp.compare(Config(), ["ppo"], [0], tmp_path)
