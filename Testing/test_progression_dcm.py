"""Tests of neuroatrophy.progression_dcm (BrLP's auxiliary disease-course model)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from neuroatrophy.progression_covariates import BRLP_MEDIAN_CORRECTIONS, REGIONS
from neuroatrophy.progression_dcm import (
    DiseaseCourseModel,
    LeaspyV1Logistic,
    RegressionCourse,
    correct_and_clip,
    flip_features,
    load_brlp_dcms,
    predict_volumes,
    visit_times,
)

torch.set_num_threads(1)

# A logistic model in BrLP's layout: the five regions, features increasing with time
# (all volumes but the lateral ventricle flipped), courses spanning ages 60-90.
TRUTH_FILE = {
    "leaspy_version": "1.4.0",
    "name": "logistic",
    "features": list(REGIONS),
    "dimension": 5,
    "source_dimension": 1,
    "noise_model": "gaussian_diagonal",
    "parameters": {
        "g": [0.5, 0.2, 0.4, 0.8, 0.0],
        "v0": [-3.0, -2.6, -2.8, -3.2, -2.5],
        "betas": [[0.3], [-0.2], [0.1], [0.2]],
        "tau_mean": 75.0, "tau_std": 5.0, "xi_mean": 0.0, "xi_std": 0.3,
        "sources_mean": 0.0, "sources_std": 1.0,
        "noise_std": [0.01] * 5,
    },
}


def _truth():
    return LeaspyV1Logistic.from_dict(TRUTH_FILE)


def _simulate(truth, n_subjects, seed, diagnosis="CN", n_visits=4, noise=0.005, prefix="s"):
    """Visits of subjects drawn from the model's priors, as normalised volumes, plus the truth."""
    rng = np.random.default_rng(seed)
    rows, params = [], {}
    for i in range(n_subjects):
        subject = f"{prefix}{seed}-{i}"
        tau = truth.tau_mean + truth.tau_std * rng.standard_normal()
        xi = truth.xi_std * rng.standard_normal()
        sources = rng.standard_normal(truth.source_dimension)
        ages = 62.0 + 22.0 * rng.random() + 1.5 * np.arange(n_visits)
        features = truth.estimate(ages, tau, xi, sources) + noise * rng.standard_normal((n_visits, 5))
        for age, volumes in zip(ages, flip_features(features)):
            rows.append({"subject_id": subject, "age": age, "diagnosis": diagnosis, **dict(zip(REGIONS, volumes))})
        params[subject] = (tau, xi, sources)
    return pd.DataFrame(rows), params


def _true_volumes(truth, params, ages):
    return flip_features(truth.estimate(ages, *params))


# Held-out subjects (tau, xi, sources) seen over 4.5 years around their inflection.
TEST_SUBJECTS = [(72.0, 0.2, [0.5]), (78.0, -0.2, [-0.6]), (75.0, 0.0, [0.0])]


def _subject_visits(truth, params, n_visits=4):
    tau = params[0]
    ages = tau - 3.0 + 1.5 * np.arange(n_visits)
    return pd.DataFrame(_true_volumes(truth, params, ages), columns=list(REGIONS)).assign(age=ages)


def _write(path, content):
    path.write_text(json.dumps(content))
    return path


# ----------------------------------------------------------------------------------------------
# leaspy 1.x evaluator
# ----------------------------------------------------------------------------------------------


