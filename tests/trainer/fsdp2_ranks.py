"""Run by ``tests/trainer/test_fsdp2.py`` under ``torchrun --nproc_per_node 2``: one training
step of one method under FSDP2 (``fully_shard`` per decoder block and at the root, a 2-rank
CPU mesh over gloo) against the same model unsharded on the global batch.

The global batch is 4 prompts x 2 responses; each rank holds its own half. The unsharded
model computes the loss of the whole batch; each rank computes its half's loss through
:func:`trainer.loss.run_as_forward` (``engine`` = the FSDP2 root), normalised by the global
counts over the process count (as the TRL backend does), so that FSDP2's average of the ranks'
gradients is the global batch's gradient. Then one plain-SGD step on each, and every
parameter, gathered (``full_tensor()``), must equal the unsharded model's: a gradient that was
not reduced over the ranks would leave each rank with its own half's update. Every rank writes
``rank<r>.json`` into OUT.

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


LR = 0.1  # plain SGD: the update is LR x the (global) gradient


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
    """Four prompts x ``group`` responses of fixed tokens, advantages of both signs."""
    from trainer.batching import scored_positions
    from trainer.loss import StepBatch

    prompts = ["3+4=", "12+5=", "7-2=", "9+9="]
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
        advantages=torch.tensor([1.0, -1.0, 0.5, -0.5, 0.8, -0.8, 0.3, -0.3][: len(rows)]),
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
    every = torch.arange(sb.input_ids.shape[0])
    mine = every.view(world, -1)[rank]  # this rank's half of the global batch
    tokens = sb.response_mask.sum()
    results = {}
    for name, model, engine, rows, scale in (("plain", plain, None, every, 1.0),
                                              ("fsdp2", sharded, sharded, mine, float(world))):
        # A rank's loss is its share of the global aggregate times the process count: FSDP2
        # averages the ranks' gradients, which is then the global batch's gradient.
        norm = {"tokens": tokens / scale, "seqs": torch.tensor(float(len(every))) / scale}
        lc = LossComputer.build(cfg, model, tok, Plain(), reference=reference)
        loss, logs, terms = lc.micro_loss(sb, rows, None, norm, 0, engine=engine)
        loss.backward()
        grad_norm = torch.sqrt(sum((p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).pow(2).sum()
                                   for p in model.parameters() if p.grad is not None))
        torch.optim.SGD(model.parameters(), lr=LR).step()
        weights = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                   for n, p in model.named_parameters()}
        total = loss.detach().clone()
        if engine is not None:  # the global loss: the ranks' shares added, over the process count
            dist.all_reduce(total)
            total /= world
        results[name] = (float(total), float(grad_norm), weights, sorted(terms))
    (loss_p, norm_p, w_p, terms_p), (loss_s, norm_s, w_s, terms_s) = results["plain"], results["fsdp2"]
    start = {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()}
    update = {n: float((w_p[n] - start[n]).abs().max()) for n in w_p}
    diff = {n: float((w_s[n] - w_p[n]).abs().max()) for n in w_p}
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "rows": mine.tolist(), "loss_plain": loss_p, "loss_fsdp2": loss_s, "grad_norm_plain": norm_p,
        "grad_norm_fsdp2": norm_s, "terms": terms_p, "terms_fsdp2": terms_s, "max_update": max(update.values()),
        "max_weight_diff": max(diff.values()), "worst": max(diff, key=diff.get),
        "sharded": sorted({type(p).__name__ for p in sharded.parameters()}),
    }))
    close_processes()  # both ranks done before the group goes (a teardown race aborted rank 0 once)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
