"""The training config (appo/config.py) and the `appo train` command line (appo/cli.py)."""

import pytest

from appo.cli import build_parser, config_from_args, main
from appo.config import Config, apply_overrides, dump_yaml, from_dict, load_yaml


def test_defaults_validate_and_use_verl_names():
    config = Config().validate()
    assert config.actor_rollout_ref.actor.clip_ratio_low == 0.2
    assert config.actor is config.actor_rollout_ref.actor
    assert config.algorithm.adv_estimator == "appo"
    assert set(config.to_dict()) == {"data", "actor_rollout_ref", "algorithm", "trainer", "tools"}


def test_yaml_round_trip(tmp_path):
    config = Config()
    apply_overrides(config, ["actor_rollout_ref.actor.optim.lr=2.5e-6", "algorithm.omega_clip=[0.5, 2]",
                             "data.task_options={max_ops: 3}", "trainer.max_time_s=60"])
    dump_yaml(config, tmp_path / "c.yaml")
    again = load_yaml(tmp_path / "c.yaml")
    assert again.to_dict() == config.to_dict()
    assert again.actor.optim.lr == 2.5e-6 and again.algorithm.omega_clip == (0.5, 2.0)
    assert again.data.task_options == {"max_ops": 3}


def test_nested_yaml_in_verl_layout(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "actor_rollout_ref:\n  actor:\n    ppo_epochs: 2\n    optim: {lr: 1.0e-6}\n"
        "  rollout: {n: 8}\nalgorithm: {adv_estimator: arpo}\nlearning_rate: 3.0e-6\n")
    config = load_yaml(tmp_path / "run.yaml")
    assert config.actor.ppo_epochs == 2 and config.rollout.n == 8
    assert config.algorithm.adv_estimator == "arpo"
    assert config.actor.optim.lr == 3e-6  # the TRL alias, applied after the nested value


@pytest.mark.parametrize("alias, path, value", [
    ("learning_rate", "actor.optim.lr", 1e-6), ("num_generations", "rollout.n", 6),
    ("beta", "actor.kl_loss_coef", 0.04), ("epsilon_high", "actor.clip_ratio_high", 0.3),
    ("loss_type", "actor.loss_agg_mode", "dr_grpo"), ("max_steps", "trainer.total_training_steps", 7),
])
def test_trl_aliases(alias, path, value):
    config = apply_overrides(Config(), [f"{alias}={value}"])
    node = config
    for part in path.split("."):
        node = getattr(node, part)
    assert node == value


@pytest.mark.parametrize("override, message", [
    ("actor_rollout_ref.actor.lr=1", "unknown config key 'actor_rollout_ref.actor.lr'"),
    ("actor_rollout_ref.actor.clip_ratio_lo=0.1", "did you mean clip_ratio_low"),
    ("data.train_batch_size=many", "expects int"),
    ("data.train_batch_size=true", "expects int"),
    ("trainer.progress=3", "expects bool"),
    ("nonsense", "must look like key=value"),
    ("actor_rollout_ref.rollout=3", "is a section"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(Config(), [override])


@pytest.mark.parametrize("key, value, message", [
    ("algorithm.adv_estimator", "ppo", "algorithm.adv_estimator must be one of"),
    ("actor_rollout_ref.rollout.temperature", 0.0, "temperature must be > 0"),
    ("actor_rollout_ref.actor.ppo_mini_batch_size", 99, "ppo_mini_batch_size must be in"),
    ("algorithm.omega_clip", [1.2, 0.8], "omega_clip"),
    ("actor_rollout_ref.rollout.name", "sglang", "rollout.name must be one of"),
    ("actor_rollout_ref.model.warm_start_direct_share", 1.5, "warm_start_direct_share"),
    ("actor_rollout_ref.rollout.tool_format", "xml", "tool_format must be one of"),
    ("trainer.logger", ["console", "mlflow"], "trainer.logger must be a list of"),
    ("trainer.max_actor_ckpt_to_keep", 0, "max_actor_ckpt_to_keep must be None or >= 1"),
])
def test_validate_names_the_key(key, value, message):
    config = from_dict({key: value})
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_cli_flags_then_overrides():
    args = build_parser().parse_args(
        ["train", "--algo", "grpo", "--steps", "5", "--unrolled", "--branch-per", "sequence",
         "--no-progress", "trainer.total_training_steps=9", "lr=1e-4"])
    config = config_from_args(args)
    assert config.algorithm.adv_estimator == "grpo" and config.actor.unrolled
    assert config.algorithm.branch_per == "sequence" and not config.trainer.progress
    assert config.trainer.total_training_steps == 9  # overrides win over flags
    assert config.actor.optim.lr == 1e-4


def test_cli_resume_reads_the_run_config(tmp_path):
    config = Config()
    config.rollout.n = 3
    dump_yaml(config, tmp_path / "config.yaml")
    args = build_parser().parse_args(["train", "--resume", str(tmp_path), "--steps", "12"])
    resumed = config_from_args(args)
    assert resumed.rollout.n == 3 and resumed.trainer.total_training_steps == 12
    assert resumed.trainer.default_local_dir == str(tmp_path)
    with pytest.raises(ValueError, match="has no config.yaml"):
        config_from_args(build_parser().parse_args(["train", "--resume", str(tmp_path / "x")]))


def test_cli_reports_bad_input_as_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "data.train_batch_size=0"])
    assert exit_info.value.code == 2
    assert "data.train_batch_size must be >= 1" in capsys.readouterr().err


def test_engines_come_from_their_registry(monkeypatch):
    from appo.cli import build_parser
    from appo.rollout import engines

    monkeypatch.setattr(engines._ENGINES, "entries", dict(engines._ENGINES.entries))
    engines.register_engine("echo", lambda context: None)
    assert engines.engine_names()[:2] == ("hf", "vllm") and "echo" in engines.engine_names()
    from_dict({"actor_rollout_ref.rollout.name": "echo"}).validate()
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    engine_flag = next(a for a in train._actions if a.dest == "engine")
    assert "echo" in engine_flag.choices


def test_the_vllm_engine_without_vllm_is_a_clear_error(monkeypatch):
    import importlib.util

    from appo.rollout import engines

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ValueError, match="rollout.name=vllm needs vLLM: pip install"):
        engines.make_engine("vllm", None)


