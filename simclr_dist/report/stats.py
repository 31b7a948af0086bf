"""Statistics the experiment report rests on, with the SEED (one training run) as the unit of replication.

Why the seed: a claim such as "SimCLR beats scratch at 1% labels" is a claim about training runs. Two runs of the
same arm differ (label subset, initialisation, data order), and that training variance is what a reader needs to
know. Pooling predictions over replicates and testing per image (McNemar) treats the same 10,000 test images seen
three times as 30,000 independent pairs and leaves training variance out, so it over-states the evidence. Hence:

* the decision, for each comparison declared before the run: :func:`paired_t_test` and the exact
  :func:`sign_flip_test` over per-seed metrics (paired by seed: same label subset, same test images), with
  :func:`declared_family` applying Holm over the *whole* declared family so no report can forget the correction;
  :func:`min_p` says when too few seeds cannot reach a small p at all (3 seeds: no two-sided p below 0.25);
* intervals: :func:`two_level_bootstrap` / :func:`two_level_bootstrap_diff` (resample seeds, then test images within
  each drawn seed) and :func:`summarize` (t-interval over seeds);
* per class: :func:`class_metrics_over_seeds` (recall of every class, worst class, macro-F1, balanced accuracy,
  each with an interval over seeds);
* description only: :func:`mcnemar` on ONE seed's predictions (which images the two models disagree on), and
  :func:`sign_test`. Neither is a significance claim about the arms.

Every test returns a :class:`PairedTest` whose ``verdict`` is one line for a table.

Only numpy and the standard library: the Student-t distribution (:func:`student_t_cdf`, :func:`student_t_ppf`) is
computed here from the regularized incomplete beta function (continued fraction, modified Lentz), and the exact
binomial tails from integer binomial coefficients.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from simclr_dist.report.classes import class_report

ALTERNATIVES = ("two-sided", "greater", "less")
EXACT_PERMUTATION_MAX_N = 20  # 2^20 sign patterns (8 MB of sums); above: Monte Carlo
MONTE_CARLO_RESAMPLES = 100_000
IMAGE_DRAWS = ("per-seed", "shared")

ArrayLike = Sequence[float] | np.ndarray


# ---------------------------------------------------------------------------- distributions (numpy-free scalars)
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function, evaluated by the modified Lentz method.

    ``I_x(a, b) = x^a (1-x)^b / (a B(a, b)) / (1 + d1/(1 + d2/(1 + ...)))`` with
    ``d_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1))`` and ``d_{2m} = m(b-m) x / ((a+2m-1)(a+2m))``; this returns
    the value of ``1 + d1/(1 + d2/(1 + ...))``. It converges fast for ``x < (a+1)/(a+b+2)``.
    """
    tiny, eps = 1e-300, 1e-16
    f = 1.0  # b0 = 1
    c, d = f, 0.0
    for j in range(1, 20_000):
        m = j // 2
        if j % 2:  # odd: d_{2m+1}
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:  # even: d_{2m}
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + num / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = c * d
        f *= delta
        if abs(delta - 1.0) < eps:
            return f
    raise ArithmeticError(f"incomplete beta: continued fraction did not converge (a={a}, b={b}, x={x})")


def _betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    """Regularized incomplete beta ``I_x(a, b)``; ``y = 1 - x`` may be given exactly to avoid cancellation."""
    y = 1.0 - x if y is None else y
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) / (a * _betacf(a, b, x))
    return 1.0 - math.exp(log_front) / (b * _betacf(b, a, y))  # I_x(a, b) = 1 - I_{1-x}(b, a)


def _t_two_tail(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom: ``I_{df/(df+t^2)}(df/2, 1/2)``."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    t2 = t * t
    return min(1.0, _betainc(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2)))


def student_t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df > 0`` degrees of freedom (no scipy: regularized incomplete beta)."""
    if not df > 0:
        raise ValueError(f"student_t_cdf: df must be > 0, got {df}")
    half = 0.5 * _t_two_tail(t, df)
    return 1.0 - half if t > 0 else half


def student_t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (``student_t_cdf(student_t_ppf(q, df), df) == q``), by bisection on the
    cdf: monotone and safe in both tails, and fast enough for the handful of quantiles a report needs."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"student_t_ppf: q must be in (0, 1), got {q}")
    if not df > 0:
        raise ValueError(f"student_t_ppf: df must be > 0, got {df}")
    if q == 0.5:
        return 0.0
    target = 2.0 * min(q, 1.0 - q)  # two-tailed mass beyond |t|
    lo, hi = 0.0, 1.0
    while _t_two_tail(hi, df) > target:
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            break
    for _ in range(400):
        mid = 0.5 * (lo + hi)
        if _t_two_tail(mid, df) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    t = 0.5 * (lo + hi)
    return t if q > 0.5 else -t


def _binom_half_cdf(k: int, m: int) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(m, 1/2)``: exact integer sum, correctly rounded (incomplete beta beyond
    50,000 trials, where the big-integer sum gets slow)."""
    if k < 0:
        return 0.0
    if k >= m:
        return 1.0
    if m > 50_000:
        return _betainc(m - k, k + 1, 0.5, 0.5)
    c = total = 1
    for i in range(1, k + 1):
        c = c * (m - i + 1) // i
        total += c
    return total / (1 << m)  # int / int: correctly rounded


