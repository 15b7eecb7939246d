"""Typed, validated training configs.

A config is YAML validated into :class:`TrainConfig` (pydantic, strict, unknown keys
forbidden), with ``--set a.b=c`` overrides parsed as YAML scalars. Any problem is a
:class:`~workbench.errors.ConfigError` whose one-line message names the key, raised
before any work starts.

Every field has a one-line description: it is also the reference printed by
``oisd train --help-config``.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer import objectives as obj
from trainer.methods import METHOD_NAMES, METHODS, MethodSpec, spec_of
from trainer.tasks.arithmetic import EMBEDDED_TASK
from workbench.errors import ConfigError
from workbench.storage.paths import WARMSTART_DIR, run_name


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-5`` (no dot) as a string; researchers write learning rates that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

#: The backends, each ``"module:function"`` training a validated config
#: (:func:`trainer.run.train` dispatches here), and those that can shard a model
#: (DeepSpeed or FSDP launches).
BACKENDS = {"builtin": "trainer.loop:train_builtin", "trl": "trainer.trl_backend:train_trl"}
SHARDING_BACKENDS = ("trl",)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class ModelConfig(_Section):
    path: str = Field(WARMSTART_DIR, description="HF model folder (or hub name) to start from")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="parameter dtype; on GPU prefer float32 weights + precision.mixed=bf16"
    )
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="attention kernel for layers whose probabilities are not needed"
    )
    disable_dropout: bool = Field(
        True, description="set every dropout probability to 0 (RL scores the policy deterministically, as TRL does)"
    )


class ArithmeticConfig(_Section):
    # Defaults: the embedded task (trainer.tasks.arithmetic.EMBEDDED_TASK, chosen by measurement).
    n_operands: int = Field(EMBEDDED_TASK["n_operands"], ge=2, le=8, description="numbers per question")
    digits: int = Field(EMBEDDED_TASK["digits"], ge=1, le=4, description="digits per number")
    operators: str = Field(EMBEDDED_TASK["operators"], min_length=1, description="operators drawn from '+-*'")
    n_train: int = Field(EMBEDDED_TASK["n_train"], ge=1, description="training questions")
    n_test: int = Field(EMBEDDED_TASK["n_test"], ge=1, description="held-out questions")
    seed: int = Field(EMBEDDED_TASK["seed"], description="seed of the train/test split (independent of the run seed)")


class DataConfig(_Section):
    path: Optional[str] = Field(
        None, description="JSONL/Parquet file, saved datasets folder or hub name; null = embedded arithmetic task"
    )
    test_path: Optional[str] = Field(None, description="held-out file; null = split test_fraction off `path`")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="held-out share when test_path is null")
    question_column: str = Field("question", description="column holding the question")
    answer_column: str = Field("answer", description="column holding the final answer")
    solution_column: Optional[str] = Field(None, description="optional column with solution steps (teacher hint)")
    split: str = Field("train", description="split name for `datasets` sources")
    limit: Optional[int] = Field(None, ge=1, description="use at most this many training rows")
    arithmetic: ArithmeticConfig = Field(default_factory=ArithmeticConfig)


class RolloutConfig(_Section):
    prompts_per_step: int = Field(8, ge=1, description="prompts per training step")
    group_size: int = Field(8, ge=2, description="G: responses sampled per prompt")
    temperature: float = Field(1.0, gt=0, description="sampling temperature T (also used for log-probs)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="top-k sampling (0 = off)")
    max_new_tokens: int = Field(48, ge=1, description="response length cap")
    dynamic_sampling: bool = Field(
        False, description="drop groups whose rewards are all equal (applies to every method alike)"
    )
    max_resample: int = Field(4, ge=0, description="extra sampling rounds to refill a dynamic-sampling batch")


#: The optimizers either backend builds: ours -> TRL's TrainingArguments.optim.
OPTIMIZERS = {"adamw": "adamw_torch", "sgd": "sgd"}


class OptimConfig(_Section):
    name: Literal[tuple(OPTIMIZERS)] = Field(
        "adamw", description="optimizer: adamw, or plain sgd (no momentum: the update is lr x gradient, what the "
        "multi-process tests compare)")
    lr: float = Field(1e-5, gt=0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.99, ge=0, lt=1, description="AdamW beta2")
    warmup_steps: int = Field(5, ge=0, description="linear learning-rate warm-up (optimizer steps)")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    mini_batches: int = Field(1, ge=1, description="optimizer steps per rollout batch (>1 uses pi_old ratios)")
    micro_batch_size: Optional[int] = Field(
        None, ge=1, description="sequences per forward/backward (gradient accumulation); null = whole mini-batch"
    )
    max_bad_steps: int = Field(5, ge=1, description="stop after this many consecutive non-finite steps")
    vocab_chunk_size: Optional[int] = Field(
        None, ge=0, description="tokens per chunk of every full-vocabulary term (log-probs, OISD JSD, SDPG KL, "
        "OPSD JSD), recomputed in backward; null = 32 MiB of float32 logits per chunk on CPU, 128 MiB on GPU; "
        "0 = no chunking",
    )


class GRPOConfig(_Section):
    scale_rewards: Literal[obj.SCALE_REWARDS] = Field("group", description="advantage normalisation")
    loss_type: Literal[obj.LOSS_TYPES] = Field(
        "token_mean", description="aggregation of per-token losses"
    )
    clip: Literal[obj.CLIP_MODES] = Field("ppo", description="'none' = on-policy REINFORCE surrogate")
    eps_low: float = Field(0.2, ge=0, lt=1, description="lower clip range")
    eps_high: float = Field(0.28, ge=0, description="upper clip range (DAPO clip-higher)")
    dual_clip: Optional[float] = Field(None, gt=1, description="dual-clip constant c for A < 0 (null = off)")
    kl_coef: float = Field(0.0, ge=0, description="coefficient of the KL to the frozen reference")
    kl_estimator: Literal[obj.KL_ESTIMATORS] = Field("k3", description="KL estimator")
    format_bonus: float = Field(0.0, ge=0, description="reward added when an answer can be extracted")


class OISDConfig(_Section):
    layers: list[Union[int, float]] = Field(
        default_factory=lambda: [0.5],
        min_length=1,
        description="selected layers S: block indices 1..L-1 or depth fractions in (0, 1)",
    )
    lambda_logit: float = Field(1.0, ge=0, description="weight of L_think (logit alignment)")
    lambda_attn: float = Field(0.1, ge=0, description="weight of L_attn (attention alignment)")
    weight: Literal[obj.OISD_WEIGHTS] = Field("signed", description="advantage weight w_i")
    attn_mode: Literal["mean_heads", "per_head"] = Field("mean_heads", description="attention alignment form")
    detach_readout: bool = Field(False, description="auxiliary path uses detached final norm and lm_head")
    attn_query_stride: int = Field(1, ge=1, description="keep every k-th response query for attention")


class SDPGConfig(_Section):
    beta_base: float = Field(1e-3, ge=0, description="base weight of the gated reverse KL to the teacher")
    t_warm: int = Field(50, ge=0, description="linear warm-up steps of beta")
    t_decay: int = Field(350, ge=0, description="linear decay steps of beta to 0 at the last step")
    total_steps: Optional[int] = Field(None, ge=1, description="T of the beta schedule; null = `steps`")
    gate: bool = Field(True, description="distil only responses with A > 0")
    kl_clamp: float = Field(20.0, gt=0, description="per-token clamp of the reverse KL")
    alpha: float = Field(1e-3, ge=0, description="weight of L_K, the unnormalised KL to the frozen reference")
    ref_kl: Literal[obj.UNNORMALIZED_KLS] = Field("ufkl", description="form of L_K")
    exclude_eos: bool = Field(
        False, description="zero L_OPD+ where the sampled token is a stop token (the tokenizer's eos id(s)); it "
        "stays in the denominator (the public code's beta_distill_exclude_eos)")
    step_offset: int = Field(
        0, ge=0, description="added to the step index k of the beta schedule; 1 = the public code (its step "
        "counter starts at 1)")
    teacher_temperature: Optional[float] = Field(
        None, gt=0, description="temperature of the teacher's q in L_OPD+; null = rollout.temperature (as the "
        "student); 1.0 = the public code (student logits only divided)")


class RLSDConfig(_Section):
    lambda_init: float = Field(0.5, ge=0, le=1, description="initial mixing weight lambda")
    lambda_decay_steps: int = Field(50, ge=0, description="steps over which lambda decays linearly to 0")
    eps_w: float = Field(0.2, ge=0, lt=1, description="clip of the teacher weight w")
    sync_every: int = Field(10, ge=1, description="re-sync the frozen teacher from the policy every N steps")


class OPSDConfig(_Section):
    beta: float = Field(0.5, gt=0, lt=1, description="generalised JSD mixture weight")


class ProbeConfig(_Section):
    n_prompts: int = Field(16, ge=1, description="size of the fixed probe set (held-out prompts)")
    greedy: bool = Field(True, description="also probe the model's own greedy completions")
    samples_per_prompt: int = Field(
        4, ge=0, description="k sampled completions per probe prompt, verified and probed by outcome "
        "(splits sampled_correct / sampled_wrong); 0 = off")
    sample_temperature: float = Field(1.0, gt=0, description="temperature of the sampled probe completions")
    chunk_size: Optional[int] = Field(None, ge=1, description="positions per chunk of the logit lens (null: ~4M floats)")
    exit_layers: list[Union[int, float]] = Field(
        default_factory=list, description="early exit at these layers (blocks 1..L or depth fractions; [] = off): "
        "exit_accuracy, exit_agree, exit_length of greedy decoding from block l, one decode per layer")


class EvalConfig(_Section):
    n: int = Field(200, ge=1, description="held-out questions per evaluation")
    k: int = Field(4, ge=1, description="samples per question for mean@k")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of mean@k")
    batch_size: int = Field(128, ge=1, description="questions per generation batch")


class LoggingConfig(_Section):
    tensorboard: bool = Field(False, description="also write TensorBoard events under events/")
    grad_share_every: int = Field(
        10, ge=0, description="log grad_share/<term> (each loss term's share of the gradient norm, measured on one "
        "micro-batch) every N steps; 0 = off")
    progress: bool = Field(True, description="show a progress bar")


class TRLSection(_Section):
    """Options forwarded to TRL's GRPOTrainer by the TRL backend (``backend: trl``), as they are."""

    use_vllm: bool = Field(False, description="generate with vLLM (TRL's use_vllm; GPU only)")
    vllm_mode: Literal["colocate", "server"] = Field("colocate", description="TRL's vllm_mode")
    gradient_checkpointing: bool = Field(False, description="TRL's gradient_checkpointing")
    lora_r: Optional[int] = Field(None, ge=1, description="train a LoRA adapter of this rank (peft); null = full")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], description="modules LoRA adapts")


