"""One device rule for every command: auto picks CUDA when present; an explicit CUDA device without CUDA is the
same one-line error (exit 2) in extract, sweep, finetune and pretrain. CUDA's presence is faked with
monkeypatch, so the outcome is the same on machines with and without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factories import synthetic_csv

from cli.embstore_cli import main as embstore_main
from cli.heads_cli import main as heads_main
from embstore import ConfigError, ExtractConfig, extract
from embstore.device import resolve_device

MESSAGE = (
    "error: --device cuda asks for CUDA, but no CUDA GPU is visible; pass --device cpu, or --device auto to "
    "use CUDA only when present."
)


@pytest.mark.parametrize("present, expected", [(True, "cuda"), (False, "cpu")])
def test_auto_picks_cuda_when_present(monkeypatch, present, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: present)
    assert resolve_device(None) == resolve_device("auto") == expected
    assert resolve_device("cpu") == "cpu"
    if present:
        assert resolve_device("cuda:1") == "cuda:1"
    else:
        with pytest.raises(ConfigError, match=r"--device cuda:1 asks for CUDA, but no CUDA GPU is visible"):
            resolve_device("cuda:1")


def _args(command: str, tmp_path: Path) -> tuple[object, list[str]]:
    data = synthetic_csv(tmp_path, 60)
    common = ["--data", str(data), "--label-col", "label"]
    if command == "extract":
        return embstore_main, [
            "extract",
            "--model",
            "random:tiny-bert",
            *common,
            "-q",
            "--out",
            str(tmp_path / "s.zarr"),
        ]
    if command == "sweep":
        store = extract(
            ExtractConfig.from_dict(
                {
                    "model": "random:tiny-bert",
                    "data": str(data),
                    "label_col": "label",
                    "holdout": 0.25,
                    "layers": "-1",
                    "out": str(tmp_path / "s.zarr"),
                }
            ),
            show_progress=False,
        ).path
        return heads_main, [
            "sweep",
            "--store",
            store,
            "--layers",
            "-1",
            "--combine",
            "single",
            "--out",
            str(tmp_path / "r"),
        ]
    if command == "finetune":
        return heads_main, [
            "finetune",
            "--model",
            "random:tiny-bert",
            *common,
            "--holdout",
            "0.25",
            "--epochs",
            "1",
            "--no-progress",
            "--out",
            str(tmp_path / "r"),
        ]
    return heads_main, [
        "pretrain",
        "--data",
        str(data),
        "--vocab-size",
        "100",
        "--layers",
        "1",
        "--hidden",
        "16",
        "--heads",
        "2",
        "--max-steps",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path / "r"),
    ]


@pytest.mark.parametrize("command", ["extract", "sweep", "finetune", "pretrain"])
def test_explicit_cuda_without_cuda_is_the_same_one_line_error(command, tmp_path, monkeypatch):
    cli, args = _args(command, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(cli, [*args, "--device", "cuda"])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines() == [MESSAGE]
    assert not (tmp_path / "r").exists()
