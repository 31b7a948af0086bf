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


# ---------------------------------------------------------------------------- Student t without scipy
@pytest.mark.parametrize(("t", "df"), [(2.262, 9), (2.776, 4), (12.706, 1), (2.228, 10), (2.042, 30)])
def test_student_t_two_sided_p_at_table_values_is_005(t, df):
    assert 2 * (1 - student_t_cdf(t, df)) == pytest.approx(0.05, abs=1e-4)
    assert 2 * student_t_cdf(-t, df) == pytest.approx(0.05, abs=1e-4)


def test_student_t_matches_closed_forms_and_quantiles():
    for t in (-50.0, -3.0, -0.4, 0.0, 0.7, 2.0, 1e4):
        # df = 1 (Cauchy): 1/2 + atan(t)/pi; df = 2: 1/2 + t / (2 sqrt(2 + t^2))
        assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, rel=1e-12, abs=1e-15)
        assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), rel=1e-12, abs=1e-15)
    assert student_t_cdf(1.3, 7) + student_t_cdf(-1.3, 7) == pytest.approx(1.0, abs=1e-15)
    assert student_t_cdf(Z975, 1e6) == pytest.approx(0.975, abs=1e-6)  # -> normal (t - normal: 1.4e-7 here)
    for q, df, want in ((0.975, 1, 12.706205), (0.975, 2, 4.302653), (0.975, 4, 2.776445), (0.975, 9, 2.262157),
                        (0.995, 2, 9.924843), (0.95, 10, 1.812461), (0.025, 9, -2.262157)):
        assert student_t_ppf(q, df) == pytest.approx(want, rel=1e-6)
        assert student_t_cdf(student_t_ppf(q, df), df) == pytest.approx(q, rel=1e-12)
    assert student_t_ppf(0.5, 3) == 0.0
    with pytest.raises(ValueError, match="q must be in"):
        student_t_ppf(1.0, 3)
    with pytest.raises(ValueError, match="df must be > 0"):
        student_t_cdf(1.0, 0)


def test_student_t_and_binomial_agree_with_scipy_where_installed():
    sps = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3.5, 10, 100):
        for t in (-30.0, -2.0, -0.1, 0.5, 3.0):
            assert student_t_cdf(t, df) == pytest.approx(sps.t.cdf(t, df), rel=1e-11)
        assert student_t_ppf(0.975, df) == pytest.approx(sps.t.ppf(0.975, df), rel=1e-10)
    a, b = np.array([1] * 31 + [0] * 9, bool), np.array([0] * 31 + [1] * 9, bool)
    for alt in ("two-sided", "greater", "less"):
        assert mcnemar(a, b, alternative=alt).p_value == pytest.approx(
            sps.binomtest(31, 40, 0.5, alternative=alt).pvalue, rel=1e-12)


# ---------------------------------------------------------------------------- paired t-test over seeds
def test_paired_t_test_known_answers():
    # d = 1, 2, 3: mean 2, sd 1, t = 2 sqrt 3, df 2; two-sided p = 1 - t / sqrt(2 + t^2)
    t = paired_t_test([1.5, 2.5, 3.5], [0.5, 0.5, 0.5], names=("SimCLR", "scratch"))
    tt = 2 * math.sqrt(3)
    assert t.test == "t" and t.n == 3 and t.statistic == pytest.approx(tt)
    assert t.p_value == pytest.approx(1 - tt / math.sqrt(2 + tt * tt), rel=1e-12)  # 0.0742
    assert t.details["df"] == 2 and t.details["mean_diff"] == pytest.approx(2) and t.details["sd_diff"] == 1
    assert (t.details["ci_low"], t.details["ci_high"]) == pytest.approx((2 - 4.302653 / math.sqrt(3),
                                                                         2 + 4.302653 / math.sqrt(3)), rel=1e-6)
    assert t.verdict.startswith("no significant difference between SimCLR and scratch (p = 0.0742")
    greater = paired_t_test([1.5, 2.5, 3.5], [0.5, 0.5, 0.5], alternative="greater")
    less = paired_t_test([1.5, 2.5, 3.5], [0.5, 0.5, 0.5], alternative="less")
    assert greater.p_value == pytest.approx(t.p_value / 2) and less.p_value == pytest.approx(1 - t.p_value / 2)
    assert greater.verdict.startswith("A beats B (p = 0.0371 < 0.05, greater)")
    # df = 1: d = 1, 3 -> t = 2, p = 1 - 2 atan(2) / pi
    assert paired_t_test([1, 3], [0, 0]).p_value == pytest.approx(1 - 2 * math.atan(2) / math.pi, rel=1e-12)
    # table value: t = 2.262 on 10 seeds (df 9) is p = 0.05
    d = np.array([1.0, -1.0] * 5) + 2.262 * np.sqrt(10 / 9) / np.sqrt(10)  # sd = sqrt(10/9), mean = 2.262 sd/sqrt n
    assert paired_t_test(d, np.zeros(10)).p_value == pytest.approx(0.05, abs=1e-4)