def test_v1_logistic_equations_on_hand_written_model(tmp_path):
    # g = exp(0) = 1 and equal velocities 0.1: metric (1+g)^4/g^2 = 16, so the Householder basis is
    # built on (1, 1, 1); its first kept column is (-1/sqrt3, (3+sqrt3)/6, -(3-sqrt3)/6).
    path = _write(tmp_path / "model.json", {
        "leaspy_version": "1.4.0", "name": "logistic", "features": ["a", "b", "c"], "dimension": 3,
        "source_dimension": 1, "noise_model": "gaussian_scalar",
        "parameters": {"g": [0.0, 0.0, 0.0], "v0": [math.log(0.1)] * 3, "betas": [[0.5], [0.0]],
                       "tau_mean": 70.0, "tau_std": 5.0, "xi_mean": 0.0, "xi_std": 0.5,
                       "sources_mean": 0.0, "sources_std": 1.0, "noise_std": 0.05},
    })
    model = LeaspyV1Logistic.from_json(path)
    r3 = math.sqrt(3.0)
    expected_a = 0.5 * np.array([[-1 / r3], [(3 + r3) / 6], [-(3 - r3) / 6]])
    np.testing.assert_allclose(model.mixing_matrix, expected_a, atol=1e-12)
    assert model.features == ("a", "b", "c") and model.source_dimension == 1
    np.testing.assert_allclose(model.noise_std, [0.05] * 3)

    # tau 70, xi log 2, t 72.5: reparametrised time 5, v r = 0.5; b = (1+g)^2/g = 4.
    values = model.estimate([72.5, 70.0], tau=70.0, xi=math.log(2.0), sources=[1.0])
    w = expected_a[:, 0]
    np.testing.assert_allclose(values[0], 1 / (1 + np.exp(-4 * (0.5 + w))), atol=1e-12)
    np.testing.assert_allclose(values[1], 1 / (1 + np.exp(-4 * w)), atol=1e-12)
    # The average subject at tau_mean is at the curves' midpoints 1 / (1 + g) = 0.5.
    np.testing.assert_allclose(model.mean_trajectory([70.0]), [[0.5, 0.5, 0.5]], atol=1e-12)


def test_v1_logistic_matches_leaspy_1x_reference_values():
    # leaspy 1.4's own test model and reference results (tests/_data/model_parameters/hardcoded/
    # logistic_scalar_noise.json; tests/unit_tests/algo/personalize/test_scipy_minimize.py).
    model = LeaspyV1Logistic.from_dict({
        "leaspy_version": "1.1", "name": "logistic", "features": ["Y0", "Y1", "Y2", "Y3"], "dimension": 4,
        "source_dimension": 2, "noise_model": "gaussian_scalar",
        "parameters": {"g": [0.5, 1.5, 1.0, 2.0], "v0": [-2.0, -3.5, -3.0, -2.5],
                       "betas": [[0.1, 0.6], [-0.1, 0.4], [0.3, 0.8]], "tau_mean": 75.2, "tau_std": 7.1,
                       "xi_mean": 0.0, "xi_std": 0.2, "sources_mean": 0.0, "sources_std": 1.0, "noise_std": 0.2,
                       "mixing_matrix": [[-0.27804073691368103, -0.9041260480880737],
                                         [0.0640869215130806, 0.4832187592983246],
                                         [-0.1340726613998413, 0.289203405380249],
                                         [0.10300853103399277, 0.1594279408454895]]},
    })
    values = np.array([[0.5, 0.4, 0.4, 0.45], [0.3, 0.3, 0.2, 0.4]])
    error = model.estimate([70, 80], tau=75.2, xi=0.0, sources=[0, 0]) - values
    expected = [[-0.4705, -0.3278, -0.3103, -0.4477], [0.6059, 0.0709, 0.3537, 0.4523]]
    np.testing.assert_allclose(error, expected, atol=1e-4)

    fit = model.personalize([70, 80], values)
    assert fit["tau"] == pytest.approx(78.5750, abs=1e-2)
    assert fit["xi"] == pytest.approx(-0.0918, abs=3e-3)
    np.testing.assert_allclose(fit["sources"], [0.3483, 0.1678], atol=3e-3)

    values[0, 3] = values[1, 1] = values[1, 2] = np.nan  # missing values are left out
    fit = model.personalize([70, 80], values)
    assert fit["tau"] == pytest.approx(77.5555, abs=1e-2)
    assert fit["xi"] == pytest.approx(-0.0990, abs=3e-3)
    np.testing.assert_allclose(fit["sources"], [-0.9799, 0.7743], atol=3e-3)


