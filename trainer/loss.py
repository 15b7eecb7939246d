"""The loss of one micro-batch, for every method and every backend.

:class:`LossComputer` runs the policy forward (hidden states, never ``(n, V)`` logits),
the teachers' and the reference's forwards, every full-vocabulary term in one chunked
pass, and hands the per-token grids to the method's composer (:mod:`trainer.methods`).
The built-in loop (:class:`trainer.loop.Trainer`) and the TRL backend
(:mod:`trainer.trl_backend`) both call :meth:`LossComputer.micro_loss`: one
implementation of every term.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from trainer import objectives as obj
from trainer.batching import teacher_prompts, to_grid
from trainer.chunked import chunked_rows
from trainer.distributed import full_parameters, full_shape, is_zero3
from trainer.forward import policy_forward, readout, shared_prompt_hidden, unique_prompts
from workbench.models.readout import vocab_chunk_rows
from trainer.methods import LossInputs, MethodSpec, Terms, gradient_shares, stop_token_ids

log = logging.getLogger(__name__)


@dataclass
class StepBatch:
    """One step's rollouts on this process, with everything the loss needs."""

    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    scored: torch.Tensor  # (B, P + R) bool
    response_mask: torch.Tensor  # (B, R)
    sample_logprobs: torch.Tensor | None  # (B, R) log-probs under the sampling policy
    advantages: torch.Tensor  # (B,)
    teacher_prompts: list[str]  # (B,) hinted prompts (methods with a privileged teacher)
    prompt_width: int


