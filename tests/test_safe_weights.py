"""No pickle by default: pickle weights are refused unless --allow-pickle (then tensors only), and
everything we write (models, pretraining checkpoints) is safetensors + JSON."""

from __future__ import annotations

import os
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.embstore_cli import main
from embstore import ConfigError, ExtractConfig, extract, open_store
from embstore.backbones.registry import load_backbone
from heads.training.checkpoint import load_training_state, save_training_state

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt"}


@pytest.fixture
def pickle_dir(tmp_path: Path) -> Path:
    """random:tiny-bert saved the old way: config, tokenizer and a torch.save'd pytorch_model.bin."""
    bb = load_backbone("random:tiny-bert")
    d = tmp_path / "old-bert"
    d.mkdir()
    bb.model.config.save_pretrained(d)
    bb.tokenizer.save_pretrained(d)
    torch.save(bb.model.state_dict(), d / "pytorch_model.bin")
    return d


def test_pickle_weights_are_refused_unless_allowed(pickle_dir, tiny_csv):
    with pytest.raises(
        ConfigError,
        match=r"pytorch_model\.bin holds the model weights as a pickle file.*pass --allow-pickle.*save_pretrained",
    ):
        load_backbone(str(pickle_dir))
    res = CliRunner().invoke(
        main, ["extract", "--model", str(pickle_dir), "--data", str(tiny_csv), "--no-labels", "-q"]
    )
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "--allow-pickle" in res.output
    allowed = open_store(
        extract(
            ExtractConfig.from_dict(dict(model=str(pickle_dir), data=str(tiny_csv), allow_pickle=True)),
            show_progress=False,
        ).path
    )
    same = open_store(
        extract(ExtractConfig.from_dict(dict(model="random:tiny-bert", data=str(tiny_csv))), show_progress=False).path
    )
    assert allowed.provenance.model["weight_files"] == ["pytorch_model.bin"]
    np.testing.assert_array_equal(allowed.pooled("all", "mean"), same.pooled("all", "mean"))


def test_allowed_pickle_still_loads_tensors_only(pickle_dir):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {pickle_dir / 'ran'}",))

    torch.save({"embeddings.word_embeddings.weight": Payload()}, pickle_dir / "pytorch_model.bin")
    with pytest.raises(
        ConfigError,
        match=r"pickle weights in .*old-bert hold more than tensors, so torch.load\(weights_only=True\) refused",
    ):
        load_backbone(str(pickle_dir), allow_pickle=True)
    assert not (pickle_dir / "ran").exists()


def test_a_checkpoint_round_trip_restores_tied_weights_optimizer_schedule_and_rng(tmp_path):
    def build():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
        net[1].weight = net[0].weight  # tied, like BERT's MLM decoder
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        return net, opt, sched

    acc = SimpleNamespace(is_main_process=True, process_index=0, step=7, scaler=None, unwrap_model=lambda m: m)
    net, opt, sched = build()
    for _ in range(3):
        net(torch.tensor([1, 2, 3])).sum().backward()
        opt.step(), sched.step(), opt.zero_grad()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_training_state(acc, tmp_path / "ckpt", net, opt, sched)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    assert not {f.suffix for f in (tmp_path / "ckpt").iterdir()} & PICKLE_SUFFIXES

    net2, opt2, sched2 = build()
    acc2 = SimpleNamespace(**{**vars(acc), "step": 0})
    load_training_state(acc2, tmp_path / "ckpt", net2, opt2, sched2)
    assert acc2.step == 7 and net2[1].weight is net2[0].weight
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert all(torch.equal(s1["state"][k][n], s2["state"][k][n]) for k in s1["state"] for n in s1["state"][k])
    assert sched2.state_dict() == sched.state_dict()
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    with pytest.raises(
        ConfigError, match=r"holds no checkpoint in embstore's safetensors format.*rerun without --resume"
    ):
        load_training_state(acc2, tmp_path, net2, opt2, sched2)
