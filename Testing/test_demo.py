"""Synthetic demo cohort: generator, ground-truth recovery, writing and the end-to-end demo."""

import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neuroatrophy import mrml
from neuroatrophy.atrophy import detection_rates
from neuroatrophy.cohort import read_cohort
from neuroatrophy.demo import (
    _demo_scene,
    enigma_schizophrenia_d,
    make_demo_cohort,
    normative_mean,
    read_ground_truth,
    run_demo,
    write_demo_cohort,
)
from neuroatrophy.io import load_cohort_surface_data, read_surface_data
from neuroatrophy.normative import NormativeModel
from neuroatrophy.surface import DK_NAMES, dk_atlas, load_fsaverage5
from neuroatrophy.thickness_model import CorticalThicknessModel

N_VERTICES = 20484


@pytest.fixture(scope="module")
def cohort():
    return make_demo_cohort(n_controls=200, n_patients=20, n_sites=4, seed=0)


@pytest.fixture(scope="module")
def split(cohort):
    """Training and held-out controls (every fourth control held out), and the patients."""
    controls = np.flatnonzero(~cohort.is_patient)
    held_out = controls[3::4]
    train = np.setdiff1d(controls, held_out)
    return train, held_out, np.flatnonzero(cohort.is_patient)


@pytest.fixture(scope="module")
def fitted(cohort, split):
    train, _, _ = split
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few held-out ages lie outside the training range
        return NormativeModel().fit(cohort.thickness[train], cohort.covariates.iloc[train])


# ------------------------------------------------------------------ the generator
def test_cohort_shapes_covariates_and_valid_thickness(cohort):
    cov = cohort.covariates
    assert list(cov.columns[:5]) == ["subject_id", "age", "sex", "site", "group"]
    assert (cov["group"] == "control").sum() == 200 and cohort.n_patients == 20
    assert cov["subject_id"].is_unique
    assert cohort.thickness.shape == cohort.true_mean.shape == cohort.true_sd.shape == (220, N_VERTICES)
    assert cohort.true_atrophy.shape == cohort.true_effect.shape == (20, N_VERTICES)
    assert cohort.true_atrophy.dtype == bool
    assert cov["age"].between(18, 75).all()
    assert 35 < cov["age"].mean() < 50 and cov["age"].std() > 8
    for group in ("control", "patient"):
        sexes = cov.loc[cov["group"] == group, "sex"].value_counts()
        assert sexes["F"] == sexes["M"]
    # Unbalanced sites in proportion 4:3:2:1 for both groups.
    assert cov.loc[cov["group"] == "control", "site"].value_counts().sort_index().tolist() == [80, 60, 40, 20]
    assert cov.loc[cov["group"] == "patient", "site"].value_counts().sort_index().tolist() == [8, 6, 4, 2]
    assert cov.loc[cov["group"] == "control", "panss_change"].isna().all()
    assert cov.loc[cov["group"] == "patient", "panss_change"].notna().all()

    assert np.isfinite(cohort.thickness).all() and cohort.thickness.min() > 0
    medial = cohort.params["medial_wall"]
    assert abs(cohort.thickness[:, medial].mean() - 0.5) < 0.01
    assert cohort.thickness[:, ~medial].mean() == pytest.approx(2.45, abs=0.2)
    assert not cohort.true_atrophy[:, medial].any()
    assert (cohort.true_effect >= 0).all() and (cohort.true_effect[:, medial] == 0).all()
    assert cohort.params["fraction_floored"] < 1e-4


