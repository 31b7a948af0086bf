"""Statistics the experiment report rests on: a summary over seeds, and paired tests of "A beats B".

Why these tests: the arms are compared on the *same* test images and the *same* seeds (label subset, init), so
the comparisons are paired, and paired tests see a difference that unpaired intervals hide. Two levels:

* per test image, one pair of models - :func:`mcnemar`: exact (binomial) McNemar on the images exactly one of the
  two models gets right; the images both get right or both get wrong say nothing about which is better;
* over seeds - :func:`permutation_test` (sign-flip permutation of the paired differences of a metric, exact up to
  20 seeds) and :func:`sign_test` (only the signs). With few seeds these cannot reach small p-values at all (3
  seeds: no two-sided p below 0.25); the verdict says so instead of calling the difference "not significant".

Every test returns a :class:`PairedTest` whose ``verdict`` is one line for a table. :func:`holm` adjusts a family
of p-values (one test per label fraction) for multiple comparisons.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

ALTERNATIVES = ("two-sided", "greater", "less")
EXACT_PERMUTATION_MAX_N = 20  # 2^20 sign patterns; above: Monte Carlo


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


def summarize(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Summary:
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
    half = float(sps.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Summary(mean, sd, n, mean - half, mean + half, confidence)


@dataclass(frozen=True)
class PairedTest:
    """Outcome of a paired test of model/arm A against B."""

    test: str  # "mcnemar-exact", "permutation", "sign"
    statistic: float  # mcnemar: images only A gets right (b); permutation: mean of A - B; sign: seeds where A > B
    p_value: float
    n: int  # test images (mcnemar) or seeds
    alternative: str
    verdict: str  # one line
    details: dict

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {', '.join(ALTERNATIVES)}, got {alternative!r}")


def _verdict(names: tuple[str, str], direction: float, p: float, alpha: float, alternative: str, evidence: str,
             min_p: float, pairs: str) -> str:
    a, b = names
    if min_p >= alpha:
        return (f"undecidable: with this few {pairs} no outcome reaches p < {alpha:g} (smallest possible p "
                f"{min_p:.3g}); {evidence}")
    if p < alpha and direction != 0:
        winner, loser = (a, b) if direction > 0 else (b, a)
        return f"{winner} beats {loser} (p = {p:.3g} < {alpha:g}, {alternative}); {evidence}"
    return f"no significant difference between {a} and {b} (p = {p:.3g}, {alternative}); {evidence}"


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

    With b = images only A gets right and c = images only B gets right, under "A and B are equally good" each
    discordant image is A's with probability 1/2, so b ~ Binomial(b + c, 1/2); the p-value is the exact binomial
    one (``scipy.stats.binomtest``; "greater": A better). ``statistic`` is b; ``details`` holds the 2x2 table.
    """
    _check_alternative(alternative)
    ca, cb = _as_bool(correct_a, "correct_a"), _as_bool(correct_b, "correct_b")
    if ca.shape != cb.shape:
        raise ValueError(f"mcnemar: {ca.size} and {cb.size} images; both models must be scored on the same test set")
    both, only_a = int(np.sum(ca & cb)), int(np.sum(ca & ~cb))
    only_b, neither = int(np.sum(~ca & cb)), int(np.sum(~ca & ~cb))
    m = only_a + only_b
    p = 1.0 if m == 0 else float(sps.binomtest(only_a, m, 0.5, alternative=alternative).pvalue)
    min_p = _min_binomial_p(m, alternative)
    evidence = (f"{names[0]} right/{names[1]} wrong {only_a}, {names[0]} wrong/{names[1]} right {only_b}, "
                f"n = {ca.size} images, accuracy {ca.mean():.4f} vs {cb.mean():.4f}" if ca.size else "no images")
    verdict = _verdict(names, only_a - only_b, p, alpha, alternative, evidence, min_p, "discordant images")
    table = {"both_right": both, "only_a_right": only_a, "only_b_right": only_b, "both_wrong": neither}
    return PairedTest("mcnemar-exact", float(only_a), p, int(ca.size), alternative, verdict, table)


