"""The TransformerLens-backed analyzer: ``oisd probe RUN_DIR``.

For each checkpoint of a run, :func:`probe_run` boots the folder with
``TransformerBridge.boot_transformers`` (TransformerLens 4), runs the run's fixed
probe set with ``run_with_cache`` restricted to the hooks the metrics need, and
writes tidy parquet tables to ``analysis/step-NNNNNN-{kind}.parquet``:

- ``metrics``: the metric set of docs/metrics.md (``workbench.schema.METRIC_COLUMNS``,
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
producing a wrong lens. The batch is built by ``workbench.probe_runner.probe_batch`` and the
metrics by ``workbench.probing``: the same code as the trainer's built-in probes,
which agree with this analyzer to 1e-4 (tested).

Greedy split: the completions are decoded with ``workbench.generation.sample`` on the
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
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from workbench.errors import CheckpointError, ConfigError, DataError, WorkbenchError
from workbench.atomic import atomic_write_parquet
from workbench.checkpoints import MANIFEST_NAME, list_checkpoints, verify_checkpoint
from workbench.memory import peak_rss_mb
from workbench.models import DTYPES, first_line, is_local_path, require_model_folder
from workbench.probe_runner import record_prompt_ids
from workbench.runstore import Run, probe_set_hash
from workbench.runwriter import write_metric_table
from workbench.schema import (
    ATTN_COLUMNS,
    CELL_COLUMNS,
    DEFAULT_PROBE_MAX_NEW_TOKENS,
    METRIC_COLUMNS,
    OUTCOME_SPLITS,
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


_MMAP_THRESHOLD = 1 << 20
_malloc_fixed = False


def fix_malloc_threshold() -> bool:
    """Serve every allocation of 1 MiB or more from its own mapping, returned to the system
    when freed (glibc ``mallopt(M_MMAP_THRESHOLD, 1 MiB)``); once per process, glibc only.

    glibc raises that threshold as large blocks are freed (up to 32 MiB), after which the
    lens pass's ``(chunk, V)`` temporaries (16 MiB each at a 151,936 vocabulary) come from
    the heap, which fragments and is not given back: at Qwen3-0.6B's shape the lens stage
    raised the peak resident memory by 4.9 GB (7.2-9.1 GB in all, run to run). With the
    threshold fixed the stages after boot raise it by nothing (3.9 GB: the weights and the
    boot transient), for about 7% more time (``benchmarks/README.md``).

    Returns:
        Whether the threshold is (now) fixed.
    """
    global _malloc_fixed
    if _malloc_fixed:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3  # <malloc.h>
        _malloc_fixed = bool(libc.mallopt(m_mmap_threshold, _MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc: nothing to fix
        _malloc_fixed = False
    return _malloc_fixed


class StageSeconds(dict):
    """Seconds per stage of probing one checkpoint (``boot``, ``decode``, ``capture``,
    ``lens``, ``attention``, ``drift``, ``write``), recorded in the analysis
    files' provenance as ``stage_seconds``: where the time of a probe goes.

    ``peak_growth_mb``: by how much each stage raised the process's peak resident memory
    (summed over its calls): the stages that set the peak are the ones with a large value.
    """

    def __init__(self) -> None:
        super().__init__()
        self.peak_growth_mb: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start, peak = time.perf_counter(), peak_rss_mb()
        try:
            yield
        finally:
            self[stage] = self.get(stage, 0.0) + time.perf_counter() - start
            self.peak_growth_mb[stage] = self.peak_growth_mb.get(stage, 0.0) + peak_rss_mb() - peak


@dataclass
class ProbeReport:
    """What :func:`probe_run` did.

    Attributes:
        run_dir: the run folder.
        analysed: steps analysed in this call.
        up_to_date: steps skipped because their analysis exists with this probe set.
        skipped: ``(step, one-line reason)`` for checkpoints that could not be analysed.
        files: parquet files written.
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


