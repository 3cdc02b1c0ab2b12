"""Every ``--option`` written in README.md and docs/*.md exists on the command it is written for.

How a mention is tied to a command:

* **Command lines** (in fenced code blocks, or inline code spans): a segment starting ``embstore CMD`` or
  ``heads CMD`` (also ``-m cli.embstore_cli CMD`` under torchrun/accelerate; segments split at ``&&``, ``|``, ``;``,
  ``$(``; a ``#`` comment ends it): every ``--option`` after the command must be one of CMD's.
* **Tables** (rows starting with ``|``) are about the section's command: the one named by an
  ``<!-- options: heads finetune -->`` comment, else by a heading holding it in backticks (`` ## `heads sweep` ``),
  else the last command named since the last ``##`` heading, by a command line of a code block or by an
  inline code span that is just the command (`` `heads finetune` must learn...``). A table's options must be that
  command's.
* **Other tools' command lines** (a code span or code line starting with one of :data:`OTHER_TOOLS`, e.g.
  ``pip install ...``) are not checked, except for a command of ours inside them.
* **Anything else** (prose): the option must exist on some command of the two CLIs, or be another tool's
  (:data:`FOREIGN`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from cli.embstore_cli import main as embstore_main
from cli.heads_cli import main as heads_main

ROOT = Path(__file__).resolve().parents[1]
GROUPS: dict[str, click.Group] = {"embstore": embstore_main, "heads": heads_main}
MODULES = {"cli.embstore_cli": "embstore", "cli.heads_cli": "heads"}
FOREIGN = {
    "--nproc_per_node",
    "--nproc-per-node",
    "--multi_gpu",
    "--num_processes",
    "--cpu",
    "--index-url",
    "--extra-index-url",
    "--upgrade",
    "--help",
    "--version",
    "--durations",
    "--ignore-missing-imports",
}
"""Options of other tools (torchrun, accelerate, pip, pytest, mypy) that the docs may write, and click's own."""

OTHER_TOOLS = {
    "pip",
    "pip3",
    "huggingface-cli",
    "git",
    "curl",
    "wget",
    "python",
    "python3",
    "pytest",
    "mypy",
    "conda",
    "uv",
}
"""Programs whose command lines the docs may show: their options are theirs."""

OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
COMMAND = re.compile(r"(?:^|\s)(embstore|heads|-m\s+cli\.embstore_cli|-m\s+cli\.heads_cli)\s+([a-z][a-z-]*)")
MARKER = re.compile(r"<!--\s*options:\s*(embstore|heads)\s+([a-z-]+)\s*-->")


def options_of(command: str) -> set[str]:
    group, name = command.split()
    cmd = GROUPS[group].commands[name]
    return {o for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)} | {"--help"}


ALL_OPTIONS = set().union(*(options_of(f"{g} {n}") for g, grp in GROUPS.items() for n in grp.commands))


@dataclass(frozen=True)
class Mention:
    source: str
    line: int
    option: str
    command: str | None
    """The command it must belong to; None: any command (prose)."""


def _commands_in(text: str) -> list[tuple[str, str]]:
    """(command, its options' text) for each command-line segment of ``text``."""
    out = []
    for segment in re.split(r"&&|\|\||(?<!\\)\||;|\$\(|`", text):
        segment = re.split(r"\s#", segment, maxsplit=1)[0]
        m = COMMAND.search(segment)
        if m is None:
            continue
        group = MODULES.get(m.group(1).split()[-1], m.group(1))
        if m.group(2) in GROUPS[group].commands:
            out.append((f"{group} {m.group(2)}", segment[m.end() :]))
    return out


def mentions(text: str, source: str) -> list[Mention]:
    """Every ``--option`` of ``text`` (a markdown file) with the command it is written for."""
    found: list[Mention] = []
    in_code = False
    section_command: str | None = None  # the last command line since the last '##' heading, or the marked one
    marked = False
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        raw, number = lines[i], i + 1
        while raw.rstrip().endswith("\\") and i + 1 < len(lines):  # one logical line
            i += 1
            raw = raw.rstrip()[:-1] + " " + lines[i]
        i += 1
        stripped = raw.strip()
        if stripped.startswith("```"):
            in_code = not in_code
            continue
        if not in_code and re.match(r"#{1,6}\s", stripped):
            level = len(stripped) - len(stripped.lstrip("#"))
            named = COMMAND.search(" ".join(re.findall(r"`([^`]*)`", stripped)))
            if named or level <= 2:
                section_command, marked = (f"{named.group(1)} {named.group(2)}", True) if named else (None, False)
            continue
        marker = MARKER.search(raw)
        if marker:
            section_command, marked = f"{marker.group(1)} {marker.group(2)}", True
            continue
        spans = [raw] if in_code else re.findall(r"`([^`]+)`", raw)
        claimed: set[tuple[int, str]] = set()
        for span in spans:
            commands = _commands_in(span)
            for command, rest in commands:
                names_topic = in_code or (not stripped.startswith("|") and not rest.strip())
                if names_topic and not marked:
                    section_command = command
                for opt in OPTION.findall(rest):
                    found.append(Mention(source, number, opt, command))
                    claimed.add((number, opt))
            words = span.split()
            if not commands and words and words[0] in OTHER_TOOLS:
                claimed.update((number, opt) for opt in OPTION.findall(span))
        if in_code:
            continue
        table = stripped.startswith("|")
        for opt in OPTION.findall(raw):
            if (number, opt) not in claimed:
                found.append(Mention(source, number, opt, section_command if table else None))
    return found


