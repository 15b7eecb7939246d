"""LoRA adapters as full models: what the analyzer boots is always a model folder.

Two cases, both with peft (``pip install -e '.[peft]'``, which ``make test`` installs):

- a LoRA run of this project (``trl.lora_r``): each ``checkpoints/step-N`` holds the merged
  full weights, written from the live policy without touching it
  (:func:`merged_lora_state_dict`), with the adapter itself in ``step-N/adapter/``;
- an adapter-only series trained elsewhere (a TRL or PEFT output dir whose ``checkpoint-N``
  folders hold ``adapter_config.json`` and ``adapter_model.safetensors``): each adapter is
  merged onto its base model by peft (``PeftModel.from_pretrained(...).merge_and_unload()``)
  into a temporary model folder while it is analysed (:func:`merged_adapter`).

Merged weights are ``W + scaling * (B @ A)`` (transposed for ``fan_in_fan_out`` layers), with
peft's own ``scaling`` (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA). Variants whose merge
is not that (DoRA, LoRA biases) are refused in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from workbench.errors import CheckpointError, ConfigError, first_line

__all__ = ["ADAPTER_CONFIG", "adapter_base", "is_adapter_folder", "merged_adapter", "merged_lora_state_dict",
           "require_peft"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."  # a PeftModel's parameter names over the HF model's


def require_peft():
    """The ``peft`` module, or a one-line error naming the extra that installs it."""
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA adapters need peft: pip install -e '.[peft]'") from None
    return peft


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a PEFT adapter (``adapter_config.json`` and its weights) and no
    full model (no ``config.json``)."""
    folder = Path(path)
    return ((folder / ADAPTER_CONFIG).is_file() and any((folder / w).is_file() for w in ADAPTER_WEIGHTS)
            and not (folder / "config.json").is_file())


def adapter_base(path: str | os.PathLike) -> str | None:
    """The base model an adapter folder names (``base_model_name_or_path``), or None."""
    try:
        config = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("base_model_name_or_path") or None


def merged_lora_state_dict(model: torch.nn.Module, state_dict: dict | None = None,
                           adapter: str = "default") -> dict[str, torch.Tensor]:
    """The full weights of a LoRA ``PeftModel`` under the base model's names, each adapted
    linear layer merged, ``W + scaling * (B @ A)`` in float32 then cast back; ``model`` is
    left as it was (its adapters stay unmerged and trainable).

    Args:
        model: the PeftModel (its LoRA layers give ``scaling`` and ``fan_in_fan_out``).
        state_dict: its full state dict, when the caller already gathered it (DeepSpeed
            ZeRO-3: ``accelerator.get_state_dict``); else ``model.state_dict()``.

    Raises:
        CheckpointError: a layer whose merge is not ``W + scaling B A`` (DoRA, LoRA bias).
    """
    from peft.tuners.lora import LoraLayer

    sd = model.state_dict() if state_dict is None else state_dict
    out = {}
    for key, value in sd.items():
        if ".lora_" in key or ".original_module." in key:
            continue
        name = key.removeprefix(_PREFIX).replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")
        out[name] = value
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in getattr(module, "lora_A", {}):
            continue
        if getattr(module, "use_dora", {}).get(adapter) or getattr(module, "lora_bias", {}).get(adapter):
            raise CheckpointError(f"{name}: only plain LoRA can be merged into a checkpoint (DoRA or a LoRA bias here)")
        key = name.removeprefix(_PREFIX) + ".weight"
        weight = out[key]
        a = sd[f"{name}.lora_A.{adapter}.weight"].to(weight.device, torch.float32)
        b = sd[f"{name}.lora_B.{adapter}.weight"].to(weight.device, torch.float32)
        delta = b @ a  # (out, r) @ (r, in)
        if getattr(module, "fan_in_fan_out", False):
            delta = delta.T
        out[key] = (weight.float() + module.scaling[adapter] * delta).to(weight.dtype)
    return out


@contextmanager
def merged_adapter(folder: str | os.PathLike, base: str | None, work: str | os.PathLike,
                   dtype: torch.dtype = torch.float32):
    """A model folder of the adapter in ``folder`` merged onto ``base`` (peft's
    ``merge_and_unload``), for as long as the block runs; removed afterwards.

    Args:
        folder: the adapter folder (:func:`is_adapter_folder`).
        base: the base model (a folder or hub name); None: the adapter's own
            ``base_model_name_or_path``.
        work: where the temporary model folder is made (``.merged-<name>-<random>``).

    Raises:
        CheckpointError: no base is named, the base cannot be loaded, or the adapter does not
            fit it (peft only warns about missing adapter keys: here it is an error).
    """
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft = require_peft()
    folder = Path(folder)
    base = base or adapter_base(folder)
    if not base:
        raise CheckpointError(f"{folder}: {ADAPTER_CONFIG} names no base_model_name_or_path; give --base")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)  # fresh: peft adapts it in place
    except Exception as exc:  # noqa: BLE001 - a loading failure becomes one line
        raise CheckpointError(f"cannot load {base}, the base of adapter {folder}: {first_line(exc)}") from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            adapted = peft.PeftModel.from_pretrained(model, str(folder))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"adapter {folder} does not load onto {base}: {first_line(exc)}") from None
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message).lower()]
    if missing:
        raise CheckpointError(f"adapter {folder} does not fit {base}: {first_line(Exception(missing[0]))}")
    merged = adapted.merge_and_unload()
    out = Path(work) / f".merged-{folder.name}-{uuid.uuid4().hex[:8]}"
    try:
        merged.save_pretrained(out)
        tokenizer_source = folder if (folder / "tokenizer_config.json").is_file() else base
        AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(out)
        del model, adapted, merged
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)
