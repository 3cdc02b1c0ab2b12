"""The store: its on-disk layout (only :mod:`embstore.store.layout` names groups, arrays and attributes), the
reader, the zarr and HDF5 backends, the writer, chunk digests, the writer's lock, file fingerprints and the catalog
of stores in a cache directory. Imports nothing from embstore but :mod:`embstore.errors` and :mod:`embstore.layers`.
"""
