"""Backbones: the ``--model`` registry, the anatomy map of each model family, the pruned-model format, int8.

Imports :mod:`embstore.errors`, :mod:`embstore.layers` and :mod:`embstore.store.fingerprint` from the rest of
embstore; never the extraction or the data packages.
"""