def test_v1_personalize_recovers_the_generating_parameters():
    model = _truth()
    rng = np.random.default_rng(3)
    for tau, xi, source in [(72.0, 0.2, 0.8), (80.0, -0.3, -1.0)]:
        times = np.linspace(tau - 6, tau + 6, 7)
        values = model.estimate(times, tau, xi, [source]) + 0.002 * rng.standard_normal((7, 5))
        fit = model.personalize(times, values)
        assert fit["tau"] == pytest.approx(tau, abs=0.5)
        assert fit["xi"] == pytest.approx(xi, abs=0.05)
        assert fit["sources"][0] == pytest.approx(source, abs=0.2)
        later = times + 3
        np.testing.assert_allclose(model.estimate(later, **fit), model.estimate(later, tau, xi, [source]), atol=0.01)


def test_v1_from_json_errors_name_the_file(tmp_path):
    good = json.loads(json.dumps(TRUTH_FILE))
    cases = {
        "linear.json": ({**good, "name": "linear"}, "'linear' model"),
        "v2.json": ({**good, "leaspy_version": "2.1.0"}, "leaspy 2.1.0"),
        "old.json": ({k: v for k, v in good.items() if k != "leaspy_version"}, "leaspy_version"),
        "missing.json": ({**good, "parameters": {k: v for k, v in good["parameters"].items() if k != "tau_std"}},
                         "tau_std"),
        "betas.json": ({**good, "source_dimension": 2}, "betas"),
        "noise.json": ({**good, "noise_model": "bernoulli"}, "bernoulli"),
    }
    for name, (content, needle) in cases.items():
        path = _write(tmp_path / name, content)
        with pytest.raises(ValueError, match=needle) as info:
            LeaspyV1Logistic.from_json(path)
        assert str(path) in str(info.value)
    (tmp_path / "broken.json").write_text("{ not json")
    with pytest.raises(ValueError, match="broken.json"):
        LeaspyV1Logistic.from_json(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="absent.json"):
        LeaspyV1Logistic.from_json(tmp_path / "absent.json")
    wrong_mixing = {**good, "parameters": {**good["parameters"], "mixing_matrix": [[1.0]] * 5}}
    with pytest.warns(UserWarning, match="mixing_matrix"):
        LeaspyV1Logistic.from_json(_write(tmp_path / "mixing.json", wrong_mixing))


def test_load_brlp_dcms_checks_regions(tmp_path):
    paths = {g: _write(tmp_path / f"dcm_{g}.json", TRUTH_FILE) for g in ("cn", "mci", "ad")}
    models = load_brlp_dcms(paths)
    assert sorted(models) == ["AD", "CN", "MCI"]
    assert all(isinstance(m, LeaspyV1Logistic) and m.features == REGIONS for m in models.values())
    renamed = _write(tmp_path / "renamed.json", {**TRUTH_FILE, "features": ["a", "b", "c", "d", "e"]})
    with pytest.raises(ValueError, match="renamed.json"):
        load_brlp_dcms({"cn": renamed})
    with pytest.raises(ValueError, match="'pd'"):
        load_brlp_dcms({"pd": paths["cn"]})


# ----------------------------------------------------------------------------------------------
# leaspy 2.x disease-course models
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted():
    truth = _truth()
    cn, _ = _simulate(truth, 16, seed=1, diagnosis="CN")
    ad, _ = _simulate(truth, 16, seed=2, diagnosis="AD")
    # Converters: MCI at first, AD at the last visit -> fitted in the AD group (BrLP's grouping).
    ad.loc[ad.groupby("subject_id").head(2).index, "diagnosis"] = "MCI"
    visits = pd.concat([cn, ad], ignore_index=True)
    calls = []
    dcm = DiseaseCourseModel().fit(visits, n_iter=100, seed=64, source_dimension=1,
                                   progress=lambda f, m: calls.append((f, m)))
    return truth, visits, dcm, calls