@dataclass
class LossComputer:
    """Everything the loss reads, and every piece around it that a backend would
    otherwise re-implement: the resolved OISD layers, selective attention, the frozen
    teacher copy and its re-sync, the gradient-share measurement.

    Build it with :meth:`build`; call :meth:`begin_step` once per optimizer step, then
    :meth:`micro_loss` per micro-batch and :meth:`gradient_shares` on the first one.

    Attributes:
        frozen_teacher: the method's frozen-copy teacher (``MethodSpec.needs_frozen_copy``: RLSD's),
            re-synced by :meth:`begin_step`; None for the other methods.
        reference: the frozen initial model, or None (only when a term uses it).
        accelerator: for ``autocast`` and ``unwrap_model``.
    """

    cfg: object
    spec: MethodSpec
    model: torch.nn.Module
    tokenizer: object
    accelerator: object
    oisd_layers: list[int]
    num_layers: int
    device: torch.device
    vocab_size: int
    stop_ids: tuple[int, ...] = ()  # the tokenizer's stop tokens (stop_token_ids), resolved once
    reference: torch.nn.Module | None = None
    frozen_teacher: torch.nn.Module | None = None
    _synced_step: int = -1
    _shared_step: int = -1
    _zero3_noted: bool = False

    @classmethod
    def build(cls, cfg, model: torch.nn.Module, tokenizer, accelerator, *, reference: torch.nn.Module | None = None,
              oisd_layers: list[int] | None = None) -> "LossComputer":
        """The loss of ``cfg.method`` for ``model`` (plain or wrapped by ``accelerator``).

        Resolves the OISD layers (unless given, already resolved), switches the policy
        to selective attention when OISD aligns attention, and makes the frozen teacher
        copy when the method's teacher is one (:mod:`trainer.methods` says which).
        """
        from trainer.forward import enable_selective_attention, num_layers
        from trainer.setup import resolve_layers

        spec = cfg.spec
        policy = accelerator.unwrap_model(model)
        L = num_layers(policy)
        if oisd_layers is None:
            oisd_layers = resolve_layers(cfg.oisd.layers, L) if spec.oisd else []
        if spec.uses_attention(cfg):
            enable_selective_attention(policy)
        frozen = copy.deepcopy(policy).requires_grad_(False).eval() if spec.needs_frozen_copy else None
        vocab = full_shape(policy.get_output_embeddings().weight)[0]  # ZeRO-3: the tensor is a 0-element shard
        return cls(cfg, spec, model, tokenizer, accelerator, list(oisd_layers), L, accelerator.device, vocab,
                   stop_token_ids(tokenizer), reference=reference, frozen_teacher=frozen)

    def begin_step(self, step: int) -> None:
        """Before optimizer step ``step``'s first forward: the frozen teacher is re-synced from
        the policy every ``spec.sync_every(cfg)`` steps (at step 0 it is the initial model as
        built). Idempotent within a step."""
        if self.frozen_teacher is None or step == self._synced_step:
            return
        if step % self.spec.sync_every(self.cfg) == 0:
            policy = self.accelerator.unwrap_model(self.model)
            if is_zero3(policy):
                # The copy is a full replica (made before DeepSpeed partitioned the policy);
                # the policy's shards are gathered on every process and copied in.
                source = dict(policy.named_parameters())
                with torch.no_grad(), full_parameters(source.values()):
                    for name, p in self.frozen_teacher.named_parameters():
                        p.copy_(source[name].data)
            else:
                self.frozen_teacher.load_state_dict(policy.state_dict())
        self._synced_step = step

    def gradient_shares(self, terms: Terms, step: int) -> dict[str, float]:
        """``{grad_share/<term>: share}`` (:func:`~trainer.methods.gradient_shares`) once per
        step, every ``logging.grad_share_every`` steps (and at step 0); ``{}`` otherwise.
        Call it on the step's first micro-batch, before its backward."""
        every = self.cfg.logging.grad_share_every
        if not every or step % every or step == self._shared_step:
            return {}
        self._shared_step = step
        params = [p for p in self.model.parameters() if p.requires_grad]
        if any(hasattr(p, "ds_id") for p in params):
            if not self._zero3_noted:
                log.info("grad_share/* is not measured under DeepSpeed ZeRO-3 (its parameters are shards)")
                self._zero3_noted = True
            return {}
        return {f"grad_share/{name}": share for name, share in gradient_shares(terms, params).items()}

    def _frozen_hidden(self, model, sb: StepBatch, rows: torch.Tensor, hinted: bool) -> torch.Tensor:
        """A frozen scorer's final hidden states ``(n, d)`` on the student's response tokens,
        no grad; its logits are read out chunk by chunk later.

        ``hinted``: after the teacher prompt (student prompt, sentinel, hint); otherwise
        after the student's own prompt (the reference). Each group's prompt runs once
        (:func:`~trainer.forward.shared_prompt_hidden`).
        """
        responses, response_mask = sb.input_ids[rows, sb.prompt_width:], sb.response_mask[rows]
        if hinted:
            ids, mask, prompt_of_row = teacher_prompts(self.tokenizer, [sb.teacher_prompts[i] for i in rows.tolist()])
        else:
            ids, mask, prompt_of_row = unique_prompts(sb.input_ids[rows, : sb.prompt_width],
                                                      sb.attention_mask[rows, : sb.prompt_width])
        with torch.no_grad(), self.accelerator.autocast():
            return shared_prompt_hidden(model, ids.to(self.device), mask.to(self.device),
                                        prompt_of_row.to(self.device), responses, response_mask)

    def vocab_chunk_size(self) -> int:
        """Rows per chunk of the full-vocabulary terms (``optim.vocab_chunk_size``, or
        :func:`~workbench.models.readout.vocab_chunk_rows` for this device)."""
        size = self.cfg.optim.vocab_chunk_size
        return vocab_chunk_rows(self.vocab_size, self.device, "loss") if size is None else size

    def _vocab_terms(self, think_layers: list[int], teacher_heads: dict[str, torch.nn.Module]):
        """The per-token function of every full-vocabulary term, for :func:`~trainer.chunked.chunked_rows`.

        It reads the policy's logits ``z`` from the final hidden state once per chunk and
        computes from them: log pi_theta of the sampled token and the entropy; OISD's
        ``J^l = JSD(p^l, SG[p^L])`` for each layer in ``think_layers``; the method's
        teacher term (``spec.teacher_term`` of the teacher's logits, read out by its own
        ``lm_head`` under ``no_grad``); the reference's log-prob of the sampled token.
        Outputs are ``(m,)`` per chunk.
        """
        cfg, T, spec = self.cfg, self.cfg.rollout.temperature, self.spec
        policy = self.accelerator.unwrap_model(self.model)
        head = policy.get_output_embeddings()
        lens = readout(policy, detach=cfg.oisd.detach_readout) if think_layers else None

        def terms(r: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            z = head(r["final"])  # (m, V) the acting policy's logits
            out = dict(zip(("logp", "entropy"), obj.sampled_token_logprobs(z, r["tokens"], T)))
            for l in think_layers:
                out["lens", l] = obj.oisd_logit_alignment(lens(r["layer", l], l), z.detach(), temperature=T)
            with torch.no_grad():
                q = {name: h(r[name]) for name, h in teacher_heads.items()}  # (m, V) each
            if "ref" in q:
                out["ref_logp"], _ = obj.sampled_token_logprobs(q["ref"], r["tokens"], T, with_entropy=False)
            if "teacher" in q:
                out["teacher"] = spec.teacher_term(z, q["teacher"], r["tokens"], cfg, T)
            return out

        return terms


    def micro_loss(self, sb: StepBatch, rows: torch.Tensor, old_logp: torch.Tensor | None,
                   norm: dict[str, float], step: int, *, engine: torch.nn.Module | None = None
                   ) -> tuple[torch.Tensor, dict, Terms]:
        """The loss of one micro-batch (rows of the step batch), already divided by the
        global normaliser of its mini-batch, so micro-batch losses add up exactly.

        Forward, terms, ``spec.loss``: one policy forward returns hidden states (never
        ``(n, V)`` logits), the teachers' forwards return theirs, every full-vocabulary
        term is computed in one chunked pass (:meth:`_vocab_terms`), and the method's
        composer (:mod:`trainer.methods`) adds up the named terms.

        Args:
            engine: the prepared model (the DDP module, the DeepSpeed engine, an FSDP2
                root) when a distributed engine must see the forward: the whole
                computation then runs as the forward of ``engine``
                (:func:`run_as_forward`), so that the engine reduces the gradients
                in backward (DDP), gathers sharded weights (ZeRO-3, FSDP2) and
                registers the loss for its backward. None: run it directly (the
                built-in backend reduces gradients itself).

        Returns:
            ``(loss, logs, terms)``.
        """
        if engine is not None:
            return run_as_forward(engine, lambda: self.micro_loss(sb, rows, old_logp, norm, step))
        cfg, spec = self.cfg, self.spec
        ids, am, scored = sb.input_ids[rows], sb.attention_mask[rows], sb.scored[rows]
        mask = sb.response_mask[rows]
        schedules = spec.schedule(cfg, step)
        S = self.oisd_layers
        think_layers = S if spec.uses_lens(cfg) else []
        attn_layers = S + [self.num_layers] if spec.uses_attention(cfg) else []
        with self.accelerator.autocast():
            out = policy_forward(self.model, ids, am, scored, hidden_layers=think_layers, attn_layers=attn_layers,
                                 attn_query_stride=cfg.oisd.attn_query_stride, return_logits=False)
        tokens = ids[out.index[0], out.index[1] + 1]  # (n,) the response token each scored row predicts

        # Rows the full-vocabulary terms read: the policy's (with gradient), the OISD layers',
        # and each frozen scorer's final hidden state (no gradient), all (n, d).
        scorers = {}  # name -> (model, hinted prompt?)
        if spec.teacher_active(cfg, schedules):
            scorers["teacher"] = (spec.teacher_model(self.model, self.frozen_teacher, self.reference), True)
        if self.reference is not None:  # the reference on the student's own prompt
            scorers["ref"] = (self.reference, False)
        rows_in = {"final": out.final_hidden, "tokens": tokens}
        rows_in |= {("layer", l): out.hidden[l] for l in think_layers}
        heads = {}
        for name, (model, hinted) in scorers.items():
            rows_in[name] = self._frozen_hidden(model, sb, rows, hinted)
            heads[name] = self.accelerator.unwrap_model(model).get_output_embeddings()
        with self.accelerator.autocast():
            vocab = chunked_rows(self._vocab_terms(think_layers, heads), rows_in, self.vocab_chunk_size())
        logp = to_grid(vocab.pop("logp"), mask)  # (b, R)
        ent = to_grid(vocab.pop("entropy"), mask)
        lens = {l: to_grid(vocab.pop(("lens", l)), mask) for l in think_layers}
        grids = {name: to_grid(v, mask) for name, v in vocab.items()}

        attn, attn_rescale = [], 1.0
        if attn_layers:
            n = out.final_hidden.shape[0]
            kept = torch.zeros(n, device=mask.device)
            kept[out.attn_rows] = 1.0
            teacher_a = out.attentions[self.num_layers]
            for l in S:
                k_rows = obj.oisd_attention_alignment(out.attentions[l], teacher_a, cfg.oisd.attn_mode == "per_head")
                full = torch.zeros(n, device=mask.device, dtype=k_rows.dtype)
                full[out.attn_rows] = k_rows
                attn.append(to_grid(full, mask))
            if cfg.oisd.attn_query_stride > 1:
                attn_rescale = obj.attention_query_rescale(mask, to_grid(kept, mask))

        # scale: an aggregate over this micro-batch times (its count / the global count)
        # equals its share of the aggregate over the whole (global) mini-batch.
        unit = "tokens" if cfg.grpo.loss_type == "token_mean" else "seqs"
        scale = (mask.sum() if unit == "tokens" else torch.tensor(float(len(rows)))) / norm[unit]
        x = LossInputs(
            cfg=cfg, logp=logp, old_logp=logp.detach() if old_logp is None else old_logp, mask=mask,
            advantages=sb.advantages[rows], scale=scale,
            aggregate=lambda t: obj.aggregate(t, mask, cfg.grpo.loss_type, cfg.rollout.max_new_tokens) * scale,
            vocab=grids, lens=lens, attn=attn, attn_rescale=attn_rescale, schedules=schedules,
            tokens_share=mask.sum() / norm["tokens"], seq_share=len(rows) / norm["seqs"],
            tokens=sb.input_ids[rows, sb.prompt_width:], stop_ids=self.stop_ids,
        )
        terms = spec.loss(x)
        total = sum((t.coef * t.value for t in terms.values()), torch.zeros((), device=self.device))
        logs = dict(x.logs)
        logs |= {f"loss/{name}": t.value.detach() for name, t in terms.items() if name != "kl"}
        logs["entropy"] = (ent * mask).sum() / norm["tokens"]
        return total, logs, terms



def run_as_forward(engine: torch.nn.Module, fn):
    """``fn()`` run as the forward of ``engine``'s model, through ``engine(...)``.

    A distributed engine does its work around its model's forward: DDP arms its
    gradient all-reduce, DeepSpeed ZeRO-3 and FSDP2 gather sharded parameters and
    register the output for their backward. A loss computed from the unwrapped
    model's pieces (its decoder, then ``lm_head`` chunk by chunk) skips all of that:
    under DDP each process then steps with its own gradients and the processes drift
    apart. Here the model's ``forward`` is swapped for ``fn`` for one call of
    ``engine()`` (the redirection TRL's GRPO and Lightning use), so everything ``fn``
    computes happens inside the engine's forward.

    ``engine`` may be the model itself (one process, or an FSDP2 root module): the call
    then only runs the model's own forward hooks.
    """
    inner = getattr(engine, "module", None)
    target = inner if isinstance(inner, torch.nn.Module) else engine
    own = target.__dict__.get("forward")  # an instance-level forward to put back, if any

    def restore() -> None:
        if own is None:
            target.__dict__.pop("forward", None)
        else:
            target.forward = own

    def redirected(*args, **kwargs):
        restore()  # once in: any nested call of the model's forward is the real one
        return fn()

    target.forward = redirected
    try:
        return engine()
    finally:
        restore()
