"""Association of target connectivity with treatment outcome, with permutation inference.

For each target, the connectivity between a patient's atrophy network and the target
is correlated with the patient's treatment outcome across patients (Ji et al.,
Schizophr Bull 2023). Inference:

* Pearson (or Spearman) r with its parametric p (t test, n - 2 df);
* a two-sided permutation p, ``(1 + #{|r*| >= |r|}) / (1 + n_permutations)``;
* family-wise error over targets by the maximum statistic: each permutation is
  applied to every target, and a target's ``p_fwe`` counts the permutations whose
  largest ``|r*|`` over all targets reaches its ``|r|``;
* with covariates, the standardised coefficient of connectivity in
  ``outcome ~ connectivity + covariates`` (numeric covariates as they are, categorical
  ones one-hot coded), its t and parametric p, the partial r, and permutation p-values
  by Freedman & Lane (1983): residuals of the reduced model ``outcome ~ covariates``
  are permuted and added back to its fitted values.

Every permutation statistic is computed in closed form from a few matrix products over
a block of permutations (see :func:`_permutation_test`), so 5,000 permutations of 100
subjects and 10 targets take milliseconds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from .cohort import format_listing

__all__ = ["association", "target_outcome_analysis", "fit_line", "permutation_indices", "METHODS"]

#: Correlation methods: Pearson on the values, Spearman = Pearson on the ranks.
METHODS = ("pearson", "spearman")
_BLOCK = 1000  # permutations per block: bounds memory at _BLOCK x n values
_TIE_TOLERANCE = 1e-12  # |r*| equal to |r| up to rounding counts as reaching it


# ----------------------------------------------------------------- permutations
def permutation_indices(n: int, n_permutations: int, seed=0) -> np.ndarray:
    """The permutations used by :func:`association` and :func:`target_outcome_analysis`.

    Parameters
    ----------
    n : int
        Number of subjects.
    n_permutations : int
        Number of permutations.
    seed : int or None
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    ndarray of int, shape (n_permutations, n)
        Row ``i`` is the ``i``-th permutation of ``0..n-1``.
    """
    blocks = list(_permutation_blocks(n, n_permutations, seed))
    return np.concatenate(blocks) if blocks else np.empty((0, n), dtype=np.intp)


def _permutation_blocks(n, n_permutations, seed):
    rng = np.random.default_rng(seed)
    for start in range(0, n_permutations, _BLOCK):
        size = min(_BLOCK, n_permutations - start)
        yield rng.permuted(np.tile(np.arange(n), (size, 1)), axis=1)


def _permutation_test(X, y, Z, n_permutations, seed):
    """Partial correlation of each column of X with y given Z, with permutation p-values.

    Freedman-Lane: with ``Q`` an orthonormal basis of ``Z`` (which contains the
    intercept), the reduced-model residuals ``e = y - QQ'y`` are permuted, ``e* = Pe``,
    and the full model is refitted to ``QQ'y + e*``. Its partial correlation for
    column ``x`` is, with ``x_r = x - QQ'x``,

        r* = x_r'e* / sqrt(|x_r|^2 (|e*|^2 - |Q'e*|^2)),

    because ``QQ'y`` lies in the span of ``Z`` and ``x_r`` is orthogonal to it. With
    ``Z`` the intercept alone, ``Q'e* = 0`` and r* is Pearson's r of x and the permuted
    y, i.e. the plain permutation test.

    Returns
    -------
    r : (K,) observed partial correlations
    p_permutation, p_fwe : (K,) two-sided permutation p-values, uncorrected and
        max-statistic corrected over the K columns (NaN when n_permutations is 0).
    """
    Q, _ = np.linalg.qr(Z)
    e = y - Q @ (Q.T @ y)
    Xr = X - Q @ (Q.T @ X)
    xx = np.einsum("ij,ij->j", Xr, Xr)
    ee = float(e @ e)
    r = (Xr.T @ e) / np.sqrt(xx * ee)
    threshold = np.abs(r) - _TIE_TOLERANCE
    exceed = np.zeros(len(r))
    exceed_max = np.zeros(len(r))
    for block in _permutation_blocks(len(y), n_permutations, seed):
        E = e[block]  # (B, n): one permuted residual vector per row
        EQ = E @ Q
        ss = np.maximum(ee - np.einsum("ij,ij->i", EQ, EQ), np.finfo(float).tiny)
        r_perm = np.abs(E @ Xr) / np.sqrt(ss[:, None] * xx[None, :])
        exceed += (r_perm >= threshold).sum(axis=0)
        exceed_max += (r_perm.max(axis=1)[:, None] >= threshold).sum(axis=0)
    if n_permutations == 0:
        nan = np.full(len(r), np.nan)
        return r, nan, nan.copy()
    return r, (1 + exceed) / (1 + n_permutations), (1 + exceed_max) / (1 + n_permutations)


def _t_test(r, df):
    """t statistic and two-sided p of a (partial) correlation with ``df`` residual df."""
    r = np.clip(r, -1.0, 1.0)
    with np.errstate(divide="ignore"):
        t = r * np.sqrt(df / np.maximum(1.0 - r**2, 0.0))
    return t, 2.0 * stats.t.sf(np.abs(t), df)


# --------------------------------------------------------------- design matrix
def _covariate_design(covariates, n, names=None) -> tuple[np.ndarray, list[str]]:
    """Covariate columns: numeric ones centred and scaled, categorical ones one-hot (first level dropped)."""
    if isinstance(covariates, pd.DataFrame):
        if len(covariates) != n:
            raise ValueError(f"covariates have {len(covariates)} rows for {n} subjects")
        names = names if names is not None else [str(i) for i in covariates.index]
        columns, labels = [], []
        for column in covariates.columns:
            values, column_labels = _encode_column(covariates[column], str(column), names)
            columns.append(values)
            labels.extend(column_labels)
        design = np.column_stack(columns) if columns else np.empty((n, 0))
    else:
        design = np.asarray(covariates, dtype=np.float64)
        if design.ndim == 1:
            design = design[:, None]
        if design.ndim != 2 or len(design) != n:
            raise ValueError(f"covariates must be a DataFrame or an array of shape ({n}, k), got {design.shape}")
        labels = [f"covariate {j + 1}" for j in range(design.shape[1])]
        for j, label in enumerate(labels):
            if not np.all(np.isfinite(design[:, j])):
                raise ValueError(f"{label} has missing or non-finite values")
            if np.ptp(design[:, j]) == 0:
                raise ValueError(f"{label} is constant; remove it")
        design = (design - design.mean(axis=0)) / np.where(design.std(axis=0) > 0, design.std(axis=0), 1.0)
    Z = np.column_stack([np.ones(n), design])
    if np.linalg.matrix_rank(Z) < Z.shape[1]:
        raise ValueError(f"The covariates ({', '.join(labels)}) are collinear (with each other or the intercept)")
    return Z, labels


def _encode_column(values: pd.Series, column: str, names) -> tuple[np.ndarray, list[str]]:
    missing = values.isna().to_numpy() | values.map(lambda v: isinstance(v, str) and not v.strip()).to_numpy(bool)
    if missing.any():
        raise ValueError(f"Covariate '{column}' has missing values for {format_listing(np.asarray(names)[missing])}")
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        numbers = values.to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(numbers)):
            raise ValueError(f"Covariate '{column}' has non-finite values for "
                             f"{format_listing(np.asarray(names)[~np.isfinite(numbers)])}")
        if np.ptp(numbers) == 0:
            raise ValueError(f"Covariate '{column}' is constant ({numbers[0]:g} for every subject); remove it")
        return ((numbers - numbers.mean()) / numbers.std())[:, None], [column]
    levels = values.map(lambda v: str(v).strip())
    categories = sorted(levels.unique())
    if len(categories) < 2:
        raise ValueError(f"Covariate '{column}' has a single value ({categories[0]!r}) for every subject; remove it")
    one_hot = np.column_stack([(levels == level).to_numpy(dtype=np.float64) for level in categories[1:]])
    return one_hot, [f"{column}[{level}]" for level in categories[1:]]


# ----------------------------------------------------------------- association
def association(x, y, covariates=None, n_permutations=5000, seed=0, method="pearson") -> dict:
    """Correlation of x with y, optionally adjusted for covariates, with permutation p-values.

    Parameters
    ----------
    x, y : array_like of shape (n,)
        E.g. connectivity to one target and treatment outcome, one value per subject.
    covariates : pandas.DataFrame or array_like of shape (n, k), optional
        Nuisance variables, rows in the order of x and y. DataFrame columns of numeric dtype are used as they are,
        other columns (e.g. sex, site) are one-hot coded.
    n_permutations : int
        Number of permutations (0 skips the permutation test: p-values NaN).
    seed : int or None
        Seed of the permutations; the same seed gives the same permutations.
    method : {"pearson", "spearman"}
        Spearman ranks x and y (ties averaged) before the same computations; the
        covariates are not ranked.

    Returns
    -------
    dict
        ``n``, ``method``, ``n_permutations``, ``r``, ``p_parametric``,
        ``p_permutation``; with covariates also ``beta`` (standardised coefficient
        of x in ``y ~ x + covariates``), ``t``, ``partial_r``,
        ``p_parametric_adjusted`` and ``p_permutation_adjusted`` (Freedman-Lane).

    Raises
    ------
    ValueError
        Mismatched, non-finite or constant inputs, fewer than 3 subjects, too few
        subjects for the covariates, or collinear covariates.
    """
    x = _vector(x, "x")
    y = _vector(y, "y")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    _check_options(n_permutations, method)
    if len(x) < 3:
        raise ValueError(f"At least 3 subjects are needed for a correlation, got {len(x)}")
    for values, label in ((x, "x"), (y, "y")):
        if np.ptp(values) == 0:
            raise ValueError(f"{label} is constant ({values[0]:g} for every subject); a correlation is undefined")
    Z = _covariate_design(covariates, len(x))[0] if covariates is not None else None
    results = _analyse(x[:, None], y, Z, n_permutations, seed, method)
    # One variable: the max-statistic p-values equal the uncorrected ones.
    return {key: (float(value[0]) if isinstance(value, np.ndarray) else value)
            for key, value in results.items() if not key.startswith("p_fwe")}


def _analyse(X, y, Z, n_permutations, seed, method) -> dict:
    """Statistics of every column of X against y; Z (with intercept) or None."""
    n = len(y)
    if method == "spearman":
        X = stats.rankdata(X, axis=0)
        y = stats.rankdata(y)
    intercept = np.ones((n, 1))
    r, p_perm, p_fwe = _permutation_test(X, y, intercept, n_permutations, seed)
    out = {"n": n, "method": method, "n_permutations": int(n_permutations), "r": r,
           "p_parametric": _t_test(r, n - 2)[1], "p_permutation": p_perm, "p_fwe": p_fwe}
    if Z is not None:
        df = n - Z.shape[1] - 1
        if df < 1:
            raise ValueError(f"{n} subjects are too few for {Z.shape[1] - 1} covariate column(s) "
                             f"(need at least {Z.shape[1] + 2})")
        _check_not_explained(X, Z)
        partial, p_perm_adj, p_fwe_adj = _permutation_test(X, y, Z, n_permutations, seed)
        t, p_par_adj = _t_test(partial, df)
        out.update({"beta": _standardised_beta(X, y, Z), "t": t, "partial_r": partial,
                    "p_parametric_adjusted": p_par_adj, "p_permutation_adjusted": p_perm_adj,
                    "p_fwe_adjusted": p_fwe_adj})
    return out


def _standardised_beta(X, y, Z):
    """Coefficient of each column of X in y ~ X[:, j] + Z, in standard-deviation units."""
    Q, _ = np.linalg.qr(Z)
    Xr = X - Q @ (Q.T @ X)
    raw = (Xr.T @ y) / np.einsum("ij,ij->j", Xr, Xr)
    return raw * X.std(axis=0) / y.std()


def _check_not_explained(X, Z, names=None):
    Q, _ = np.linalg.qr(Z)
    Xr = X - Q @ (Q.T @ X)
    explained = np.einsum("ij,ij->j", Xr, Xr) <= 1e-10 * np.einsum("ij,ij->j", X - X.mean(0), X - X.mean(0))
    if explained.any():
        which = ", ".join(names[j] for j in np.flatnonzero(explained)) if names else "x"
        raise ValueError(f"Connectivity of {which} is fully explained by the covariates (collinear); "
                         "an adjusted association is undefined")


def _vector(values, label) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be numeric") from None
    if array.ndim != 1:
        raise ValueError(f"{label} must be 1-D (one value per subject), got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{label} has missing or non-finite values at positions {format_listing(bad)}")
    return array


def _check_options(n_permutations, method):
    if isinstance(n_permutations, bool) or int(n_permutations) != n_permutations or n_permutations < 0:
        raise ValueError(f"n_permutations must be a non-negative integer, got {n_permutations!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


# -------------------------------------------------------- analysis over targets
def target_outcome_analysis(connectivity, cohort, outcome, covariates=(), n_permutations=5000, seed=0,
                            method="pearson") -> pd.DataFrame:
    """Association of connectivity to each target with treatment outcome.

    Parameters
    ----------
    connectivity : pandas.DataFrame
        Index subject_id, one column per target (e.g. mean network value in the
        target ROI).
    cohort : pandas.DataFrame
        Has the outcome and covariate columns and a ``subject_id`` column (or the
        subjects as index). Subjects not in ``connectivity`` are ignored.
    outcome : str
        Outcome column (e.g. symptom change).
    covariates : sequence of str
        Covariate columns of the cohort (numeric or categorical, e.g. age, sex).
    n_permutations : int
        Permutations, shared by all targets (0 skips the permutation tests).
    seed : int or None
        Seed of the permutations.
    method : {"pearson", "spearman"}

    Returns
    -------
    pandas.DataFrame
        One row per target: ``target, n, r, p_parametric, p_permutation, p_fwe``
        and, with covariates, ``beta, t, partial_r, p_parametric_adjusted,
        p_permutation_adjusted, p_fwe_adjusted``. ``attrs`` records outcome,
        covariates, method, n_permutations and seed.

    Raises
    ------
    ValueError
        Missing outcome or covariate column (lists the available ones), subjects of
        ``connectivity`` absent from the cohort, missing or non-numeric outcome
        values, missing connectivity values, constant outcome or connectivity,
        fewer than 3 subjects. Messages name the subjects, column and target.
    """
    _check_options(n_permutations, method)
    covariates = [covariates] if isinstance(covariates, str) else list(covariates)
    X, subjects, targets = _connectivity_matrix(connectivity)
    rows = _cohort_rows(cohort, subjects, [outcome, *covariates])
    y = _outcome_values(rows[outcome], outcome, subjects)
    n = len(subjects)
    if n < 3:
        raise ValueError(f"At least 3 subjects are needed for a correlation, got {n} ({format_listing(subjects)})")
    if np.ptp(y) == 0:
        raise ValueError(f"Outcome column '{outcome}' is constant ({y[0]:g} for every subject); "
                         "a correlation is undefined")
    constant = [t for t, column in zip(targets, X.T) if np.ptp(column) == 0]
    if constant:
        raise ValueError(f"Connectivity is constant across subjects for target(s) {format_listing(constant)}; "
                         "a correlation is undefined")
    Z = None
    if covariates:
        Z = _covariate_design(rows[covariates].reset_index(drop=True), n, names=subjects)[0]
        if n - Z.shape[1] - 1 < 1:
            raise ValueError(f"{n} subjects are too few for covariates {', '.join(covariates)} "
                             f"({Z.shape[1] - 1} design column(s); need at least {Z.shape[1] + 2} subjects)")
        _check_not_explained(X, Z, targets)
    results = _analyse(X, y, Z, n_permutations, seed, method)
    columns = ["r", "p_parametric", "p_permutation", "p_fwe"]
    if Z is not None:
        columns += ["beta", "t", "partial_r", "p_parametric_adjusted", "p_permutation_adjusted", "p_fwe_adjusted"]
    table = pd.DataFrame({"target": targets, "n": n, **{c: results[c] for c in columns}})
    table.attrs.update({"outcome": outcome, "covariates": covariates, "method": method,
                        "n_permutations": int(n_permutations), "seed": seed})
    return table


def _connectivity_matrix(connectivity):
    if not isinstance(connectivity, pd.DataFrame):
        raise ValueError(f"connectivity must be a pandas DataFrame (index subject_id, one column per target), "
                         f"got {type(connectivity).__name__}")
    if connectivity.shape[1] == 0:
        raise ValueError("connectivity has no target columns")
    subjects = [str(s).strip() for s in connectivity.index]
    duplicated = sorted({s for s in subjects if subjects.count(s) > 1})
    if duplicated:
        raise ValueError(f"connectivity has duplicate subject ids: {format_listing(duplicated)}")
    targets = [str(c) for c in connectivity.columns]
    X = np.empty(connectivity.shape)
    for j, (target, column) in enumerate(zip(targets, connectivity.columns)):
        values = pd.to_numeric(connectivity[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            raise ValueError(f"connectivity of target '{target}' is missing or not a number for "
                             f"{format_listing(np.asarray(subjects)[bad])}")
        X[:, j] = values
    return X, subjects, targets


def _cohort_rows(cohort, subjects, columns):
    """Cohort rows of ``subjects`` (in that order), checking that columns and subjects exist."""
    if not isinstance(cohort, pd.DataFrame):
        raise ValueError(f"cohort must be a pandas DataFrame, got {type(cohort).__name__}")
    where = f"Cohort table '{cohort.attrs['source']}'" if cohort.attrs.get("source") else "Cohort"
    ids = cohort["subject_id"] if "subject_id" in cohort.columns else pd.Series(cohort.index, index=cohort.index)
    ids = [str(s).strip() for s in ids]
    missing_columns = [c for c in columns if c not in cohort.columns]
    if missing_columns:
        raise ValueError(f"{where} has no column(s) {', '.join(repr(c) for c in missing_columns)}; "
                         f"available columns: {', '.join(repr(str(c)) for c in cohort.columns)}")
    duplicated = sorted({s for s in ids if ids.count(s) > 1})
    if duplicated:
        raise ValueError(f"{where} has duplicate subject ids: {format_listing(duplicated)}")
    position = {s: i for i, s in enumerate(ids)}
    absent = [s for s in subjects if s not in position]
    if absent:
        raise ValueError(f"Subjects in the connectivity table are not in the {where.lower()}: "
                         f"{format_listing(absent)}")
    return cohort.iloc[[position[s] for s in subjects]]


def _outcome_values(values: pd.Series, outcome, subjects) -> np.ndarray:
    subjects = np.asarray(subjects)
    blank = values.map(lambda v: isinstance(v, str) and not v.strip()).to_numpy(bool)
    missing = values.isna().to_numpy() | blank
    if missing.any():
        raise ValueError(f"Outcome column '{outcome}' has missing values for {format_listing(subjects[missing])}")
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(numbers)
    if bad.any():
        shown = [f"{s} ({v!r})" for s, v in zip(subjects[bad], values[bad].tolist())]
        raise ValueError(f"Outcome column '{outcome}' is not a number for {format_listing(shown)}")
    return numbers


# ------------------------------------------------------------------- line fit
def fit_line(x, y, n_grid=100, level=0.95) -> dict:
    """Least-squares line of y on x with a confidence band of the mean, for scatter plots.

    Parameters
    ----------
    x, y : array_like of shape (n,)
    n_grid : int
        Number of grid points spanning the range of x.
    level : float
        Confidence level of the band (0.95: 95 %).

    Returns
    -------
    dict
        ``slope``, ``intercept``, ``x`` (grid), ``y`` (fitted line on the grid),
        ``lower``, ``upper`` (band), ``level``.
    """
    x = _vector(x, "x")
    y = _vector(y, "y")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if len(x) < 3:
        raise ValueError(f"At least 3 points are needed for a line with a confidence band, got {len(x)}")
    if np.ptp(x) == 0:
        raise ValueError(f"x is constant ({x[0]:g}); a line cannot be fitted")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    n = len(x)
    x_mean = x.mean()
    sxx = np.sum((x - x_mean) ** 2)
    slope = np.sum((x - x_mean) * (y - y.mean())) / sxx
    intercept = y.mean() - slope * x_mean
    residual_sd = np.sqrt(np.sum((y - intercept - slope * x) ** 2) / (n - 2))
    grid = np.linspace(x.min(), x.max(), int(n_grid))
    fitted = intercept + slope * grid
    half_width = stats.t.ppf(0.5 + level / 2, n - 2) * residual_sd * np.sqrt(1 / n + (grid - x_mean) ** 2 / sxx)
    return {"slope": float(slope), "intercept": float(intercept), "x": grid, "y": fitted,
            "lower": fitted - half_width, "upper": fitted + half_width, "level": float(level)}
