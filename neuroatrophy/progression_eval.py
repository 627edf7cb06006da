"""Evaluating a forecast MRI against the subject's real follow-up scan, as the BrLP papers do.

The papers compare the predicted and the real follow-up image (both on BrLP's MNI 1.5 mm grid,
intensities in [0, 1]) by mean squared error and structural similarity, and the regional volumes
of the two. SSIM here is the 3-D Gaussian SSIM of Wang et al. (2004) with MONAI's and
scikit-image's defaults (window 11, sigma 1.5, K1 0.01, K2 0.03), averaged over the voxels whose
whole window lies inside the image; with a mask, over the masked ones among them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import ndimage

from .progression_covariates import REGIONS

__all__ = ["mse", "mae", "ssim", "ssim_map", "regional_volume_error", "evaluate_forecast"]

SSIM_SIGMA = 1.5
SSIM_WINDOW = 11
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _as_array(image, name: str) -> np.ndarray:
    if hasattr(image, "dataobj"):
        image = image.dataobj
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 4 and array.shape[0] == 1:  # a channel-first volume
        array = array[0]
    if array.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2-D or 3-D image, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds {int(np.count_nonzero(~np.isfinite(array)))} NaN or infinite values")
    return array


def _pair(pred, true, mask=None):
    pred, true = _as_array(pred, "predicted image"), _as_array(true, "follow-up image")
    if pred.shape != true.shape:
        raise ValueError(f"predicted image shape {pred.shape} differs from follow-up image shape {true.shape}; "
                         "put both on the same grid (BrLP's MNI 1.5 mm grid) first")
    if mask is not None:
        if hasattr(mask, "dataobj"):
            mask = mask.dataobj
        mask = np.asarray(mask)
        if mask.ndim == 4 and mask.shape[0] == 1:
            mask = mask[0]
        if mask.shape != pred.shape:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {pred.shape}")
        mask = mask.astype(bool)
        if not mask.any():
            raise ValueError("mask is empty (no voxel selected)")
    return pred, true, mask


def mse(pred, true, mask=None) -> float:
    """Mean squared error of two images on the same grid, over ``mask`` (default: all voxels)."""
    pred, true, mask = _pair(pred, true, mask)
    diff = (pred - true) ** 2
    return float(diff[mask].mean() if mask is not None else diff.mean())


def mae(pred, true, mask=None) -> float:
    """Mean absolute error of two images on the same grid, over ``mask`` (default: all voxels)."""
    pred, true, mask = _pair(pred, true, mask)
    diff = np.abs(pred - true)
    return float(diff[mask].mean() if mask is not None else diff.mean())


def ssim_map(pred, true, data_range: float = 1.0) -> np.ndarray:
    """Local SSIM of every voxel (Gaussian window, sigma 1.5, 11 voxels wide).

    Returns the full-size map; voxels closer than 5 to the border use reflected values and are
    left out by :func:`ssim`.
    """
    pred, true, _ = _pair(pred, true)
    if not np.isfinite(data_range) or data_range <= 0:
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    # truncate 3.5 sigma -> radius int(3.5 * 1.5 + 0.5) = 5, the 11-voxel window of MONAI and skimage
    blur = dict(sigma=SSIM_SIGMA, truncate=3.5, mode="reflect")
    mu_p, mu_t = ndimage.gaussian_filter(pred, **blur), ndimage.gaussian_filter(true, **blur)
    var_p = ndimage.gaussian_filter(pred * pred, **blur) - mu_p ** 2
    var_t = ndimage.gaussian_filter(true * true, **blur) - mu_t ** 2
    cov = ndimage.gaussian_filter(pred * true, **blur) - mu_p * mu_t
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    return ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2))


def ssim(pred, true, mask=None, data_range: float = 1.0) -> float:
    """Mean structural similarity of two images on the same grid.

    Parameters
    ----------
    pred, true : array_like (X, Y, Z) or (X, Y)
        Predicted and real follow-up images (intensities on the same scale).
    mask : array_like of bool, optional
        Voxels to average over (e.g. the brain mask); default all voxels.
    data_range : float
        Intensity range (1.0 for BrLP's [0, 1] images).

    Returns
    -------
    float
        Mean local SSIM over the voxels whose whole 11-voxel window is inside the image (and in
        ``mask``): 1 for identical images. Equal to ``monai.metrics.SSIMMetric(spatial_dims=3)`` and
        to ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False)`` without a mask.
    """
    pred, true, mask = _pair(pred, true, mask)
    pad = SSIM_WINDOW // 2
    if min(pred.shape) <= 2 * pad:
        raise ValueError(f"images of shape {pred.shape} are too small for the {SSIM_WINDOW}-voxel SSIM window")
    inner = tuple(slice(pad, n - pad) for n in pred.shape)
    local = ssim_map(pred, true, data_range)[inner]
    if mask is None:
        return float(local.mean())
    mask = mask[inner]
    if not mask.any():
        raise ValueError(f"mask has no voxel at least {pad} voxels from the image border")
    return float(local[mask].mean())


def _volume_series(volumes, name: str) -> pd.Series:
    if isinstance(volumes, pd.DataFrame):
        if len(volumes) != 1:
            raise ValueError(f"{name} must hold one row of volumes, got {len(volumes)} rows")
        volumes = volumes.iloc[0]
    if isinstance(volumes, pd.Series):
        volumes = volumes.to_dict()
    if not isinstance(volumes, Mapping):
        raise ValueError(f"{name} must be a dict, Series or one-row DataFrame of region -> mm³")
    series = pd.Series(volumes, dtype=object)
    return pd.to_numeric(series, errors="coerce")


def regional_volume_error(pred_volumes, true_volumes, regions=None) -> pd.DataFrame:
    """Per-region error of predicted against observed volumes.

    Parameters
    ----------
    pred_volumes, true_volumes : dict, pandas Series or one-row DataFrame
        region -> volume (mm³).
    regions : sequence of str, optional
        Regions to compare (default: ``REGIONS`` present in both, else every region in both).

    Returns
    -------
    pandas.DataFrame
        Columns ``region, predicted, observed, abs_error_mm3, pct_error`` (absolute error in % of
        the observed volume) and ``error_mm3`` (signed, predicted - observed), one row per region.
    """
    pred = _volume_series(pred_volumes, "pred_volumes")
    true = _volume_series(true_volumes, "true_volumes")
    if regions is None:
        common = [r for r in REGIONS if r in pred.index and r in true.index]
        regions = common or [r for r in pred.index if r in true.index]
    else:
        regions = [regions] if isinstance(regions, str) else list(regions)
        for name, table in (("pred_volumes", pred), ("true_volumes", true)):
            missing = [r for r in regions if r not in table.index]
            if missing:
                raise ValueError(f"{name} has no volume for {', '.join(missing)}")
    if not regions:
        raise ValueError(f"pred_volumes ({', '.join(map(str, pred.index))}) and true_volumes "
                         f"({', '.join(map(str, true.index))}) share no region")
    predicted = pred[regions].to_numpy(float)
    observed = true[regions].to_numpy(float)
    if np.any(observed <= 0):
        bad = [r for r, v in zip(regions, observed) if not v > 0]
        raise ValueError(f"observed volume of {', '.join(bad)} must be positive")
    error = predicted - observed
    return pd.DataFrame({
        "region": regions,
        "predicted": predicted,
        "observed": observed,
        "abs_error_mm3": np.abs(error),
        "pct_error": 100.0 * np.abs(error) / observed,
        "error_mm3": error,
    })


def evaluate_forecast(predicted, followup, mask=None, predicted_volumes=None, followup_volumes=None,
                      data_range: float = 1.0) -> dict:
    """Image similarity and regional volume error of a forecast against the real follow-up.

    Parameters
    ----------
    predicted, followup : array_like or nibabel image
        The forecast and the real follow-up on the same grid (BrLP's MNI 1.5 mm grid, [0, 1]).
    mask : array_like of bool, optional
        Voxels to evaluate (e.g. the brain mask); default all.
    predicted_volumes, followup_volumes : dict or Series, optional
        Regional volumes (mm³) of the forecast and of the follow-up; both needed for volume errors.
    data_range : float
        Intensity range for SSIM.

    Returns
    -------
    dict
        ``mse``, ``mae``, ``ssim``, ``n_voxels``; with volumes also ``volume_errors`` (the table of
        :func:`regional_volume_error`), ``mean_abs_error_mm3`` and ``mean_pct_error``.
    """
    pred, true, mask = _pair(predicted, followup, mask)
    result = {
        "mse": mse(pred, true, mask),
        "mae": mae(pred, true, mask),
        "ssim": ssim(pred, true, mask, data_range=data_range),
        "n_voxels": int(mask.sum()) if mask is not None else int(pred.size),
    }
    if (predicted_volumes is None) != (followup_volumes is None):
        given = "predicted_volumes" if predicted_volumes is not None else "followup_volumes"
        raise ValueError(f"{given} was given without the other; volume errors need both")
    if predicted_volumes is not None:
        table = regional_volume_error(predicted_volumes, followup_volumes)
        result["volume_errors"] = table
        result["mean_abs_error_mm3"] = float(table["abs_error_mm3"].mean())
        result["mean_pct_error"] = float(table["pct_error"].mean())
    return result
