"""The TransformerLens-backed analyzer: ``oisd probe RUN_DIR``.

For each checkpoint of a run, :func:`probe_run` boots the folder with
``TransformerBridge.boot_transformers`` (TransformerLens 4), runs the run's fixed
probe set with ``run_with_cache`` restricted to the hooks the metrics need, and
writes tidy parquet tables to ``analysis/step-NNNNNN-{kind}.parquet``:

- ``metrics``: the metric set of docs/metrics.md (``workbench.storage.schema.METRIC_COLUMNS``,
  ``source = "analyzer"``), splits ``"reference"`` and ``"greedy"``;
- ``topk``, ``cells``, ``attn``: per-prompt drill-down for the first
  ``detail_prompts`` probe prompts (reference split).

Numbers: the bridge is used exactly as booted, with raw HF weights (no
``enable_compatibility_mode``, so no LayerNorm folding, weight centring or
unembedding centring, which would change every intermediate read-out). Layer l's
residual is ``blocks.{l-1}.hook_resid_post``, the read-out is the bridge's own
``ln_final`` then ``unembed`` (the wrapped HF modules), and layer L is the model's
logits. The read-out of the last block's residual is checked against those logits
at every scored position before anything is written, so a model whose head does
more than norm + unembedding (a logit soft-cap, a scale) is refused instead of
producing a wrong lens. The batch is built by ``workbench.analysis.probe_runner.probe_batch`` and the
metrics by ``workbench.measures.probing``: the same code as the trainer's built-in probes,
which agree with this analyzer to 1e-4 (tested).

Greedy split: the completions are decoded with ``workbench.models.generation.sample`` on the
HF model the bridge wraps (eager attention, as the built-in probes decode them),
then teacher-forced through the bridge like the references.

Incremental: a checkpoint whose four tables exist with the current probe set hash
is skipped unless ``force``. A checkpoint that fails its manifest, a folder that is
not a model, or an architecture TransformerLens cannot boot is reported in one
line (a warning and an entry of :attr:`ProbeReport.skipped`); the others go on.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from workbench.analysis.early_exit import exit_rows, reference_verifier, resolve_exit_layers
from workbench.analysis.learned_lens import AffineFit, lens_frame
from workbench.analysis.memory import StageSeconds, fix_malloc_threshold
from workbench.analysis.processes import Processes
from workbench.analysis.probe_runner import record_prompt_ids
from workbench.analysis.targets import Target, checkpoint_targets, start_model
from workbench.errors import CheckpointError, ConfigError, DataError, WorkbenchError, first_line
from workbench.models.generation import check_max_new_tokens
from workbench.models.adapters import adapter_base
from workbench.models.loading import DTYPES
from workbench.models.readout import LogitLens
from workbench.storage.atomic import atomic_write_parquet
from workbench.storage.checkpoints import MANIFEST_NAME
from workbench.storage.paths import SEGMENT_KINDS, probe_set_hash
from workbench.storage.runstore import Run
from workbench.storage.runwriter import merge_analysis_files, write_metric_table
from workbench.storage.schema import (
    ATTN_COLUMNS,
    CELL_COLUMNS,
    DEFAULT_PROBE_MAX_NEW_TOKENS,
    METRIC_COLUMNS,
    TOPK_COLUMNS,
)

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "PROCESSING_MODE", "ProbeReport", "probe_checkpoint", "probe_run"]

KINDS = ("metrics", "topk", "cells", "attn")
PROCESSING_MODE = "none (boot_transformers raw HF weights; no compatibility mode, no fold_ln)"
#: Rows the drill-down attention table of one checkpoint may hold. Every visible (query,
#: key) pair of every layer and head is kept while the table fits; beyond, each query keeps
#: its top-k keys with k as large as fits (recorded as ``attn_top_k``, with the weight kept,
#: in the file's provenance). Stored compactly (float16 weights, int16 positions) a row costs
#: about 3 bytes: Qwen3-4B's 36 layers x 32 heads on four 512-token references keep k = 7
#: keys per query in a 50 MB file (benchmarks/bench_probe_depth.py; benchmarks/README.md).
ATTN_DETAIL_ROWS = 16_000_000
#: Rows per parquet row group of the attention table (sorted by prompt, layer, head): the
#: dashboard reads one (prompt, layer) at a time and skips the other groups.
ATTN_ROW_GROUP = 1 << 16
# The read-out of the last block must reproduce the model's logits within this
# tolerance (absolute, scaled by the logits' magnitude); half precisions round more.
_READOUT_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
# Scored positions that check it: a read-out that is not ln_final + unembed (softcapping,
# a bias, a scale) shows at every position, and a check over all of them cost 3.6 s of a
# 15 s capture at Qwen3-0.6B's shape (16 prompts).
_READOUT_CHECK_ROWS = 64
#: Bytes of attention patterns (every layer's ``(N, H, T, T)``) a probe batch may hold from
#: its one cached forward. Within it the attention metrics read them there; beyond it a
#: second forward hands them over one layer at a time (:func:`stream_attention`), so that
#: memory does not grow with depth x heads x length^2 (36 x 32 at 512 tokens would hold
#: 9.7 GB for 8 prompts). The second forward cost 9 of 25 s per split at Qwen3-0.6B's
#: shape, where 16 prompts' patterns are 117 MB.
HELD_PATTERN_BYTES = 1 << 28


def pattern_bytes(n_layers: int, n_heads: int, input_ids: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes of every layer's attention patterns over the ``(N, T)`` batch ``input_ids``."""
    n_seq, seq_len = input_ids.shape
    return n_layers * n_seq * n_heads * seq_len * seq_len * dtype.itemsize


