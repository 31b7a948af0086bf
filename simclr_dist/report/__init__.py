"""Tables, plots and statistics of finished runs (no training here): statistics over seeds, paired tests,
per-class metrics, the experiments report, sweep tables and heatmaps, and where the curves meet.

Layer: beside run/ (may import core/, data/ and config/, and run/storage to write files; never a loop or a
command), so every number in a report table can be tested on hand-made inputs.
"""

from simclr_dist.report.classes import ClassReport, class_report, confusion_matrix, confusion_png
from simclr_dist.report.stats import (
    ALTERNATIVES,
    BootstrapInterval,
    PairedTest,
    Summary,
    class_metrics_over_seeds,
    declared_family,
    holm,
    mcnemar,
    min_p,
    paired_t_test,
    permutation_test,
    sign_flip_test,
    sign_test,
    student_t_cdf,
    student_t_ppf,
    summarize,
    two_level_bootstrap,
    two_level_bootstrap_diff,
)

__all__ = ["ALTERNATIVES", "BootstrapInterval", "ClassReport", "PairedTest", "Summary", "class_metrics_over_seeds",
           "class_report", "confusion_matrix", "confusion_png", "declared_family", "holm", "mcnemar", "min_p",
           "paired_t_test", "permutation_test", "sign_flip_test", "sign_test", "student_t_cdf", "student_t_ppf",
           "summarize", "two_level_bootstrap", "two_level_bootstrap_diff"]
