"""Probe checkpoints this project did not train: ``oisd probe PATH... --out DIR``.

Each PATH is one of:

- a **run folder** of this project (``run.json``): analysed in place, as always;
- an **HF model folder** (``config.json`` and weights) or a **hub name**: one checkpoint, step 0;
- a **TRL / HF Trainer output dir**: its ``checkpoint-N/`` folders, step N from
  ``trainer_state.json`` (``global_step``) or else from the name; the folders may be full
  models or LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``, a LoRA
  or PEFT run), each merged onto its base while it is analysed (``--base``, else the
  adapter's ``base_model_name_or_path``; :mod:`workbench.models.adapters`);
- a **verl checkpoint dir**: its ``global_step_N/actor/huggingface`` folders (verl's
  actor merged to HF format), step N.

Every non-run input becomes an *analysis folder* under ``--out``: a folder the dashboard,
``oisd compare`` and the notebooks read like a run (``run.json`` saying where each
checkpoint came from, ``probe_set.jsonl``, ``analysis/``). Checkpoints are not copied:
run.json lists where they are, and probing again skips what is already analysed.

Everything ``oisd probe`` is given is checked before anything is written
(:func:`check_probe_args`, :func:`check_inputs`, :func:`plan_analysis_folder`): a bad
argument, input, prompts file or tokenizer is one line, and ``--out`` is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import ConfigError, DataError, WorkbenchError, first_line
from workbench.models.adapters import adapter_base, is_adapter_folder, require_peft
from workbench.models.generation import check_max_new_tokens
from workbench.models.loading import DTYPES, is_local_path, is_model_folder
from workbench.storage.jsonl import read_json_objects
from workbench.storage.paths import is_run_folder, probe_set_hash
from workbench.storage.runstore import Run
from workbench.storage.runwriter import RunWriter
from workbench.storage.schema import DEFAULT_PROBE_MAX_NEW_TOKENS

KINDS = ("run", "model", "hub", "trainer", "verl")
ACCEPTED = ("a run folder (run.json), an HF model folder (config.json + weights) or hub name, a TRL / HF "
            "Trainer output dir (checkpoint-N/), or a verl checkpoint dir (global_step_N/actor/huggingface)")
_TRAINER_CKPT = re.compile(r"^checkpoint-(\d+)$")
_VERL_STEP = re.compile(r"^global_step_(\d+)$")


@dataclass(frozen=True)
class Source:
    """One input of ``oisd probe``.

    Attributes:
        path: as given.
        kind: one of :data:`KINDS`.
        checkpoints: ``(step, model folder or hub name, origin)``, sorted by step
            (empty for a run folder: it lists its own).
        adapters: the checkpoints are LoRA adapters, not full models.
    """

    path: str
    kind: str
    checkpoints: tuple[tuple[int, str, str], ...] = ()
    adapters: bool = False

    @property
    def name(self) -> str:
        """A folder name for its analysis folder."""
        text = str(self.path).rstrip("/")
        base = Path(text).name if self.kind != "hub" else text.replace("/", "--")
        return re.sub(r"[^A-Za-z0-9._+-]", "_", base) or "model"


def _trainer_step(folder: Path, from_name: int) -> int:
    state = folder / "trainer_state.json"
    if state.is_file():
        try:
            step = json.loads(state.read_text(encoding="utf-8")).get("global_step")
            if isinstance(step, int):
                return step
        except (OSError, ValueError):
            pass
    return from_name


def resolve_source(path: str | os.PathLike) -> Source:
    """What kind of input ``path`` is, and its checkpoints.

    Raises:
        ConfigError: one line naming the path and the kinds that are accepted.
    """
    text = str(path)
    folder = Path(text).expanduser()
    if is_run_folder(folder):
        return Source(text, "run")
    if folder.is_dir():
        if is_model_folder(folder):
            return Source(text, "model", ((0, str(folder), str(folder)),))
        found, adapters = [], []
        for child in folder.iterdir():
            match = _TRAINER_CKPT.match(child.name)
            if match and (is_model_folder(child) or is_adapter_folder(child)):
                found.append((_trainer_step(child, int(match.group(1))), str(child), f"{child.name} of {text}"))
                adapters.append(is_adapter_folder(child))
        if found:
            if len(set(adapters)) > 1:
                raise ConfigError(f"{text} mixes full checkpoints and LoRA adapters; probe them separately")
            return Source(text, "trainer", tuple(sorted(found)), adapters=adapters[0])
        for child in folder.iterdir():
            match = _VERL_STEP.match(child.name)
            actor = child / "actor" / "huggingface"
            if match and is_model_folder(actor):
                found.append((int(match.group(1)), str(actor), f"{child.name}/actor/huggingface of {text}"))
        if found:
            return Source(text, "verl", tuple(sorted(found)))
        raise ConfigError(f"{text} is none of the accepted inputs: {ACCEPTED}")
    if folder.exists() or is_local_path(text):
        raise ConfigError(f"{text} is none of the accepted inputs: {ACCEPTED}"
                          + ("" if folder.exists() else " (no such folder)"))
    return Source(text, "hub", ((0, text, f"hub:{text}"),))


def load_prompts(path: str | os.PathLike) -> list[dict]:
    """``--prompts FILE``: JSONL with ``prompt`` and an optional ``reference`` per line.

    A reference that is absent, null or empty leaves its prompt without one (the reference
    split is scored on the prompts that have one, the greedy split on all).

    Raises:
        DataError: a missing, unreadable or empty file, a bad line (named by number), a
            line without a prompt.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"prompts file {file} does not exist" + (" (it is a folder)" if file.is_dir() else ""))
    items = []
    try:
        lines = read_json_objects(file)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"prompts file {file} cannot be read: {first_line(exc)}") from None
    for number, item in lines:
        if not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise DataError(f"{file} line {number}: needs a non-empty string 'prompt'")
        reference = item.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise DataError(f"{file} line {number}: 'reference' must be a string")
        items.append({"prompt": item["prompt"], "reference": reference or None})
    if not items:
        raise DataError(f"prompts file {file} is empty")
    return items


