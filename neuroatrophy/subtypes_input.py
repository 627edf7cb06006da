"""Inputs of SuStaIn: regional measures to covariate-adjusted z-scores, z-levels, mixture likelihoods.

Z-score SuStaIn expects, per subject and region, a z-score oriented so that
larger means more abnormal (pySuStaIn's convention). The usual way to get one
(pySuStaIn's workshop, Zhuo et al. 2025) is a regression of each regional measure
on age, sex and intracranial volume in healthy controls; a subject's z is its
residual from that regression divided by the controls' residual SD (a "w-score"),
with the sign flipped for atrophy, where smaller volumes or thinner cortex are
abnormal. :class:`RegionalZScorer` does this; :func:`regional_zscores` runs it on a
cohort table with a group column; :func:`default_z_levels` proposes the z-levels
(events) and maximum z of each region; :func:`mixture_likelihoods` makes the
event / no-event likelihoods of the mixture (event-based) SuStaIn.

Covariates
----------
A covariate is categorical if its name is one of :data:`CATEGORICAL_COVARIATES`
(``sex``, ``site`` ...), if it has a pandas categorical dtype, or if none of its
values is a number (``"F"``/``"M"``); it is dummy coded against its first level
(sorted) in the controls. Other covariates (age, ICV, sex coded 0/1) are numeric,
entered linearly (standardised with the controls' mean and SD, which changes no
fitted value, only the conditioning: ICV is ~1e6 mm^3).

Why OLS is the default
----------------------
``method="ols"`` is what SuStaIn users do and it adjusts for any covariates,
intracranial volume included. ``method="normative"`` uses the library's
:class:`~neuroatrophy.normative.NormativeModel` (Bayesian linear regression with a
B-spline of age, sex and site effects, predictive SD including parameter
uncertainty) for each region; that model knows only age, sex and site, so this
method accepts only covariates among those three (normalise volumes by ICV
beforehand if needed) and needs at least 20 controls.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from . import __version__
from .cohort import format_listing, subject_names
from .io import atomic_write

__all__ = [
    "CATEGORICAL_COVARIATES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "RegionalZScorer",
    "default_z_levels",
    "fit_biomarker_mixture",
    "mixture_likelihoods",
    "numeric_column",
    "regional_zscores",
]

FORMAT_NAME = "neuroatrophy-regional-zscorer"
FORMAT_VERSION = 1
#: Covariates that are always dummy coded, even when given as numbers (site 1, 2, 3).
CATEGORICAL_COVARIATES = ("sex", "site", "scanner", "center", "centre")
_DIRECTIONS = ("lower", "higher")
_METHODS = ("ols", "normative")
_NORMATIVE_COVARIATES = ("age", "sex", "site")


# ---------------------------------------------------------------- table checks
def _label(value):
    """Stripped text of a label; integral floats (1.0 from a CSV column with gaps) read as "1"."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _is_missing(values: pd.Series) -> np.ndarray:
    blank = values.map(lambda v: isinstance(v, str) and not v.strip()).astype(bool)
    return (values.isna() | blank).to_numpy()


def _subject_index(table: pd.DataFrame) -> pd.Index:
    """Subject ids: the ``subject_id`` column if present, else the index; duplicates are refused."""
    if "subject_id" in table.columns:
        ids = pd.Index([_label(v) for v in table["subject_id"]], name="subject_id")
    else:
        ids = table.index
    duplicated = ids[ids.duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"duplicate subject ids: {format_listing(duplicated)}")
    return ids


def _require_columns(table, columns, where: str):
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"{where} must be a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(
            f"{where}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"available columns: {format_listing(repr(c) for c in table.columns) or 'none'}"
        )


