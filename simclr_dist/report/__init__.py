"""Tables, plots and statistics of finished runs (no training here): statistics over seeds, paired tests,
per-class metrics, the experiments report, sweep tables and heatmaps, and where the curves meet.

Layer: beside run/ (may import core/, data/ and config/, and run/storage to write files; never a loop or a
command), so every number in a report table can be tested on hand-made inputs.
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
