"""Evaluation of thalamus segmentations: overlap, agreement, longitudinal change, clinical association.

The metrics follow the design of the thalamus benchmark (``docs`` and the seed study of Ibrahim et al.):

* per case, against a reference mask: Dice, sensitivity, precision, 95th-percentile Hausdorff
  distance (HD95, mm) and volume difference (:func:`overlap_metrics`, :func:`evaluate_masks`);
* across a cohort, per method: Bland-Altman bias and limits of agreement (:func:`bland_altman`) and
  proportional bias, the least-squares slope of the difference on the mean
  (:func:`proportional_bias`), summarised by :func:`agreement_table`;
* longitudinal: annualised percentage volume change per subject (:func:`annualized_change`);
* clinical: covariate-adjusted association of volume with a clinical score, one row per method
  (:func:`clinical_association`).

Overlap and volume accuracy can diverge: one voxel of boundary error keeps Dice near 0.88 on a
thalamus but shifts its volume by about 25 %, which is why both are reported.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage, stats

from .thalamus_image import check_same_grid, input_name, load_label_image, voxel_sizes
from .thalamus_labels import STRUCTURES, structure_mask

__all__ = [
    "METRIC_COLUMNS",
    "overlap_metrics",
    "hd95",
    "evaluate_masks",
    "BlandAltman",
    "bland_altman",
    "ProportionalBias",
    "proportional_bias",
    "agreement_table",
    "annualized_change",
    "clinical_association",
]

#: Columns of :func:`evaluate_masks`' table, in order.
METRIC_COLUMNS = (
    "subject", "method", "structure", "dice", "sensitivity", "precision", "hd95_mm",
    "volume_pred_mm3", "volume_ref_mm3", "volume_diff_mm3", "volume_diff_pct",
)
_Z95 = stats.norm.ppf(0.975)  # 1.96: limits of agreement are bias +- 1.96 SD


# ------------------------------------------------------------------ per-case overlap metrics


def _as_mask(mask, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.number):
            raise ValueError(f"{name} must be a boolean array, got dtype {mask.dtype}")
        if not np.all(np.isin(mask, (0, 1))):
            raise ValueError(f"{name} must be a boolean (0/1) mask; it holds other values")
        mask = mask.astype(bool)
    return mask


def _check_spacing(spacing, ndim: int) -> np.ndarray:
    spacing = np.asarray(spacing, dtype=float).ravel()
    if spacing.size == 1:
        spacing = np.repeat(spacing, ndim)
    if spacing.size != ndim or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be {ndim} positive voxel sizes in mm, got {spacing.tolist()}")
    return spacing


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: the mask minus its erosion by the face-connected cross (MONAI's edges).

    Voxels on the array border count as surface (``binary_erosion`` treats outside as background).
    """
    return mask & ~ndimage.binary_erosion(mask)


def _directed_distances(from_surface: np.ndarray, to_surface: np.ndarray, spacing) -> np.ndarray:
    """Distance in mm from each voxel of ``from_surface`` to the nearest voxel of ``to_surface``."""
    distance = ndimage.distance_transform_edt(~to_surface, sampling=spacing)
    return distance[from_surface]


