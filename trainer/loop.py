"""The training loop: GRPO plus OISD / SDPG / RLSD / OPSD, one config-driven story.

Each step (METHODS.md):

1. take the step's prompts (a pure function of seed and step) and sample G responses
   per prompt from the final layer (the acting policy);
2. score them with the verifier, turn rewards into group advantages;
3. for each optimizer mini-batch and micro-batch: one policy forward that returns the
   final-layer logits at response positions (+ hidden states and attention rows of the
   OISD layers when OISD is on), a teacher forward when the method has one, and the
   loss ``L_GRPO + sum of auxiliary terms``, every term normalised like the GRPO term;
4. gradient clipping, a non-finite guard, AdamW;
5. metrics every step, evaluation / probes / checkpoints every N steps.

Processes: ``accelerate launch`` gives each process a slice of the step's prompts.
Rewards are gathered so advantages are computed over the global batch, every loss
is divided by the *global* normaliser, and gradients are summed across processes, so
two processes produce the same update as one process with the same global batch.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer import objectives as obj
from trainer.batching import PromptStream, group_noise, scored_positions, teacher_batch, to_grid
from trainer.evaluate import evaluate
from trainer.forward import policy_forward, readout
from trainer.rollout import sample
from trainer.setup import TrainSetup, prepare
from workbench.config import TrainConfig, config_to_dict
from workbench.runstore import RunWriter, latest_checkpoint, write_checkpoint

log = logging.getLogger(__name__)


@dataclass
class StepBatch:
    """One step's rollouts on this process, with everything the loss needs."""

    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    scored: torch.Tensor  # (B, P + R) bool
    response_mask: torch.Tensor  # (B, R)
    sample_logprobs: torch.Tensor  # (B, R) log-probs under the sampling policy
    advantages: torch.Tensor  # (B,)
    teacher_prompts: list[str]  # (B,) hinted prompts (methods with a privileged teacher)
    prompt_width: int


