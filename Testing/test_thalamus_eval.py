"""Evaluation of thalamus segmentations: metrics, agreement, longitudinal change, clinical association."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage, stats

from neuroatrophy.thalamus_eval import (
    METRIC_COLUMNS,
    agreement_table,
    annualized_change,
    bland_altman,
    clinical_association,
    evaluate_masks,
    hd95,
    overlap_metrics,
    proportional_bias,
)
from neuroatrophy.thalamus_labels import LEFT, RIGHT

torch.set_num_threads(1)


# ------------------------------------------------------------------ overlap metrics


def _box(shape, lo, hi):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def test_overlap_metrics_of_two_boxes_match_hand_computation():
    ref = _box((20, 20, 20), (2, 2, 2), (12, 12, 12))   # 10 x 10 x 10 = 1000 voxels
    pred = _box((20, 20, 20), (5, 2, 2), (13, 12, 12))  # 8 x 10 x 10 = 800 voxels, overlap 7 x 10 x 10
    spacing = (1.0, 0.5, 2.0)                             # 1 mm³ voxels
    m = overlap_metrics(pred, ref, spacing)
    assert m["dice"] == pytest.approx(2 * 700 / (800 + 1000))
    assert m["sensitivity"] == pytest.approx(700 / 1000)
    assert m["precision"] == pytest.approx(700 / 800)
    assert m["volume_pred_mm3"] == pytest.approx(800.0)
    assert m["volume_ref_mm3"] == pytest.approx(1000.0)
    assert m["volume_diff_mm3"] == pytest.approx(-200.0)
    assert m["volume_diff_pct"] == pytest.approx(-20.0)


@pytest.mark.parametrize("axis, spacing", [(0, (1.5, 1.0, 1.0)), (1, (1.0, 0.7, 3.0)), (2, (0.9, 1.1, 2.5))])
def test_hd95_of_shifted_cubes_is_the_shift_in_mm(axis, spacing):
    cube = _box((30, 30, 30), (8, 8, 8), (18, 18, 18))
    shifted = np.roll(cube, 2, axis=axis)
    expected = 2 * spacing[axis]
    assert hd95(shifted, cube, spacing) == pytest.approx(expected)
    assert overlap_metrics(cube, shifted, spacing)["hd95_mm"] == pytest.approx(expected)


def _blob(rng, shape, threshold):
    return ndimage.gaussian_filter(rng.random(shape), 2.5) > threshold


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notice
def test_hd95_agrees_with_monai_on_random_blobs(rng):
    from monai.metrics import compute_hausdorff_distance

    spacing = (1.2, 0.8, 2.0)
    for _ in range(3):
        pred, ref = _blob(rng, (28, 32, 24), 0.52), _blob(rng, (28, 32, 24), 0.52)
        assert pred.any() and ref.any()
        expected = compute_hausdorff_distance(torch.tensor(pred[None, None]), torch.tensor(ref[None, None]),
                                              include_background=True, percentile=95, spacing=spacing).item()
        assert hd95(pred, ref, spacing) == pytest.approx(expected, rel=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_hd95_with_a_mask_touching_the_array_border_agrees_with_monai(rng):
    from monai.metrics import compute_hausdorff_distance

    ref = _box((16, 16, 16), (0, 3, 3), (9, 12, 16))
    pred = ref ^ _blob(rng, ref.shape, 0.56)
    expected = compute_hausdorff_distance(torch.tensor(pred[None, None]), torch.tensor(ref[None, None]),
                                          include_background=True, percentile=95, spacing=(1, 2, 1)).item()
    assert hd95(pred, ref, (1, 2, 1)) == pytest.approx(expected, rel=1e-5)


def test_overlap_metrics_edge_cases_are_defined():
    empty = np.zeros((6, 6, 6), dtype=bool)
    cube = _box((6, 6, 6), (1, 1, 1), (4, 4, 4))
    both_empty = overlap_metrics(empty, empty)
    assert both_empty["dice"] == 1.0 and both_empty["hd95_mm"] == 0.0
    missed = overlap_metrics(empty, cube)
    assert missed["dice"] == 0.0 and missed["sensitivity"] == 0.0 and np.isnan(missed["precision"])
    assert missed["hd95_mm"] == np.inf and missed["volume_diff_pct"] == -100.0
    spurious = overlap_metrics(cube, empty)
    assert spurious["hd95_mm"] == np.inf and np.isnan(spurious["sensitivity"]) and np.isnan(spurious["volume_diff_pct"])
    identical = overlap_metrics(cube, cube)
    assert identical["dice"] == 1.0 and identical["hd95_mm"] == 0.0


def test_overlap_metrics_reject_bad_input():
    cube = _box((6, 6, 6), (1, 1, 1), (4, 4, 4))
    with pytest.raises(ValueError, match="same shape"):
        overlap_metrics(cube, cube[:5])
    with pytest.raises(ValueError, match="spacing"):
        overlap_metrics(cube, cube, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="pred must be a boolean"):
        overlap_metrics(cube * 10, cube)


# ------------------------------------------------------------------ evaluate_masks


def _labels(shift=0, shape=(24, 20, 16)):
    data = np.zeros(shape, dtype=np.int16)
    data[2 + shift:10 + shift, 4:14, 4:12] = LEFT
    data[13:21, 4:14, 4:12] = RIGHT
    return data


def test_evaluate_masks_reports_each_method_and_structure(tmp_path):
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    reference = nib.Nifti1Image(_labels(), affine)
    ref_path = tmp_path / "manual.nii.gz"
    nib.save(reference, ref_path)
    predictions = {"shifted": nib.Nifti1Image(_labels(shift=1), affine), "perfect": reference}
    table = evaluate_masks(predictions, ref_path, subject="sub-01")
    assert list(table.columns) == list(METRIC_COLUMNS)
    assert len(table) == 6
    shifted = table[table["method"] == "shifted"].set_index("structure")
    # left: 8 rows along x, shifted by one -> overlap 7/8; right unchanged
    assert shifted.loc["left", "dice"] == pytest.approx(7 / 8)
    assert shifted.loc["left", "hd95_mm"] == pytest.approx(1.5)
    assert shifted.loc["right", "dice"] == 1.0
    voxels_left, voxels_both = 8 * 10 * 8, 2 * 8 * 10 * 8
    assert shifted.loc["both", "dice"] == pytest.approx((2 * (7 * 80 + 8 * 80)) / (2 * voxels_both))
    assert shifted.loc["left", "volume_ref_mm3"] == pytest.approx(voxels_left * 3.0)
    assert (table["subject"] == "sub-01").all()
    assert (table[table["method"] == "perfect"]["dice"] == 1.0).all()


def test_evaluate_masks_rejects_a_reference_of_a_different_grid(tmp_path):
    reference = nib.Nifti1Image(_labels(), np.eye(4))
    ref_path = tmp_path / "manual.nii.gz"
    nib.save(reference, ref_path)
    other_shape = nib.Nifti1Image(_labels(shape=(24, 20, 18)), np.eye(4))
    with pytest.raises(ValueError, match=r"method 'FreeSurfer'.*reference mask \(.*manual\.nii\.gz\)"):
        evaluate_masks({"FreeSurfer": other_shape}, ref_path)
    moved = nib.Nifti1Image(_labels(), np.diag([1.0, 1.0, 1.2, 1.0]))
    with pytest.raises(ValueError, match=r"method 'FIRST'.*reference mask.*affine"):
        evaluate_masks({"FIRST": moved}, reference)
    with pytest.raises(ValueError, match="non-empty dict"):
        evaluate_masks({}, reference)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        evaluate_masks({"A": reference}, tmp_path / "missing.nii.gz")


# ------------------------------------------------------------------ Bland-Altman and proportional bias

N_SUBJECTS = 500
REF_MEAN, REF_SD = 15000.0, 1500.0


def _simulated(rng, scale, offset, noise_sd):
    reference = rng.normal(REF_MEAN, REF_SD, N_SUBJECTS)
    measured = scale * reference + offset + rng.normal(0.0, noise_sd, N_SUBJECTS)
    return measured, reference


def test_bland_altman_recovers_bias_and_limits_of_a_simulated_method(rng):
    scale, offset, noise_sd = 1.1, 200.0, 300.0
    measured, reference = _simulated(rng, scale, offset, noise_sd)
    ba = bland_altman(measured, reference)
    # d = 0.1 r + 200 + e: mean 0.1 * 15000 + 200, SD sqrt(0.1² 1500² + 300²)
    true_bias = (scale - 1) * REF_MEAN + offset
    true_sd = np.hypot((scale - 1) * REF_SD, noise_sd)
    assert ba.n == N_SUBJECTS
    assert ba.bias_ci[0] < true_bias < ba.bias_ci[1]
    assert ba.bias == pytest.approx(true_bias, rel=0.03)
    assert ba.sd == pytest.approx(true_sd, rel=0.1)
    assert ba.loa_low == pytest.approx(ba.bias - 1.96 * ba.sd, rel=1e-3)
    assert ba.loa_ci[0][0] < true_bias - 1.96 * true_sd < ba.loa_ci[0][1]
    assert ba.loa_ci[1][0] < true_bias + 1.96 * true_sd < ba.loa_ci[1][1]
    np.testing.assert_allclose(ba.differences, measured - reference)
    np.testing.assert_allclose(ba.means, (measured + reference) / 2)


def test_bland_altman_confidence_intervals_follow_their_formulas():
    measured, reference = np.array([10.0, 12.0, 15.0, 11.0]), np.array([9.0, 12.5, 13.0, 10.0])
    d = measured - reference
    ba = bland_altman(measured, reference)
    t = stats.t.ppf(0.975, 3)
    assert ba.bias_ci == pytest.approx((d.mean() - t * d.std(ddof=1) / 2, d.mean() + t * d.std(ddof=1) / 2))
    half = t * np.sqrt(3 * d.var(ddof=1) / 4)
    assert ba.loa_ci[1] == pytest.approx((ba.loa_high - half, ba.loa_high + half))


def test_bland_altman_in_percent_of_the_mean():
    ba = bland_altman([110.0, 220.0, 330.0], [90.0, 180.0, 270.0], percent=True)
    assert ba.percent
    np.testing.assert_allclose(ba.differences, 20.0)  # (110 - 90) / 100 = 20 % for every pair
    assert ba.bias == pytest.approx(20.0) and ba.sd == pytest.approx(0.0)


def test_proportional_bias_recovers_the_slope_of_a_simulated_method(rng):
    scale, offset, noise_sd = 1.1, 200.0, 300.0
    measured, reference = _simulated(rng, scale, offset, noise_sd)
    pb = proportional_bias(measured, reference)
    # d = (s - 1) r + o + e and m = (s + 1)/2 r + o/2 + e/2: slope = cov(d, m) / var(m); without noise
    # it is 0.1 / 1.05, the noise adds var(e)/2 to the covariance and var(e)/4 to var(m).
    var_r, var_e = REF_SD**2, noise_sd**2
    true_slope = ((scale - 1) * (scale + 1) / 2 * var_r + var_e / 2) / (((scale + 1) / 2) ** 2 * var_r + var_e / 4)
    assert pb.slope_ci[0] < true_slope < pb.slope_ci[1]
    assert pb.slope == pytest.approx(true_slope, abs=0.02)
    assert pb.p_value < 1e-6 and pb.n == N_SUBJECTS and pb.r > 0


def test_proportional_bias_of_a_noise_free_scaled_method_is_exact():
    reference = np.linspace(12000.0, 18000.0, 25)
    pb = proportional_bias(1.1 * reference + 200.0, reference)
    assert pb.slope == pytest.approx(0.1 / 1.05)
    assert pb.intercept == pytest.approx(200.0 - 0.1 / 1.05 * 100.0)


def test_constant_predictor_has_proportional_bias_slope_minus_two(rng):
    reference = rng.normal(REF_MEAN, REF_SD, 50)
    pb = proportional_bias(np.full(50, 16000.0), reference)
    assert pb.slope == pytest.approx(-2.0)
    assert pb.slope_ci[0] == pytest.approx(-2.0) and pb.r == pytest.approx(-1.0)


def test_unbiased_method_shows_no_significant_proportional_bias(rng):
    measured, reference = _simulated(rng, 1.0, 0.0, 100.0)
    pb = proportional_bias(measured, reference)
    assert pb.p_value > 0.05
    assert pb.slope_ci[0] < 0.0 < pb.slope_ci[1]
    ba = bland_altman(measured, reference)
    assert ba.bias_ci[0] < 0.0 < ba.bias_ci[1]


def test_agreement_statistics_reject_bad_input():
    with pytest.raises(ValueError, match="same length"):
        bland_altman([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="reference holds 1 NaN"):
        bland_altman([1.0, 2.0, 3.0], [1.0, np.nan, 3.0])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        bland_altman([1.0], [1.0])
    with pytest.raises(ValueError, match="at least 3 pairs"):
        proportional_bias([1.0, 2.0], [1.5, 2.0])
    with pytest.raises(ValueError, match="same mean"):
        proportional_bias([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])


# ------------------------------------------------------------------ agreement_table


def _cohort_metrics(rng, n=40):
    reference = rng.normal(REF_MEAN, REF_SD, n)
    methods = {
        "atlas": np.full(n, 16500.0),
        "deep": 1.1 * reference + 200 + rng.normal(0, 300, n),
    }
    rows = []
    for method, measured in methods.items():
        for i in range(n):
            rows.append({"subject": f"sub-{i:02d}", "method": method, "structure": "both",
                         "dice": rng.uniform(0.7, 0.9), "sensitivity": 0.8, "precision": 0.9,
                         "hd95_mm": float(i), "volume_pred_mm3": measured[i], "volume_ref_mm3": reference[i]})
    return pd.DataFrame(rows), methods, reference


def test_agreement_table_summarises_each_method(rng):
    metrics, methods, reference = _cohort_metrics(rng)
    table = agreement_table(metrics).set_index("method")
    assert list(table.index) == ["atlas", "deep"]
    assert (table["n"] == 40).all() and (table["structure"] == "both").all()
    assert table.loc["atlas", "prop_slope"] == pytest.approx(-2.0)
    for method, measured in methods.items():
        ba, pb = bland_altman(measured, reference), proportional_bias(measured, reference)
        row = table.loc[method]
        assert row["bias"] == pytest.approx(ba.bias) and row["loa_high"] == pytest.approx(ba.loa_high)
        assert row["prop_slope"] == pytest.approx(pb.slope) and row["prop_p"] == pytest.approx(pb.p_value)
        assert row["prop_slope_ci_low"] == pytest.approx(pb.slope_ci[0])
        assert row["bias_pct_of_mean"] == pytest.approx(100 * ba.bias / ba.means.mean())
        group = metrics[metrics["method"] == method]
        assert row["dice_mean"] == pytest.approx(group["dice"].mean())
        assert row["dice_sd"] == pytest.approx(group["dice"].std())
        assert row["hd95_median"] == pytest.approx(19.5)


def test_agreement_table_names_missing_columns(rng):
    metrics, _, _ = _cohort_metrics(rng, n=5)
    with pytest.raises(ValueError, match="'volume_ref_mm3'"):
        agreement_table(metrics.drop(columns="volume_ref_mm3"))
    with pytest.raises(ValueError, match="'site'"):
        agreement_table(metrics, by=("method", "site"))


def test_agreement_table_leaves_statistics_of_tiny_groups_undefined(rng):
    metrics, _, _ = _cohort_metrics(rng, n=2)
    table = agreement_table(metrics)
    assert np.isfinite(table["bias"]).all() and table["prop_slope"].isna().all()


# ------------------------------------------------------------------ annualised change


def _longitudinal(rng, years_per_subject, rate=-0.01):
    rows = []
    for i, years in enumerate(years_per_subject):
        baseline = rng.normal(REF_MEAN, REF_SD)
        for t in years:
            rows.append({"subject": f"sub-{i}", "time": t, "volume": baseline * (1 + rate * t)})
    return pd.DataFrame(rows)


def test_annualized_change_recovers_planted_atrophy_from_two_and_more_timepoints(rng):
    table = _longitudinal(rng, [(0.0, 1.0), (0.0, 2.5), (0.5, 1.2, 3.1), (0.0, 1.0, 2.0, 3.0)])
    change = annualized_change(table)
    assert list(change.columns) == ["subject", "n_timepoints", "years", "baseline_volume", "pct_per_year"]
    # the first timepoint of sub-2 is at 0.5 y: relative to it, the loss is 1 % of V(0) per year
    baseline_02 = table["volume"].iloc[4] / (1 - 0.01 * 0.5)
    expected = [-1.0, -1.0, -100 * 0.01 * baseline_02 / table["volume"].iloc[4], -1.0]
    np.testing.assert_allclose(change["pct_per_year"], expected)
    assert change["n_timepoints"].tolist() == [2, 2, 3, 4]
    np.testing.assert_allclose(change["years"], [1.0, 2.5, 2.6, 3.0])
    two = table[table["subject"] == "sub-0"]["volume"].to_numpy()
    assert change["pct_per_year"].iloc[0] == pytest.approx(100 * (two[1] - two[0]) / two[0] / 1.0)


def test_annualized_change_of_three_noisy_timepoints_is_the_regression_slope():
    table = pd.DataFrame({"subject": "a", "time": [0.0, 1.0, 2.0], "volume": [100.0, 97.0, 98.0]})
    slope, intercept = np.polyfit([0.0, 1.0, 2.0], [100.0, 97.0, 98.0], 1)
    change = annualized_change(table)
    assert change["pct_per_year"].iloc[0] == pytest.approx(100 * slope / intercept)
    assert change["baseline_volume"].iloc[0] == pytest.approx(intercept)


def test_annualized_change_reads_dates_and_methods():
    dates = ["2020-01-01", "2021-01-01", "2022-07-02"]
    days = (pd.to_datetime(dates) - pd.Timestamp("2020-01-01")).days.to_numpy()
    years = days / 365.25
    rows = []
    for method, rate in (("deep", -0.01), ("atlas", -0.02)):
        for date, t in zip(dates, years):
            rows.append({"id": "sub-1", "scan_date": date, "method": method, "vol": 15000 * (1 + rate * t)})
    table = pd.DataFrame(rows)
    change = annualized_change(table, subject="id", time="scan_date", volume="vol", method="method")
    assert list(change.columns) == ["subject", "method", "n_timepoints", "years", "baseline_volume", "pct_per_year"]
    np.testing.assert_allclose(change.set_index("method").loc[["deep", "atlas"], "pct_per_year"], [-1.0, -2.0])
    assert change["years"].iloc[0] == pytest.approx(years[-1])
    as_datetimes = table.assign(scan_date=pd.to_datetime(table["scan_date"]))
    again = annualized_change(as_datetimes, subject="id", time="scan_date", volume="vol", method="method")
    np.testing.assert_allclose(again["pct_per_year"], change["pct_per_year"])


def test_annualized_change_errors_name_the_subject_or_column():
    good = pd.DataFrame({"subject": ["a", "a", "b", "b"], "time": [0.0, 1.0, 0.0, 1.0],
                         "volume": [10.0, 9.0, 10.0, 9.5]})
    with pytest.raises(ValueError, match="subject 'b' has a single timepoint"):
        annualized_change(good.iloc[:3])
    with pytest.raises(ValueError, match="subject 'a' has two or more rows at the same time"):
        annualized_change(good.assign(time=[0.0, 0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="subject 'b' has a non-positive volume"):
        annualized_change(good.assign(volume=[10.0, 9.0, 0.0, 9.0]))
    with pytest.raises(ValueError, match=r"column 'volume' has 1 missing.*subject 'a'"):
        annualized_change(good.assign(volume=[10.0, np.nan, 10.0, 9.0]))
    with pytest.raises(ValueError, match="column 'time' has 1 missing"):
        annualized_change(good.assign(time=[0.0, 1.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match="'visit'"):
        annualized_change(good, time="visit")
    with pytest.raises(ValueError, match="column 'time' must hold times in years or dates"):
        annualized_change(good.assign(time=["baseline", "year 1", "baseline", "year 1"]))


# ------------------------------------------------------------------ clinical association


def _clinical_cohort(rng, n=400, beta=0.4):
    """Volume with a planted standardised effect of the score (population SDs of both are 1 before scaling)."""
    score = rng.normal(0.0, 1.0, n)
    age = rng.normal(0.0, 1.0, n)
    male = rng.random(n) < 0.5
    icv = rng.normal(0.0, 1.0, n)
    signal = beta * score + 0.3 * age + 0.4 * male + 0.5 * icv
    noise_sd = np.sqrt(1.0 - (beta**2 + 0.3**2 + 0.4**2 * 0.25 + 0.5**2))
    volume = signal + rng.normal(0.0, noise_sd, n)
    return pd.DataFrame({
        "edss": 3.0 + 1.5 * score, "age": 45.0 + 10.0 * age, "sex": np.where(male, "M", "F"),
        "icv": 1.5e6 + 1.5e5 * icv, "vol_deep": 15000.0 + 1500.0 * volume,
        "vol_atlas": 16000.0 + 1000.0 * rng.normal(size=n),  # unrelated to the score
    })


def test_clinical_association_recovers_a_planted_standardised_effect(rng):
    table = _clinical_cohort(rng)
    result = clinical_association(table, "edss", {"deep": "vol_deep", "atlas": "vol_atlas"}).set_index("label")
    deep, atlas = result.loc["deep"], result.loc["atlas"]
    assert deep["n"] == 400 and deep["outcome"] == "vol_deep" and deep["predictor"] == "edss"
    assert deep["ci_low"] < 0.4 < deep["ci_high"]
    assert deep["beta_std"] == pytest.approx(0.4, abs=0.08)
    assert deep["p_value"] < 1e-10 and atlas["p_value"] > 0.01
    assert atlas["ci_low"] < 0.0 < atlas["ci_high"]


def test_clinical_association_matches_a_direct_least_squares_fit(rng):
    table = _clinical_cohort(rng, n=120)
    table.loc[3, "age"] = np.nan  # incomplete rows are dropped
    data = table.dropna()

    def z(x):
        return (x - x.mean()) / x.std(ddof=1)

    for outcome, (y, x) in {"volume": (z(data["vol_deep"]), z(data["edss"])),
                            "score": (z(data["edss"]), z(data["vol_deep"]))}.items():
        design = np.column_stack([x, np.ones(len(data)), data["age"], data["icv"] / 1e6,
                                  (data["sex"] == "M").astype(float)])
        coef, rss, _, _ = np.linalg.lstsq(design, y.to_numpy(), rcond=None)
        df = len(data) - design.shape[1]
        se = np.sqrt(rss[0] / df * np.linalg.inv(design.T @ design)[0, 0])
        row = clinical_association(table, "edss", ["vol_deep"], outcome=outcome).iloc[0]
        assert row["n"] == 119 and row["label"] == "vol_deep"
        assert row["beta_std"] == pytest.approx(coef[0])
        assert row["se"] == pytest.approx(se)
        assert row["t"] == pytest.approx(coef[0] / se)
        assert row["p_value"] == pytest.approx(2 * stats.t.sf(abs(coef[0] / se), df))
        assert row["r2"] == pytest.approx(1 - rss[0] / ((y - y.mean()) ** 2).sum())
    both = pd.concat([clinical_association(table, "edss", ["vol_deep"], outcome=o) for o in ("volume", "score")])
    # the test of the association does not depend on the direction of the regression
    assert both["t"].iloc[0] == pytest.approx(both["t"].iloc[1])
    assert both["partial_r"].iloc[0] == pytest.approx(both["partial_r"].iloc[1])


def test_clinical_association_without_covariates_is_the_correlation(rng):
    table = _clinical_cohort(rng, n=60)
    row = clinical_association(table, "edss", ["vol_deep"], covariates=()).iloc[0]
    r, p = stats.pearsonr(table["edss"], table["vol_deep"])
    assert row["beta_std"] == pytest.approx(r) and row["p_value"] == pytest.approx(p)
    assert row["partial_r"] == pytest.approx(r) and row["r2"] == pytest.approx(r**2)


def test_clinical_association_errors_name_the_column(rng):
    table = _clinical_cohort(rng, n=30)
    with pytest.raises(ValueError, match="'icv'"):
        clinical_association(table.drop(columns="icv"), "edss", ["vol_deep"])
    with pytest.raises(ValueError, match="column 'vol_deep': 2 complete rows"):
        clinical_association(table.assign(vol_deep=[1.0, 2.0] + [np.nan] * 28), "edss", ["vol_deep"],
                             covariates=())
    with pytest.raises(ValueError, match="column 'vol_atlas' is constant"):
        clinical_association(table.assign(vol_atlas=5.0), "edss", ["vol_deep", "vol_atlas"])
    with pytest.raises(ValueError, match="covariate column 'sex' has a single level"):
        clinical_association(table.assign(sex="F"), "edss", ["vol_deep"])
    with pytest.raises(ValueError, match="column 'edss' must be numeric"):
        clinical_association(table.assign(edss="mild"), "edss", ["vol_deep"])
    with pytest.raises(ValueError, match="outcome must be"):
        clinical_association(table, "edss", ["vol_deep"], outcome="both")