def hd95(pred, ref, spacing=(1.0, 1.0, 1.0), percentile: float = 95.0) -> float:
    """Symmetric percentile Hausdorff distance between two masks' surfaces, in mm.

    Follows MONAI's ``compute_hausdorff_distance(percentile=95, spacing=...)``: surface voxels are
    each mask minus its erosion; the directed distances from every surface voxel of one mask to the
    nearest surface voxel of the other are taken in both directions, and the result is the larger
    of the two directed ``percentile``-th percentiles (linear interpolation).

    Parameters
    ----------
    pred, ref : array_like of bool
        Masks of the same shape.
    spacing : float or sequence of float
        Voxel sizes in mm, one per axis (anisotropic voxels are handled exactly).
    percentile : float
        In [0, 100]; 100 gives the classic Hausdorff distance.

    Returns
    -------
    float
        0.0 when both masks are empty; ``inf`` when exactly one is empty (MONAI also gives ``inf``;
        it gives NaN for two empty masks, where we give 0 because they agree).
    """
    pred, ref = _as_mask(pred, "pred"), _as_mask(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref must have the same shape, got {pred.shape} and {ref.shape}")
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be between 0 and 100, got {percentile}")
    spacing = _check_spacing(spacing, pred.ndim)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 0.0
    if not has_pred or not has_ref:
        return float("inf")
    # Distances only involve the two surfaces: crop to their bounding box plus one voxel, so the
    # distance transform does not run over a whole head. The margin keeps erosion identical.
    union = pred | ref
    box = tuple(slice(max(int(idx.min()) - 1, 0), int(idx.max()) + 2) for idx in np.nonzero(union))
    surface_pred, surface_ref = _surface(pred[box]), _surface(ref[box])
    forward = _directed_distances(surface_pred, surface_ref, spacing)
    backward = _directed_distances(surface_ref, surface_pred, spacing)
    return float(max(np.percentile(forward, percentile), np.percentile(backward, percentile)))


def overlap_metrics(pred, ref, spacing=(1.0, 1.0, 1.0)) -> dict:
    """Overlap, surface distance and volume agreement of a predicted mask with a reference mask.

    Parameters
    ----------
    pred, ref : array_like of bool
        Predicted and reference masks of the same shape.
    spacing : float or sequence of float
        Voxel sizes in mm (one per axis).

    Returns
    -------
    dict
        ``dice`` = 2|P∩R| / (|P| + |R|); ``sensitivity`` = |P∩R| / |R|; ``precision`` = |P∩R| / |P|;
        ``hd95_mm`` (see :func:`hd95`); ``volume_pred_mm3``, ``volume_ref_mm3``;
        ``volume_diff_mm3`` = pred - ref; ``volume_diff_pct`` = 100 (pred - ref) / ref.

    Notes
    -----
    Edge cases: two empty masks give Dice 1.0 and HD95 0.0; exactly one empty mask gives Dice 0.0
    and HD95 ``inf``. A ratio whose denominator is an empty mask is NaN: sensitivity and
    ``volume_diff_pct`` when the reference is empty, precision when the prediction is empty.
    """
    pred, ref = _as_mask(pred, "pred"), _as_mask(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref must have the same shape, got {pred.shape} and {ref.shape}")
    spacing = _check_spacing(spacing, pred.ndim)
    voxel_mm3 = float(np.prod(spacing))
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    n_both = int(np.count_nonzero(pred & ref))
    volume_pred, volume_ref = n_pred * voxel_mm3, n_ref * voxel_mm3
    return {
        "dice": 1.0 if n_pred + n_ref == 0 else 2.0 * n_both / (n_pred + n_ref),
        "sensitivity": n_both / n_ref if n_ref else float("nan"),
        "precision": n_both / n_pred if n_pred else float("nan"),
        "hd95_mm": hd95(pred, ref, spacing),
        "volume_pred_mm3": volume_pred,
        "volume_ref_mm3": volume_ref,
        "volume_diff_mm3": volume_pred - volume_ref,
        "volume_diff_pct": 100.0 * (volume_pred - volume_ref) / volume_ref if n_ref else float("nan"),
    }


def _describe(role: str, image) -> str:
    """``role`` followed by the input's file name when it has one (for error messages)."""
    name = input_name(image, default="")
    return f"{role} ({name})" if name else role


def evaluate_masks(predictions: dict, reference, subject=None) -> pd.DataFrame:
    """Metrics of several methods' thalamus label maps against one reference label map.

    Parameters
    ----------
    predictions : dict
        Method name -> label map (path or nibabel image) with 10 = left and 49 = right thalamus;
        other labels are ignored (import multi-label outputs with ``neuroatrophy.thalamus_masks``).
    reference : path or nibabel image
        Reference label map (same codes) on the grid every prediction must share.
    subject : str, optional
        Written in the ``subject`` column (so tables of several subjects can be concatenated).

    Returns
    -------
    pandas.DataFrame
        One row per method and structure (``left``, ``right``, ``both``), columns
        :data:`METRIC_COLUMNS` (see :func:`overlap_metrics`).

    Raises
    ------
    ValueError
        If ``predictions`` is empty, or a prediction is not on the reference's grid (the message
        names the method and the reference), or an image cannot be read.
    """
    if not isinstance(predictions, dict) or not predictions:
        raise ValueError("predictions must be a non-empty dict of method name -> label map")
    ref_name = _describe("reference mask", reference)
    ref_img = load_label_image(reference, name=ref_name)
    spacing = voxel_sizes(ref_img)
    ref_labels = np.asarray(ref_img.dataobj)
    rows = []
    for method, prediction in predictions.items():
        pred_name = _describe(f"method {method!r}", prediction)
        pred_img = load_label_image(prediction, name=pred_name)
        check_same_grid(pred_img, ref_img, pred_name, ref_name)
        pred_labels = np.asarray(pred_img.dataobj)
        for structure in STRUCTURES:
            metrics = overlap_metrics(structure_mask(pred_labels, structure),
                                      structure_mask(ref_labels, structure), spacing)
            rows.append({"subject": subject, "method": method, "structure": structure, **metrics})
    return pd.DataFrame(rows, columns=list(METRIC_COLUMNS))


# ------------------------------------------------------------------ agreement across a cohort


def _paired(measured, reference, names=("measured", "reference")) -> tuple[np.ndarray, np.ndarray]:
    measured = np.asarray(measured, dtype=float).ravel()
    reference = np.asarray(reference, dtype=float).ravel()
    if measured.shape != reference.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same length, "
                         f"got {measured.size} and {reference.size}")
    for name, values in zip(names, (measured, reference)):
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{name} holds {int(np.count_nonzero(~np.isfinite(values)))} NaN or infinite values")
    return measured, reference


@dataclass(frozen=True)
class BlandAltman:
    """Bland-Altman agreement of a measurement method with a reference.

    Attributes
    ----------
    n : int
    bias : float
        Mean difference (measured - reference).
    sd : float
        Standard deviation of the differences (n - 1 denominator).
    loa_low, loa_high : float
        95 % limits of agreement, bias -+ 1.96 sd.
    bias_ci : tuple of float
        95 % confidence interval of the bias (t distribution, n - 1 df).
    loa_ci : tuple of tuple of float
        Approximate 95 % confidence intervals of the lower and upper limit, limit -+ t * sqrt(3 sd² / n)
        (Bland & Altman 1999).
    means, differences : numpy.ndarray
        Per-pair (measured + reference) / 2 and the differences (in % of the mean when ``percent``).
    percent : bool
        Whether differences are percentages of the pair's mean.
    """

    n: int
    bias: float
    sd: float
    loa_low: float
    loa_high: float
    bias_ci: tuple
    loa_ci: tuple
    means: np.ndarray = field(repr=False)
    differences: np.ndarray = field(repr=False)
    percent: bool = False


def bland_altman(measured, reference, percent: bool = False) -> BlandAltman:
    """Bland-Altman bias and limits of agreement of paired measurements.

    Parameters
    ----------
    measured, reference : array_like of shape (n,)
        Paired values (e.g. a method's volumes and the reference volumes), n >= 2.
    percent : bool
        If True, each difference is expressed in % of the pair's mean, 100 (m - r) / ((m + r) / 2).

    Returns
    -------
    BlandAltman
    """
    measured, reference = _paired(measured, reference)
    n = measured.size
    if n < 2:
        raise ValueError(f"Bland-Altman analysis needs at least 2 pairs, got {n}")
    means = (measured + reference) / 2.0
    differences = measured - reference
    if percent:
        if np.any(means == 0):
            raise ValueError("percent differences need non-zero means; a pair has mean 0")
        differences = 100.0 * differences / means
    bias = float(differences.mean())
    sd = float(differences.std(ddof=1))
    t = stats.t.ppf(0.975, n - 1)
    half_bias = t * sd / np.sqrt(n)
    half_loa = t * np.sqrt(3.0 * sd**2 / n)
    loa_low, loa_high = bias - _Z95 * sd, bias + _Z95 * sd
    return BlandAltman(
        n=n, bias=bias, sd=sd, loa_low=float(loa_low), loa_high=float(loa_high),
        bias_ci=(float(bias - half_bias), float(bias + half_bias)),
        loa_ci=((float(loa_low - half_loa), float(loa_low + half_loa)),
                (float(loa_high - half_loa), float(loa_high + half_loa))),
        means=means, differences=differences, percent=bool(percent),
    )


@dataclass(frozen=True)
class ProportionalBias:
    """Least-squares line of the Bland-Altman difference on the mean.

    Attributes
    ----------
    slope, intercept : float
    slope_ci : tuple of float
        95 % confidence interval of the slope (t distribution, n - 2 df).
    p_value : float
        Two-sided test of slope = 0.
    r : float
        Pearson correlation of difference and mean.
    n : int
    """

    slope: float
    intercept: float
    slope_ci: tuple
    p_value: float
    r: float
    n: int


def proportional_bias(measured, reference, percent: bool = False) -> ProportionalBias:
    """Proportional bias: OLS regression of the difference (measured - reference) on the mean.

    A slope different from 0 means the error grows (or shrinks) with the size of the structure.
    A method that returns the same volume for everyone gives slope -2 (difference c - r against mean
    (c + r) / 2), so a slope near -2 flags a predictor that ignores the subject.

    Random error in the measured method alone tilts the line upwards: with error variance s² and
    reference variance S², the expected slope of an unbiased method is (s² / 2) / (S² + s² / 4),
    negligible when the error is small against the spread of the structure's size.

    Parameters
    ----------
    measured, reference : array_like of shape (n,)
        Paired values, n >= 3.
    percent : bool
        Regress the difference in % of the mean instead (see :func:`bland_altman`).

    Returns
    -------
    ProportionalBias
    """
    ba = bland_altman(measured, reference, percent=percent)
    if ba.n < 3:
        raise ValueError(f"proportional bias needs at least 3 pairs, got {ba.n}")
    x, y = ba.means, ba.differences
    if np.ptp(x) == 0:
        raise ValueError("proportional bias is undefined: every pair has the same mean")
    fit = stats.linregress(x, y)
    t = stats.t.ppf(0.975, ba.n - 2)
    slope, se = float(fit.slope), float(fit.stderr)
    return ProportionalBias(
        slope=slope, intercept=float(fit.intercept), slope_ci=(slope - t * se, slope + t * se),
        p_value=float(fit.pvalue), r=float(fit.rvalue), n=ba.n,
    )


def _require_columns(table: pd.DataFrame, columns, what: str = "table") -> None:
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"{what} must be a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{what} has no column(s) {', '.join(map(repr, missing))}; "
                         f"columns: {', '.join(map(str, table.columns))}")


