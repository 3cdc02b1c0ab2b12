"""Negatives by replacement, as the sentence-vs-definition study built them (docs/studies.md, study D).

A pairs file holds a context sentence and a definition per row, label 1 when the definition fits the word in
context. The study made the negatives harder to tell apart by their definition alone: each chosen label-0 row's
sentence is replaced by one of a few fixed sentences, and its definition by the label-1 definition (of the same
word, with ``--key-col``). It did this for part of the negatives, and in a second run for all of them.

    python examples/replace_negatives.py pairs.csv replaced.csv --sentence-col sentence1 \\
        --definition-col sentence2 --label-col label --key-col word --fraction 1.0 --seed 0

- ``--fraction F``: the share of the label-0 rows replaced (seeded choice); the others are kept as they are.
- ``--fixed FILE``: the fixed sentences, one per line; without it, ``--n-fixed`` (10) distinct sentences are drawn
  (seeded) from the file's own sentences.
- ``--key-col COL``: the column naming the word; a replaced row takes the definition of a label-1 row of the same
  word (seeded choice), or keeps its own when the word has none. Without it only the sentence is replaced.

The output has the input's columns plus ``replaced`` (1 for a replaced row); labels are unchanged. Then extract it
like any pairs file (``embstore extract --data replaced.csv --text-col sentence1 --text-pair-col sentence2
--towers``). No row of the evaluation split should be replaced: run this on the training file only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def replace_negatives(
    df: pd.DataFrame,
    *,
    sentence_col: str,
    definition_col: str,
    label_col: str,
    fraction: float,
    seed: int,
    fixed: list[str],
    key_col: str | None = None,
) -> pd.DataFrame:
    """A copy of ``df`` with ``fraction`` of its label-0 rows replaced (see the module docstring) and a ``replaced``
    column."""
    for col in [sentence_col, definition_col, label_col] + ([key_col] if key_col else []):
        if col not in df.columns:
            raise SystemExit(
                f"error: column {col!r} is not in the pairs file; its columns are {', '.join(df.columns)}."
            )
    if not 0 <= fraction <= 1:
        raise SystemExit(f"error: --fraction must be in [0, 1]; got {fraction}.")
    if not fixed:
        raise SystemExit("error: no fixed sentences; pass --fixed FILE with one sentence per line, or --n-fixed N.")
    rng = np.random.default_rng(seed)
    out = df.copy()
    out["replaced"] = 0
    negatives = np.flatnonzero(out[label_col].to_numpy() == 0)
    chosen = np.sort(rng.choice(negatives, size=int(round(fraction * len(negatives))), replace=False))
    positives: dict[object, list[str]] = {}
    if key_col is not None:
        for key, definition in out.loc[out[label_col] == 1, [key_col, definition_col]].itertuples(index=False):
            positives.setdefault(key, []).append(definition)
    sentence_at, definition_at = out.columns.get_loc(sentence_col), out.columns.get_loc(definition_col)
    for i in chosen:
        out.iat[i, sentence_at] = fixed[int(rng.integers(len(fixed)))]
        if key_col is not None:
            options = positives.get(out.iloc[i][key_col])
            if options:
                out.iat[i, definition_at] = options[int(rng.integers(len(options)))]
        out.iat[i, out.columns.get_loc("replaced")] = 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", type=Path, help="CSV of pairs (sentence, definition, label).")
    parser.add_argument("out", type=Path, help="CSV to write.")
    parser.add_argument("--sentence-col", default="sentence")
    parser.add_argument("--definition-col", default="definition")
    parser.add_argument("--label-col", default="label")
    parser.add_argument("--key-col", default=None, help="Column naming the word (see the module docstring).")
    parser.add_argument("--fraction", type=float, default=1.0, help="Share of the label-0 rows replaced.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fixed", type=Path, default=None, help="Fixed sentences, one per line.")
    parser.add_argument("--n-fixed", type=int, default=10, help="Fixed sentences drawn from the file without --fixed.")
    args = parser.parse_args(argv)
    df = pd.read_csv(args.pairs)
    if args.fixed is not None:
        fixed = [line.strip() for line in args.fixed.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        if args.sentence_col not in df.columns:
            raise SystemExit(f"error: column {args.sentence_col!r} is not in {args.pairs}.")
        pool = sorted(set(df[args.sentence_col].astype(str)))
        picked = np.random.default_rng([args.seed, 1]).choice(
            len(pool), size=min(args.n_fixed, len(pool)), replace=False
        )
        fixed = [pool[i] for i in sorted(picked)]
    out = replace_negatives(
        df,
        sentence_col=args.sentence_col,
        definition_col=args.definition_col,
        label_col=args.label_col,
        fraction=args.fraction,
        seed=args.seed,
        fixed=fixed,
        key_col=args.key_col,
    )
    out.to_csv(args.out, index=False)
    n_neg = int((df[args.label_col] == 0).sum())
    print(
        f"{int(out['replaced'].sum())} of {n_neg} negatives replaced with {len(fixed)} fixed sentences; "
        f"wrote {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
