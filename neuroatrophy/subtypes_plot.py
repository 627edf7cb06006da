"""Figures of SuStaIn subtype models: positional variance, cross-validation, stages.

Every function draws on its own :class:`matplotlib.figure.Figure` with the Agg
canvas and never imports :mod:`matplotlib.pyplot` (no global state; safe inside
3D Slicer and in worker threads). Each returns the figure; with ``save=path`` it
also writes a PNG atomically (temporary file + rename).

* :func:`positional_variance_figure`: the positional variance diagram (PVD) of
  Young et al. (2018), one panel per subtype: rows are biomarkers (input order),
  columns the positions 1..N of the event sequence; a cell's colour intensity is
  the fraction of MCMC samples that put the biomarker's event at that position.
  For a z-score model each z-level has its own colour (red, magenta, blue, then
  green, orange, cyan), mixed where the levels share positions; a mixture model
  uses one colour map.
* :func:`cv_figure`: CVIC and the test-fold log-likelihood per number of subtypes.
* :func:`stage_figure`: subjects per stage, stacked by subtype, with the stage-0
  (normal-appearing) group as its own bar.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .io import atomic_write

__all__ = [
    "Z_LEVEL_COLORS",
    "positional_variance_image",
    "positional_variance_figure",
    "cv_summary",
    "cv_figure",
    "stage_figure",
    "save_figure",
]

#: Colours of the z-levels (first, second, ...) in positional variance diagrams.
Z_LEVEL_COLORS = (
    (1.0, 0.0, 0.0),  # red
    (1.0, 0.0, 1.0),  # magenta
    (0.0, 0.0, 1.0),  # blue
    (0.0, 0.6, 0.0),  # green
    (1.0, 0.5, 0.0),  # orange
    (0.0, 0.7, 0.7),  # cyan
)
_DPI = 120
_MIXTURE_CMAP = "Oranges"
_STAGE0_COLOR = "0.6"


def save_figure(fig: Figure, path) -> Path:
    """Write a figure as PNG, atomically; returns the path.

    Raises
    ------
    ValueError
        If ``path`` does not end in ``.png``.
    FileNotFoundError
        If its folder does not exist.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"figure path must end in .png, got {str(path)!r}")
    FigureCanvasAgg(fig)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI, facecolor="white")
    return path


def _finish(fig: Figure, save):
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    if save is not None:
        save_figure(fig, save)
    return fig


# ------------------------------------------------------------------ positional variance


def _z_level_index(model) -> np.ndarray:
    """(N,) 0-based rank of each event's z among the events of its biomarker."""
    biomarker = np.asarray(model.event_biomarker, dtype=int)
    z = np.asarray(model.event_z, dtype=float)
    level = np.zeros(len(z), dtype=int)
    for b in np.unique(biomarker):
        events = np.flatnonzero(biomarker == b)
        level[events[np.argsort(z[events], kind="stable")]] = np.arange(len(events))
    return level


def _subtypes(model, subtype) -> list:
    n_subtypes = int(model.n_subtypes)
    if subtype is None:
        return list(range(1, n_subtypes + 1))
    chosen = [subtype] if np.isscalar(subtype) else list(subtype)
    for s in chosen:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 1 <= s <= n_subtypes:
            raise ValueError(f"subtype must be an integer from 1 to {n_subtypes}, got {s!r}")
    return [int(s) for s in chosen]


def positional_variance_image(model, subtype) -> np.ndarray:
    """The RGB image (B, N, 3) of one subtype's positional variance diagram.

    Z-score model: starting from white, each event subtracts, at every position p,
    its probability there times (1 - its z-level's colour), so a certain first-level
    event is pure red and a cell shared by two levels mixes their colours. Mixture
    model: the probability through the ``Oranges`` colour map.

    Parameters
    ----------
    model : SustainModel
    subtype : int
        1-based.
    """
    (subtype,) = _subtypes(model, subtype)
    variance = np.asarray(model.positional_variance(), dtype=float)[subtype - 1]  # (N events, N positions)
    biomarker = np.asarray(model.event_biomarker, dtype=int)
    n_biomarkers, n_positions = len(model.biomarkers), variance.shape[1]
    if model.kind == "mixture":
        probability = np.zeros((n_biomarkers, n_positions))
        np.add.at(probability, biomarker, variance)
        return colormaps[_MIXTURE_CMAP](np.clip(probability, 0.0, 1.0))[..., :3]
    level = _z_level_index(model)
    if level.max() >= len(Z_LEVEL_COLORS):
        raise ValueError(f"the positional variance diagram shows at most {len(Z_LEVEL_COLORS)} z-levels per "
                         f"biomarker, got {level.max() + 1}")
    image = np.ones((n_biomarkers, n_positions, 3))
    for event in range(len(biomarker)):
        absorbed = 1.0 - np.asarray(Z_LEVEL_COLORS[level[event]])
        image[biomarker[event]] -= variance[event][:, None] * absorbed[None, :]
    return np.clip(image, 0.0, 1.0)