def test_paired_t_test_with_zero_spread_and_bad_input():
    same = paired_t_test([0.8, 0.7, 0.9], [0.8, 0.7, 0.9])
    assert same.p_value == 1.0 and same.verdict.startswith("no significant difference")
    assert paired_t_test([0.8, 0.7], [0.8, 0.7], alternative="greater").p_value == 1.0
    shift = paired_t_test([0.8, 0.7, 0.9], [0.75, 0.65, 0.85])  # constant +0.05 (up to rounding)
    assert shift.p_value == 0.0 and shift.statistic == math.inf and shift.verdict.startswith("A beats B")
    assert paired_t_test([0.8, 0.7, 0.9], [0.75, 0.65, 0.85], alternative="greater").p_value == 0.0
    assert paired_t_test([0.8, 0.7, 0.9], [0.75, 0.65, 0.85], alternative="less").p_value == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        paired_t_test([0.8], [0.7])
    with pytest.raises(ValueError, match="a has 3 values but b has 2"):
        paired_t_test([0.8, 0.7, 0.9], [0.7, 0.6])
    with pytest.raises(ValueError, match="a and b are empty"):
        paired_t_test([], [])
    with pytest.raises(ValueError, match="non-finite value in b at seed index 1"):
        paired_t_test([0.8, 0.7, 0.9], [0.7, float("nan"), 0.8])
    with pytest.raises(ValueError, match="alternative must be one of"):
        paired_t_test([0.8, 0.7], [0.7, 0.6], alternative="bigger")


# ---------------------------------------------------------------------------- exact sign-flip test over seeds
def test_sign_flip_known_answers_and_the_floor_few_seeds_cannot_pass():
    three = sign_flip_test([0.9, 0.8, 0.85], [0.7, 0.75, 0.6])
    assert three.test == "sign-flip" and three.details["exact"] and "exact: all 8 sign flips" in three.evidence
    assert three.p_value == pytest.approx(0.25)
    assert sign_flip_test([0.9, 0.8, 0.85], [0.7, 0.75, 0.6], alternative="greater").p_value == pytest.approx(0.125)
    assert sign_flip_test([0.9, 0.8, 0.85], [0.7, 0.75, 0.6], alternative="less").p_value == pytest.approx(1.0)
    assert three.verdict.startswith("undecidable: with this few seeds no outcome reaches p < 0.05 (smallest "
                                    "possible p 0.25)")
    five_a, five_b = [0.81, 0.83, 0.80, 0.84, 0.82], [0.78, 0.79, 0.77, 0.80, 0.76]
    assert sign_flip_test(five_a, five_b, alternative="greater").p_value == pytest.approx(1 / 32)
    assert sign_flip_test(five_a, five_b).p_value == pytest.approx(0.0625)
    assert (min_p(3), min_p(3, "greater"), min_p(5, "less"), min_p(5)) == (0.25, 0.125, 1 / 32, 0.0625)
    assert min_p(1) == 1.0 and min_p(5, "greater") < 0.05 <= min_p(5)
    with pytest.raises(ValueError, match="n must be a positive number of seeds"):
        min_p(0)
    assert permutation_test is sign_flip_test  # the old name is the same function


