"""Figures of a brain forecast: predicted regional volumes over age, and the forecast's uncertainty.

Like :mod:`neuroatrophy.thalamus_plot`, every function draws on its own Agg
:class:`matplotlib.figure.Figure` (never :mod:`matplotlib.pyplot`, so it is safe inside 3D Slicer
and in worker threads), returns it, and with ``out_path`` also writes a PNG atomically.

Lines and points carry a ``gid`` (``"predicted"``, ``"observed"``, ``"uncertainty"``) so callers
and tests can find them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .progression_covariates import REGIONS
from .subtypes_plot import save_figure

__all__ = ["plot_volume_trajectories", "plot_uncertainty"]

_TITLES = {
    "cerebral_cortex": "Cerebral cortex",
    "hippocampus": "Hippocampus",
    "amygdala": "Amygdala",
    "cerebral_white_matter": "Cerebral white matter",
    "lateral_ventricle": "Lateral ventricles",
}
_AGE_COLUMNS = ("target_age", "age")


def _finish(fig: Figure, out_path) -> Figure:
    if out_path is not None:
        save_figure(fig, out_path)
    return fig


def _ages(table: pd.DataFrame, name: str) -> np.ndarray:
    """Ages of a volume table: its ``target_age`` or ``age`` column, else a numeric index."""
    for column in _AGE_COLUMNS:
        if column in table.columns:
            values = pd.to_numeric(table[column], errors="coerce").to_numpy(float)
            break
    else:
        values = pd.to_numeric(pd.Series(table.index), errors="coerce").to_numpy(float)
        column = "index"
    if np.isnan(values).any():
        raise ValueError(f"{name}: the ages ({column}) must be numbers; give a target_age or age column")
    return values


def plot_volume_trajectories(volumes_df: pd.DataFrame, observed: pd.DataFrame | None = None, out_path=None,
                             regions=None, title: str | None = None) -> Figure:
    """Predicted regional volumes over target age, one panel per region, observed visits as points.

    Parameters
    ----------
    volumes_df : pandas.DataFrame
        One row per target age: a ``target_age`` (or ``age``) column, or ages as the index, and a
        column of volumes (mm³) per region (e.g. ``ForecastResult.volumes`` or ``volumes.csv``).
        A ``source`` column (``dcm``/``regression``) is named in the legend.
    observed : pandas.DataFrame, optional
        The subject's measured visits: ``age`` (or ``target_age``) and region columns; missing
        values are skipped.
    out_path : str or path-like, optional
        PNG file to write.
    regions : sequence of str, optional
        Regions to draw (default: those of ``REGIONS`` in ``volumes_df``).
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not isinstance(volumes_df, pd.DataFrame) or volumes_df.empty:
        raise ValueError("volumes_df must be a non-empty DataFrame of predicted volumes")
    if regions is None:
        regions = [r for r in REGIONS if r in volumes_df.columns]
        if not regions:
            raise ValueError(f"volumes_df has no region column; expected some of {', '.join(REGIONS)}, "
                             f"got {', '.join(map(str, volumes_df.columns))}")
    else:
        regions = [regions] if isinstance(regions, str) else list(regions)
        missing = [r for r in regions if r not in volumes_df.columns]
        if missing:
            raise ValueError(f"volumes_df has no column(s) {', '.join(missing)}")
    ages = _ages(volumes_df, "volumes_df")
    order = np.argsort(ages)
    obs_ages = _ages(observed, "observed") if observed is not None else None
    label = "predicted"
    if "source" in volumes_df.columns:
        sources = pd.unique(volumes_df["source"].dropna().astype(str))
        if len(sources):
            label = f"predicted ({', '.join(sources)})"

    n = len(regions)
    ncols = min(n, 3)
    nrows = int(np.ceil(n / ncols))
    fig = Figure(figsize=(3.6 * ncols, 3.0 * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, region in zip(axes, regions):
        values = pd.to_numeric(volumes_df[region], errors="coerce").to_numpy(float)
        ax.plot(ages[order], values[order], "-o", color="tab:blue", markersize=4, gid="predicted", label=label)
        if observed is not None and region in observed.columns:
            obs = pd.to_numeric(observed[region], errors="coerce").to_numpy(float)
            keep = np.isfinite(obs)
            if keep.any():
                ax.scatter(obs_ages[keep], obs[keep], s=30, color="black", zorder=3, gid="observed",
                           label="observed")
        ax.set_title(_TITLES.get(region, region), fontsize=10)
        ax.set_xlabel("age (years)")
        ax.set_ylabel("volume (mm³)")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _finish(fig, out_path)


def plot_uncertainty(target_ages, global_uncertainty, out_path=None, title: str | None = None) -> Figure:
    """The forecast's global uncertainty (e.g. mean voxel SD in the brain) per target age.

    Parameters
    ----------
    target_ages : array_like (k,)
    global_uncertainty : array_like (k,)
        One value per target age (``ForecastResult.global_uncertainty``).
    out_path : str or path-like, optional
        PNG file to write.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    ages = np.asarray(target_ages, dtype=float).ravel()
    values = np.asarray(global_uncertainty, dtype=float).ravel()
    if ages.size == 0 or ages.shape != values.shape:
        raise ValueError(f"target_ages ({ages.size}) and global_uncertainty ({values.size}) must have the same, "
                         "non-zero length")
    if not (np.all(np.isfinite(ages)) and np.all(np.isfinite(values))):
        raise ValueError("target_ages and global_uncertainty must be finite numbers")
    order = np.argsort(ages)
    fig = Figure(figsize=(4.8, 3.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(ages[order], values[order], "-o", color="tab:purple", markersize=5, gid="uncertainty")
    ax.set_xlabel("target age (years)")
    ax.set_ylabel("global uncertainty (mean voxel SD)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Forecast uncertainty", fontsize=10)
    fig.tight_layout()
    return _finish(fig, out_path)