def _min_binomial_p(m: int, alternative: str) -> float:
    """The smallest p-value an exact binomial(m, 1/2) test can give: all m pairs one way."""
    if m == 0:
        return 1.0
    return min(1.0, 0.5 ** m * (2 if alternative == "two-sided" else 1))


def _paired(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{what}: {x.size} and {y.size} values; pair them by seed (same length)")
    if x.size == 0:
        raise ValueError(f"{what}: no pairs")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"{what}: non-finite value")
    return x - y


def permutation_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
                     names: tuple[str, str] = ("A", "B"), alternative: str = "two-sided", alpha: float = 0.05,
                     resamples: int = 100_000, seed: int = 0) -> PairedTest:
    """Paired sign-flip permutation test of the mean difference of a metric over seeds (``a[i]``, ``b[i]``: seed i).

    Under "no difference" each paired difference is as likely negative as positive, so the observed mean is
    compared with the means of all 2^n sign flips (exact for n <= 20; else ``resamples`` random flips, p counted
    with the observed one). ``statistic`` is the mean of A - B.
    """
    _check_alternative(alternative)
    d = _paired(a, b, "permutation_test")
    n, observed = d.size, float(d.mean())
    if n <= EXACT_PERMUTATION_MAX_N:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        means, exact = signs @ d / n, True
    else:
        rng = np.random.default_rng(seed)
        signs = rng.choice((1.0, -1.0), size=(resamples, n))
        means, exact = np.concatenate(([observed], signs @ d / n)), False
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    if alternative == "two-sided":
        p = float(np.mean(np.abs(means) >= abs(observed) - tol))
    elif alternative == "greater":
        p = float(np.mean(means >= observed - tol))
    else:
        p = float(np.mean(means <= observed + tol))
    min_p = (2.0 if alternative == "two-sided" else 1.0) / 2 ** n if n <= 60 else 0.0
    evidence = (f"mean {names[0]} - {names[1]} = {observed:+.4g} over {n} seeds "
                f"({'exact' if exact else f'{resamples} random'} sign flips)")
    verdict = _verdict(names, observed, p, alpha, alternative, evidence, min(1.0, min_p), "seeds")
    return PairedTest("permutation", observed, p, n, alternative, verdict,
                      {"differences": d.tolist(), "exact": exact})


def sign_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
              names: tuple[str, str] = ("A", "B"), alternative: str = "two-sided", alpha: float = 0.05) -> PairedTest:
    """Exact sign test over seeds: the number of seeds where A > B among those that differ ~ Binomial(m, 1/2).
    Ties are dropped. ``statistic`` is the number of seeds where A > B."""
    _check_alternative(alternative)
    d = _paired(a, b, "sign_test")
    wins, losses = int(np.sum(d > 0)), int(np.sum(d < 0))
    m = wins + losses
    p = 1.0 if m == 0 else float(sps.binomtest(wins, m, 0.5, alternative=alternative).pvalue)
    evidence = f"{names[0]} higher on {wins}, lower on {losses}, tied on {d.size - m} of {d.size} seeds"
    verdict = _verdict(names, wins - losses, p, alpha, alternative, evidence, _min_binomial_p(m, alternative),
                       "differing seeds")
    return PairedTest("sign", float(wins), p, int(d.size), alternative, verdict,
                      {"wins": wins, "losses": losses, "ties": int(d.size - m)})


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order): control the chance of any false "A beats B" over a family
    of tests, e.g. one per label fraction. Reject where the adjusted p < alpha."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0:
        return []
    if np.any((p < 0) | (p > 1)) or not np.all(np.isfinite(p)):
        raise ValueError(f"holm: p-values must be in [0, 1], got {p.tolist()}")
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (p.size - np.arange(p.size)) * p[order])
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted.tolist()