class PrecisionConfig(_Section):
    mixed: Literal["no", "bf16", "fp16"] = Field("no", description="accelerate mixed precision (bf16 on GPU)")


class TrainConfig(_Section):
    """The whole training config; fixed key names per docs/design.md."""

    method: str = Field("grpo", description=f"objective: {' | '.join(METHOD_NAMES)} (trainer.methods)")
    backend: Literal[tuple(BACKENDS)] = Field(
        "builtin", description=f"trainer: {' | '.join(BACKENDS)}: the built-in loop, or TRL's GRPOTrainer with the "
        "same losses (pip extra 'trl')")
    seed: int = Field(0, description="run seed (sampling, init of anything random)")
    steps: int = Field(100, ge=1, description="training steps (rollout batches)")
    run_dir: Optional[str] = Field(None, description="run folder; null = runs/<method>-seed<seed>")
    checkpoint_every: int = Field(25, ge=1, description="save a checkpoint every N steps (and at the end)")
    keep_last: int = Field(3, ge=1, description="complete checkpoints to keep")
    probe_every: int = Field(25, ge=0, description="built-in probes every N steps (0 = off)")
    eval_every: int = Field(25, ge=0, description="held-out evaluation every N steps (0 = off)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    oisd: OISDConfig = Field(default_factory=OISDConfig)
    sdpg: SDPGConfig = Field(default_factory=SDPGConfig)
    rlsd: RLSDConfig = Field(default_factory=RLSDConfig)
    opsd: OPSDConfig = Field(default_factory=OPSDConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    trl: TRLSection = Field(default_factory=TRLSection)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if set(self.data.arithmetic.operators) - set("+-*"):
            raise ValueError("data.arithmetic.operators: only '+', '-' and '*' are allowed")
        for x in self.oisd.layers:
            if isinstance(x, float) and not 0.0 < x < 1.0:
                raise ValueError(f"oisd.layers: depth fraction {x} must be in (0, 1)")
            if isinstance(x, int) and x < 1:
                raise ValueError(f"oisd.layers: block index {x} must be >= 1")
        return self

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:  # the table itself: a method added to it is known at once
            raise ValueError(f"Input should be {', '.join(repr(m) for m in METHODS)}")
        return value

    @property
    def spec(self) -> MethodSpec:
        """The method's row of the method table (:mod:`trainer.methods`)."""
        return spec_of(self.method)

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / run_name(self.method, self.seed)


# ---------------------------------------------------------------------------------------
# Loading, overrides and one-line errors


def _known_keys(model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model_cls.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, prefix + name + "."))
    return keys


def _format_error(err: ValidationError) -> str:
    e = err.errors()[0]
    # pydantic puts union member names into loc (e.g. 'int'); keep only the key path.
    parts = [str(p) for p in e["loc"]]
    key_parts = []
    cls: Any = TrainConfig
    for p in parts:
        if cls is not None and isinstance(cls, type) and issubclass(cls, BaseModel) and p in cls.model_fields:
            key_parts.append(p)
            ann = cls.model_fields[p].annotation
            cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        elif p.isdigit():
            key_parts.append(f"[{p}]")
        elif e["type"] == "extra_forbidden" and p == parts[-1]:
            key_parts.append(p)  # the unknown key itself
    loc = ".".join(key_parts).replace(".[", "[") or "config"
    if e["type"] == "extra_forbidden":
        choices = _known_keys(TrainConfig)
        close = difflib.get_close_matches(loc, choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown config key '{loc}'{hint}"
    if e["type"] == "value_error":
        msg = str(e["msg"]).removeprefix("Value error, ")
        if loc == "config":  # a model validator: its message names the key
            return msg
        return f"config key '{loc}': {msg[0].lower() + msg[1:]} (got {e.get('input')!r})"
    value = e.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    return f"config key '{loc}': {e['msg'][0].lower() + e['msg'][1:]} (got {shown})"


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"--set key '{dotted}' is not a dotted key like oisd.lambda_logit")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=1", "c=[6, 12]"]`` -> nested dict, values parsed as YAML (so types are kept)."""
    tree: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' must look like key=value")
        key, _, text = item.partition("=")
        try:
            value = _yaml(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        _set_path(tree, key.strip(), value)
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or the name of a bundled config (``oisd`` -> configs/oisd.yaml), or a
    method's name (its bundled config, ``MethodSpec.config``: ``sdpg`` -> configs/sdpg-ufkl.yaml)."""
    p = Path(name)
    if p.is_file():
        return p
    spec = METHODS.get(str(name))
    stem = spec.config if spec is not None and spec.config else name  # a method's name: its config
    for cand in (CONFIG_DIR / f"{stem}.yaml", CONFIG_DIR / str(name)):
        if cand.is_file():
            return cand
    bundled = ", ".join(sorted(c.stem for c in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file '{name}' not found (bundled configs: {bundled})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Load YAML (optional), apply ``--set`` overrides, validate.

    Raises:
        ConfigError: one line naming the key (unknown key, wrong type, out of range).
    """
    raw: dict = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            raw = _yaml(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}{where}: not valid YAML") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: a config must be a mapping of keys to values")
    raw = _merge(raw, parse_overrides(overrides or []))
    return validate_config(raw)


def validate_config(raw: dict) -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def config_to_dict(cfg: TrainConfig) -> dict:
    return cfg.model_dump(mode="json")


def describe_config(model_cls: type[BaseModel] = TrainConfig, prefix: str = "") -> list[str]:
    """One line per key: ``key (default): description`` — the config reference."""
    lines = []
    for name, field in model_cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.extend(describe_config(ann, prefix + name + "."))
            continue
        default = field.get_default(call_default_factory=True)
        lines.append(f"{prefix + name} ({default!r}): {field.description or ''}")
    return lines