def _distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    if not _distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class Trainer:
    """Holds the models, optimizer and run writer; ``train_step`` is the algorithm."""

    def __init__(self, cfg: TrainConfig, setup: TrainSetup):
        self.cfg, self.s = cfg, setup
        self.model = setup.model
        self.tok = setup.tokenizer
        self.device = setup.accelerator.device
        self.L = setup.num_layers
        self.stream = PromptStream(setup.task.train_examples(), cfg.seed)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay,
        )
        total_updates = cfg.steps * cfg.optim.mini_batches
        warm = cfg.optim.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda u: min(1.0, (u + 1) / warm) if warm > 0 else 1.0
        )
        del total_updates  # constant after warm-up: RL steps are few and each matters
        self.step = 0
        self.bad_steps = 0
        # Frozen models only when a term needs them (METHODS.md): the reference is the
        # initial model; RLSD's teacher is a copy re-synced every `sync_every` steps.
        self.reference = setup.reference
        self.rlsd_teacher = self._frozen_copy() if cfg.method == "rlsd" else None

    # ---------------------------------------------------------------- frozen copies
    def _frozen_copy(self):
        m = copy.deepcopy(self.model)
        m.requires_grad_(False)
        return m.eval()

    # ---------------------------------------------------------------- rollouts
    @torch.no_grad()
    def rollout(self) -> tuple[StepBatch, dict]:
        cfg, acc = self.cfg, self.s.accelerator
        P, G = cfg.rollout.prompts_per_step, cfg.rollout.group_size
        rank, world = acc.process_index, acc.num_processes
        position = self.step * P  # global prompt position of this step
        groups = self.stream.take(position, P)[rank * P // world : (rank + 1) * P // world]
        batch, rewards, correct, examples = self._sample_groups(groups)
        # Dynamic sampling (a flag for every method alike): replace groups whose rewards
        # are all equal with fresh prompts from beyond this step's window.
        dropped = 0
        if cfg.rollout.dynamic_sampling:
            batch, rewards, correct, examples, dropped = self._refill(batch, rewards, correct, examples, groups)
        all_rewards = _all_gather_cat(rewards)
        adv_all = obj.group_advantages(all_rewards, G, cfg.grpo.scale_rewards)
        n_local = rewards.numel()
        adv = adv_all[rank * n_local : (rank + 1) * n_local]
        resp_mask = batch.response_mask
        stats = {
            "reward": all_rewards.mean().item(),
            "reward_std": all_rewards.view(-1, G).std(dim=1).mean().item(),
            "frac_reward_zero_std": obj.frac_zero_std(all_rewards, G),
            "accuracy": _all_gather_cat(correct).mean().item(),
            "completions/mean_length": _all_gather_cat(batch.lengths.float()).mean().item(),
            "completions/clipped_ratio": _all_gather_cat(batch.truncated.float()).mean().item(),
        }
        if cfg.rollout.dynamic_sampling:
            stats["dynamic_sampling/dropped_groups"] = dropped
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

    def _sample_groups(self, groups):
        cfg, G = self.cfg, self.cfg.rollout.group_size
        examples = [e for _, e in groups]
        prompt_ids = [self.tok(e.prompt, add_special_tokens=True)["input_ids"] for e in examples for _ in range(G)]
        noise = group_noise(cfg.seed, [p for p, _ in groups], G, cfg.rollout.max_new_tokens).to(self.device)
        model = self.s.accelerator.unwrap_model(self.model)
        out = sample(model, prompt_ids, pad_id=self.tok.pad_token_id, eos_id=self.tok.eos_token_id,
                     max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                     top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, noise=noise)
        texts = [self.tok.decode(r[: int(n)].tolist(), skip_special_tokens=True)
                 for r, n in zip(out.responses, out.lengths)]
        correct = torch.tensor([self.s.task.reward(t, examples[i // G]) for i, t in enumerate(texts)])
        rewards = correct.clone()
        if cfg.grpo.format_bonus > 0:
            has_answer = torch.tensor([self.s.task.extract_answer(t) is not None for t in texts], dtype=torch.float)
            rewards = rewards + cfg.grpo.format_bonus * has_answer
        return out, rewards.to(self.device), correct.to(self.device), examples

    def _refill(self, batch, rewards, correct, examples, groups):
        """Drop zero-variance groups and sample replacements (at most `max_resample` rounds)."""
        from trainer.rollout import concat_batches

        cfg, G = self.cfg, self.cfg.rollout.group_size
        keep = rewards.view(-1, G).std(dim=1) > 0
        dropped = int((~keep).sum())
        target = len(groups)
        extra_pos = (self.cfg.steps + self.step) * cfg.rollout.prompts_per_step * 7919  # disjoint window
        rounds = 0
        kept = [batch.select(torch.nonzero(keep.repeat_interleave(G)).flatten())]
        kept_r = [rewards[keep.repeat_interleave(G)]]
        kept_c = [correct[keep.repeat_interleave(G)]]
        kept_e = [e for e, k in zip(examples, keep.tolist()) if k]
        have = int(keep.sum())
        while have < target and rounds < cfg.rollout.max_resample:
            new_groups = self.stream.take(extra_pos + rounds * target + self.s.accelerator.process_index * 97, target - have)
            b2, r2, c2, e2 = self._sample_groups(new_groups)
            k2 = r2.view(-1, G).std(dim=1) > 0
            idx = torch.nonzero(k2.repeat_interleave(G)).flatten()
            kept.append(b2.select(idx)); kept_r.append(r2[idx]); kept_c.append(c2[idx])
            kept_e += [e for e, k in zip(e2, k2.tolist()) if k]
            have += int(k2.sum())
            rounds += 1
        if have == 0:  # nothing informative this step: keep the original batch (all A = 0)
            return batch, rewards, correct, examples, dropped
        merged = concat_batches(kept, pad_id=self.tok.pad_token_id)
        return merged, torch.cat(kept_r), torch.cat(kept_c), kept_e, dropped

    # ---------------------------------------------------------------- the loss
    def _teacher_logits(self, model, sb: StepBatch, rows: torch.Tensor) -> torch.Tensor:
        """Teacher logits ``(n, V)`` on the student's response tokens, with the hint, no grad."""
        tb = teacher_batch(self.tok, [sb.teacher_prompts[i] for i in rows.tolist()],
                           sb.input_ids[rows, sb.prompt_width:], sb.response_mask[rows])
        with torch.no_grad(), self.s.accelerator.autocast():
            return policy_forward(model, tb.input_ids.to(self.device), tb.attention_mask.to(self.device),
                                  tb.scored.to(self.device)).logits.detach()

    def micro_loss(self, sb: StepBatch, rows: torch.Tensor, old_logp: torch.Tensor | None,
                   norm: dict[str, float]) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch (rows of the step batch), already divided by the
        global normaliser of its mini-batch, so micro-batch losses add up exactly."""
        cfg, T = self.cfg, self.cfg.rollout.temperature
        ids, am, scored = sb.input_ids[rows], sb.attention_mask[rows], sb.scored[rows]
        mask = sb.response_mask[rows]
        adv = sb.advantages[rows]
        oisd_on = cfg.uses_oisd and (cfg.oisd.lambda_logit > 0 or cfg.oisd.lambda_attn > 0)
        S = self.s.oisd_layers if oisd_on else []
        attn_layers = (S + [self.L]) if (oisd_on and cfg.oisd.lambda_attn > 0) else []
        with self.s.accelerator.autocast():
            out = policy_forward(self.model, ids, am, scored, hidden_layers=S if cfg.oisd.lambda_logit > 0 else [],
                                 attn_layers=attn_layers, attn_query_stride=cfg.oisd.attn_query_stride)
        logp_all = torch.log_softmax(out.logits.float() / T, dim=-1)  # (n, V)
        tokens = ids[out.index[0], out.index[1] + 1]
        logp = to_grid(logp_all.gather(-1, tokens[:, None]).squeeze(-1), mask)  # (b, R)
        with torch.no_grad():
            ent = to_grid(-(logp_all.exp() * logp_all).sum(-1), mask)
        old = logp.detach() if old_logp is None else old_logp
        # scale: an aggregate over this micro-batch times (its count / the global count)
        # equals its share of the aggregate over the whole (global) mini-batch.
        unit = "tokens" if cfg.grpo.loss_type == "token_mean" else "seqs"
        scale = (mask.sum() if unit == "tokens" else torch.tensor(float(len(rows)))) / norm[unit]
        agg = lambda x: obj.aggregate(x, mask, cfg.grpo.loss_type, cfg.rollout.max_new_tokens) * scale  # noqa: E731
        tok_share = mask.sum() / norm["tokens"]  # token-mean metrics: this micro-batch's share

        logs: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.device)
        A = adv
        if cfg.method == "rlsd":
            lam = obj.rlsd_lambda(self.step, cfg.rlsd.lambda_init, cfg.rlsd.lambda_decay_steps)
            t_logits = self._teacher_logits(self.rlsd_teacher, sb, rows)
            t_logp = to_grid(torch.log_softmax(t_logits.float() / T, -1).gather(-1, tokens[:, None]).squeeze(-1), mask)
            A, w = obj.rlsd_token_advantages(adv, t_logp, logp.detach(), lam, cfg.rlsd.eps_w)
            logs["rlsd/w_mean"] = (w * mask).sum() / norm["tokens"]
        if cfg.method != "opsd":  # OPSD has no reward term (METHODS.md)
            per_tok, cstats = obj.grpo_surrogate(logp, old, A, mask, eps_low=cfg.grpo.eps_low,
                                                 eps_high=cfg.grpo.eps_high, dual_clip=cfg.grpo.dual_clip,
                                                 clip=cfg.grpo.clip)
            l_pol = agg(per_tok)
            total = total + l_pol
            logs["loss/policy"] = l_pol.detach()
            logs["clip_ratio/region_mean"] = cstats["clip_ratio/region_mean"] * tok_share
        logs["entropy"] = (ent * mask).sum() / norm["tokens"]

        needs_ref = self.reference is not None
        if needs_ref:
            with torch.no_grad(), self.s.accelerator.autocast():
                ref_out = policy_forward(self.reference, ids, am, scored)
            ref_logp_all = torch.log_softmax(ref_out.logits.float() / T, -1)
            ref_logp = to_grid(ref_logp_all.gather(-1, tokens[:, None]).squeeze(-1), mask)
            k3 = obj.reference_kl(logp, ref_logp, cfg.grpo.kl_estimator)
            logs["kl"] = agg(k3.detach())
            if cfg.grpo.kl_coef > 0:
                total = total + cfg.grpo.kl_coef * agg(k3)

        if oisd_on:
            w_i = obj.oisd_weights(adv, cfg.oisd.weight)
            if cfg.oisd.lambda_logit > 0:
                head = readout(self.s.accelerator.unwrap_model(self.model), detach=cfg.oisd.detach_readout)
                teacher = out.logits.detach()
                J = [to_grid(obj.chunked_token_divergence(
                        lambda s, t: obj.oisd_logit_alignment(s, t, temperature=T),
                        out.hidden[l], head, teacher, cfg.oisd.chunk_size), mask) for l in S]
                l_think = obj.oisd_loss(J, w_i, mask, cfg.grpo.loss_type, cfg.rollout.max_new_tokens) * scale
                total = total + cfg.oisd.lambda_logit * l_think
                logs["loss/think"] = l_think.detach()
            if cfg.oisd.lambda_attn > 0:
                rows_a = out.attn_rows
                sel = torch.zeros(out.logits.shape[0], device=mask.device)
                sel[rows_a] = 1.0
                amask = to_grid(sel, mask)  # strided query rows only
                teacher_a = out.attentions[self.L]
                K = []
                for l in S:
                    k_rows = obj.oisd_attention_alignment(out.attentions[l], teacher_a, cfg.oisd.attn_mode == "per_head")
                    full = torch.zeros(out.logits.shape[0], device=mask.device, dtype=k_rows.dtype)
                    full[rows_a] = k_rows
                    K.append(to_grid(full, mask))
                scale_a = scale if cfg.oisd.attn_query_stride == 1 else scale * mask.sum() / amask.sum().clamp(min=1)
                l_attn = obj.oisd_loss(K, w_i, mask, cfg.grpo.loss_type, cfg.rollout.max_new_tokens) * scale_a
                total = total + cfg.oisd.lambda_attn * l_attn
                logs["loss/attn"] = l_attn.detach()

        if cfg.uses_sdpg:
            beta = obj.sdpg_beta(self.step, beta_base=cfg.sdpg.beta_base, t_warm=cfg.sdpg.t_warm,
                                 t_decay=cfg.sdpg.t_decay, total_steps=cfg.sdpg.total_steps or cfg.steps)
            gate = obj.sdpg_gate(adv) if cfg.sdpg.gate else torch.ones_like(adv)
            logs["sdpg/gate_fraction"] = gate.mean() * len(rows) / norm["seqs"]
            if beta > 0:
                t_logits = self._teacher_logits(self.model, sb, rows)
                head = readout(self.s.accelerator.unwrap_model(self.model))
                final_h = out.hidden.get(self.L)
                kl = obj.sdpg_reverse_kl(out.logits.float(), t_logits.float(), clamp=cfg.sdpg.kl_clamp, temperature=T) \
                    if final_h is None else obj.chunked_token_divergence(
                        lambda s, t: obj.sdpg_reverse_kl(s, t, clamp=cfg.sdpg.kl_clamp, temperature=T),
                        final_h, head, t_logits, cfg.sdpg.chunk_size)
                l_opd = agg(gate[:, None] * to_grid(kl, mask))
                total = total + beta * l_opd
                logs["loss/opd"] = l_opd.detach()
            if cfg.sdpg.alpha > 0:
                l_k = agg(obj.unnormalized_kl(logp, ref_logp, cfg.sdpg.ref_kl))
                total = total + cfg.sdpg.alpha * l_k
                logs["loss/ref_kl"] = l_k.detach()

        if cfg.method == "opsd":
            t_logits = self._teacher_logits(self.reference, sb, rows)
            jsd = obj.opsd_jsd(out.logits.float(), t_logits.float(), beta=cfg.opsd.beta, temperature=T)
            l_opsd = agg(to_grid(jsd, mask))
            total = total + l_opsd
            logs["loss/policy"] = l_opsd.detach()
        return total, logs

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict:
        cfg, acc = self.cfg, self.s.accelerator
        t0 = time.time()
        self.model.train()
        if self.rlsd_teacher is not None and self.step % cfg.rlsd.sync_every == 0:
            self.rlsd_teacher.load_state_dict(acc.unwrap_model(self.model).state_dict())
        sb, logs = self.rollout()
        B = sb.input_ids.shape[0]
        n_mb = cfg.optim.mini_batches
        micro = cfg.optim.micro_batch_size or B
        mb_rows = torch.arange(B).chunk(n_mb)
        old_logp = None
        if n_mb > 1:  # several updates per rollout batch: ratios against the sampling policy
            old_logp = sb.sample_logprobs.to(self.device)
        sums: dict[str, float] = {}
        finite = True
        for rows_mb in mb_rows:
            mask_mb = sb.response_mask[rows_mb]
            norm = {"tokens": _all_sum(mask_mb.sum().reshape(1))[0].clamp(min=1),
                    "seqs": _all_sum(torch.tensor([float(len(rows_mb))], device=self.device))[0]}
            self.optimizer.zero_grad(set_to_none=True)
            for rows in rows_mb.split(micro):
                rows = rows.to(self.device)
                loss, parts = self.micro_loss(sb, rows, None if old_logp is None else old_logp[rows], norm)
                loss.backward()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / n_mb
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / n_mb
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if _distributed():
                flat = torch.cat([g.flatten() for g in grads])
                torch.distributed.all_reduce(flat)  # losses use global normalisers: sum
                offset = 0
                for g in grads:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm)
            if not (math.isfinite(sums.get("loss", 0.0)) and torch.isfinite(gnorm)):
                finite = False
                self.optimizer.zero_grad(set_to_none=True)
                break
            self.optimizer.step()
            self.scheduler.step()
        # metrics that are sums over processes of per-process shares
        for k in sums:  # every logged part is this process's share of a global mean
            sums[k] = float(_all_sum(torch.tensor([sums[k]], device=self.device))[0])
        logs.update(sums)
        logs["grad_norm"] = float(gnorm)
        if cfg.uses_sdpg:
            logs["sched/beta"] = obj.sdpg_beta(self.step, beta_base=cfg.sdpg.beta_base, t_warm=cfg.sdpg.t_warm,
                                               t_decay=cfg.sdpg.t_decay, total_steps=cfg.sdpg.total_steps or cfg.steps)
        if cfg.method == "rlsd":
            logs["sched/lambda"] = obj.rlsd_lambda(self.step, cfg.rlsd.lambda_init, cfg.rlsd.lambda_decay_steps)
        logs["lr"] = self.scheduler.get_last_lr()[0]
        dt = time.time() - t0
        n_tok = float(_all_sum(sb.response_mask.sum().reshape(1))[0])
        logs["perf/step_time"] = dt
        logs["perf/tokens_per_s"] = n_tok / max(dt, 1e-9)
        if torch.cuda.is_available():
            logs["perf/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if not finite:
            self.bad_steps += 1
            logs["nonfinite_skipped"] = 1.0
            log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", self.step, self.bad_steps)
        else:
            self.bad_steps = 0
        return logs


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Run ``cfg`` to completion (or resume it); returns the run folder."""
    from trainer.state import load_trainer_state, save_checkpoint_fn
    from trainer.probes import make_probe_set, run_builtin_probes

    setup = prepare(cfg, resume=resume)  # validates everything before any work
    acc = setup.accelerator
    run_dir = setup.run_dir
    tr = Trainer(cfg, setup)
    start_step = 0
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            start_step = load_trainer_state(tr, ckpt.path)
            log.info("resuming %s from %s (step %d)", run_dir, ckpt.path.name, start_step)
        else:
            log.warning("no complete checkpoint in %s; starting from step 0", run_dir)
    tr.step = start_step
    writer = None
    records = make_probe_set(setup.task.test_examples(), tr.tok, cfg.probe.n_prompts)
    if acc.is_main_process:
        writer = RunWriter(run_dir, config_to_dict(cfg), resume=resume, resume_step=start_step)
        writer.write_probe_set(records)
    run_name = run_dir.name
    test_examples = setup.task.test_examples()[: cfg.eval.n]
    tb = _tensorboard(cfg, run_dir) if acc.is_main_process else None

    def evaluate_now(step: int) -> dict:
        unwrapped = acc.unwrap_model(tr.model)
        res = evaluate(unwrapped, tr.tok, setup.task, test_examples, k=cfg.eval.k,
                       temperature=cfg.eval.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
                       batch_size=cfg.eval.batch_size, seed=cfg.seed)
        return res.as_metrics()

    def probe_now(step: int) -> dict:
        df = run_builtin_probes(acc.unwrap_model(tr.model), tr.tok, records, run=run_name, step=step,
                                greedy=cfg.probe.greedy, chunk_size=cfg.probe.chunk_size,
                                max_new_tokens=cfg.rollout.max_new_tokens)
        writer.log_probes(df)
        ref = df[(df.split == "reference") & (df.head == -1) & (df.ref_layer == -1)]
        out = {}
        for l in setup.oisd_layers or [max(1, setup.num_layers // 2)]:
            for m in ("top1_agree", "lens_js", "attn_js_final"):
                v = ref[(ref.layer == l) & (ref.metric == m)].value
                if len(v):
                    out[f"probe/{m}/layer{l}"] = float(v.iloc[0])
        return out

    try:
        if start_step == 0 and acc.is_main_process:
            first = {}
            if cfg.eval_every:
                first.update(evaluate_now(0))
            if cfg.probe_every:
                first.update(probe_now(0))
            if first:
                writer.log_metrics(0, first)
        bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc=f"train {cfg.method}",
                   disable=not (cfg.logging.progress and acc.is_main_process), dynamic_ncols=True)
        for _ in bar:
            logs = tr.train_step()
            tr.step += 1
            k = tr.step
            if tr.bad_steps >= cfg.optim.max_bad_steps:
                if writer:
                    writer.log_metrics(k, logs)
                    writer.set_status("failed", error=f"{tr.bad_steps} consecutive non-finite steps")
                raise SystemExit(f"error: stopped after {tr.bad_steps} consecutive non-finite steps")
            if acc.is_main_process:
                if cfg.eval_every and (k % cfg.eval_every == 0 or k == cfg.steps):
                    logs.update(evaluate_now(k))
                if cfg.probe_every and (k % cfg.probe_every == 0 or k == cfg.steps):
                    logs.update(probe_now(k))
                writer.log_metrics(k, logs)
                if tb is not None:
                    for key, v in logs.items():
                        tb.add_scalar(key, v, k)
                bar.set_postfix(reward=f"{logs['reward']:.2f}", acc=f"{logs['accuracy']:.2f}",
                                ent=f"{logs.get('entropy', 0):.2f}")
            if k % cfg.checkpoint_every == 0 or k == cfg.steps:
                acc.wait_for_everyone()
                if acc.is_main_process:
                    write_checkpoint(run_dir, k, save_checkpoint_fn(tr, k), keep_last=cfg.keep_last)
                acc.wait_for_everyone()
        if writer:
            writer.set_status("finished")
    except BaseException as exc:
        if writer and not isinstance(exc, SystemExit):
            writer.set_status("failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        raise
    finally:
        if tb is not None:
            tb.close()
    if acc.is_main_process:
        print(f"run finished: {run_dir}  (next: oisd probe {run_dir}; oisd dashboard {run_dir.parent})")
    return run_dir


def _tensorboard(cfg: TrainConfig, run_dir: Path):
    if not cfg.logging.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("logging.tensorboard is on but tensorboard is not installed (pip install 'oisd-workbench[tensorboard]')")
        return None
    return SummaryWriter(str(run_dir / "events"))
