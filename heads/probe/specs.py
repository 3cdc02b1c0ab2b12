"""What a sweep trains: layer groups x combinations x poolings x heads, expanded from specs.

``--layers 9-12 --combine single,concat,sum,mean,mix`` becomes each single layer 9..12 plus
each combination over the whole range. Layer specs are parsed by embstore's own parser
against the store's layers, so the error names the store's valid range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from embstore.errors import Choice, ConfigError, ListOf
from embstore.layers import format_layers, parse_layers
from heads.probe.config import LAYERED_HEADS, PAIR_HEADS, POOLED_HEADS, TOKEN_HEADS, HeadConfig

__all__ = ["COMBINES", "COMBINE", "Combo", "parse_combine", "expand", "sized"]

COMBINES = ("single", "concat", "sum", "mean", "mix")
COMBINE = ListOf(Choice(COMBINES))
"""What ``--combine`` accepts (``SweepConfig``'s constraint table holds it)."""


@dataclass(frozen=True)
class Combo:
    """One trained configuration (before seeds and folds)."""

    layers: tuple[int, ...]
    combine: str
    """single, concat, sum, mean, mix (pooled heads); single or the head's own name (conv/sum/mix/pair);
    tokens (recurrent heads)."""
    pooling: str
    """A stored pooling, or 'tokens'."""
    head: str
    """The head kind that is trained (combine 'mix' always trains the scalar-mix head)."""
    size: int | None = None
    """The probe's complexity where a sweep tries several: the rank of a ``rank`` head, the hidden width of an
    ``mlp`` head (``heads sweep --rank``, ``--mlp-widths``); None: the head configuration's own."""

    @property
    def layers_label(self) -> str:
        return format_layers(self.layers)

    @property
    def head_label(self) -> str:
        """The head as the results name it: 'rank-8', 'mlp-256', or the head kind."""
        return self.head if self.size is None else f"{self.head}-{self.size}"

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.layers_label, self.combine, self.pooling, self.head_label)

    def config(self, cfg: HeadConfig) -> HeadConfig:
        """``cfg`` for this configuration's head: its kind, and its rank or hidden width when it has a size; for a
        pair head of ``--combine sum``, the fixed sum of each tower's layers."""
        if self.head == "pair":
            return cfg.replace(head="pair", tower_merge="sum" if self.combine == "sum" else cfg.tower_merge)
        if self.size is None:
            return cfg.replace(head=self.head)
        if self.head == "rank":
            return cfg.replace(head="rank", rank=self.size)
        return cfg.replace(head=self.head, hidden=(self.size,))


def sized(combos: Sequence[Combo], ranks: Sequence[int], widths: Sequence[int]) -> list[Combo]:
    """``combos`` with every ``rank`` head tried at each of ``ranks`` and every ``mlp`` head at each hidden width
    of ``widths`` (none given: the head configuration's own); one configuration each, in order."""
    out: list[Combo] = []
    for c in combos:
        sizes = ranks if c.head == "rank" else widths if c.head == "mlp" else ()
        out += [dataclasses.replace(c, size=int(v)) for v in sizes] if sizes else [c]
    return out


def parse_combine(spec: str | Sequence[str]) -> tuple[str, ...]:
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    COMBINE.check("combine", parts, "SweepConfig")
    return tuple(dict.fromkeys(parts))


def expand(
    *,
    layers: str,
    combine: Sequence[str],
    poolings: Sequence[str],
    heads: Sequence[str],
    store_layers: Sequence[int],
    store_poolings: Sequence[str],
    token_layers: Sequence[int],
    towers: Sequence[str],
    store_path: str,
) -> list[Combo]:
    """Every configuration of a sweep, in report order (singles by layer, then combinations)."""
    chosen = parse_layers(layers, store_layers, "layers")
    missing = [p for p in poolings if p not in store_poolings]
    if missing:
        raise ConfigError(f"Pooling {','.join(missing)} is not in {store_path}; it stores {', '.join(store_poolings)}.")
    combos: list[Combo] = []
    group = tuple(chosen)
    multi = len(group) > 1
    for head in heads:
        if head in TOKEN_HEADS:
            usable = [x for x in chosen if x in token_layers]
            if not usable:
                stored = ",".join(map(str, token_layers)) or "none"
                raise ConfigError(
                    f"The '{head}' head reads per-token states, but {store_path} has them for layers {stored} "
                    f"and --layers asks for {format_layers(chosen)}; re-extract with --tokens {chosen[-1]} or pick a "
                    f"stored layer."
                )
            combos += [Combo((x,), "tokens", "tokens", head) for x in usable]
            continue
        if head in PAIR_HEADS and len(towers) != 2:
            raise ConfigError(
                f"The 'pair' head needs a store extracted in towers mode (two texts encoded separately); "
                f"{store_path} has one tower. Re-extract with --text-pair-col COL --towers."
            )
        if head not in PAIR_HEADS and len(towers) != 1:
            raise ConfigError(
                f"{store_path} holds two towers (towers mode); use --head pair, or re-extract the pair jointly."
            )
        for pooling in poolings:
            if "single" in combine:
                combos += [Combo((x,), "single", pooling, head) for x in chosen]
            if not multi:
                continue
            if head in POOLED_HEADS:
                for c in combine:
                    if c in ("concat", "sum", "mean"):
                        combos.append(Combo(group, c, pooling, head))
                if "mix" in combine and not any(
                    cb.key == (format_layers(group), "mix", pooling, "mix") for cb in combos
                ):
                    combos.append(Combo(group, "mix", pooling, "mix"))
            elif head in PAIR_HEADS:  # --combine sum: each tower's fixed sum; any other: its learnt scalar mix
                if "sum" in combine:
                    combos.append(Combo(group, "sum", pooling, head))
                if any(c not in ("single", "sum") for c in combine):
                    combos.append(Combo(group, head, pooling, head))
            elif head in LAYERED_HEADS:
                if any(c != "single" for c in combine):
                    combos.append(Combo(group, head, pooling, head))
    if not combos:
        raise ConfigError(
            f"Nothing to train: --layers {layers} with --combine {','.join(combine)} gives no configuration; add "
            f"'single' or choose several layers."
        )
    return combos