def test_a_model_path_that_cannot_be_loaded_exits_with_2(tmp_path, capsys):
    from appo.cli import main

    for path in (tmp_path / "nope.gguf", tmp_path):  # missing; a directory without a model
        with pytest.raises(SystemExit) as stop:
            main(["train", "--model", str(path), "--out", str(tmp_path / "run"), "--no-progress"])
        assert stop.value.code == 2
        assert "actor_rollout_ref.model.path" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["actor_rollout_ref.actor.clip_ratio_low=1.5"], "clip_ratio_low must be in [0, 1)"),
    (["actor_rollout_ref.actor.loss_agg_mode=foo"], "loss_agg_mode must be one of"),
    (["actor_rollout_ref.actor.kl_loss_type=foo"], "kl_loss_type must be one of"),
    (["actor_rollout_ref.rollout.temperature=.inf"], "temperature' must be a finite number"),
    (["actor_rollout_ref.model.warm_start_steps=-5"], "warm_start_steps must be None or >= 0"),
    (["actor_rollout_ref.model.warm_start_seed=-1"], "warm_start_seed must be None or >= 0"),
    (["actor_rollout_ref.model.dtype=foo"], "model.dtype must be one of"),
    (["--device", "tpu"], "trainer.device must be auto, cpu, cuda or cuda:N"),
    (["--task", "nope"], "data.task must be a registered task"),
    (["--model", "/nonexistent/model"], "model.path must be an existing model directory"),
    (["--config", "/nonexistent/run.yaml"], "--config /nonexistent/run.yaml: No such file"),
    (["data.train_batch_size=[1,"], "override 'data.train_batch_size'"),
    (["data.task_options={colour: red}"], "data.task_options of task 'calc'"),
])
def test_bad_runs_exit_2_with_one_line_naming_the_key(tmp_path, capsys, argv, message):
    from appo.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["train", "--no-progress", "--out", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("appo: error:")


def test_a_malformed_config_file_exits_2(tmp_path, capsys):
    from appo.cli import main

    bad = tmp_path / "run.yaml"
    bad.write_text("data: [1,\n")
    with pytest.raises(SystemExit) as stop:
        main(["train", "--config", str(bad)])
    assert stop.value.code == 2 and "not valid YAML" in capsys.readouterr().err


def test_vllm_that_is_not_installed_is_refused_before_any_work(monkeypatch, capsys, tmp_path):
    import importlib.util

    from appo.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(SystemExit) as stop:
        main(["train", "--engine", "vllm", "--out", str(tmp_path / "run")])
    assert stop.value.code == 2 and "vllm is not installed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_help_shows_each_default_once(capsys):
    from appo.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "default appo" in text
