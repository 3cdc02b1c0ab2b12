"""What every product (probe, fine-tune, pretrain) shares: split roles, carves, folds, early stopping, the
learning-rate schedule and the AdamW builder.

Which rows train, which rows choose (validation) and which rows are scored for the report (evaluation) is
decided here once, for ``heads sweep``/``heads train`` (probe) and ``heads finetune`` (whose data is not a store: it
calls
:func:`carve`, :func:`make_split` and :func:`fold_rounds` on the loaded rows):

* :func:`split_roles` names the training and evaluation splits of a store (a one-split store is carved);
* :func:`carve` (:mod:`embstore.data.carve`) is the one seeded carve of a share of rows, stratified or
  group-disjoint, on source-row ids; every carve below is it;
* :func:`carve_with_copies` carves a store's original rows, its augmented copies following their source;
* :func:`validation_carve` is the carve for choosing (epoch, L2 strength, configuration) in a sweep, an estimator
  (:func:`make_split`) and each fine-tuning round; it refuses, naming the option to change, a carve that cannot
  hold every class;
* :func:`fold_rounds` gives the ``--folds K`` rounds (:func:`embstore.data.carve.folds`);
* :class:`BestTracker` is early stopping on validation macro-F1; :func:`make_split` carves validation rows
  for a single estimator that was given none.

``roles``, ``carves``, ``folds`` and ``stopping`` are plain numpy and scikit-learn; ``schedule`` and ``optim`` (torch)
are not imported by ``import heads.protocol``.
"""

from embstore.data.carve import carve
from heads.protocol.carves import Split, carve_with_copies, make_split, validation_carve
from heads.protocol.folds import Round, fold_rounds
from heads.protocol.roles import split_roles
from heads.protocol.stopping import BestTracker, scores

__all__ = [
    "Split",
    "make_split",
    "BestTracker",
    "scores",
    "carve",
    "validation_carve",
    "carve_with_copies",
    "split_roles",
    "Round",
    "fold_rounds",
]
