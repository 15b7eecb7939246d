"""Summaries of probe tables that the trainer, ``oisd compare`` and the dashboard share:
at which layers a run is reported, the trainer's per-step ``probe/...`` scalars, and the
correct-minus-wrong gap of a metric between the outcome-conditioned splits.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from workbench.storage.schema import OUTCOME_SPLITS

__all__ = ["ALIGNMENT_METRICS", "GAP_METRICS", "outcome_gap", "probe_summary", "report_layers"]

ALIGNMENT_METRICS = ("top1_agree", "attn_js_final")
GAP_METRICS = ("top1_agree", "lens_js", "attn_js_final")  # correct-minus-wrong gaps reported


def report_layers(oisd_layers: Sequence[int], num_layers: int | None) -> list[int]:
    """The layers a run's alignment is reported at: its OISD layers, else the middle block
    ``[max(1, L // 2)]``. The trainer's ``probe/...`` metrics and ``oisd compare`` use it.

    Raises:
        ValueError: no OISD layers and no layer count to take the middle of.
    """
    if oisd_layers:
        return [int(x) for x in oisd_layers]
    if num_layers is None:
        raise ValueError("report_layers needs the OISD layers or the number of layers")
    return [max(1, int(num_layers) // 2)]


def probe_summary(df: pd.DataFrame, layers: Sequence[int]) -> dict[str, float]:
    """The built-in probes of one step as scalars for metrics.jsonl.

    ``probe/<metric>/layer<l>``: each of :data:`GAP_METRICS` at each of ``layers`` on the
    reference split; ``probe/gap/<metric>/layer<l>``: its correct-minus-wrong gap
    (:func:`outcome_gap`) where both outcome splits hold sequences. All heads
    (``head = -1``), not pairwise (``ref_layer = -1``).

    Args:
        df: one step's probe rows (``METRIC_COLUMNS``).
        layers: the layers to report (:func:`report_layers`).
    """
    base = df[(df["head"] == -1) & (df["ref_layer"] == -1)]  # df["head"]: df.head is a method
    out: dict[str, float] = {}
    for layer in layers:
        at_layer = base[base["layer"] == layer]
        for metric in GAP_METRICS:
            rows = at_layer[at_layer["metric"] == metric]
            reference = rows.loc[rows["split"] == "reference", "value"]
            if len(reference):
                out[f"probe/{metric}/layer{layer}"] = float(reference.iloc[0])
            gap = outcome_gap(rows)
            if len(gap):
                out[f"probe/gap/{metric}/layer{layer}"] = float(gap.iloc[0])
    return out


def outcome_gap(rows: pd.DataFrame) -> pd.Series:
    """The correct-minus-wrong gap per step: ``value(sampled_correct) - value(sampled_wrong)``.

    Args:
        rows: one metric at one layer, columns ``step, split, value``.

    Returns:
        Series indexed by step, only steps where both outcome splits have a value.
    """
    wide = rows[rows["split"].isin(OUTCOME_SPLITS)].pivot_table(index="step", columns="split", values="value")
    if not set(OUTCOME_SPLITS) <= set(wide.columns):
        return pd.Series(dtype=float)
    return (wide["sampled_correct"] - wide["sampled_wrong"]).dropna()
