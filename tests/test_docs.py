"""The docs and the code state each fact once: file names only in the run store, and the CLI
section of docs/design.md naming exactly the flags the ``oisd`` parser has."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("trainer", "workbench", "app")
# The run store's module that names every file of a run folder (RunPaths).
STORE_MODULES = {"workbench/storage/paths.py"}
FILE_NAMES = ("run.json", "manifest.json", "warmstart.json")
# A flag as docs write it: `--name` or `-x`, not the hyphen inside a word (warmstart-tiny).
FLAG = re.compile(r"(?<![\w-])(--?[a-z][a-z0-9-]*)")
HELP = {"-h", "--help"}


def _python_files() -> list[Path]:
    return sorted(p for package in CODE for p in (ROOT / package).rglob("*.py"))


def test_file_names_only_in_the_store():
    literals = [re.compile(rf"""(["']){re.escape(name)}\1""") for name in FILE_NAMES]
    found: dict[str, set[str]] = {name: set() for name in FILE_NAMES}
    for path in _python_files():
        text = path.read_text(encoding="utf-8")
        for name, literal in zip(FILE_NAMES, literals):
            if literal.search(text):
                found[name].add(path.relative_to(ROOT).as_posix())
    for name, files in found.items():
        assert files & STORE_MODULES, f"{name} is not named in the run store ({sorted(STORE_MODULES)})"
        assert files <= STORE_MODULES, (
            f"the file name {name!r} is typed outside the run store in {sorted(files - STORE_MODULES)}; "
            "use workbench.storage.paths.RunPaths"
        )


def _cli_section() -> str:
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    match = re.search(r"^## CLI\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, "docs/design.md has no '## CLI' section"
    return match.group(1)


def _documented_flags() -> tuple[set[str], dict[str, set[str]]]:
    """(global flags, {subcommand: flags}) as docs/design.md's CLI section names them."""
    section = _cli_section()
    global_line = re.search(r"Global flags:(.*)", section)
    assert global_line, "the CLI section does not list the global flags"
    commands: dict[str, set[str]] = {}
    for line in section.splitlines():
        row = re.match(r"\|\s*`oisd (\w+)[^`]*`\s*\|(.*)", line)
        if row:
            commands[row.group(1)] = set(FLAG.findall(row.group(2)))
    return set(FLAG.findall(global_line.group(1))), commands


def _parser_flags() -> tuple[set[str], dict[str, set[str]]]:
    from workbench.cli import build_parser

    parser = build_parser()

    def flags(p: argparse.ArgumentParser) -> set[str]:
        return {s for action in p._actions for s in action.option_strings} - HELP

    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return flags(parser), {name: flags(p) for name, p in sub.choices.items()}


def test_design_md_cli_matches_parser():
    documented_global, documented = _documented_flags()
    parser_global, parser = _parser_flags()
    assert set(documented) == set(parser), (
        f"docs/design.md documents subcommands {sorted(documented)}, the parser has {sorted(parser)}"
    )
    assert documented_global == parser_global, (
        f"global flags: documented {sorted(documented_global)}, parser {sorted(parser_global)}"
    )
    for command, flags in documented.items():
        unknown = flags - parser[command]
        assert not unknown, f"docs/design.md documents oisd {command} {sorted(unknown)}, which the parser lacks"
        missing = parser[command] - flags
        assert not missing, f"oisd {command} has {sorted(missing)}, which docs/design.md does not document"


def test_the_cli_check_catches_a_flag_that_does_not_exist():
    """The parsing above is not vacuous: every row has flags, and a made-up one is caught."""
    _, documented = _documented_flags()
    _, parser = _parser_flags()
    assert all(documented[c] for c in documented if c != "compare") and "--layer" in documented["compare"]
    assert not FLAG.findall("runs/warmstart-tiny, correct-minus-wrong, top1_agree")
    assert FLAG.findall("| `--out DIR`, `-v/--verbose` |") == ["--out", "-v", "--verbose"]
    assert {"--steps-per-run"} - parser["demo"]
