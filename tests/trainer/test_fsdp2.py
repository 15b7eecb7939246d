"""A training step under FSDP2 on CPU: ``fully_shard`` on a 2-rank gloo mesh, each rank with its
own half of the batch, gives the unsharded model's step on the global batch
(``tests/trainer/fsdp2_ranks.py`` does the work on each rank).

accelerate runs FSDP only on GPUs, so this checks the part of the TRL backend that sharding
changes: the chunked vocabulary pass (the policy's head, OISD's logit lens at two blocks),
OISD's attention rows, the hinted teacher (SDPG: the sharded policy itself), the frozen
reference (OPSD's teacher, the KL term), and FSDP2's gradient reduction (each rank sees only
its half). The step is plain SGD, so the weights after it compare to the rounding of the
gradients (1e-3 of the update's largest entry: sharding and halving change only the order of
a few float32 sums).
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
    out = tmp_path
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(port),
               str(REPO / "tests" / "trainer" / "fsdp2_ranks.py"), str(tiny_qwen3_dir), config, str(out)]
    result = subprocess.run(command, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["rows"] != ranks[1]["rows"]  # each rank had its own data
    for r in ranks:
        assert r["sharded"] == ["DTensor"]  # every parameter of the FSDP2 model is sharded
        assert r["terms"] == r["terms_fsdp2"]
        assert r["loss_fsdp2"] == pytest.approx(r["loss_plain"], rel=1e-5, abs=1e-6)
        assert r["grad_norm_fsdp2"] == pytest.approx(r["grad_norm_plain"], rel=1e-5)
        assert r["grad_norm_plain"] > 0 and r["max_update"] > 1e-4  # a real step to compare
        assert r["max_weight_diff"] <= 1e-3 * r["max_update"], (r["worst"], r["max_weight_diff"], r["max_update"])
