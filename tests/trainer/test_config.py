"""Config validation: every problem is one line that names the key, before any work."""

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import CONFIG_DIR, describe_config, load_config, parse_overrides, resolve_config_path
from trainer.methods import METHOD_NAMES
from workbench.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "override, message",
    [
        (["oisd.lamda_logit=1"], "unknown config key 'oisd.lamda_logit' (did you mean 'oisd.lambda_logit'?)"),
        (["bogus=1"], "unknown config key 'bogus'"),
        (["steps=abc"], "config key 'steps': input should be a valid integer (got 'abc')"),
        (["steps=3.5"], "config key 'steps': input should be a valid integer (got 3.5)"),
        (["steps=0"], "config key 'steps': input should be greater than or equal to 1 (got 0)"),
        (["rollout.group_size=1"], "config key 'rollout.group_size': input should be greater than or equal to 2"),
        (["rollout.temperature=0"], "config key 'rollout.temperature': input should be greater than 0"),
        (["method=ppo"], "config key 'method'"),
        (["oisd.layers=[1.5]"], "oisd.layers: depth fraction 1.5 must be in (0, 1)"),
        (["oisd.layers=[0]"], "oisd.layers: block index 0 must be >= 1"),
        (["sdpg.ref_kl=kl"], "config key 'sdpg.ref_kl'"),
        (["data.arithmetic.operators=/"], "data.arithmetic.operators"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_overrides_keep_types_and_nest():
    tree = parse_overrides(["oisd.layers=[2, 0.25]", "grpo.dual_clip=3", "data.path=null", "method=oisd+sdpg"])
    assert tree == {"oisd": {"layers": [2, 0.25]}, "grpo": {"dual_clip": 3}, "data": {"path": None},
                    "method": "oisd+sdpg"}
    cfg = load_config(None, ["oisd.layers=[2, 0.25]", "oisd.lambda_attn=0", "method=oisd"])
    assert cfg.oisd.layers == [2, 0.25] and cfg.oisd.lambda_attn == 0.0
    assert cfg.spec.oisd and not cfg.spec.sdpg


def test_set_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(None, ["steps"])


def test_every_bundled_config_validates():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"grpo", "oisd", "oisd+sdpg", "opsd", "rlsd", "sdpg-ufkl", "sdpg-urkl"} <= set(names)
    methods = {n: load_config(n).method for n in names}
    assert methods["sdpg-urkl"] == "sdpg" and load_config("sdpg-urkl").sdpg.ref_kl == "urkl"
    assert methods["oisd+sdpg"] == "oisd+sdpg"
    # Every method of the table has a bundled config, which its name stands for.
    for method in METHOD_NAMES:
        assert load_config(method).method == method
    assert resolve_config_path("sdpg").stem == "sdpg-ufkl"


def _needs_reference(overrides):
    cfg = load_config(None, overrides)
    return cfg.spec.needs_reference(cfg)


def test_reference_model_only_when_a_term_needs_it():
    assert not _needs_reference(["method=grpo"])
    assert _needs_reference(["method=grpo", "grpo.kl_coef=0.1"])
    assert _needs_reference(["method=sdpg"])  # alpha > 0 by default: L_K
    assert not _needs_reference(["method=sdpg", "sdpg.alpha=0"])
    assert _needs_reference(["method=opsd"])  # fixed initial teacher
    assert not _needs_reference(["method=oisd"])


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_describe_config_lists_every_key():
    lines = describe_config()
    assert any(line.startswith("oisd.lambda_logit (1.0):") for line in lines)
    assert any(line.startswith("sdpg.beta_base (0.001):") for line in lines)


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_cli_config_error_exits_2_with_one_line(tmp_path):
    r = _cli("train", "--config", "oisd", "--set", "oisd.lamda_logit=1", "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown config key 'oisd.lamda_logit' (did you mean 'oisd.lambda_logit'?)"
    assert not (tmp_path / "r").exists()  # nothing written


def test_cli_help_for_every_subcommand():
    for sub in ["warmstart", "train", "probe", "dashboard", "demo", "compare", "eval"]:
        r = _cli(sub, "--help")
        assert r.returncode == 0, (sub, r.stderr)
        assert "usage: oisd " + sub in r.stdout


def test_cli_model_folder_that_is_not_one(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _cli("train", "--set", f"model.path={tmp_path / 'empty'}", "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2
    assert "is not a model folder (no config.json)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-5", "sdpg.beta_base=1E-3"])
    assert cfg.optim.lr == 3e-5 and cfg.sdpg.beta_base == 1e-3
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 5e-6\n")
    assert load_config(f).optim.lr == 5e-6


def test_paper_configs_keep_the_papers_coefficients():
    oisd, sdpg = load_config("paper/oisd"), load_config("paper/sdpg")
    assert (oisd.oisd.lambda_logit, oisd.oisd.lambda_attn, oisd.oisd.layers) == (1.0, 0.1, [6])
    assert (sdpg.sdpg.beta_base, sdpg.sdpg.alpha, sdpg.sdpg.t_warm, sdpg.sdpg.t_decay) == (1e-3, 1e-3, 50, 350)
    assert {load_config(f"paper/{m}").method for m in ("grpo", "rlsd", "opsd")} == {"grpo", "rlsd", "opsd"}
    # The bundled (embedded) configs are calibrated for the tiny model instead.
    assert load_config("oisd").oisd.lambda_logit == 4.0 and load_config("sdpg-ufkl").sdpg.beta_base == 0.3
