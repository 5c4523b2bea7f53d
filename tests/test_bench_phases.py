"""bench/run_gpu.sh's phases (bench/phases.py): the plan fits one device command, a phase past its
limit is stopped and recorded while the next still runs, and every finished bench is streamed and
reaches the results file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import phases  # noqa: E402


def test_the_plan_fits_one_command_with_every_phase():
    assert sum(p.limit_s for p in phases.PHASES) <= phases.COMMAND_LIMIT_S
    assert sum(p.estimate_s for p in phases.PHASES) + phases.START_S < phases.SESSION_BUDGET_S
    text = phases.plan(list(phases.PHASES))
    for p in phases.PHASES:
        assert f"| {p.name} | {p.limit_s} |" in text
    assert "DOES NOT FIT" not in text


def test_plan_runs_from_the_script_without_a_gpu():
    done = subprocess.run(["bash", "bench/run_gpu.sh", "--plan"], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PHASES": "build,sequence"}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "| build |" in done.stdout and "| sequence |" in done.stdout
    assert "| tree |" not in done.stdout


def test_unknown_phase_is_named():
    with pytest.raises(SystemExit, match=r"PHASES: unknown phase\(s\) \['bild'\]"):
        phases.select("build,bild")


def test_a_phase_past_its_limit_is_stopped_and_recorded(tmp_path):
    slow = phases.Phase("slow", "sleeps", [sys.executable, "-c", "import time; time.sleep(60)"],
                        limit_s=1, estimate_s=1, basis="test", log="slow.log")
    quick = phases.Phase("quick", "exits 3", [sys.executable, "-c", "raise SystemExit(3)"],
                         limit_s=30, estimate_s=1, basis="test", log="slow.log")
    missing = phases.Phase("later", "needs a file", [sys.executable, "-c", "pass"], limit_s=5,
                           estimate_s=1, basis="test", log="slow.log", needs="no/such/file.py")
    env = dict(os.environ)
    first = phases.run_phase(slow, tmp_path, env)
    assert first["timed_out"] and first["seconds"] < 20
    second = phases.run_phase(quick, tmp_path, env)
    assert second == {**second, "timed_out": False, "returncode": 3}
    assert "does not exist" in phases.run_phase(missing, tmp_path, env)["skipped"]
    assert "== slow:" in (tmp_path / "slow.log").read_text()


def test_streamed_rows_reach_the_results_file(tmp_path, monkeypatch):
    """The sequence bench on the CPU, timed (a few rounds): each bench streams its row, and the
    report merges the stream into results-<device>.json and table.md under $OUT."""
    out = tmp_path / "out"
    monkeypatch.setenv("APPO_BENCH_RESULTS", str(tmp_path / "results"))  # not bench/results
    monkeypatch.delenv("APPO_BACKEND", raising=False)
    env = dict(os.environ)
    phase = phases.Phase("sequence", "cpu", [sys.executable, "-m", "pytest",
                         "bench/bench_sequence.py", "-q", "-p", "no:cacheprovider",
                         "--benchmark-max-time=0.01", "--benchmark-min-rounds=2"],
                         limit_s=300, estimate_s=10, basis="test", log="bench.log")
    out.mkdir()
    env["APPO_BENCH_STREAM"] = str(out / "bench.jsonl")
    record = phases.run_phase(phase, out, env)
    assert record["returncode"] == 0, (out / "bench.log").read_text()[-3000:]
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert {r["extra_info"]["provider"] for r in rows} == {"appo-torch", "matrix"}
    assert all(r["extra_info"]["median_ms"] > 0 and r["stats"]["median"] > 0 for r in rows)
    phases.report(out)
    results = list(out.glob("results-*.json"))
    assert len(results) == 1
    merged = json.loads(results[0].read_text())
    assert len(merged) == len(rows) == 4
    assert [p.name for p in (tmp_path / "results").iterdir()] == [results[0].name[len("results-"):]]
    assert "| future_value | appo-torch |" in (out / "table.md").read_text()