def numeric_column(table: pd.DataFrame, column, names=None) -> np.ndarray:
    """Values of ``column`` as floats (missing or blank -> NaN).

    Raises ``ValueError`` naming the column, the first subject with a non-numeric
    or infinite value and that value.
    """
    names = subject_names(table) if names is None else list(names)
    values = table[column]
    if pd.api.types.is_bool_dtype(values):
        return values.to_numpy(dtype=float)
    stripped = values.map(lambda v: v.strip() if isinstance(v, str) else v)
    numbers = pd.to_numeric(stripped, errors="coerce").astype(float).to_numpy()
    bad = (np.isnan(numbers) & ~_is_missing(values)) | np.isinf(numbers)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"column {column!r} must be numeric: subject {names[i]} has {values.iloc[i]!r}"
            f"{f' ({int(bad.sum())} non-numeric values in all)' if bad.sum() > 1 else ''}"
        )
    return numbers


def _check_complete(table, column, names):
    missing = _is_missing(table[column])
    if missing.any():
        listed = format_listing(np.asarray(names, dtype=object)[missing])
        raise ValueError(f"covariate {column!r} is missing for subject(s) {listed}")


# ---------------------------------------------------------------- covariate design
def _is_categorical(values: pd.Series, name) -> bool:
    if str(name).strip().lower() in CATEGORICAL_COVARIATES or isinstance(values.dtype, pd.CategoricalDtype):
        return True
    if pd.api.types.is_numeric_dtype(values):
        return False
    present = values[~_is_missing(values)]
    stripped = present.map(lambda v: v.strip() if isinstance(v, str) else v)
    return bool(pd.to_numeric(stripped, errors="coerce").isna().all())


def fit_covariate_encoding(table: pd.DataFrame, covariates, names=None) -> list[dict]:
    """How each covariate becomes design columns, learned from ``table`` (complete rows expected)."""
    names = subject_names(table) if names is None else list(names)
    encoding = []
    for column in covariates:
        _check_complete(table, column, names)
        if _is_categorical(table[column], column):
            levels = sorted({_label(v) for v in table[column]})
            encoding.append({"name": column, "kind": "categorical", "levels": levels})
        else:
            x = numeric_column(table, column, names)
            encoding.append({"name": column, "kind": "numeric", "center": float(x.mean()),
                             "scale": float(x.std()) or 1.0})
    return encoding


def covariate_design(table: pd.DataFrame, encoding, names=None, intercept=True) -> tuple[np.ndarray, list[str]]:
    """Design matrix ``(n, p)`` and column names for ``table`` under a fitted encoding."""
    names = subject_names(table) if names is None else list(names)
    blocks, columns = ([np.ones(len(table))], ["intercept"]) if intercept else ([], [])
    for entry in encoding:
        column = entry["name"]
        _check_complete(table, column, names)
        if entry["kind"] == "numeric":
            blocks.append((numeric_column(table, column, names) - entry["center"]) / entry["scale"])
            columns.append(str(column))
            continue
        labels = np.array([_label(v) for v in table[column]], dtype=object)
        unknown = ~np.isin(labels, entry["levels"])
        if unknown.any():
            i = int(np.flatnonzero(unknown)[0])
            raise ValueError(
                f"covariate {column!r}: subject {names[i]} has {labels[i]!r}, a value not seen in the "
                f"controls (known: {format_listing(entry['levels'])})"
            )
        for level in entry["levels"][1:]:
            blocks.append((labels == level).astype(float))
            columns.append(f"{column}[{level}]")
    if not blocks:
        return np.zeros((len(table), 0)), columns
    return np.column_stack(blocks), columns


def _check_full_rank(X, columns, where: str):
    if X.shape[1] and np.linalg.matrix_rank(X) < X.shape[1]:
        constant = [c for c, x in zip(columns, X.T) if c != "intercept" and np.ptp(x) == 0]
        detail = f"constant: {', '.join(constant)}" if constant else f"collinear among {', '.join(columns)}"
        raise ValueError(f"{where}: the covariates do not separate (design is rank deficient; {detail})")


