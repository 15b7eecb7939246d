"""Where training changed the weights: per block and module kind, from two checkpoints alone.

For each parameter group (the embeddings, each decoder block split into attention, MLP and
norms, the final norm, the output head):

- ``rel_change`` = ``||W_t - W_0|| / ||W_0||`` (Frobenius norms summed over the group's
  tensors), the relative size of the update since the start;
- ``changed_bf16`` = the share of the group's parameters whose bfloat16 value differs
  from the start's: RL post-training in bf16 is reported to update only 5-30% of them
  (arXiv 2505.11711), so a share near 1 means a dense update, near 0 a sparse one.

Tensors are read one at a time from the two folders' safetensors files, so memory holds
two tensors, never two models. A tied output head is stored once, as the embeddings.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from workbench.errors import (
    CheckpointError,  # torch is imported where tensors are read: the app imports this module
)
from workbench.storage.schema import DRIFT_COLUMNS

if TYPE_CHECKING:
    import torch

#: Module kinds inside a decoder block, and the row that adds them up.
ALL = "all"

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


def parameter_group(name: str, n_layers: int) -> tuple[str, int, str]:
    """``(module, block, kind)`` of a parameter name; ``block`` orders the rows: 0 the
    embeddings, 1..L the decoder blocks, L+1 the final norm, L+2 the head."""
    match = _BLOCK.search(name)
    if match:
        part = name[match.end():].split(".")[0]  # the block's child: self_attn, mlp, input_layernorm, ln_1
        if re.search(r"norm|^ln_?\d*$", part):
            kind = "norm"
        elif re.search(r"attn|attention", part):
            kind = "attention"  # with its own q/k norms (Qwen3)
        elif re.search(r"mlp|feed_forward|ffn|experts", part):
            kind = "mlp"
        else:
            kind = "other"
        return "block", int(match.group(1)) + 1, kind
    if re.search(r"lm_head|embed_out|output_layer", name):
        return "head", n_layers + 2, "head"
    if re.search(r"embed|wte|wpe", name):
        return "embeddings", 0, "embedding"
    if re.search(r"norm|ln_f", name):
        return "final_norm", n_layers + 1, "norm"
    return "other", n_layers + 3, "other"


def tensor_files(folder: Path) -> dict[str, Path]:
    """Parameter name -> the safetensors file holding it (one file or an index's shards)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{folder} has no safetensors weights to measure weight drift against")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def _tensors(files: dict[str, Path], names: list[str]) -> Iterator[tuple[str, "torch.Tensor"]]:
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in keys:
                yield name, f.get_tensor(name)


def weight_drift(start: str | Path, now: str | Path, n_layers: int | None = None) -> pd.DataFrame:
    """Per-group drift of the weights in folder ``now`` from those in folder ``start``.

    Returns:
        One row per (module, block, kind) and one ``kind = "all"`` row per block (and per
        module outside the blocks): columns ``module, block, kind, rel_change,
        changed_bf16, n_params`` (``run`` and ``step`` are the caller's).

    Raises:
        CheckpointError: a folder without safetensors weights, or parameters that differ
            in name or shape between the two.
    """
    start_files, now_files = tensor_files(Path(start)), tensor_files(Path(now))
    if start_files.keys() != now_files.keys():
        missing = sorted(start_files.keys() ^ now_files.keys())[:3]
        raise CheckpointError(f"{now} and {start} hold different parameters (e.g. {missing}): no weight drift")
    if n_layers is None:  # the decoder blocks the names count
        n_layers = 1 + max((int(m.group(1)) for n in start_files if (m := _BLOCK.search(n))), default=-1)
    sums: dict[tuple[str, int, str], list[float]] = {}  # group -> [||dW||^2, ||W0||^2, changed, n]
    from contextlib import ExitStack

    from safetensors import safe_open

    with ExitStack() as stack:
        opened: dict[Path, object] = {}

        def now_tensor(name: str) -> "torch.Tensor":
            path = now_files[name]
            if path not in opened:
                opened[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            return opened[path].get_tensor(name)

        for name, w0 in _tensors(start_files, sorted(start_files)):
            _accumulate(sums, name, w0, now_tensor(name), n_layers, start, now)
    rows = [{"module": module, "block": block, "kind": kind,
             "rel_change": math.sqrt(d) / math.sqrt(b) if b > 0 else (0.0 if d == 0 else math.inf),
             "changed_bf16": c / n if n else 0.0, "n_params": int(n)}
            for (module, block, kind), (d, b, c, n) in sorted(sums.items(), key=lambda kv: (kv[0][1], kv[0][2]))]
    return pd.DataFrame(rows, columns=DRIFT_COLUMNS[2:])


def _accumulate(sums: dict, name: str, w0, wt, n_layers: int, start, now) -> None:
    """Add one tensor's ``||dW||^2``, ``||W0||^2``, bf16-changed count and size to its groups."""
    import torch

    if w0.shape != wt.shape:
        raise CheckpointError(f"{name} has shape {tuple(wt.shape)} in {now} but {tuple(w0.shape)} in {start}")
    module, block, kind = parameter_group(name, n_layers)
    w0f, wtf = w0.double(), wt.double()
    delta = float(((wtf - w0f) ** 2).sum())
    base = float((w0f ** 2).sum())
    changed = float((w0.to(torch.bfloat16) != wt.to(torch.bfloat16)).sum())
    for key in {(module, block, kind), (module, block, ALL)}:
        acc = sums.setdefault(key, [0.0, 0.0, 0.0, 0])
        acc[0] += delta
        acc[1] += base
        acc[2] += changed
        acc[3] += w0.numel()


def drift_summary(drift: pd.DataFrame) -> dict | None:
    """A run's drift at its last measured checkpoint: ``step``, the most-moved ``block`` and
    its ``rel_change``, and ``changed_bf16``, the share of all parameters whose bf16 value
    changed; None without block rows. What ``oisd compare`` prints and the dashboard notes."""
    if drift.empty:
        return None
    last = drift[drift["step"] == drift["step"].max()]
    moved = most_moved_block(last)
    if moved is None:
        return None
    total = last[last["kind"] == ALL]
    share = float((total["changed_bf16"] * total["n_params"]).sum() / max(1, total["n_params"].sum()))
    return {"step": int(last["step"].iloc[0]), "block": moved[0], "rel_change": moved[1], "changed_bf16": share}


def most_moved_block(drift: pd.DataFrame) -> tuple[int, float] | None:
    """``(block, rel_change)`` of the decoder block whose weights moved most (its ``all``
    row) in a drift table of one checkpoint; None without block rows."""
    rows = drift[(drift["module"] == "block") & (drift["kind"] == ALL)]
    if rows.empty:
        return None
    best = rows.loc[rows["rel_change"].idxmax()]
    return int(best["block"]), float(best["rel_change"])