def agreement_table(metrics: pd.DataFrame, by=("method", "structure"), measured="volume_pred_mm3",
                    reference="volume_ref_mm3") -> pd.DataFrame:
    """Cohort summary per method and structure: overlap, Bland-Altman and proportional bias.

    Parameters
    ----------
    metrics : pandas.DataFrame
        A table like :func:`evaluate_masks`' concatenated over subjects: columns ``by``,
        ``measured`` and ``reference``; the overlap columns ``dice``, ``sensitivity``,
        ``precision`` and ``hd95_mm`` are summarised when present.
    by : sequence of str
        Grouping columns.
    measured, reference : str
        Volume columns compared by Bland-Altman.

    Returns
    -------
    pandas.DataFrame
        One row per group: ``by`` columns, ``n``, ``dice_mean``, ``dice_sd``, ``sensitivity_mean``,
        ``sensitivity_sd``, ``precision_mean``, ``precision_sd``, ``hd95_median`` (when present;
        NaN values are ignored), ``bias``, ``bias_ci_low``, ``bias_ci_high``, ``sd``, ``loa_low``,
        ``loa_high``, ``bias_pct_of_mean`` (100 bias / mean of the pair means), ``prop_slope``,
        ``prop_slope_ci_low``, ``prop_slope_ci_high``, ``prop_p``. Agreement statistics are NaN for
        groups too small for them (fewer than 2, or 3 for proportional bias, pairs).
    """
    by = [by] if isinstance(by, str) else list(by)
    _require_columns(metrics, [*by, measured, reference], "metrics")
    overlap = [c for c in ("dice", "sensitivity", "precision") if c in metrics.columns]
    rows = []
    for keys, group in metrics.groupby(by, sort=False, dropna=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        row = dict(zip(by, keys))
        pairs = group[[measured, reference]].astype(float)
        pairs = pairs[np.isfinite(pairs).all(axis=1)]
        row["n"] = len(pairs)
        for column in overlap:
            values = group[column].astype(float)
            row[f"{column}_mean"] = float(values.mean())
            row[f"{column}_sd"] = float(values.std(ddof=1)) if values.notna().sum() > 1 else float("nan")
        if "hd95_mm" in metrics.columns:
            row["hd95_median"] = float(group["hd95_mm"].astype(float).median())
        row.update(_agreement_row(pairs[measured].to_numpy(), pairs[reference].to_numpy()))
        rows.append(row)
    return pd.DataFrame(rows)


def _agreement_row(measured: np.ndarray, reference: np.ndarray) -> dict:
    nan = float("nan")
    row = dict.fromkeys(("bias", "bias_ci_low", "bias_ci_high", "sd", "loa_low", "loa_high", "bias_pct_of_mean",
                         "prop_slope", "prop_slope_ci_low", "prop_slope_ci_high", "prop_p"), nan)
    if measured.size >= 2:
        ba = bland_altman(measured, reference)
        mean_size = float(ba.means.mean())
        row.update(bias=ba.bias, bias_ci_low=ba.bias_ci[0], bias_ci_high=ba.bias_ci[1], sd=ba.sd,
                   loa_low=ba.loa_low, loa_high=ba.loa_high,
                   bias_pct_of_mean=100.0 * ba.bias / mean_size if mean_size else nan)
        if measured.size >= 3 and np.ptp(ba.means) > 0:
            pb = proportional_bias(measured, reference)
            row.update(prop_slope=pb.slope, prop_slope_ci_low=pb.slope_ci[0], prop_slope_ci_high=pb.slope_ci[1],
                       prop_p=pb.p_value)
    return row


# ------------------------------------------------------------------ longitudinal change


def _years(values: pd.Series, column: str) -> np.ndarray:
    """Times as float years: numbers are taken as years; dates (or date strings) become years."""
    if pd.api.types.is_bool_dtype(values):
        raise ValueError(f"column {column!r} must hold times in years or dates, got booleans")
    if pd.api.types.is_numeric_dtype(values):
        return values.to_numpy(dtype=float)
    try:
        with warnings.catch_warnings():
            # pandas warns when it cannot infer one date format; failures raise below anyway
            warnings.simplefilter("ignore", UserWarning)
            dates = pd.to_datetime(values)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"column {column!r} must hold times in years or dates; could not read it as dates: "
                         f"{exc}") from exc
    # days since an arbitrary origin, in Julian years (365.25 days); NaT becomes NaN
    days = (dates - pd.Timestamp("1970-01-01")).dt.total_seconds().to_numpy(dtype=float) / 86400.0
    return days / 365.25


