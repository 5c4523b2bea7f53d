"""What a run leaves in its output directory: the metrics log, the plots, the rollout page, the
progress bar (appo.report)."""

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from appo.report import (MetricsLog, RolloutsPage, format_postfix, plot_metrics, progress,
                         read_metrics)
from appo.report._atomic import atomic_open

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# metrics log

def test_metrics_roundtrip(tmp_path):
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    log.log({"step": 0, "reward_mean": 0.5, "note": "a\nb"})
    log.log({"step": 1, "reward_mean": np.float32(0.25), "kl": float("nan"),
             "hist": np.array([1, 2])})
    assert log.records() == read_metrics(log.path) == [
        {"step": 0, "reward_mean": 0.5, "note": "a\nb"},
        {"step": 1, "reward_mean": 0.25, "kl": None, "hist": [1, 2]}]
    for line in log.path.read_text().splitlines():
        json.loads(line, parse_constant=pytest.fail)  # strict JSON: no NaN


def test_metrics_need_an_int_step(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for bad in ({"reward_mean": 1.0}, {"step": 1.0}, {"step": True}, [("step", 1)]):
        with pytest.raises(ValueError, match="int 'step'"):
            log.log(bad)


def test_truncated_last_line_is_skipped_and_repaired(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "a": 1}\n{"step": 1, "a": 2}\n{"step": 2, "a"')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:3: skipping a truncated last record"):
        assert [r["step"] for r in read_metrics(path)] == [0, 1]
    with pytest.warns(UserWarning):
        log = MetricsLog(path)  # reopening drops the cut-off line, so appends start a fresh line
    log.log({"step": 2, "a": 3})
    assert [r["a"] for r in read_metrics(path)] == [1, 2, 3]


def test_unreadable_middle_line_raises(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not JSON"):
        read_metrics(path)


def test_truncate_after_drops_later_steps(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(6):
        log.log({"step": step, "reward_mean": step / 10})
    assert log.truncate_after(3) == 2
    assert [r["step"] for r in log.records()] == [0, 1, 2, 3]
    log.log({"step": 4, "reward_mean": 9.0})
    assert log.records()[-1] == {"step": 4, "reward_mean": 9.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left


def test_atomic_open_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "page.html"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write("half")
            raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"]


# plots

def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000


def test_plots_written_as_png(tmp_path):
    records = [{"step": s, "reward_mean": s / 30, "reward_branch_mean": s / 25,
                "accuracy": s / 40, "entropy_mean": 2 - s / 30, "kl_ref_mean": s * 1e-4,
                "approx_kl": 1e-3} for s in range(30)]
    for record in records[::10]:
        record["eval_accuracy"] = record["step"] / 35
    records[4]["reward_mean"] = float("nan")
    records[5]["accuracy"] = None
    paths = plot_metrics(records, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["accuracy.png", "entropy.png", "kl.png",
                                            "reward.png"]
    for path in paths:
        _assert_png(path)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)


def test_plots_without_data_are_not_written(tmp_path):
    records = [{"step": 0, "reward_mean": None, "entropy_mean": float("nan")},
               {"step": 1, "reward_mean": 0.5, "accuracy": "n/a"},
               {"reward_mean": 1.0}]  # no step: skipped
    paths = plot_metrics(records, tmp_path)
    assert [p.name for p in paths] == ["reward.png"]
    _assert_png(paths[0])
    assert plot_metrics([], tmp_path / "empty") == []


# rollout page

def _rollout(tokens, model, reward, branch_points=()):
    score = [(-1) ** i * (i + 1) / 10 if m else None for i, m in enumerate(model)]
    return {"tokens": tokens, "model": model, "score": score,
            "entropy": [0.5 if m else None for m in model], "reward": reward,
            "branch_points": list(branch_points)}


def _groups(step):
    tokens = ["x", "<script>alert(1)</script>", " &", "\n", "<result>7</result>", "y", "z"]
    model = [True, True, True, True, False, True, True]
    rollouts = [_rollout(tokens, model, 1.0, [1, 5]), _rollout(tokens, model, -1.0)]
    branches = [{"parent": 0, "position": 1, "text": "a<b>\nc", "reward": 0.25 + step},
                {"parent": 0, "position": 5, "text": "d", "reward": 0.75 + step}]
    return [{"prompt": "What is 3+4?\n<go>", "answer": "7", "rollouts": rollouts,
             "branches": branches}]


class _TagBalance(HTMLParser):
    VOID = {"meta", "br", "hr", "img", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"


def _page(tmp_path, steps, **kwargs):
    report = RolloutsPage(tmp_path / "rollouts.html", **kwargs)
    for step in steps:
        report.add_step(step, _groups(step))
    return (tmp_path / "rollouts.html").read_text(encoding="utf-8")


def test_page_is_well_formed_and_self_contained(tmp_path):
    page = _page(tmp_path, [0, 1])
    parser = _TagBalance()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    assert "script" not in parser.tags and "link" not in parser.tags
    assert not re.search(r"(src|href)=\"(https?:)?//", page)


def test_page_escapes_token_text(tmp_path):
    page = _page(tmp_path, [0])
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert " &amp;" in page and "a&lt;b&gt;" in page
    assert "↵\n" in page  # newlines shown, and kept as line breaks


def test_page_marks_branch_points_and_lists_branches(tmp_path):
    page = _page(tmp_path, [3])
    # branch points of rollout 0 outlined with their marker, in the rollout and the branch context
    assert len(re.findall(r'class="[^"]*\bbp\b[^"]*"[^>]*>[^<]*<sup>1</sup>', page)) >= 2
    assert re.search(r'class="[^"]*\bbp\b[^"]*"[^>]*>y<sup>2</sup>', page)
    for reward in ("3.25", "3.75"):
        assert re.search(rf'fork after token \d · reward <span class="reward pos">{reward}<', page)
    assert 'class="r"' in page and "&lt;result&gt;7&lt;/result&gt;" in page  # the tool result


def test_page_keeps_last_steps_and_the_first(tmp_path):
    page = _page(tmp_path, range(8), keep_steps=3)
    assert re.findall(r'id="step-(\d+)"', page) == ["7", "6", "5", "0"]
    page = _page(tmp_path, range(8), keep_steps=3, keep_first=False)
    assert re.findall(r'id="step-(\d+)"', page) == ["7", "6", "5"]


def test_page_after_resume_drops_later_steps(tmp_path):
    report = RolloutsPage(tmp_path / "rollouts.html", keep_steps=5, keep_first=False)
    for step in (1, 2, 3, 2):
        report.add_step(step, _groups(step))
    page = (tmp_path / "rollouts.html").read_text()
    assert re.findall(r'id="step-(\d+)"', page) == ["2", "1"]


@pytest.mark.parametrize("edit, message", [
    (lambda g: g[0]["rollouts"][0]["score"].pop(), r"groups\[0\]\.rollouts\[0\]\.score: .* \(7\)"),
    (lambda g: g[0]["rollouts"][1]["branch_points"].append(7), r"rollouts\[1\]\.branch_points"),
    (lambda g: g[0]["branches"][0].update(parent=2), r"branches\[0\]\.parent: 2"),
    (lambda g: g[0]["branches"][1].update(position=-1), r"branches\[1\]\.position: -1"),
    (lambda g: g[0].pop("rollouts"), r"groups\[0\] lacks 'rollouts'"),
])
def test_bad_groups_name_the_field(tmp_path, edit, message):
    groups = _groups(0)
    edit(groups)
    with pytest.raises(ValueError, match=message):
        RolloutsPage(tmp_path / "rollouts.html").add_step(0, groups)
    assert not (tmp_path / "rollouts.html").exists()


# progress bar

def test_progress_disabled_is_a_silent_bar(capsys):
    bar = progress(10, initial=3, desc="appo", enabled=False)
    bar.update()
    bar.set_postfix({"reward": "1"})
    bar.write("a message")
    bar.close()
    assert bar.n == 4
    assert capsys.readouterr().out == "a message\n"


def test_progress_enabled_counts_from_initial():
    bar = progress(10, initial=3, desc="appo", enabled=True)
    bar.update(2)
    assert bar.n == 5
    bar.close()


def test_format_postfix_is_short_and_skips_missing():
    postfix = format_postfix({"reward_mean": 0.41234, "accuracy": float("nan"),
                              "entropy_mean": 1.23456, "branches": 12,
                              "tokens_per_s": 15321.7, "approx_kl": 1e-3})
    assert postfix == {"reward": "0.412", "H": "1.23", "br": "12", "tok/s": "15.3k"}
    assert format_postfix({"reward_mean": None}) == {}


def test_page_shows_reasons_finish_marks_and_the_run_info(tmp_path):
    report = RolloutsPage(tmp_path / "rollouts.html", info="tool format chat: <tool_call>")
    groups = _groups(1)
    groups[0]["rollouts"][0].update(reason="wrong answer", detail="answered '8'",
                                    finish="cut at the length limit")
    groups[0]["branches"][0].update(reason="bad format: <no answer>")
    report.add_step(1, groups)
    page = (tmp_path / "rollouts.html").read_text(encoding="utf-8")
    parser = _TagBalance()
    parser.feed(page)
    assert parser.stack == []
    assert "tool format chat: &lt;tool_call&gt;" in page
    assert '<span class="why" title="answered &#x27;8&#x27;">wrong answer</span>' in page
    assert '<span class="cut">cut at the length limit</span>' in page
    assert "bad format: &lt;no answer&gt;" in page
    assert page.count('class="cut"') == 1  # only the rollout that was cut


def test_common_reasons_and_flat_groups():
    import torch

    from appo.report.steps import common_reasons, zero_variance_groups
    from appo.tasks import Grade

    grades = [Grade(0.0, "wrong answer")] * 5 + [Grade(-1.0, "bad format: no <answer>")] * 2 + \
        [Grade(1.0, "correct"), Grade(0.0, "x"), Grade(0.0, "y")]
    assert common_reasons(grades) == ("5 rollouts: wrong answer; 2: bad format: no <answer>; "
                                      "1: correct; 2 other")
    assert common_reasons(grades[:3]) == "all 3 rollouts: wrong answer"
    assert common_reasons([]) is None
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, -1.0, -1.0, 0.5])
    group = torch.tensor([0, 0, 1, 1, 2, 2, 3])  # flat: groups 0, 2 and 3 (a singleton)
    assert zero_variance_groups(rewards, group) == 3
