"""Figures of normative models and atrophy maps, written as PNG files.

Every function draws on its own :class:`matplotlib.figure.Figure` with the Agg
canvas and never imports :mod:`matplotlib.pyplot`, so it changes no global
matplotlib state (backend, current figure) and is safe inside 3D Slicer and in
worker threads. Each writes its PNG atomically (temporary file + rename) and
returns the path.

Surface maps are drawn by orthographic projection of the mesh triangles, sorted
back to front (painter's algorithm), with simple Lambert shading; vertices whose
value is NaN or does not pass the threshold show the grey cortex beneath.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PolyCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from scipy.special import ndtri

from .io import atomic_write

__all__ = [
    "plot_surface_map",
    "plot_centile_curves",
    "plot_calibration",
    "plot_regional_bars",
    "plot_group_overlap",
    "target_outcome_figure",
]

_DPI = 120
_CORTEX_GREY = np.array([0.82, 0.82, 0.82])
_SULCUS_GREY = np.array([0.66, 0.66, 0.66])
_FSAVERAGE5_VERTICES = 20484
_LIGHT = np.array([0.0, 0.0, 1.0])  # towards the viewer, in view coordinates
_AMBIENT = 0.35

# View name -> (hemisphere, rotation from RAS to view coordinates (right, up, towards viewer)).
_VIEWS = {
    "left lateral": ("left", np.array([[0, -1, 0], [0, 0, 1], [-1, 0, 0]], dtype=float)),
    "left medial": ("left", np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=float)),
    "right lateral": ("right", np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=float)),
    "right medial": ("right", np.array([[0, -1, 0], [0, 0, 1], [-1, 0, 0]], dtype=float)),
}


# ------------------------------------------------------------------------ saving
def _save(fig: Figure, path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figure path must end in .png, got {str(path)!r}")
    FigureCanvasAgg(fig)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI, facecolor="white")
    return path


# ------------------------------------------------------------------ surface maps
def plot_surface_map(
    surface,
    values,
    path,
    threshold=None,
    cmap="RdBu_r",
    vmin=-4.0,
    vmax=4.0,
    title=None,
    label="z-score",
    background="sulcal",
    extend="both",
):
    """Lateral and medial views of both hemispheres, coloured by per-vertex values.

    Parameters
    ----------
    surface : Surface
        Two-hemisphere mesh (e.g. ``load_fsaverage5("inflated")``), RAS coordinates.
    values : array of shape (V,)
        One value per vertex; NaN vertices are shown in grey.
    path : str or path-like
        Output PNG file.
    threshold : float, optional
        Colour only vertices beyond the threshold: ``values <= threshold`` when it
        is negative (e.g. -1.96 for atrophy), ``values >= threshold`` otherwise.
    cmap : str
        Matplotlib colormap name.
    vmin, vmax : float
        Colour range.
    title : str, optional
        Figure title.
    label : str
        Colour-bar label (quantity and units).
    background : {"sulcal", None} or array of shape (V,)
        Grey shading under uncoloured vertices: ``"sulcal"`` shades sulci darker
        (fsaverage5 sulcal depth from nilearn; plain grey on other meshes), an
        array is used as sulcal depth (positive = deep), None gives plain grey.
    extend : {"both", "min", "max", "neither"}
        Colour-bar arrows for values beyond ``vmin``/``vmax``.

    Returns
    -------
    Path
    """
    values = _check_vertex_values(values, surface)
    if not vmin < vmax:
        raise ValueError(f"vmin must be smaller than vmax, got vmin={vmin}, vmax={vmax}")
    shown = np.isfinite(values)
    if threshold is not None:
        threshold = float(threshold)
        with np.errstate(invalid="ignore"):
            shown &= values <= threshold if threshold < 0 else values >= threshold
    colormap = colormaps[cmap]
    norm = Normalize(vmin=vmin, vmax=vmax)
    rgb = _background_rgb(surface, background)
    rgb[shown] = colormap(norm(values[shown]))[:, :3]

    fig = Figure(figsize=(9.6, 6.2))
    grid = fig.add_gridspec(2, 3, width_ratios=[1, 1, 0.05], left=0.01, right=0.9, top=0.9, bottom=0.03,
                            wspace=0.02, hspace=0.08)
    for k, view in enumerate(_VIEWS):
        ax = fig.add_subplot(grid[k % 2, k // 2])  # rows: lateral, medial; columns: left, right
        _draw_view(ax, surface, rgb, view)
    cax = fig.add_subplot(grid[:, 2])
    colorbar = fig.colorbar(ScalarMappable(norm=norm, cmap=colormap), cax=cax, extend=extend)
    colorbar.set_label(label)
    if threshold is not None:
        cax.axhline(threshold, color="black", linewidth=1.2)
        what = "below" if threshold < 0 else "above"
        fig.text(0.45, 0.005, f"coloured: {label} {what} {threshold:g}; grey: not beyond threshold or no data",
                 ha="center", va="bottom", fontsize=8, color="0.3")
    if title:
        fig.suptitle(title, fontsize=13)
    return _save(fig, path)


def _background_rgb(surface, background) -> np.ndarray:
    grey = np.tile(_CORTEX_GREY, (surface.n_vertices, 1))
    if background is None:
        return grey
    if isinstance(background, str):
        if background != "sulcal":
            raise ValueError(f"background must be 'sulcal', None or a per-vertex array, got {background!r}")
        if surface.n_vertices != _FSAVERAGE5_VERTICES:
            return grey
        depth = _fsaverage5_sulcal_depth()
    else:
        depth = _check_vertex_values(background, surface)
    # Two grey levels, as in FreeSurfer's viewers: light gyri, darker sulci.
    return np.where((np.nan_to_num(depth) > 0)[:, None], _SULCUS_GREY, _CORTEX_GREY)


@functools.lru_cache(maxsize=1)
def _fsaverage5_sulcal_depth() -> np.ndarray:
    from nilearn import datasets

    parts = datasets.load_fsaverage_data("fsaverage5", data_type="sulcal").data.parts
    return np.concatenate([np.asarray(parts[hemi], dtype=float) for hemi in ("left", "right")])


def _check_vertex_values(values, surface) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if values.shape != (surface.n_vertices,):
        raise ValueError(
            f"values must have shape ({surface.n_vertices},) like the surface {surface.name or ''}, got {values.shape}"
        )
    return values


def _draw_view(ax, surface, rgb, view):
    """Draw one hemisphere from one side: visible triangles, back to front, shaded."""
    hemisphere, rotation = _VIEWS[view]
    part = surface.hemisphere_slices[hemisphere]
    faces = surface.faces
    in_hemi = (faces[:, 0] >= part.start) & (faces[:, 0] < part.stop)
    faces = faces[in_hemi]
    coords = surface.vertices @ rotation.T
    corners = coords[faces]  # (F, 3 corners, 3)
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    facing = normals @ _LIGHT > 0  # fsaverage faces are wound with outward normals
    corners, normals, faces = corners[facing], normals[facing], faces[facing]
    order = np.argsort(corners[:, :, 2].mean(axis=1))  # farthest first
    shade = _AMBIENT + (1 - _AMBIENT) * np.clip(normals[order] @ _LIGHT, 0, 1)
    colours = rgb[faces[order]].mean(axis=1) * shade[:, None]
    polygons = PolyCollection(corners[order][:, :, :2], facecolors=colours, edgecolors=colours,
                              linewidths=0.15, antialiaseds=False)
    ax.add_collection(polygons)
    xy = coords[part][:, :2]
    ax.set_xlim(xy[:, 0].min() - 2, xy[:, 0].max() + 2)
    ax.set_ylim(xy[:, 1].min() - 2, xy[:, 1].max() + 2)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_title(view, fontsize=10)


def plot_group_overlap(fraction_map, surface, path, title=None):
    """Fraction of patients with atrophy at each vertex, on the surface.

    Parameters
    ----------
    fraction_map : array of shape (V,)
        Values in [0, 1] (e.g. the mean of the patients' boolean atrophy masks).
    surface : Surface
        Mesh to draw on.
    path : str or path-like
        Output PNG file.
    title : str, optional
        Figure title (default: "Overlap of individual atrophy maps").

    Returns
    -------
    Path
    """
    fraction = _check_vertex_values(fraction_map, surface)
    finite = fraction[np.isfinite(fraction)]
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        raise ValueError(f"fraction_map must lie in [0, 1], got {finite.min():g} to {finite.max():g}")
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    vmax = min(1.0, np.ceil(top * 20) / 20)  # round the colour range up to a multiple of 5 %
    with np.errstate(invalid="ignore"):
        fraction = np.where(fraction > 0, fraction, np.nan)  # no patient: grey cortex
    return plot_surface_map(
        surface, fraction, path, threshold=None, cmap="YlOrRd", vmin=0.0, vmax=vmax,
        title=title or "Overlap of individual atrophy maps", label="fraction of patients with atrophy",
        extend="neither",
    )


# -------------------------------------------------------------- centile curves
def plot_centile_curves(curves_df, path, patient_age=None, patient_value=None, title=None,
                        ylabel="Cortical thickness (mm)"):
    """Normative centile curves against age, optionally with one patient's value.

    Parameters
    ----------
    curves_df : pandas.DataFrame
        Column ``age`` and centile columns named ``p<centile>`` (e.g. ``p5, p25, p50,
        p75, p95``, as from ``CorticalThicknessModel.region_centile_curves``).
    path : str or path-like
        Output PNG file.
    patient_age, patient_value : float, optional
        The patient's point (both or neither).
    title : str, optional
        Figure title.
    ylabel : str
        y-axis label (quantity and units).

    Returns
    -------
    Path
    """
    if not isinstance(curves_df, pd.DataFrame) or "age" not in curves_df.columns:
        raise ValueError("curves_df must be a DataFrame with an 'age' column and p<centile> columns")
    centiles = sorted(
        (float(column[1:]), column) for column in curves_df.columns
        if isinstance(column, str) and column.startswith("p") and _is_number(column[1:])
    )
    if not centiles:
        raise ValueError(f"curves_df has no p<centile> columns; columns: {list(curves_df.columns)}")
    if (patient_age is None) != (patient_value is None):
        raise ValueError("give both patient_age and patient_value, or neither")
    data = curves_df.sort_values("age")
    age = data["age"].to_numpy(dtype=float)

    fig = Figure(figsize=(7.0, 4.8))
    ax = fig.add_subplot()
    # Shade symmetric pairs of centiles (5-95, 25-75), darker towards the median.
    pairs = [(lo, hi) for lo in centiles for hi in centiles if lo[0] < 50 and abs(lo[0] + hi[0] - 100) < 1e-9]
    for k, ((c_lo, lo), (c_hi, hi)) in enumerate(sorted(pairs)):
        ax.fill_between(age, data[lo], data[hi], color="tab:blue", alpha=0.15 + 0.12 * k, linewidth=0,
                        label=f"{c_lo:g}th-{c_hi:g}th centile")
    for c, column in centiles:
        median = abs(c - 50) < 1e-9
        ax.plot(age, data[column], color="navy" if median else "tab:blue", linewidth=2.0 if median else 0.8,
                linestyle="-" if median else "--", label="median" if median else None)
        ax.annotate(f"{c:g}", (age[-1], data[column].iloc[-1]), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8, color="0.3")
    if patient_age is not None:
        ax.plot([patient_age], [patient_value], marker="D", markersize=9, color="crimson", linestyle="none",
                markeredgecolor="black", label=f"patient ({patient_value:.2f} at {patient_age:.0f} y)")
    ax.set_xlabel("Age (years)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------ calibration
def plot_calibration(z, path, title=None):
    """Calibration of deviation scores of held-out controls: histogram and QQ plot.

    Parameters
    ----------
    z : array
        z-scores of any shape (e.g. held-out controls x vertices); NaN are ignored.
    path : str or path-like
        Output PNG file.
    title : str, optional
        Figure title (default: "Calibration of held-out z-scores").

    Returns
    -------
    Path
    """
    z = np.asarray(z, dtype=float).ravel()
    z = z[np.isfinite(z)]
    if z.size < 2:
        raise ValueError(f"z needs at least 2 finite values, got {z.size}")
    fig = Figure(figsize=(10.0, 4.4))
    hist_ax, qq_ax = fig.subplots(1, 2)

    grid = np.linspace(-5, 5, 401)
    hist_ax.hist(np.clip(z, -5, 5), bins=np.linspace(-5, 5, 81), density=True, color="tab:blue", alpha=0.6,
                 label="held-out z")
    hist_ax.plot(grid, np.exp(-0.5 * grid**2) / np.sqrt(2 * np.pi), color="black", linewidth=1.5, label="N(0, 1)")
    for edge in (-1.96, 1.96):
        hist_ax.axvline(edge, color="0.4", linestyle=":", linewidth=1)
    beyond = np.mean(np.abs(z) > 1.96)
    hist_ax.text(0.02, 0.97, f"n = {z.size:,}\nmean = {z.mean():.3f}\nSD = {z.std():.3f}\n"
                 f"|z| > 1.96: {100 * beyond:.1f} % (expected 5.0 %)",
                 transform=hist_ax.transAxes, va="top", fontsize=8,
                 bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.8"})
    hist_ax.set_xlabel("z-score")
    hist_ax.set_ylabel("density")
    hist_ax.set_title("Histogram")
    hist_ax.legend(loc="upper right", fontsize=8)

    # Quantiles at fixed probabilities: a QQ plot of millions of values in a few hundred points.
    probabilities = np.concatenate([[0.001, 0.0025], np.linspace(0.005, 0.995, 199), [0.9975, 0.999]])
    probabilities = probabilities[(probabilities * z.size >= 1) & ((1 - probabilities) * z.size >= 1)]
    expected = ndtri(probabilities)
    observed = np.quantile(z, probabilities)
    lim = max(4.0, float(np.max(np.abs(np.concatenate([expected, observed])))) + 0.2)
    qq_ax.plot([-lim, lim], [-lim, lim], color="black", linewidth=1, label="identity")
    qq_ax.plot(expected, observed, marker="o", markersize=3, linestyle="none", color="tab:blue",
               label="observed quantiles")
    qq_ax.set_xlim(-lim, lim)
    qq_ax.set_ylim(-lim, lim)
    qq_ax.set_aspect("equal")
    qq_ax.set_xlabel("N(0, 1) quantile")
    qq_ax.set_ylabel("held-out z quantile")
    qq_ax.set_title("QQ plot")
    qq_ax.grid(alpha=0.3)
    qq_ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title or "Calibration of held-out z-scores")
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------ regional bars
def plot_regional_bars(regional_df, path, top=15, column="mean_z", title=None):
    """Horizontal bars of the most atrophic regions of one patient.

    Parameters
    ----------
    regional_df : pandas.DataFrame
        Regional summary with ``region`` and ``column`` (e.g. ``PatientMap.regions``:
        ``mean_z``, ``regional_z``); ``fraction_atrophic``, if present, is printed
        next to each bar.
    path : str or path-like
        Output PNG file.
    top : int
        Number of regions shown (the lowest values of ``column``).
    column : str
        Column to plot (z-scores; negative = thinner than expected).
    title : str, optional
        Figure title.

    Returns
    -------
    Path
    """
    if not isinstance(regional_df, pd.DataFrame):
        raise ValueError(f"regional_df must be a pandas DataFrame, got {type(regional_df).__name__}")
    for required in ("region", column):
        if required not in regional_df.columns:
            raise ValueError(f"regional_df has no column {required!r}; columns: {list(regional_df.columns)}")
    if int(top) != top or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    data = regional_df.dropna(subset=[column]).sort_values(column, kind="mergesort").head(int(top))
    if data.empty:
        raise ValueError(f"regional_df has no finite values in column {column!r}")
    values = data[column].to_numpy(dtype=float)[::-1]  # most atrophic at the top
    names = data["region"].astype(str).to_numpy()[::-1]

    fig = Figure(figsize=(7.0, 0.5 + 0.32 * len(values) + 0.8))
    ax = fig.add_subplot()
    norm = Normalize(vmin=-4, vmax=4)
    ax.barh(np.arange(len(values)), values, color=colormaps["RdBu_r"](norm(values)), edgecolor="0.3",
            linewidth=0.5)
    ax.set_yticks(np.arange(len(values)), names, fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.axvline(-1.96, color="0.4", linestyle=":", linewidth=1, label="z = -1.96")
    if "fraction_atrophic" in data.columns:
        fractions = data["fraction_atrophic"].to_numpy(dtype=float)[::-1]
        for y, (value, fraction) in enumerate(zip(values, fractions)):
            if np.isfinite(fraction):
                ax.annotate(f"{100 * fraction:.0f} % atrophic", (min(value, 0.0), y), xytext=(-4, 0),
                            textcoords="offset points", ha="right", va="center", fontsize=7, color="0.25")
    low = min(float(values.min()), -2.0)
    ax.set_xlim(low * 1.45, max(0.5, float(values.max()) + 0.3))
    ax.set_xlabel(_column_label(column))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or f"Most atrophic regions (top {len(values)})")
    fig.tight_layout()
    return _save(fig, path)


def _column_label(column: str) -> str:
    return {
        "mean_z": "mean vertex z-score in region",
        "regional_z": "z-score of regional mean thickness",
        "min_z": "lowest vertex z-score in region",
    }.get(column, column)


# ----------------------------------------------------------- target vs outcome
def target_outcome_figure(connectivity, outcome, results_row_or_dict, path, target_name="target",
                          outcome_name="outcome", xlabel=None):
    """Scatter plot of outcome against connectivity to one target, with the fitted line.

    Parameters
    ----------
    connectivity, outcome : array_like of shape (n,)
        One value per patient (e.g. a column of the connectivity table and the
        matching outcome values).
    results_row_or_dict : dict or pandas.Series
        The target's results (a row of ``outcome.target_outcome_analysis`` or the dict
        of ``outcome.association``): ``r`` and ``p_permutation`` are shown in the
        title, with ``p_fwe`` and the covariate-adjusted ``partial_r`` and
        ``p_permutation_adjusted`` when present.
    path : str or path-like
        Output PNG file.
    target_name, outcome_name : str
        Names used in the title and axis labels.
    xlabel : str, optional
        x-axis label (default: "Connectivity with <target_name>").

    Returns
    -------
    Path
    """
    from .outcome import fit_line

    results = dict(results_row_or_dict)
    for key in ("r", "p_permutation"):
        if key not in results:
            raise ValueError(f"results_row_or_dict has no {key!r}; keys: {', '.join(map(str, results))}")
    x = np.asarray(connectivity, dtype=float)
    y = np.asarray(outcome, dtype=float)
    line = fit_line(x, y)

    fig = Figure(figsize=(6.4, 5.0))
    ax = fig.add_subplot()
    ax.fill_between(line["x"], line["lower"], line["upper"], color="tab:blue", alpha=0.2, linewidth=0,
                    label=f"{100 * line['level']:.0f} % confidence band")
    ax.plot(line["x"], line["y"], color="navy", linewidth=2, label="least-squares line")
    ax.scatter(x, y, s=28, color="tab:orange", edgecolors="black", linewidths=0.5, zorder=3,
               label=f"patients (n = {len(x)})")
    ax.set_xlabel(xlabel or f"Connectivity with {target_name}")
    ax.set_ylabel(outcome_name)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    symbol = "rho" if results.get("method") == "spearman" else "r"
    title = f"{target_name}: {symbol} = {results['r']:.2f}, permutation p = {_format_p(results['p_permutation'])}"
    details = []
    if "p_fwe" in results and np.isfinite(results["p_fwe"]):
        details.append(f"FWE-corrected p = {_format_p(results['p_fwe'])}")
    if "partial_r" in results and "p_permutation_adjusted" in results:
        details.append(f"adjusted: partial r = {results['partial_r']:.2f}, "
                       f"p = {_format_p(results['p_permutation_adjusted'])}")
    ax.set_title(title + ("\n" + "; ".join(details) if details else ""), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _format_p(p) -> str:
    p = float(p)
    if not np.isfinite(p):
        return "n/a"
    return f"{p:.1e}" if p < 0.001 else f"{p:.3f}"
