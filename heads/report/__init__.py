"""Run directories, tables, plots and merged reports, shared by sweeps, fine-tunes and pretraining.

``table`` (the results data model) is imported by ``plots``, ``summary``, ``results`` (the run directory) and
``merge`` (``heads report``); nothing imports back, so there is no cycle. ``rundir`` names run directories and
their files for every product.
"""

from heads.report.merge import write_report
from heads.report.results import RunWriter, read_run
from heads.report.table import ConfigStats, ResultRow, aggregate, best_config

__all__ = ["ResultRow", "ConfigStats", "RunWriter", "aggregate", "best_config", "read_run", "write_report"]