def _binom_half_test(k: int, m: int, alternative: str) -> float:
    """Exact binomial test of ``k`` successes in ``m`` trials against probability 1/2 (what scipy's
    ``binomtest(k, m, 0.5)`` gives; by symmetry the two-sided p is twice the smaller tail, capped at 1)."""
    if m == 0:
        return 1.0
    if alternative == "greater":
        return _binom_half_cdf(m - k, m)  # P(X >= k) = P(X <= m - k)
    if alternative == "less":
        return _binom_half_cdf(k, m)
    if 2 * k == m:
        return 1.0
    return min(1.0, 2.0 * _binom_half_cdf(min(k, m - k), m))


# ---------------------------------------------------------------------------- summaries over seeds
@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (ddof=1) and the t-interval of the mean of ``n`` values (seeds)."""

    mean: float
    sd: float  # nan for n < 2
    n: int
    ci_low: float  # nan for n < 2
    ci_high: float
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2

    def format(self, digits: int = 3) -> str:
        """``0.812 ± 0.004 [0.806, 0.818] (n=5)``; ``0.812 (n=1)`` for a single value."""
        if self.n < 2:
            return f"{self.mean:.{digits}f} (n={self.n})"
        return (f"{self.mean:.{digits}f} ± {self.sd:.{digits}f} "
                f"[{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}] (n={self.n})")


def summarize(values: ArrayLike, confidence: float = 0.95) -> Summary:
    """Mean ± sd and the ``confidence`` t-interval ``mean ± t_{(1+c)/2, n-1} * sd / sqrt(n)`` of the values."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("summarize: no values")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"summarize: non-finite value in {x.tolist()}")
    if not 0 < confidence < 1:
        raise ValueError(f"summarize: confidence must be in (0, 1), got {confidence}")
    mean, n = float(x.mean()), int(x.size)
    if n < 2:
        return Summary(mean, math.nan, n, math.nan, math.nan, confidence)
    sd = float(x.std(ddof=1))
    half = student_t_ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return Summary(mean, sd, n, mean - half, mean + half, confidence)


# ---------------------------------------------------------------------------- paired tests
@dataclass(frozen=True)
class PairedTest:
    """Outcome of a paired test of model/arm A against B.

    The fields after ``details`` record how the verdict was reached, so :func:`declared_family` can restate it with
    the Holm-adjusted p-value; once ``p_holm`` is set, :meth:`significant` decides on it.
    """

    test: str  # "t", "sign-flip", "sign", "mcnemar-exact"
    statistic: float  # t: t statistic; sign-flip: mean of A - B; sign: seeds where A > B; mcnemar: images only A right
    p_value: float  # unadjusted
    n: int  # seeds (t, sign-flip, sign) or test images (mcnemar)
    alternative: str
    verdict: str  # one line
    details: dict
    evidence: str = ""  # the numbers behind the verdict, e.g. "mean A - B = +0.012 over 5 seeds (exact ...)"
    names: tuple[str, str] = ("A", "B")
    direction: float = 0.0  # > 0: A ahead, < 0: B ahead
    min_p: float = 0.0  # smallest p this test can give with this n (0: any)
    unit: str = "seeds"  # what the pairs are, for "with this few {unit}"
    alpha: float = 0.05
    p_holm: float | None = None  # Holm-adjusted over the declared family (None: not part of one)
    family_size: int | None = None

    def significant(self, alpha: float | None = None) -> bool:
        """``p < alpha`` on the Holm-adjusted p when this test belongs to a declared family, else on the raw p."""
        a = self.alpha if alpha is None else alpha
        return (self.p_value if self.p_holm is None else self.p_holm) < a


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {', '.join(ALTERNATIVES)}, got {alternative!r}")


