"""Run by ``tests/trainer/test_fsdp2.py`` under ``torchrun --nproc_per_node 2``: the loss path of
one method under FSDP2 (``fully_shard`` per decoder block and at the root, a 2-rank CPU
mesh over gloo) against the same model unsharded, on the same batch on every rank.

Each rank computes the loss through :func:`trainer.loss.run_as_forward` (``engine`` = the
FSDP2 root) and backward; FSDP2 averages the gradients over ranks, and the batch is the
same on both, so every full gradient (``grad.full_tensor()``) must equal the unsharded
model's. Rank 0 writes ``{loss, max_grad_diff, ...}`` to OUT.

    torchrun --nproc_per_node 2 tests/trainer/fsdp2_ranks.py MODEL_DIR CONFIG OUT
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


class Plain:
    """The three things ``LossComputer`` asks of an accelerator, for a model that is not wrapped."""

    device = torch.device("cpu")

    @staticmethod
    def unwrap_model(model):
        return model

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


def batch_of(tok, group: int = 2):
    """Two prompts x ``group`` responses of fixed tokens, advantages of both signs."""
    from trainer.batching import scored_positions
    from trainer.loss import StepBatch

    prompts = ["3+4=", "12+5="]
    g = torch.Generator().manual_seed(7)
    ids = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts for _ in range(group)]
    width = max(len(x) for x in ids)
    R = 6
    rows, masks, resp = [], [], []
    for i, p in enumerate(ids):
        n = 3 + i % 4  # response lengths 3..6
        response = torch.randint(5, len(tok) - 1, (n,), generator=g).tolist() + [tok.pad_token_id] * (R - n)
        rows.append([tok.pad_token_id] * (width - len(p)) + p + response)
        masks.append([0] * (width - len(p)) + [1] * (len(p) + n) + [0] * (R - n))
        resp.append([1.0] * n + [0.0] * (R - n))
    response_mask = torch.tensor(resp)
    return StepBatch(
        input_ids=torch.tensor(rows), attention_mask=torch.tensor(masks),
        scored=scored_positions(response_mask, width), response_mask=response_mask, sample_logprobs=None,
        advantages=torch.tensor([1.0, -1.0, 0.5, -0.5][: len(rows)]),
        teacher_prompts=[f"{p} (the answer is 7)" for p in prompts for _ in range(group)], prompt_width=width)


def main(model_dir: str, config: str, out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.config import load_config
    from trainer.distributed import close_processes
    from trainer.loss import LossComputer

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(config, [f"model.path={model_dir}", "optim.vocab_chunk_size=5", "oisd.layers=[1, 2]",
                               "oisd.attn_query_stride=1", "grpo.kl_coef=0.1"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    plain.config.use_cache = False
    reference = copy.deepcopy(plain).requires_grad_(False).eval()
    sharded = copy.deepcopy(plain)
    mesh = init_device_mesh("cpu", (world,))
    for block in sharded.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    sb = batch_of(tok)
    rows = torch.arange(sb.input_ids.shape[0])
    norm = {"tokens": sb.response_mask.sum(), "seqs": torch.tensor(float(len(rows)))}
    results = {}
    for name, model, engine in (("plain", plain, None), ("fsdp2", sharded, sharded)):
        lc = LossComputer.build(cfg, model, tok, Plain(), reference=reference)
        loss, logs, terms = lc.micro_loss(sb, rows, None, norm, 0, engine=engine)
        loss.backward()
        grads = {}
        for n, p in model.named_parameters():
            g = p.grad
            grads[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
        results[name] = (loss.item(), {k: float(v) for k, v in logs.items()}, grads, sorted(terms))
    (loss_p, logs_p, grads_p, terms_p), (loss_s, logs_s, grads_s, terms_s) = results["plain"], results["fsdp2"]
    diff = {n: float((grads_s[n] - grads_p[n]).abs().max()) for n in grads_p}
    if rank == 0:
        out.write_text(json.dumps({
            "loss_plain": loss_p, "loss_fsdp2": loss_s, "logs_plain": logs_p, "logs_fsdp2": logs_s,
            "terms": terms_p, "terms_fsdp2": terms_s, "max_grad_diff": max(diff.values()),
            "worst": max(diff, key=diff.get), "max_grad": max(float(g.abs().max()) for g in grads_p.values()),
            "sharded": sorted({type(p).__name__ for p in sharded.parameters()}),
        }))
    close_processes()  # both ranks done before the group goes (a teardown race aborted rank 0 once)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
