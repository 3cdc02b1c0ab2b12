"""One extraction: the plan and the store id, the cost estimate (``embstore plan``), encoding, the forward with
its stop, speech batches and the ranks of a multi-process run. The top of the dependency order inside embstore.

(The package is ``extraction``, not ``extract``: ``from embstore import extract`` is the function.)
"""