def test_ground_truth_parameters_are_realistic(cohort):
    p = cohort.params
    cortex = ~p["medial_wall"]
    slope = -p["age_slope_mm"][cortex]  # mm of thinning per year in adulthood
    assert 0.008 < np.median(slope) < 0.03 and slope.min() > 0
    assert np.all(-p["sex_effect"][cortex] > 0.019) and np.all(-p["sex_effect"][cortex] < 0.051)
    offsets = np.abs(p["site_offsets"][:, cortex]).mean(axis=1)
    assert np.all((offsets > 0.02) & (offsets < 0.09))
    sd = cohort.true_sd[:, cortex]
    assert 0.15 < np.median(sd) < 0.25 and sd.min() > 0.12 and sd.max() < 0.3
    # The noise SD rises with age.
    age = cohort.covariates["age"].to_numpy()
    assert np.corrcoef(age, sd.mean(axis=1))[0, 1] > 0.5
    # Thinning accelerates after 60: the mean's age slope is steeper at 70 than at 40.
    at = {a: normative_mean(p, [a, a + 1], [False, False], [0, 0])[:, cortex].mean(axis=1) for a in (40, 70)}
    assert (at[70][0] - at[70][1]) > 1.3 * (at[40][0] - at[40][1])


def test_same_seed_same_cohort_and_truth_independent_of_size(cohort):
    a = make_demo_cohort(n_controls=4, n_patients=2, seed=5)
    b = make_demo_cohort(n_controls=4, n_patients=2, seed=5)
    c = make_demo_cohort(n_controls=4, n_patients=2, seed=6)
    np.testing.assert_array_equal(a.thickness, b.thickness)
    pd.testing.assert_frame_equal(a.covariates, b.covariates)
    assert not np.allclose(a.thickness, c.thickness)
    # The ground-truth maps depend on the seed only, not on the cohort size.
    small = make_demo_cohort(n_controls=4, n_patients=1, seed=0)
    for key in ("age_rate", "sex_effect", "site_offsets", "noise_sd"):
        np.testing.assert_array_equal(small.params[key], cohort.params[key])


@pytest.mark.parametrize("kwargs, message", [
    ({"n_controls": 0}, "n_controls"),
    ({"n_patients": -1}, "n_patients"),
    ({"n_sites": 0}, "n_sites"),
    ({"n_controls": 2.5}, "n_controls"),
])
def test_make_demo_cohort_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_demo_cohort(**kwargs)


def test_controls_follow_the_generating_distribution(cohort):
    """(thickness - true_mean) / true_sd of controls is N(0, 1), also at the mesh's irregular vertices."""
    controls = ~cohort.is_patient
    z = (cohort.thickness[controls] - cohort.true_mean[controls]) / cohort.true_sd[controls]
    assert abs(z.mean()) < 0.01
    assert z.std() == pytest.approx(1.0, abs=0.01)
    assert np.mean(np.abs(z) > 1.96) == pytest.approx(0.05, abs=0.003)
    # The smooth component is normalised exactly: degree-5 vertices (where smoothing differs) have SD 1 too.
    degree = np.diff(load_fsaverage5("sphere").adjacency().indptr)
    assert z[:, degree == 5].std() == pytest.approx(1.0, abs=0.05)


