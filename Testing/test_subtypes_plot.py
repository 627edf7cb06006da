"""Figures of SuStaIn models: positional variance diagrams, cross-validation, stages."""

import numpy as np
import pandas as pd
import pytest
from matplotlib import colormaps

from neuroatrophy.subtypes_plot import (
    Z_LEVEL_COLORS,
    cv_figure,
    cv_summary,
    positional_variance_figure,
    positional_variance_image,
    stage_figure,
)
from neuroatrophy.sustain import CVResult, SustainModel, event_spec, mixture_spec

BIOMARKERS = ["Cortical GM", "Brainstem"]


def _model():
    """Two subtypes over events e0 = (Cortical GM, z 1), e1 = (Brainstem, z 1), e2 = (Cortical GM, z 2).

    Subtype 1: three of four MCMC samples say e0, e1, e2; one says e1, e0, e2.
    Subtype 2: all samples say e1, e0, e2.
    """
    spec = event_spec([[1, 2], [1]], [3.0, 2.0], BIOMARKERS)
    a, b = [0, 1, 2], [1, 0, 2]
    samples = np.array([[a, b], [a, b], [a, b], [b, b]])
    return SustainModel("zscore", spec, [a, b], [0.6, 0.4], -10.0, samples, np.tile([0.6, 0.4], (4, 1)), np.zeros(4))


def test_positional_variance_image_colours_each_level_by_its_certainty():
    image = positional_variance_image(_model(), 1)
    assert image.shape == (2, 3, 3)
    red, magenta = np.array(Z_LEVEL_COLORS[0]), np.array(Z_LEVEL_COLORS[1])
    white = np.ones(3)
    # Cortical GM: its z=1 event at position 1 in 3/4 samples, at 2 in 1/4; its z=2 event always at 3.
    np.testing.assert_allclose(image[0, 0], white - 0.75 * (1 - red))
    np.testing.assert_allclose(image[0, 1], white - 0.25 * (1 - red))
    np.testing.assert_allclose(image[0, 2], magenta)
    np.testing.assert_allclose(image[1], [white - 0.25 * (1 - red), white - 0.75 * (1 - red), white])
    np.testing.assert_allclose(positional_variance_image(_model(), 2)[1, 0], red)


def test_positional_variance_image_of_a_mixture_model_uses_one_colour_map():
    spec = mixture_spec(BIOMARKERS)
    samples = np.array([[[0, 1]], [[1, 0]]])
    model = SustainModel("mixture", spec, [[0, 1]], [1.0], 0.0, samples, np.ones((2, 1)), np.zeros(2))
    image = positional_variance_image(model, 1)
    np.testing.assert_allclose(image[0, 0], colormaps["Oranges"](0.5)[:3])


def test_positional_variance_figure_has_one_titled_panel_per_subtype(tmp_path):
    fig = positional_variance_figure(_model(), title="2 subtypes", save=tmp_path / "pvd.png")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["Subtype 1 (f = 0.60)", "Subtype 2 (f = 0.40)"]
    assert [t.get_text() for t in axes[0].get_yticklabels()] == BIOMARKERS
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["z = 1", "z = 2"]
    np.testing.assert_allclose(axes[0].images[0].get_array(), positional_variance_image(_model(), 1))
    assert (tmp_path / "pvd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pvd.png"]  # no temporary file left

    one = positional_variance_figure(_model(), subtype=2)
    assert [ax.get_title() for ax in one.axes] == ["Subtype 2 (f = 0.40)"]
    with pytest.raises(ValueError, match="subtype must be an integer from 1 to 2, got 3"):
        positional_variance_figure(_model(), subtype=3)
    with pytest.raises(ValueError, match="must end in .png"):
        positional_variance_figure(_model(), save=tmp_path / "pvd.pdf")


def _cv():
    table = pd.DataFrame({"n_subtypes": [1, 1, 2, 2, 3, 3], "fold": [1, 2] * 3,
                          "test_loglik": [-110.0, -100.0, -90.0, -96.0, -95.0, -97.0]})
    cvic = pd.Series({1: 420.0, 2: 370.0, 3: 380.0}, name="CVIC").rename_axis("n_subtypes")
    return CVResult(table, cvic, table.groupby("n_subtypes")["test_loglik"].mean())


def test_cv_summary_and_figure(tmp_path):
    summary = cv_summary(_cv())
    assert list(summary["n_subtypes"]) == [1, 2, 3]
    np.testing.assert_allclose(summary["cvic"], [420, 370, 380])
    np.testing.assert_allclose(summary["mean_test_loglik"], [-105, -93, -96])
    np.testing.assert_allclose(summary["sd_test_loglik"], [np.sqrt(50), np.sqrt(18), np.sqrt(2)])
    fig = cv_figure(_cv(), save=tmp_path / "cv.png")
    left, right = fig.axes
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["chosen: 2 subtypes"]
    # a third subtype that lowers CVIC by less than the tolerance is not the one marked
    close = _cv()
    close.cvic[3] = 365.0
    marked = cv_figure(close).axes[0].get_legend().get_texts()[0].get_text()
    assert close.lowest_cvic == 3 and marked == "chosen: 2 subtypes"
    np.testing.assert_allclose(right.collections[-1].get_offsets()[:, 1], _cv().table["test_loglik"])
    assert (tmp_path / "cv.png").is_file()


def test_cv_figure_of_a_reloaded_result_without_folds():
    cv = _cv()
    reloaded = CVResult(pd.DataFrame(), cv.cvic, cv.mean_test_loglik)
    summary = cv_summary(reloaded)
    np.testing.assert_allclose(summary["mean_test_loglik"], [-105, -93, -96])
    assert summary["sd_test_loglik"].isna().all()
    assert len(cv_figure(reloaded).axes) == 2


def test_stage_figure_stacks_subtypes_with_stage_zero_apart():
    staged = pd.DataFrame({"ml_subtype": [1, 2, 1, 1, 2, 2, 1], "ml_stage": [0, 0, 1, 3, 3, 3, 2]})
    fig = stage_figure(staged, n_stages=5)
    ax = fig.axes[0]
    bars = {label: [p.get_height() for p in container]
            for container, label in zip(ax.containers, [t.get_text() for t in ax.get_legend().get_texts()])}
    assert bars == {"stage 0 (normal-appearing)": [2], "subtype 1": [1, 1, 1, 0], "subtype 2": [0, 0, 2, 0]}
    assert ax.get_title() == "7 subjects, 2 at stage 0"
    with pytest.raises(ValueError, match="staged lacks column 'ml_stage'"):
        stage_figure(staged[["ml_subtype"]])
    with pytest.raises(ValueError, match="whole numbers"):
        stage_figure(staged.assign(ml_stage=0.5))