def annualized_change(table: pd.DataFrame, subject="subject", time="time", volume="volume",
                      method=None) -> pd.DataFrame:
    """Annualised percentage volume change per subject (and method) from two or more timepoints.

    The change is the least-squares slope of volume on time divided by the fitted volume at the
    subject's first timepoint, times 100 (% per year; negative = atrophy). With exactly two
    timepoints this is ``100 (V2 - V1) / V1 / (t2 - t1)``; with three or more the line uses all of
    them, which is less sensitive to one noisy scan than the end points alone.

    Parameters
    ----------
    table : pandas.DataFrame
        Long table, one row per subject (and method) and timepoint.
    subject, time, volume : str
        Column names. ``time`` holds years (numbers, e.g. time since baseline or age) or dates
        (datetime values or strings pandas parses, e.g. ``"2021-03-15"``), converted to years of
        365.25 days.
    method : str, optional
        Column of method names: one result per subject and method.

    Returns
    -------
    pandas.DataFrame
        Columns ``subject``, (``method``), ``n_timepoints``, ``years`` (first to last timepoint),
        ``baseline_volume`` (fitted volume at the first timepoint) and ``pct_per_year``.

    Raises
    ------
    ValueError
        Naming the column or subject: a missing column, a NaN value, a non-positive volume, a
        subject with a single timepoint or two rows at the same time.
    """
    keys = [subject] + ([method] if method is not None else [])
    _require_columns(table, [*keys, time, volume], "table")
    if not len(table):
        raise ValueError("table has no rows")
    data = pd.DataFrame({k: table[k].to_numpy() for k in keys})
    data["_time"] = _years(table[time], time)
    data["_volume"] = pd.to_numeric(table[volume], errors="coerce").to_numpy(dtype=float)
    for column, values in ((subject, data[subject]), (time, data["_time"]), (volume, data["_volume"])):
        bad = values.isna()
        if bad.any():
            first = data.loc[bad, subject].iloc[0] if column != subject else "?"
            raise ValueError(f"column {column!r} has {int(bad.sum())} missing or non-numeric value(s) "
                             f"(first at subject {first!r})")
    if method is not None and data[method].isna().any():
        raise ValueError(f"column {method!r} has missing values")
    rows = []
    for group_keys, group in data.groupby(keys, sort=False):
        group_keys = group_keys if isinstance(group_keys, tuple) else (group_keys,)
        label = ", ".join(f"{k} {v!r}" for k, v in zip(keys, group_keys))
        rows.append({**dict(zip(["subject"] + (["method"] if method is not None else []), group_keys)),
                     **_subject_change(group["_time"].to_numpy(), group["_volume"].to_numpy(), label)})
    return pd.DataFrame(rows)