def test_sign_flip_negative_controls_and_constant_shift():
    a = [0.81, 0.79, 0.84, 0.80, 0.83, 0.78, 0.82, 0.85, 0.80, 0.79]
    same = sign_flip_test(a, a)
    assert same.p_value == 1.0 and sign_flip_test(a, a, alternative="greater").p_value == 1.0
    assert same.verdict.startswith("no significant difference")
    shifted = [x - 0.02 for x in a]  # constant +0.02 on 10 seeds: only the all-plus pattern is as extreme
    assert sign_flip_test(a, shifted, alternative="greater").p_value == pytest.approx(1 / 1024)
    assert sign_flip_test(a, shifted).p_value == pytest.approx(2 / 1024)
    assert sign_flip_test(a, shifted).verdict.startswith("A beats B (p = 0.00195")
    assert sign_flip_test(shifted, a, alternative="less").p_value == pytest.approx(1 / 1024)


def test_sign_flip_above_20_seeds_is_a_seeded_monte_carlo_close_to_the_exact_answer():
    rng = np.random.default_rng(3)
    d = rng.normal(0.004, 0.01, 22)
    t = sign_flip_test(d, np.zeros(22))
    assert not t.details["exact"] and "Monte Carlo: 100000 random sign flips, seed 0" in t.evidence
    sums = np.zeros(1)
    for v in d:  # exact by brute force: all 2^22 sign patterns
        sums = np.concatenate((sums + v, sums - v))
    exact = float(np.mean(np.abs(sums) >= abs(d.sum()) - 1e-12))
    assert t.p_value == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 100_000) + 1e-5)
    assert sign_flip_test(d, np.zeros(22)).p_value == t.p_value  # same seed, same answer
    allplus = sign_flip_test(np.full(25, 0.01), np.zeros(25), alternative="greater")
    assert allplus.p_value == pytest.approx(1 / 100_001, rel=0.5)  # observed counted; 2^-25 otherwise unseen


def test_sign_flip_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="a has 2 values but b has 1; pair them by seed"):
        sign_flip_test([1, 2], [1])
    with pytest.raises(ValueError, match="a and b are empty"):
        sign_flip_test([], [])
    with pytest.raises(ValueError, match="non-finite value in a at seed index 0"):
        sign_flip_test([float("nan"), 1], [1, 1])


# ---------------------------------------------------------------------------- Holm over the declared family
def test_holm_known_example_step_down_monotone_capped():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adj = holm([0.2, 0.6, 0.01])
    assert adj == pytest.approx([0.4, 0.6, 0.03]) and max(holm([0.4, 0.5, 0.9])) == 1.0
    with pytest.raises(ValueError, match="p-values must be in"):
        holm([0.1, float("nan")])
    with pytest.raises(ValueError, match="p-values must be in"):
        holm([0.1, 1.5])


def test_declared_family_adjusts_over_all_tests_and_restates_the_verdicts():
    shift = [0.80, 0.82, 0.79, 0.81, 0.83, 0.80]
    tests = [paired_t_test(shift, [x - 0.01 + e for x, e in zip(shift, (0, .004, -.003, .002, -.004, .001))],
                           names=("SimCLR", "scratch")),
             sign_flip_test(shift, [x - 0.01 for x in shift], names=("SimCLR", "scratch")),  # p = 2/64
             paired_t_test([0.5, 0.52, 0.49], [0.5, 0.5, 0.5])]
    family = declared_family(tests)
    assert [t.p_holm for t in family] == pytest.approx(holm([t.p_value for t in tests]))
    assert all(t.family_size == 3 for t in family) and [t.p_value for t in family] == [t.p_value for t in tests]
    sf = family[1]
    assert tests[1].p_value == pytest.approx(2 / 64) and tests[1].significant()  # raw p passes alone ...
    assert tests[1].verdict.startswith("SimCLR beats scratch (p = 0.0312")
    assert sf.p_holm >= 2 * 2 / 64 and not sf.significant()  # ... not once Holm counts the whole family
    assert "Holm over 3 declared tests" in sf.verdict and "raw p = 0.0312" in sf.verdict
    assert sf.verdict.startswith("no significant difference between SimCLR and scratch (Holm-adjusted p = ")
    # a raw p under 0.05 that Holm lifts over it: the verdict and significant() follow the adjusted value
    base = dataclasses.replace(tests[1], p_value=0.03)
    lifted = declared_family([base, dataclasses.replace(base, p_value=0.04)])
    assert [t.p_holm for t in lifted] == pytest.approx([0.06, 0.06])
    assert not lifted[0].significant() and lifted[0].verdict.startswith(
        "no significant difference between SimCLR and scratch (Holm-adjusted p = 0.06")
    with pytest.raises(ValueError, match="image-level McNemar"):
        declared_family([tests[0], mcnemar([1, 0, 1], [0, 0, 1])])
    with pytest.raises(ValueError, match="tests is empty"):
        declared_family([])
    assert isinstance(family[0], PairedTest) and tests[0].p_holm is None  # inputs untouched