def _level_legend(model) -> list:
    """Legend patches of the z-levels, with the z values each level stands for."""
    level = _z_level_index(model)
    z = np.asarray(model.event_z, dtype=float)
    handles = []
    for index in range(level.max() + 1):
        values = ", ".join(f"{v:g}" for v in np.unique(z[level == index]))
        handles.append(Patch(facecolor=Z_LEVEL_COLORS[index], edgecolor="none", label=f"z = {values}"))
    return handles


def positional_variance_figure(model, subtype=None, title=None, save=None, panel_width=None) -> Figure:
    """Positional variance diagram of a SuStaIn model, subtypes side by side.

    Parameters
    ----------
    model : SustainModel
        Fitted model (:mod:`neuroatrophy.sustain`); subtypes are ordered by fraction.
    subtype : int or sequence of int, optional
        1-based subtype(s) to draw; all by default.
    title : str, optional
        Figure title above the panels.
    save : str or path-like, optional
        PNG file to write (atomically).
    panel_width : float, optional
        Width of one panel in inches (default grows with the number of events).

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        If ``subtype`` is out of range.
    """
    subtypes = _subtypes(model, subtype)
    biomarkers = [str(b) for b in model.biomarkers]
    n_positions = int(model.n_events)
    fractions = np.asarray(model.fractions, dtype=float)
    width = panel_width or max(3.0, 0.22 * n_positions + 1.5)
    height = max(2.5, 0.32 * len(biomarkers) + 1.6)
    label_room = 0.07 * max(len(b) for b in biomarkers)
    fig = Figure(figsize=(label_room + width * len(subtypes), height))
    axes = fig.subplots(1, len(subtypes), squeeze=False)[0]
    for ax, s in zip(axes, subtypes):
        image = positional_variance_image(model, s)
        ax.imshow(image, aspect="auto", interpolation="nearest",
                  extent=(0.5, n_positions + 0.5, len(biomarkers) - 0.5, -0.5))
        ax.set_title(f"Subtype {s} (f = {fractions[s - 1]:.2f})", fontsize=10)
        ax.set_xlabel("SuStaIn stage (position in the sequence)")
        step = max(1, int(np.ceil(n_positions / 15)))
        ax.set_xticks(np.arange(1, n_positions + 1, step))
        ax.set_yticks(np.arange(len(biomarkers)))
        ax.set_yticklabels(biomarkers if ax is axes[0] else [], fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    if model.kind == "zscore":
        handles = _level_legend(model)
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=8,
                   title="z-level", title_fontsize=8)
    if title:
        fig.suptitle(title)
    legend_room = 0.45 / height if model.kind == "zscore" else 0.0  # 0.45 inch kept for the legend
    fig.tight_layout(rect=(0, legend_room, 1, 1))
    return _finish(fig, save)


# ------------------------------------------------------------------ cross-validation


def _cv_table(cv_result):
    """The per-fold table of a CVResult, or None when it has none (e.g. a reloaded result)."""
    if getattr(cv_result, "cvic", None) is None:
        raise ValueError(f"cv_result must be a CVResult (with cvic and table), got {type(cv_result).__name__}")
    table = getattr(cv_result, "table", None)
    if not isinstance(table, pd.DataFrame) or table.empty:
        return None
    missing = [c for c in ("n_subtypes", "fold", "test_loglik") if c not in table.columns]
    if missing:
        raise ValueError(f"cv_result.table lacks column(s) {missing}")
    return table


def cv_summary(cv_result) -> pd.DataFrame:
    """Per number of subtypes: CVIC, mean test log-likelihood and its SD and range over folds.

    Without a per-fold table the spread columns are NaN.
    """
    table = _cv_table(cv_result)
    cvic = pd.Series(cv_result.cvic, dtype=float)
    if table is None:
        mean = pd.Series(getattr(cv_result, "mean_test_loglik", None), dtype=float).reindex(cvic.index)
        spread = {name: np.full(len(cvic), np.nan) for name in ("sd_test_loglik", "min_test_loglik",
                                                                "max_test_loglik")}
        summary = pd.DataFrame({"mean_test_loglik": mean.to_numpy(), **spread}, index=cvic.index)
    else:
        grouped = table.groupby("n_subtypes")["test_loglik"]
        summary = pd.DataFrame({
            "mean_test_loglik": grouped.mean(),
            "sd_test_loglik": grouped.std(ddof=1),
            "min_test_loglik": grouped.min(),
            "max_test_loglik": grouped.max(),
        })
    summary.index = pd.Index(np.asarray(summary.index, dtype=int), name="n_subtypes")
    cvic.index = np.asarray(cvic.index, dtype=int)
    summary.insert(0, "cvic", cvic.reindex(summary.index).to_numpy())
    return summary.reset_index()