def _verdict(names: tuple[str, str], direction: float, p: float, alpha: float, alternative: str, evidence: str,
             min_p: float, pairs: str, p_label: str = "p") -> str:
    a, b = names
    if min_p >= alpha:
        return (f"undecidable: with this few {pairs} no outcome reaches p < {alpha:g} (smallest possible p "
                f"{min_p:.3g}); {evidence}")
    if p < alpha and direction != 0:
        winner, loser = (a, b) if direction > 0 else (b, a)
        return f"{winner} beats {loser} ({p_label} = {p:.3g} < {alpha:g}, {alternative}); {evidence}"
    return f"no significant difference between {a} and {b} ({p_label} = {p:.3g}, {alternative}); {evidence}"


def _as_bool(x: Sequence[bool] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-d array of per-image correctness, got shape {arr.shape}")
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{what}: expected booleans (correct or not), got values other than 0/1")
    return arr.astype(bool)


def mcnemar(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray, *,
            names: tuple[str, str] = ("A", "B"), alternative: str = "two-sided", alpha: float = 0.05) -> PairedTest:
    """Exact McNemar test on two models' per-image correctness over the same test images (same order).

    DESCRIPTION ONLY, one seed at a time: it says whether two *trained models* differ on these images, not whether
    the *arms* differ, because it ignores training variance; and on predictions pooled over replicates it counts
    the same test images once per replicate as if they were independent. Decide with :func:`paired_t_test` /
    :func:`sign_flip_test` over seeds instead.

    With b = images only A gets right and c = images only B gets right, under "A and B are equally good" each
    discordant image is A's with probability 1/2, so b ~ Binomial(b + c, 1/2); the p-value is the exact binomial
    one ("greater": A better). ``statistic`` is b; ``details`` holds the 2x2 table.
    """
    _check_alternative(alternative)
    ca, cb = _as_bool(correct_a, "correct_a"), _as_bool(correct_b, "correct_b")
    if ca.shape != cb.shape:
        raise ValueError(f"mcnemar: {ca.size} and {cb.size} images; both models must be scored on the same test set")
    both, only_a = int(np.sum(ca & cb)), int(np.sum(ca & ~cb))
    only_b, neither = int(np.sum(~ca & cb)), int(np.sum(~ca & ~cb))
    m = only_a + only_b
    p = _binom_half_test(only_a, m, alternative)
    min_p = _min_binomial_p(m, alternative)
    evidence = (f"{names[0]} right/{names[1]} wrong {only_a}, {names[0]} wrong/{names[1]} right {only_b}, "
                f"n = {ca.size} images, accuracy {ca.mean():.4f} vs {cb.mean():.4f}" if ca.size else "no images")
    verdict = _verdict(names, only_a - only_b, p, alpha, alternative, evidence, min_p, "discordant images")
    table = {"both_right": both, "only_a_right": only_a, "only_b_right": only_b, "both_wrong": neither}
    return PairedTest("mcnemar-exact", float(only_a), p, int(ca.size), alternative, verdict, table, evidence, names,
                      float(only_a - only_b), min_p, "discordant images", alpha)


def _min_binomial_p(m: int, alternative: str) -> float:
    """The smallest p-value an exact binomial(m, 1/2) test can give: all m pairs one way."""
    if m == 0:
        return 1.0
    return min(1.0, 0.5 ** m * (2 if alternative == "two-sided" else 1))


def _paired(a: ArrayLike, b: ArrayLike, what: str, min_n: int = 1) -> np.ndarray:
    """Per-seed differences ``a - b`` (shape ``(seeds,)``), after checks whose messages name the bad argument."""
    arrays = {}
    for name, v in (("a", a), ("b", b)):
        try:
            arrays[name] = np.asarray(v, dtype=np.float64).ravel()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}: {name} is not a sequence of numbers ({e})") from None
    x, y = arrays["a"], arrays["b"]
    if x.shape != y.shape:
        raise ValueError(f"{what}: a has {x.size} values but b has {y.size}; pair them by seed (same length)")
    if x.size == 0:
        raise ValueError(f"{what}: a and b are empty; no pairs (need one value per seed)")
    for name, v in (("a", x), ("b", y)):
        bad = np.flatnonzero(~np.isfinite(v))
        if bad.size:
            raise ValueError(f"{what}: non-finite value in {name} at seed index {int(bad[0])} ({v[bad[0]]})")
    if x.size < min_n:
        raise ValueError(f"{what}: a and b have {x.size} seed(s); this test needs at least {min_n}")
    return x - y