# ---------------------------------------------------------------------------- two-level bootstrap
def _seeds_with_accuracies(accuracies, n_images, rng):
    """(seeds, images) correctness with EXACTLY the given accuracy per seed, errors on random images."""
    rows = []
    for acc in accuracies:
        row = np.zeros(n_images, bool)
        row[rng.permutation(n_images)[:round(acc * n_images)]] = True
        rows.append(row)
    return np.stack(rows)


def test_bootstrap_with_no_seed_variance_matches_the_binomial_normal_approximation():
    c = _seeds_with_accuracies([0.8] * 5, 10_000, np.random.default_rng(0))
    r = two_level_bootstrap(c)
    assert isinstance(r, BootstrapInterval) and r.mean == pytest.approx(0.8) and r.seed_sd == 0.0
    assert (r.n_seeds, r.n_images, r.n_boot, r.seed_variance_included) == (5, 10_000, 2000, True)
    # per-seed image draws: 5 x 10,000 independent Bernoulli(0.8) -> half-width z sqrt(p(1-p)/(S N))
    assert r.half_width == pytest.approx(Z975 * math.sqrt(0.8 * 0.2 / 50_000), rel=0.1)
    assert r.boot_sd == pytest.approx(math.sqrt(0.8 * 0.2 / 50_000), rel=0.1)
    assert r.ci_low < 0.8 < r.ci_high


def test_bootstrap_shared_image_draws_keep_the_correlation_of_runs_that_fail_on_the_same_images():
    one = _seeds_with_accuracies([0.8], 5000, np.random.default_rng(1))
    c = np.repeat(one, 4, axis=0)  # four runs with identical predictions
    per_seed = two_level_bootstrap(c, n_boot=1000)
    shared = two_level_bootstrap(c, n_boot=1000, image_draws="shared")
    assert per_seed.half_width == pytest.approx(Z975 * math.sqrt(0.16 / 20_000), rel=0.12)  # as if 4 x 5000
    assert shared.half_width == pytest.approx(Z975 * math.sqrt(0.16 / 5000), rel=0.12)  # really 5000 images
    assert shared.image_draws == "shared" and "shared image draws" in shared.note


def test_bootstrap_when_seeds_differ_is_much_wider_than_the_image_only_interval():
    c = _seeds_with_accuracies([0.6, 0.7, 0.8, 0.9], 10_000, np.random.default_rng(2))
    r = two_level_bootstrap(c)
    images_only = two_level_bootstrap(c, resample_seeds=False)
    assert r.mean == pytest.approx(0.75) and r.seed_sd == pytest.approx(np.std([0.6, 0.7, 0.8, 0.9], ddof=1))
    assert images_only.half_width == pytest.approx(Z975 * math.sqrt(np.mean([.24, .21, .16, .09]) / 40_000),
                                                   rel=0.12)
    assert r.half_width > 10 * images_only.half_width
    assert 0.6 <= r.ci_low < 0.7 and 0.8 < r.ci_high <= 0.9  # spans the middle of the seed means
    # seed level: sd of a mean of 4 draws from {.6, .7, .8, .9} = sqrt(0.0125 / 4)
    assert r.boot_sd == pytest.approx(math.sqrt(0.0125 / 4), rel=0.1)
    assert not images_only.seed_variance_included and "NOT in this interval" in images_only.note


