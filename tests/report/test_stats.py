"""simclr_dist.report: summaries over seeds, paired tests over seeds, the two-level bootstrap and per-class metrics,
checked against hand computations and known answers (closed forms, table values, exact enumerations). scipy and
scikit-learn are not dependencies: where installed they serve as an extra cross-check, else those tests skip."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest

from simclr_dist.report import (
    BootstrapInterval,
    PairedTest,
    class_metrics_over_seeds,
    class_report,
    confusion_matrix,
    confusion_png,
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

Z975 = 1.959963984540054  # standard normal 0.975 quantile


def binom_half_cdf(k: int, m: int) -> float:
    """P(X <= k), X ~ Binomial(m, 1/2), exactly (fractions)."""
    return float(Fraction(sum(math.comb(m, i) for i in range(k + 1)), 2 ** m))

PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- summaries
def test_summary_matches_a_hand_computed_t_interval():
    s = summarize([0.80, 0.82, 0.84])
    # mean 0.82, sd = sqrt(((-.02)^2 + 0 + .02^2) / 2) = 0.02, t_{0.975, 2} = 4.302653, half = 4.302653 * .02 / sqrt 3
    assert s.mean == pytest.approx(0.82) and s.sd == pytest.approx(0.02) and s.n == 3
    assert s.half_width == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)
    assert (s.ci_low, s.ci_high) == pytest.approx((0.82 - 0.0496827, 0.82 + 0.0496827), abs=1e-6)
    assert s.format() == "0.820 ± 0.020 [0.770, 0.870] (n=3)"
    wide = summarize([0.80, 0.82, 0.84], confidence=0.99)
    assert wide.half_width == pytest.approx(9.924843 * 0.02 / math.sqrt(3), rel=1e-6)


def test_summary_of_one_value_has_no_interval_and_bad_input_is_refused():
    one = summarize([0.5])
    assert one.mean == 0.5 and math.isnan(one.sd) and math.isnan(one.ci_low) and one.format() == "0.500 (n=1)"
    with pytest.raises(ValueError, match="no values"):
        summarize([])
    with pytest.raises(ValueError, match="non-finite"):
        summarize([0.1, float("nan")])


# ---------------------------------------------------------------------------- McNemar
def _correctness(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1] * both + [1] * only_a + [0] * only_b + [0] * neither, dtype=bool)
    b = np.array([1] * both + [0] * only_a + [1] * only_b + [0] * neither, dtype=bool)
    return a, b


def test_mcnemar_exact_on_a_known_table():
    a, b = _correctness(both=900, only_a=25, only_b=10, neither=65)
    t = mcnemar(a, b, names=("SimCLR", "scratch"))
    # two-sided exact: 2 * P(X <= 10), X ~ Bin(35, 1/2)
    assert t.p_value == pytest.approx(2 * binom_half_cdf(10, 35), rel=1e-12)
    assert t.p_value == pytest.approx(0.01666, abs=1e-4)
    assert t.statistic == 25 and t.n == 1000
    assert t.details == {"both_right": 900, "only_a_right": 25, "only_b_right": 10, "both_wrong": 65}
    assert t.verdict.startswith("SimCLR beats scratch (p = 0.0167 < 0.05") and "\n" not in t.verdict
    greater = mcnemar(a, b, alternative="greater")
    assert greater.p_value == pytest.approx(1 - binom_half_cdf(24, 35), rel=1e-12)
    assert mcnemar(a, b, alternative="less").p_value == pytest.approx(binom_half_cdf(25, 35), rel=1e-12)
    assert mcnemar(b, a, names=("scratch", "SimCLR")).verdict.startswith("SimCLR beats scratch")


def test_mcnemar_without_a_difference_and_with_too_few_discordant_images():
    a, b = _correctness(both=50, only_a=12, only_b=11, neither=7)
    t = mcnemar(a, b)
    assert t.p_value == pytest.approx(1.0) and t.verdict.startswith("no significant difference between A and B")
    a, b = _correctness(both=50, only_a=4, only_b=0, neither=7)  # 4 of 4 one way: p = 2/16 at best
    t = mcnemar(a, b)
    assert t.p_value == pytest.approx(0.125) and t.verdict.startswith("undecidable: with this few discordant images")
    assert mcnemar(*_correctness(10, 0, 0, 3)).p_value == 1.0
    with pytest.raises(ValueError, match="same test set"):
        mcnemar(np.ones(5, bool), np.ones(4, bool))


# ---------------------------------------------------------------------------- over seeds
def test_permutation_test_is_exact_over_sign_flips():
    a = [0.71, 0.74, 0.69, 0.73, 0.75, 0.72]
    b = [0.68, 0.70, 0.70, 0.69, 0.71, 0.70]  # differences .03 .04 -.01 .04 .04 .02
    t = permutation_test(a, b, names=("SimCLR", "scratch"))
    # |mean| >= observed only for: no flip, flip the -.01 (larger), and their negatives -> 4 of 64... plus
    # flips that keep the sum >= 0.16: flipping .02 gives .12, flipping -.01 gives .18; so {none, -.01} and mirror
    assert t.statistic == pytest.approx(0.16 / 6)
    assert t.p_value == pytest.approx(4 / 64)
    assert t.verdict.startswith("no significant difference between SimCLR and scratch (p = 0.0625")
    one_sided = permutation_test(a, b, alternative="greater")
    assert one_sided.p_value == pytest.approx(2 / 64) and one_sided.verdict.startswith("A beats B")
    assert t.details["exact"] and t.n == 6


def test_few_seeds_are_undecidable_and_many_seeds_use_random_flips():
    t = permutation_test([0.9, 0.9, 0.9], [0.1, 0.1, 0.1])
    assert t.p_value == pytest.approx(2 / 8) and t.verdict.startswith("undecidable: with this few seeds")
    rng = np.random.default_rng(1)
    a = rng.normal(0.6, 0.01, 30)
    t = permutation_test(a, a - 0.01 + rng.normal(0, 0.002, 30), resamples=20_000)
    assert not t.details["exact"] and t.p_value < 0.001 and t.verdict.startswith("A beats B")
    with pytest.raises(ValueError, match="pair them by seed"):
        permutation_test([1, 2], [1])


def test_sign_test_counts_wins_and_drops_ties():
    t = sign_test([3, 3, 3, 3, 3, 3, 3, 1], [1, 1, 1, 1, 1, 1, 1, 1], names=("SimCLR", "scratch"))
    assert t.statistic == 7 and t.details == {"wins": 7, "losses": 0, "ties": 1}
    assert t.p_value == pytest.approx(2 / 2 ** 7) and t.verdict.startswith("SimCLR beats scratch")
    assert sign_test([1, 2, 3], [3, 2, 1]).p_value == pytest.approx(1.0)


def test_holm_adjusts_in_order():
    # sorted .01 .02 .04 -> x3 x2 x1 = .03 .04 .04 (monotone), returned in the input order
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm([]) == []


# ---------------------------------------------------------------------------- per class
def test_class_report_on_a_hand_made_prediction():
    y_true = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 1, 1, 1, 0, 2]
    r = class_report(y_true, y_pred, class_names=["shirt", "coat", "bag"])
    assert r.confusion.tolist() == [[3, 1, 0], [0, 4, 0], [1, 0, 1]]
    assert r.recall.tolist() == pytest.approx([0.75, 1.0, 0.5])
    assert r.precision.tolist() == pytest.approx([0.75, 0.8, 1.0])
    f1 = [0.75, 2 * 0.8 / 1.8, 2 * 0.5 / 1.5]
    assert r.f1.tolist() == pytest.approx(f1) and r.macro_f1 == pytest.approx(sum(f1) / 3)
    assert (r.worst_class, r.worst_class_name, r.worst_recall) == (2, "bag", 0.5)
    assert r.accuracy == pytest.approx(0.8) and r.balanced_accuracy == pytest.approx(0.75)
    d = r.to_dict()
    assert d["worst_class_name"] == "bag" and d["support"] == [4, 4, 2]


def test_class_report_with_a_class_absent_or_never_predicted():
    r = class_report([0, 0, 1, 1], [0, 0, 1, 0], num_classes=3)
    assert math.isnan(r.recall[2]) and math.isnan(r.precision[2]) and r.f1[2] == 0.0
    assert r.worst_class == 1 and r.macro_f1 == pytest.approx((0.8 + 2 / 3) / 2)  # class 2 neither seen nor predicted
    assert r.to_dict()["recall"][2] is None
    with pytest.raises(ValueError, match="outside num_classes=2"):
        confusion_matrix([0, 2], [0, 1], num_classes=2)
    with pytest.raises(ValueError, match="3 true labels but 2 predictions"):
        confusion_matrix([0, 1, 1], [0, 1])


def test_class_report_macro_f1_agrees_with_scikit_learn_where_installed():
    f1_score = pytest.importorskip("sklearn.metrics").f1_score
    for y_true, y_pred, c in (([0, 0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1, 1, 1, 0, 2], None),
                              ([0, 0, 1, 1], [0, 0, 1, 0], 3)):
        assert class_report(y_true, y_pred, num_classes=c).macro_f1 == pytest.approx(
            f1_score(y_true, y_pred, average="macro"))


def test_confusion_png_is_a_readable_image_with_the_names():
    import matplotlib.image as mpimg

    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0])
    png = confusion_png(cm, ["T-shirt/top", "Trouser", "Pullover"], title="scratch, 1% labels")
    assert png.startswith(PNG)
    import io

    img = mpimg.imread(io.BytesIO(png), format="png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    many = confusion_png(np.eye(12, dtype=int) * 5)  # no annotations above 10 classes, still an image
    assert many.startswith(PNG)
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        confusion_png(cm, ["a", "b"])
