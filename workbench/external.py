"""Probe checkpoints this project did not train: ``oisd probe PATH... --out DIR``.

Each PATH is one of:

- a **run folder** of this project (``run.json``): analysed in place, as always;
- an **HF model folder** (``config.json`` and weights) or a **hub name**: one checkpoint, step 0;
- a **TRL / HF Trainer output dir**: its ``checkpoint-N/`` folders, step N from
  ``trainer_state.json`` (``global_step``) or else from the name;
- a **verl checkpoint dir**: its ``global_step_N/actor/huggingface`` folders (verl's
  actor merged to HF format), step N.

Every non-run input becomes an *analysis folder* under ``--out``: a folder the dashboard,
``oisd compare`` and the notebooks read like a run (``run.json`` saying where each
checkpoint came from, ``probe_set.jsonl``, ``analysis/``). Checkpoints are not copied:
run.json lists where they are, and probing again skips what is already analysed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import ConfigError, DataError, WorkbenchError
from workbench.jsonl import read_json_objects
from workbench.models import is_local_path, is_model_folder
from workbench.runstore import Run, is_run_folder, probe_set_hash
from workbench.runwriter import RunWriter
from workbench.schema import DEFAULT_PROBE_MAX_NEW_TOKENS

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
    """

    path: str
    kind: str
    checkpoints: tuple[tuple[int, str, str], ...] = ()

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
        found = []
        for child in folder.iterdir():
            match = _TRAINER_CKPT.match(child.name)
            if match and is_model_folder(child):
                found.append((_trainer_step(child, int(match.group(1))), str(child), f"{child.name} of {text}"))
        if found:
            return Source(text, "trainer", tuple(sorted(found)))
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

    Raises:
        DataError: a missing or empty file, a bad line (named by number), a line without
            a prompt.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"prompts file {file} does not exist")
    items = []
    for number, item in read_json_objects(file):
        if not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise DataError(f"{file} line {number}: needs a non-empty string 'prompt'")
        reference = item.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise DataError(f"{file} line {number}: 'reference' must be a string")
        items.append({"prompt": item["prompt"], "reference": reference})
    if not items:
        raise DataError(f"prompts file {file} is empty")
    return items


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary and special tokens: two folders compare side by
    side only when theirs match."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


def prepare_analysis_folder(source: Source, out: str | os.PathLike, prompts: list[dict], *,
                            chat_template: bool = False,
                            max_new_tokens: int = DEFAULT_PROBE_MAX_NEW_TOKENS) -> Path:
    """Create (or reuse) ``out/<name>`` for a non-run input: run.json listing its
    checkpoints, and the probe set tokenised with the first checkpoint's tokenizer.

    Raises:
        WorkbenchError: the tokenizer cannot be loaded; the folder holds an analysis of
            another input or another probe set.
    """
    from transformers import AutoTokenizer

    from workbench.models import first_line
    from workbench.probe_runner import prompt_records

    folder = Path(out) / source.name
    first = source.checkpoints[0][1]
    try:
        tokenizer = AutoTokenizer.from_pretrained(first)
    except Exception as exc:  # noqa: BLE001 - a loading failure becomes one line
        raise WorkbenchError(f"cannot load the tokenizer of {first}: {first_line(exc)}") from None
    records = prompt_records(prompts, tokenizer, chat_template=chat_template)
    info = {"method": None, "source": source.path, "kind": source.kind}
    if is_run_folder(folder):
        existing = Run.open(folder).info
        if existing.get("external", {}).get("source") != source.path:
            raise WorkbenchError(f"{folder} holds the analysis of {existing.get('external', {}).get('source')}, "
                                 f"not {source.path}; choose another --out")
        writer = RunWriter(folder, info, resume=True, append=True)  # nothing of it is dropped
    else:
        writer = RunWriter(folder, info, resume=False)
    if writer.info.get("probe_set_hash") not in (None, probe_set_hash(records)):
        raise WorkbenchError(f"{folder} was probed with other prompts; choose another --out")
    writer.write_probe_set(records)
    writer.record(
        external={"source": source.path, "kind": source.kind,
                  "checkpoints": [{"step": s, "path": p, "origin": o} for s, p, o in source.checkpoints]},
        probe_max_new_tokens=max_new_tokens, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )
    writer.set_status("finished")
    return folder


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
    return sources