def test_dcm_groups_by_last_diagnosis_and_reports_progress(fitted):
    _, _, dcm, calls = fitted
    assert dcm.groups == ("CN", "AD")
    assert dcm.groups_["AD"]["n_subjects"] == 16 and dcm.groups_["AD"]["n_visits"] == 64
    assert [f for f, _ in calls] == [0.5, 1.0] and "AD" in calls[-1][1]
    with pytest.raises(ValueError, match="MCI.*available: CN, AD"):
        dcm.predict(pd.DataFrame({"age": [70.0], **{r: [0.5] for r in REGIONS}}), [72], "MCI")


def test_dcm_predictions_recover_the_simulated_course(fitted):
    truth, _, dcm, _ = fitted
    errors = []
    for params in TEST_SUBJECTS:
        visits = _subject_visits(truth, params)
        targets = visits["age"].max() + np.array([2.0, 4.0])
        pred = dcm.predict(visits, targets, "CN")
        assert list(pred.columns) == list(REGIONS) and np.allclose(pred.index, targets)
        errors.append(np.abs(pred.to_numpy() - _true_volumes(truth, params, targets)))
    errors = np.array(errors)
    assert errors.mean() < 0.015 and errors.max() < 0.05
    # Volumes shrink and the ventricles grow, as in the simulated courses.
    assert (np.diff(pred.to_numpy(), axis=0)[:, :4] < 0).all() and (np.diff(pred.to_numpy(), axis=0)[:, 4] > 0).all()


