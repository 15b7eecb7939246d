"""The loss path under FSDP2 on CPU: ``fully_shard`` on a 2-rank gloo mesh gives the unsharded
loss and gradients (``tests/trainer/fsdp2_ranks.py`` does the work on each rank).

accelerate runs FSDP only on GPUs, so this checks the part of the TRL backend that sharding
changes: the chunked vocabulary pass (the policy's head, OISD's logit lens at two blocks),
OISD's attention rows, the hinted teacher (SDPG: the sharded policy itself), the frozen
reference (OPSD's teacher, the KL term). Tolerance: 1e-5 on the loss and every gradient
entry (float32; sharding changes only the order of a few sums).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("config", ["oisd", "sdpg-ufkl", "opsd"])
def test_loss_and_gradients_under_fully_shard_equal_unsharded(config, tiny_qwen3_dir, tmp_path, cli_env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "result.json"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(port),
               str(REPO / "tests" / "trainer" / "fsdp2_ranks.py"), str(tiny_qwen3_dir), config, str(out)]
    result = subprocess.run(command, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["sharded"] == ["DTensor"]  # every parameter of the FSDP2 model is sharded
    assert r["terms"] == r["terms_fsdp2"]
    assert r["loss_fsdp2"] == pytest.approx(r["loss_plain"], rel=1e-5, abs=1e-6)
    for key, value in r["logs_plain"].items():
        assert r["logs_fsdp2"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert r["max_grad"] > 1e-3  # the loss has real gradients to compare
    assert r["max_grad_diff"] <= 1e-5, r["worst"]
