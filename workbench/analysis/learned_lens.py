"""A learned-lens control: is a layer's agreement with the final layer content, or only
readability through the final norm and unembedding?

The logit lens reads block l's output ``h_l`` through the final norm and unembedding as they
are; OISD trains exactly that read-out. The learned lens first maps ``h_l`` affinely onto the
final block's output space, ``h_l -> h_l M_l^T + c_l``, fitted by ridge least squares to the
final block's output ``h_L`` at the same positions (the affine shortcut of Din et al. 2023,
arXiv 2303.09435, "Jump to Conclusions"; the tuned lens of Belrose et al. 2023 fits the same
kind of map with a KL objective and SGD), then reads it through the same norm and unembedding
(:class:`workbench.models.readout.AffineLens`, lens ``"affine"``). What an affine map can read
out of ``h_l`` it reads whether or not the unembedding could read ``h_l`` directly: a layer
whose logit-lens agreement rose only because it became readable gains nothing here.

Fitted per checkpoint, on that checkpoint's own activations at the scored positions of every
probe split, cross-fitted by prompt: the map applied to a prompt's positions is fitted on the
other half of the prompts (even against odd probe index), so no position is read by a map that
saw it. The fit accumulates ``X^T X`` and ``X^T Y`` per layer and half (bounded memory: two
``(d + 1)^2`` float64 matrices per layer), then solves the ridge problem for the translator
``A = M - I`` (:func:`fit_affine`: penalised towards the identity map, so that with fewer
positions than the width it falls back towards the logit lens, not towards nothing), with
``lambda = RIDGE * trace(X^T X) / (d + 1)``. Cost: one more forward per split, the
accumulation, and one ``(d + 1)`` solve per layer and half.

The lens metrics of docs/metrics.md (``lens_kl``, ``top1_agree``, ...) read through it go to
``analysis/step-N-lens.parquet`` (``LENS_COLUMNS``: ``METRIC_COLUMNS`` and ``lens``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from workbench.measures.probing import LENS_STAT_NAMES, ProbeInputs, compute_probe_metrics
from workbench.models.readout import AffineLens, Lens
from workbench.storage.schema import LENS_COLUMNS

__all__ = ["LEARNED_LENS", "RIDGE", "AffineFit", "fit_affine", "fold_of", "lens_frame"]

LEARNED_LENS = "affine"
#: Ridge strength relative to the inputs' mean squared norm (keeps the solve well posed when
#: positions are few next to the width; small enough not to bias a well-determined fit).
RIDGE = 1e-4


def fold_of(prompt_index: int) -> int:
    """The half a probe prompt belongs to (its index's parity)."""
    return int(prompt_index) % 2


def fit_affine(xtx: torch.Tensor, xty: torch.Tensor, ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """The translator ``(A, b)`` of :class:`AffineLens` (``h -> h + h A^T + b``) from accumulated
    ``X^T X`` ``(d+1, d+1)`` and ``X^T Y`` ``(d+1, d)``, where ``X = [x, 1]``: the ridge least
    squares fit of the residual ``y - x ~ x A^T + b``. The penalty is on ``A``, so with few
    positions the map shrinks towards the identity, the logit lens, never towards 0."""
    d = xty.shape[1]
    residual = xty - xtx[:, :d]  # X^T (Y - x)
    scale = float(torch.diagonal(xtx)[:d].sum()) / (d + 1)
    penalty = torch.eye(d + 1, dtype=xtx.dtype) * ridge * max(scale, 1e-30)
    penalty[d, d] = 0.0  # no penalty on the offset
    w = torch.linalg.solve(xtx + penalty, residual)  # (d+1, d): [A^T; b]
    return w[:d].T.float(), w[d].float()


class AffineFit:
    """Accumulates, per layer ``1..L-1`` and half of the probe prompts, the normal equations of
    the map from ``h_l`` to ``h_L`` at scored positions; :meth:`lenses` solves them."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.xtx: dict[tuple[int, int], torch.Tensor] = {}
        self.xty: dict[tuple[int, int], torch.Tensor] = {}
        self.positions = [0, 0]

    def add(self, inputs: ProbeInputs, final_hidden: torch.Tensor, prompt_index: Sequence[int]) -> None:
        """One batch: ``inputs.hidden`` (layers 1..L-1) and ``final_hidden`` ``(N, T, d)`` (the
        last block's output, before the final norm); ``prompt_index[i]`` is row i's prompt."""
        for fold in (0, 1):
            rows = [i for i, p in enumerate(prompt_index) if fold_of(p) == fold]
            if not rows:
                continue
            mask = inputs.mask[rows]
            y = final_hidden[rows][mask].double()  # (n, d)
            self.positions[fold] += int(y.shape[0])
            ones = torch.ones(y.shape[0], 1, dtype=y.dtype, device=y.device)
            for layer in range(1, self.n_layers):
                x = torch.cat([inputs.hidden[layer - 1][rows][mask].double(), ones], dim=1)  # (n, d+1)
                key = (layer, fold)
                self.xtx[key] = self.xtx.get(key, 0) + (x.T @ x).cpu()
                self.xty[key] = self.xty.get(key, 0) + (x.T @ y).cpu()

    def lenses(self, base) -> dict[int, Lens]:
        """``{fold: lens}``: the lens that reads fold ``f``'s prompts, fitted on the other half
        (on all prompts when one half is empty)."""
        out = {}
        for fold in (0, 1):
            source = 1 - fold if self.positions[1 - fold] else fold
            translators = {}
            for layer in range(1, self.n_layers):
                weight, bias = fit_affine(self.xtx[(layer, source)], self.xty[(layer, source)])
                translators[layer] = (weight.to(base_device(base)), bias.to(base_device(base)))
            out[fold] = AffineLens(base, translators, name=LEARNED_LENS)
        return out

    @property
    def cross_fitted(self) -> bool:
        return all(self.positions)


def base_device(base) -> torch.device:
    """The device of a lens's read-out (its head's weights)."""
    head = getattr(base, "head", None)
    weight = getattr(head, "weight", None)
    if weight is None:
        weight = getattr(head, "W_U", None)
    return weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")


def _rows(inputs: ProbeInputs, rows: list[int], lens: Lens) -> ProbeInputs:
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    return ProbeInputs(hidden=[h[rows] for h in inputs.hidden], final_logits=inputs.final_logits[rows], lens=lens,
                       targets=inputs.targets[rows], mask=inputs.mask[rows],
                       attention_mask=pick(inputs.attention_mask), input_ids=pick(inputs.input_ids))


def lens_frame(inputs: ProbeInputs, prompt_index: Sequence[int], lenses: dict[int, Lens], *, run: str, step: int,
               split: str, source: str, chunk_size: int | None = None) -> pd.DataFrame:
    """The lens metrics of one split read through the cross-fitted ``lenses`` (each half's
    prompts through its own lens), as ``LENS_COLUMNS`` rows: per-half means weighted by their
    scored positions, i.e. the mean over every scored position of the split."""
    parts = []
    for fold, lens in lenses.items():
        rows = [i for i, p in enumerate(prompt_index) if fold_of(p) == fold]
        if rows and bool(inputs.mask[rows].any()):
            parts.append(compute_probe_metrics(_rows(inputs, rows, lens), chunk_size=chunk_size))
    total = sum(r.n_positions for r in parts)
    layers = np.arange(1, inputs.n_layers + 1)
    rows = []
    for name in LENS_STAT_NAMES:
        values = sum(r.lens[name] * r.n_positions for r in parts) / total
        rows += [(layer, name, float(v)) for layer, v in zip(layers, values)]
    depth = sum(r.prediction_depth * r.n_positions for r in parts) / total
    rows.append((0, "prediction_depth", float(depth)))
    frame = pd.DataFrame(rows, columns=["layer", "metric", "value"])
    frame["run"], frame["step"], frame["head"], frame["ref_layer"] = run, int(step), -1, -1
    frame["split"], frame["source"], frame["lens"] = split, source, LEARNED_LENS
    return frame.astype({"layer": "int64", "head": "int64", "ref_layer": "int64", "step": "int64"})[LENS_COLUMNS]

