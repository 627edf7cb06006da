"""Forecast evaluation: MSE, SSIM (cross-checked with scikit-image and MONAI), regional volume errors."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage
from skimage.metrics import structural_similarity

from neuroatrophy.progression_covariates import REGIONS
from neuroatrophy.progression_eval import evaluate_forecast, mae, mse, regional_volume_error, ssim

torch.set_num_threads(1)


@pytest.fixture
def brain(rng):
    """A smooth [0, 1] volume with structure at several scales."""
    image = ndimage.gaussian_filter(rng.random((26, 30, 22)), 1.2)
    return (image - image.min()) / (image.max() - image.min())


def test_mse_and_mae_known_values_and_mask(brain):
    shifted = brain + 0.1
    assert mse(shifted, brain) == pytest.approx(0.01)
    assert mae(shifted, brain) == pytest.approx(0.1)
    mask = np.zeros(brain.shape, bool)
    mask[:5] = True
    degraded = brain.copy()
    degraded[5:] += 0.5  # only outside the mask
    assert mse(degraded, brain, mask=mask) == 0.0
    assert mse(degraded, brain) == pytest.approx(0.25 * (~mask).mean())


def test_ssim_is_one_for_identical_images_and_drops_with_degradation(brain, rng):
    assert ssim(brain, brain) == pytest.approx(1.0, abs=1e-12)
    noisy = np.clip(brain + rng.normal(0, 0.05, brain.shape), 0, 1)
    blurred = ndimage.gaussian_filter(brain, 1.5)
    very_noisy = np.clip(brain + rng.normal(0, 0.2, brain.shape), 0, 1)
    s_noisy, s_very = ssim(noisy, brain), ssim(very_noisy, brain)
    assert 0.5 < s_noisy < 0.99
    assert s_very < s_noisy
    assert ssim(blurred, brain) < 0.99
    # symmetric in its arguments
    assert ssim(brain, noisy) == pytest.approx(s_noisy, abs=1e-12)


def test_ssim_matches_scikit_image_and_monai(brain, rng):
    from monai.metrics import SSIMMetric

    noisy = np.clip(brain + rng.normal(0, 0.05, brain.shape), 0, 1)
    ours = ssim(noisy, brain, data_range=1.0)
    reference = structural_similarity(noisy, brain, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
    assert ours == pytest.approx(reference, abs=1e-10)
    metric = SSIMMetric(spatial_dims=3, data_range=1.0, kernel_type="gaussian", win_size=11, kernel_sigma=1.5,
                        k1=0.01, k2=0.03)
    monai_value = float(metric(torch.tensor(noisy)[None, None], torch.tensor(brain)[None, None]).item())
    assert ours == pytest.approx(monai_value, abs=1e-5)


def test_masked_ssim_only_sees_the_mask(brain):
    degraded = brain.copy()
    degraded[:, :, 16:] = 0.0  # destroy one end
    mask = np.zeros(brain.shape, bool)
    mask[:, :, :8] = True  # far (> 5 voxels) from the destroyed part
    assert ssim(degraded, brain, mask=mask) == pytest.approx(1.0, abs=1e-12)
    assert ssim(degraded, brain) < 0.9


def test_mismatched_or_bad_inputs_are_named(brain):
    with pytest.raises(ValueError, match=r"predicted image shape \(26, 30, 20\) differs from follow-up image shape "
                                         r"\(26, 30, 22\)"):
        ssim(brain[..., :20], brain)
    with pytest.raises(ValueError, match=r"mask shape \(2, 2, 2\)"):
        mse(brain, brain, mask=np.ones((2, 2, 2), bool))
    bad = brain.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="predicted image holds 1 NaN"):
        mse(bad, brain)
    with pytest.raises(ValueError, match="too small"):
        ssim(brain[:8], brain[:8])


def test_regional_volume_error_table():
    observed = dict(zip(REGIONS, (500000.0, 8000.0, 3000.0, 450000.0, 30000.0)))
    predicted = pd.Series(dict(zip(REGIONS, (490000.0, 8400.0, 3000.0, 459000.0, 27000.0))))
    table = regional_volume_error(predicted, observed)
    assert list(table.columns[:5]) == ["region", "predicted", "observed", "abs_error_mm3", "pct_error"]
    assert list(table["region"]) == list(REGIONS)
    row = table.set_index("region")
    assert row.loc["cerebral_cortex", "abs_error_mm3"] == 10000.0
    assert row.loc["cerebral_cortex", "error_mm3"] == -10000.0
    assert row.loc["hippocampus", "pct_error"] == pytest.approx(5.0)
    assert row.loc["lateral_ventricle", "pct_error"] == pytest.approx(10.0)
    assert row.loc["amygdala", "pct_error"] == 0.0
    with pytest.raises(ValueError, match="share no region"):
        regional_volume_error({"a": 1.0}, {"b": 2.0})
    with pytest.raises(ValueError, match="true_volumes has no volume for hippocampus"):
        regional_volume_error(predicted, {"cerebral_cortex": 1.0}, regions=["cerebral_cortex", "hippocampus"])


def test_evaluate_forecast_combines_image_and_volume_errors(brain, rng):
    followup = brain
    forecast = np.clip(brain + rng.normal(0, 0.03, brain.shape), 0, 1)
    mask = brain > 0.3
    observed = dict(zip(REGIONS, (500000.0, 8000.0, 3000.0, 450000.0, 30000.0)))
    predicted = {**observed, "hippocampus": 7600.0, "lateral_ventricle": 33000.0}
    result = evaluate_forecast(forecast, followup, mask=mask, predicted_volumes=predicted, followup_volumes=observed)
    assert result["mse"] == pytest.approx(mse(forecast, followup, mask))
    assert result["ssim"] == pytest.approx(ssim(forecast, followup, mask))
    assert result["ssim"] < 1.0
    assert result["n_voxels"] == int(mask.sum())
    assert result["mean_abs_error_mm3"] == pytest.approx((400 + 3000) / 5)
    assert result["mean_pct_error"] == pytest.approx((5.0 + 10.0) / 5)
    perfect = evaluate_forecast(followup, followup)
    assert perfect["mse"] == 0.0 and perfect["ssim"] == pytest.approx(1.0) and "volume_errors" not in perfect
    with pytest.raises(ValueError, match="predicted_volumes was given without the other"):
        evaluate_forecast(forecast, followup, predicted_volumes=predicted)


# ------------------------------------------------------------------ figures (neuroatrophy.progression_plot)


def _gid(ax, gid):
    return [artist for artist in ax.get_children() if artist.get_gid() == gid]


def test_volume_trajectory_figure(tmp_path):
    from neuroatrophy.progression_plot import plot_volume_trajectories

    ages = [76.0, 72.0, 74.0]
    volumes = pd.DataFrame({"target_age": ages, "source": "dcm",
                            **{r: [1000.0 * (i + 1) + a for a in ages] for i, r in enumerate(REGIONS)}})
    visits = pd.DataFrame({"age": [70.0, 71.0], "hippocampus": [8000.0, np.nan], "lateral_ventricle": [3e4, 3.1e4]})
    out = tmp_path / "volumes.png"
    fig = plot_volume_trajectories(volumes, observed=visits, out_path=out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes][1] == "Hippocampus" and len(axes) == len(REGIONS)
    line = _gid(axes[1], "predicted")[0]
    np.testing.assert_allclose(line.get_xdata(), [72, 74, 76])  # sorted by age
    np.testing.assert_allclose(line.get_ydata(), [2072, 2074, 2076])
    assert "dcm" in line.get_label()
    points = _gid(axes[1], "observed")[0].get_offsets()
    np.testing.assert_allclose(points, [[70.0, 8000.0]])  # the missing visit is skipped
    assert len(_gid(axes[4], "observed")[0].get_offsets()) == 2 and not _gid(axes[0], "observed")
    by_index = volumes.drop(columns="target_age").set_index(pd.Index(ages, name="target_age"))
    fig = plot_volume_trajectories(by_index, regions=["amygdala"])
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 1
    with pytest.raises(ValueError, match="no region column"):
        plot_volume_trajectories(pd.DataFrame({"target_age": [70], "x": [1]}))
    with pytest.raises(ValueError, match="must end in .png"):
        plot_volume_trajectories(volumes, out_path=tmp_path / "v.pdf")


def test_uncertainty_figure(tmp_path):
    from neuroatrophy.progression_plot import plot_uncertainty

    out = tmp_path / "uncertainty.png"
    fig = plot_uncertainty([74, 72], [0.03, 0.02], out_path=out)
    assert out.stat().st_size > 1000
    line = _gid(fig.axes[0], "uncertainty")[0]
    np.testing.assert_allclose(line.get_xdata(), [72, 74])
    np.testing.assert_allclose(line.get_ydata(), [0.02, 0.03])
    with pytest.raises(ValueError, match="same, non-zero length"):
        plot_uncertainty([70, 72], [0.1])
