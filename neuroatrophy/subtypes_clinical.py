"""Clinical associations of SuStaIn subtypes and stages.

Two analyses, as in Zhuo et al. (BMC Medicine 2025):

* :func:`subtype_differences` -- do clinical scores differ between subtypes? ANCOVA
  (OLS on subtype indicators and covariates), F-test of the subtype term, adjusted
  means and pairwise contrasts with Holm-adjusted p-values;
* :func:`stage_associations` -- within each subtype, does the score go with the stage?
  OLS of the score on stage and covariates (standardised beta, partial r) and
  Spearman's rho.

Both take the subject table produced by staging (``ml_subtype``, ``ml_stage``) joined
with clinical columns. Stage-0 ("normal-appearing") subjects are left out by default:
their subtype is not identifiable (they have no abnormal event), so they would dilute
subtype comparisons.

Both return tidy tables (one row per test or estimate) with ``n`` (subjects used) and
``n_excluded`` (eligible subjects dropped for a missing score or covariate).
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
from scipy import stats

from .cohort import subject_names
from .subtypes_input import (
    _is_categorical,
    _is_missing,
    _label,
    _require_columns,
    covariate_design,
    fit_covariate_encoding,
    numeric_column,
)

__all__ = ["holm", "stage_associations", "subtype_differences"]

_DIFFERENCE_COLUMNS = ["score", "effect", "subtype", "versus", "estimate", "se", "statistic",
                       "df_num", "df_den", "p", "p_holm", "n", "n_excluded"]
_STAGE_COLUMNS = ["score", "subtype", "n", "n_excluded", "beta", "se", "std_beta", "partial_r", "t", "df", "p",
                  "spearman_rho", "spearman_p", "note"]


def holm(p) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error), in the input order."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p)
    adjusted = np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p))))
    out = np.empty_like(p)
    out[order] = np.minimum(adjusted, 1.0)
    return out


# ---------------------------------------------------------------- shared
def _as_list(columns) -> list:
    return [columns] if isinstance(columns, str) else list(columns)


def _subtype_labels(table, column):
    """Subtype label per row (ints where integral, None where missing) and the sorted groups."""
    labels = [None if m else (int(float(v)) if _is_integral(v) else _label(v))
              for v, m in zip(table[column], _is_missing(table[column]))]
    present = {v for v in labels if v is not None}
    groups = sorted(present, key=lambda v: (isinstance(v, str), v))
    return np.array(labels, dtype=object), groups


def _present(labels) -> np.ndarray:
    return np.array([v is not None for v in labels], dtype=bool)


def _is_integral(value) -> bool:
    try:
        return float(value).is_integer()
    except (TypeError, ValueError):
        return False


def _eligible_rows(table, names, stage_column, include_stage0) -> np.ndarray:
    if include_stage0:
        return np.ones(len(table), dtype=bool)
    stage = numeric_column(table, stage_column, names)
    return ~np.isnan(stage) & (stage != 0)


def _score(table, column, names) -> np.ndarray:
    y = numeric_column(table, column, names)
    present = y[~np.isnan(y)]
    if len(present) and np.ptp(present) == 0:
        raise ValueError(f"score column {column!r} is constant ({present[0]:g}); nothing to compare")
    if not len(present):
        raise ValueError(f"score column {column!r} has no values")
    return y


def _complete_covariates(table, covariates, names) -> np.ndarray:
    """Rows with every covariate present; numeric covariates are checked in every row."""
    complete = np.ones(len(table), dtype=bool)
    for column in covariates:
        if not _is_categorical(table[column], column):
            numeric_column(table, column, names)
        complete &= ~_is_missing(table[column])
    return complete


def _ols(X, y):
    """Coefficients, residual sum of squares, residual df and coefficient covariance."""
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    rss = float(resid @ resid)
    df = len(y) - X.shape[1]
    cov = rss / df * np.linalg.inv(X.T @ X) if df > 0 else np.full((X.shape[1],) * 2, np.nan)
    return coef, rss, df, cov


def _covariate_block(table, rows, covariates, names):
    sub = table[rows]
    sub_names = np.asarray(names, dtype=object)[rows].tolist()
    encoding = fit_covariate_encoding(sub, covariates, sub_names)
    return covariate_design(sub, encoding, sub_names, intercept=False)


# ---------------------------------------------------------------- subtype differences
def subtype_differences(table: pd.DataFrame, scores, subtype_column="ml_subtype", covariates=(),
                        include_stage0=False, stage_column="ml_stage") -> pd.DataFrame:
    """ANCOVA of clinical scores across subtypes.

    Per score, the model ``score ~ 1 + subtype indicators + covariates`` (first
    subtype as reference; categorical covariates dummy coded as in
    :mod:`neuroatrophy.subtypes_input`) is compared with the model without the subtype
    indicators by an F-test; adjusted means are the model's predictions with every
    subject set to the subtype, averaged (covariates at their sample means and
    proportions); contrasts are differences of adjusted means with t-tests on the
    model's residual df, Holm-adjusted across the pairs of that score.

    Parameters
    ----------
    table : DataFrame
        One row per subject: subtype (and stage) plus score and covariate columns.
    scores : str or sequence of str
        Clinical score columns (numeric).
    subtype_column : str
    covariates : sequence of str
    include_stage0 : bool
        Keep stage-0 subjects (default False: they are dropped, using ``stage_column``).
    stage_column : str

    Returns
    -------
    DataFrame with columns ``score, effect, subtype, versus, estimate, se, statistic,
    df_num, df_den, p, p_holm, n, n_excluded``; ``effect`` is

    * ``"subtype"``: the F-test (``statistic`` = F, ``df_num``, ``df_den``, ``p``);
    * ``"adjusted_mean"``: ``estimate`` and ``se`` of one subtype, ``n`` its subjects;
    * ``"contrast"``: ``estimate`` = mean(subtype) - mean(versus), ``se``, ``statistic`` = t,
      ``df_den``, ``p`` and ``p_holm``.

    Raises
    ------
    ValueError
        Unknown columns, non-numeric or constant scores, fewer than two subtypes, a
        subtype left without subjects after dropping missing values, too few subjects
        for the model, covariates collinear with the subtypes.
    """
    scores, covariates = _as_list(scores), _as_list(covariates)
    _require_columns(table, scores + [subtype_column] + covariates + ([] if include_stage0 else [stage_column]),
                     "table")
    names = subject_names(table)
    labels, _ = _subtype_labels(table, subtype_column)
    eligible = _eligible_rows(table, names, stage_column, include_stage0) & _present(labels)
    groups = sorted({v for v in labels[eligible]}, key=lambda v: (isinstance(v, str), v))
    if len(groups) < 2:
        raise ValueError(f"column {subtype_column!r} has {len(groups)} subtype(s) among the subjects analysed "
                         f"({'stage 0 excluded' if not include_stage0 else 'all stages'}); at least 2 are needed")
    complete = _complete_covariates(table, covariates, names)
    rows = []
    for score in scores:
        y = _score(table, score, names)
        used = eligible & complete & ~np.isnan(y)
        n_excluded = int(eligible.sum() - used.sum())
        for group in groups:
            if not np.any(used & (labels == group)):
                raise ValueError(
                    f"score {score!r}: no subject of subtype {group} is left after dropping {n_excluded} "
                    "subject(s) with a missing score or covariate"
                )
        rows += _ancova(table, y, used, labels, groups, covariates, names, score, n_excluded)
    result = pd.DataFrame(rows, columns=_DIFFERENCE_COLUMNS)
    for column in ("subtype", "versus"):   # keep subtype labels as given (1, not 1.0) next to the F-test's gap
        result[column] = pd.Series([row.get(column) for row in rows], dtype=object)
    return result


def _ancova(table, y, used, labels, groups, covariates, names, score, n_excluded) -> list[dict]:
    n, k = int(used.sum()), len(groups)
    dummies = np.column_stack([(labels[used] == g).astype(float) for g in groups[1:]])
    Z, z_names = _covariate_block(table, used, covariates, names)
    X_full = np.column_stack([np.ones(n), dummies, Z])
    X_reduced = np.column_stack([np.ones(n), Z])
    if np.linalg.matrix_rank(X_full) < X_full.shape[1]:
        raise ValueError(f"score {score!r}: the covariates ({', '.join(z_names) or 'none'}) are constant or "
                         "collinear with the subtypes among the subjects used")
    if n <= X_full.shape[1]:
        raise ValueError(f"score {score!r}: {n} subjects are too few for {X_full.shape[1]} model parameters")
    coef, rss_full, df_den, cov = _ols(X_full, y[used])
    _, rss_reduced, _, _ = _ols(X_reduced, y[used])
    f_value = (rss_reduced - rss_full) / (k - 1) / (rss_full / df_den)
    base = dict(score=score, n_excluded=n_excluded)
    out = [base | dict(effect="subtype", statistic=f_value, df_num=k - 1, df_den=df_den,
                       p=float(stats.f.sf(f_value, k - 1, df_den)), n=n)]

    # Averaging predictions over the subjects = predicting at the design's column means.
    center = X_full.mean(axis=0)
    points = {}
    for i, group in enumerate(groups):
        x = center.copy()
        x[1:k] = 0.0
        if i:
            x[i] = 1.0
        points[group] = x
        out.append(base | dict(effect="adjusted_mean", subtype=group, estimate=float(x @ coef),
                               se=float(np.sqrt(x @ cov @ x)), df_den=df_den, n=int(np.sum(labels[used] == group))))
    contrasts = []
    for a, b in itertools.combinations(groups, 2):
        c = points[a] - points[b]
        estimate, se = float(c @ coef), float(np.sqrt(c @ cov @ c))
        t = estimate / se
        contrasts.append(base | dict(effect="contrast", subtype=a, versus=b, estimate=estimate, se=se,
                                     statistic=t, df_den=df_den, p=float(2 * stats.t.sf(abs(t), df_den)),
                                     n=int(np.sum(np.isin(labels[used], [a, b])))))
    for row, adjusted in zip(contrasts, holm([r["p"] for r in contrasts])):
        row["p_holm"] = float(adjusted)
    return out + contrasts


# ---------------------------------------------------------------- stage associations
def stage_associations(table: pd.DataFrame, scores, stage_column="ml_stage", subtype_column="ml_subtype",
                       covariates=(), include_stage0=False) -> pd.DataFrame:
    """Association of SuStaIn stage with clinical scores within each subtype.

    Per score and subtype: OLS ``score ~ 1 + stage + covariates`` gives the stage slope
    ``beta`` (score units per stage), its ``se``, ``t``, ``df`` and two-sided ``p``; the
    standardised beta (``beta * SD(stage) / SD(score)`` over the subjects used) and the
    partial correlation ``t / sqrt(t^2 + df)``; Spearman's rho of score and stage
    (not covariate adjusted). A last row per score, ``subtype = "all"``, pools the
    subtypes with subtype indicators added to the covariates.

    A subtype whose subjects are too few for the model or share one stage (or one score)
    gets NaN statistics and a ``note`` saying why, instead of stopping the analysis.

    Returns
    -------
    DataFrame with columns ``score, subtype, n, n_excluded, beta, se, std_beta,
    partial_r, t, df, p, spearman_rho, spearman_p, note``.

    Raises
    ------
    ValueError
        Unknown columns, a non-numeric score, stage or covariate, a constant score.
    """
    scores, covariates = _as_list(scores), _as_list(covariates)
    _require_columns(table, scores + [stage_column, subtype_column] + covariates, "table")
    names = subject_names(table)
    stage = numeric_column(table, stage_column, names)
    labels, _ = _subtype_labels(table, subtype_column)
    eligible = ~np.isnan(stage) & _present(labels)
    if not include_stage0:
        eligible &= stage != 0
    groups = sorted({v for v in labels[eligible]}, key=lambda v: (isinstance(v, str), v))
    if not groups:
        raise ValueError(f"no subject with a subtype in {subtype_column!r} and a "
                         f"{'non-zero ' if not include_stage0 else ''}stage in {stage_column!r}")
    complete = _complete_covariates(table, covariates, names)
    rows = []
    for score in scores:
        y = _score(table, score, names)
        for group in groups + ["all"]:
            in_group = eligible & ((labels == group) if group != "all" else True)
            used = in_group & complete & ~np.isnan(y)
            extra = None
            if group == "all":
                extra = np.column_stack([(labels[used] == g).astype(float) for g in groups[1:]]) \
                    if len(groups) > 1 else None
            row = _stage_fit(table, y, stage, used, covariates, names, extra)
            rows.append(dict(score=score, subtype=group, n_excluded=int(in_group.sum() - used.sum())) | row)
    return pd.DataFrame(rows, columns=_STAGE_COLUMNS)


def _stage_fit(table, y, stage, used, covariates, names, extra) -> dict:
    n = int(used.sum())
    row = dict(n=n, beta=np.nan, se=np.nan, std_beta=np.nan, partial_r=np.nan, t=np.nan, df=np.nan,
               p=np.nan, spearman_rho=np.nan, spearman_p=np.nan, note="")
    if n < 3:
        return row | dict(note=f"{n} subject(s): too few")
    s, yy = stage[used], y[used]
    if np.ptp(s) == 0:
        return row | dict(note=f"every subject is at stage {s[0]:g}")
    if np.ptp(yy) == 0:
        return row | dict(note=f"every subject has score {yy[0]:g}")
    rho, rho_p = stats.spearmanr(s, yy)
    row |= dict(spearman_rho=float(rho), spearman_p=float(rho_p))
    Z, _ = _covariate_block(table, used, covariates, names)
    blocks = [np.ones(n), s, Z] + ([extra] if extra is not None else [])
    X = np.column_stack(blocks)
    if n <= X.shape[1]:
        return row | dict(note=f"{n} subjects are too few for {X.shape[1]} model parameters")
    if np.linalg.matrix_rank(X) < X.shape[1]:
        return row | dict(note="covariates constant or collinear with stage")
    coef, _, df, cov = _ols(X, yy)
    beta, se = float(coef[1]), float(np.sqrt(cov[1, 1]))
    t = beta / se
    return row | dict(beta=beta, se=se, std_beta=beta * s.std(ddof=1) / yy.std(ddof=1),
                      partial_r=t / np.sqrt(t * t + df), t=t, df=df, p=float(2 * stats.t.sf(abs(t), df)))
