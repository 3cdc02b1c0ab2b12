"""HeadClassifier over every head kind, its training loop and persistence, and the batched linear probes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from factories import layered

from embstore.errors import ConfigError, EmbstoreError
from embstore.store.reader import TokenStates
from heads.probe.adamw import fit_linear_probes
from heads.probe.card import HeadCard
from heads.probe.config import HeadConfig
from heads.probe.estimator import HeadClassifier, HeadNotFoundError, NotFittedError, Ragged

N, K, H, C = 240, 3, 24, 3
SMALL = dict(
    hidden=(16,),
    conv_hidden=16,
    sum_hidden=16,
    rnn_hidden=16,
    epochs=8,
    batch_size=32,
    lr=1e-2,
    patience=0,
    dropout=0.0,
)


def _ragged(seed: int, n: int = N, h: int = H) -> tuple[Ragged, np.ndarray]:
    """Ragged tokens, lengths 3..12, token means depending on the class."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % C).astype(np.int64)
    lengths = rng.integers(3, 13, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    means = np.random.default_rng(7).normal(size=(C, h)) * 1.5
    values = means[np.repeat(y, lengths)] + rng.normal(size=(int(offsets[-1]), h))
    return Ragged(values=values.astype(np.float16), offsets=offsets), y


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    Xl, y = layered(0, n=N, k=K, h=H)
    Xl_te, y_te = layered(1, n=120, k=K, h=H)
    Xb, _ = layered(2, n=N, k=K, h=H)  # second tower: same labels, independent noise
    Xb_te, _ = layered(3, n=120, k=K, h=H)
    tok, ty = _ragged(0)
    tok_te, ty_te = _ragged(1, n=120)
    return {
        "layered": (Xl, y, Xl_te, y_te),
        "pooled": (Xl[:, -1], y, Xl_te[:, -1], y_te),
        "pair": ((Xl, Xb), y, (Xl_te, Xb_te), y_te),
        "tokens": (tok, ty, tok_te, ty_te),
    }


INPUT_OF = {
    "linear": "pooled",
    "mlp": "pooled",
    "conv": "layered",
    "sum": "layered",
    "mix": "layered",
    "pair": "pair",
    "rnn": "tokens",
    "gru": "tokens",
    "lstm": "tokens",
}


@pytest.mark.parametrize("head", list(INPUT_OF))
def test_every_head_learns(head: str, data: dict[str, Any]) -> None:
    X, y, X_te, y_te = data[INPUT_OF[head]]
    clf = HeadClassifier(head=head, **SMALL).fit(X, y)
    proba = clf.predict_proba(X_te)
    assert proba.shape == (len(y_te), C) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    majority = np.bincount(y_te).max() / len(y_te)
    assert np.mean(clf.predict(X_te) == y_te) > majority + 0.3
    assert clf.predict(X_te).dtype == np.int64
    assert len(clf.history_) == SMALL["epochs"] and clf.best_epoch_ == SMALL["epochs"] - 1  # patience 0: last


def test_linear_flattens_layers(data: dict[str, Any]) -> None:
    X, y, X_te, y_te = data["layered"]
    clf = HeadClassifier(head="linear", **SMALL).fit(X, y)
    assert clf.module_.linear.in_features == K * H  # type: ignore[union-attr]
    assert np.mean(clf.predict(X_te) == y_te) > 0.9


@pytest.mark.parametrize(
    "head,options",
    [
        pytest.param("gru", {"aggregate": "last", "bidirectional": True}, marks=pytest.mark.slow),
        ("lstm", {"aggregate": "max", "rnn_layers": 2, "dropout": 0.1}),
    ],
)
def test_recurrent_variants(head: str, options: dict[str, Any], data: dict[str, Any]) -> None:
    tok, y, tok_te, y_te = data["tokens"]
    clf = HeadClassifier(head=head, **{**SMALL, **options}).fit(tok, y)
    assert np.mean(clf.predict(tok_te) == y_te) > 0.7
    # The store's TokenStates is accepted as well as Ragged, with identical results.
    ts = TokenStates(values=tok_te.values, offsets=tok_te.offsets)
    np.testing.assert_array_equal(clf.predict_proba(ts), clf.predict_proba(tok_te))
    # Rows do not depend on their batch (packing keeps padding out), so a taken subset predicts the same.
    idx = np.array([5, 0, 77, 3])
    sub = tok_te.take(idx)
    assert len(sub) == 4 and np.array_equal(
        sub.values[: sub.offsets[1]], tok_te.values[tok_te.offsets[5] : tok_te.offsets[6]]
    )
    np.testing.assert_allclose(clf.predict_proba(sub), clf.predict_proba(tok_te)[idx], atol=1e-6)


def test_mix_weights(data: dict[str, Any]) -> None:
    X, y, _, _ = data["layered"]
    clf = HeadClassifier(head="mix", **SMALL).fit(X, y)
    assert clf.mix_weights_.shape == (K,)
    assert clf.mix_weights_.sum() == pytest.approx(1.0)
    assert not np.allclose(clf.mix_weights_, 1 / K)  # trained away from the uniform init
    assert isinstance(clf.mix_scale_, float) and clf.mix_scale_ != 1.0


@pytest.mark.parametrize("head", ["mlp", "gru"])
def test_deterministic(head: str, data: dict[str, Any]) -> None:
    X, y, X_te, _ = data[INPUT_OF[head]]
    cfg = HeadConfig(head=head, **{**SMALL, "epochs": 3, "dropout": 0.2})
    a, b = HeadClassifier(cfg).fit(X, y), HeadClassifier(cfg).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X_te), b.predict_proba(X_te))
    for (name, pa), pb in zip(a.module_.state_dict().items(), b.module_.state_dict().values()):
        assert torch.equal(pa, pb), name
    c = HeadClassifier(cfg.replace(seed=1)).fit(X, y)
    assert any(
        not torch.equal(pa, pc) for pa, pc in zip(a.module_.state_dict().values(), c.module_.state_dict().values())
    )


