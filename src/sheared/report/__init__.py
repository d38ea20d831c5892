"""Reports of run directories: what a run logged, as figures and a markdown summary.

Above `train/` (it reads run directories through `sheared.run_dir`); nothing below
imports it.
"""

from sheared.report.run import RunData, load_run
from sheared.report.summary import write_report

__all__ = ["RunData", "load_run", "write_report"]