def _subject_change(t: np.ndarray, v: np.ndarray, label: str) -> dict:
    if t.size < 2:
        raise ValueError(f"{label} has a single timepoint; annualised change needs at least 2")
    if np.unique(t).size != t.size:
        raise ValueError(f"{label} has two or more rows at the same time")
    if np.any(v <= 0):
        raise ValueError(f"{label} has a non-positive volume ({float(v.min())})")
    order = np.argsort(t)
    t, v = t[order], v[order]
    slope, intercept = np.polyfit(t - t[0], v, 1)
    baseline = float(intercept)  # fitted volume at the first timepoint
    if baseline <= 0:
        raise ValueError(f"{label}: the fitted volume at the first timepoint is not positive")
    return {"n_timepoints": int(t.size), "years": float(t[-1] - t[0]), "baseline_volume": baseline,
            "pct_per_year": 100.0 * float(slope) / baseline}


# ------------------------------------------------------------------ clinical association


def _numeric_column(table: pd.DataFrame, column: str) -> pd.Series:
    values = table[column]
    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
        raise ValueError(f"column {column!r} must be numeric, got dtype {values.dtype}")
    return values.astype(float)


def _covariate_block(data: pd.DataFrame, covariates) -> tuple[np.ndarray, list]:
    """Design columns of the covariates on complete cases: numeric z-scored, others dummy-coded."""
    blocks, names = [], []
    for column in covariates:
        values = data[column]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            values = values.astype(float)
            if values.std(ddof=0) == 0:
                raise ValueError(f"covariate column {column!r} is constant over the complete cases")
            blocks.append(((values - values.mean()) / values.std(ddof=0)).to_numpy()[:, None])
            names.append(column)
            continue
        levels = sorted(pd.unique(values.astype(str)))
        if len(levels) < 2:
            raise ValueError(f"covariate column {column!r} has a single level ({levels[0]!r}) over the complete "
                             "cases")
        # first level (alphabetical) is the reference category
        text = values.astype(str).to_numpy()
        for level in levels[1:]:
            blocks.append((text == level).astype(float)[:, None])
            names.append(f"{column}[{level}]")
    if not blocks:
        return np.empty((len(data), 0)), names
    return np.hstack(blocks), names