@dataclass
class ProbeReport:
    """What :func:`probe_run` did.

    Attributes:
        run_dir: the run folder.
        analysed: steps analysed in this call.
        up_to_date: steps skipped because their analysis exists with this probe set.
        skipped: ``(step, one-line reason)`` for checkpoints that could not be analysed.
        files: parquet files written (a checkpoint's file merged into a segment, as the segment).
    """

    run_dir: Path
    analysed: list[int] = field(default_factory=list)
    up_to_date: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"{self.run_dir}: analysed {len(self.analysed)}, up to date {len(self.up_to_date)},"
            f" skipped {len(self.skipped)}"
        ]
        lines += [f"  skipped step {step}: {reason}" for step, reason in self.skipped]
        return "\n".join(lines)

    def merged(self, others: list["ProbeReport"]) -> "ProbeReport":
        """This report and the other processes' reports of the same run, as one (steps sorted)."""
        every = [self, *others]
        return ProbeReport(
            run_dir=self.run_dir,
            analysed=sorted(s for r in every for s in r.analysed),
            up_to_date=sorted(s for r in every for s in r.up_to_date),
            skipped=sorted(s for r in every for s in r.skipped),
            files=sorted({f for r in every for f in r.files if f.exists()}, key=str),  # merged away: gone
        )


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _manifest_hash(folder: str | Path) -> str | None:
    """sha256 of the checkpoint's manifest.json (it names the sha256 of every file); None
    for a model folder without one (external checkpoints, hub names)."""
    path = Path(folder) / MANIFEST_NAME
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _boot(folder: Path, device: str, dtype: torch.dtype, device_map: str | dict | None = None):
    """Boot a checkpoint folder with TransformerLens; any failure is one CheckpointError.
    ``device_map`` (HF's: ``"auto"``, ``"balanced"``, a dict) spreads the model over devices
    instead of putting it on ``device``."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - a loading failure becomes one line
        raise CheckpointError(f"cannot load the tokenizer of {folder}: {first_line(exc)}") from None
    try:
        placement = {"device_map": device_map} if device_map is not None else {"device": device}
        bridge = TransformerBridge.boot_transformers(str(folder), dtype=dtype, tokenizer=tokenizer, **placement)
    except Exception as exc:  # noqa: BLE001 - unsupported architecture, bad weights, ...
        raise CheckpointError(
            f"TransformerLens cannot load {folder}: {first_line(exc)}"
        ) from None
    bridge.eval()
    return bridge, tokenizer


def load_decoder(location: str, device: str, dtype: torch.dtype, *, share_with: torch.nn.Module | None = None,
                 device_map: str | dict | None = None):
    """The checkpoint as a plain HF causal LM with eager attention, in eval mode: the model
    that decodes the greedy split exactly as the trainer's built-in probes do.

    ``share_with``: the same checkpoint already loaded (the HF model a bridge wraps); the
    decoder is then built empty and takes that model's parameter and buffer tensors (no
    copy), so the weights are in memory once, not twice. ``device_map``: a model spread over
    devices is decoded by its own dispatched copy (accelerate's hooks that move activations
    between devices belong to the loaded modules, not to a tree that shares their tensors), so
    its weights are in memory twice while it is probed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if device_map is not None:
            return AutoModelForCausalLM.from_pretrained(str(location), dtype=dtype, attn_implementation="eager",
                                                        device_map=device_map).eval()
        if share_with is None:
            model = AutoModelForCausalLM.from_pretrained(str(location), dtype=dtype, attn_implementation="eager")
            return model.to(device).eval()
        config = AutoConfig.from_pretrained(str(location))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    except Exception as exc:  # noqa: BLE001 - a loading failure becomes one line
        raise CheckpointError(f"cannot load {location} for greedy decoding: {first_line(exc)}") from None
    _share_tensors(model, share_with)
    return model.eval()


