"""The training loop: GRPO plus OISD / SDPG / RLSD / OPSD, one config-driven story.

Each step (docs/objectives.md):

1. take the step's prompts (a pure function of seed and step) and sample G responses
   per prompt from the final layer (the acting policy);
2. score them with the verifier, turn rewards into group advantages;
3. for each optimizer mini-batch and micro-batch: one policy forward that returns the
   final hidden state at response positions (+ block outputs and attention rows of the
   OISD layers when OISD is on), a teacher forward when the method has one, every
   full-vocabulary term in one chunked pass (logits read out chunk by chunk and
   recomputed in backward, so no ``(tokens, V)`` tensor is kept), and the loss
   ``L_GRPO + sum of auxiliary terms``, every term normalised like the GRPO term;
4. gradient clipping, a non-finite guard, AdamW (or plain SGD, ``optim.name``);
5. metrics every step, evaluation / probes / checkpoints every N steps.

Processes: ``accelerate launch`` gives each process a slice of the step's prompts.
Rewards are gathered so advantages are computed over the global batch, every loss
is divided by the *global* normaliser, and gradients are summed across processes, so
two processes produce the same update as one process with the same global batch
(with ``optim.mini_batches`` 1: with several, each process splits its own share, so
the global mini-batches group prompts differently than one process would). No DDP
wrapper: the loop all-reduces gradients itself, once per mini-batch.

Dynamic sampling (``rollout.dynamic_sampling``) keeps every process's batch at its
size, so it combines with several processes; its replacement prompts are drawn per
process, so there the two-process and one-process runs differ.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer import objectives as obj
from trainer.batching import PromptStream, group_noise, replacement_stream, scored_positions
from trainer.config import TrainConfig
from trainer.distributed import all_gather_cat, all_sum, distributed
from trainer.loss import LossComputer, StepBatch
from trainer.methods import Terms, spec_of
from trainer.recorder import RunRecorder
from trainer.lr_warmup import warmup_schedule
from trainer.setup import TrainSetup
from workbench.errors import WorkbenchError
from workbench.models.generation import sample
from workbench.storage.checkpoints import latest_checkpoint

log = logging.getLogger(__name__)


class Trainer:
    """Holds the models, optimizer and run writer; ``train_step`` is the algorithm."""

    def __init__(self, cfg: TrainConfig, setup: TrainSetup):
        self.cfg, self.setup = cfg, setup
        self.model = setup.model
        self.tok = setup.tokenizer
        self.device = setup.accelerator.device
        self.L = setup.num_layers
        self.stream = PromptStream(setup.task.train_examples(), cfg.seed)
        params, o = [p for p in self.model.parameters() if p.requires_grad], cfg.optim
        if o.name == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=o.lr, weight_decay=o.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        self.scheduler = warmup_schedule(self.optimizer, cfg.optim.warmup_steps)
        self.step = 0
        self.bad_steps = 0
        self.spec = spec_of(cfg.method)
        # The loss and what surrounds it (frozen teacher, its re-sync, gradient shares).
        self.loss = LossComputer.build(cfg, self.model, self.tok, setup.accelerator, reference=setup.reference,
                                       oisd_layers=setup.oisd_layers)
        self.vocab_size = self.loss.vocab_size

    # ---------------------------------------------------------------- rollouts
    @torch.no_grad()
    def rollout(self) -> tuple[StepBatch, dict]:
        """Sample this process's share of the step's groups, score them, and compute
        advantages over the *global* batch (rewards gathered from every process)."""
        cfg, acc = self.cfg, self.setup.accelerator
        P, G = cfg.rollout.prompts_per_step, cfg.rollout.group_size
        rank, world = acc.process_index, acc.num_processes
        position = self.step * P  # global prompt position of this step
        groups = self.stream.take(position, P)[rank * P // world : (rank + 1) * P // world]
        batch, rewards, correct, examples = self._sample_groups(groups, cfg.seed)
        dyn = {}
        if cfg.rollout.dynamic_sampling:
            batch, rewards, correct, examples, dyn = self._refill(batch, rewards, correct, examples)
        # Every process holds the same number of groups (dynamic sampling keeps the size),
        # so the gathered rewards are the global batch in process order.
        all_rewards = all_gather_cat(rewards)
        adv_all = obj.group_advantages(all_rewards, G, cfg.grpo.scale_rewards)
        n_local = rewards.numel()
        adv = adv_all[rank * n_local : (rank + 1) * n_local]
        resp_mask = batch.response_mask
        stats = {
            "reward": all_rewards.mean().item(),
            "reward_std": all_rewards.view(-1, G).std(dim=1).mean().item(),
            "frac_reward_zero_std": obj.frac_zero_std(all_rewards, G),
            "accuracy": all_gather_cat(correct).mean().item(),
            "completions/mean_length": all_gather_cat(batch.lengths.float()).mean().item(),
            "completions/clipped_ratio": all_gather_cat(batch.truncated.float()).mean().item(),
        }
        for k, v in dyn.items():  # counts summed over processes
            stats[k] = float(all_sum(torch.tensor([float(v)], device=self.device))[0])
        P_w = batch.prompt_length
        sb = StepBatch(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            scored=scored_positions(resp_mask, P_w),
            response_mask=resp_mask.float(),
            sample_logprobs=batch.logprobs,
            advantages=adv.to(self.device),
            teacher_prompts=[e.teacher_prompt for e in examples for _ in range(G)],
            prompt_width=P_w,
        )
        return sb, stats

    def _sample_groups(self, groups: list[tuple[int, object]], noise_seed: int):
        """G responses per (position, example), with per-group noise keyed by the position."""
        cfg, G = self.cfg, self.cfg.rollout.group_size
        examples = [e for _, e in groups]
        prompt_ids = [self.tok(e.prompt, add_special_tokens=True)["input_ids"] for e in examples for _ in range(G)]
        noise = group_noise(noise_seed, [p for p, _ in groups], G, cfg.rollout.max_new_tokens).to(self.device)
        model = self.setup.accelerator.unwrap_model(self.model)
        out = sample(model, prompt_ids, pad_id=self.tok.pad_token_id, eos_id=self.tok.eos_token_id,
                     max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                     top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, noise=noise)
        texts = [self.tok.decode(r[: int(n)].tolist(), skip_special_tokens=True)
                 for r, n in zip(out.responses, out.lengths)]
        correct = torch.tensor([self.setup.task.reward(t, examples[i // G]) for i, t in enumerate(texts)])
        rewards = correct.clone()
        if cfg.grpo.format_bonus > 0:
            has_answer = torch.tensor([self.setup.task.extract_answer(t) is not None for t in texts], dtype=torch.float)
            rewards = rewards + cfg.grpo.format_bonus * has_answer
        return out, rewards.to(self.device), correct.to(self.device), examples

    def _refill(self, batch, rewards, correct, examples):
        """Dynamic sampling (DAPO): replace groups whose rewards are all equal.

        Replacement groups come from :func:`~trainer.batching.replacement_stream` (a
        pure function of seed, step, round and slot, so resume stays exact); each
        process samples from its own slice of every round's window. At most
        ``rollout.max_resample`` rounds. The batch keeps its size: if too few
        informative groups turn up, the first dropped groups fill the remaining
        slots (they have A = 0). Equal sizes keep processes in step (same gathers,
        same number of micro-batches) and mini-batches made of whole groups.

        Returns:
            ``(batch, rewards, correct, examples, stats)`` with stats
            ``dynamic_sampling/dropped_groups`` (zero-variance groups replaced),
            ``dynamic_sampling/unfilled_groups`` (kept for lack of replacements),
            ``dynamic_sampling/resample_rounds``.
        """
        from workbench.models.generation import concat_batches

        cfg, G = self.cfg, self.cfg.rollout.group_size
        acc = self.setup.accelerator
        target = rewards.numel() // G  # groups this process must hold
        P, rank, world = cfg.rollout.prompts_per_step, acc.process_index, acc.num_processes

        def informative(r: torch.Tensor) -> torch.Tensor:  # (n_groups,) bool
            return r.view(-1, G).std(dim=1) > 0

        keep = informative(rewards)
        pieces = [(batch, rewards, correct, examples, keep)]  # every sampled set, in order
        have = int(keep.sum())
        stream, noise_seed = replacement_stream(self.stream.examples, cfg.seed, self.step)
        rounds = 0
        while have < target and rounds < cfg.rollout.max_resample:
            # Round r's window is [r * P, (r + 1) * P); this process owns its slice of it.
            start = rounds * P + rank * P // world
            new = stream.take(start, target - have)
            b2, r2, c2, e2 = self._sample_groups(new, noise_seed)
            k2 = informative(r2)
            pieces.append((b2, r2, c2, e2, k2))
            have += int(k2.sum())
            rounds += 1
        stats = {"dynamic_sampling/dropped_groups": int((~keep).sum()) - max(0, target - have),
                 "dynamic_sampling/unfilled_groups": max(0, target - have),
                 "dynamic_sampling/resample_rounds": rounds}
        if rounds == 0:  # nothing to replace (or no rounds allowed): the batch as sampled
            return batch, rewards, correct, examples, stats
        # Per sampled set, the groups to keep: informative ones in sampling order until
        # the batch is full, then (if slots remain) dropped groups of the step's own prompts.
        picked: list[list[int]] = []
        free = target
        for *_, k in pieces:
            groups = torch.nonzero(k).flatten().tolist()[:free]
            picked.append(groups)
            free -= len(groups)
        picked[0] += torch.nonzero(~keep).flatten().tolist()[:free]
        parts, rs, cs, es = [], [], [], []
        for (b, r, c, e, _), groups in zip(pieces, picked):
            if groups:
                rows = torch.tensor([g * G + j for g in groups for j in range(G)], device=r.device)
                parts.append(b.select(rows))
                rs.append(r[rows])
                cs.append(c[rows])
                es += [e[g] for g in groups]
        merged = concat_batches(parts, pad_id=self.tok.pad_token_id)
        return merged, torch.cat(rs), torch.cat(cs), es, stats

    # ---------------------------------------------------------------- the loss
    def micro_loss(self, sb: StepBatch, rows: torch.Tensor, old_logp: torch.Tensor | None,
                   norm: dict[str, float]) -> tuple[torch.Tensor, dict, Terms]:
        """The loss of one micro-batch at this step (:meth:`trainer.loss.LossComputer.micro_loss`)."""
        return self.loss.micro_loss(sb, rows, old_logp, norm, self.step)

    def vocab_chunk_size(self) -> int:
        return self.loss.vocab_chunk_size()

    # ---------------------------------------------------------------- one step
    def normalisers(self, sb: StepBatch, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Global normalisers of a mini-batch: response tokens and sequences, summed over
        processes (every loss divides by these, so processes add up to one batch)."""
        tokens = all_sum(sb.response_mask[rows].sum().reshape(1).to(self.device))[0]
        seqs = all_sum(torch.tensor([float(len(rows))], device=self.device))[0]
        return {"tokens": tokens.clamp(min=1), "seqs": seqs}

    def _all_reduce_gradients(self) -> None:
        """Sum gradients over processes (losses already use global normalisers).

        Every trainable parameter takes part, a missing gradient as zeros, so that all
        processes reduce tensors of the same size even if a term skipped a parameter.
        """
        if not distributed():
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.flatten() for p in params])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def train_step(self) -> dict:
        """One rollout batch and its ``optim.mini_batches`` updates; returns the step's logs."""
        cfg = self.cfg
        t0 = time.time()
        self.model.train()
        self.loss.begin_step(self.step)
        sb, logs = self.rollout()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update runs at (as TRL logs it)
        finite = self.update(sb, logs)
        logs.update(self.spec.schedule(cfg, self.step))
        logs["lr"] = lr
        dt = time.time() - t0
        n_tok = float(all_sum(sb.response_mask.sum().reshape(1).to(self.device))[0])
        logs["perf/step_time"] = dt
        logs["perf/tokens_per_s"] = n_tok / max(dt, 1e-9)
        if torch.cuda.is_available():
            logs["perf/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        logs["nonfinite_skipped"] = 0.0 if finite else 1.0
        if not finite:
            self.bad_steps += 1
            log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", self.step, self.bad_steps)
        else:
            self.bad_steps = 0
        return logs

    def update(self, sb: StepBatch, logs: dict) -> bool:
        """The optimizer updates of one rollout batch: ``optim.mini_batches`` of them, each
        accumulated over micro-batches; adds the loss terms and ``grad_norm`` to ``logs``.

        Non-finite guard: if any process sees a non-finite loss or the (global)
        gradient norm is non-finite, every process skips the update of that
        mini-batch and of the rest of the step (updates of earlier mini-batches of
        the step stay applied).

        Returns:
            Whether every update was finite (and applied).
        """
        cfg = self.cfg
        self.model.train()
        B = sb.input_ids.shape[0]
        n_mb = cfg.optim.mini_batches
        micro = cfg.optim.micro_batch_size or B
        mb_rows = torch.arange(B).chunk(n_mb)  # check_batch: n_mb equal chunks of whole groups
        old_logp = None
        if n_mb > 1:  # several updates per rollout batch: ratios against the sampling policy
            old_logp = sb.sample_logprobs.to(self.device)
        sums: dict[str, float] = {}
        shares: dict[str, float] = {}
        finite = True
        gnorm = torch.zeros(())
        for rows_mb in mb_rows:
            norm = self.normalisers(sb, rows_mb)
            self.optimizer.zero_grad(set_to_none=True)
            mb_loss = 0.0
            for i, rows in enumerate(rows_mb.split(micro)):
                rows = rows.to(self.device)
                loss, parts, terms = self.micro_loss(sb, rows, None if old_logp is None else old_logp[rows], norm)
                if i == 0 and rows_mb is mb_rows[0]:
                    shares = self.loss.gradient_shares(terms, self.step)
                loss.backward()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / n_mb
                mb_loss += float(loss.detach())
            sums["loss"] = sums.get("loss", 0.0) + mb_loss / n_mb
            self._all_reduce_gradients()
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm)
            # The decision must be the same on every process, or their weights drift apart.
            bad = 0.0 if (math.isfinite(mb_loss) and bool(torch.isfinite(gnorm))) else 1.0
            if float(all_sum(torch.tensor([bad], device=self.device))[0]) > 0:
                finite = False
                self.optimizer.zero_grad(set_to_none=True)
                break
            self.optimizer.step()
            self.scheduler.step()
        # Every logged part is this process's share of a global mean: sum over processes.
        for k in sums:
            sums[k] = float(all_sum(torch.tensor([sums[k]], device=self.device))[0])
        logs.update(sums)
        logs.update(shares)  # measured on this process's first micro-batch, not summed
        logs["grad_norm"] = float(gnorm)
        return finite