def _zscore(values: np.ndarray, column: str) -> np.ndarray:
    sd = values.std(ddof=1)
    if not sd > 0:
        raise ValueError(f"column {column!r} is constant over the complete cases")
    return (values - values.mean()) / sd


def clinical_association(table: pd.DataFrame, score: str, volumes, covariates=("age", "sex", "icv"),
                         outcome: str = "volume") -> pd.DataFrame:
    """Covariate-adjusted association of thalamic volume (or its change) with a clinical score.

    For each volume column (e.g. one per segmentation method, side by side), fits by ordinary least
    squares on the complete cases of that column, the score and the covariates

    * ``outcome="volume"`` (default): ``volume ~ score + covariates``, reporting the score's
      coefficient (the issue's "regression of thalamic volume on a clinical score");
    * ``outcome="score"``: ``score ~ volume + covariates``, reporting the volume's coefficient.

    Score and volume are z-scored (SD 1, n - 1) before the fit, so the coefficient is the
    standardised effect ``beta_std``. Its t statistic, p-value and partial correlation do not
    depend on the direction; ``beta_std`` and ``r2`` do.

    Parameters
    ----------
    table : pandas.DataFrame
    score : str
        Column of the clinical score (e.g. EDSS, a cognitive test).
    volumes : dict or list
        ``{label: column}`` or a list of columns (labelled by their names); e.g. one volume or
        annualised-change column per method.
    covariates : sequence of str
        Nuisance columns. Numeric ones enter as they are (z-scored for conditioning); others
        (e.g. ``sex``) are dummy-coded against their first level in sorted order.
    outcome : {"volume", "score"}

    Returns
    -------
    pandas.DataFrame
        One row per volume: ``label``, ``column``, ``outcome``, ``predictor`` (the column whose
        coefficient is reported), ``n``, ``beta_std``, ``se``, ``ci_low``, ``ci_high`` (95 %,
        t with n - p df), ``t``, ``p_value`` (two-sided), ``partial_r`` (of score and volume
        given the covariates) and ``r2`` (of the whole model).

    Raises
    ------
    ValueError
        Naming the column: a missing column, a non-numeric score or volume, a column constant over
        the complete cases, or fewer complete rows than the model needs (at least 3 and more than
        the number of coefficients).
    """
    if outcome not in ("volume", "score"):
        raise ValueError(f"outcome must be 'volume' or 'score', got {outcome!r}")
    if isinstance(volumes, str):
        volumes = [volumes]
    pairs = list(volumes.items()) if isinstance(volumes, dict) else [(str(c), c) for c in volumes]
    if not pairs:
        raise ValueError("volumes must name at least one column")
    covariates = [covariates] if isinstance(covariates, str) else list(covariates or ())
    _require_columns(table, [score, *(c for _, c in pairs), *covariates], "table")
    rows = []
    for label, column in pairs:
        rows.append({"label": label, "column": column,
                     **_association(table, score, column, covariates, outcome)})
    return pd.DataFrame(rows)