def cv_figure(cv_result, title=None, save=None) -> Figure:
    """CVIC and test-fold log-likelihood against the number of subtypes.

    Left: CVIC (lower is better; the minimum is marked). Right: each fold's test
    log-likelihood (points) with the mean over folds and its ± 1 SD band.

    Parameters
    ----------
    cv_result : CVResult
        From :func:`neuroatrophy.sustain.cross_validate`: ``table`` (n_subtypes, fold,
        test_loglik) and ``cvic`` (by n_subtypes).
    title : str, optional
    save : str or path-like, optional
        PNG file to write.

    Returns
    -------
    matplotlib.figure.Figure
    """
    table = _cv_table(cv_result)
    summary = cv_summary(cv_result)
    k = summary["n_subtypes"].to_numpy()
    if not len(k):
        raise ValueError("cv_result holds no number of subtypes")
    fig = Figure(figsize=(8.0, 3.4))
    left, right = fig.subplots(1, 2)
    left.plot(k, summary["cvic"], "o-", color="C0")
    if summary["cvic"].notna().any():
        # mark the number the analysis chooses (CVResult.best_n_subtypes: the smallest within
        # tolerance of the lowest CVIC) when the result says so, else the lowest
        chosen = getattr(cv_result, "best_n_subtypes", None)
        best = summary.loc[summary["cvic"].idxmin()] if chosen is None else \
            summary.loc[summary["n_subtypes"] == chosen].iloc[0]
        label = "lowest" if chosen is None else "chosen"
        left.plot([best["n_subtypes"]], [best["cvic"]], "o", markersize=12, markerfacecolor="none",
                  markeredgecolor="C3", label=f"{label}: {int(best['n_subtypes'])} subtypes")
        left.legend(frameon=False, fontsize=8)
    left.set_xlabel("number of subtypes")
    left.set_ylabel("CVIC")
    left.set_title("Cross-validation information criterion", fontsize=10)

    mean, sd = summary["mean_test_loglik"].to_numpy(), summary["sd_test_loglik"].to_numpy()
    if np.isfinite(sd).any():
        right.fill_between(k, mean - sd, mean + sd, color="C0", alpha=0.2, linewidth=0, label="± 1 SD over folds")
    right.plot(k, mean, "o-", color="C0", label="mean over folds")
    if table is not None:
        right.scatter(table["n_subtypes"], table["test_loglik"], s=12, color="0.3", zorder=3, label="folds")
    right.set_xlabel("number of subtypes")
    right.set_ylabel("test log-likelihood")
    right.set_title("Out-of-sample log-likelihood", fontsize=10)
    right.legend(frameon=False, fontsize=8)
    for ax in (left, right):
        ax.set_xticks(k)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, save)


# ------------------------------------------------------------------ stages


def stage_figure(staged, n_stages=None, title=None, save=None) -> Figure:
    """Number of subjects per SuStaIn stage, stacked by subtype.

    Stage 0 (normal-appearing: no event yet) is drawn as one grey bar whatever the
    subject's most likely subtype, since a subtype means little before any event.

    Parameters
    ----------
    staged : pandas.DataFrame
        With columns ``ml_subtype`` (1..K) and ``ml_stage`` (0..N), e.g. from
        ``SustainModel.stage``.
    n_stages : int, optional
        Number of stages N + 1, to draw empty late stages too (default: up to the
        highest stage of a subject).
    title : str, optional
    save : str or path-like, optional
        PNG file to write.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        If a column is missing or holds values that are not whole numbers.
    """
    if not isinstance(staged, pd.DataFrame):
        raise ValueError(f"staged must be a DataFrame, got {type(staged).__name__}")
    columns = {}
    for column in ("ml_subtype", "ml_stage"):
        if column not in staged.columns:
            raise ValueError(f"staged lacks column {column!r}")
        values = pd.to_numeric(staged[column], errors="coerce").to_numpy(dtype=float)
        if np.any(~np.isfinite(values)) or np.any(values != np.round(values)) or np.any(values < 0):
            raise ValueError(f"staged[{column!r}] must hold whole numbers >= 0")
        columns[column] = values.astype(int)
    subtype, stage = columns["ml_subtype"], columns["ml_stage"]
    last = int(stage.max(initial=0)) if n_stages is None else int(n_stages) - 1
    if stage.max(initial=0) > last:
        raise ValueError(f"staged has stage {stage.max()} but n_stages is {n_stages}")
    stages = np.arange(last + 1)
    subtypes = np.unique(subtype[stage > 0]) if np.any(stage > 0) else np.array([], dtype=int)

    fig = Figure(figsize=(max(5.0, 0.25 * len(stages) + 2.5), 3.4))
    ax = fig.subplots()
    ax.bar([0], [np.sum(stage == 0)], color=_STAGE0_COLOR, label="stage 0 (normal-appearing)")
    bottom = np.zeros(len(stages) - 1)
    for s in subtypes:
        counts = np.array([np.sum((stage == k) & (subtype == s)) for k in stages[1:]])
        ax.bar(stages[1:], counts, bottom=bottom, color=f"C{(s - 1) % 10}", label=f"subtype {s}")
        bottom += counts
    ax.set_xlabel("SuStaIn stage")
    ax.set_ylabel("subjects")
    step = max(1, int(np.ceil(len(stages) / 20)))
    ax.set_xticks(stages[::step])
    ax.legend(frameon=False, fontsize=8)
    ax.set_title(title or f"{len(stage)} subjects, {np.sum(stage == 0)} at stage 0", fontsize=10)
    fig.tight_layout()
    return _finish(fig, save)
