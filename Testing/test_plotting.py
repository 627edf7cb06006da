"""Figures: valid PNGs of sensible size, that change with the data, drawn without pyplot."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from neuroatrophy.plotting import (
    plot_calibration,
    plot_centile_curves,
    plot_group_overlap,
    plot_regional_bars,
    plot_surface_map,
)
from neuroatrophy.surface import DK_NAMES, dk_atlas

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_png(path, min_size=(300, 400)):
    """Pixels of a PNG file, after checking that it is one of at least ``min_size`` (rows, columns)."""
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = imread(path)
    assert pixels.shape[0] >= min_size[0] and pixels.shape[1] >= min_size[1]
    # Not a blank page: a real figure has many distinct colours.
    rgba = np.round(pixels * 255).astype(np.uint8).reshape(-1, pixels.shape[-1])
    assert len(np.unique(rgba.view(f"V{rgba.shape[1]}"))) > 20
    return pixels


def no_temporary_files(folder):
    return not [p for p in folder.iterdir() if p.name.startswith(".tmp")]


@pytest.fixture(scope="module")
def atrophic_z():
    """A z map: noise everywhere, -3 in the left superior temporal gyrus, NaN on the medial wall."""
    atlas = dk_atlas()
    z = np.random.default_rng(0).standard_normal(len(atlas.labels)) * 0.8
    z[atlas.region_mask("L_superiortemporal")] -= 3.0
    z[atlas.medial_wall] = np.nan
    return z


@pytest.fixture
def curves():
    age = np.linspace(18, 75, 50)
    median = 2.9 - 0.01 * (age - 18)
    offsets = {"p5": -0.33, "p25": -0.13, "p50": 0.0, "p75": 0.13, "p95": 0.33}
    return pd.DataFrame({"age": age, **{k: median + v for k, v in offsets.items()}})


@pytest.fixture
def regions():
    rng = np.random.default_rng(1)
    return pd.DataFrame({
        "region": list(DK_NAMES),
        "mean_z": rng.normal(-0.3, 1.0, 68),
        "fraction_atrophic": rng.uniform(0, 1, 68),
    })


def test_surface_map_png_changes_with_data_and_threshold(fsaverage5, atrophic_z, tmp_path):
    path = plot_surface_map(fsaverage5, atrophic_z, tmp_path / "z.png", threshold=-1.96, title="z")
    assert path == tmp_path / "z.png"
    first = read_png(path, min_size=(600, 900))
    again = read_png(plot_surface_map(fsaverage5, atrophic_z, tmp_path / "again.png", threshold=-1.96, title="z"))
    np.testing.assert_array_equal(first, again)  # deterministic
    other = atrophic_z.copy()
    other[dk_atlas().region_mask("L_superiortemporal")] += 3.0
    other[dk_atlas().region_mask("R_precuneus")] -= 3.0
    moved = read_png(plot_surface_map(fsaverage5, other, tmp_path / "moved.png", threshold=-1.96, title="z"))
    assert np.mean(np.any(first != moved, axis=-1)) > 0.005

    # Values not beyond the threshold are drawn like missing data: the grey cortex.
    zeros = read_png(plot_surface_map(fsaverage5, np.zeros_like(atrophic_z), tmp_path / "zeros.png", threshold=-1.96))
    missing = read_png(plot_surface_map(fsaverage5, np.full_like(atrophic_z, np.nan), tmp_path / "nan.png",
                                        threshold=-1.96))
    np.testing.assert_array_equal(zeros, missing)
    assert no_temporary_files(tmp_path)


def test_surface_map_rejects_bad_input(fsaverage5, tmp_path):
    with pytest.raises(ValueError, match=r"values must have shape \(20484,\)"):
        plot_surface_map(fsaverage5, np.zeros(10242), tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"\.png"):
        plot_surface_map(fsaverage5, np.zeros(20484), tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="vmin"):
        plot_surface_map(fsaverage5, np.zeros(20484), tmp_path / "a.png", vmin=1, vmax=1)
    with pytest.raises(ValueError, match="background"):
        plot_surface_map(fsaverage5, np.zeros(20484), tmp_path / "a.png", background="curvature")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_surface_map(fsaverage5, np.zeros(20484), tmp_path / "missing" / "a.png")
    assert not list(tmp_path.iterdir())


def test_group_overlap(fsaverage5, atrophic_z, tmp_path):
    fraction = np.clip(-atrophic_z / 4, 0, 1)
    first = read_png(plot_group_overlap(fraction, fsaverage5, tmp_path / "overlap.png"))
    second = read_png(plot_group_overlap(fraction[::-1], fsaverage5, tmp_path / "overlap2.png"))
    assert np.any(first != second)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plot_group_overlap(fraction * 3, fsaverage5, tmp_path / "bad.png")


def test_centile_curves(curves, tmp_path):
    plain = read_png(plot_centile_curves(curves, tmp_path / "curves.png", title="L_superiortemporal"))
    patient = read_png(plot_centile_curves(curves, tmp_path / "patient.png", patient_age=40, patient_value=2.1,
                                           title="L_superiortemporal"))
    assert plain.shape == patient.shape and np.any(plain != patient)
    with pytest.raises(ValueError, match="p<centile>"):
        plot_centile_curves(curves[["age"]], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="'age'"):
        plot_centile_curves(curves.drop(columns="age"), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="both"):
        plot_centile_curves(curves, tmp_path / "bad.png", patient_age=40)


def test_calibration(tmp_path):
    rng = np.random.default_rng(2)
    calibrated = read_png(plot_calibration(rng.standard_normal((50, 2000)), tmp_path / "good.png"))
    too_wide = read_png(plot_calibration(1.5 * rng.standard_normal((50, 2000)), tmp_path / "wide.png"))
    assert calibrated.shape == too_wide.shape and np.mean(np.any(calibrated != too_wide, axis=-1)) > 0.01
    with_nan = rng.standard_normal(1000)
    with_nan[:10] = np.nan
    read_png(plot_calibration(with_nan, tmp_path / "nan.png"))
    with pytest.raises(ValueError, match="at least 2 finite"):
        plot_calibration([np.nan, 1.0], tmp_path / "bad.png")


def test_regional_bars(regions, tmp_path):
    top = read_png(plot_regional_bars(regions, tmp_path / "top.png", top=15))
    changed = regions.assign(mean_z=regions["mean_z"][::-1].to_numpy())
    other = read_png(plot_regional_bars(changed, tmp_path / "other.png", top=15))
    assert top.shape == other.shape and np.any(top != other)
    fewer = read_png(plot_regional_bars(regions, tmp_path / "fewer.png", top=5), min_size=(150, 400))
    assert fewer.shape[0] < top.shape[0]  # the figure height follows the number of bars
    with pytest.raises(ValueError, match="no column 'regional_z'"):
        plot_regional_bars(regions, tmp_path / "bad.png", column="regional_z")
    with pytest.raises(ValueError, match="top"):
        plot_regional_bars(regions, tmp_path / "bad.png", top=0)


def test_plotting_leaves_pyplot_alone(tmp_path):
    """Drawing works without importing pyplot (safe inside Slicer): checked in a fresh interpreter."""
    code = (
        "import sys, numpy as np, pandas as pd\n"
        "from neuroatrophy.plotting import plot_calibration\n"
        f"plot_calibration(np.random.default_rng(0).standard_normal(500), {str(tmp_path / 'c.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    read_png(tmp_path / "c.png")
