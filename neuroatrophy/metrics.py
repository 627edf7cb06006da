"""Evaluation metrics of normative models, vectorised over responses (columns).

The field's metrics (as reported by PCNtoolkit): explained variance, standardised
mean squared error (SMSE), mean standardised log loss (MSLL), Pearson correlation,
plus calibration of the deviation z-scores.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "explained_variance", "smse", "msll", "pearson_rho", "r2_score", "z_calibration",
]


def explained_variance(y, yhat):
    """1 - var(y - yhat) / var(y), per column."""
    return 1.0 - np.var(y - yhat, axis=0) / np.var(y, axis=0)


def smse(y, yhat):
    """Mean squared error divided by the variance of ``y``, per column (0 perfect, 1 trivial)."""
    return np.mean((y - yhat) ** 2, axis=0) / np.var(y, axis=0)


def r2_score(y, yhat):
    """Coefficient of determination, per column."""
    ss_res = np.sum((y - yhat) ** 2, axis=0)
    ss_tot = np.sum((y - y.mean(axis=0)) ** 2, axis=0)
    return 1.0 - ss_res / ss_tot


def pearson_rho(y, yhat):
    """Pearson correlation between ``y`` and ``yhat``, per column."""
    yc = y - y.mean(axis=0)
    hc = yhat - yhat.mean(axis=0)
    denom = np.sqrt(np.sum(yc**2, axis=0) * np.sum(hc**2, axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(yc * hc, axis=0) / denom


def msll(neg_log_lik, y, train_mean, train_sd):
    """Mean standardised log loss, per column (negative is better than the trivial model).

    ``neg_log_lik`` is the model's negative log predictive density of each ``y``; the
    trivial model is a Gaussian with the training mean and SD.
    """
    trivial = 0.5 * np.log(2 * np.pi * train_sd**2) + (y - train_mean) ** 2 / (2 * train_sd**2)
    return np.mean(neg_log_lik - trivial, axis=0)


def z_calibration(z) -> dict:
    """Calibration of deviation scores pooled over subjects and responses.

    For a calibrated model on held-out controls: mean 0, SD 1, 5 % beyond +/-1.96.
    """
    z = np.asarray(z, dtype=float)
    z = z[np.isfinite(z)]
    return {
        "z_mean": float(z.mean()),
        "z_sd": float(z.std()),
        "frac_beyond_1.96": float(np.mean(np.abs(z) > 1.96)),
        "frac_below_-1.96": float(np.mean(z < -1.96)),
        "n_values": int(z.size),
    }