def _share_tensors(model: torch.nn.Module, source: torch.nn.Module) -> None:
    """Point every parameter and buffer of ``model`` (tied ones included) at ``source``'s
    tensor of the same name: two module trees, one set of weights. ``source`` may be the HF
    model a TransformerBridge wraps: the bridge nests each original module as
    ``_original_component``, which is left out of the names.

    Raises:
        CheckpointError: some tensor of ``model`` has no counterpart of its shape in ``source``.
    """
    def tensors(m: torch.nn.Module) -> dict[str, torch.Tensor]:
        found = dict(m.named_parameters(remove_duplicate=False))
        found.update(m.named_buffers(remove_duplicate=False))
        return {name.replace("._original_component", "").replace("_original_component.", ""): t
                for name, t in found.items()}

    mine, theirs = tensors(model), tensors(source)
    missing = [k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape]
    if missing:
        raise CheckpointError(f"the decoder and the analysed model differ in {len(missing)} tensors "
                              f"(e.g. {missing[0]}); cannot share weights")
    for name in mine:
        tensor = theirs[name]
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if attr in module._parameters:
            module._parameters[attr] = tensor
        else:
            module._buffers[attr] = tensor


def _hook_names(n_layers: int, patterns: str = "all") -> list[str]:
    """The activations cached: every block's residual output, and the attention pattern of
    every block (``patterns="all"``) or of the last one only (``"final"``)."""
    layers = range(n_layers) if patterns == "all" else [n_layers - 1]
    return [f"blocks.{i}.hook_resid_post" for i in range(n_layers)] + [
        f"blocks.{i}.attn.hook_pattern" for i in layers
    ]


@torch.no_grad()
def bridge_probe_inputs(bridge, batch: dict[str, torch.Tensor], *, patterns: str = "all"):
    """One cached bridge forward over a probe batch, as ``ProbeInputs``.

    Args:
        bridge: a booted ``TransformerBridge`` in eval mode.
        batch: from ``workbench.analysis.probe_runner.probe_batch``.
        patterns: ``"all"``: every layer's attention pattern in ``attentions``; ``"final"``:
            only the last layer's, returned as ``inputs.final_attention`` with
            ``attentions`` None, for :func:`stream_attention` to fold the layers in one
            at a time (what the analyzer does: the ``(N, H, T, T)`` patterns of every
            layer at once are what grows with depth, heads and length).

    Returns:
        ``workbench.measures.probing.ProbeInputs`` with ``hidden`` = ``blocks.{0..L-2}.hook_resid_post``
        ``(N, T, d)``, ``final_logits`` = the bridge's logits ``(N, T, V)``, ``lens`` =
        its logit lens ``unembed(ln_final(.))`` and ``attentions`` = ``blocks.{0..L-1}.attn.hook_pattern``
        ``(N, H, T, T)``.

    Raises:
        CheckpointError: the read-out of the last block does not reproduce the logits.
    """
    from workbench.measures.probing import ProbeInputs

    device = torch.device(bridge.cfg.device)
    batch = {k: v.to(device) for k, v in batch.items()}
    n_layers = bridge.cfg.n_layers
    logits, cache = bridge.run_with_cache(
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        names_filter=_hook_names(n_layers, patterns),
    )

    lens = LogitLens.of_bridge(bridge)

    resid = [cache[f"blocks.{i}.hook_resid_post"] for i in range(n_layers)]
    scored = batch["scored"]
    rows = scored.reshape(-1).nonzero().squeeze(1)[:_READOUT_CHECK_ROWS]  # the first scored positions
    reproduced = lens(resid[-1].reshape(-1, resid[-1].shape[-1])[rows], n_layers)  # (rows, V)
    own = logits.reshape(-1, logits.shape[-1])[rows]
    scale = max(1.0, float(own.abs().max())) if own.numel() else 1.0
    error = float((reproduced.float() - own.float()).abs().max()) if own.numel() else 0.0
    if error > _READOUT_TOL.get(logits.dtype, 1e-4) * scale:
        raise CheckpointError(
            f"ln_final + unembed of the last block does not reproduce the model's logits"
            f" (max abs diff {error:.3g}); the logit lens would be wrong for this architecture"
        )
    return ProbeInputs(
        hidden=resid[:-1],
        final_logits=logits,
        lens=lens,
        targets=batch["targets"],
        mask=scored,
        attentions=([cache[f"blocks.{i}.attn.hook_pattern"] for i in range(n_layers)]
                    if patterns == "all" else None),
        attention_mask=batch["attention_mask"].bool(),
        input_ids=batch["input_ids"],
        final_attention=cache[f"blocks.{n_layers - 1}.attn.hook_pattern"],
        final_hidden=resid[-1],
    )


@torch.no_grad()
def stream_attention(bridge, batch: dict[str, torch.Tensor], on_layer) -> None:
    """A second bridge forward over the same batch that hands each block's attention pattern
    ``(N, H, T, T)`` to ``on_layer(layer, pattern)`` (layers 1..L, in order) from a hook and
    keeps none of them: peak memory holds one layer's pattern, not L."""
    device = torch.device(bridge.cfg.device)
    n_layers = bridge.cfg.n_layers

    def hook(layer: int):
        def fn(pattern, hook=None):
            on_layer(layer, pattern)
        return fn

    bridge.run_with_hooks(
        batch["input_ids"].to(device),
        fwd_hooks=[(f"blocks.{i}.attn.hook_pattern", hook(i + 1)) for i in range(n_layers)],
        attention_mask=batch["attention_mask"].to(device),
        position_ids=batch["position_ids"].to(device),
    )


