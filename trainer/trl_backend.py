"""The TRL backend: every method inside TRL's ``GRPOTrainer`` (vLLM, DeepSpeed, FSDP, PEFT).

``oisd train --backend trl --config oisd ...`` (or ``backend: trl`` in the config) trains
with TRL's trainer, its generation (``transformers`` generate, or vLLM with
``trl.use_vllm``), its optimizer, scheduler, gradient accumulation, checkpointing and
process handling, and this project's losses: :class:`SelfDistillGRPOTrainer` replaces
only ``_compute_loss`` with :meth:`trainer.loss.LossComputer.micro_loss`, the same
forward, chunked vocabulary pass and per-method composer (:mod:`trainer.methods`) the
built-in backend runs. The hinted teacher prompts ride along with TRL's batch.

:class:`RunFolderCallback` writes the run folder every other part reads: run.json
(``backend: trl``, the TRL version), metrics.jsonl under this project's names, the
probe set, probes.parquet and probe_samples.parquet every ``probe_every`` steps (the
shared built-in probes), evaluation every ``eval_every`` steps, and
``checkpoints/step-N`` (HF model + tokenizer + manifest) every ``checkpoint_every``
steps, which ``oisd probe``, ``oisd compare``, ``oisd eval`` and the dashboard read as
they are. TRL's own resumable checkpoints go to ``<run_dir>/trl/``; ``--resume``
continues from the newest through TRL's ``resume_from_checkpoint``.

For Python users::

    from trainer.trl_backend import SelfDistillGRPOTrainer
    trainer = SelfDistillGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...),
                                     train_dataset=..., workbench_config=load_config("oisd"))

The dataset needs a ``teacher_prompt`` column for methods with a hinted teacher.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from pathlib import Path

import torch

from trainer.batching import scored_positions
from trainer.config import OPTIMIZERS
from trainer.loss import LossComputer, StepBatch
from trainer.recorder import RunRecorder
from trainer.lr_warmup import warmup_schedule
from workbench.errors import ConfigError

log = logging.getLogger(__name__)

try:  # TRL is an optional extra: pip install -e '.[trl]'
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - the error names the extra
    raise ConfigError("backend 'trl' needs TRL: pip install -e '.[trl]'") from exc

# Our aggregation -> TRL's loss_type of the same normaliser.
TRL_LOSS_TYPES = {"token_mean": "dapo", "seq_mean_token_mean": "grpo", "seq_mean_token_sum_norm": "dr_grpo"}
# TRL's log keys -> this project's metric names (the rest keep TRL's names).
RENAMES = {"rewards/accuracy/mean": "accuracy", "learning_rate": "lr", "step_time": "perf/step_time"}
DROPPED = {"epoch", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second",
           "train_loss", "num_tokens", "rewards/accuracy/std"}


def trl_version() -> str:
    return importlib.metadata.version("trl")


class SelfDistillGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` whose loss is the method's composer (:mod:`trainer.methods`).

    Args:
        workbench_config: the run's :class:`~trainer.config.TrainConfig` (method, its
            coefficients, OISD layers, chunking).
        reference: the frozen initial model, when a term uses it (SDPG's L_K, OPSD's
            teacher, a KL to the reference); None otherwise.
        *args, **kwargs: ``GRPOTrainer``'s. ``args.beta`` must be 0 (the KL to the
            reference is ``grpo.kl_coef``, computed by the composer).
    """

    def __init__(self, *args, workbench_config, reference: torch.nn.Module | None = None,
                 oisd_layers: list[int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.beta != 0.0:
            raise ConfigError("SelfDistillGRPOTrainer: set GRPOConfig.beta = 0 and grpo.kl_coef instead")
        if reference is not None:
            reference.to(self.accelerator.device).eval().requires_grad_(False)
        self.workbench_config = workbench_config
        self.loss_computer = LossComputer.build(workbench_config, self.model, self.processing_class, self.accelerator,
                                                reference=reference, oisd_layers=oisd_layers)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The built-in backend's warm-up (:func:`trainer.lr_warmup.warmup_schedule`), not HF's
        ``constant_with_warmup``, whose first update runs at rate 0."""
        if self.lr_scheduler is None:
            self.lr_scheduler = warmup_schedule(optimizer or self.optimizer, self.workbench_config.optim.warmup_steps)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _save_optimizer_and_scheduler(self, output_dir):
        """TRL's checkpoint (``trl/checkpoint-N``) also holds the frozen teacher, when the
        method has one (``MethodSpec.needs_frozen_copy``), before ``trainer_state.json``, which
        HF writes last: a resume restores it as the built-in backend's does
        (:func:`trainer.state.load_frozen_teacher`), not the start model until the next sync."""
        super()._save_optimizer_and_scheduler(output_dir)
        teacher = self.loss_computer.frozen_teacher
        if teacher is not None and self.args.should_save:
            from trainer.state import save_frozen_teacher

            save_frozen_teacher(teacher, Path(output_dir))

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        # TRL's output rows follow its input rows: each row's hinted prompt rides along.
        out["teacher_prompts"] = [str(row.get("teacher_prompt", "")) for row in inputs]
        return out

    def _normalisers(self, inputs, batch: int) -> dict[str, torch.Tensor]:
        """Ours in TRL's terms, so that every term shares the GRPO term's normaliser:
        tokens = TRL's dapo normaliser (the generation batch's completion tokens over
        processes, per accumulation window), sequences = this micro-batch times the
        accumulation steps (TRL's ``grpo`` / ``dr_grpo`` division)."""
        ga = self.current_gradient_accumulation_steps if self.model.training else 1
        tokens = inputs["num_items_in_batch"].float().clamp(min=1.0) / self.accelerator.num_processes
        if self.model.training:
            tokens = tokens * ga / self.args.steps_per_generation
        device = self.accelerator.device
        return {"tokens": tokens.to(device), "seqs": torch.tensor(float(batch * ga), device=device)}

    def _compute_loss(self, model, inputs):
        lc = self.loss_computer
        step = self.state.global_step
        lc.begin_step(step)
        inputs = _grouped_by_prompt(inputs)
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        mask = inputs["completion_mask"]
        width = prompt_ids.shape[1]
        batch = StepBatch(
            input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
            attention_mask=torch.cat([inputs["prompt_mask"], mask], dim=1),
            scored=scored_positions(mask, width), response_mask=mask.float(),
            sample_logprobs=inputs.get("old_per_token_logps"), advantages=inputs["advantages"].float(),
            teacher_prompts=list(inputs["teacher_prompts"]), prompt_width=width,
        )
        rows = torch.arange(len(mask), device=mask.device)
        norm = self._normalisers(inputs, len(mask))
        # Through `model` (the prepared DDP module or DeepSpeed engine): it reduces the gradients.
        loss, logs, terms = lc.micro_loss(batch, rows, inputs.get("old_per_token_logps"), norm, step, engine=model)
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            for name, share in lc.gradient_shares(terms, step).items():
                self._metrics[mode][name].append(share)
            for name, weight in lc.spec.schedule(lc.cfg, step).items():  # sched/beta, sched/lambda
                self._metrics[mode][name].append(weight)
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        for name, value in logs.items():
            # Each value is this micro-batch's share of a global mean times the process count
            # (the normalisers are TRL's, per process, and DDP averages the gradients over
            # processes): averaged over processes it is the share itself. TRL averages the
            # list over the accumulation window, hence the ga factor.
            mean = self.accelerator.reduce(torch.as_tensor(value, device=mask.device).float().reshape(1),
                                           reduction="mean")
            self._metrics[mode][name].append(float(mean[0]) * ga)
        return loss


def _grouped_by_prompt(inputs: dict) -> dict:
    """The micro-batch with rows ordered by prompt. TRL shuffles its generation batch, so a
    group's rows are scattered; the teachers and the reference score each run of equal
    consecutive prompts once (``trainer.forward.shared_prompt_hidden``), so grouping them
    again saves those forwards. Every term is a sum or mean over rows: the order changes
    the loss only by float rounding."""
    prompts = inputs.get("teacher_prompts") or [""] * len(inputs["prompt_ids"])
    ids = inputs["prompt_ids"].tolist()
    order = sorted(range(len(ids)), key=lambda i: (prompts[i], ids[i]))
    index = torch.tensor(order, device=inputs["prompt_ids"].device)
    out = dict(inputs)
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == len(order):
            out[key] = value[index]
    out["teacher_prompts"] = [prompts[i] for i in order]
    return out


def build_grpo_config(cfg, output_dir: Path, num_processes: int) -> GRPOConfig:
    """TRL's config from ours: the same batch, lengths, clip, optimizer and schedule;
    TRL's scale options (vLLM, gradient checkpointing, bf16) forwarded as they are."""
    P, G = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    if cfg.optim.mini_batches != 1:
        raise ConfigError("config key 'optim.mini_batches': the TRL backend takes one update per rollout batch "
                          "(use TRL's num_iterations through the built-in backend's mini_batches instead)")
    if (P * G) % num_processes:
        raise ConfigError(f"config key 'rollout.prompts_per_step': {P} x {G} sequences do not divide over "
                          f"{num_processes} processes")
    per_device = P * G // num_processes
    micro = cfg.optim.micro_batch_size or per_device
    if per_device % micro:
        raise ConfigError(f"config key 'optim.micro_batch_size': {micro} does not divide the {per_device} "
                          "sequences per process")
    t = cfg.trl
    return GRPOConfig(
        output_dir=str(output_dir), use_cpu=not torch.cuda.is_available(), seed=cfg.seed, max_steps=cfg.steps,
        per_device_train_batch_size=micro, gradient_accumulation_steps=per_device // micro,
        num_generations=G, num_iterations=1, max_completion_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k or None,
        beta=0.0, loss_type=TRL_LOSS_TYPES[cfg.grpo.loss_type], epsilon=cfg.grpo.eps_low,
        epsilon_high=cfg.grpo.eps_high, scale_rewards=cfg.grpo.scale_rewards,
        learning_rate=cfg.optim.lr, adam_beta1=cfg.optim.beta1, adam_beta2=cfg.optim.beta2,
        weight_decay=cfg.optim.weight_decay, max_grad_norm=cfg.optim.max_grad_norm,
        # TRL validates a scheduler name; create_scheduler above replaces the schedule it names.
        lr_scheduler_type="constant_with_warmup", warmup_steps=cfg.optim.warmup_steps, optim=OPTIMIZERS[cfg.optim.name],
        logging_steps=1, save_strategy="steps", save_steps=cfg.checkpoint_every, save_total_limit=cfg.keep_last,
        report_to="none", disable_tqdm=not cfg.logging.progress, log_completions=False,
        remove_unused_columns=False, shuffle_dataset=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, bf16=cfg.precision.mixed == "bf16", fp16=cfg.precision.mixed == "fp16",
        gradient_checkpointing=t.gradient_checkpointing, use_vllm=t.use_vllm, vllm_mode=t.vllm_mode,
    )


def _metric_name(key: str) -> str | None:
    if key in DROPPED:
        return None
    return RENAMES.get(key, key)


class RunFolderCallback(TrainerCallback):
    """Hands TRL's steps to the :class:`~trainer.recorder.RunRecorder`: each logged step's
    metrics under this project's names, evaluation and probes when due, and
    ``checkpoints/step-N`` (HF model + tokenizer + manifest)."""

    def __init__(self, recorder: RunRecorder, trainer_ref, *, new_run: bool):
        self.recorder, self.trainer_ref, self.new_run = recorder, trainer_ref, new_run

    def _model(self):
        trainer = self.trainer_ref()
        return trainer.accelerator.unwrap_model(trainer.model)

    def _sharded(self) -> bool:
        from trainer.distributed import is_zero3

        return is_zero3(self._model())

    def _full_model(self):
        """A context yielding the unwrapped policy with its full weights. Under DeepSpeed
        ZeRO-3 every process must enter it (it gathers the shards and lifts ZeRO's hooks,
        as TRL does for generation); otherwise it is the policy as it is."""
        from contextlib import nullcontext

        from trainer.distributed import is_zero3

        trainer = self.trainer_ref()
        model = self._model()
        if not is_zero3(model):
            return nullcontext(model)
        from trl.models.utils import unwrap_model_for_generation

        return unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.new_run and self.recorder.extras_due(0):
            with self._full_model() as model:  # every process: a collective under ZeRO-3
                self.recorder.start(model, every_process=self._sharded())

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Every process gets here; only the main one writes. Under ZeRO-3 the others take
        # part in gathering the weights for evaluation, probes and checkpoints.
        if not logs or "reward" not in logs:
            return  # the end-of-training summary carries no reward: not a step
        step = state.global_step
        values = {name: float(v) for k, v in logs.items()
                  if (name := _metric_name(k)) is not None and isinstance(v, (int, float))}
        if self.recorder.extras_due(step):
            with self._full_model() as model:
                values.update(self.recorder.extras(model, step, every_process=self._sharded()))
        self.recorder.log(step, values)
        if self.recorder.checkpoint_due(step):
            self._checkpoint(step)

    def _checkpoint(self, step: int) -> None:
        """``checkpoints/step-N``: full HF weights. Under ZeRO-3 every process takes part
        in ``accelerator.get_state_dict`` (it gathers the shards; only the main process
        receives them) and the main process writes them. A LoRA policy (``trl.lora_r``) is
        written merged, its adapter in ``step-N/adapter/``, so that every reader (``oisd
        probe``, drift, ``oisd eval``) opens a full model; the live adapters stay unmerged."""
        from accelerate.utils import is_peft_model

        from trainer.distributed import is_zero3

        trainer = self.trainer_ref()
        model, tok = self._model(), self.recorder.setup.tokenizer
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if is_zero3(model) else None

        def save(folder):
            if is_peft_model(model):
                from workbench.models.adapters import merged_lora_state_dict

                full = merged_lora_state_dict(model, state_dict)
                model.get_base_model().save_pretrained(folder, state_dict=full)
                model.save_pretrained(Path(folder) / "adapter", state_dict=state_dict)
            else:
                model.save_pretrained(folder, state_dict=state_dict)
            tok.save_pretrained(folder)

        self.recorder.checkpoint(step, save)


def task_data(cfg, task) -> tuple:
    """``(dataset, reward_funcs)``: TRL's train dataset and reward functions for ``task``, as
    the built-in backend sees it.

    The dataset holds the task's training examples (``prompt``, ``teacher_prompt`` and
    ``example``, the row's index, which TRL hands back to the reward functions); the rewards
    are the task's verifier (1 correct, 0 wrong) and, when ``grpo.format_bonus`` > 0, the
    bonus for an extractable answer.
    """
    from datasets import Dataset

    examples = task.train_examples()
    dataset = Dataset.from_list([{"prompt": e.prompt, "teacher_prompt": e.teacher_prompt, "example": i}
                                 for i, e in enumerate(examples)])

    def accuracy(prompts, completions, example, **kwargs):
        """The task's verifier (1 correct, 0 wrong), as the built-in backend scores rollouts."""
        return [float(task.reward(c, examples[int(i)])) for c, i in zip(completions, example)]

    funcs = [accuracy]
    if cfg.grpo.format_bonus > 0:
        def format_bonus(prompts, completions, **kwargs):
            return [cfg.grpo.format_bonus * float(task.extract_answer(c) is not None) for c in completions]

        funcs.append(format_bonus)
    return dataset, funcs


def last_complete_checkpoint(trl_dir: Path) -> str | None:
    """The newest of TRL's ``checkpoint-N`` folders that was written to the end (HF writes its
    ``trainer_state.json`` last; a process killed while writing leaves a folder without it,
    from which TRL's resume would fail); None when there is none."""
    if not trl_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in trl_dir.iterdir()
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / "trainer_state.json").is_file()]
    return str(max(found)[1]) if found else None


