"""Declarative parameter checks: each config class lists what its parameters accept once (``parameter_constraints``),
and the error messages, the CLI's ``click.Choice`` types and the allowed values in its help text all come from that
table, so they cannot drift apart."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cli.embstore_cli import main as embstore_main
from cli.heads_cli import _sweep_config
from cli.heads_cli import main as heads_main
from embstore import DataSpec, ExtractConfig
from embstore.data.augment import AugmentSpec
from embstore.errors import Choice, ConfigError, Constraint, Interval, InvalidParameterError, ListOf, Optional
from heads.finetune.config import FinetuneConfig
from heads.pretrain.config import PretrainConfig
from heads.probe.config import HeadConfig
from heads.training.optim import OptimConfig

ROOT = Path(__file__).resolve().parents[1]

# -- the vocabulary ------------------------------------------------------------------------------------------------


def test_interval_takes_numbers_of_its_kind_within_its_bounds():
    positive = Interval(int, 1, None)
    assert positive.accepts(1) and positive.accepts(10**400) and not positive.accepts(0)
    assert not positive.accepts(True) and not positive.accepts(2.0) and not positive.accepts("2")
    fraction = Interval(float, 0, 1, closed="left")
    assert fraction.accepts(0) and fraction.accepts(0.5) and not fraction.accepts(1.0)
    assert not fraction.accepts(math.nan) and not Interval(float, 0, None, closed="neither").accepts(math.nan)
    assert not Interval(float, 0, math.inf, closed="neither").accepts(math.inf)
    assert [c.describe() for c in (positive, fraction, Interval(float, 0, None), Interval(int, 2, None))] == [
        "a positive integer",
        "a fraction in [0, 1)",
        "a number >= 0",
        "an integer >= 2",
    ]


def test_lists_choices_and_none():
    pooling = Optional(ListOf(Choice(("cls", "mean", "max"))))
    assert pooling.accepts(None) and pooling.accepts("cls, mean") and pooling.accepts(("max",))
    assert not pooling.accepts(()) and not pooling.accepts("cls,avg")
    assert pooling.choices == ("cls", "mean", "max")
    assert Optional(Choice(("sop", "nsp")), none="none").choices == ("sop", "nsp", "none")
    with pytest.raises(InvalidParameterError) as info:
        pooling.check("pooling", ("cls", "avg"), "ExtractConfig")
    err = info.value
    assert str(err) == (
        "The 'pooling' parameter of ExtractConfig must be a comma list of cls, mean, max. Got 'cls,avg' instead."
    )
    assert isinstance(err, ConfigError) and isinstance(err, ValueError)
    assert err.message("The --pooling option").startswith("The --pooling option must be a comma list")


# -- every config class refuses a bad value with the generated message ---------------------------------------------


def _sweep(**kw):
    from heads.probe.sweep import SweepConfig

    return SweepConfig(**kw)


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: ExtractConfig(pooling=("avg",)),
            r"^The 'pooling' parameter of ExtractConfig must be a comma list of cls, last, mean, max\. "
            r"Got 'avg' instead\.$",
        ),
        (
            lambda: ExtractConfig(dtype="float64"),
            r"^The 'dtype' parameter of ExtractConfig must be one of float16, float32\. Got 'float64' instead\. "
            r"bfloat16 is not a storage dtype: zarr 3 has no bfloat16 data type",
        ),
        (
            lambda: DataSpec(holdout=1.0),
            r"^The 'holdout' parameter of DataSpec must be a fraction in \(0, 1\)\. Got 1\.0 instead\.$",
        ),
        (
            lambda: AugmentSpec(transforms=("noise",), copies=0),
            r"^The 'copies' parameter of AugmentSpec must be at least 1\. Got 0 instead\.$",
        ),
        (
            lambda: HeadConfig(activation="swish"),
            r"^The 'activation' parameter of HeadConfig must be one of relu, gelu, tanh\. Got 'swish' instead\.$",
        ),
        (
            lambda: HeadConfig(epochs="5"),  # a string from a hand-built dict is named, not a TypeError
            r"^The 'epochs' parameter of HeadConfig must be a positive integer\. Got '5' instead\.$",
        ),
        (
            lambda: _sweep(heads=("linear", "svm")),
            r"^The 'heads' parameter of SweepConfig must be a comma list of linear, mlp, rank, conv, sum, mix, pair, "
            r"rnn, gru, lstm\. Got 'linear,svm' instead\.$",
        ),
        (
            lambda: _sweep(seeds=0),
            r"^The 'seeds' parameter of SweepConfig must be at least 1\. Got 0 instead\.$",
        ),
        (
            lambda: OptimConfig(warmup_ratio=1.0),
            r"^The 'warmup_ratio' parameter of OptimConfig must be a fraction in \[0, 1\)\. Got 1\.0 instead\.$",
        ),
        (
            lambda: FinetuneConfig.from_dict({"data": "x.csv", "classifier": "svm"}),
            r"^The 'classifier' parameter of FinetuneConfig must be one of linear, mlp\. Got 'svm' instead\.$",
        ),
        (
            lambda: FinetuneConfig.from_dict({"data": "x.csv", "schedule": "constant"}),
            r"^The 'schedule' parameter of FinetuneConfig must be one of linear, cosine, exponential, "
            r"exponential-epoch\. Got 'constant' instead\.$",
        ),
        (
            lambda: PretrainConfig.from_dict({"data": "x.csv", "pair_objective": "mlm"}),
            r"^The 'pair_objective' parameter of PretrainConfig must be one of sop, nsp, or none\. "
            r"Got 'mlm' instead\.$",
        ),
        (
            lambda: PretrainConfig.from_dict({"data": "x.csv", "vocab_size": 5}),
            r"^The 'vocab_size' parameter of PretrainConfig must be more than the 5 special tokens \(\[PAD\], .*\)\. "
            r"Got 5 instead\. Use e\.g\. 8000\.$",
        ),
    ],
    ids=lambda v: "" if callable(v) else None,
)
def test_a_bad_value_is_refused_with_the_generated_message(make, match):
    with pytest.raises(InvalidParameterError, match=match):
        make()


def test_the_defaults_pass_their_own_tables():
    from heads.probe.sweep import SweepConfig

    for config in (ExtractConfig(), DataSpec(), HeadConfig(), SweepConfig(), OptimConfig(), FinetuneConfig()):
        assert type(config).parameter_constraints  # each class declares its table
    assert PretrainConfig.from_dict({"data": "x.csv"}).pair_objective is None


def test_every_schedule_a_table_allows_is_implemented():
    from heads.protocol.schedule import SCHEDULES

    for config, key in (
        (HeadConfig, "schedule"),
        (FinetuneConfig, "optim.schedule"),
        (PretrainConfig, "optim.schedule"),
    ):
        assert set(config.parameter_constraints[key].choices or ()) <= set(SCHEDULES), config


# -- the CLI reads the same tables -----------------------------------------------------------------------------------


def _tables(command: str) -> list[type]:
    from heads.probe.sweep import SweepConfig

    return {
        "embstore extract": [ExtractConfig, DataSpec, AugmentSpec],
        "embstore plan": [ExtractConfig, DataSpec, AugmentSpec],
        "heads sweep": [SweepConfig, HeadConfig],
        "heads train": [SweepConfig, HeadConfig],
        "heads finetune": [FinetuneConfig, OptimConfig, DataSpec],
        "heads pretrain": [PretrainConfig, OptimConfig, DataSpec],
    }.get(command, [])


def _constraint(command: str, opt: click.Option) -> Constraint | None:
    """The table entry that option ``opt`` of ``command`` sets: by the option's name or its --flag, flat or nested."""
    names = {opt.name or "", opt.opts[-1].lstrip("-").replace("-", "_")}
    for config in _tables(command):
        for key, constraint in config.parameter_constraints.items():
            if key.rsplit(".", 1)[-1] in names:
                return constraint
    return None