def paired_t_test(a: ArrayLike, b: ArrayLike, *, alternative: str = "two-sided",
                  names: tuple[str, str] = ("A", "B"), alpha: float = 0.05) -> PairedTest:
    """Paired t-test of the mean per-seed difference ``a[i] - b[i]`` (seed i: same label subset, same test images).

    Why alongside the sign-flip test: with few seeds the exact sign-flip test cannot reach small p-values whatever
    the effect size (3 seeds: 0.25 at best), while the t-test uses the size of the differences relative to their
    spread, at the price of assuming roughly normal per-seed differences. Report both; decide on the declared one.

    ``t = mean(d) / (sd(d) / sqrt(n))``, df = n - 1, p from the Student-t distribution ("greater": A better).
    Differences that are all equal have zero spread: p = 1 when they are all 0; p = 0 when they are a nonzero
    constant pointing the way of the alternative (1 the other way). ``statistic`` is t (±inf then);
    ``details`` holds the differences, their mean, sd and the (1 - alpha) t-interval of the mean difference.
    """
    _check_alternative(alternative)
    d = _paired(a, b, "paired_t_test", min_n=2)
    n, mean = int(d.size), float(d.mean())
    sd = float(d.std(ddof=1))
    scale = float(np.abs(d).max())
    if scale == 0.0:  # identical arms: no evidence either way
        t, p = 0.0, 1.0
    elif sd <= 1e-12 * scale:  # a constant nonzero shift: infinitely many standard errors away from 0
        t = math.copysign(math.inf, mean)
        p = 0.0 if alternative == "two-sided" or (alternative == "greater") == (mean > 0) else 1.0
    else:
        t = mean / (sd / math.sqrt(n))
        two = _t_two_tail(t, n - 1)
        if alternative == "two-sided":
            p = two
        else:
            upper = 0.5 * two if t > 0 else 1.0 - 0.5 * two  # P(T >= t)
            p = upper if alternative == "greater" else 1.0 - upper
    ci = summarize(d, confidence=1 - alpha) if 0 < alpha < 1 else summarize(d)
    evidence = (f"mean {names[0]} - {names[1]} = {mean:+.4g} (sd {sd:.3g}) over {n} seeds, t = {t:.3g}, "
                f"df = {n - 1}")
    verdict = _verdict(names, mean, p, alpha, alternative, evidence, 0.0, "seeds")
    details = {"differences": d.tolist(), "mean_diff": mean, "sd_diff": sd, "df": n - 1,
               "ci_low": ci.ci_low, "ci_high": ci.ci_high, "confidence": ci.confidence}
    return PairedTest("t", float(t), float(p), n, alternative, verdict, details, evidence, names, mean, 0.0, "seeds",
                      alpha)


def min_p(n: int, alternative: str = "two-sided") -> float:
    """The smallest p-value the exact sign-flip test over ``n`` seeds can give: all seeds the same way, i.e. 1/2^n
    one-sided and 2/2^n two-sided (capped at 1). Lets a report say "3 seeds cannot reach 0.05" (3 seeds: 0.125
    one-sided, 0.25 two-sided; 5 seeds: 1/32 and 1/16) instead of "not significant". The sign test has the same
    floor over its non-tied seeds."""
    _check_alternative(alternative)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"min_p: n must be a positive number of seeds, got {n!r}")
    return min(1.0, (2.0 if alternative == "two-sided" else 1.0) * 0.5 ** int(n))


def _all_sign_flip_sums(d: np.ndarray) -> np.ndarray:
    """``sum(s_i * d_i)`` for every ``s`` in {+1, -1}^n: shape ``(2^n,)``, built by doubling (no 2^n x n matrix)."""
    sums = np.zeros(1)
    for v in d:
        sums = np.concatenate((sums + v, sums - v))
    return sums


def sign_flip_test(a: ArrayLike, b: ArrayLike, *, names: tuple[str, str] = ("A", "B"),
                   alternative: str = "two-sided", alpha: float = 0.05, resamples: int = MONTE_CARLO_RESAMPLES,
                   seed: int = 0) -> PairedTest:
    """Exact paired permutation (sign-flip) test of the mean per-seed difference ``a[i] - b[i]``.

    Why: it assumes nothing about the shape of the differences, only that under "no difference" each seed's
    difference is as likely negative as positive. The observed mean is compared with the means of all 2^n sign
    assignments (the observed one included), exactly for n <= 20; above that with ``resamples`` random
    assignments drawn with ``seed`` (p = (1 + hits) / (1 + resamples)), which ``evidence`` says. p is the fraction
    at least as extreme ("greater": A better). Known answers: n seeds all one way give 1/2^n one-sided and 2/2^n
    two-sided (see :func:`min_p`); identical arms give 1. ``statistic`` is the mean of A - B.
    """
    _check_alternative(alternative)
    d = _paired(a, b, "sign_flip_test")
    n, observed = int(d.size), float(d.mean())
    total = float(d.sum())
    if n <= EXACT_PERMUTATION_MAX_N:
        sums, exact = _all_sign_flip_sums(d), True
        how = f"exact: all {2 ** n} sign flips"
    else:
        if resamples < 1:
            raise ValueError(f"sign_flip_test: resamples must be >= 1, got {resamples}")
        rng = np.random.default_rng(seed)
        sums = np.empty(resamples + 1)
        sums[0] = total
        done = 0
        while done < resamples:  # chunks keep the (chunk, n) sign matrix small
            k = min(10_000, resamples - done)
            signs = rng.choice((1.0, -1.0), size=(k, n))
            sums[1 + done:1 + done + k] = signs @ d
            done += k
        exact = False
        how = f"Monte Carlo: {resamples} random sign flips, seed {seed}"
    tol = 1e-9 * float(np.abs(d).sum())  # equal in exact arithmetic -> "at least as extreme"
    if alternative == "two-sided":
        p = float(np.mean(np.abs(sums) >= abs(total) - tol))
    elif alternative == "greater":
        p = float(np.mean(sums >= total - tol))
    else:
        p = float(np.mean(sums <= total + tol))
    floor = min_p(n, alternative)
    evidence = f"mean {names[0]} - {names[1]} = {observed:+.4g} over {n} seeds ({how})"
    verdict = _verdict(names, observed, p, alpha, alternative, evidence, floor, "seeds")
    return PairedTest("sign-flip", observed, p, n, alternative, verdict,
                      {"differences": d.tolist(), "exact": exact}, evidence, names, observed, floor, "seeds", alpha)