def reference_note(prompts: list[dict]) -> str | None:
    """One line on how many prompts have a reference, when not all do (None when all do)."""
    n, total = sum(1 for p in prompts if p.get("reference")), len(prompts)
    if n == total:
        return None
    if n == 0:
        return (f"reference split: none of the {total} prompts has a reference; the metrics are read on "
                "the greedy completions only (oisd compare reads the reference split)")
    return f"reference split: {n} of {total} prompts have a reference (the greedy split has all {total})"


def check_device(device: str) -> None:
    """``--device``: a torch device this machine has.

    Raises:
        ConfigError: one line naming the device and why it cannot be used.
    """
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"--device {device}: not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "meta":
        raise ConfigError(f"--device {device}: the meta device holds no weights to probe")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: MPS is not available on this machine")
    try:
        torch.empty(1, device=parsed)
    except Exception as exc:  # noqa: BLE001 - any refusal of the backend becomes one line
        raise ConfigError(f"--device {device}: cannot place a tensor there ({first_line(exc)})") from None


def check_probe_args(*, max_new_tokens: int | None, detail_prompts: int, n_prompts: int, dtype: str,
                     device: str) -> None:
    """The numbers and names ``oisd probe`` is given, before any input is opened.

    Raises:
        ConfigError: one line naming the argument.
    """
    check_max_new_tokens(max_new_tokens, "--max-new-tokens")
    if detail_prompts < 0:
        raise ConfigError(f"--detail-prompts must be >= 0, got {detail_prompts}")
    if n_prompts < 1:
        raise ConfigError(f"--n-prompts must be >= 1, got {n_prompts}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_device(device)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary and special tokens: two folders compare side by
    side only when theirs match."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


@dataclass(frozen=True)
class AnalysisPlan:
    """What :func:`write_analysis_folder` writes for one non-run input, all of it checked."""

    source: Source
    folder: Path
    records: list
    fingerprint: str
    max_new_tokens: int
    base: str | None = None  # what adapter checkpoints are merged onto


def plan_analysis_folder(source: Source, out: str | os.PathLike, prompts: list[dict], *,
                         chat_template: bool = False, max_new_tokens: int = DEFAULT_PROBE_MAX_NEW_TOKENS,
                         base: str | None = None) -> AnalysisPlan:
    """Everything :func:`write_analysis_folder` needs for ``out/<name>``, checked and
    written nowhere: the probe set tokenised with the first checkpoint's tokenizer, and
    that the folder is new or holds this input's analysis with this probe set.

    Raises:
        WorkbenchError: the tokenizer cannot be loaded or lacks what the prompts need
            (``--chat-template``); ``out`` is not a folder; the folder holds an analysis of
            another input or another probe set, or something that is not an analysis; LoRA
            adapters without a base (``--base`` or their ``base_model_name_or_path``) or peft.
    """
    from transformers import AutoTokenizer

    from workbench.analysis.probe_runner import prompt_records

    check_max_new_tokens(max_new_tokens, "--max-new-tokens")
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out} is not a folder")
    folder = Path(out) / source.name
    first = source.checkpoints[0][1]
    if source.adapters:
        require_peft()
        base = base or adapter_base(first)
        if not base:
            raise ConfigError(f"{first} is a LoRA adapter whose adapter_config.json names no base model; give --base")
        if (Path(base).exists() or is_local_path(base)) and not is_model_folder(base):
            raise ConfigError(f"{base}, the base model of the adapters in {source.path}, is not a model folder")
        if not (Path(first) / "tokenizer_config.json").is_file():
            first = base  # an adapter saved without its tokenizer: the base's
    try:
        tokenizer = AutoTokenizer.from_pretrained(first)
    except Exception as exc:  # noqa: BLE001 - a loading failure becomes one line
        raise WorkbenchError(f"cannot load the tokenizer of {first}: {first_line(exc)}") from None
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"--chat-template: the tokenizer of {first} has no chat template")
    records = prompt_records(prompts, tokenizer, chat_template=chat_template)
    if is_run_folder(folder):
        existing = Run.open(folder).info
        if existing.get("external", {}).get("source") != source.path:
            raise WorkbenchError(f"{folder} holds the analysis of {existing.get('external', {}).get('source')}, "
                                 f"not {source.path}; choose another --out")
        if existing.get("probe_set_hash") not in (None, probe_set_hash(records)):
            raise WorkbenchError(f"{folder} was probed with other prompts; choose another --out")
    elif folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise WorkbenchError(f"{folder} exists and is not an analysis folder (no run.json); choose another --out")
    return AnalysisPlan(source, folder, records, tokenizer_fingerprint(tokenizer), max_new_tokens,
                        base if source.adapters else None)


