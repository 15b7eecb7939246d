"""``oisd probe``: every argument is checked before anything is written. A bad one is a
one-line ``error: ...`` on stderr, exit status 2, and ``--out`` is not created (or is left
exactly as it was) - not a warning per checkpoint and a half-made analysis folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workbench.cli import main

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [{"prompt": "Compute 1+2.\n", "reference": "1+2=3. Answer: 3"},
           {"prompt": "Compute 7-5.\n", "reference": "7-5=2. Answer: 2"}]


@pytest.fixture(scope="module")
def trl_dir(tmp_path_factory, tiny_qwen3_dir) -> Path:
    """A plain TRL output dir: ``checkpoint-2/`` and ``checkpoint-4/`` (copies of the tiny Qwen3)."""
    root = tmp_path_factory.mktemp("trl") / "trl-out"
    for step in (2, 4):
        shutil.copytree(tiny_qwen3_dir, root / f"checkpoint-{step}")
    return root


def _probe(argv: list[str]) -> int:
    try:
        return main(["probe", *argv])
    except SystemExit as exit_:  # argparse's own refusals
        return exit_.code


def _snapshot(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


def _files(tmp_path: Path) -> dict[str, Path]:
    files = {"missing": tmp_path / "missing.jsonl", "empty": tmp_path / "empty.jsonl",
             "bad": tmp_path / "bad.jsonl", "noprompt": tmp_path / "noprompt.jsonl"}
    files["empty"].write_text("\n")
    files["bad"].write_text(json.dumps(PROMPTS[0]) + "\n" + '{"prompt": "a"\n')
    files["noprompt"].write_text('{"reference": "b"}\n')
    return files


BAD = [
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1, got -1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--detail-prompts", "-1"], "--detail-prompts must be >= 0, got -1"),
    (["--n-prompts", "0"], "--n-prompts must be >= 1, got 0"),
    (["--prompts", "{missing}"], "does not exist"),
    (["--prompts", "{empty}"], "is empty"),
    (["--prompts", "{bad}"], "line 2, column"),
    (["--prompts", "{noprompt}"], "line 1: needs a non-empty string 'prompt'"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["--device", "nonsense"], "--device nonsense"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--chat-template"], "--chat-template: the tokenizer of"),
    (["--device-map", "everywhere"], "--device-map everywhere: use one of auto, balanced"),
    (["--device-map", "auto", "--device", "cpu"], "--device-map places each model itself: not with --device"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_argument_is_refused_before_anything_is_written(tmp_path, trl_dir, capsys, args, message):
    files = _files(tmp_path)
    args = [a.format(**files) for a in args]
    out = tmp_path / "out"
    assert _probe([str(trl_dir), "--out", str(out), *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert not out.exists()


def test_a_bad_argument_leaves_an_existing_out_folder_as_it_was(tmp_path, trl_dir, tiny_qwen3_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "out"
    assert _probe([str(tiny_qwen3_dir), "--out", str(out), "--prompts", str(prompts), "--max-new-tokens", "4"]) == 0
    before = _snapshot(out)
    for args in (["--max-new-tokens", "-1"], ["--device", "nonsense"], ["--detail-prompts", "-3"]):
        capsys.readouterr()
        code = _probe([str(tiny_qwen3_dir), str(trl_dir), "--out", str(out), "--prompts", str(prompts), "--force",
                       *args])
        assert code == 2 and capsys.readouterr().err.startswith("error: "), args
        assert _snapshot(out) == before, args


def test_every_input_is_checked_before_the_first_is_written(tmp_path, trl_dir, tiny_qwen3_dir, capsys):
    """The second input's tokenizer cannot be loaded: nothing of the first is written either."""
    broken = shutil.copytree(tiny_qwen3_dir, tmp_path / "broken")
    (broken / "tokenizer_config.json").write_text("{")
    out = tmp_path / "out"
    assert _probe([str(trl_dir), str(broken), "--out", str(out), "--max-new-tokens", "4"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot load the tokenizer of {broken}"), lines
    assert not out.exists()


def test_a_run_folder_input_is_checked_too(tmp_path, trl_dir, capsys):
    """Run folders are analysed in place: a bad length is refused before any checkpoint fails on it."""
    out = tmp_path / "out"
    assert _probe([str(trl_dir), "--out", str(out), "--max-new-tokens", "3"]) == 0
    run_dir = out / "trl-out"
    before = _snapshot(run_dir)
    capsys.readouterr()
    assert _probe([str(run_dir), "--force", "--max-new-tokens", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --max-new-tokens must be >= 1, got -1"
    assert _snapshot(run_dir) == before
    # --prompts and --chat-template do not apply to a run folder (its own probe set): said, not ignored.
    assert _probe([str(run_dir), "--force", "--prompts", str(_files(tmp_path)["bad"])]) == 2
    assert capsys.readouterr().err.strip() == ("error: --prompts applies to inputs that are not run folders; "
                                               "a run folder is probed with its own probe set")
    assert _snapshot(run_dir) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_machine_lacks_is_refused(tmp_path, trl_dir, capsys):
    out = tmp_path / "out"
    assert _probe([str(trl_dir), "--out", str(out), "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --device cuda: ")
    assert not out.exists()


def test_the_command_line_refuses_in_one_line(tmp_path, trl_dir, cli_env):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "workbench.cli", "probe", str(trl_dir), "--out", str(out),
                             "--max-new-tokens", "-1"], cwd=REPO, env=cli_env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == "error: --max-new-tokens must be >= 1, got -1"
    assert not out.exists()


def test_a_model_spread_by_a_device_map_probes_as_on_one_device(tmp_path, tiny_qwen3_dir):
    """``--device-map`` reaches TransformerBridge and the greedy decoder; on a CPU-only machine
    every module lands on the CPU, and the analysis equals ``--device cpu``'s."""
    import pandas as pd

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    tables = {}
    for name, flags in (("one", ["--device", "cpu"]), ("mapped", ["--device-map", '{"": "cpu"}'])):
        out = tmp_path / name
        assert _probe([str(tiny_qwen3_dir), "--out", str(out), "--prompts", str(prompts), "--max-new-tokens", "4",
                       "--exit", *flags]) == 0
        tables[name] = pd.read_parquet(next((out / tiny_qwen3_dir.name / "analysis").glob("*-metrics.parquet")))
    pd.testing.assert_frame_equal(tables["mapped"], tables["one"], check_exact=True)