permutation_test = sign_flip_test  # the earlier name of the same test


def sign_test(a: ArrayLike, b: ArrayLike, *, names: tuple[str, str] = ("A", "B"), alternative: str = "two-sided",
              alpha: float = 0.05) -> PairedTest:
    """Exact sign test over seeds: the number of seeds where A > B among those that differ ~ Binomial(m, 1/2).
    Ties are dropped. ``statistic`` is the number of seeds where A > B. Description: it uses only the signs, so
    it is weaker than :func:`sign_flip_test` on the same seeds."""
    _check_alternative(alternative)
    d = _paired(a, b, "sign_test")
    wins, losses = int(np.sum(d > 0)), int(np.sum(d < 0))
    m = wins + losses
    p = _binom_half_test(wins, m, alternative)
    evidence = f"{names[0]} higher on {wins}, lower on {losses}, tied on {d.size - m} of {d.size} seeds"
    floor = _min_binomial_p(m, alternative)
    verdict = _verdict(names, wins - losses, p, alpha, alternative, evidence, floor, "differing seeds")
    return PairedTest("sign", float(wins), p, int(d.size), alternative, verdict,
                      {"wins": wins, "losses": losses, "ties": int(d.size - m)}, evidence, names,
                      float(wins - losses), floor, "differing seeds", alpha)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order): control the chance of any false "A beats B" over a family
    of tests. Step-down: the i-th smallest p (from 0) is multiplied by (k - i), a running maximum keeps the adjusted
    values in the order of the raw ones, and they are capped at 1. Reject where the adjusted p < alpha."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0:
        return []
    if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"holm: p-values must be in [0, 1], got {p.tolist()}")
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (p.size - np.arange(p.size)) * p[order])
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted.tolist()


def declared_family(tests: Sequence[PairedTest], family_size: int | None = None) -> list[PairedTest]:
    """The tests of every comparison declared before the run, with Holm applied over the WHOLE family.

    Why a helper: a report that adjusts per table, or forgets to, claims more than it has. Each returned test is
    the input (same order) with ``p_holm`` and ``family_size`` set and the verdict restated on the adjusted p
    (raw p kept in the line), and :meth:`PairedTest.significant` then decides on ``p_holm``. Image-level McNemar
    tests are refused: they describe one seed and are not evidence about the arms.
    """
    tests = list(tests)
    if not tests:
        raise ValueError("declared_family: tests is empty; declare at least one comparison")
    size = len(tests) if family_size is None else family_size
    if size < len(tests):
        raise ValueError(f"declared_family: family_size {size} is smaller than the {len(tests)} tests given")
    for i, t in enumerate(tests):
        if not isinstance(t, PairedTest):
            raise ValueError(f"declared_family: tests[{i}] is a {type(t).__name__}, not a PairedTest")
        if t.test == "mcnemar-exact":
            raise ValueError(f"declared_family: tests[{i}] is an image-level McNemar test, which describes one seed "
                             f"and ignores training variance; declare seed-level tests (paired_t_test, "
                             f"sign_flip_test)")
    # a declared comparison not tested yet (an unfinished study) counts with p = 1: Holm over the whole declared
    # family, never over the part that happens to be done
    adjusted = holm([t.p_value for t in tests] + [1.0] * (size - len(tests)))[:len(tests)]
    pending = f" ({size - len(tests)} not tested yet, counted with p = 1)" if size > len(tests) else ""
    out = []
    for t, p_adj in zip(tests, adjusted):
        evidence = f"{t.evidence}; raw p = {t.p_value:.3g}, Holm over {size} declared tests{pending}"
        verdict = _verdict(t.names, t.direction, p_adj, t.alpha, t.alternative, evidence, t.min_p, t.unit,
                           p_label="Holm-adjusted p")
        out.append(dataclasses.replace(t, p_holm=float(p_adj), family_size=size, verdict=verdict))
    return out