def _boot(folder: Path, device: str, dtype: torch.dtype):
    """Boot a checkpoint folder with TransformerLens; any failure is one CheckpointError."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - a loading failure becomes one line
        raise CheckpointError(f"cannot load the tokenizer of {folder}: {first_line(exc)}") from None
    try:
        bridge = TransformerBridge.boot_transformers(
            str(folder), device=device, dtype=dtype, tokenizer=tokenizer
        )
    except Exception as exc:  # noqa: BLE001 - unsupported architecture, bad weights, ...
        raise CheckpointError(
            f"TransformerLens cannot load {folder}: {first_line(exc)}"
        ) from None
    bridge.eval()
    return bridge, tokenizer


def load_decoder(location: str, device: str, dtype: torch.dtype, *, share_with: torch.nn.Module | None = None):
    """The checkpoint as a plain HF causal LM with eager attention, in eval mode: the model
    that decodes the greedy split exactly as the trainer's built-in probes do.

    ``share_with``: the same checkpoint already loaded (the HF model a bridge wraps); the
    decoder is then built empty and takes that model's parameter and buffer tensors (no
    copy), so the weights are in memory once, not twice.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
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
        batch: from ``workbench.probe_runner.probe_batch``.
        patterns: ``"all"``: every layer's attention pattern in ``attentions``; ``"final"``:
            only the last layer's, returned as ``inputs.final_attention`` with
            ``attentions`` None, for :func:`stream_attention` to fold the layers in one
            at a time (what the analyzer does: the ``(N, H, T, T)`` patterns of every
            layer at once are what grows with depth, heads and length).

    Returns:
        ``workbench.probing.ProbeInputs`` with ``hidden`` = ``blocks.{0..L-2}.hook_resid_post``
        ``(N, T, d)``, ``final_logits`` = the bridge's logits ``(N, T, V)``, ``readout`` =
        ``unembed(ln_final(.))`` and ``attentions`` = ``blocks.{0..L-1}.attn.hook_pattern``
        ``(N, H, T, T)``.

    Raises:
        CheckpointError: the read-out of the last block does not reproduce the logits.
    """
    from workbench.probing import ProbeInputs

    device = torch.device(bridge.cfg.device)
    batch = {k: v.to(device) for k, v in batch.items()}
    n_layers = bridge.cfg.n_layers
    logits, cache = bridge.run_with_cache(
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        names_filter=_hook_names(n_layers, patterns),
    )

    def readout(h: torch.Tensor) -> torch.Tensor:
        return bridge.unembed(bridge.ln_final(h))

    resid = [cache[f"blocks.{i}.hook_resid_post"] for i in range(n_layers)]
    scored = batch["scored"]
    reproduced = readout(resid[-1][scored])  # (n, V), scored positions only
    own = logits[scored]
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
        readout=readout,
        targets=batch["targets"],
        mask=scored,
        attentions=([cache[f"blocks.{i}.attn.hook_pattern"] for i in range(n_layers)]
                    if patterns == "all" else None),
        attention_mask=batch["attention_mask"].bool(),
        input_ids=batch["input_ids"],
        final_attention=cache[f"blocks.{n_layers - 1}.attn.hook_pattern"],
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

    Returns:
        ``{"metrics", "topk", "cells", "attn"}`` -> DataFrame (schema columns).
    """
    from workbench.probe_runner import greedy_responses, n_samples_frame, probe_batch, probe_splits, special_ids
    from workbench.probing import AttentionMetrics, attention_detail, compute_probe_metrics

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
    attn_top_k = None
    # The drill-down tables follow the teacher-forced references; free prompts without
    # references use the model's own greedy completions.
    detail_split = "reference" if all(r.get("reference_ids") for r in records) else "greedy"
    if detail_split == "greedy" and not greedy:
        raise DataError("not every probe prompt has a reference: the drill-down needs the greedy split "
                        "(greedy=False)")
    for split, split_records, split_responses in probe_splits(records, greedy=greedy_ids, samples=samples):
        if split in OUTCOME_SPLITS:
            metric_frames.append(n_samples_frame(run, step, split, len(split_records), "analyzer"))
            if not split_records:
                continue
        batch = probe_batch(split_records, pad_id, split_responses)
        with stage("capture"):
            inputs = bridge_probe_inputs(bridge, batch, patterns="final")
        shown = range(min(detail_prompts, len(records))) if split == detail_split else range(0)
        with stage("lens"):  # the lens metrics, and the drill-down's lens cells from the same read-outs
            result = compute_probe_metrics(inputs, chunk_size=chunk_size, detail_prompts=shown, decode=decode)
        if len(shown):
            attn_top_k = attention_top_k(inputs, shown, ATTN_DETAIL_ROWS if attn_rows is None else attn_rows)
        # The attention metrics and drill-down rows, one layer at a time (a second forward).
        attention = AttentionMetrics(inputs.mask, inputs.attention_mask, inputs.final_attention)

        by_prompt: dict[int, list[pd.DataFrame]] = {prompt: [] for prompt in shown}

        def on_layer(layer: int, pattern: torch.Tensor) -> None:
            attention.add(None if layer == n_layers else pattern)
            for prompt in shown:
                by_prompt[prompt].append(attention_detail(
                    [pattern], prompt, query_mask=inputs.mask[prompt], attention_mask=inputs.attention_mask[prompt],
                    top_k=attn_top_k, with_mass=True, first_layer=layer))

        with stage("attention"):
            stream_attention(bridge, batch, on_layer)
        attn_frames += [frame for prompt in shown for frame in by_prompt[prompt]]  # prompt, then layer order
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
    return tables