def test_bootstrap_is_deterministic_for_a_seed():
    c = _seeds_with_accuracies([0.7, 0.75, 0.72], 2000, np.random.default_rng(3))
    for mode in ("per-seed", "shared"):
        a, b = two_level_bootstrap(c, seed=7, image_draws=mode), two_level_bootstrap(c, seed=7, image_draws=mode)
        assert a == b
        assert two_level_bootstrap(c, seed=8, image_draws=mode) != a


def test_bootstrap_of_one_seed_reflects_image_sampling_only_and_says_so():
    c = _seeds_with_accuracies([0.9], 10_000, np.random.default_rng(4))
    r = two_level_bootstrap(c)
    assert r.seed_variance_included is False and math.isnan(r.seed_sd) and r.n_seeds == 1
    assert "one seed" in r.note and "training variance between seeds is NOT in this interval" in r.note
    assert r.half_width == pytest.approx(Z975 * math.sqrt(0.09 / 10_000), rel=0.1)
    assert r.format().endswith("(1 seeds x 10000 images, images only)")


def test_per_seed_binomial_draws_have_the_distribution_of_drawing_image_indices():
    rng = np.random.default_rng(5)
    c = rng.random((3, 40)) < np.array([[0.5], [0.7], [0.9]])
    r = two_level_bootstrap(c, n_boot=20_000, seed=1)
    # the definition: seeds with replacement, then image indices with replacement, independently per drawn seed
    seeds = rng.integers(0, 3, size=(20_000, 3))
    images = rng.integers(0, 40, size=(20_000, 3, 40))
    brute = c[seeds[:, :, None], images].mean(axis=(1, 2))
    assert r.boot_sd == pytest.approx(brute.std(ddof=1), rel=0.05)
    lo, hi = np.quantile(brute, [0.025, 0.975])
    assert (r.ci_low, r.ci_high) == pytest.approx((lo, hi), abs=0.02)


def test_bootstrap_diff_pairs_seeds_and_images():
    rng = np.random.default_rng(6)
    # every seed: A right on 5% of images B gets wrong, B right on 2% A gets wrong; B's accuracy varies by seed
    b_acc = [0.6, 0.7, 0.8, 0.9]
    cb = _seeds_with_accuracies(b_acc, 10_000, rng)
    ca = cb.copy()
    for s in range(4):
        wrong, right = np.flatnonzero(~cb[s]), np.flatnonzero(cb[s])
        ca[s, rng.choice(wrong, 500, replace=False)] = True
        ca[s, rng.choice(right, 200, replace=False)] = False
    r = two_level_bootstrap_diff(ca, cb)
    assert r.mean == pytest.approx(0.03) and r.seed_sd == pytest.approx(0.0, abs=1e-12)
    # paired: only the discordant images move the difference; var per seed = (p10 + p01 - d^2) / N
    assert r.half_width == pytest.approx(Z975 * math.sqrt((0.07 - 0.0009) / 40_000), rel=0.12)
    alone = two_level_bootstrap(cb)  # the seed-to-seed spread both arms share cancels in the difference
    assert r.half_width < alone.half_width / 20
    same = two_level_bootstrap_diff(cb, cb)
    assert (same.mean, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0)
    shared = two_level_bootstrap_diff(ca, cb, image_draws="shared", n_boot=500)
    assert shared.ci_low < 0.03 < shared.ci_high and "difference A - B" in shared.note


