"""Run by ``tests/trainer/test_trl_distributed.py`` under ``accelerate launch`` (or plain python):
the TRL backend's trainer on rollouts that do not depend on the process count, so that a
2-process run and a 1-process run see the same global batch.

Each row's sampling noise is keyed by its global row (process index x rows per process +
its index), which is its position in TRL's generation batch whatever the process count
(the batch sampler hands process r the r-th contiguous slice). After training, every
process writes its own weights (``rank<r>.safetensors``) and log history (``rank<r>.json``).

Under DeepSpeed ZeRO-3 (``accelerate launch --config_file configs/accelerate/zero3-cpu.yaml``)
the processes hold one sharded copy: rollouts are sampled from a plain replica refreshed
from the gathered shards (each process decodes its own rows, a different number of
forwards, which ZeRO-3's hooks would have to match), and only process 0 writes the full
gathered weights (``rank0.safetensors``).

    python tests/trainer/trl_ranks.py CONFIG OUT_DIR key=value ...

"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def main(config: str, out: Path, overrides: list[str]) -> None:

    from trainer.batching import derive_seed
    from trainer.config import load_config
    from trainer.distributed import close_processes
    from trainer.setup import prepare
    from trainer.trl_backend import SelfDistillGRPOTrainer, build_grpo_config, task_data
    from workbench.models.generation import sample

    cfg = load_config(config, overrides)
    setup = prepare(cfg)
    setup.model.config.use_cache = True
    dataset, rewards = task_data(cfg, setup.task)
    tok = setup.tokenizer

    shadow = {}  # ZeRO-3: a plain replica of the policy, refreshed before each rollout

    def sampler(trainer):
        from trainer.distributed import full_parameters, is_zero3

        policy = trainer.accelerator.unwrap_model(trainer.model)
        if not is_zero3(policy):
            return policy
        if "model" not in shadow:
            shadow["model"] = copy.deepcopy(setup_copy).requires_grad_(False)
        params = dict(policy.named_parameters())
        with torch.no_grad(), full_parameters(params.values()):
            for name, p in shadow["model"].named_parameters():
                p.copy_(params[name].data)
        return shadow["model"]

    def rollouts(prompts, trainer):
        rank, n = trainer.accelerator.process_index, len(prompts)
        step, width = trainer.state.global_step, cfg.rollout.max_new_tokens
        ids = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
        noise = torch.stack([torch.rand(width, generator=torch.Generator().manual_seed(
            derive_seed(cfg.seed, "rank-free", step, rank * n + i))) for i in range(n)])
        out = sample(sampler(trainer), ids, pad_id=tok.pad_token_id,
                     eos_id=tok.eos_token_id, max_new_tokens=width, temperature=cfg.rollout.temperature, noise=noise)
        lengths = out.lengths.tolist()
        return {"prompt_ids": ids,
                "completion_ids": [r[:k].tolist() for r, k in zip(out.responses, lengths)],
                "logprobs": [lp[:k].tolist() for lp, k in zip(out.logprobs, lengths)]}

    setup_copy = copy.deepcopy(setup.model)  # before DeepSpeed partitions it
    args = build_grpo_config(cfg, out / "trl", setup.accelerator.num_processes)
    args.save_strategy = "no"
    trainer = SelfDistillGRPOTrainer(model=setup.model, reward_funcs=rewards, args=args, train_dataset=dataset,
                                     processing_class=tok, rollout_func=rollouts, workbench_config=cfg,
                                     reference=setup.reference, oisd_layers=setup.oisd_layers)
    trainer.train()
    from trainer.distributed import is_zero3

    rank = trainer.accelerator.process_index
    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_zero3(model):  # every process gathers; process 0 receives the full weights
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        if rank == 0:
            save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(out / "rank0.safetensors"))
    else:
        save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
                  str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(trainer.state.log_history))
    close_processes()  # as `oisd train` does: the group torn down before the processes exit


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