COMMANDS = [
    (f"{group} {name}", cmd)
    for group, root in (("embstore", embstore_main), ("heads", heads_main))
    for name, cmd in root.commands.items()
]


@pytest.mark.parametrize("command, cmd", COMMANDS, ids=[c for c, _ in COMMANDS])
def test_the_cli_choices_and_listed_values_are_the_config_tables(command, cmd):
    for opt in (p for p in cmd.params if isinstance(p, click.Option)):
        constraint = _constraint(command, opt)
        inner = constraint.inner if isinstance(constraint, Optional) else constraint
        where = f"{command} {opt.opts[-1]}"
        if isinstance(opt.type, click.Choice):
            assert constraint is not None, f"{where}: a click.Choice with no constraint table entry"
            assert tuple(opt.type.choices) == constraint.choices, where
        elif isinstance(inner, Choice):
            pytest.fail(f"{where}: the table has choices {constraint.choices}, the CLI no click.Choice")
        elif isinstance(inner, ListOf) and inner.choices is not None:
            assert f"omma list of {', '.join(inner.choices)}" in (opt.help or ""), f"{where} help: {opt.help}"


def test_the_walk_sees_the_options_with_choices():
    """The test above checks something: these options are matched to their tables."""
    found = {
        (command, opt.opts[-1])
        for command, cmd in COMMANDS
        for opt in cmd.params
        if isinstance(opt, click.Option) and (c := _constraint(command, opt)) is not None and c.choices is not None
    }
    assert {
        ("embstore extract", "--pooling"),
        ("embstore extract", "--quantize"),
        ("embstore plan", "--format"),
        ("embstore extract", "--augment"),
        ("heads sweep", "--head"),
        ("heads sweep", "--combine"),
        ("heads train", "--schedule"),
        ("heads finetune", "--schedule"),
        ("heads finetune", "--mixed-precision"),
        ("heads finetune", "--augment"),
        ("heads pretrain", "--schedule"),
        ("heads pretrain", "--pair-objective"),
    } <= found