def write_analysis_folder(plan: AnalysisPlan) -> Path:
    """Create (or reuse) the analysis folder of a :func:`plan_analysis_folder` plan: run.json
    listing the input's checkpoints, and the probe set."""
    source = plan.source
    info = {"method": None, "source": source.path, "kind": source.kind}
    if is_run_folder(plan.folder):
        writer = RunWriter(plan.folder, info, resume=True, append=True)  # nothing of it is dropped
    else:
        writer = RunWriter(plan.folder, info, resume=False)
    writer.write_probe_set(plan.records)
    writer.record(
        external={"source": source.path, "kind": source.kind,
                  "checkpoints": [{"step": s, "path": p, "origin": o} | (
                      {"adapter": True, "base": plan.base} if source.adapters else {})
                      for s, p, o in source.checkpoints]},
        probe_max_new_tokens=plan.max_new_tokens, tokenizer_fingerprint=plan.fingerprint,
    )
    writer.set_status("finished")
    return plan.folder


def prepare_analysis_folder(source: Source, out: str | os.PathLike, prompts: list[dict], *,
                            chat_template: bool = False, max_new_tokens: int = DEFAULT_PROBE_MAX_NEW_TOKENS,
                            base: str | None = None) -> Path:
    """Create (or reuse) ``out/<name>`` for a non-run input: :func:`plan_analysis_folder`
    then :func:`write_analysis_folder`.

    Raises:
        WorkbenchError: as :func:`plan_analysis_folder`; nothing is written then.
    """
    return write_analysis_folder(plan_analysis_folder(source, out, prompts, chat_template=chat_template,
                                                      max_new_tokens=max_new_tokens, base=base))


def check_inputs(paths: list[str], out: str | None) -> list[Source]:
    """Resolve every input before any work (one bad path stops the command in one line)."""
    if not paths:
        raise ConfigError("oisd probe needs at least one PATH")
    sources = [resolve_source(p) for p in paths]
    if out is None and any(s.kind != "run" for s in sources):
        raise ConfigError("external checkpoints need --out DIR (the analysis folder to write)")
    names = [s.name for s in sources if s.kind != "run"]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(f"two inputs would share the analysis folder {duplicate!r}; probe them in separate calls")
    for source in sources:
        if source.kind == "run" and not Run.open(source.path).probe_set():
            raise DataError(f"{source.path} has no probe set (probe_set.jsonl is missing or empty)")
    return sources