# ---------------------------------------------------------------------------- two-level bootstrap
@dataclass(frozen=True)
class BootstrapInterval:
    """Mean accuracy (or difference of accuracies, A - B) over seeds and test images, with a percentile interval
    from a two-level bootstrap."""

    mean: float  # observed: mean over all seeds and images (fraction correct, or A - B)
    ci_low: float  # percentile interval of the bootstrap distribution
    ci_high: float
    confidence: float
    n_seeds: int
    n_images: int  # per seed (the shared test set)
    seed_sd: float  # sd (ddof=1) of the per-seed values; nan for one seed
    boot_sd: float  # sd of the bootstrap distribution (a standard error)
    n_boot: int
    seed_variance_included: bool  # False with one seed or resample_seeds=False: images only
    image_draws: str  # "per-seed" or "shared", see two_level_bootstrap
    note: str  # one line on what the interval covers

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2

    def format(self, digits: int = 3) -> str:
        """``0.812 [0.795, 0.829] (4 seeds x 10000 images, seeds+images)``."""
        what = "seeds+images" if self.seed_variance_included else "images only"
        return (f"{self.mean:.{digits}f} [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}] "
                f"({self.n_seeds} seeds x {self.n_images} images, {what})")


def _correctness_matrix(correct: np.ndarray | Sequence[Sequence[bool]], what: str) -> np.ndarray:
    """``(seeds, images)`` bool from a 2-d bool or 0/1 array; errors name ``what``."""
    try:
        arr = np.asarray(correct)
    except ValueError as e:  # ragged lists
        raise ValueError(f"{what}: not a (seeds, test_images) array ({e})") from None
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected a (seeds, test_images) array of per-image correctness, got shape "
                         f"{arr.shape} (one seed: pass shape (1, n_images))")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what}: empty, shape {arr.shape}; need at least one seed and one test image")
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"{what}: expected booleans or 0/1, got dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what}: non-finite value (NaN/inf); expected booleans or 0/1")
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{what}: expected booleans (correct or not) or 0/1, got other values")
    return arr.astype(bool)


def _check_boot_args(n_boot: int, confidence: float, image_draws: str, what: str) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"{what}: n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"{what}: confidence must be in (0, 1), got {confidence}")
    if image_draws not in IMAGE_DRAWS:
        raise ValueError(f"{what}: image_draws must be one of {', '.join(IMAGE_DRAWS)}, got {image_draws!r}")


def _seed_draws(rng: np.random.Generator, n_seeds: int, n_boot: int, resample: bool) -> np.ndarray:
    """``(n_boot, n_seeds)`` seed indices: drawn with replacement, or every seed once when not resampling."""
    if resample:
        return rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    return np.broadcast_to(np.arange(n_seeds), (n_boot, n_seeds))