@pytest.mark.parametrize(
    "root, args, message",
    [
        (
            embstore_main,
            ["extract", "--pooling", "cls,avg"],
            "error: The --pooling option must be a comma list of cls, last, mean, max. Got 'cls,avg' instead.",
        ),
        (embstore_main, ["plan", "--chunk-rows", "0"], "error: The --chunk-rows option must be a positive integer."),
        (
            heads_main,
            ["sweep", "--head", "svm", "--store", "nowhere.zarr"],
            "error: The --head option must be a comma list of linear, mlp, rank, conv",
        ),
        (
            heads_main,
            ["finetune", "--data", "x.csv", "--head-lr", "-1"],
            "error: The --head-lr option must be positive (it is the classifier's learning rate). Got -1.0 instead. "
            "Use e.g. --head-lr 0.001.",
        ),
        (
            heads_main,
            ["pretrain", "--data", "x.csv", "--heads", "0"],
            "error: The --heads option must be a positive integer. Got 0 instead.",
        ),
    ],
)
def test_the_cli_names_the_flag(root, args, message):
    res = CliRunner().invoke(root, args)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.stderr.strip().startswith(message), res.stderr


def test_a_config_files_head_key_is_the_head_flag(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("head: mlp\n")
    assert _sweep_config(str(path), {"heads": None}).heads == ("mlp",)
    assert _sweep_config(str(path), {"heads": "linear"}).heads == ("linear",)  # the flag overrides the file
    path.write_text("head: svm\n")
    res = CliRunner().invoke(heads_main, ["sweep", "--config", str(path)])
    assert res.exit_code == 2 and "The --head option must be a comma list of linear" in res.stderr, res.stderr


def test_the_cli_reads_the_tables_without_torch():
    code = "import sys, cli.heads_cli, cli.embstore_cli; assert 'torch' not in sys.modules; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr
