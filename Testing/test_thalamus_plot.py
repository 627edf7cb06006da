"""Figures of thalamus segmentation evaluations."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from neuroatrophy.thalamus_eval import annualized_change, bland_altman, proportional_bias
from neuroatrophy.thalamus_plot import (
    annualized_change_figure,
    bland_altman_figure,
    bland_altman_grid,
    metrics_figure,
    save_bland_altman,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _line(ax, gid):
    lines = [line for line in ax.get_lines() if line.get_gid() == gid]
    assert len(lines) == 1, f"expected one line with gid {gid!r}"
    return lines[0]


def _assert_png(path, min_width=200):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        assert image.width >= min_width and image.height >= 200
    assert not list(path.parent.glob(".tmp-*")), "a temporary file was left behind"


def _volume_table(rng, n=30):
    reference = rng.normal(15000.0, 1500.0, n)
    values = {"deep": 1.1 * reference + 200 + rng.normal(0, 300, n), "atlas": np.full(n, 16500.0)}
    rows = []
    for method, measured in values.items():
        for i in range(n):
            for structure, share in (("both", 1.0), ("left", 0.5)):
                rows.append({"subject": f"s{i}", "method": method, "structure": structure,
                             "volume_pred_mm3": share * measured[i], "volume_ref_mm3": share * reference[i],
                             "dice": rng.uniform(0.7, 0.9), "sensitivity": rng.uniform(0.8, 1.0),
                             "precision": rng.uniform(0.6, 0.9), "hd95_mm": np.inf if i == 0 else 2.0,
                             "volume_diff_pct": 100 * (measured[i] - reference[i]) / reference[i]})
    return pd.DataFrame(rows), values, reference


def test_bland_altman_figure_draws_bias_limits_and_proportional_bias(rng, tmp_path):
    reference = rng.normal(15000.0, 1500.0, 40)
    measured = 1.1 * reference + 200 + rng.normal(0, 300, 40)
    path = tmp_path / "ba.png"
    fig = bland_altman_figure(measured, reference, label="deep", save=path)
    ba, pb = bland_altman(measured, reference), proportional_bias(measured, reference)
    (ax,) = fig.axes
    assert _line(ax, "bias").get_ydata()[0] == pytest.approx(ba.bias)
    assert _line(ax, "loa_low").get_ydata()[0] == pytest.approx(ba.loa_low)
    assert _line(ax, "loa_high").get_ydata()[0] == pytest.approx(ba.loa_high)
    x, y = _line(ax, "proportional_bias").get_data()
    np.testing.assert_allclose(x, [ba.means.min(), ba.means.max()])
    np.testing.assert_allclose(y, pb.intercept + pb.slope * np.asarray(x))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"slope {pb.slope:.3f}" in legend[-1] and "p = " in legend[-1]
    assert legend[0] == "subjects (n = 40)"
    np.testing.assert_allclose(ax.collections[-1].get_offsets(), np.column_stack([ba.means, ba.differences]))
    assert ax.get_title() == "deep" and "deep − reference" in ax.get_ylabel()
    _assert_png(path)


def test_bland_altman_figure_in_percent_draws_into_given_axes():
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    reference = np.array([100.0, 200.0, 300.0, 400.0])
    measured = np.array([110.0, 215.0, 330.0, 430.0])
    returned = bland_altman_figure(measured, reference, label="FIRST", percent=True, ax=ax, show_ci=False)
    assert returned is fig and fig.axes == [ax]
    ba = bland_altman(measured, reference, percent=True)
    assert _line(ax, "bias").get_ydata()[0] == pytest.approx(ba.bias)
    assert "% of mean" in ax.get_ylabel()
    assert not ax.patches  # no shaded intervals


def test_bland_altman_figure_with_two_pairs_has_no_regression_line():
    fig = bland_altman_figure([1.0, 2.0], [1.5, 2.5])
    assert not [line for line in fig.axes[0].get_lines() if line.get_gid() == "proportional_bias"]


def test_bland_altman_grid_has_one_panel_per_method(rng, tmp_path):
    table, values, reference = _volume_table(rng)
    path = save_bland_altman(tmp_path / "grid.png", table, methods=["atlas", "deep"])
    _assert_png(path, min_width=800)
    fig = bland_altman_grid(table, structure="left")
    assert [ax.get_title() for ax in fig.axes] == ["deep", "atlas"]
    deep = fig.axes[0]
    assert _line(deep, "bias").get_ydata()[0] == pytest.approx(bland_altman(0.5 * values["deep"], 0.5 * reference).bias)
    atlas_slope = proportional_bias(values["atlas"], reference).slope
    assert atlas_slope == pytest.approx(-2.0)
    assert f"slope {atlas_slope:.3f}" in fig.axes[1].get_legend().get_texts()[-1].get_text()
    assert fig._suptitle.get_text() == "Bland-Altman: left thalamus"


def test_bland_altman_grid_errors_name_the_column_method_or_structure(rng, tmp_path):
    table, _, _ = _volume_table(rng, n=5)
    with pytest.raises(ValueError, match="'volume_ref_mm3'"):
        bland_altman_grid(table.drop(columns="volume_ref_mm3"))
    with pytest.raises(ValueError, match="method\\(s\\) 'FreeSurfer'"):
        bland_altman_grid(table, methods=["deep", "FreeSurfer"])
    with pytest.raises(ValueError, match="structure == 'middle'"):
        bland_altman_grid(table, structure="middle")
    with pytest.raises(ValueError, match=r"\.png"):
        save_bland_altman(tmp_path / "grid.jpg", table)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_bland_altman(tmp_path / "missing" / "grid.png", table)


def test_metrics_figure_shows_each_metric_per_method(rng, tmp_path):
    table, _, _ = _volume_table(rng)
    path = tmp_path / "metrics.png"
    fig = metrics_figure(table, columns=("dice", "precision", "hd95_mm", "volume_diff_pct"), save=path)
    _assert_png(path, min_width=600)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Dice", "Precision", "HD95 (mm)", "Volume difference (%)"]
    dice_ax = fig.axes[0]
    assert [t.get_text() for t in dice_ax.get_xticklabels()] == ["deep", "atlas"]
    both = table[table["structure"] == "both"]
    deep_points = dice_ax.collections[0].get_offsets()[:, 1]
    np.testing.assert_allclose(deep_points, both.loc[both["method"] == "deep", "dice"])
    assert len(fig.axes[2].collections[0].get_offsets()) == 29  # the infinite HD95 is left out
    assert _line(fig.axes[3], "zero").get_ydata()[0] == 0.0
    with pytest.raises(ValueError, match="'hd99'"):
        metrics_figure(table, columns=["dice", "hd99"])


def test_annualized_change_figure_per_method(tmp_path):
    rows = [{"subject": s, "method": m, "time": t, "volume": 100.0 * (1 + rate * t)}
            for s in ("a", "b", "c") for m, rate in (("deep", -0.01), ("atlas", -0.02)) for t in (0.0, 1.0, 2.0)]
    change = annualized_change(pd.DataFrame(rows), method="method")
    path = tmp_path / "change.png"
    fig = annualized_change_figure(change, save=path)
    _assert_png(path)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["deep", "atlas"]
    np.testing.assert_allclose(ax.collections[1].get_offsets()[:, 1], [-2.0, -2.0, -2.0])
    single = annualized_change_figure(change[change["method"] == "deep"].drop(columns="method"))
    assert [t.get_text() for t in single.axes[0].get_xticklabels()] == ["all subjects"]