def train_trl(cfg, setup, *, resume: bool = False) -> Path:
    """The TRL backend (``backend: trl``): train ``cfg`` with TRL's ``GRPOTrainer`` into the
    same run folder as the built-in backend. Called by :func:`trainer.run.train` after
    the shared validation; TRL's batch shape is checked here, before any work.

    Raises:
        WorkbenchError: bad input, before any work.
    """
    import weakref

    from transformers import PrinterCallback

    from workbench.storage.paths import is_run_folder

    setup.model.config.use_cache = True  # TRL's generate decodes with a KV cache
    acc = setup.accelerator
    trl_dir = setup.run_dir / "trl"
    args = build_grpo_config(cfg, trl_dir, acc.num_processes)
    dataset, funcs = task_data(cfg, setup.task)
    peft_config = None
    if cfg.trl.lora_r:
        try:
            from peft import LoraConfig
        except ImportError:
            raise ConfigError("config key 'trl.lora_r': LoRA needs peft (pip install peft)") from None
        peft_config = LoraConfig(r=cfg.trl.lora_r, lora_alpha=cfg.trl.lora_alpha, lora_dropout=cfg.trl.lora_dropout,
                                 target_modules=cfg.trl.lora_target_modules, task_type="CAUSAL_LM")
    resume_from, resume_step = None, -1
    if resume:
        resume_from = last_complete_checkpoint(trl_dir)
        if resume_from is not None:
            resume_step = int(re.search(r"checkpoint-(\d+)$", resume_from).group(1))
            log.info("resuming %s from TRL's %s (step %d)", setup.run_dir, Path(resume_from).name, resume_step)
        if resume_step >= cfg.steps:
            if acc.is_main_process:
                log.info("%s already finished its %d steps; nothing to train", setup.run_dir, cfg.steps)
            return setup.run_dir
    resume = resume and is_run_folder(setup.run_dir)  # --resume of nothing starts a new run
    trainer = SelfDistillGRPOTrainer(model=setup.model, reward_funcs=funcs, args=args, train_dataset=dataset,
                                     processing_class=setup.tokenizer, peft_config=peft_config,
                                     workbench_config=cfg, reference=setup.reference, oisd_layers=setup.oisd_layers)
    trainer.remove_callback(PrinterCallback)
    if resume_from is not None and trainer.loss_computer.frozen_teacher is not None:
        from trainer.state import load_frozen_teacher

        load_frozen_teacher(trainer.loss_computer.frozen_teacher, Path(resume_from), trainer.accelerator.device)
    recorder = RunRecorder(cfg, setup, resume=resume, resume_step=resume_step,
                           facts={"trl_version": trl_version()})
    trainer.add_callback(RunFolderCallback(recorder, weakref.ref(trainer), new_run=not resume))
    try:
        trainer.train(resume_from_checkpoint=resume_from)
        recorder.finish(trainer.accelerator.unwrap_model(trainer.model))
    except BaseException as exc:
        recorder.fail(exc)
        raise
    if acc.is_main_process:
        print(f"run finished: {setup.run_dir}  (backend trl {trl_version()}; next: oisd probe {setup.run_dir})")
    return setup.run_dir