def test_dcm_save_load_round_trip(fitted, tmp_path):
    _, visits, dcm, _ = fitted
    folder = dcm.save(tmp_path / "dcm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dcm"]  # nothing half-written left behind
    assert sorted(p.name for p in folder.iterdir()) == ["dcm_ad.json", "dcm_cn.json", "dcm_metadata.json"]
    metadata = json.loads((folder / "dcm_metadata.json").read_text())
    assert metadata["format_version"] == 1 and metadata["regions"] == list(REGIONS)
    loaded = DiseaseCourseModel.load(folder)
    one = visits[visits["subject_id"] == visits["subject_id"].iloc[-1]]
    pd.testing.assert_frame_equal(loaded.predict(one, [80.0, 85.0], "AD"), dcm.predict(one, [80.0, 85.0], "AD"))
    dcm.save(folder)  # replacing an existing folder works
    metadata["format_version"] = 99
    (folder / "dcm_metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="format_version 99"):
        DiseaseCourseModel.load(folder)
    with pytest.raises(FileNotFoundError, match="dcm_metadata.json"):
        DiseaseCourseModel.load(tmp_path)


def test_dcm_fit_is_seeded_and_leaves_the_global_random_state_alone():
    visits, _ = _simulate(_truth(), 6, seed=5)
    np.random.seed(123)
    expected_draw = np.random.random()
    np.random.seed(123)
    first = DiseaseCourseModel().fit(visits, n_iter=15, seed=7, source_dimension=1)
    assert np.random.random() == expected_draw
    second = DiseaseCourseModel().fit(visits, n_iter=15, seed=7, source_dimension=1)
    for name, value in first.models_["CN"].parameters.items():
        assert torch.equal(value, second.models_["CN"].parameters[name]), name


def test_dcm_fit_rejects_bad_visits():
    truth = _truth()
    visits, _ = _simulate(truth, 6, seed=4)
    dcm = DiseaseCourseModel()
    with pytest.raises(ValueError, match="hippocampus"):
        dcm.fit(visits.drop(columns="hippocampus"), n_iter=10)
    bad = visits.copy()
    bad.loc[5, "amygdala"] = np.nan
    with pytest.raises(ValueError, match=f"'amygdala'.*{bad.loc[5, 'subject_id']}"):
        dcm.fit(bad, n_iter=10)
    bad = visits.copy()
    bad.loc[0, "diagnosis"] = "PD"
    with pytest.raises(ValueError, match=f"{visits.loc[0, 'subject_id']}.*'PD'"):
        dcm.fit(bad, n_iter=10)
    with pytest.raises(ValueError, match="group CN has 6 subject"):
        dcm.fit(visits, n_iter=10, min_subjects=10)
    with pytest.raises(ValueError, match="not in years"):
        dcm.fit(visits.assign(age=visits["age"] / 100), n_iter=10)
    with pytest.raises(ValueError, match="source_dimension"):
        dcm.fit(visits, n_iter=10, source_dimension=5)


def test_visit_times_separate_same_age_visits():
    np.testing.assert_allclose(visit_times([70.0, 70.0, 70.0, 71.0]), [70.0, 70.001, 70.002, 71.0])


# ----------------------------------------------------------------------------------------------
# Regression fallback
# ----------------------------------------------------------------------------------------------


def _linear_rate_visits(seed, n_subjects=12, diagnosis="MCI"):
    """Subjects whose volumes follow x' = c0 + c1 age exactly (c0, c1 per region), plus the truth."""
    rng = np.random.default_rng(seed)
    c0 = np.array([0.04, 0.06, 0.05, 0.03, -0.09])
    c1 = np.array([-0.001, -0.0012, -0.001, -0.0008, 0.0016])
    rows = []
    for i in range(n_subjects):
        ages = 60.0 + 25.0 * rng.random() + np.array([0.0, 1.0, 2.5])
        start = rng.uniform(0.3, 0.7, 5)
        for age in ages:
            values = start + c0 * (age - ages[0]) + c1 * (age**2 - ages[0] ** 2) / 2
            rows.append({"subject_id": f"r{i}", "age": age, "diagnosis": diagnosis, **dict(zip(REGIONS, values))})
    return pd.DataFrame(rows), c0, c1


def test_regression_course_recovers_rates_and_round_trips(tmp_path):
    visits, c0, c1 = _linear_rate_visits(0)
    single = pd.DataFrame({"subject_id": ["x"], "age": [70.0], "diagnosis": ["MCI"], **{r: [0.5] for r in REGIONS}})
    course = RegressionCourse().fit(pd.concat([visits, single], ignore_index=True))
    assert course.groups == ("MCI",) and course.groups_["MCI"]["n_subjects"] == 12
    # Per-subject slopes of a quadratic course are the rate at the visits' mean age (equally
    # spaced ages), so the line is recovered up to the curvature of unevenly spaced visits.
    rates = course.rate([65.0, 80.0], "MCI")
    np.testing.assert_allclose(rates.to_numpy(), c0 + c1 * np.array([[65.0], [80.0]]), atol=2e-4)
    pred = course.predict(single, [70.0, 74.0], "mci")
    expected = 0.5 + c0 * 4.0 + c1 * (74.0**2 - 70.0**2) / 2
    np.testing.assert_allclose(pred.loc[70.0].to_numpy(), 0.5)
    np.testing.assert_allclose(pred.loc[74.0].to_numpy(), expected, atol=1e-3)
    path = course.save(tmp_path / "regression.json")
    reloaded = RegressionCourse.load(path)
    pd.testing.assert_frame_equal(reloaded.predict(single, [74.0], "MCI"), course.predict(single, [74.0], "MCI"))
    assert reloaded.residual_sd_ == course.residual_sd_
    with pytest.raises(ValueError, match="group MCI has 2 subject"):
        RegressionCourse().fit(visits[visits["subject_id"].isin(["r0", "r1"])])
    with pytest.raises(ValueError, match="no regression model for diagnosis AD"):
        course.predict(single, [74.0], "AD")
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "other"}))
    with pytest.raises(ValueError, match="bad.json"):
        RegressionCourse.load(tmp_path / "bad.json")


# ----------------------------------------------------------------------------------------------
# predict_volumes
# ----------------------------------------------------------------------------------------------


