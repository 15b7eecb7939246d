"""The prepared GPU check (``benchmarks/gpu_check.py``) rehearsed on CPU: ``--smoke`` runs the
same stages at a tiny shape, so a GPU session does not find a broken script.

No timing is asserted: the test checks that every measurement the GPU run reports is
present, positive and recorded as such in the JSON.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_measures_every_backend_and_method(tmp_path, cli_env):
    pytest.importorskip("trl")
    out = tmp_path / "gpu_check.json"
    md = tmp_path / "gpu_check.md"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out), "--markdown", str(md)],
        check=False, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["smoke"] is True and data["device"] == "cpu" and data["complete"] is True
    for backend in ("builtin", "trl"):
        for method in ("grpo", "oisd", "sdpg"):
            row = data["steps"][backend][method]
            assert row["status"] == "ok", (backend, method, row)
            assert row["step_s"] > 0 and row["peak_mib"] > 0 and row["steps_timed"] == 1, (backend, method)
    # vLLM needs a GPU and the rank-sync check two: skipped, with the reason recorded.
    assert all(data["steps"]["trl_vllm"][m]["status"] == "skipped" for m in ("grpo", "oisd", "sdpg"))
    assert data["rank_sync"]["status"] == "skipped" and "GPU" in data["rank_sync"]["reason"]
    analyzer = data["analyzer"]
    assert analyzer["status"] == "ok", analyzer
    assert analyzer["analyzer_s"] > 0 and analyzer["floor_s"] > 0 and analyzer["forward_s"] > 0
    assert analyzer["analyzer_over_floor"] == pytest.approx(analyzer["analyzer_s"] / analyzer["floor_s"])
    probe = data["probe"]  # `oisd probe` on one checkpoint against its floor
    assert probe["status"] == "ok", probe
    assert probe["probe_s"] > probe["boot_s"] > 0 and probe["floor_s"] > 0
    assert probe["probe_over_floor"] == pytest.approx((probe["probe_s"] - probe["boot_s"]) / probe["floor_s"])
    assert {"decode", "forward", "lens"} <= set(probe["floor_stages"]) and "lens" in probe["stage_seconds"]
    assert data["probe_processes"]["status"] == "skipped" and "GPU" in data["probe_processes"]["reason"]
    assert not [s for s in data["stages"] if s["status"] == "failed"]
    table = md.read_text()
    assert table in result.stdout  # the markdown is printed too
    assert table.count("| ok |") == 6 and "floor" in table and "`oisd probe`, one checkpoint, boot excluded" in table


@pytest.mark.slow  # 29 s; the two-process probe itself is tested in tests/workbench/test_probe_processes.py
def test_gpu_check_probe_over_processes_runs_on_cpu(tmp_path, cli_env):
    """The 2-process probe stage, which a GPU session runs only with 2 GPUs, rehearsed on CPU
    (``--rank-sync-cpu``: 2 gloo processes): both probes ran, the checkpoints were shared out
    (process 0 and 1 each analysed some) and the two analyses agree value for value."""
    out = tmp_path / "gpu_check.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--rank-sync-cpu",
         "--only", "probe_processes", "--out", str(out)],
        check=False, cwd=tmp_path, env={**cli_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stage = json.loads(out.read_text())["probe_processes"]
    assert stage["status"] == "ok", stage
    assert stage["seconds_1proc"] > 0 and stage["seconds_2proc"] > 0
    assert stage["speedup"] == pytest.approx(stage["seconds_1proc"] / stage["seconds_2proc"])
    assert set(stage["made_by_1proc"].values()) == {0}
    assert sorted(set(stage["made_by_2proc"].values())) == [0, 1] and len(stage["made_by_2proc"]) == 4
    assert stage["max_abs_diff"] == 0.0
