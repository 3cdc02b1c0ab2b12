"""Layer specifications: ``all``, ``9-12``, ``-4--1``, ``3,6,12``, ``last4``.

Layer 0 is the embedding output, 1..L the encoder layers; negative indices count from the
end (-1 is layer L). The same parser serves extraction (against the model) and head
training (against the store), so both accept exactly the same strings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from embstore.errors import LayerSpecError

__all__ = ["parse_layers", "format_layers"]

_RANGE = re.compile(r"^(-?\d+)\s*-\s*(-?\d+)$")
_LAST = re.compile(r"^last(\d+)$")


def _resolve(index: int, available: Sequence[int], spec: str, option: str) -> int:
    """Map one (possibly negative) index onto ``available``; raise naming the valid range."""
    n = len(available)
    pos = index + n if index < 0 else available.index(index) if index in available else None
    if pos is None or not 0 <= pos < n:
        raise LayerSpecError(
            f"The '{option}' option must name layers in [{available[0]}, {available[-1]}] "
            f"(or -1..-{n} from the end); got {spec!r}. Use e.g. 'all', "
            f"'{available[-1]}', '{available[0]}-{available[-1]}' or '-2--1'."
        )
    return available[pos]


def parse_layers(spec: str | Sequence[int], available: Sequence[int], option: str = "layers") -> list[int]:
    """Expand ``spec`` to a sorted list of distinct layer indices drawn from ``available``.

    ``available`` is the ascending list of layers that exist (0..L for a model, the stored
    subset for a store). Negative indices are positions from the end of ``available``.
    """
    available = list(available)
    if not available:
        raise LayerSpecError(f"There are no layers to choose from for '{option}'.")
    if not isinstance(spec, str):
        return sorted({_resolve(int(i), available, str(list(spec)), option) for i in spec})
    text = spec.strip().lower()
    if text in ("", "all"):
        return list(available)
    chosen: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        last = _LAST.match(part)
        ranged = _RANGE.match(part)
        if last:
            k = int(last.group(1))
            if not 1 <= k <= len(available):
                raise LayerSpecError(
                    f"The '{option}' option asks for {part!r} but only {len(available)} layers "
                    f"exist ([{available[0]}, {available[-1]}]); use last1..last{len(available)}."
                )
            chosen.update(available[-k:])
        elif ranged:
            lo = _resolve(int(ranged.group(1)), available, spec, option)
            hi = _resolve(int(ranged.group(2)), available, spec, option)
            if lo > hi:
                raise LayerSpecError(
                    f"The '{option}' range {part!r} is empty (start {lo} > end {hi}); "
                    f"write the smaller layer first, e.g. '{hi}-{lo}'."
                )
            chosen.update(layer for layer in available if lo <= layer <= hi)
        elif re.fullmatch(r"-?\d+", part):
            chosen.add(_resolve(int(part), available, spec, option))
        else:
            raise LayerSpecError(
                f"Cannot read the '{option}' value {spec!r}: use 'all', a list '3,6', "
                f"a range '9-12', negative indices '-4--1' or 'last4'."
            )
    return sorted(chosen)


def format_layers(layers: Sequence[int]) -> str:
    """Compact text for a layer list: [9, 10, 11, 12] -> '9-12', [3, 6] -> '3,6'."""
    layers = sorted(layers)
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(str(x) for x in layers)