# ---------------------------------------------------------------- directions
def _directions(abnormal, regions) -> list[str]:
    if isinstance(abnormal, dict):
        missing = [r for r in regions if r not in abnormal]
        if missing:
            raise ValueError(f"abnormal: no direction given for region(s) {format_listing(missing)}")
        directions = [abnormal[r] for r in regions]
    else:
        directions = [abnormal] * len(regions)
    for region, direction in zip(regions, directions):
        if direction not in _DIRECTIONS:
            raise ValueError(
                f"abnormal direction for region {region!r} must be 'lower' or 'higher', got {direction!r}"
            )
    return directions


def _signs(directions) -> np.ndarray:
    # "lower": smaller than expected is abnormal, so the z is negated to make abnormal positive.
    return np.array([-1.0 if d == "lower" else 1.0 for d in directions])


# ---------------------------------------------------------------- z-scores
class RegionalZScorer:
    """Covariate-adjusted regional z-scores against controls; larger = more abnormal.

    Parameters
    ----------
    regions : sequence of str
        Columns of the regional measures (volumes, thicknesses...).
    covariates : sequence of str
        Covariate columns (default age, sex, intracranial volume); see the module docstring
        for how categorical covariates are coded. Empty: plain control mean and SD.
    abnormal : {"lower", "higher"} or dict
        Which side is abnormal: ``"lower"`` for atrophy (smaller is abnormal: z negated),
        ``"higher"`` (e.g. lesion load, ventricles), or a dict region -> direction.
    method : {"ols", "normative"}
        ``"ols"``: per region ordinary least squares in the controls; z is the residual over
        the residual SD ``sqrt(RSS / (n - p))`` (``p`` design columns, intercept included).
        ``"normative"``: :class:`~neuroatrophy.normative.NormativeModel` per region
        (covariates among age, sex, site; see the module docstring).

    Attributes (after ``fit``)
    --------------------------
    coef_ : ndarray (n_regions, p)  -- OLS coefficients on ``design_columns_``
    sd_ : ndarray (n_regions,)      -- residual SD
    n_controls_ : ndarray (n_regions,) -- controls with a value per region

    Examples
    --------
    >>> scorer = RegionalZScorer(["hippocampus", "thalamus"]).fit(controls)  # doctest: +SKIP
    >>> z = scorer.transform(patients)                                        # doctest: +SKIP
    """

    def __init__(self, regions, covariates=("age", "sex", "icv"), abnormal="lower", method="ols"):
        self.regions = list(regions)
        self.covariates = list(covariates)
        self.abnormal = abnormal
        self.method = method

    # ------------------------------------------------------------ fitting
    def _check_params(self) -> list[str]:
        if not self.regions:
            raise ValueError("regions: at least one region column is needed")
        if len(set(self.regions)) != len(self.regions):
            raise ValueError(f"regions: duplicate names in {self.regions}")
        overlap = set(self.regions) & set(self.covariates)
        if overlap:
            raise ValueError(f"column(s) {sorted(overlap)} are given as both regions and covariates")
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {self.method!r}")
        if self.method == "normative":
            other = [c for c in self.covariates if c not in _NORMATIVE_COVARIATES]
            if other or "age" not in self.covariates:
                raise ValueError(
                    "method='normative' models age (required), sex and site only; got covariates "
                    f"{self.covariates}. Use method='ols' to adjust for {other or 'these'} (e.g. ICV)"
                )
        return _directions(self.abnormal, self.regions)

    def fit(self, controls: pd.DataFrame) -> RegionalZScorer:
        """Fit the per-region regressions on the control subjects (rows of ``controls``)."""
        self.directions_ = self._check_params()
        _require_columns(controls, self.regions + self.covariates, "controls")
        ids = _subject_index(controls)
        names = [str(i) for i in ids]
        Y = self._region_values(controls, names)
        for region, y in zip(self.regions, Y.T):
            y = y[~np.isnan(y)]
            if len(y) > 1 and not y.std() > 1e-12 * max(1.0, float(np.abs(y).max())):
                raise ValueError(f"region {region!r} has no variance in the controls; it cannot be z-scored")
        self.encoding_ = fit_covariate_encoding(controls, self.covariates, names)
        X, self.design_columns_ = covariate_design(controls, self.encoding_, names)
        if self.method == "ols":
            self._fit_ols(X, Y)
        else:
            self._fit_normative(controls, Y, names)
        return self

    def _region_values(self, table, names) -> np.ndarray:
        return np.column_stack([numeric_column(table, region, names) for region in self.regions])

    def _fit_ols(self, X, Y):
        n_regions, p = Y.shape[1], X.shape[1]
        self.coef_, self.sd_ = np.zeros((n_regions, p)), np.zeros(n_regions)
        self.n_controls_ = np.zeros(n_regions, dtype=int)
        for j, region in enumerate(self.regions):
            rows = ~np.isnan(Y[:, j])
            n = int(rows.sum())
            if n < p + 2:
                raise ValueError(
                    f"region {region!r}: {n} control(s) with a value, but at least {p + 2} are needed "
                    f"for {p} regression parameters ({', '.join(self.design_columns_)})"
                )
            _check_full_rank(X[rows], self.design_columns_, f"controls, region {region!r}")
            coef, *_ = np.linalg.lstsq(X[rows], Y[rows, j], rcond=None)
            resid = Y[rows, j] - X[rows] @ coef
            sd = math.sqrt(float(resid @ resid) / (n - p))
            if not sd > 1e-12 * max(1.0, float(np.abs(Y[rows, j]).max())):
                raise ValueError(f"region {region!r}: the covariates explain the controls exactly (no residual)")
            self.coef_[j], self.sd_[j], self.n_controls_[j] = coef, sd, n

    def _normative_covariates(self, table, names) -> pd.DataFrame:
        columns = {"age": numeric_column(table, "age", names)}
        columns["sex"] = table["sex"].to_numpy() if "sex" in self.covariates else "F"
        columns["site"] = table["site"].to_numpy() if "site" in self.covariates else "all"
        return pd.DataFrame(columns, index=pd.Index(names, name="subject_id"))

    def _fit_normative(self, controls, Y, names):
        from .normative import NormativeModel

        missing = np.isnan(Y).any(axis=1)
        if missing.any():
            raise ValueError(
                "method='normative' needs every region of every control; missing for subject(s) "
                f"{format_listing(np.asarray(names, dtype=object)[missing])}"
            )
        model = NormativeModel(sex_effect="sex" in self.covariates, site_effect="site" in self.covariates)
        self.normative_ = model.fit(Y, self._normative_covariates(controls, names),
                                    response_names=[str(r) for r in self.regions])
        self.n_controls_ = np.full(len(self.regions), len(Y), dtype=int)

    # ------------------------------------------------------------ scoring
    def transform(self, table: pd.DataFrame) -> pd.DataFrame:
        """Z-scores (subjects x regions, larger = more abnormal; NaN where the value is NaN)."""
        if not hasattr(self, "n_controls_"):
            raise RuntimeError("this RegionalZScorer is not fitted yet: call fit() or load()")
        _require_columns(table, self.regions + self.covariates, "table")
        ids = _subject_index(table)
        names = [str(i) for i in ids]
        Y = self._region_values(table, names)
        if self.method == "ols":
            X, _ = covariate_design(table, self.encoding_, names)
            z = (Y - X @ self.coef_.T) / self.sd_
        else:
            missing = np.isnan(Y)
            z = self.normative_.score(np.where(missing, 0.0, Y), self._normative_covariates(table, names)).z
            z = np.where(missing, np.nan, z)
        return pd.DataFrame(z * _signs(self.directions_), index=ids, columns=pd.Index(self.regions))

    def fit_transform(self, controls: pd.DataFrame) -> pd.DataFrame:
        return self.fit(controls).transform(controls)

    # ------------------------------------------------------------ saving
    def to_dict(self) -> dict:
        """JSON-serialisable state (format name and version, settings, fitted values)."""
        if not hasattr(self, "n_controls_"):
            raise RuntimeError("this RegionalZScorer is not fitted yet: call fit() first")
        state = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "neuroatrophy_version": __version__,
            "regions": self.regions, "covariates": self.covariates, "method": self.method,
            "abnormal": self.abnormal if isinstance(self.abnormal, str) else None,
            "directions": self.directions_, "encoding": self.encoding_,
            "design_columns": self.design_columns_, "n_controls": self.n_controls_.tolist(),
        }
        if self.method == "ols":
            state |= {"coef": self.coef_.tolist(), "sd": self.sd_.tolist()}
        else:
            arrays, metadata = self.normative_._state()
            state["normative"] = {
                "metadata": metadata,
                "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype), "values": v.ravel().tolist()}
                           for k, v in arrays.items()},
            }
        return state

    @classmethod
    def from_dict(cls, state: dict, source: str = "state") -> RegionalZScorer:
        """Rebuild a fitted scorer from :meth:`to_dict` output."""
        if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
            raise ValueError(f"{source} is not a NeuroAtrophy regional z-scorer (format {FORMAT_NAME!r})")
        version = state.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{source} has format version {version!r}; this NeuroAtrophy reads up to {FORMAT_VERSION}"
            )
        try:
            abnormal = state["abnormal"] or dict(zip(state["regions"], state["directions"]))
            scorer = cls(state["regions"], state["covariates"], abnormal, state["method"])
            scorer.directions_ = scorer._check_params()
            scorer.encoding_ = state["encoding"]
            scorer.design_columns_ = state["design_columns"]
            scorer.n_controls_ = np.asarray(state["n_controls"], dtype=int)
            if scorer.method == "ols":
                scorer.coef_ = np.asarray(state["coef"], dtype=float).reshape(len(scorer.regions), -1)
                scorer.sd_ = np.asarray(state["sd"], dtype=float)
            else:
                from .normative import NormativeModel

                arrays = {k: np.asarray(v["values"], dtype=v["dtype"]).reshape(v["shape"])
                          for k, v in state["normative"]["arrays"].items()}
                scorer.normative_ = NormativeModel._from_state(arrays, state["normative"]["metadata"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"{source} is damaged or incomplete: {error!r}") from error
        return scorer

    def save(self, path) -> Path:
        """Write the fitted scorer as JSON (atomically)."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=1)
        with atomic_write(path) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
        return path

    @classmethod
    def load(cls, path) -> RegionalZScorer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"z-scorer file not found: {path}")
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a JSON z-scorer file: {error}") from error
        return cls.from_dict(state, source=str(path))


def regional_zscores(table: pd.DataFrame, regions, group_column="group", control_label="control",
                     covariates=("age", "sex", "icv"), abnormal="lower", method="ols",
                     patients_only=True) -> tuple[pd.DataFrame, RegionalZScorer]:
    """Fit a :class:`RegionalZScorer` on a cohort's controls and z-score its patients.

    Rows whose ``group_column`` equals ``control_label`` (case-insensitive) are
    controls. Returns ``(zscores, scorer)``: z-scores of the patients (all subjects
    when ``patients_only`` is False; Zhuo et al. fit SuStaIn on patients only).
    """
    _require_columns(table, [group_column], "table")
    names = subject_names(table)
    missing = _is_missing(table[group_column])
    if missing.any():
        raise ValueError(f"column {group_column!r} is empty for subject(s) "
                         f"{format_listing(np.asarray(names, dtype=object)[missing])}")
    groups = np.array([_label(v).lower() for v in table[group_column]], dtype=object)
    is_control = groups == _label(control_label).lower()
    if not is_control.any():
        raise ValueError(f"no control rows: column {group_column!r} has no value {control_label!r} "
                         f"(values: {format_listing(sorted(set(groups)))})")
    if patients_only and is_control.all():
        raise ValueError(f"no patient rows: every row of column {group_column!r} is {control_label!r}")
    scorer = RegionalZScorer(regions, covariates, abnormal, method).fit(table[is_control])
    return scorer.transform(table[~is_control] if patients_only else table), scorer


# ---------------------------------------------------------------- z-levels
def default_z_levels(zscores: pd.DataFrame, candidates=(1, 2, 3), min_fraction=0.1,
                     percentile=95.0) -> tuple[list[list[float]], np.ndarray]:
    """Z-levels (events) and maximum z per region from the patients' z-scores.

    Rule:

    * a region's levels are the candidates that at least ``min_fraction`` of its
      patients (non-missing) reach (z >= level); since fewer patients reach higher
      levels, these are the lowest candidates. A region that no candidate passes keeps
      the lowest candidate, so that it still has an event, and a ``UserWarning`` names
      it (consider dropping it: it carries little information on progression);
    * ``z_max`` = max(highest level + 2, the ``percentile``-th percentile of the
      patients' z rounded up). With levels 1, 2, 3 this is pySuStaIn's customary 5,
      raised where many patients go beyond it, so the trajectory's end is not below the data.

    Returns
    -------
    z_levels : list of list of float
        One increasing list per region (column order of ``zscores``).
    z_max : ndarray (n_regions,)
    """
    if not isinstance(zscores, pd.DataFrame):
        zscores = pd.DataFrame(np.asarray(zscores, dtype=float))
    levels_all = sorted(float(c) for c in candidates)
    if not levels_all or levels_all[0] <= 0 or len(set(levels_all)) != len(levels_all):
        raise ValueError(f"candidates must be distinct positive z-levels, got {list(candidates)}")
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    names = subject_names(zscores)
    z_levels, z_max, weak = [], [], []
    for region in zscores.columns:
        z = numeric_column(zscores, region, names)
        z = z[~np.isnan(z)]
        if not len(z):
            raise ValueError(f"region {region!r} has no z-scores (all missing)")
        kept = [c for c in levels_all if np.mean(z >= c) >= min_fraction]
        if not kept:
            kept = levels_all[:1]
            weak.append(region)
        z_levels.append(kept)
        z_max.append(max(kept[-1] + 2.0, float(math.ceil(np.percentile(z, percentile)))))
    if weak:
        warnings.warn(
            f"fewer than {min_fraction:.0%} of the patients reach z >= {levels_all[0]:g} in region(s) "
            f"{format_listing(weak)}; they keep the single level {levels_all[0]:g}",
            UserWarning, stacklevel=2,
        )
    return z_levels, np.asarray(z_max, dtype=float)


# ---------------------------------------------------------------- mixture likelihoods
def fit_biomarker_mixture(x, is_control, name="biomarker", max_iter=1000, tol=1e-9) -> dict:
    """Two-component Gaussian mixture of one biomarker oriented so that larger is abnormal.

    The normal component is fixed to the controls' mean and SD. Controls are known to be
    normal, so their abnormal responsibility is fixed at 0; E-M on the patients fits the
    abnormal component's mean (kept at or above the normal mean), SD (at least a tenth
    of the normal SD, so one outlier cannot collapse it) and weight (the fraction of
    patients that are abnormal).

    Raises ``ValueError`` if fewer than 2 controls or no patients have a value, if the
    controls have no variance, or if the patients are not shifted to the abnormal side
    (one-sided Mann-Whitney p >= 0.05) or the fitted abnormal component holds less than
    one patient: the biomarker shows no separation.
    """
    x, is_control = np.asarray(x, dtype=float), np.asarray(is_control, dtype=bool)
    xc, xp = x[is_control], x[~is_control]
    if len(xc) < 2 or not len(xp):
        raise ValueError(f"biomarker {name!r}: need at least 2 controls and 1 patient with a value, "
                         f"got {len(xc)} and {len(xp)}")
    mu0, sd0 = float(xc.mean()), float(xc.std(ddof=1))
    if not sd0 > 0:
        raise ValueError(f"biomarker {name!r} has no variance in the controls")
    shift = stats.mannwhitneyu(xp, xc, alternative="greater").pvalue
    if shift >= 0.05:
        raise ValueError(
            f"biomarker {name!r} shows no separation: patients are not more abnormal than controls "
            f"(one-sided Mann-Whitney p = {shift:.3g}); drop it or check its abnormal direction"
        )
    log_no = stats.norm.logpdf(xp, mu0, sd0)
    upper = xp[xp > np.median(xp)]
    mu1 = max(float(upper.mean()) if len(upper) else mu0 + sd0, mu0 + sd0)
    sd1, weight, previous = sd0, 0.5, -np.inf
    for _ in range(max_iter):
        log_yes = np.log(weight) + stats.norm.logpdf(xp, mu1, sd1)
        log_total = np.logaddexp(log_yes, np.log1p(-weight) + log_no)
        r = np.exp(log_yes - log_total)
        total = float(log_total.sum())
        weight = float(np.clip(r.mean(), 1e-6, 1 - 1e-6))
        mu1 = max(float(r @ xp / r.sum()), mu0)
        sd1 = max(math.sqrt(float(r @ (xp - mu1) ** 2 / r.sum())), 0.1 * sd0)
        if abs(total - previous) <= tol * abs(total):
            break
        previous = total
    if weight * len(xp) < 1:
        raise ValueError(f"biomarker {name!r} shows no separation: the abnormal component holds "
                         "less than one patient")
    return {"mean_normal": mu0, "sd_normal": sd0, "mean_abnormal": mu1, "sd_abnormal": sd1,
            "weight_abnormal": weight, "n_controls": len(xc), "n_patients": len(xp)}


def mixture_likelihoods(values: pd.DataFrame, is_control, abnormal="lower") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Event / no-event likelihoods for the mixture (event-based) SuStaIn.

    Per biomarker (column), :func:`fit_biomarker_mixture` on the values oriented by
    ``abnormal``; ``L_no`` is the normal component's density, ``L_yes`` the abnormal
    component's (densities, without the mixing weights: the weights would act as a
    sequence-dependent stage prior). A missing value gives ``L_yes = L_no = 1``, so it
    does not favour any stage.

    Parameters
    ----------
    values : DataFrame (subjects x biomarkers), raw or covariate-adjusted measures
    is_control : array of bool (n_subjects,)
    abnormal : {"lower", "higher"} or dict biomarker -> direction

    Returns
    -------
    (L_yes, L_no) : DataFrames like ``values`` (all subjects, controls included)
    """
    _require_columns(values, [], "values")
    ids = _subject_index(values)
    names = [str(i) for i in ids]
    is_control = np.asarray(is_control, dtype=bool).ravel()
    if len(is_control) != len(values):
        raise ValueError(f"is_control has {len(is_control)} entries but values has {len(values)} subjects")
    columns = list(values.columns)
    signs = _signs(_directions(abnormal, columns))
    L_yes, L_no = np.ones((len(values), len(columns))), np.ones((len(values), len(columns)))
    for j, column in enumerate(columns):
        x = signs[j] * numeric_column(values, column, names)
        rows = ~np.isnan(x)
        fit = fit_biomarker_mixture(x[rows], is_control[rows], name=column)
        L_no[rows, j] = stats.norm.pdf(x[rows], fit["mean_normal"], fit["sd_normal"])
        L_yes[rows, j] = stats.norm.pdf(x[rows], fit["mean_abnormal"], fit["sd_abnormal"])
    # Densities far in a tail underflow to 0, which the model's logarithms cannot take.
    tiny = np.finfo(float).tiny
    L_yes, L_no = np.maximum(L_yes, tiny), np.maximum(L_no, tiny)
    frame = dict(index=ids, columns=pd.Index(columns))
    return pd.DataFrame(L_yes, **frame), pd.DataFrame(L_no, **frame)