def attention_top_k(inputs, prompts, budget: int) -> int | None:
    """Keys per query for the drill-down attention table of ``prompts``: None (every visible
    key) when the full table has at most ``budget`` rows, else the largest k that fits."""
    from workbench.probing import attention_visible_pairs

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
        "producer": "workbench.analyzer",
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


def _is_up_to_date(run: Run, step: int, digest: str) -> bool:
    return all(step in run.analyzed_steps(kind, digest) for kind in KINDS)


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
) -> ProbeReport:
    """Analyse every checkpoint of a run with TransformerLens (incrementally), and measure
    each checkpoint's weight drift from the start (:mod:`workbench.drift`, from the
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
            :data:`~workbench.schema.DEFAULT_PROBE_MAX_NEW_TOKENS`.
        chunk_size: positions per logit-lens read-out chunk (None: about 4M floats per chunk).
        base: the model folder weight drift is measured from (None:
            :func:`workbench.drift.drift_base`: the run's start model, else its first checkpoint).

    Returns:
        A :class:`ProbeReport` (``str(report)`` is a short summary).

    Raises:
        WorkbenchError: ``run_dir`` is not a run folder, or it has no probe set.
        ConfigError: an unknown dtype or a negative ``detail_prompts``.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if detail_prompts < 0:
        raise ConfigError(f"detail_prompts must be >= 0, got {detail_prompts}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    run = Run.open(run_dir)
    records = run.probe_set()
    if not records:
        raise DataError(f"{run.path} has no probe set (probe_set.jsonl is missing or empty)")
    digest = probe_set_hash(records)
    if max_new_tokens is None:
        max_new_tokens = int(run.info.get("probe_max_new_tokens") or DEFAULT_PROBE_MAX_NEW_TOKENS)
    all_samples = run.samples()
    report = ProbeReport(run_dir=run.path)
    targets = checkpoint_targets(run)
    if not targets:
        logger.warning("%s has no checkpoints to analyse", run.path)

    from tqdm.auto import tqdm

    from workbench.drift import drift_base

    drift_from = base if base is not None else drift_base(run)
    fix_malloc_threshold()  # before the first boot
    bar = tqdm(targets, desc=f"probe {run.name}", unit="ckpt", disable=not progress)
    for target in bar:
        drift_due = drift_from is not None and (force or not run.analysis_path(target.step, "drift").is_file())
        if not force and _is_up_to_date(run, target.step, digest):
            if drift_due:
                _write_drift(run, target, drift_from, report)
            report.up_to_date.append(target.step)
            continue
        stage = StageSeconds()
        try:
            target.check()
            if drift_due:  # from the weights alone, once the checkpoint passed its checks
                with stage("drift"):
                    _write_drift(run, target, drift_from, report)
            with stage("boot"):
                bridge, tokenizer = _boot(target.location, device, DTYPES[dtype])
                check_tokenizer(tokenizer, records, target.location)
                decoder = (load_decoder(target.location, device, DTYPES[dtype], share_with=bridge.original_model)
                           if greedy else None)
            start = time.perf_counter()
            tables = probe_checkpoint(
                bridge, tokenizer, records, run=run.name, step=target.step,
                detail_prompts=detail_prompts, greedy=greedy, chunk_size=chunk_size,
                max_new_tokens=max_new_tokens,
                samples=_samples_at(all_samples, target.step), decoder=decoder, stages=stage,
            )
            del decoder
            provenance = _provenance(bridge, target.location, digest, device, dtype, target.step)
            provenance["origin"] = target.origin
            provenance["seconds"] = round(time.perf_counter() - start, 3)
            del bridge
        except WorkbenchError as exc:
            message = f"skipping step {target.step}: {exc}"
            logger.warning(message)
            report.skipped.append((target.step, str(exc)))
            continue
        # metrics last: its presence with this hash is what marks the step analysed.
        provenance["attn_top_k"] = tables["attn"].attrs.get("attn_top_k")
        provenance["attn_mass_kept"] = tables["attn"].attrs.get("attn_mass_kept", 1.0)
        with stage("write"):
            for kind in ("topk", "cells", "attn"):
                path = run.analysis_path(target.step, kind)
                atomic_write_parquet(path, tables[kind], metadata={**provenance, "kind": kind},
                                     row_group_size=ATTN_ROW_GROUP if kind == "attn" else None)
                report.files.append(path)
        provenance["stage_seconds"] = {k: round(v, 3) for k, v in stage.items()}
        provenance["stage_peak_growth_mb"] = {k: round(v, 1) for k, v in stage.peak_growth_mb.items()}
        path = run.analysis_path(target.step, "metrics")
        write_metric_table(path, tables["metrics"], metadata={**provenance, "kind": "metrics"})
        report.files.append(path)
        report.analysed.append(target.step)
    return report


def _write_drift(run: Run, target: "Target", start: str, report: ProbeReport) -> None:
    """``analysis/step-NNNNNN-drift.parquet``: the checkpoint's weight drift from ``start``
    (a checkpoint without local safetensors weights is noted and skipped)."""
    from workbench.drift import weight_drift
    from workbench.schema import DRIFT_COLUMNS

    if not Path(target.location).is_dir():
        return
    try:
        drift = weight_drift(start, target.location, run.num_layers)
    except WorkbenchError as exc:
        logger.warning("step %d: no weight drift: %s", target.step, exc)
        return
    drift.insert(0, "step", target.step)
    drift.insert(0, "run", run.name)
    path = run.analysis_path(target.step, "drift")
    atomic_write_parquet(path, drift[DRIFT_COLUMNS], metadata={
        "producer": "workbench.drift", "kind": "drift", "step": target.step, "checkpoint": str(target.location),
        "base": str(start), "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    report.files.append(path)


@dataclass(frozen=True)
class Target:
    """One checkpoint to analyse: a run's own ``checkpoints/step-*`` folder (verified
    against its manifest), a model folder found elsewhere, or a hub name."""

    step: int
    location: str  # a folder or a hub name
    origin: str  # where it came from, for provenance (e.g. "checkpoint-500 of runs/trl-out")
    managed: bool = False  # a run's own checkpoint, with a manifest

    def check(self) -> None:
        if self.managed:
            verify_checkpoint(self.location, full=True)
        if self.managed or Path(self.location).exists() or is_local_path(self.location):
            require_model_folder(self.location)


def checkpoint_targets(run: Run) -> list[Target]:
    """What :func:`probe_run` analyses: the run's own checkpoints, every step-* folder (a
    broken one is reported rather than silently absent), or, for an analysis folder of
    external checkpoints (``oisd probe PATH --out DIR``), the ones its run.json lists."""
    external = run.info.get("external")
    if isinstance(external, dict):
        return [Target(int(c["step"]), str(c["path"]), str(c.get("origin", c["path"])))
                for c in external.get("checkpoints", [])]
    return [Target(c.step, str(c.path), f"{c.path.name} of {run.path}", managed=True)
            for c in list_checkpoints(run.path, verify=False)]


def check_tokenizer(tokenizer, records: list[dict], location: str) -> None:
    """The probe set's token ids must be what this checkpoint's tokenizer makes of the
    prompts, or every metric would be read at the wrong tokens."""
    for record in records[:4]:
        ids = record_prompt_ids(tokenizer, record)
        if list(ids) != list(record["prompt_ids"]):
            raise CheckpointError(
                f"the tokenizer of {location} encodes probe prompt {record['index']} differently from the probe "
                "set (a different tokenizer); probe it into its own analysis folder")
