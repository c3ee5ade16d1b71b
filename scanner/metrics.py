"""Ranking metrics of a lens search: precision-recall, precision in the top N, recall in the top 1%.

Plain numpy, so the report, the README and the issues quote the same figures without pulling in
scikit-learn. Scores rank objects (higher = more lens-like); labels say which objects are lenses.
Ties are resolved as in scikit-learn: a threshold takes all objects with the same score at once,
so a curve never depends on the order of tied rows; the top-N metrics, which must pick exactly N
objects, break ties by the objects' order in the input (stable sort).

Example
-------
>>> scores = np.array([0.9, 0.8, 0.7, 0.1])
>>> labels = np.array([True, False, True, False])
>>> precision_at_top(scores, labels, 2)
0.5
>>> recall_in_top_fraction(scores, labels, 0.75)
1.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PRCurve:
    """Precision and recall at every distinct score threshold, from the highest threshold down.

    ``recall`` is NaN throughout when there are no positives (recall is undefined then).
    """

    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray
    n_positive: int


def _checked(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores as float64 and labels as bool, same length, scores finite; else a ValueError."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) must have the same length")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite; rank only "
                         f"scored objects (failed objects have no score)")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be booleans or 0/1 (1 = lens)")
        y = y.astype(bool)
    return s, y


def _ranked_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores sorted highest first and the labels in that order (ties keep the input order)."""
    order = np.argsort(-scores, kind="stable")
    return scores[order], labels[order]


def precision_recall(scores: np.ndarray, labels: np.ndarray, n_missed: int = 0) -> PRCurve:
    """Return the precision-recall curve of ranking ``labels`` by ``scores``.

    Parameters
    ----------
    scores : (N,) finite scores, higher = more lens-like.
    labels : (N,) booleans or 0/1, True = lens.
    n_missed : lenses that were never ranked (their objects could not be scored): they count in
        recall's denominator, as lenses no threshold finds.

    Returns
    -------
    PRCurve
        One point per distinct score, highest threshold first: the precision and recall of
        selecting every object scoring at least that threshold.

    Example
    -------
    >>> c = precision_recall(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 0]))
    >>> c.precision.tolist(), c.recall.tolist()
    ([1.0, 0.6666666666666666, 0.5], [0.5, 1.0, 1.0])
    """
    s, y = _checked(scores, labels)
    if s.size == 0:
        empty = np.zeros(0)
        return PRCurve(empty, empty, empty, n_missed)
    s, y = _ranked_labels(s, y)
    true_pos = np.cumsum(y)
    last_of_each_score = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    selected = last_of_each_score + 1
    n_positive = int(true_pos[-1]) + n_missed
    tp = true_pos[last_of_each_score].astype(np.float64)
    recall = tp / n_positive if n_positive else np.full(tp.size, np.nan)
    return PRCurve(tp / selected, recall, s[last_of_each_score], n_positive)


def average_precision(scores: np.ndarray, labels: np.ndarray, n_missed: int = 0) -> float:
    """Return the average precision: precision summed over the recall steps (NaN if no lenses).

    ``n_missed`` lenses never ranked count as lenses never found (see :func:`precision_recall`).
    """
    curve = precision_recall(scores, labels, n_missed)
    if curve.n_positive == 0 or curve.recall.size == 0:
        return math.nan if curve.n_positive == 0 else 0.0
    recall_steps = np.diff(np.r_[0.0, curve.recall])
    return float(np.sum(recall_steps * curve.precision))


def precision_at_top(scores: np.ndarray, labels: np.ndarray, n: int) -> float:
    """Return the fraction of lenses among the ``n`` highest-scoring objects (all if fewer).

    This is what a person inspecting the top ``n`` by eye finds. NaN for no objects.
    """
    if n < 1:
        raise ValueError(f"n={n}: give the number of top-ranked objects to look at (>= 1)")
    s, y = _checked(scores, labels)
    if s.size == 0:
        return math.nan
    _, y = _ranked_labels(s, y)
    return float(y[:n].mean())


def top_count(n_objects: int, fraction: float) -> int:
    """Return how many objects the top ``fraction`` holds: at least one, rounded up."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction}: give a fraction in (0, 1], e.g. 0.01 for the top 1%")
    return max(1, math.ceil(fraction * n_objects - 1e-9))


def recall_in_top_fraction(scores: np.ndarray, labels: np.ndarray, fraction: float = 0.01,
                           n_missed: int = 0) -> float:
    """Return the fraction of all lenses that rank in the top ``fraction`` of objects.

    E.g. ``fraction=0.01``: how many of the lenses a person finds by looking at the best 1% of
    the ranked list. ``n_missed`` lenses that were never ranked (their objects failed) count as
    not found. NaN when there are no lenses.
    """
    s, y = _checked(scores, labels)
    n_positive = int(y.sum()) + n_missed
    if n_positive == 0:
        return math.nan
    if s.size == 0:
        return 0.0
    _, y = _ranked_labels(s, y)
    return float(y[:top_count(s.size, fraction)].sum() / n_positive)


def precision_at_recall(scores: np.ndarray, labels: np.ndarray, recall: float) -> float:
    """Return the precision of the highest threshold whose recall reaches ``recall``.

    What a search gets if it keeps just enough of the ranked list to find that share of the
    lenses: no interpolation, so a later, better point of the curve does not flatter it. NaN when
    there are no lenses.

    Example
    -------
    >>> precision_at_recall(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0]), 0.5)
    1.0
    """
    if not 0 < recall <= 1:
        raise ValueError(f"recall={recall}: give a recall in (0, 1], e.g. 0.9")
    curve = precision_recall(scores, labels)
    if curve.n_positive == 0:
        return math.nan
    reached = np.flatnonzero(curve.recall >= recall - 1e-12)
    return float(curve.precision[reached[0]])


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Return the area under the ROC curve: the chance a lens outscores a non-lens (ties count 1/2).

    Computed from average ranks (the Mann-Whitney U statistic), as scikit-learn's
    ``roc_auc_score``. NaN without both lenses and non-lenses.

    Example
    -------
    >>> auroc(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0]))
    0.75
    """
    s, y = _checked(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="stable")
    sorted_scores = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # Tied scores share the mean of the ranks they span (1-based).
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], s.size]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def recall_at_zero_false_positives(scores: np.ndarray, labels: np.ndarray) -> float:
    """Return the share of lenses scoring strictly above every non-lens (TPR0).

    The recall a search reaches before its first false positive; lenses tied with the best
    non-lens do not count. NaN when there are no lenses; 1 when there are no non-lenses.

    Example
    -------
    >>> recall_at_zero_false_positives(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0]))
    0.5
    """
    s, y = _checked(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan
    if n_pos == y.size:
        return 1.0
    return float((s[y] > s[~y].max()).sum() / n_pos)