def test_bootstrap_bad_input_names_the_argument():
    ok = np.ones((2, 5), bool)
    with pytest.raises(ValueError, match=r"correct: expected a \(seeds, test_images\) array"):
        two_level_bootstrap(np.ones(5, bool))
    with pytest.raises(ValueError, match="correct: empty"):
        two_level_bootstrap(np.ones((0, 5), bool))
    with pytest.raises(ValueError, match="correct: non-finite"):
        two_level_bootstrap(np.array([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="correct: expected booleans"):
        two_level_bootstrap(np.array([[1, 2]]))
    with pytest.raises(ValueError, match="correct_a has shape .* but correct_b"):
        two_level_bootstrap_diff(ok, np.ones((3, 5), bool))
    with pytest.raises(ValueError, match="correct_b: non-finite"):
        two_level_bootstrap_diff(ok, np.full((2, 5), np.nan))
    with pytest.raises(ValueError, match="n_boot must be a positive integer"):
        two_level_bootstrap(ok, n_boot=0)
    with pytest.raises(ValueError, match="image_draws must be one of"):
        two_level_bootstrap(ok, image_draws="same")


# ---------------------------------------------------------------------------- per class over seeds
def test_class_metrics_over_seeds_on_hand_made_predictions():
    y_true = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    preds = [[0, 0, 0, 0, 1, 0, 0, 0, 2, 2, 0, 0],  # recall 1, .25, .5: worst class 1
             [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 1, 1]]  # recall 1, 1, .5:   worst class 2
    m = class_metrics_over_seeds(y_true, preds, num_classes=4)  # class 3 absent from the test set
    assert m["n_seeds"] == 2 and m["num_classes"] == 4 and m["recall"][3] is None
    assert [s.mean for s in m["recall"][:3]] == pytest.approx([1.0, 0.625, 0.5])
    r1 = m["recall"][1]
    # two seeds: t_{0.975,1} = 12.706205 times sd/sqrt 2 = 12.706205 * 0.53033 / 1.41421
    assert r1.sd == pytest.approx(math.sqrt(2) * 0.375) and r1.half_width == pytest.approx(12.706205 * 0.375,
                                                                                             rel=1e-6)
    assert m["worst_class"] == 2 and m["worst_recall"].mean == 0.5 and m["worst_recall"].sd == 0.0
    assert m["worst_recall_per_seed"].mean == pytest.approx(0.375)  # .25 and .5: each seed's own worst
    reports = [class_report(y_true, p, num_classes=4) for p in preds]
    assert m["balanced_accuracy"].mean == pytest.approx(((1 + .25 + .5) / 3 + (1 + 1 + .5) / 3) / 2)
    assert m["macro_f1"].mean == pytest.approx(np.mean([r.macro_f1 for r in reports]))
    assert m["accuracy"].mean == pytest.approx((7 / 12 + 10 / 12) / 2)
    one = class_metrics_over_seeds(y_true, preds[:1], num_classes=3)
    assert one["worst_class"] == 1 and math.isnan(one["macro_f1"].ci_low) and one["macro_f1"].n == 1


def test_class_metrics_over_seeds_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="preds_by_seed has 2 predictions per seed but y_true has 3"):
        class_metrics_over_seeds([0, 1, 1], [[0, 1]], num_classes=2)
    with pytest.raises(ValueError, match="preds_by_seed must hold integer class indices"):
        class_metrics_over_seeds([0, 1], [[0.0, float("nan")]], num_classes=2)
    with pytest.raises(ValueError, match="y_true must be a non-empty"):
        class_metrics_over_seeds([], [[]], num_classes=2)
    with pytest.raises(ValueError, match="preds_by_seed must be \\(seeds, images\\)"):
        class_metrics_over_seeds([0, 1], np.zeros((0, 2), int), num_classes=2)
    with pytest.raises(ValueError, match="y_true has a label outside 0..1"):
        class_metrics_over_seeds([0, 2], [[0, 1]], num_classes=2)


def test_holm_over_the_declared_family_counts_untested_comparisons_with_p_one():
    from simclr_dist.report.stats import declared_family, paired_t_test

    a, b = [0.80, 0.82, 0.81, 0.83], [0.70, 0.74, 0.69, 0.75]
    tests = [paired_t_test(a, b, names=("x", "y")), paired_t_test(b, a, names=("y", "x"))]
    raw = sorted(t.p_value for t in tests)
    done = declared_family(tests, family_size=4)  # two of four declared comparisons done
    assert all(t.family_size == 4 for t in done)
    assert min(t.p_holm for t in done) == pytest.approx(min(1.0, 4 * raw[0]))  # x 4, not x 2
    assert "2 not tested yet" in done[0].verdict or "2 not tested yet" in done[0].evidence
    with pytest.raises(ValueError, match="smaller than"):
        declared_family(tests, family_size=1)