def _association(table: pd.DataFrame, score: str, column: str, covariates: list, outcome: str) -> dict:
    used = [score, column, *covariates]
    data = table[list(dict.fromkeys(used))].dropna()
    n = len(data)
    n_coefficients = 2 + sum(1 if pd.api.types.is_numeric_dtype(data[c]) else
                             max(data[c].astype(str).nunique() - 1, 1) for c in covariates)
    if n < max(3, n_coefficients + 1):
        raise ValueError(f"column {column!r}: {n} complete rows (with {score!r} and the covariates), "
                         f"need at least {max(3, n_coefficients + 1)}")
    score_z = _zscore(_numeric_column(data, score).to_numpy(), score)
    volume_z = _zscore(_numeric_column(data, column).to_numpy(), column)
    y, x = (volume_z, score_z) if outcome == "volume" else (score_z, volume_z)
    nuisance, _ = _covariate_block(data, covariates)
    design = np.column_stack([x, np.ones(n), nuisance])
    coef, _, rank, _ = np.linalg.lstsq(design, y, rcond=None)
    if rank < design.shape[1]:
        raise ValueError(f"column {column!r}: the predictor and covariates are collinear on the complete cases")
    df = n - design.shape[1]
    residuals = y - design @ coef
    sigma2 = float(residuals @ residuals) / df
    se = float(np.sqrt(sigma2 * np.linalg.inv(design.T @ design)[0, 0]))
    beta = float(coef[0])
    t = beta / se if se > 0 else float("inf") * np.sign(beta)
    half = stats.t.ppf(0.975, df) * se
    return {
        "outcome": score if outcome == "score" else column,
        "predictor": column if outcome == "score" else score,
        "n": n, "beta_std": beta, "se": se, "ci_low": beta - half, "ci_high": beta + half,
        "t": float(t), "p_value": float(2.0 * stats.t.sf(abs(t), df)),
        "partial_r": float(t / np.sqrt(t**2 + df)) if np.isfinite(t) else float(np.sign(beta)),
        "r2": 1.0 - float(residuals @ residuals) / float(((y - y.mean()) ** 2).sum()),
    }
