"""Where rows come from: the data spec, tables on disk, column discovery, the one carve, audio rules, augmenters.

Imports only :mod:`embstore.errors` and :mod:`embstore.store.fingerprint` (file hashes) from the rest of embstore.
"""