def test_correct_and_clip_follows_brlp():
    raw = pd.DataFrame([[0.5, 0.5, 0.5, 0.5, 0.5], [0.9, 0.05, 1.5, -0.4, 0.6]], columns=list(REGIONS))
    out = correct_and_clip(raw, BRLP_MEDIAN_CORRECTIONS)
    m_hippo, q_hippo = BRLP_MEDIAN_CORRECTIONS["hippocampus"]
    assert out.loc[0, "hippocampus"] == pytest.approx((0.5 - q_hippo) / m_hippo)
    assert out.loc[1, "hippocampus"] == pytest.approx((0.05 - q_hippo) / m_hippo)
    assert out.loc[1, "cerebral_cortex"] == 1.2 and out.loc[1, "cerebral_white_matter"] == -0.2
    assert out.loc[1, "amygdala"] == 1.2  # m = 1, q = 0 -> clipping only
    np.testing.assert_allclose(correct_and_clip(raw).to_numpy(), raw.clip(-0.2, 1.2).to_numpy())
    with pytest.raises(ValueError, match="lateral_ventricle"):
        correct_and_clip(raw, {r: (1.0, 0.0) for r in REGIONS[:4]})


def test_predict_volumes_chooses_the_method(fitted):
    truth, _, dcm, _ = fitted
    visits = _subject_visits(truth, TEST_SUBJECTS[0], n_visits=3)
    targets = [visits["age"].max() + 3.0]
    brlp = {"cn": truth, "mci": truth, "ad": truth}
    regression = RegressionCourse().fit(_linear_rate_visits(1, diagnosis="CN")[0])

    out = predict_volumes(visits, targets, "CN", dcm=dcm, regression=regression)
    assert list(out.columns) == [*REGIONS, "source"] and out["source"].tolist() == ["dcm"]
    v1 = predict_volumes(visits, targets, "CN", dcm=brlp)
    assert v1["source"].tolist() == ["dcm-v1"]
    true = _true_volumes(truth, TEST_SUBJECTS[0], np.array(targets))
    np.testing.assert_allclose(v1[list(REGIONS)].to_numpy(), true, atol=0.01)

    one = visits.iloc[[0]]
    assert predict_volumes(one, targets, "CN", dcm=dcm, regression=regression)["source"].tolist() == ["regression"]
    assert predict_volumes(one, targets, "CN", dcm=brlp)["source"].tolist() == ["dcm-v1"]
    assert predict_volumes(visits, targets, "CN", regression=regression)["source"].tolist() == ["regression"]
    forced = predict_volumes(one, targets, "CN", dcm=brlp, regression=regression, method="dcm")
    assert forced["source"].tolist() == ["dcm-v1"]

    corrected = predict_volumes(visits, targets, "CN", dcm=brlp, median_corrections=BRLP_MEDIAN_CORRECTIONS)
    expected = correct_and_clip(v1[list(REGIONS)], BRLP_MEDIAN_CORRECTIONS)
    np.testing.assert_allclose(corrected[list(REGIONS)].to_numpy(), expected.to_numpy())

    with pytest.raises(ValueError, match="needs a RegressionCourse"):
        predict_volumes(visits, targets, "CN", dcm=dcm, method="regression")
    with pytest.raises(ValueError, match="method"):
        predict_volumes(visits, targets, "CN", dcm=dcm, method="best")
    with pytest.raises(ValueError, match="needs a disease-course model"):
        predict_volumes(visits, targets, "CN")
    with pytest.raises(ValueError, match="one subject"):
        predict_volumes(_simulate(truth, 2, seed=12)[0], targets, "CN", dcm=brlp)
    with pytest.raises(ValueError, match="target_ages"):
        predict_volumes(visits, [0.8], "CN", dcm=brlp)


def test_volumes_beyond_the_training_range_act_as_its_bounds():
    # A logistic curve never leaves (0, 1): a hippocampus above the training maximum (normalised
    # 1.1) is fitted as the maximum itself, the closest value the model can reach.
    truth = _truth()
    visits = _subject_visits(truth, TEST_SUBJECTS[2])
    target = [visits["age"].max() + 2.0]
    visits.loc[visits.index[0], "hippocampus"] = 1.0
    at_bound = predict_volumes(visits, target, "CN", dcm={"CN": truth})
    visits.loc[visits.index[0], "hippocampus"] = 1.1
    beyond = predict_volumes(visits, target, "CN", dcm={"CN": truth})
    pd.testing.assert_frame_equal(beyond, at_bound)