def test_early_stopping_restores_best(data: dict[str, Any]) -> None:
    X, y, X_te, y_te = data["pooled"]
    # Noisy labels make validation F1 plateau and wobble, so patience triggers.
    rng = np.random.default_rng(0)
    y_noisy = np.where(rng.random(N) < 0.4, rng.integers(0, C, N), y)
    yv_noisy = np.where(rng.random(len(y_te)) < 0.4, rng.integers(0, C, len(y_te)), y_te)
    opts = {**SMALL, "epochs": 40, "lr": 5e-2}
    clf = HeadClassifier(head="mlp", **{**opts, "patience": 2}).fit(X, y_noisy, X_te, yv_noisy)
    f1 = [h["val_f1_macro"] for h in clf.history_]
    assert len(clf.history_) < 40  # stopped early
    assert clf.best_epoch_ == int(np.argmax(f1))  # earliest best
    assert len(clf.history_) == clf.best_epoch_ + 1 + 2  # exactly patience epochs after the best
    assert all(h["epoch"] == i for i, h in enumerate(clf.history_))
    # Restored: identical to a run that simply ends after the best epoch (same rows, batches, schedule).
    short = HeadClassifier(head="mlp", **{**opts, "epochs": clf.best_epoch_ + 1}).fit(X, y_noisy, X_te, yv_noisy)
    for a, b in zip(clf.module_.state_dict().values(), short.module_.state_dict().values()):
        assert torch.equal(a, b)
    assert np.mean(clf.predict(X_te) == yv_noisy) == pytest.approx(clf.history_[clf.best_epoch_]["val_accuracy"])


def test_carved_validation_is_stratified(data: dict[str, Any]) -> None:
    X, y, _, _ = data["pooled"]
    from heads.protocol import make_split

    split = make_split(y, None, validation_fraction=0.25, seed=3, patience=HeadConfig().patience)
    assert split.val_idx is not None and len(split.val_idx) == 60
    assert np.bincount(y[split.val_idx]).tolist() == [20, 20, 20]
    assert not set(split.val_idx) & set(split.train_idx)
    clf = HeadClassifier(head="linear", **{**SMALL, "patience": 2, "validation_fraction": 0.25}).fit(X, y)
    assert clf.history_[0]["val_accuracy"] is not None


def test_explicit_validation_set(data: dict[str, Any]) -> None:
    X, y, X_te, y_te = data["pooled"]
    clf = HeadClassifier(head="linear", **{**SMALL, "patience": 3}).fit(X, y, X_te, y_te)
    best = clf.history_[clf.best_epoch_]
    assert np.mean(clf.predict(X_te) == y_te) == pytest.approx(best["val_accuracy"])