class NonFiniteError(WorkbenchError):
    """Training stopped after ``optim.max_bad_steps`` consecutive non-finite steps."""


def train_builtin(cfg: TrainConfig, setup: TrainSetup, *, resume: bool = False) -> Path:
    """The built-in backend (``backend: builtin``): train ``cfg`` to completion, or resume it;
    returns the run folder. Called by :func:`trainer.run.train` after validation.

    With ``resume``, training continues from the newest complete checkpoint (a truncated
    or corrupt one is skipped with a warning) and metrics/probe rows after it are
    dropped, so the run's tables match an uninterrupted run.

    Raises:
        NonFiniteError: ``optim.max_bad_steps`` consecutive non-finite steps; run.json
            then says ``failed``.
    """
    from trainer.state import load_trainer_state, save_checkpoint_fn

    acc = setup.accelerator
    run_dir = setup.run_dir
    tr = Trainer(cfg, setup)
    start_step, resume_step = 0, -1  # resume_step -1: drop every logged row (no checkpoint)
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            start_step = resume_step = load_trainer_state(tr, ckpt.path)
            log.info("resuming %s from %s (step %d)", run_dir, ckpt.path.name, start_step)
        else:
            log.warning("no complete checkpoint in %s; starting from step 0", run_dir)
    tr.step = start_step
    if acc.is_main_process:
        if start_step >= cfg.steps:
            log.info("%s already finished its %d steps; nothing to train", run_dir, cfg.steps)
        else:
            log.info("training %s: steps %d..%d on %d process(es), device %s", cfg.method, start_step + 1,
                     cfg.steps, acc.num_processes, acc.device)
    recorder = RunRecorder(cfg, setup, resume=resume, resume_step=resume_step, facts={})
    try:
        if start_step == 0:
            recorder.start(acc.unwrap_model(tr.model))
        bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=f"train {cfg.method}",
                   disable=not (cfg.logging.progress and acc.is_main_process), dynamic_ncols=True)
        for _ in bar:
            logs = tr.train_step()
            tr.step += 1
            k = tr.step
            if tr.bad_steps >= cfg.optim.max_bad_steps:  # the same count on every process
                recorder.log(k, logs)
                raise NonFiniteError(f"stopped at step {k} after {tr.bad_steps} consecutive non-finite steps "
                                     f"(optim.max_bad_steps={cfg.optim.max_bad_steps})")
            logs.update(recorder.extras(acc.unwrap_model(tr.model), k))
            recorder.log(k, logs)
            if acc.is_main_process:
                bar.set_postfix(reward=f"{logs['reward']:.2f}", acc=f"{logs['accuracy']:.2f}",
                                ent=f"{logs.get('entropy', 0):.2f}")
            if recorder.checkpoint_due(k):
                acc.wait_for_everyone()
                recorder.checkpoint(k, save_checkpoint_fn(tr, k))
                acc.wait_for_everyone()
        recorder.finish(acc.unwrap_model(tr.model))
    except BaseException as exc:
        recorder.fail(exc)
        raise
    if acc.is_main_process:
        print(f"run finished: {run_dir}  (next: oisd probe {run_dir}; oisd dashboard {run_dir.parent})")
    return run_dir
