"""What every command shares: error handling, logging, --config files, and the allowed values of options, read
from the config classes' constraint tables (:mod:`embstore.errors`)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from embstore.errors import Constraint, EmbstoreError, InvalidParameterError


class UserError(click.ClickException):
    """A one-line error and exit code 2 (never a traceback)."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class Group(click.Group):
    """A click group that turns library errors into :class:`UserError`."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InvalidParameterError as exc:  # name the --flag the user typed, not the config's parameter
            flag = _flag_of(self.commands.get(ctx.invoked_subcommand or ""), exc.name)
            raise UserError(exc.message(f"The {flag} option") if flag else str(exc)) from None
        except EmbstoreError as exc:
            raise UserError(str(exc)) from None


def _flag_of(command: click.Command | None, name: str) -> str | None:
    """The --flag of ``command`` that sets parameter ``name`` (its option's name, or the flag spelt like it)."""
    dashed = "--" + name.replace("_", "-")
    for p in command.params if command is not None else ():
        if isinstance(p, click.Option) and (p.name == name or dashed in p.opts):
            return dashed if dashed in p.opts else max(p.opts, key=len)
    return None


def _constraint(config: type | Constraint, name: str | None = None) -> Constraint:
    """Parameter ``name``'s entry of ``config``'s constraint table (or ``config`` itself when it is a Constraint)."""
    if isinstance(config, Constraint):
        return config
    table = getattr(config, "parameter_constraints")
    return table[name]


def allowed(config: type | Constraint, name: str | None = None) -> list[str]:
    """The words parameter ``name`` of ``config`` accepts (or each item of its comma list), from its constraint."""
    choices = _constraint(config, name).choices
    if choices is None:
        raise TypeError(f"{getattr(config, '__name__', config)}.{name} takes no fixed set of words")
    return list(choices)


def choice(config: type | Constraint, name: str | None = None) -> click.Choice:
    """The ``click.Choice`` of parameter ``name`` of ``config``: its constraint's words."""
    return click.Choice(allowed(config, name))


def listed(config: type | Constraint, name: str | None = None) -> str:
    """The words of parameter ``name`` for help text: 'cls, mean, max'."""
    return ", ".join(allowed(config, name))


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


def load_yaml_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path} is not a text (UTF-8) file (byte {exc.start} cannot be decoded); pass a YAML file of options."
        ) from None
    except yaml.YAMLError as exc:
        raise UserError(f"Cannot parse {path} as YAML: {str(exc).splitlines()[0]}; fix the file.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of option names to values; got {type(data).__name__}.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def explicit(ctx: click.Context, name: str) -> bool:
    """Was the option given on the command line (so it overrides the config file)?"""
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)


def unescape(text: str) -> str:
    """A shell argument's backslash escapes \\n, \\t and \\\\ as the characters (a YAML file writes them itself)."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)
