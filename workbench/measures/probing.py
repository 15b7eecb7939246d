"""Turn model internals into the tidy probe-metric table.

Both producers of probe numbers go through this module: the trainer's built-in
probes (HF ``hidden_states`` and attention weights) and the TransformerLens
analyzer (cached hook activations). Each fills a :class:`ProbeInputs`; everything
after that is shared, so the two agree to float precision on the same checkpoint.

Memory: the logit lens needs a ``(positions, V)`` distribution per layer, which is
large for real vocabularies. Scored positions are gathered first and processed in
chunks of ``chunk_size`` positions (default: :func:`~workbench.models.readout.vocab_chunk_rows`), one
layer at a time, keeping only running sums (and one top-1 agreement per layer and
position for prediction depth). No ``(L, positions, V)`` tensor is ever built.

Speed: the read-out's matrix product is most of the time, and a chunk-sized one
re-reads the whole unembedding for a few rows, so a few layers' chunks are read out in
one product of about :data:`~workbench.models.readout.READOUT_ROWS` rows. The lens
statistics are then memory-bound passes over ``(chunk, V)``, and fresh ``(chunk, V)``
allocations cost as much as the math, so one set of buffers is allocated per call and
reused for every chunk and layer; the final layer's side of every statistic is
computed once per chunk (:class:`metrics.LensReference`). The
attention metrics gather the scored query rows of all sequences at once and run
each metric as one batched op per layer.

Table conventions (``workbench.storage.schema.METRIC_COLUMNS``):

- Lens metrics: one row per layer ``1..L``, ``head = ref_layer = -1``. Layer L is
  included: its ``lens_kl``/``lens_js`` are 0, ``top1_agree`` is 1 and ``final_rank``
  is 0 by construction, while ``target_rank``, ``target_nll`` and ``entropy`` are the
  model's own.
- ``prediction_depth`` is a property of a position, not of a layer: it is reported
  once with ``layer = 0`` (no real layer is 0; layers are ``1..L``).
- ``attn_js_final``: ``head = -1`` for the head-averaged value, ``head = h`` for the
  per-head value; ``ref_layer = -1`` (the reference is always layer L).
- ``attn_js``: the layer x layer matrix, ``layer = l``, ``ref_layer = m``, every pair.
- ``attn_head_match`` / ``attn_head_identity``: ``layer = l``, ``ref_layer = L``.
- ``attn_entropy`` / ``bos_mass``: ``head = -1`` is the mean over heads, ``head = h``
  the per-head value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from workbench.errors import ConfigError, DataError, WorkbenchError
from workbench.measures import divergence, metrics
from workbench.models.readout import read_out_layers, readout_group, vocab_chunk_rows
from workbench.storage.schema import ATTN_COLUMNS, CELL_COLUMNS, METRIC_COLUMNS, TOPK_COLUMNS

__all__ = [
    "LENS_STAT_NAMES",
    "ProbeInputs",
    "ProbeResult",
    "compute_probe_metrics",
    "per_position_detail",
    "AttentionMetrics",
    "attention_detail",
    "attention_visible_pairs",
]

# Per-position lens statistics aggregated per layer, in table order.
LENS_STAT_NAMES = (
    "lens_kl", "lens_js", "top1_agree", "final_rank", "target_rank", "target_nll", "entropy"
)


@dataclass
class ProbeInputs:
    """Model internals for one batch of probe sequences.

    Attributes:
        hidden: ``L-1`` tensors ``(N, T, d)``, the outputs of blocks ``1..L-1`` before the
            final norm (HF ``hidden_states[1:L]``, TransformerLens ``blocks.{i}.hook_resid_post``).
        final_logits: ``(N, T, V)`` the model's own logits, i.e. layer L (never re-normed).
        lens: the read-out of an intermediate layer, ``lens(h, layer)``: ``(..., d)`` to
            ``(..., V)`` logits (a :class:`workbench.models.readout.Lens`; the logit lens
            reads every layer through the model's final norm and unembedding).
        targets: ``(N, T)`` long, the token at ``t + 1`` (what position t predicts); any
            value where ``mask`` is False.
        mask: ``(N, T)`` bool, the scored positions (those that predict a response token).
        attentions: ``L`` tensors ``(N, H, T, T)`` of attention probabilities for layers
            ``1..L``, or None to skip the attention metrics.
        attention_mask: optional ``(N, T)`` bool, False at padding tokens (keys no query
            can see); None means no padding. Only used to count valid keys
            (``attn_entropy``) and to find the first real token (``bos_mass``).
        input_ids: optional ``(N, T)`` long, the input tokens, used only to label the
            drill-down tables.
        final_attention: optional ``(N, H, T, T)``, the final layer's attention, for a
            producer that streams the other layers (:class:`AttentionMetrics`) instead of
            filling ``attentions``.
        final_hidden: optional ``(N, T, d)``, the last block's output before the final norm
            (what the learned lens maps the other layers onto).
    """

    hidden: Sequence[torch.Tensor]
    final_logits: torch.Tensor
    lens: Callable[[torch.Tensor, int], torch.Tensor]
    targets: torch.Tensor
    mask: torch.Tensor
    attentions: Sequence[torch.Tensor] | None = None
    attention_mask: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    final_attention: torch.Tensor | None = None
    final_hidden: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.final_logits.ndim != 3:
            raise WorkbenchError(
                f"final_logits must be (N, T, V), got shape {tuple(self.final_logits.shape)}"
            )
        n, t, _ = self.final_logits.shape
        for i, h in enumerate(self.hidden):
            if h.ndim != 3 or tuple(h.shape[:2]) != (n, t):
                raise WorkbenchError(
                    f"hidden[{i}] must be ({n}, {t}, d), got shape {tuple(h.shape)}"
                )
        for name in ("targets", "mask", "attention_mask", "input_ids"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (n, t):
                raise WorkbenchError(f"{name} must be ({n}, {t}), got shape {tuple(value.shape)}")
        self.mask = self.mask.to(torch.bool)
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask.to(torch.bool)
        if self.attentions is not None:
            if len(self.attentions) != self.n_layers:
                raise WorkbenchError(
                    f"attentions must hold one tensor per layer ({self.n_layers}),"
                    f" got {len(self.attentions)}"
                )
            n_heads = self.attentions[0].shape[1] if self.attentions[0].ndim == 4 else -1
            for i, a in enumerate(self.attentions):
                if a.ndim != 4 or tuple(a.shape) != (n, n_heads, t, t):
                    raise WorkbenchError(
                        f"attentions[{i}] must be ({n}, {n_heads}, {t}, {t}),"
                        f" got shape {tuple(a.shape)}"
                    )

    @property
    def n_layers(self) -> int:
        """L, the number of layers (blocks); the final layer is ``final_logits``."""
        return len(self.hidden) + 1


@dataclass
class ProbeResult:
    """Per-layer probe metrics of one batch, ready for :meth:`to_frame`.

    Attributes:
        n_layers: L.
        n_positions: number of scored positions the lens metrics average over.
        lens: metric name (``LENS_STAT_NAMES``) -> ``(L,)`` mean over positions, layers ``1..L``.
        prediction_depth: mean prediction depth over positions.
        n_heads: H, or None without attention.
        attn_js: ``(L, L)`` mean over scored queries of ``JSD(mean_h a^l, mean_h a^m)``;
            column ``L-1`` is ``attn_js_final``.
        attn_js_final_per_head: ``(L, H)`` mean of ``JSD(a^l_h, a^L_h)``.
        attn_entropy: ``(L, H)`` mean normalised row entropy per head.
        bos_mass: ``(L, H)`` mean weight on the first token per head.
        attn_head_match: ``(L,)`` mean JSD to layer L after Hungarian head matching.
        attn_head_identity: ``(L,)`` the same with heads matched by index.
        head_perm: ``(L, H)``, head h of layer l matched to head ``head_perm[l, h]`` of L.
        detail: prompt -> ``(topk, cells)`` of :func:`per_position_detail`, for the
            ``detail_prompts`` of :func:`compute_probe_metrics`.
    """

    n_layers: int
    n_positions: int
    lens: dict[str, np.ndarray]
    prediction_depth: float
    n_heads: int | None = None
    attn_js: np.ndarray | None = None
    attn_js_final_per_head: np.ndarray | None = None
    attn_entropy: np.ndarray | None = None
    bos_mass: np.ndarray | None = None
    attn_head_match: np.ndarray | None = None
    attn_head_identity: np.ndarray | None = None
    head_perm: np.ndarray | None = None
    detail: dict[int, tuple[pd.DataFrame, pd.DataFrame]] = field(default_factory=dict)

    def set_attention(self, values: dict[str, np.ndarray | int]) -> None:
        """The attention fields, from :meth:`AttentionMetrics.result`."""
        for name, value in values.items():
            setattr(self, name, value)

    def to_frame(self, run: str, step: int, split: str, source: str) -> pd.DataFrame:
        """The tidy table: one row per value, columns ``workbench.storage.schema.METRIC_COLUMNS``.

        Args:
            run: run name.
            step: training step of the checkpoint.
            split: ``"reference"`` or ``"greedy"``.
            source: ``"probe"`` (trainer) or ``"analyzer"`` (TransformerLens).
        """
        rows: list[tuple[int, int, int, str, float]] = []  # (layer, head, ref_layer, metric, value)
        layers = range(1, self.n_layers + 1)
        for name in LENS_STAT_NAMES:
            rows += [(layer, -1, -1, name, float(self.lens[name][layer - 1])) for layer in layers]
        rows.append((0, -1, -1, "prediction_depth", float(self.prediction_depth)))
        if self.attn_js is not None:
            final = self.n_layers
            for layer in layers:
                i = layer - 1
                rows.append((layer, -1, -1, "attn_js_final", float(self.attn_js[i, final - 1])))
                js_heads = self.attn_js_final_per_head[i]
                rows += [(layer, h, -1, "attn_js_final", float(v)) for h, v in enumerate(js_heads)]
                rows += [(layer, -1, m, "attn_js", float(self.attn_js[i, m - 1])) for m in layers]
                for name, per_head in (
                    ("attn_entropy", self.attn_entropy),
                    ("bos_mass", self.bos_mass),
                ):
                    rows.append((layer, -1, -1, name, float(per_head[i].mean())))
                    rows += [(layer, h, -1, name, float(v)) for h, v in enumerate(per_head[i])]
                if self.attn_head_match is not None:
                    for name, values in (
                        ("attn_head_match", self.attn_head_match),
                        ("attn_head_identity", self.attn_head_identity),
                    ):
                        rows.append((layer, -1, final, name, float(values[i])))
        frame = pd.DataFrame(rows, columns=["layer", "head", "ref_layer", "metric", "value"])
        frame = frame.astype(
            {"layer": "int64", "head": "int64", "ref_layer": "int64", "value": "float64"}
        )
        frame["run"] = str(run)
        frame["step"] = np.int64(step)
        frame["split"] = str(split)
        frame["source"] = str(source)
        return frame[METRIC_COLUMNS]


def _resolve_chunk(chunk_size: int | None, vocab: int, device: torch.device | str = "cpu") -> int:
    """``chunk_size``, or the lens read-out's default (:func:`~workbench.models.readout.vocab_chunk_rows`)."""
    return vocab_chunk_rows(vocab, device, "lens") if chunk_size is None else chunk_size


def _check_options(chunk_size: int | None, temperature: float) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")


def _iter_layer_stats(
    inputs: ProbeInputs,
    flat_positions: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    temperature: float,
) -> Iterator[tuple[int, int, torch.Tensor, dict[str, torch.Tensor]]]:
    """Yield ``(start, layer, logp_l, stats)`` chunk by chunk, layer by layer.

    ``flat_positions`` index the flattened ``(N * T)`` positions and ``targets`` are
    their targets. For each chunk the final layer's log-probs and its side of the
    statistics are computed once (:class:`metrics.LensReference`), then every layer
    ``1..L`` is read out against them. ``logp_l`` is ``(c, V)`` float32 at
    ``temperature`` and ``stats`` the dict of :func:`metrics.lens_position_stats`.
    ``logp_l`` lives in a buffer reused by the next step: use it before advancing.
    """
    n_seq, seq_len, vocab = inputs.final_logits.shape
    final_flat = inputs.final_logits.reshape(n_seq * seq_len, vocab)
    hidden_flat = [h.reshape(n_seq * seq_len, h.shape[-1]) for h in inputs.hidden]
    n = flat_positions.numel()
    width = min(chunk_size, n)
    # One allocation per call, sliced for the last (shorter) chunk; the leading-dim
    # slices of contiguous buffers stay contiguous.
    new = inputs.final_logits.new_empty
    final_buf = new((2, width, vocab), dtype=torch.float32)  # log p^L, p^L
    layer_buf = new((2, width, vocab), dtype=torch.float32)  # log p^l, p^l
    scratch = new((2, width, vocab), dtype=torch.float32)
    # Layers 1..L-1 read out a few at a time: one unembedding product of about
    # READOUT_ROWS rows instead of one per chunk-sized slice (readout_group).
    per_group = readout_group(width)
    layers = list(range(1, inputs.n_layers))
    groups = [layers[i : i + per_group] for i in range(0, len(layers), per_group)]
    for start in range(0, n, chunk_size):
        idx = flat_positions[start : start + chunk_size]
        c = idx.numel()
        logp_final, p_final = divergence.log_softmax_and_probs(
            final_flat[idx], temperature, out=(final_buf[0, :c], final_buf[1, :c])
        )
        reference = metrics.LensReference(logp_final, targets[start : start + c], p_final)
        for group in groups:
            # A model spread over devices keeps each layer's hidden states on its own device.
            hs = [hidden_flat[layer - 1][idx.to(hidden_flat[layer - 1].device)].to(final_flat.device)
                  for layer in group]
            block = read_out_layers(inputs.lens, hs, group)  # (len(group) * c, V)
            del hs
            for j, layer in enumerate(group):
                logp, p = divergence.log_softmax_and_probs(
                    block[j * c : (j + 1) * c], temperature, out=(layer_buf[0, :c], layer_buf[1, :c])
                )
                yield start, layer, logp, reference.compare(logp, p, scratch=scratch[:, :c])
            del block  # free before the next group's product
        # Layer L is the model's own output: never put through the norm again, and its
        # comparison with itself is known without the divergence passes.
        yield start, inputs.n_layers, logp_final, reference.final_stats(scratch[:, :c])


def _scored_targets(inputs: ProbeInputs, flat_positions: torch.Tensor) -> torch.Tensor:
    """Targets at the scored positions, checked to be token ids of the vocabulary."""
    targets = inputs.targets.reshape(-1)[flat_positions].long()
    vocab = inputs.final_logits.shape[-1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise DataError(f"a scored position has a target id outside the vocabulary [0, {vocab})")
    return targets


def _lens_metrics(
    inputs: ProbeInputs,
    chunk_size: int | None,
    temperature: float,
    details: Sequence[_Detail] = (),
) -> tuple[dict[str, np.ndarray], float, int]:
    """Mean lens statistics per layer, mean prediction depth, number of positions.

    Each of ``details`` (drill-down collectors of :class:`_Detail`) sees every chunk's
    read-out as it passes: the drill-down costs no second read-out of its prompts.
    """
    flat = inputs.mask.reshape(-1).nonzero().squeeze(1)  # (n,)
    n = flat.numel()
    if n == 0:
        raise DataError("the probe mask selects no positions to score")
    targets = _scored_targets(inputs, flat)
    chunk_size = _resolve_chunk(chunk_size, inputs.final_logits.shape[-1], inputs.final_logits.device)
    device = inputs.final_logits.device
    # Sums over many positions: accumulate in float64 (MPS has none) so that the mean
    # does not depend on the chunking.
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    sums = {
        name: torch.zeros(inputs.n_layers, dtype=acc_dtype, device=device)
        for name in LENS_STAT_NAMES
    }
    agree = torch.empty(inputs.n_layers, n, dtype=torch.bool, device=device)  # (L, n)
    for start, layer, logp, stats in _iter_layer_stats(inputs, flat, targets, chunk_size, temperature):
        agree[layer - 1, start : start + stats["top1_agree"].numel()] = stats["top1_agree"].bool()
        for name in LENS_STAT_NAMES:
            sums[name][layer - 1] += stats[name].to(acc_dtype).sum()
        for detail in details:
            detail.add(start, layer, logp, stats)
    lens = {name: (total / n).cpu().double().numpy() for name, total in sums.items()}
    depth = metrics.prediction_depth(agree).double().mean().item()
    return lens, depth, n


class AttentionMetrics:
    """The attention metrics of docs/metrics.md, accumulated one layer at a time.

    Every metric is per scored query row and compares a layer with the final layer, so
    the final layer's pattern comes first (``final``); then each layer's pattern is
    folded in by :meth:`add` and can be dropped: a producer that streams the layers
    (the analyzer's hooks) never holds more than two ``(N, H, T, T)`` patterns. The scored
    rows of all sequences are gathered into one ``(H, n, T)`` block per layer (with
    per-row key masks and first-token indices), so each metric is one batched call per
    layer, not one per sequence.

    Args:
        mask: ``(N, T)`` bool, the scored positions (the query rows).
        attention_mask: ``(N, T)`` bool or None, False at padding keys.
        final: the final layer's ``(N, H, T, T)`` attention probabilities.
        head_match: also the Hungarian head matching (``H^2`` JSDs per layer).
    """

    def __init__(self, mask: torch.Tensor, attention_mask: torch.Tensor | None, final: torch.Tensor,
                 head_match: bool = True):
        self.device = final.device
        self.acc_dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.n_heads, seq_len = final.shape[1], final.shape[-1]
        self.seq_idx, self.query_pos = mask.to(self.device).nonzero(as_tuple=True)  # (n,), (n,)
        self.n_queries = self.seq_idx.numel()
        if self.n_queries == 0:
            raise DataError("the probe mask selects no positions to score")
        if attention_mask is None:
            key_valid, self.first_key = None, 0
        else:
            attention_mask = attention_mask.to(self.device)
            key_valid = attention_mask[self.seq_idx]  # (n, T)
            # The first real token of each query's sequence (left padding shifts it).
            self.first_key = attention_mask.long().argmax(-1)[self.seq_idx]  # (n,)
        self.key_mask = metrics.causal_key_mask(self.query_pos, seq_len, key_valid)  # (n, T)
        self.head_match = head_match
        self.final = self._rows(final)  # (H, n, T)
        self.means, self.js_head, self.ent, self.bos, self.cost = [], [], [], [], []

    def _rows(self, a: torch.Tensor) -> torch.Tensor:
        # a[s, :, q, :] for every scored (s, q): (n, H, T) -> (H, n, T).
        return a[self.seq_idx, :, self.query_pos, :].float().transpose(0, 1).contiguous()

    def _total(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.acc_dtype).sum(-1)

    def add(self, a: torch.Tensor | None) -> None:
        """Fold in the next layer's ``(N, H, T, T)`` pattern (layers in order 1..L; None for
        the final layer, already given)."""
        layer_rows = self.final if a is None else self._rows(a.to(self.final.device))
        self.means.append(layer_rows.mean(0, keepdim=True))  # (1, n, T)
        if self.head_match:
            pairs = metrics.head_js_matrix(layer_rows, self.final)  # (H, H, n)
            self.cost.append(self._total(pairs))  # (H, H)
            # Head h against head h of layer L is the diagonal: no second pass needed.
            self.js_head.append(self._total(pairs.diagonal(0, 0, 1).T))  # (H,)
        else:
            self.js_head.append(self._total(metrics.attn_js_per_head(layer_rows, self.final)))  # (H,)
        self.ent.append(self._total(metrics.attn_entropy(layer_rows, self.key_mask)))
        self.bos.append(self._total(metrics.bos_mass(layer_rows, self.first_key)))

    def result(self) -> dict[str, np.ndarray | int]:
        """The :class:`ProbeResult` attention fields, over the layers added so far."""
        n = self.n_queries
        js = self._total(metrics.attn_js_matrix(self.means))  # (L, L)
        out: dict[str, np.ndarray | int] = {
            "n_heads": self.n_heads,
            "attn_js": (js / n).cpu().double().numpy(),
            "attn_js_final_per_head": (torch.stack(self.js_head) / n).cpu().double().numpy(),
            "attn_entropy": (torch.stack(self.ent) / n).cpu().double().numpy(),
            "bos_mass": (torch.stack(self.bos) / n).cpu().double().numpy(),
        }
        if self.head_match:
            # One assignment per layer on the cost averaged over all scored queries of all
            # sequences (not a matching per sequence).
            matched = [metrics.match_heads(c / n) for c in self.cost]
            out["head_perm"] = torch.stack([perm for perm, _, _ in matched]).numpy()
            out["attn_head_match"] = np.array([m for _, m, _ in matched])
            out["attn_head_identity"] = np.array([ident for _, _, ident in matched])
        return out


def _attention_metrics(inputs: ProbeInputs, head_match: bool) -> dict[str, np.ndarray | int]:
    """Attention metrics of a batch whose every layer's pattern is in memory."""
    acc = AttentionMetrics(inputs.mask, inputs.attention_mask, inputs.attentions[-1], head_match)
    for a in inputs.attentions[:-1]:
        acc.add(a)
    acc.add(None)
    return acc.result()


@torch.no_grad()
def compute_probe_metrics(
    inputs: ProbeInputs,
    *,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    head_match: bool = True,
    detail_prompts: Sequence[int] = (),
    top_k: int = 5,
    decode: Callable[[int], str] | None = None,
) -> ProbeResult:
    """All probe metrics of docs/metrics.md for one batch of probe sequences.

    Lens metrics average over every scored position of all N sequences;
    attention metrics over the same positions as queries.

    Args:
        inputs: the model internals, see :class:`ProbeInputs`.
        chunk_size: positions per read-out chunk (bounds memory at a few ``chunk_size x V``
            buffers); None picks :func:`~workbench.models.readout.vocab_chunk_rows` (16 MiB blocks on CPU).
        temperature: temperature T of every layer's distribution, ``softmax(logits / T)``.
        head_match: compute the Hungarian head matching (costs ``H^2`` JSDs per layer).
        detail_prompts: sequences whose logit-lens drill-down (:func:`per_position_detail`)
            is taken from the same read-out pass, into ``ProbeResult.detail``.
        top_k: tokens kept per drill-down cell.
        decode: token id -> string for the drill-down's labels.

    Returns:
        A :class:`ProbeResult`; ``.to_frame(...)`` gives the tidy table.

    Raises:
        ConfigError: ``chunk_size < 1``, ``temperature <= 0`` or ``top_k < 1``.
        DataError: the mask selects nothing, or a scored target is not a token id.
        WorkbenchError: a detail prompt is not one of the N sequences.
    """
    _check_options(chunk_size, temperature)
    details = [_Detail.of_batch(inputs, prompt, top_k, decode) for prompt in detail_prompts]
    lens, depth, n = _lens_metrics(inputs, chunk_size, temperature, details)
    result = ProbeResult(n_layers=inputs.n_layers, n_positions=n, lens=lens, prediction_depth=depth,
                         detail={d.prompt: d.frames() for d in details})
    if inputs.attentions is not None:
        result.set_attention(_attention_metrics(inputs, head_match))
    return result


def _labeler(decode: Callable[[int], str] | None) -> Callable[[int], str]:
    """Token id -> label: ``decode(id)``, or the id as a string without a tokenizer."""
    return (lambda i: decode(int(i))) if decode is not None else (lambda i: str(int(i)))


def _check_prompt(inputs_n: int, prompt_index: int) -> None:
    if not 0 <= prompt_index < inputs_n:
        raise WorkbenchError(
            f"prompt_index {prompt_index} is out of range for {inputs_n} probe sequences"
        )


@torch.no_grad()
def per_position_detail(
    inputs: ProbeInputs,
    prompt_index: int,
    top_k: int = 5,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    decode: Callable[[int], str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Logit-lens drill-down of one sequence: top-k tokens and metric values per cell.

    A cell is (layer, position) over the scored positions of sequence ``prompt_index``.
    Token labels are ``decode(id)``, or the id as a string when no ``decode`` is given.

    Args:
        inputs: the model internals, see :class:`ProbeInputs`.
        prompt_index: which of the N sequences.
        top_k: tokens kept per cell.
        temperature: temperature T of every layer's distribution.
        chunk_size: positions per read-out chunk; None picks the default as in
            :func:`compute_probe_metrics`.
        decode: token id -> string.

    Returns:
        ``(topk, cells)``:

        - ``topk``: columns ``TOPK_COLUMNS`` without run/step: one row per (layer, position,
          k), ``k = 0`` the most probable token, ``prob`` its probability under ``p^l``.
        - ``cells``: columns ``CELL_COLUMNS`` without run/step: one row per (layer,
          position, metric) for the lens statistics of :func:`metrics.lens_position_stats`,
          plus ``prediction_depth`` per position with ``layer = 0``. ``token`` is the
          input token at the position (None without ``input_ids``), ``target`` the
          token it predicts.
    """
    _check_options(chunk_size, temperature)
    detail = _Detail(inputs, prompt_index, top_k, decode, first_slot=0)
    chunk_size = _resolve_chunk(chunk_size, inputs.final_logits.shape[-1], inputs.final_logits.device)
    for start, layer, logp, stats in _iter_layer_stats(
        inputs, detail.flat, detail.targets, chunk_size, temperature
    ):
        detail.add(start, layer, logp, stats)
    return detail.frames()


class _Detail:
    """The drill-down of one sequence, collected from a pass of :func:`_iter_layer_stats`.

    The sequence's scored positions are the slots ``first_slot ..`` of the pass
    (contiguous: scored positions are flattened in sequence order). :meth:`add` keeps
    the top-k tokens and statistics of the slots it owns from each chunk, :meth:`frames`
    builds the tables of :func:`per_position_detail`.
    """

    def __init__(self, inputs: ProbeInputs, prompt_index: int, top_k: int,
                 decode: Callable[[int], str] | None, first_slot: int) -> None:
        n_seq, seq_len, vocab = inputs.final_logits.shape
        _check_prompt(n_seq, prompt_index)
        if top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}")
        self.prompt = prompt_index
        self.inputs = inputs
        self.label = _labeler(decode)
        self.positions = inputs.mask[prompt_index].nonzero().squeeze(1)  # (q,)
        self.flat = self.positions + prompt_index * seq_len
        self.targets = _scored_targets(inputs, self.flat)
        self.k = min(top_k, vocab)
        self.lo = first_slot
        self.hi = first_slot + self.positions.numel()
        self.topk_parts: list[pd.DataFrame] = []
        self.stat_parts: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.agree = torch.empty(inputs.n_layers, self.positions.numel(), dtype=torch.bool)

    @classmethod
    def of_batch(cls, inputs: ProbeInputs, prompt_index: int, top_k: int,
                 decode: Callable[[int], str] | None) -> _Detail:
        """The collector of ``prompt_index`` within a pass over every scored position
        (``__init__`` checks the index)."""
        first = int(inputs.mask[:prompt_index].sum())
        return cls(inputs, prompt_index, top_k, decode, first_slot=first)

    def add(self, start: int, layer: int, logp: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        """Keep this sequence's rows of one chunk (slots ``start .. start + len(logp)``)."""
        a, b = max(start, self.lo), min(start + logp.shape[0], self.hi)
        if a >= b:
            return
        rows = slice(a - start, b - start)
        pos = self.positions[a - self.lo : b - self.lo].cpu()
        values, ids = logp[rows].topk(self.k, dim=-1)  # (c, k)
        self.topk_parts.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "position": pos.repeat_interleave(self.k).numpy(),
                    "k": np.tile(np.arange(self.k), len(pos)),
                    "token_id": ids.reshape(-1).cpu().numpy(),
                    "prob": values.exp().reshape(-1).cpu().double().numpy(),
                }
            )
        )
        self.agree[layer - 1, a - self.lo : b - self.lo] = stats["top1_agree"][rows].bool().cpu()
        per_layer = self.stat_parts.setdefault(layer, {name: [] for name in LENS_STAT_NAMES})
        for name in LENS_STAT_NAMES:
            per_layer[name].append(stats[name][rows].cpu())

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(topk, cells)`` as :func:`per_position_detail` returns them."""
        inputs, label, positions, prompt_index = self.inputs, self.label, self.positions, self.prompt
        topk = pd.concat(self.topk_parts, ignore_index=True) if self.topk_parts else pd.DataFrame(
            {c: [] for c in ("layer", "position", "k", "token_id", "prob")}
        )
        topk.insert(0, "prompt", prompt_index)
        topk["token"] = [label(i) for i in topk["token_id"]]
        topk = topk.sort_values(["layer", "position", "k"], kind="stable").reset_index(drop=True)

        pos_np = positions.cpu().numpy()
        if inputs.input_ids is not None:
            token_labels = [label(i) for i in inputs.input_ids[prompt_index, positions].tolist()]
        else:
            token_labels = [None] * len(pos_np)
        target_labels = [label(i) for i in self.targets.tolist()]
        cell_parts = []
        for layer in range(1, inputs.n_layers + 1):
            for name in LENS_STAT_NAMES:
                parts = self.stat_parts.get(layer, {}).get(name)
                values = torch.cat(parts) if parts else torch.zeros(0)
                cell_parts.append((layer, name, values.double().numpy()))
        cell_parts.append((0, "prediction_depth", metrics.prediction_depth(self.agree).double().numpy()))
        cells = pd.DataFrame(
            {
                "prompt": prompt_index,
                "layer": np.concatenate([np.full(len(pos_np), layer) for layer, _, _ in cell_parts]),
                "position": np.tile(pos_np, len(cell_parts)),
                "token": token_labels * len(cell_parts),
                "target": target_labels * len(cell_parts),
                "metric": np.concatenate(
                    [np.full(len(pos_np), name, dtype=object) for _, name, _ in cell_parts]
                ),
                "value": np.concatenate([values for _, _, values in cell_parts]),
            }
        )
        topk_columns = [c for c in TOPK_COLUMNS if c not in ("run", "step")]
        cell_columns = [c for c in CELL_COLUMNS if c not in ("run", "step")]
        return topk[topk_columns], cells[cell_columns]


@torch.no_grad()
def attention_visible_pairs(query_mask: torch.Tensor | None, attention_mask: torch.Tensor | None,
                            seq_len: int) -> int:
    """How many (query, key) pairs :func:`attention_detail` emits per layer and head row of one
    sequence when it keeps every visible key (``key <= query``, not padding)."""
    queries = (torch.arange(seq_len) if query_mask is None
               else query_mask.cpu().to(torch.bool).nonzero().squeeze(1))
    key_valid = None if attention_mask is None else attention_mask.cpu()
    return int(metrics.causal_key_mask(queries, seq_len, key_valid).sum())


def attention_detail(
    attentions: Sequence[torch.Tensor],
    prompt_index: int,
    *,
    query_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    top_k: int | None = None,
    with_mass: bool = False,
    first_layer: int = 1,
) -> pd.DataFrame:
    """Attention rows of one sequence for the dashboard's attention maps.

    Emits the (query, key) pairs each query can see (``key <= query``, not padding), for
    each layer, for the mean over heads (``head = -1``) and for each head: all of them, or
    with ``top_k`` only the ``top_k`` heaviest keys of each query (ties: the earlier key),
    which bounds the table at ``layers x (H + 1) x queries x top_k`` rows whatever the
    sequence length.

    Args:
        attentions: ``L`` tensors ``(N, H, T, T)`` of attention probabilities, layers ``1..L``.
        prompt_index: which of the N sequences.
        query_mask: optional ``(T,)`` bool, the query positions to keep (default all).
        attention_mask: optional ``(T,)`` bool, False at padding keys of this sequence.
        top_k: keep this many keys per query (None: every visible key).
        with_mass: add a column ``mass``: the weight the query's kept keys hold in its
            row (1.0 when every visible key is kept).
        first_layer: the layer number of ``attentions[0]`` (a producer that streams the
            layers passes one layer at a time).

    Returns:
        DataFrame with columns ``ATTN_COLUMNS`` without run/step: ``prompt, layer,
        head, query, key, weight`` (and ``mass``); prompt, layer and head as int16, positions
        as int32, weights as float32.
    """
    if not attentions:
        raise WorkbenchError("attention_detail needs at least one layer of attention")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    n_seq, _, seq_len, _ = attentions[0].shape
    _check_prompt(n_seq, prompt_index)
    device = attentions[0].device
    queries = (
        torch.arange(seq_len, device=device)
        if query_mask is None
        else query_mask.to(device=device, dtype=torch.bool).nonzero().squeeze(1)
    )
    key_valid = None if attention_mask is None else attention_mask.to(device)
    visible = metrics.causal_key_mask(queries, seq_len, key_valid)  # (q, T)
    widest = int(visible.sum(-1).max()) if visible.numel() else 0  # most keys any query sees
    keep_all = top_k is None or top_k >= widest
    if keep_all:
        q_idx, k_idx = visible.nonzero(as_tuple=True)  # (P,), (P,): every visible (query, key) pair
    parts = []
    for layer, a in enumerate(attentions, start=first_layer):
        maps = a[prompt_index].float()[:, queries, :]  # (H, q, T)
        # (H + 1, q, T): row 0 is the mean over heads, reported as head -1.
        maps = torch.cat([maps.mean(0, keepdim=True), maps]) * visible
        rows_h = maps.shape[0]
        if keep_all:
            weights = maps[:, q_idx, k_idx]  # (H + 1, P)
            query_pos = queries[q_idx].expand(rows_h, -1)
            key_pos = k_idx.expand(rows_h, -1)
            mass = torch.ones_like(weights)
        else:
            # Invisible keys weigh 0 and sort last; a query with fewer visible keys than
            # top_k keeps only its visible ones.
            ranked = torch.where(visible, maps, -1.0)
            top, keys = ranked.topk(top_k, dim=-1, sorted=True)  # (H + 1, q, k)
            kept = top >= 0
            weights = top[kept]
            key_pos = keys[kept]
            query_pos = queries[:, None].expand(-1, top_k)[None].expand(rows_h, -1, -1)[kept]
            mass = torch.where(kept, top, 0.0).sum(-1, keepdim=True).expand(-1, -1, top_k)[kept]
            heads_of = torch.arange(-1, rows_h - 1, device=device)[:, None, None].expand_as(top)[kept]
        if keep_all:
            heads_of = torch.arange(-1, rows_h - 1, device=device)[:, None].expand_as(weights)
        parts.append(
            pd.DataFrame(
                {
                    "layer": np.full(weights.numel(), layer, dtype=np.int16),
                    "head": heads_of.reshape(-1).cpu().numpy().astype(np.int16),
                    "query": query_pos.reshape(-1).cpu().numpy().astype(np.int32),
                    "key": key_pos.reshape(-1).cpu().numpy().astype(np.int32),
                    "weight": weights.reshape(-1).cpu().numpy().astype(np.float32),
                    "mass": mass.reshape(-1).cpu().numpy().astype(np.float32),
                }
            )
        )
    frame = pd.concat(parts, ignore_index=True)
    frame.insert(0, "prompt", np.int16(prompt_index))
    return frame[[c for c in ATTN_COLUMNS if c not in ("run", "step")] + (["mass"] if with_mass else [])]