def _decoder(tokenizer):
    cache: dict[int, str] = {}

    def decode(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id], skip_special_tokens=False)
        return cache[token_id]

    return decode


@torch.no_grad()
def probe_checkpoint(
    bridge,
    tokenizer,
    records: list[dict],
    *,
    run: str,
    step: int,
    detail_prompts: int = 4,
    greedy: bool = True,
    chunk_size: int | None = None,
    max_new_tokens: int = DEFAULT_PROBE_MAX_NEW_TOKENS,
    samples: pd.DataFrame | None = None,
    decoder=None,
    attn_rows: int | None = None,
    stages: StageSeconds | None = None,
    exit_layers: list[int] | None = None,
    learned_lens: bool = False,
    answer_check: str = "math",
) -> dict[str, pd.DataFrame]:
    """All analyzer tables of one booted checkpoint.

    Args:
        bridge: the ``TransformerBridge`` (eval mode).
        tokenizer: the checkpoint's tokenizer (pad/EOS ids, token labels).
        records: the run's probe set.
        run: run name written in the tables.
        step: checkpoint step written in the tables.
        detail_prompts: probe prompts kept in the drill-down tables (0 = none).
        greedy: also score the model's own greedy completions.
        chunk_size: positions per logit-lens read-out chunk (None: about 4M floats per chunk).
        max_new_tokens: longest greedy completion.
        samples: the step's sampled completions (``probe_samples.parquet`` rows), scored
            as splits ``sampled_correct`` / ``sampled_wrong``; None: no sampled splits.
        decoder: the HF model that decodes the greedy split (:func:`load_decoder`); None:
            the model the bridge wraps.
        attn_rows: the most rows of the drill-down attention table (None:
            :data:`ATTN_DETAIL_ROWS`); beyond it each query keeps its top-k keys
            (:func:`attention_top_k`).
        stages: a :class:`StageSeconds` to add this call's stage times to.
        exit_layers: early exit (:mod:`workbench.analysis.early_exit`) at these layers, into
            the metrics table (split ``greedy``); None: none.
        learned_lens: the learned-lens control (:mod:`workbench.analysis.learned_lens`), as
            the ``"lens"`` table.
        answer_check: how exit completions are checked (``"integer"`` or ``"math"``, the run's
            ``answer_check``: what its task rewarded with).

    Returns:
        ``{"metrics", "topk", "cells", "attn"}`` (and ``"lens"`` with ``learned_lens``) ->
        DataFrame (schema columns).
    """
    from workbench.analysis.probe_runner import greedy_responses, special_ids, split_batches
    from workbench.measures.probing import AttentionMetrics, attention_detail, compute_probe_metrics

    fix_malloc_threshold()
    pad_id, eos_id = special_ids(tokenizer)
    decode = _decoder(tokenizer)
    n_layers = bridge.cfg.n_layers
    stage = StageSeconds() if stages is None else stages
    greedy_ids = None
    if greedy:
        # Decoded by a plain HF model with eager attention and the rollout sampler, as the
        # built-in probes decode: the same tokens they score. (Not the model the bridge
        # wraps: from transformers 5.24 on, its attention receives the KV cache as `cache=`,
        # which TransformerLens 4.3's attention bridge ignores, and decoding goes wrong.)
        with stage("decode"):
            greedy_ids = greedy_responses(
                decoder if decoder is not None else bridge.original_model, records, pad_id=pad_id, eos_id=eos_id,
                max_new_tokens=max_new_tokens,
            )

    metric_frames, topk_frames, cell_frames, attn_frames = [], [], [], []
    if exit_layers:
        with stage("exit"):  # one greedy decode per exit layer (the full model's is the greedy split's)
            metric_frames.append(exit_rows(
                decoder if decoder is not None else bridge.original_model, tokenizer, records, exit_layers,
                verify=reference_verifier(answer_check), run=run, step=step, source="analyzer", max_new_tokens=max_new_tokens,
                full=greedy_ids))
    fit = AffineFit(n_layers) if learned_lens else None
    scored_batches = []  # (split, batch): what the learned lens reads once it is fitted
    attn_top_k = None
    # The drill-down tables follow the teacher-forced references; free prompts without
    # references use the model's own greedy completions.
    detail_split = "reference" if all(r.get("reference_ids") for r in records) else "greedy"
    if detail_split == "greedy" and not greedy:
        raise DataError("not every probe prompt has a reference: the drill-down needs the greedy split "
                        "(greedy=False)")
    for split, batch, count in split_batches(records, pad_id, run=run, step=step, source="analyzer",
                                             greedy=greedy_ids, samples=samples):
        metric_frames += [count] if count is not None else []
        if batch is None:
            continue
        # Every layer's attention pattern from the one cached forward when they fit
        # HELD_PATTERN_BYTES; else only the last layer's, and a second forward streams the rest.
        held = pattern_bytes(n_layers, bridge.cfg.n_heads, batch["input_ids"], bridge.cfg.dtype) <= HELD_PATTERN_BYTES
        with stage("capture"):
            inputs = bridge_probe_inputs(bridge, batch, patterns="all" if held else "final")
        if fit is not None:
            with stage("lens_fit"):
                fit.add(inputs, inputs.final_hidden, batch["prompt_index"].tolist())
            scored_batches.append((split, batch))
        shown = range(min(detail_prompts, len(records))) if split == detail_split else range(0)
        if len(shown):
            attn_top_k = attention_top_k(inputs, shown, ATTN_DETAIL_ROWS if attn_rows is None else attn_rows)
        # The attention metrics and drill-down rows, one layer at a time (before the lens
        # read-outs, so that held patterns are freed first).
        attention = AttentionMetrics(inputs.mask, inputs.attention_mask, inputs.final_attention)

        by_prompt: dict[int, list[pd.DataFrame]] = {prompt: [] for prompt in shown}

        def on_layer(layer: int, pattern: torch.Tensor) -> None:
            attention.add(None if layer == n_layers else pattern)
            for prompt in shown:
                by_prompt[prompt].append(attention_detail(
                    [pattern], prompt, query_mask=inputs.mask[prompt], attention_mask=inputs.attention_mask[prompt],
                    top_k=attn_top_k, with_mass=True, first_layer=layer))

        with stage("attention"):
            if inputs.attentions is not None:
                for layer, pattern in enumerate(inputs.attentions, start=1):
                    on_layer(layer, pattern)
                inputs.attentions = None
            else:
                stream_attention(bridge, batch, on_layer)
        attn_frames += [frame for prompt in shown for frame in by_prompt[prompt]]  # prompt, then layer order
        with stage("lens"):  # the lens metrics, and the drill-down's lens cells from the same read-outs
            result = compute_probe_metrics(inputs, chunk_size=chunk_size, detail_prompts=shown, decode=decode)
        result.set_attention(attention.result())
        metric_frames.append(result.to_frame(run, step, split, "analyzer"))
        for prompt in shown:
            topk, cells = result.detail[prompt]
            topk_frames.append(topk)
            cell_frames.append(cells)
        inputs = attention = None  # free this split's activations before the next

    def tidy(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
        if not frames:
            return pd.DataFrame(columns=columns)
        frame = pd.concat(frames, ignore_index=True)
        frame["run"] = run
        frame["step"] = step
        return frame[columns]

    # In prompt, layer, head order: row groups that the dashboard's filtered reads skip.
    attn = tidy(attn_frames, ATTN_COLUMNS + ["mass"])
    # The weight the kept keys hold, averaged over every (prompt, layer, head, query) row.
    mass_kept = float(attn.drop_duplicates(["prompt", "layer", "head", "query"])["mass"].mean()) if len(attn) else 1.0
    # Compact: a float16 weight (the maps show 3 decimals), int16 positions, one run string.
    attn = attn[ATTN_COLUMNS].astype({"step": "int32", "prompt": "int16", "layer": "int16", "head": "int16",
                                      "query": "int16", "key": "int16", "weight": "float16"})
    attn["run"] = attn["run"].astype("category")
    tables = {
        "metrics": pd.concat(metric_frames, ignore_index=True)[METRIC_COLUMNS],
        "topk": tidy(topk_frames, TOPK_COLUMNS),
        "cells": tidy(cell_frames, CELL_COLUMNS),
        "attn": attn,
    }
    tables["attn"].attrs.update(attn_top_k=attn_top_k, attn_mass_kept=mass_kept)
    if fit is not None:
        with stage("lens_fit"):
            lenses = fit.lenses(LogitLens.of_bridge(bridge))
        frames = []
        with stage("lens_read"):  # each split again, read through the cross-fitted maps
            for split, batch in scored_batches:
                inputs = bridge_probe_inputs(bridge, batch, patterns="final")
                frames.append(lens_frame(inputs, batch["prompt_index"].tolist(), lenses, run=run, step=step,
                                         split=split, source="analyzer", chunk_size=chunk_size))
                inputs = None
        tables["lens"] = pd.concat(frames, ignore_index=True)
        tables["lens"].attrs.update(cross_fitted=fit.cross_fitted, positions=list(fit.positions))
    return tables


def attention_top_k(inputs, prompts, budget: int) -> int | None:
    """Keys per query for the drill-down attention table of ``prompts``: None (every visible
    key) when the full table has at most ``budget`` rows, else the largest k that fits."""
    from workbench.measures.probing import attention_visible_pairs

    n_layers, n_heads, seq_len = inputs.n_layers, inputs.final_attention.shape[1], inputs.mask.shape[1]
    per_pair = n_layers * (n_heads + 1)  # the mean over heads is a row too
    full = sum(attention_visible_pairs(inputs.mask[p], inputs.attention_mask[p], seq_len) for p in prompts)
    if full * per_pair <= budget:
        return None
    queries = sum(int(inputs.mask[p].sum()) for p in prompts)
    return max(1, budget // (per_pair * max(1, queries)))


def _provenance(bridge, folder: Path, digest: str, device: str, dtype: str, step: int) -> dict:
    model = bridge.original_model
    return {
        "producer": "workbench.analysis.analyzer",
        "step": step,
        "checkpoint": str(folder),
        "checkpoint_manifest_sha256": _manifest_hash(folder),
        "probe_set_hash": digest,
        "transformer_lens": _dist_version("transformer-lens"),
        "transformers": _dist_version("transformers"),
        "torch": torch.__version__,
        "architecture": getattr(bridge.cfg, "architecture", None),
        "model_class": type(model).__name__,
        "n_layers": int(bridge.cfg.n_layers),
        "n_heads": int(bridge.cfg.n_heads),
        "processing_mode": PROCESSING_MODE,
        "hooks": "blocks.{i}.hook_resid_post, blocks.{i}.attn.hook_pattern",
        "readout": "unembed(ln_final(resid_post)); layer L = model logits",
        "dtype": dtype,
        "device": device,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _samples_at(samples: pd.DataFrame, step: int) -> pd.DataFrame | None:
    """The sampled probe completions the trainer stored at ``step`` (None when there are none)."""
    rows = samples[samples["step"] == step]
    return rows if len(rows) else None


def probe_run(
    run_dir: str | os.PathLike,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    force: bool = False,
    detail_prompts: int = 4,
    progress: bool = True,
    greedy: bool = True,
    max_new_tokens: int | None = None,
    chunk_size: int | None = None,
    base: str | None = None,
    exit: bool = False,
    exit_layers: list[int | float] | None = None,
    learned_lens: bool = False,
    patch: bool = False,
    processes: Processes | None = None,
    device_map: str | dict | None = None,
) -> ProbeReport:
    """Analyse every checkpoint of a run with TransformerLens (incrementally), and measure
    each checkpoint's weight drift from the start (:mod:`workbench.measures.drift`, from the
    weights alone: no model is run for it).

    Args:
        run_dir: the run folder.
        device: torch device of the model (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        force: re-analyse checkpoints already analysed with this probe set.
        detail_prompts: probe prompts kept in the per-prompt drill-down tables.
        progress: show a tqdm progress bar over checkpoints.
        greedy: also score the model's own greedy completions (split ``"greedy"``).
        max_new_tokens: longest greedy completion; None: the length the run's built-in
            probes used (``probe_max_new_tokens`` in run.json), else
            :data:`~workbench.storage.schema.DEFAULT_PROBE_MAX_NEW_TOKENS`.
        chunk_size: positions per logit-lens read-out chunk (None: about 4M floats per chunk).
        base: the start model: weight drift is measured from it and patching patches it (None:
            :func:`workbench.analysis.targets.start_model`: the run's start model, else its
            first checkpoint).
        exit: early-exit accuracy (:mod:`workbench.analysis.early_exit`) at ``exit_layers``
            (None: every layer up to 8 blocks, else the OISD layers, quarters and L).
        learned_lens: the learned-lens control (:mod:`workbench.analysis.learned_lens`).
        patch: activation patching from the start model to each checkpoint
            (:mod:`workbench.analysis.patching`).
        device_map: spread each model over several devices (HF's ``device_map``: ``"auto"``,
            ``"balanced"``, a dict of module -> device), as TransformerLens's bridge accepts it,
            for a model larger than one device; ``device`` is then not used.
        processes: this process's place when probing is spread over several
            (:mod:`workbench.analysis.processes`): it analyses its share of the checkpoints, and
            only process 0 shows progress. None: one process, every checkpoint.

    Returns:
        A :class:`ProbeReport` (``str(report)`` is a short summary).

    Raises:
        WorkbenchError: ``run_dir`` is not a run folder, or it has no probe set; ``patch``
            without a start model to patch.
        ConfigError: an unknown dtype, a negative ``detail_prompts``, a bad exit layer.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if detail_prompts < 0:
        raise ConfigError(f"detail_prompts must be >= 0, got {detail_prompts}")
    check_max_new_tokens(max_new_tokens)
    run = Run.open(run_dir)
    records = run.probe_set()
    if not records:
        raise DataError(f"{run.path} has no probe set (probe_set.jsonl is missing or empty)")
    digest = probe_set_hash(records)
    if max_new_tokens is None:
        max_new_tokens = int(run.info.get("probe_max_new_tokens") or DEFAULT_PROBE_MAX_NEW_TOKENS)
    all_samples = run.samples()
    report = ProbeReport(run_dir=run.path)
    procs = processes or Processes()
    targets = checkpoint_targets(run)
    if not targets:
        logger.warning("%s has no checkpoints to analyse", run.path)
    start = base if base is not None else start_model(run)
    n_layers = run.num_layers if run.num_layers is not None else _model_layers(targets)
    targets = procs.share(targets)  # this process's checkpoints: every world-th from its rank
    if patch and start is None:
        raise DataError(f"{run.path}: no start model to patch from (give --base MODEL_FOLDER)")
    layers = resolve_exit_layers(exit_layers, n_layers, run.oisd_layers) if exit and n_layers else None

    from tqdm.auto import tqdm

    fix_malloc_threshold()  # before the first boot
    if procs.main:
        for leftover in run.path.glob(".merged-*"):  # an adapter merge a killed probe left behind
            shutil.rmtree(leftover, ignore_errors=True)
    procs.barrier()  # (no process merges before the leftovers are gone)
    # Every earlier result is read once, here (footers only), not once per checkpoint.
    provenance_of = {kind: run.analysis_provenance(kind) for kind in (*KINDS, "lens", "patch", "drift")}
    done = {kind: {s for s, p in provenance_of[kind].items() if p.get("probe_set_hash") == digest}
            for kind in (*KINDS, "lens", "patch")}
    exits_done = {s: set(p.get("exit_layers") or ()) for s, p in provenance_of["metrics"].items()}
    base_model = None  # the start model, booted once, when some checkpoint is patched
    label = f"probe {run.name}" + (f" (process 0 of {procs.world}: its share)" if procs.world > 1 else "")
    bar = tqdm(targets, desc=label, unit="ckpt", disable=not progress or not procs.main)
    for target in bar:
        step = target.step
        drift_due = start is not None and (force or step not in provenance_of["drift"])
        need_base = force or not all(step in done[k] for k in KINDS) or bool(
            layers and not set(layers) <= exits_done.get(step, set()))
        need_lens = learned_lens and (force or need_base or step not in done["lens"])
        need_patch = patch and (force or step not in done["patch"])
        if not (need_base or need_lens or need_patch):
            if drift_due:
                with target.model_folder(run.path) as folder:
                    _write_drift(run, target, folder, start, report)
            report.up_to_date.append(step)
            continue
        stage = StageSeconds()
        try:
            target.check()
            with ExitStack() as merged:
                with stage("boot"):  # an adapter is merged onto its base first (a temporary folder)
                    folder = merged.enter_context(target.model_folder(run.path))
                if drift_due:  # from the weights alone, once the checkpoint passed its checks
                    with stage("drift"):
                        _write_drift(run, target, folder, start, report)
                with stage("boot"):
                    bridge, tokenizer = _boot(folder, device, DTYPES[dtype], device_map)
                    check_tokenizer(tokenizer, records, target.location)
                    decoder = (load_decoder(folder, device, DTYPES[dtype], share_with=bridge.original_model,
                                            device_map=device_map)
                               if greedy or layers or need_patch else None)
            clock = time.perf_counter()
            tables = {}
            if need_base or need_lens:
                tables = probe_checkpoint(
                    bridge, tokenizer, records, run=run.name, step=step,
                    detail_prompts=detail_prompts, greedy=greedy, chunk_size=chunk_size,
                    max_new_tokens=max_new_tokens, samples=_samples_at(all_samples, step), decoder=decoder,
                    stages=stage, exit_layers=layers, learned_lens=need_lens,
                    answer_check=run.info.get("answer_check") or "math",
                )
            if need_patch:
                if base_model is None:
                    with stage("boot"):
                        base_model, _ = _boot(start, device, DTYPES[dtype], device_map)
                with stage("patch"):
                    tables["patch"] = _patch_table(base_model, bridge, decoder, tokenizer, records, run=run.name,
                                                   step=step, max_new_tokens=max_new_tokens)
            del decoder
            provenance = _provenance(bridge, target.location, digest, device, dtype, step)
            provenance["origin"] = target.origin
            provenance["process"] = procs.rank  # which process made it (one per checkpoint)
            provenance["merged_onto"] = (target.base or adapter_base(target.location)) if target.adapter else None
            provenance["seconds"] = round(time.perf_counter() - clock, 3)
            del bridge
        except WorkbenchError as exc:
            logger.warning("skipping step %d: %s", step, exc)
            report.skipped.append((step, str(exc)))
            continue
        with stage("write"):
            if "lens" in tables:
                path = run.analysis_path(step, "lens")
                atomic_write_parquet(path, tables["lens"], metadata={
                    **provenance, "kind": "lens", "learned_lens": tables["lens"].attrs})
                report.files.append(path)
            if "patch" in tables:
                path = run.analysis_path(step, "patch")
                atomic_write_parquet(path, tables["patch"], metadata={**provenance, "kind": "patch", "start": str(start)})
                report.files.append(path)
            if "metrics" in tables:
                provenance["attn_top_k"] = tables["attn"].attrs.get("attn_top_k")
                provenance["attn_mass_kept"] = tables["attn"].attrs.get("attn_mass_kept", 1.0)
                provenance["exit_layers"] = list(layers or [])
                for kind in ("topk", "cells", "attn"):
                    path = run.analysis_path(step, kind)
                    atomic_write_parquet(path, tables[kind], metadata={**provenance, "kind": kind},
                                         row_group_size=ATTN_ROW_GROUP if kind == "attn" else None)
                    report.files.append(path)
        if "metrics" in tables:
            # metrics last: its presence with this hash is what marks the step analysed.
            provenance["stage_seconds"] = {k: round(v, 3) for k, v in stage.items()}
            provenance["stage_peak_growth_mb"] = {k: round(v, 1) for k, v in stage.peak_growth_mb.items()}
            path = run.analysis_path(step, "metrics")
            write_metric_table(path, tables["metrics"], metadata={**provenance, "kind": "metrics"})
            report.files.append(path)
        report.analysed.append(step)
    procs.barrier()  # every process's checkpoints are written before they are merged
    if procs.main:  # the kinds read over every checkpoint, merged into segments: once, by process 0
        segments = [path for kind in SEGMENT_KINDS for path in merge_analysis_files(run.paths, kind)]
        if segments:  # a file merged away is listed as the segment that holds it
            report.files = [f for f in report.files if f.exists()] + segments
    return report


def _model_layers(targets: list[Target]) -> int | None:
    """L of an analysis folder that does not record it: the first checkpoint's config."""
    if not targets:
        return None
    from transformers import AutoConfig

    location = targets[0].base or targets[0].location if targets[0].adapter else targets[0].location
    try:
        return int(AutoConfig.from_pretrained(str(location)).get_text_config().num_hidden_layers)
    except Exception:  # noqa: BLE001 - unknown here; the checkpoint's own boot reports it
        return None


def _patch_table(base, bridge, decoder, tokenizer, records: list[dict], *, run: str, step: int,
                 max_new_tokens: int) -> pd.DataFrame:
    """Patching from ``base`` to ``bridge`` on the probe references (the checkpoint's greedy
    completions when a prompt has none)."""
    from workbench.analysis.patching import patch_batch, patch_rows
    from workbench.analysis.probe_runner import greedy_responses, special_ids
    from workbench.measures.answers import ANSWER_MARK

    if base.cfg.n_layers != bridge.cfg.n_layers or base.cfg.d_model != bridge.cfg.d_model:
        raise CheckpointError(f"the start model ({base.cfg.n_layers} layers, width {base.cfg.d_model}) and the "
                              f"checkpoint ({bridge.cfg.n_layers}, {bridge.cfg.d_model}) differ: nothing to patch")
    pad_id, eos_id = special_ids(tokenizer)
    if all(r.get("reference_ids") for r in records):
        split, responses = "reference", [list(r["reference_ids"]) for r in records]
    else:
        split = "greedy"
        responses = greedy_responses(decoder if decoder is not None else bridge.original_model, records,
                                     pad_id=pad_id, eos_id=eos_id, max_new_tokens=max_new_tokens)
    mark = tokenizer(ANSWER_MARK, add_special_tokens=False)["input_ids"]
    batch = patch_batch(records, responses, pad_id, eos_id, mark)
    return patch_rows(base, bridge, batch, run=run, step=step, split=split)


def _write_drift(run: Run, target: Target, folder: str, start: str, report: ProbeReport) -> None:
    """``analysis/step-NNNNNN-drift.parquet``: the weight drift from ``start`` of the checkpoint
    whose model folder is ``folder`` (for an adapter, its merge; a checkpoint without local
    safetensors weights is noted and skipped)."""
    from workbench.measures.drift import weight_drift
    from workbench.storage.schema import DRIFT_COLUMNS

    if not Path(folder).is_dir():
        return
    try:
        drift = weight_drift(start, folder, run.num_layers)
    except WorkbenchError as exc:
        logger.warning("step %d: no weight drift: %s", target.step, exc)
        return
    drift.insert(0, "step", target.step)
    drift.insert(0, "run", run.name)
    path = run.analysis_path(target.step, "drift")
    atomic_write_parquet(path, drift[DRIFT_COLUMNS], metadata={
        "producer": "workbench.measures.drift", "kind": "drift", "step": target.step, "checkpoint": str(target.location),
        "base": str(start), "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    report.files.append(path)


def check_tokenizer(tokenizer, records: list[dict], location: str) -> None:
    """The probe set's token ids must be what this checkpoint's tokenizer makes of the
    prompts, or every metric would be read at the wrong tokens."""
    for record in records[:4]:
        ids = record_prompt_ids(tokenizer, record)
        if list(ids) != list(record["prompt_ids"]):
            raise CheckpointError(
                f"the tokenizer of {location} encodes probe prompt {record['index']} differently from the probe "
                "set (a different tokenizer); probe it into its own analysis folder")
