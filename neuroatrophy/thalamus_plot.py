"""Figures of thalamus segmentation evaluations: Bland-Altman, overlap metrics, annualised change.

Every function draws on its own :class:`matplotlib.figure.Figure` with the Agg canvas (or on an
axes it is given) and never imports :mod:`matplotlib.pyplot`, so it changes no global matplotlib
state and is safe inside 3D Slicer and in worker threads. Each returns the figure; with
``save=path`` it also writes a PNG atomically (temporary file + rename).

* :func:`bland_altman_figure`: one method against the reference: pair mean against difference,
  bias and 95 % limits of agreement with their confidence intervals, and the proportional-bias
  regression line with its slope and p-value.
* :func:`bland_altman_grid` (and :func:`save_bland_altman`): one such panel per method, side by
  side on a shared difference axis, from a cohort volume table.
* :func:`metrics_figure`: Dice, sensitivity, precision and volume difference per method.
* :func:`annualized_change_figure`: annualised % volume change per method.

Lines carry a ``gid`` (``"bias"``, ``"loa_low"``, ``"loa_high"``, ``"proportional_bias"``, ``"zero"``)
so callers and tests can find them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .subtypes_plot import save_figure
from .thalamus_eval import bland_altman, proportional_bias

__all__ = [
    "bland_altman_figure",
    "bland_altman_grid",
    "save_bland_altman",
    "metrics_figure",
    "annualized_change_figure",
    "save_figure",
]

_POINT_COLOR = "tab:blue"
_BIAS_COLOR = "black"
_LOA_COLOR = "tab:red"
_SLOPE_COLOR = "tab:orange"
_METRIC_LABELS = {
    "dice": "Dice",
    "sensitivity": "Sensitivity",
    "precision": "Precision",
    "hd95_mm": "HD95 (mm)",
    "volume_diff_pct": "Volume difference (%)",
    "volume_diff_mm3": "Volume difference (mm³)",
}


_STRUCTURE_TITLES = {"left": "left thalamus", "right": "right thalamus", "both": "bilateral thalamus"}


def _finish(fig: Figure, save) -> Figure:
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    if save is not None:
        save_figure(fig, save)
    return fig


def _p_text(p: float) -> str:
    if not np.isfinite(p):
        return "p n/a"
    if p == 0:
        return "p < 1e-300"  # underflows double precision
    return f"p = {p:.1e}" if p < 0.001 else f"p = {p:.3f}"


def _format_value(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


# ------------------------------------------------------------------ Bland-Altman


def bland_altman_figure(measured, reference, label=None, percent=False, ax=None, show_ci=True, units="mm³",
                        title=None, save=None) -> Figure:
    """Bland-Altman plot of one method against the reference, with its proportional bias.

    Parameters
    ----------
    measured, reference : array_like of shape (n,)
        Paired values (e.g. the method's and the reference's volumes), n >= 2.
    label : str, optional
        Method name, used in the title and y-axis label.
    percent : bool
        Differences in % of the pair's mean (see :func:`neuroatrophy.thalamus_eval.bland_altman`).
    ax : matplotlib.axes.Axes, optional
        Draw into these axes (of an Agg figure) instead of a new figure.
    show_ci : bool
        Shade the 95 % confidence intervals of the bias and of the limits of agreement.
    units : str
        Units of the values, for the axis labels.
    title : str, optional
        Default: ``label``.
    save : str or path-like, optional
        PNG file to write.

    Returns
    -------
    matplotlib.figure.Figure
        The figure drawn on. Its lines have gids ``bias``, ``loa_low``, ``loa_high``, ``zero`` and,
        with 3 or more pairs, ``proportional_bias`` (the regression of the difference on the mean,
        whose legend entry gives the slope, its confidence interval and p-value).
    """
    ba = bland_altman(measured, reference, percent=percent)
    if ax is None:
        fig = Figure(figsize=(5.6, 4.4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    diff_units = "%" if percent else units
    ax.axhline(0.0, color="0.6", linewidth=0.8, gid="zero")
    if show_ci:
        ax.axhspan(*ba.bias_ci, color=_BIAS_COLOR, alpha=0.08, linewidth=0, gid="bias_ci")
        for ci in ba.loa_ci:
            ax.axhspan(*ci, color=_LOA_COLOR, alpha=0.08, linewidth=0)
    ax.scatter(ba.means, ba.differences, s=18, color=_POINT_COLOR, edgecolors="white", linewidths=0.4,
               zorder=3, label=f"subjects (n = {ba.n})")
    ax.axhline(ba.bias, color=_BIAS_COLOR, linewidth=1.5, gid="bias",
               label=f"bias {_format_value(ba.bias)} {diff_units}")
    ax.axhline(ba.loa_high, color=_LOA_COLOR, linestyle="--", linewidth=1.2, gid="loa_high",
               label=f"95 % limits of agreement {_format_value(ba.loa_low)} to {_format_value(ba.loa_high)}")
    ax.axhline(ba.loa_low, color=_LOA_COLOR, linestyle="--", linewidth=1.2, gid="loa_low")
    if ba.n >= 3 and np.ptp(ba.means) > 0:
        pb = proportional_bias(measured, reference, percent=percent)
        x = np.array([ba.means.min(), ba.means.max()])
        ax.plot(x, pb.intercept + pb.slope * x, color=_SLOPE_COLOR, linewidth=1.5, gid="proportional_bias",
                label=f"slope {pb.slope:.3f} (95 % CI {pb.slope_ci[0]:.3f} to {pb.slope_ci[1]:.3f}), "
                      f"{_p_text(pb.p_value)}")
    name = label or "method"
    ax.set_xlabel(f"mean of {name} and reference ({units})")
    ax.set_ylabel(f"{name} − reference ({diff_units}{' of mean' if percent else ''})")
    ax.set_title(title if title is not None else name, fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7, framealpha=0.9)
    return _finish(fig, save)


def _require(table, columns, what="table"):
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"{what} must be a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{what} has no column(s) {', '.join(map(repr, missing))}; "
                         f"columns: {', '.join(map(str, table.columns))}")


def _select_structure(table: pd.DataFrame, structure, structure_column: str, what: str) -> pd.DataFrame:
    if structure is None or structure_column not in table.columns:
        return table
    chosen = table[table[structure_column] == structure]
    if chosen.empty:
        raise ValueError(f"{what} has no rows with {structure_column} == {structure!r}; values: "
                         f"{', '.join(map(str, pd.unique(table[structure_column])))}")
    return chosen


def _methods(table: pd.DataFrame, method: str, methods, what: str) -> list:
    available = list(pd.unique(table[method]))
    if methods is None:
        return available
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in available]
    if unknown:
        raise ValueError(f"{what} has no rows for method(s) {', '.join(map(repr, unknown))} in column {method!r}; "
                         f"methods: {', '.join(map(str, available))}")
    if not methods:
        raise ValueError("methods must name at least one method")
    return methods


def bland_altman_grid(volume_table: pd.DataFrame, methods=None, method="method", measured="volume_pred_mm3",
                      reference="volume_ref_mm3", structure="both", structure_column="structure", percent=False,
                      show_ci=True, units="mm³", title=None, save=None) -> Figure:
    """Bland-Altman plots of several methods side by side, one panel per method, shared y axis.

    Parameters
    ----------
    volume_table : pandas.DataFrame
        Long cohort table, e.g. :func:`neuroatrophy.thalamus_eval.evaluate_masks` concatenated over
        subjects: one row per subject and method (and structure).
    methods : sequence of str, optional
        Methods to show, in order (default: all, in order of appearance).
    method, measured, reference : str
        Column names: the method, its value and the reference value.
    structure : str or None
        Rows of this structure (``"left"``, ``"right"``, ``"both"``) when the table has a
        ``structure_column``; None uses every row.
    percent, show_ci, units
        As in :func:`bland_altman_figure`.
    title : str, optional
        Figure title.
    save : str or path-like, optional
        PNG file to write.

    Returns
    -------
    matplotlib.figure.Figure
    """
    _require(volume_table, [method, measured, reference], "volume_table")
    table = _select_structure(volume_table, structure, structure_column, "volume_table")
    methods = _methods(table, method, methods, "volume_table")
    fig = Figure(figsize=(4.6 * len(methods), 4.4))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(methods), sharey=True, squeeze=False)[0])
    for ax, name in zip(axes, methods):
        rows = table[table[method] == name]
        bland_altman_figure(rows[measured].to_numpy(float), rows[reference].to_numpy(float), label=str(name),
                            percent=percent, ax=ax, show_ci=show_ci, units=units)
    for ax in axes[1:]:
        ax.set_ylabel("")
    if title or (structure is not None and structure_column in volume_table.columns):
        fig.suptitle(title or f"Bland-Altman: {_STRUCTURE_TITLES.get(structure, structure)}", fontsize=11)
    fig.tight_layout()
    return _finish(fig, save)


def save_bland_altman(path, volume_table: pd.DataFrame, methods=None, **kwargs) -> Path:
    """Write :func:`bland_altman_grid` of ``volume_table`` to the PNG ``path``; returns the path."""
    bland_altman_grid(volume_table, methods=methods, save=path, **kwargs)
    return Path(path)


# ------------------------------------------------------------------ per-method distributions


def _strip(ax, groups: list, labels: list, color="tab:blue"):
    """Box plot of each group with its points jittered on top (deterministic jitter)."""
    jitter = np.random.default_rng(0)
    positions = np.arange(1, len(groups) + 1)
    ax.boxplot(groups, positions=positions, widths=0.5, showfliers=False,
               medianprops={"color": "black"}, boxprops={"color": "0.4"}, whiskerprops={"color": "0.4"},
               capprops={"color": "0.4"})
    for x, values in zip(positions, groups):
        ax.scatter(x + jitter.uniform(-0.12, 0.12, len(values)), values, s=12, color=color, alpha=0.7,
                   edgecolors="none", zorder=3)
    ax.set_xticks(positions, [str(label) for label in labels], rotation=30 if len(labels) > 3 else 0,
                  ha="right" if len(labels) > 3 else "center")
    ax.grid(axis="y", alpha=0.3)


def metrics_figure(metrics: pd.DataFrame, columns=("dice", "sensitivity", "precision", "volume_diff_pct"),
                   method="method", methods=None, structure="both", structure_column="structure", title=None,
                   save=None) -> Figure:
    """Distribution of per-case metrics per method: one panel per metric, a box and points per method.

    Parameters
    ----------
    metrics : pandas.DataFrame
        Per-case table like :func:`neuroatrophy.thalamus_eval.evaluate_masks` concatenated over subjects.
    columns : sequence of str
        Metric columns, one panel each (non-finite values, e.g. an infinite HD95, are left out).
    method : str
        Method column.
    methods : sequence of str, optional
        Methods to show, in order (default: all).
    structure : str or None
        Rows of this structure when the table has ``structure_column``; None uses every row.
    title : str, optional
    save : str or path-like, optional
        PNG file to write.

    Returns
    -------
    matplotlib.figure.Figure
    """
    columns = [columns] if isinstance(columns, str) else list(columns)
    if not columns:
        raise ValueError("columns must name at least one metric")
    _require(metrics, [method, *columns], "metrics")
    table = _select_structure(metrics, structure, structure_column, "metrics")
    methods = _methods(table, method, methods, "metrics")
    fig = Figure(figsize=(max(3.2 * len(columns), 4.0), 3.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    for ax, column in zip(axes, columns):
        groups = []
        for name in methods:
            values = pd.to_numeric(table.loc[table[method] == name, column], errors="coerce").to_numpy(float)
            groups.append(values[np.isfinite(values)])
        _strip(ax, groups, methods)
        if column.startswith("volume_diff"):
            ax.axhline(0.0, color="0.5", linewidth=0.8, gid="zero")
        ax.set_title(_METRIC_LABELS.get(column, column), fontsize=10)
    if title or (structure is not None and structure_column in metrics.columns):
        fig.suptitle(title or _STRUCTURE_TITLES.get(structure, str(structure)), fontsize=11)
    fig.tight_layout()
    return _finish(fig, save)


def annualized_change_figure(change: pd.DataFrame, method="method", value="pct_per_year", methods=None,
                             title=None, save=None) -> Figure:
    """Annualised % volume change per subject, one box and points per method.

    Parameters
    ----------
    change : pandas.DataFrame
        Output of :func:`neuroatrophy.thalamus_eval.annualized_change` (with or without a method column).
    method, value : str
        Method column (optional in the table) and value column.
    methods : sequence of str, optional
        Methods to show, in order (default: all).
    title : str, optional
    save : str or path-like, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    _require(change, [value], "change")
    if method in change.columns:
        methods = _methods(change, method, methods, "change")
        groups = [change.loc[change[method] == m, value].to_numpy(float) for m in methods]
    else:
        methods, groups = ["all subjects"], [change[value].to_numpy(float)]
    groups = [g[np.isfinite(g)] for g in groups]
    fig = Figure(figsize=(max(1.3 * len(methods) + 2.0, 3.6), 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _strip(ax, groups, methods)
    ax.axhline(0.0, color="0.5", linewidth=0.8, gid="zero")
    ax.set_ylabel("volume change (% per year)")
    ax.set_title(title or "Annualised thalamic volume change", fontsize=10)
    fig.tight_layout()
    return _finish(fig, save)
