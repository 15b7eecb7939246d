"""Collectives shared by both backends, and the check that processes hold the same weights.

In data-parallel training every process must end every step with identical weights;
a process that skips the gradient all-reduce drifts silently, trains on its own
prompts, and only rank 0's weights get saved. :func:`weight_spread` measures it.
"""

from __future__ import annotations

import torch


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def close_processes() -> None:
    """After a run that finished on every process: wait for all of them, then tear the
    process group down. A process that exits with its group alive leaves gloo's threads to
    the C++ runtime's exit, which aborts it now and then ("terminate called without an
    active exception"; a launch then fails after training finished). A no-op on one process.
    """
    if distributed() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over processes (``t`` itself on one process)."""
    if distributed():
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """``t`` of every process, concatenated along dim 0 in process order."""
    if not distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


#: Width of the fixed random vector a parameter is folded against, and rows per chunk.
_FOLD, _ROWS = 4099, 1024


@torch.no_grad()
def weight_fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """Two float64 numbers per parameter: its entries, laid out as rows of ``_FOLD``, are
    projected on a fixed pseudo-random vector (seed 0, the same on every process), and the
    row projections' sum and absolute sum are kept. Two processes' fingerprints of a
    parameter differ whenever their values differ (except on a measure-zero set). It runs
    on the parameter's own device, ``_FOLD x _ROWS`` entries at a time, so memory stays
    bounded at any model size; only ``(2 n_parameters,)`` numbers travel."""
    out = []
    probes: dict[torch.device, torch.Tensor] = {}
    for p in model.parameters():
        if p.device not in probes:
            gen = torch.Generator().manual_seed(0)
            probes[p.device] = (torch.rand(_FOLD, generator=gen, dtype=torch.float64) - 0.5).to(p.device)
        probe, flat = probes[p.device], p.detach().reshape(-1)
        total = torch.zeros(2, dtype=torch.float64, device=p.device)
        for start in range(0, flat.numel(), _FOLD * _ROWS):
            chunk = flat[start : start + _FOLD * _ROWS].double()
            chunk = torch.nn.functional.pad(chunk, (0, (-chunk.numel()) % _FOLD))
            rows = chunk.view(-1, _FOLD) @ probe
            total += torch.stack([rows.sum(), rows.abs().sum()])
        out.append(total.cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


#: Why ``weight_spread`` is not measured under ZeRO-3 (run.json's ``weight_spread_note``).
ZERO3_SPREAD_NOTE = ("not measured: ZeRO-3 keeps one sharded copy of the weights, so there is no per-process "
                     "replica to compare (every gather returns the same full tensors)")


def weight_spread(model: torch.nn.Module, device: torch.device | str = "cpu") -> float | None:
    """The largest difference of any parameter's fingerprint between two processes
    (:func:`weight_fingerprint`): 0.0 when every process holds the same weights, and on
    one process. Every process must call it (a collective). Under ZeRO-3 the processes
    hold one sharded copy, not replicas: None (nothing to compare, :data:`ZERO3_SPREAD_NOTE`),
    never a made-up 0.0."""
    if is_zero3(model):
        return None
    if not distributed():
        return 0.0
    fp = weight_fingerprint(model).to(device)
    every = all_gather_cat(fp[None])  # (world, 2 n_parameters)
    return float((every.max(dim=0).values - every.min(dim=0).values).abs().max()) if fp.numel() else 0.0


# ---------------------------------------------------------------------------
# DeepSpeed ZeRO-3: parameters sharded to 0-element tensors outside their forward
# ---------------------------------------------------------------------------


def is_zero3(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are DeepSpeed ZeRO-3 partitions (each rank holds a
    shard; the tensor itself has 0 elements outside the module's forward)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def full_parameters(params):
    """A context in which the ZeRO-3 partitioned ``params`` hold their full values
    (read-only: changes are not written back); a null context when none is partitioned or
    all are already gathered. A collective under ZeRO-3: every process must enter it."""
    from contextlib import nullcontext

    todo = {}
    for p in params:
        status = getattr(p, "ds_status", None)
        if status is not None and status.name == "NOT_AVAILABLE":
            todo[id(p)] = p  # by identity: tied weights once, never an AVAILABLE one re-partitioned
    if not todo:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(todo.values()))


def full_shape(p: torch.Tensor) -> torch.Size:
    """The shape of parameter ``p`` (its full shape under ZeRO-3, where ``p.shape`` is (0,))."""
    return getattr(p, "ds_shape", p.shape)