# ------------------------------------------------------- recovery by the normative model
def test_normative_model_recovers_the_generating_model(cohort, split, fitted):
    _, held_out, _ = split
    cov = cohort.covariates.iloc[held_out]
    cortex = ~cohort.params["medial_wall"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, calibration = fitted.evaluate(cohort.thickness[held_out], cov)
        prediction = fitted.predict(cov)
    r = np.corrcoef(prediction.mean[:, cortex].ravel(), cohort.true_mean[held_out][:, cortex].ravel())[0, 1]
    sd_ratio = np.median(prediction.std[:, cortex] / cohort.true_sd[held_out][:, cortex])
    print(f"held-out controls (n={len(held_out)}): {calibration}; r(mean, true mean) = {r:.4f}; "
          f"median SD ratio = {sd_ratio:.3f}")
    assert abs(calibration["z_mean"]) < 0.05
    assert calibration["z_sd"] == pytest.approx(1.0, abs=0.05)
    assert 0.04 < calibration["frac_beyond_1.96"] < 0.065
    assert r > 0.95
    assert sd_ratio == pytest.approx(1.0, abs=0.1)


def test_group_pattern_matches_enigma():
    """The patients' mean thinning per region follows the ENIGMA-Schizophrenia Cohen's d."""
    d = enigma_schizophrenia_d()
    assert list(d.index) == list(DK_NAMES) and (d < 0).all()
    patients = make_demo_cohort(n_controls=2, n_patients=100, seed=0)
    effect_sd = patients.true_effect / patients.true_sd[patients.is_patient]
    labels = dk_atlas().labels
    regional = np.array([effect_sd[:, labels == k].mean() for k in range(1, 69)])
    r = np.corrcoef(-regional, d.to_numpy())[0, 1]
    print(f"r(group mean thinning in SD units, ENIGMA d) = {r:.3f}; mean thinning {regional.mean():.3f} SD "
          f"(ENIGMA mean |d| {-d.mean():.3f})")
    assert r > 0.6
    # The group effect has the magnitude of the published effect sizes.
    assert 0.5 * -d.mean() < regional.mean() < 2 * -d.mean()
    # The most affected ENIGMA regions are drawn more often than the least affected.
    counts = pd.Series([r for regions in patients.affected_regions for r in regions]).value_counts()
    strongest, weakest = d.sort_values().index[:10], d.sort_values().index[-10:]
    assert counts.reindex(strongest, fill_value=0).sum() > 3 * counts.reindex(weakest, fill_value=0).sum()
    assert all(3 <= len(regions) <= 8 for regions in patients.affected_regions)


def test_true_atrophy_maps_are_the_affected_regions(cohort):
    labels = dk_atlas().labels
    names = np.array([""] + list(DK_NAMES))
    for mask, regions in zip(cohort.true_atrophy, cohort.affected_regions):
        hit = pd.Series(names[labels[mask]]).value_counts()
        # Each affected region is mostly inside the map; the map lies mostly in affected regions.
        for region in regions:
            assert hit.get(region, 0) >= 0.5 * np.sum(names[labels] == region), region
        assert hit.reindex(regions, fill_value=0).sum() >= 0.8 * mask.sum()


def test_patients_true_atrophy_is_found(cohort, split, fitted):
    """The issue's required test: the demo patients' true atrophy is found (sensitivity, specificity)."""
    _, _, patients = split
    cortex = ~cohort.params["medial_wall"]
    z = fitted.score(cohort.thickness[patients], cohort.covariates.iloc[patients]).z
    rates = detection_rates(z < -1.96, cohort.true_atrophy, valid=cortex)
    per_patient = pd.DataFrame([detection_rates(p, t, valid=cortex) for p, t in zip(z < -1.96, cohort.true_atrophy)])
    print(f"z < -1.96 vs true atrophy, {len(patients)} patients (150 training controls, seed 0): "
          f"sensitivity {rates['sensitivity']:.3f}, specificity {rates['specificity']:.3f}, "
          f"precision {rates['precision']:.3f}, Dice {rates['dice']:.3f}; "
          f"per patient sensitivity {per_patient['sensitivity'].min():.3f}-{per_patient['sensitivity'].max():.3f}")
    assert rates["sensitivity"] > 0.7
    assert rates["specificity"] > 0.95
    assert per_patient["sensitivity"].min() > 0.6
    # Healthy vertices of patients are scored like controls' (the sub-threshold shift is small).
    healthy = (cohort.true_effect < 0.5 * cohort.true_sd[patients]) & cortex
    assert np.mean(z[healthy] < -1.96) < 0.05


def test_cluster_filtered_maps_find_true_atrophy(cohort, split):
    """Through CorticalThicknessModel.patient_maps, as the CLI and Slicer do (clusters >= 20 vertices)."""
    train, _, patients = split
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CorticalThicknessModel().fit(cohort.thickness[train], cohort.covariates.iloc[train])
        maps = model.patient_maps(cohort.thickness[patients], cohort.covariates.iloc[patients],
                                  threshold=-1.96, min_cluster_size=20)
    predicted = np.array([pm.atrophy.mask for pm in maps])
    rates = detection_rates(predicted, cohort.true_atrophy, valid=model.cortex_)
    print(f"patient_maps (z < -1.96, clusters >= 20): sensitivity {rates['sensitivity']:.3f}, "
          f"specificity {rates['specificity']:.3f}, Dice {rates['dice']:.3f}")
    assert rates["sensitivity"] > 0.7
    assert rates["specificity"] > 0.98


# ------------------------------------------------------------------------- writing
def test_write_demo_cohort_round_trip(tmp_path):
    small = make_demo_cohort(n_controls=6, n_patients=3, n_sites=2, seed=3)
    assert write_demo_cohort(small, tmp_path) == tmp_path
    lh = tmp_path / "subjects" / "sub-P0002" / "surf" / "lh.thickness.fsaverage5.mgh"
    assert lh.is_file()
    table = read_cohort(tmp_path / "cohort.csv")
    pd.testing.assert_frame_equal(
        table[["subject_id", "age", "sex", "site", "group"]],
        small.covariates[["subject_id", "age", "sex", "site", "group"]], check_dtype=False,
    )
    np.testing.assert_allclose(table["panss_change"], small.covariates["panss_change"])
    Y = load_cohort_surface_data(table, tmp_path / "subjects", template="fsaverage5")
    np.testing.assert_array_equal(Y, small.thickness.astype(np.float32))

    truth = read_ground_truth(tmp_path / "ground_truth.npz", covariates=table)
    assert truth["patient_ids"] == ["sub-P0001", "sub-P0002", "sub-P0003"]
    np.testing.assert_array_equal(truth["true_atrophy"], small.true_atrophy)
    np.testing.assert_allclose(truth["true_effect"], small.true_effect, rtol=1e-6, atol=1e-6)
    assert truth["affected_regions"] == small.affected_regions
    np.testing.assert_allclose(truth["true_mean"], small.true_mean, rtol=1e-12)
    np.testing.assert_allclose(truth["true_sd"], small.true_sd, rtol=1e-12)
    assert truth["params"]["site_names"] == ["site1", "site2"]
    # Every file was renamed into place: no temporary files are left.
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp")]


def test_read_ground_truth_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        read_ground_truth(tmp_path / "missing.npz")
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz.*patient_ids"):
        read_ground_truth(other)


# ------------------------------------------------------------------- the whole demo
def test_run_demo_writes_everything(tmp_path):
    messages = []
    # Small network half: 6 connectome subjects x 60 volumes, 20 nulls, and a strong outcome effect
    # (true r 0.8) so that 24 patients recover its sign for certain.
    result = run_demo(tmp_path / "demo", n_controls=60, n_patients=24, seed=1,
                      progress=lambda fraction, message: messages.append((fraction, message)),
                      network_options={"n_subjects": 6, "n_timepoints": 60, "n_null": 20,
                                       "n_permutations": 999, "true_r": 0.8})
    out = tmp_path / "demo"
    results = out / "results"
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert "sensitivity" in messages[-1][1]

    for name in ("summary.csv", "fit_quality.csv", "calibration.json", "model.npz"):
        assert (results / name).is_file(), name
    summary = pd.read_csv(results / "summary.csv")
    assert summary["subject_id"].tolist() == [f"sub-P{k:04d}" for k in range(1, 25)]
    for column in ("n_atrophic", "sensitivity", "specificity", "dice", "top_regions", "true_regions"):
        assert column in summary.columns
    assert summary["sensitivity"].between(0, 1).all() and (summary["specificity"] > 0.9).all()
    quality = pd.read_csv(results / "fit_quality.csv")
    assert len(quality) == int((dk_atlas().labels > 0).sum()) and {"EV", "SMSE", "MSLL"} <= set(quality.columns)
    calibration = json.loads((results / "calibration.json").read_text())
    assert calibration["synthetic"] is True
    assert abs(calibration["held_out_controls"]["z_mean"]) < 0.2
    assert calibration["n_train"] + calibration["n_test"] == 60
    assert calibration["detection"]["mean_sensitivity"] == pytest.approx(summary["sensitivity"].mean())
    assert sorted(p.name for p in (results / "maps").iterdir()) == sorted(
        f"{s}.{h}.z.fsaverage5.mgh" for s in summary["subject_id"] for h in ("lh", "rh"))
    assert len(list((results / "regions").glob("*.csv"))) == 24

    for path in result["paths"]["figures"].values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["n_train"] == 48 and result["n_test"] == 12 and result["n_patients"] == 24
    assert set(result["detection"]) >= {"mean_sensitivity", "mean_specificity", "pooled_dice"}
    json.dumps(result)  # the CLI prints it

    # The model file is the one the CLI reads.
    model = CorticalThicknessModel.load(result["paths"]["model"])
    assert model.sites_ == ["site1", "site2", "site3", "site4"]

    # The Slicer scene refers to files that exist, and loads back.
    scene_file = results / "scene" / "NeuroAtrophyDemo.mrml"
    assert result["scene_written"] and Path(result["paths"]["scene"]) == scene_file
    referenced = re.findall(r'fileName="([^"]+)"', scene_file.read_text())
    assert len(referenced) >= 4
    for name in referenced:
        assert (scene_file.parent / name).is_file(), name
    scene = mrml.load_scene(scene_file)
    model_node = scene.GetFirstNodeByClass("vtkMRMLModelNode")
    z = np.nan_to_num(mrml.array_from_model_scalars(model_node, "z"), nan=0.0)  # NaN on the medial wall
    lh = read_surface_data(results / "maps" / "sub-P0001.lh.z.fsaverage5.mgh")
    np.testing.assert_allclose(z[: len(lh)], lh, atol=1e-5)
    assert mrml.array_from_model_scalars(model_node, "atrophic").sum() == summary.loc[0, "n_atrophic"]
    assert scene.GetFirstNodeByClass("vtkMRMLPlotChartNode") is not None
    assert scene.GetFirstNodeByClass("vtkMRMLTableNode") is not None

    # The network half: the real run's DLPFC seed map, networks, the outcome and its recovery.
    networks = result["networks"]
    assert -0.6 < networks["real_run"]["r_min"] < -0.3 and 0.85 < networks["real_run"]["r_max"] < 1.0
    assert networks["connectome"]["group_fc_vs_hcp_r"]["simulated"] > 0.8
    assert networks["outcome"]["recovered_r"] > 0.5 and networks["outcome"]["p_permutation"] < 0.01
    cohort_table = pd.read_csv(out / "cohort.csv")
    assert cohort_table["rtms_improvement"].notna().sum() == 24
    for name in ("networks/network_analysis.json", "networks/networks.csv", "networks/target_connectivity.csv",
                 "outcome/target_outcome.csv", "outcome/outcome_DLPFC_F3.png", "network_demo.json"):
        assert (results / name).is_file(), name


def test_run_demo_rejects_too_few_controls(tmp_path):
    with pytest.raises(ValueError, match="n_controls"):
        run_demo(tmp_path, n_controls=10, n_patients=2)


@pytest.fixture
def without_slicer(monkeypatch):
    """Make `import slicer` fail, as where slicer-core is not installed."""
    mrml._mrml.cache_clear()  # the bridge caches its (lazy) import
    monkeypatch.setitem(sys.modules, "slicer", None)
    yield
    mrml._mrml.cache_clear()


def test_demo_scene_says_clearly_when_slicer_is_missing(tmp_path, without_slicer):
    path, message = _demo_scene(None, None, tmp_path / "scene.mrml")
    assert path is None
    assert "slicer-core is not installed" in message and "every other output" in message
    assert not (tmp_path / "scene.mrml").exists()