def _shared_image_means(values: np.ndarray, seeds: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image_draws="shared"``: per draw ONE set of image indices for all drawn seeds; mean of ``values[s, i]``
    over the drawn seeds and images. ``values`` (seeds, images) float, ``seeds`` (n_boot, S) -> (n_boot,).

    Images with the same column ``values[:, i]`` (the same right/wrong pattern over seeds: at most 2^S, or 3^S
    for differences) are interchangeable, so drawing N image indices is drawing multinomial counts over the
    distinct columns with their frequencies: the same distribution at a fraction of the cost."""
    n_boot, n_images = seeds.shape[0], values.shape[1]
    columns, freq = np.unique(values, axis=1, return_counts=True)  # (seeds, U), (U,)
    out = np.empty(n_boot)
    chunk = max(1, 1_000_000 // columns.shape[1])
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        counts = rng.multinomial(n_images, freq / n_images, size=stop - start)  # (chunk, U) times drawn
        per_seed = counts @ columns.T / n_images  # (chunk, seeds): mean over the drawn images
        out[start:stop] = np.take_along_axis(per_seed, seeds[start:stop], axis=1).mean(axis=1)
    return out


def _interval(observed: float, per_seed: np.ndarray, boot: np.ndarray, confidence: float, n_images: int,
              n_boot: int, seeds_resampled: bool, image_draws: str, what: str) -> BootstrapInterval:
    lo, hi = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    n_seeds = int(per_seed.size)
    seed_sd = float(per_seed.std(ddof=1)) if n_seeds > 1 else math.nan
    included = seeds_resampled and n_seeds > 1
    if included:
        note = (f"{what}: two-level bootstrap over {n_seeds} seeds and {n_images} test images ({image_draws} image "
                f"draws); covers training variance and test-image sampling")
    else:
        why = "one seed" if n_seeds == 1 else "seeds not resampled"
        note = (f"{what}: test-image sampling only ({why}); training variance between seeds is NOT in this interval")
    return BootstrapInterval(float(observed), float(lo), float(hi), confidence, n_seeds, n_images, seed_sd,
                             float(boot.std(ddof=1)) if boot.size > 1 else 0.0, int(n_boot), included, image_draws,
                             note)


def two_level_bootstrap(correct: np.ndarray | Sequence[Sequence[bool]], *, n_boot: int = 2000,
                        confidence: float = 0.95, seed: int = 0, resample_seeds: bool = True,
                        image_draws: str = "per-seed") -> BootstrapInterval:
    """Percentile interval of mean accuracy from a two-level bootstrap: seeds, then test images within a seed.

    ``correct``: ``(seeds, test_images)`` bool or 0/1, per-seed correctness on the SAME test set (same order).
    Each draw resamples the seeds with replacement (the training-run level), then for every drawn seed resamples
    the test images with replacement, and takes the mean accuracy over the drawn seeds.

    Image draws (``image_draws``): by default ("per-seed") the image indices are drawn independently for every
    drawn seed, the usual nested (hierarchical) bootstrap, so the image level adds the binomial noise of each
    run's score. Because every run's mean over N resampled 0/1 values is exactly Binomial(N, accuracy)/N, the
    per-seed draw is done by a binomial draw (same distribution as drawing indices, N times faster). Caveat: the
    test images are shared, and runs tend to fail on the same hard images; independent draws per seed then
    under-state the image-level part by up to a factor sqrt(seeds) (the seed level still carries the spread of
    the seed means). ``image_draws="shared"`` draws one set of image indices per bootstrap draw for all seeds,
    which keeps that correlation (the choice for "how would these runs score on a new test set").

    With one seed, or ``resample_seeds=False``, the interval reflects test-image sampling only, and
    ``seed_variance_included`` is False and ``note`` says so. With few seeds (< ~10) the seed level of any
    bootstrap is coarse and narrower than the t-interval over seeds (:func:`summarize`); report both.
    Deterministic for a given ``seed``.
    """
    c = _correctness_matrix(correct, "correct")
    _check_boot_args(n_boot, confidence, image_draws, "two_level_bootstrap")
    n_seeds, n_images = c.shape
    rng = np.random.default_rng(seed)
    per_seed = c.mean(axis=1)  # (seeds,) accuracy of every run
    seeds = _seed_draws(rng, n_seeds, n_boot, resample_seeds)  # (n_boot, seeds)
    if image_draws == "per-seed":
        boot = rng.binomial(n_images, per_seed[seeds]).mean(axis=1) / n_images  # (n_boot,)
    else:
        boot = _shared_image_means(c.astype(np.float64), seeds, rng)
    return _interval(float(c.mean()), per_seed, boot, confidence, n_images, n_boot, resample_seeds, image_draws,
                     "accuracy")


def two_level_bootstrap_diff(correct_a: np.ndarray | Sequence[Sequence[bool]],
                             correct_b: np.ndarray | Sequence[Sequence[bool]], *, n_boot: int = 2000,
                             confidence: float = 0.95, seed: int = 0, resample_seeds: bool = True,
                             image_draws: str = "per-seed") -> BootstrapInterval:
    """Percentile interval of the paired accuracy difference A - B from a two-level bootstrap.

    ``correct_a``, ``correct_b``: ``(seeds, test_images)``, row i of both from the same seed (label subset) and
    the same test images. Pairing is kept at both levels: one draw of seed indices serves both arms, and within a
    drawn seed the same image indices serve both arms (the test images are shared), so only the images the two
    arms disagree on move the difference. Image draws across seeds as in :func:`two_level_bootstrap` (per-seed
    independent by default: the counts of "only A right" and "only B right" are drawn multinomially, the same
    distribution as drawing image indices).
    """
    ca = _correctness_matrix(correct_a, "correct_a")
    cb = _correctness_matrix(correct_b, "correct_b")
    if ca.shape != cb.shape:
        raise ValueError(f"two_level_bootstrap_diff: correct_a has shape {ca.shape} but correct_b {cb.shape}; "
                         f"pair them by seed on the same test images")
    _check_boot_args(n_boot, confidence, image_draws, "two_level_bootstrap_diff")
    n_seeds, n_images = ca.shape
    rng = np.random.default_rng(seed)
    only_a = (ca & ~cb).mean(axis=1)  # (seeds,) share of images only A gets right
    only_b = (~ca & cb).mean(axis=1)
    per_seed = only_a - only_b  # (seeds,) accuracy A - B of every seed
    seeds = _seed_draws(rng, n_seeds, n_boot, resample_seeds)
    if image_draws == "per-seed":
        pa, pb = only_a[seeds], only_b[seeds]  # (n_boot, seeds)
        n_a = rng.binomial(n_images, pa)
        rest = np.where(pa < 1.0, pb / np.where(pa < 1.0, 1.0 - pa, 1.0), 0.0)  # P(only B | not only A)
        n_b = rng.binomial(n_images - n_a, np.clip(rest, 0.0, 1.0))
        boot = ((n_a - n_b) / n_images).mean(axis=1)
    else:
        boot = _shared_image_means(ca.astype(np.float64) - cb.astype(np.float64), seeds, rng)
    return _interval(float(per_seed.mean()), per_seed, boot, confidence, n_images, n_boot, resample_seeds,
                     image_draws, "accuracy difference A - B")


# ---------------------------------------------------------------------------- per class over seeds
def class_metrics_over_seeds(y_true: Sequence[int] | np.ndarray,
                             preds_by_seed: np.ndarray | Sequence[Sequence[int]], num_classes: int, *,
                             confidence: float = 0.95) -> dict:
    """Per-class recall, worst class, macro-F1, balanced accuracy and accuracy of one arm, each over its seeds.

    Why: a mean accuracy can hide a class the model fails, and one run's per-class numbers hide how much they move
    between runs. ``y_true`` (images,) is the shared test set; ``preds_by_seed`` (seeds, images) the predicted
    class of every image for every seed. Per seed the metrics are those of :func:`~simclr_dist.report.classes.
    class_report`; over seeds each becomes a :class:`Summary` (mean, sd, t-interval; no interval with one seed).

    Returns a dict:
      ``recall``: list over classes of :class:`Summary` (None for a class absent from ``y_true``);
      ``worst_class``, ``worst_recall``: the class with the lowest MEAN recall over seeds and its Summary;
      ``worst_recall_per_seed``: Summary of each seed's own lowest recall (the class may differ by seed);
      ``macro_f1``, ``balanced_accuracy``, ``accuracy``: Summary over seeds; ``n_seeds``, ``num_classes``.
    """
    t = np.asarray(y_true)
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"class_metrics_over_seeds: y_true must be a non-empty 1-d array of labels, got shape "
                         f"{t.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"class_metrics_over_seeds: y_true must hold integer class indices, got dtype {t.dtype}")
    try:
        p = np.asarray(preds_by_seed)
    except ValueError as e:
        raise ValueError(f"class_metrics_over_seeds: preds_by_seed is ragged ({e})") from None
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"class_metrics_over_seeds: preds_by_seed must be (seeds, images) with at least one seed, "
                         f"got shape {p.shape}")
    if p.shape[1] != t.size:
        raise ValueError(f"class_metrics_over_seeds: preds_by_seed has {p.shape[1]} predictions per seed but y_true "
                         f"has {t.size} labels")
    if not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"class_metrics_over_seeds: preds_by_seed must hold integer class indices (no NaN), got "
                         f"dtype {p.dtype}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"class_metrics_over_seeds: num_classes must be a positive integer, got {num_classes!r}")
    for what, arr in (("y_true", t), ("preds_by_seed", p)):
        if arr.min() < 0 or arr.max() >= num_classes:
            raise ValueError(f"class_metrics_over_seeds: {what} has a label outside 0..{num_classes - 1}")
    reports = [class_report(t, row, num_classes=int(num_classes)) for row in p]
    recall = np.stack([r.recall for r in reports])  # (seeds, classes); nan columns: class absent from y_true
    present = ~np.isnan(recall[0])
    per_class = [summarize(recall[:, k], confidence) if present[k] else None for k in range(int(num_classes))]
    mean_recall = np.where(present, np.nan_to_num(recall).mean(axis=0), np.inf)
    worst = int(np.argmin(mean_recall))
    return {"n_seeds": int(p.shape[0]), "num_classes": int(num_classes), "recall": per_class,
            "worst_class": worst, "worst_recall": per_class[worst],
            "worst_recall_per_seed": summarize([r.worst_recall for r in reports], confidence),
            "macro_f1": summarize([r.macro_f1 for r in reports], confidence),
            "balanced_accuracy": summarize([r.balanced_accuracy for r in reports], confidence),
            "accuracy": summarize([r.accuracy for r in reports], confidence)}
