"""Activation patching across checkpoints: where did training change the computation?

Model A is the start (the run's start model, :func:`workbench.analysis.targets.start_model`)
and model B a checkpoint, one architecture and tokenizer. On the same tokens (the probe set's
references, or B's greedy completions where a prompt has none), A runs with one activation
replaced, at every position, by B's: block l's output (``block``: ``hook_resid_post``), its
attention output (``attn``: ``hook_attn_out``) or its MLP output (``mlp``: ``hook_mlp_out``).
TransformerLens runs the patches (``transformer_lens.patching.generic_activation_patch``, one
forward per (layer, component), plus the unpatched baseline); what is measured, at the scored
(response) positions:

- ``patch_recovered`` = ``1 - KL(p_B || p_A[patched]) / KL(p_B || p_A)``: the share of B's
  change of the next-token distributions the patch reproduces (1: all of it, 0: none);
- ``patch_recovered_logp`` = ``(lp_patched - lp_A) / (lp_B - lp_A)``, with ``lp`` the summed
  log-probability of the answer tokens (after the response's last ``"Answer:"``, else its last
  token before EOS);
- ``patch_kl_base`` (``layer = 0``, ``component = "none"``): ``KL(p_B || p_A)`` itself, what
  the shares are shares of.

A share is undefined when B did not change what it measures (``KL(p_B || p_A) = 0``, a model
patched with itself): it is stored as NaN, never as a number. Cost: ``3 L + 2`` forwards of A
and one cached forward of B per checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from workbench.measures.divergence import kl_divergence
from workbench.storage.schema import PATCH_COLUMNS

__all__ = ["COMPONENTS", "PATCH_METRICS", "answer_positions", "patch_batch", "patch_rows"]

#: Component -> the TransformerLens activation patched (``get_act_name``: blocks.{l}.hook_<name>).
COMPONENTS = {"block": "resid_post", "attn": "attn_out", "mlp": "mlp_out"}
PATCH_METRICS = ("patch_recovered", "patch_recovered_logp", "patch_kl_base")
#: A change smaller than this (nats) is no change: the share of it is undefined (NaN).
UNDEFINED_BELOW = 1e-9


def answer_positions(response: Sequence[int], mark: Sequence[int], eos_id: int) -> list[int]:
    """Indices into ``response`` of its answer tokens: those after the last occurrence of the
    ``mark`` token sequence (``"Answer:"`` as the tokenizer spells it) up to EOS, else the last
    token before EOS."""
    body = list(response)
    while body and body[-1] == eos_id:
        body.pop()
    m = len(mark)
    for start in range(len(body) - m, -1, -1):
        if m and body[start:start + m] == list(mark):
            after = list(range(start + m, len(body)))
            if after:
                return after
            break
    return [len(body) - 1] if body else []


def patch_batch(records: Sequence[dict], responses: Sequence[Sequence[int]], pad_id: int, eos_id: int,
                mark: Sequence[int]) -> dict[str, torch.Tensor]:
    """Right-padded sequences (so that no attention mask is needed: causal attention keeps the
    padding out of every real position) with their scored positions and answer positions.

    Returns:
        ``tokens (N, T)``, ``scored (N, T)`` (positions predicting a response token),
        ``answer (N, T)`` (positions predicting an answer token), ``targets (N, T)``.
    """
    seqs = [list(r["prompt_ids"]) + list(resp) for r, resp in zip(records, responses)]
    width = max(len(s) for s in seqs)
    n = len(seqs)
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    scored = torch.zeros((n, width), dtype=torch.bool)
    answer = torch.zeros((n, width), dtype=torch.bool)
    for i, (record, resp, seq) in enumerate(zip(records, responses, seqs)):
        p = len(record["prompt_ids"])
        tokens[i, : len(seq)] = torch.tensor(seq)
        scored[i, p - 1 : len(seq) - 1] = True
        for j in answer_positions(resp, mark, eos_id):
            answer[i, p - 1 + j] = True
    targets = torch.cat([tokens[:, 1:], torch.full((n, 1), pad_id, dtype=torch.long)], dim=1)
    return {"tokens": tokens, "scored": scored, "answer": answer, "targets": targets}


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def patch_rows(base, model, batch: dict[str, torch.Tensor], *, run: str, step: int, split: str) -> pd.DataFrame:
    """The patching curves of checkpoint ``model`` (B) against ``base`` (A), both booted
    ``TransformerBridge`` s in eval mode, on one :func:`patch_batch` (``PATCH_COLUMNS``)."""
    import unittest.mock

    from transformer_lens import patching as tl_patching
    from transformer_lens.patching import generic_activation_patch

    device = torch.device(base.cfg.device)
    tokens = batch["tokens"].to(device)
    scored, answer = batch["scored"].to(device), batch["answer"].to(device)
    targets = batch["targets"].to(device)
    n_layers = base.cfg.n_layers
    names = [f"blocks.{i}.hook_{act}" for i in range(n_layers) for act in COMPONENTS.values()]
    logits_b, cache_b = model.run_with_cache(tokens, names_filter=names)
    logp_b = _log_probs(logits_b)[scored]  # (n, V)

    def kl(logits: torch.Tensor) -> torch.Tensor:
        # KL(p_B || p) averaged over the scored positions.
        return kl_divergence(logp_b, _log_probs(logits)[scored]).mean()

    def answer_logp(logits: torch.Tensor) -> torch.Tensor:
        lp = _log_probs(logits).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, T)
        return lp[answer].sum()

    lp_b = float(answer_logp(logits_b))

    def all_positions(corrupted, index, clean):
        return clean.to(corrupted.dtype)

    rows = []
    kl_base = lp_a = None
    for component, act in COMPONENTS.items():
        # TransformerLens draws a progress bar per call; the analyzer's one bar per checkpoint is enough.
        with unittest.mock.patch.object(tl_patching, "tqdm", lambda items, **kwargs: items):
            result = generic_activation_patch(base, tokens, cache_b, {"kl": kl, "logp": answer_logp},
                                              all_positions, act, index_axis_names=("layer",), baseline=True)
        kl_patched, lp_patched = result["kl"].values.flatten().tolist(), result["logp"].values.flatten().tolist()
        kl_base = float(result["kl"].baseline.flatten()[0])
        lp_a = float(result["logp"].baseline.flatten()[0])
        gain = lp_b - lp_a
        for layer in range(1, n_layers + 1):
            recovered = 1.0 - kl_patched[layer - 1] / kl_base if kl_base > UNDEFINED_BELOW else float("nan")
            recovered_logp = ((lp_patched[layer - 1] - lp_a) / gain if abs(gain) > UNDEFINED_BELOW
                              else float("nan"))
            rows += [(layer, component, "patch_recovered", recovered),
                     (layer, component, "patch_recovered_logp", recovered_logp)]
    rows.append((0, "none", "patch_kl_base", kl_base))
    frame = pd.DataFrame(rows, columns=["layer", "component", "metric", "value"])
    frame["run"], frame["step"], frame["split"] = run, int(step), split
    return frame.astype({"layer": "int64", "value": "float64", "step": "int64"})[PATCH_COLUMNS]