def test_class_weight_balanced(data: dict[str, Any]) -> None:
    X, y, X_te, y_te = data["pooled"]
    # Keep 5 rows of class 2 out of 80 and add noise so the plain loss neglects it.
    keep = np.concatenate([np.flatnonzero(y != 2), np.flatnonzero(y == 2)[:5]])
    rng = np.random.default_rng(0)
    Xi = (X[keep].astype(np.float32) + rng.normal(scale=1.5, size=X[keep].shape)).astype(np.float16)
    opts = {**SMALL, "epochs": 3, "lr": 3e-3}
    plain = HeadClassifier(head="linear", **opts).fit(Xi, y[keep])
    balanced = HeadClassifier(head="linear", **opts, class_weight="balanced").fit(Xi, y[keep])
    recall = lambda clf: np.mean(clf.predict(X_te[y_te == 2]) == 2)  # noqa: E731
    assert recall(balanced) > recall(plain)
    assert recall(balanced) > 0.5


@pytest.mark.parametrize(
    "schedule,expected",
    [
        ("constant", lambda e: 0.01),
        ("exponential", lambda e: 0.01 * 0.5**e),
        ("cosine", lambda e: 0.01 * (1 + np.cos(np.pi * e / 4)) / 2),
    ],
)
def test_schedules(schedule: str, expected: Any, data: dict[str, Any]) -> None:
    X, y, _, _ = data["pooled"]
    clf = HeadClassifier(head="linear", **{**SMALL, "epochs": 4, "schedule": schedule, "gamma": 0.5}).fit(X, y)
    lrs = [h["lr"] for h in clf.history_]
    np.testing.assert_allclose(lrs, [expected(e) for e in range(4)], rtol=1e-6)


def test_not_fitted(tmp_path: Path) -> None:
    clf = HeadClassifier(head="mlp")
    for call in (
        lambda: clf.predict(np.zeros((2, 4))),
        lambda: clf.predict_proba(np.zeros((2, 4))),
        lambda: clf.save(tmp_path),
    ):
        with pytest.raises(NotFittedError, match=r"HeadClassifier\(head='mlp'\) is not fitted yet; call fit"):
            call()
    assert issubclass(NotFittedError, EmbstoreError) and issubclass(NotFittedError, ValueError)


