"""``--help`` is the option reference: every option of every command has help text and shows its default, and the
default it shows is the one the command uses (its config dataclass's)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import click
import pytest
from click.testing import CliRunner

from cli.embstore_cli import main as embstore_main
from cli.heads_cli import main as heads_main

ROOTS = {"embstore": embstore_main, "heads": heads_main}


def commands() -> Iterator[tuple[str, click.Command]]:
    """('embstore extract', command), ... for every command of both CLIs, walking groups recursively."""

    def walk(cmd: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, f"{path} {name}")
        else:
            yield path, cmd

    for name, root in ROOTS.items():
        yield from walk(root, name)


def options(cmd: click.Command) -> list[click.Option]:
    return [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]


def config_defaults(command: str) -> dict[str, Any]:
    """The flat defaults of the config a command builds, keyed by the option's parameter name."""
    if command in ("embstore extract", "embstore plan"):
        from embstore.config import ExtractConfig

        d = ExtractConfig().to_dict()
        return {**d, "fmt": d["format"], "towers": d["pair_mode"] == "towers"}
    if command in ("heads sweep", "heads train"):
        from heads.probe.sweep import SweepConfig

        d = SweepConfig().to_dict()
        return {**d, "combine": d["combine"] if command == "heads sweep" else ["single"]}
    if command == "heads finetune":
        from heads.finetune.config import FinetuneConfig

        return FinetuneConfig().to_dict()
    if command == "heads pretrain":
        from heads.pretrain.config import PretrainConfig

        return {**PretrainConfig.from_dict({"data": "corpus.csv"}).to_dict(), "data": None}  # pretrain needs --data
    return {}


def stated_default(opt: click.Option) -> str | None:
    """The default --help shows for ``opt``: click's (show_default), or '[default: ...]' in the help text."""
    found = re.search(r"\[default: ([^\]]*)\]", opt.help or "")
    if found:
        return found.group(1)
    if isinstance(opt.show_default, str):
        return opt.show_default
    if opt.show_default and not _unset(opt.default):
        return str(opt.default)
    return None


def _unset(value: Any) -> bool:
    return value is None or type(value).__name__ == "Sentinel" or value in ((), [], {})


def agrees(stated: str, value: Any, opt: click.Option) -> bool:
    """Whether the stated default says ``value``; True where the statement is prose that cannot be compared."""
    if isinstance(value, bool):
        names = [o.lstrip("-") for o in (opt.opts if value else opt.secondary_opts)]
        return stated in names + (["on", "True"] if value else ["off", "False"]) or not re.fullmatch(r"[\w-]+", stated)
    if isinstance(value, (int, float)):
        try:
            return float(stated) == float(value)
        except ValueError:
            return True
    if isinstance(value, (list, tuple)):
        if "..." in stated or not re.fullmatch(r"[\w.,-]+", stated):
            return True
        parts = stated.split(",")
        try:
            return [float(p) for p in parts] == [float(v) for v in value]
        except (TypeError, ValueError):
            return parts == [str(v) for v in value]
    if isinstance(value, str):
        return stated == value or not re.fullmatch(r"[\w.:-]+", stated)
    return True


ALL = [(command, cmd) for command, cmd in commands()]


def test_the_walk_finds_every_command():
    found = {c for c, _ in ALL}
    assert {
        "embstore extract",
        "embstore plan",
        "embstore info",
        "embstore ls",
        "embstore verify",
        "heads sweep",
        "heads train",
        "heads predict",
        "heads report",
        "heads finetune",
        "heads pretrain",
    } <= found


@pytest.mark.parametrize("command, cmd", ALL, ids=[c for c, _ in ALL])
def test_every_option_has_help_and_shows_its_default(command, cmd):
    defaults = config_defaults(command)
    problems = []
    for opt in options(cmd):
        name = opt.opts[-1]
        if not (opt.help or "").strip():
            problems.append(f"{name}: no help text")
        has_value = not _unset(opt.default) and not (opt.is_flag and not opt.secondary_opts and opt.default is False)
        config_value = defaults.get(opt.name or "")
        needs = (
            has_value
            or not _unset(config_value)
            and not (opt.is_flag and not opt.secondary_opts and config_value is False)
        )
        stated = stated_default(opt)
        if needs and stated is None:
            problems.append(
                f"{name}: default {config_value if _unset(opt.default) else opt.default!r} not shown "
                "(show_default=True, show_default='VALUE' or '[default: ...]' in the help)"
            )
        if (
            stated is not None
            and opt.name in defaults
            and not _unset(config_value)
            and not agrees(stated, config_value, opt)
        ):
            problems.append(f"{name}: --help says default {stated!r} but {command} uses {config_value!r}")
        if (
            has_value
            and opt.name in defaults
            and not _unset(config_value)
            and opt.default != config_value
            and not agrees(str(opt.default), config_value, opt)
        ):
            problems.append(f"{name}: the flag defaults to {opt.default!r}, its config to {config_value!r}")
    assert not problems, f"{command}:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "command, options_",
    [
        ("heads finetune", ["--epochs", "--batch-size", "--patience", "--max-length", "--seed"]),
        ("embstore extract", ["--max-length", "--model"]),
    ],
)
def test_help_output_shows_the_defaults_the_issue_missed(command, options_):
    """The rendered --help (not just the option objects) shows each default, e.g. '--epochs INTEGER ... [default:
    5]'."""
    group, name = command.split()
    text = CliRunner().invoke(ROOTS[group], [name, "--help"], terminal_width=400).output
    for opt in options_:
        line = next(line for line in text.splitlines() if line.strip().startswith(opt + " "))
        assert "[default: " in line, line
    if command == "heads finetune":
        assert re.search(r"--epochs INTEGER .*\[default: 5\]", text)
        assert re.search(r"--max-length INTEGER .*\[default: 128\]", text)