def problems(text: str, source: str) -> list[str]:
    out = []
    for m in mentions(text, source):
        if m.command is not None and m.option not in options_of(m.command) | FOREIGN:
            out.append(f"{m.source}:{m.line}: {m.option} is not an option of {m.command}")
        elif m.command is None and m.option not in ALL_OPTIONS | FOREIGN:
            out.append(f"{m.source}:{m.line}: {m.option} is not an option of any embstore or heads command")
    return out


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", DOCS, ids=[p.relative_to(ROOT).as_posix() for p in DOCS])
def test_every_option_written_in_the_docs_exists(path):
    found = problems(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())
    assert not found, "\n".join(found)


def test_the_readme_is_read_as_commands_tables_and_prose():
    """The parser sees the README's command lines and tables for what they are (so the check above is not empty)."""
    found = mentions((ROOT / "README.md").read_text(encoding="utf-8"), "README.md")
    commands = {m.command for m in found if m.command}
    assert {"embstore extract", "heads sweep", "heads finetune"} <= commands
    assert len(found) > 30


SAMPLE = """# Tool

## Fine-tune

```bash
heads finetune --data my.csv --label-col label \\
    --epochs 1   # a comment --not-an-option
STORE=$(embstore extract --data my.csv) && heads sweep --store "$STORE"
torchrun --nproc_per_node 2 -m cli.heads_cli finetune --epochs 2
```

| option | default |
|---|---|
| `--head-lr` | 1e-3 |

Prose may name `--holdout`, or `heads report --allow-mixed` inline.

<!-- options: heads sweep -->
| `--c-grid` | the grid |
"""


def test_the_sample_passes():
    assert problems(SAMPLE, "sample.md") == []
    found = {(m.option, m.command) for m in mentions(SAMPLE, "sample.md")}
    assert ("--epochs", "heads finetune") in found and ("--data", "embstore extract") in found
    assert ("--head-lr", "heads finetune") in found and ("--c-grid", "heads sweep") in found
    assert ("--allow-mixed", "heads report") in found and ("--holdout", None) in found
    assert not any(o == "--not-an-option" for o, _ in found)


@pytest.mark.parametrize(
    "before, after, problem",
    [
        ("--label-col label", "--label-column label", "sample.md:6: --label-column is not an option of heads finetune"),
        ("--epochs 1", "--epoch 1", "sample.md:6: --epoch is not an option of heads finetune"),
        ("extract --data", "extract --dat", "sample.md:8: --dat is not an option of embstore extract"),
        ('--store "$STORE"', '--stores "$STORE"', "sample.md:8: --stores is not an option of heads sweep"),
        ("finetune --epochs 2", "finetune --epocs 2", "sample.md:9: --epocs is not an option of heads finetune"),
        ("`--head-lr`", "`--solver`", "sample.md:14: --solver is not an option of heads finetune"),  # a sweep option
        ("`--holdout`", "`--hold-out`", "sample.md:16: --hold-out is not an option of any embstore or heads command"),
        ("report --allow-mixed", "report --allow-mix", "sample.md:16: --allow-mix is not an option of heads report"),
        ("`--c-grid`", "`--c-grids`", "sample.md:19: --c-grids is not an option of heads sweep"),
    ],
)
def test_a_misspelt_or_misplaced_option_is_found(before, after, problem):
    assert before in SAMPLE
    assert problems(SAMPLE.replace(before, after), "sample.md") == [problem]


def test_a_mutated_readme_fails():
    """Mutation of the real README: one option misspelt in a command line, one in an inline command span."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for needle, bad in [
        (
            "--text-col sentence --label-col label --holdout 0.2)",
            "--text-column sentence --label-col label --holdout 0.2)",
        ),
        ("`heads sweep --head linear,mlp`", "`heads sweep --heads linear,mlp`"),
    ]:
        assert needle in text, needle
        assert len(problems(text.replace(needle, bad, 1), "README.md")) == 1, needle
