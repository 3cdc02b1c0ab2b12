"""What every command shares: error handling, logging and --config files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from embstore.errors import EmbstoreError


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
        except EmbstoreError as exc:
            raise UserError(str(exc)) from None


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
