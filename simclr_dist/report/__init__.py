"""Pure functions behind the experiment report: statistics over seeds, paired tests, per-class metrics, plots.

Layer: beside run/ (may import core/, data/ and config/, never run/ or a command), numpy/scipy/matplotlib only,
no I/O beyond returning bytes, so every number in a report table can be tested on hand-made inputs.
"""

from simclr_dist.report.classes import ClassReport, class_report, confusion_matrix, confusion_png
from simclr_dist.report.stats import (
    ALTERNATIVES,
    PairedTest,
    Summary,
    holm,
    mcnemar,
    permutation_test,
    sign_test,
    summarize,
)

__all__ = ["ALTERNATIVES", "ClassReport", "PairedTest", "Summary", "class_report", "confusion_matrix",
           "confusion_png", "holm", "mcnemar", "permutation_test", "sign_test", "summarize"]