@pytest.mark.parametrize(
    "head,X,match",
    [
        (
            "mix",
            np.zeros((10, 32), np.float16),
            r"'mix' head takes \(n, layers, hidden\) features; got shape \(10, 32\)",
        ),
        ("conv", np.zeros((10, 32), np.float16), r"'conv' head takes \(n, layers, hidden\)"),
        ("linear", np.zeros((10, 2, 3, 4)), r"'linear' head takes \(n, dim\) or \(n, layers, hidden\)"),
        ("gru", np.zeros((10, 3, 24)), r"'gru' head takes ragged token states .*got shape \(10, 3, 24\)"),
        ("pair", np.zeros((10, 3, 24)), r"'pair' head takes two towers .*got shape \(10, 3, 24\)"),
        ("pair", (np.zeros((10, 3, 24)), np.zeros((9, 3, 24))), r"same n; got shapes \(10, 3, 24\) and \(9, 3, 24\)"),
        ("mlp", (np.zeros((10, 4)),), r"'mlp' head takes one feature array; got a tuple of 1 items"),
    ],
)
def test_input_validation(head: str, X: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        HeadClassifier(head=head).fit(X, np.zeros(10, np.int64))


def test_label_and_width_validation(data: dict[str, Any]) -> None:
    X, y, _, _ = data["pooled"]
    with pytest.raises(ConfigError, match=r"one label per feature row \(240\); got shape \(239,\)"):
        HeadClassifier(head="linear").fit(X, y[:-1])
    with pytest.raises(ConfigError, match=r"integer class indices 0..C-1; got dtype float64"):
        HeadClassifier(head="linear").fit(X, y.astype(float))
    with pytest.raises(ConfigError, match=r"n_classes is 2 but the labels go up to 2"):
        HeadClassifier(head="linear").fit(X, y, n_classes=2)
    with pytest.raises(ConfigError, match=r"Unknown HeadClassifier options \['hiden'\]"):
        HeadClassifier(head="mlp", hiden=(3,))
    clf = HeadClassifier(head="linear", **{**SMALL, "epochs": 1}).fit(X, y)
    with pytest.raises(ConfigError, match=r"fitted on: \(n, 24\); got \(n, 12\)"):
        clf.predict(X[:, :12])


@pytest.mark.parametrize("head", ["mlp", "mix", "gru", "pair"])
def test_save_load_round_trip(head: str, data: dict[str, Any], tmp_path: Path) -> None:
    X, y, X_te, _ = data[INPUT_OF[head]]
    clf = HeadClassifier(head=head, **{**SMALL, "epochs": 2}).fit(X, y)
    card = HeadCard(layers=(1, 2), combine="concat", pooling="mean", head=head, model={"name": "m"}, store_id="abc")
    clf.save(tmp_path / "h", card=card)
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["head.json", "head.safetensors"]
    back = HeadClassifier.load(tmp_path / "h")
    np.testing.assert_array_equal(back.predict_proba(X_te), clf.predict_proba(X_te))
    assert back.config == clf.config and back.history_ == clf.history_ and back.best_epoch_ == clf.best_epoch_
    assert back.card_ == card == HeadClassifier.read_card(tmp_path / "h")
    assert HeadClassifier.load(clf.save(tmp_path / "bare")).card_ is None  # saved outside a sweep: no card
    if head == "mix":
        np.testing.assert_allclose(back.mix_weights_, clf.mix_weights_)
    with pytest.raises(HeadNotFoundError, match="holds no saved head"):
        HeadClassifier.load(tmp_path / "missing")


@pytest.mark.parametrize("patience", [0, 2])
def test_batched_probes_equal_single(patience: int) -> None:
    Xl, y = layered(5, n=180, k=4, h=12)
    rng = np.random.default_rng(9)
    y = np.where(rng.random(len(y)) < 0.25, rng.integers(0, C, len(y)), y)  # noise: probes stop at different epochs
    feats = [Xl[:, 0], Xl[:, 3], Xl[:, 1:3].reshape(len(y), -1), Xl[:, 2]]  # widths 12, 12, 24, 12
    Xv, yv = layered(6, n=60, k=4, h=12)
    val = [Xv[:, 0], Xv[:, 3], Xv[:, 1:3].reshape(len(yv), -1), Xv[:, 2]]
    cfg = HeadConfig(
        head="linear",
        epochs=12,
        batch_size=32,
        lr=3e-2,
        patience=patience,
        class_weight="balanced",
        schedule="exponential",
        gamma=0.8,
    )
    probes = fit_linear_probes(feats, y, None, None, cfg)
    assert len(probes) == len(feats)
    for f, fv, probe in zip(feats, val, probes):
        single = HeadClassifier(cfg).fit(f, y)
        np.testing.assert_array_equal(probe.predict(fv), single.predict(fv))
        assert probe.best_epoch_ == single.best_epoch_ and len(probe.history_) == len(single.history_)
        for hp, hs in zip(probe.history_, single.history_):
            assert hp["val_accuracy"] == hs["val_accuracy"] and hp["lr"] == pytest.approx(hs["lr"])
            assert hp["train_loss"] == pytest.approx(hs["train_loss"], rel=1e-5)
        for pp, ps in zip(probe.module_.state_dict().values(), single.module_.state_dict().values()):
            torch.testing.assert_close(pp, ps, atol=1e-5, rtol=0)
    if patience:
        assert len({len(p.history_) for p in probes}) > 1  # per-probe stopping was exercised


def test_batched_probes_with_validation_set() -> None:
    Xl, y = layered(5, n=120, k=3, h=12)
    Xv, yv = layered(6, n=60, k=3, h=12)
    cfg = HeadConfig(head="linear", epochs=4, batch_size=32, lr=1e-2, patience=2)
    probes = fit_linear_probes([Xl[:, 0], Xl[:, 2]], y, [Xv[:, 0], Xv[:, 2]], yv, cfg)
    for g, probe in enumerate(probes):
        single = HeadClassifier(cfg).fit(Xl[:, 2 * g], y, Xv[:, 2 * g], yv)
        assert [h["val_f1_macro"] for h in probe.history_] == [h["val_f1_macro"] for h in single.history_]
    with pytest.raises(ConfigError, match=r"val_features must hold one array per probe \(2\); got 1"):
        fit_linear_probes([Xl[:, 0], Xl[:, 2]], y, [Xv[:, 0]], yv, cfg)
