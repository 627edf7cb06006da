"""Tests of neuroatrophy.subtypes_input: regional z-scores, z-levels, mixture likelihoods."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from neuroatrophy.subtypes_input import (
    FORMAT_VERSION,
    RegionalZScorer,
    default_z_levels,
    fit_biomarker_mixture,
    mixture_likelihoods,
    regional_zscores,
)

REGIONS = ["hippocampus", "thalamus", "cortex"]
# Per region: intercept, per year of age, male vs female, per mm^3 of ICV, residual SD.
EFFECTS = {
    "hippocampus": (3000.0, -15.0, 120.0, 0.001, 150.0),
    "thalamus": (5000.0, -25.0, -80.0, 0.002, 250.0),
    "cortex": (3.2, -0.01, 0.05, 0.0, 0.1),
}


def simulate(rng, n, shift_sd=0.0, prefix="hc"):
    """Subjects with age, sex, ICV and regional values; ``shift_sd`` residual SDs of atrophy."""
    age = rng.uniform(20, 75, n)
    male = rng.random(n) < 0.5
    icv = rng.normal(1.5e6, 1.2e5, n) + 1e5 * male
    table = pd.DataFrame({
        "subject_id": [f"{prefix}{i:04d}" for i in range(n)],
        "age": age, "sex": np.where(male, "M", "F"), "icv": icv,
    })
    for region, (b0, b_age, b_male, b_icv, sd) in EFFECTS.items():
        table[region] = b0 + b_age * age + b_male * male + b_icv * icv + sd * (rng.standard_normal(n) - shift_sd)
    return table


def slope(scorer, region, covariate):
    """Effect of one raw unit of a numeric covariate (the design is standardised)."""
    entry = next(e for e in scorer.encoding_ if e["name"] == covariate)
    column = scorer.design_columns_.index(covariate)
    return scorer.coef_[scorer.regions.index(region), column] / entry["scale"]


def test_ols_recovers_covariate_effects_and_gives_calibrated_z(rng):
    controls = simulate(rng, 1000)
    scorer = RegionalZScorer(REGIONS).fit(controls)
    assert scorer.design_columns_ == ["intercept", "age", "sex[M]", "icv"]
    for region, (_, b_age, b_male, b_icv, sd) in EFFECTS.items():
        j = REGIONS.index(region)
        assert slope(scorer, region, "age") == pytest.approx(b_age, abs=4 * sd / (15.9 * 31))
        assert slope(scorer, region, "icv") == pytest.approx(b_icv, abs=4 * sd / (1.2e5 * 31))
        assert scorer.coef_[j, 2] == pytest.approx(b_male, abs=4 * sd * 0.065)
        assert scorer.sd_[j] == pytest.approx(sd, rel=0.1)

    held_out = scorer.transform(simulate(rng, 3000, prefix="new"))
    assert list(held_out.columns) == REGIONS
    # Tolerances: ~3 standard errors of the fitted intercept / SD plus the held-out sample's own.
    assert np.abs(held_out.mean()).max() < 0.12
    assert np.abs(held_out.std() - 1).max() < 0.08

    patients = scorer.transform(simulate(rng, 3000, shift_sd=2.0, prefix="pt"))
    np.testing.assert_allclose(patients.mean(), 2.0, atol=0.2)
    assert patients.index.name == "subject_id" and patients.index[0] == "pt0000"


def test_no_covariates_is_control_mean_and_sd(rng):
    controls = simulate(rng, 50)
    z = RegionalZScorer(REGIONS, covariates=(), abnormal="higher").fit(controls).transform(controls)
    expected = (controls[REGIONS] - controls[REGIONS].mean()) / controls[REGIONS].std(ddof=1)
    np.testing.assert_allclose(z.to_numpy(), expected.to_numpy(), rtol=1e-10, atol=1e-10)


def test_sign_convention_and_per_region_directions(rng):
    controls, patients = simulate(rng, 100), simulate(rng, 20, shift_sd=3.0, prefix="pt")
    lower = RegionalZScorer(REGIONS).fit(controls).transform(patients)
    higher = RegionalZScorer(REGIONS, abnormal="higher").fit(controls).transform(patients)
    mixed = RegionalZScorer(REGIONS, abnormal={"hippocampus": "lower", "thalamus": "higher",
                                               "cortex": "lower"}).fit(controls).transform(patients)
    assert (lower.mean() > 2).all()                     # atrophy is positive with "lower"
    np.testing.assert_allclose(higher.to_numpy(), -lower.to_numpy())
    np.testing.assert_allclose(mixed["thalamus"], higher["thalamus"])
    np.testing.assert_allclose(mixed["cortex"], lower["cortex"])


def test_sex_as_text_or_zero_one_gives_the_same_z(rng):
    controls, patients = simulate(rng, 80), simulate(rng, 10, prefix="pt")
    text = RegionalZScorer(REGIONS).fit(controls).transform(patients)
    coded = [t.assign(sex=(t["sex"] == "M").astype(int)) for t in (controls, patients)]
    numeric = RegionalZScorer(REGIONS).fit(coded[0]).transform(coded[1])
    np.testing.assert_allclose(numeric.to_numpy(), text.to_numpy(), rtol=1e-9)


def test_missing_region_values_give_nan_z_and_are_left_out_of_the_fit(rng):
    controls, patients = simulate(rng, 60), simulate(rng, 5, prefix="pt")
    controls.loc[3, "thalamus"] = np.nan
    patients.loc[1, "hippocampus"] = np.nan
    scorer = RegionalZScorer(REGIONS).fit(controls)
    z = scorer.transform(patients)
    assert np.isnan(z.loc["pt0001", "hippocampus"]) and z.drop(index="pt0001").notna().all().all()
    assert scorer.n_controls_.tolist() == [60, 59, 60]


def test_save_load_round_trip_gives_identical_z(rng, tmp_path):
    controls, patients = simulate(rng, 60), simulate(rng, 15, prefix="pt")
    scorer = RegionalZScorer(REGIONS, abnormal={"hippocampus": "lower", "thalamus": "higher",
                                                "cortex": "lower"}).fit(controls)
    path = scorer.save(tmp_path / "scorer.json")
    assert [p.name for p in tmp_path.iterdir()] == ["scorer.json"]       # no temporary file left
    state = json.loads(path.read_text())
    assert state["format_version"] == FORMAT_VERSION and state["format"] == "neuroatrophy-regional-zscorer"
    loaded = RegionalZScorer.load(path)
    pd.testing.assert_frame_equal(loaded.transform(patients), scorer.transform(patients), check_exact=True)
    assert loaded.to_dict() == scorer.to_dict()

    state["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "newer.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="newer.json has format version"):
        RegionalZScorer.load(tmp_path / "newer.json")
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="other.json is not a NeuroAtrophy regional z-scorer"):
        RegionalZScorer.load(tmp_path / "other.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        RegionalZScorer.load(tmp_path / "missing.json")


def test_normative_method_is_calibrated_and_round_trips(rng, tmp_path):
    controls = simulate(rng, 600)
    scorer = RegionalZScorer(REGIONS, covariates=("age", "sex"), method="normative").fit(controls)
    # ICV is not in this model, so the residual SD is larger than EFFECTS' SD; z stays calibrated.
    held_out = simulate(rng, 3000, prefix="new")
    held_out = scorer.transform(held_out[held_out.age.between(controls.age.min(), controls.age.max())])
    assert np.abs(held_out.mean()).max() < 0.15
    assert np.abs(held_out.std() - 1).max() < 0.1
    patients = simulate(rng, 10, shift_sd=3.0, prefix="pt")
    patients.loc[2, "cortex"] = np.nan
    z = scorer.transform(patients)
    assert np.isnan(z.loc["pt0002", "cortex"]) and z["hippocampus"].mean() > 1.5
    loaded = RegionalZScorer.load(scorer.save(tmp_path / "normative.json"))
    pd.testing.assert_frame_equal(loaded.transform(patients), z, check_exact=True)
    with pytest.raises(ValueError, match="method='normative' models age .* Use method='ols'"):
        RegionalZScorer(REGIONS, method="normative").fit(controls)


def test_regional_zscores_fits_on_controls_and_scores_patients(rng):
    table = pd.concat([simulate(rng, 80).assign(group="Control"),
                       simulate(rng, 30, shift_sd=2.0, prefix="pt").assign(group="patient")], ignore_index=True)
    z, scorer = regional_zscores(table, REGIONS, "group", "control")
    assert len(z) == 30 and z.index[0] == "pt0000"
    assert scorer.n_controls_.tolist() == [80, 80, 80]
    all_z, _ = regional_zscores(table, REGIONS, "group", "control", patients_only=False)
    assert len(all_z) == 110
    pd.testing.assert_frame_equal(all_z.loc[z.index], z)
    with pytest.raises(ValueError, match="column 'group' has no value 'hc'"):
        regional_zscores(table, REGIONS, "group", "hc")


def _errors_case(rng, case):
    controls = simulate(rng, 30)
    scorer = RegionalZScorer(REGIONS)
    if case == "missing column":
        return lambda: scorer.fit(controls.drop(columns="icv")), "controls: missing column\\(s\\) 'icv'"
    if case == "non-numeric":
        controls["thalamus"] = controls["thalamus"].astype(object)
        controls.loc[4, "thalamus"] = "n/a"
        return lambda: scorer.fit(controls), "column 'thalamus' must be numeric: subject hc0004 has 'n/a'"
    if case == "zero variance":
        controls["cortex"] = 2.5
        return lambda: scorer.fit(controls), "region 'cortex' has no variance in the controls"
    if case == "too few controls":
        return (lambda: scorer.fit(controls.iloc[:5]),
                "region 'hippocampus': 5 control\\(s\\) with a value, but at least 6 are needed for 4")
    if case == "missing covariate":
        controls.loc[7, "age"] = np.nan
        return lambda: scorer.fit(controls), "covariate 'age' is missing for subject\\(s\\) hc0007"
    if case == "unknown direction":
        return (lambda: RegionalZScorer(REGIONS, abnormal="smaller").fit(controls),
                "abnormal direction for region 'hippocampus' must be 'lower' or 'higher', got 'smaller'")
    if case == "direction missing":
        return (lambda: RegionalZScorer(REGIONS, abnormal={"cortex": "lower"}).fit(controls),
                "no direction given for region\\(s\\) hippocampus, thalamus")
    if case == "duplicate ids":
        controls.loc[9, "subject_id"] = "hc0002"
        return lambda: scorer.fit(controls), "duplicate subject ids: hc0002"
    if case == "unknown level":
        fitted = scorer.fit(controls)
        patients = simulate(rng, 3, prefix="pt").assign(sex=["F", "X", "M"])
        return (lambda: fitted.transform(patients),
                "covariate 'sex': subject pt0001 has 'X', a value not seen in the controls")
    if case == "constant covariate":
        controls["age"] = 50.0
        return lambda: scorer.fit(controls), "rank deficient; constant: age"
    if case == "unknown method":
        return lambda: RegionalZScorer(REGIONS, method="gam").fit(controls), "method must be one of"
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "missing column", "non-numeric", "zero variance", "too few controls", "missing covariate",
    "unknown direction", "direction missing", "duplicate ids", "unknown level", "constant covariate",
    "unknown method",
])
def test_bad_input_gets_a_clear_error(rng, case):
    call, message = _errors_case(rng, case)
    with pytest.raises(ValueError, match=message):
        call()


def test_default_z_levels_keeps_levels_reached_by_enough_patients():
    n = 100
    z = pd.DataFrame({
        "strong": np.r_[np.full(50, 0.0), np.full(30, 2.5), np.full(20, 3.5)],  # 50 % >= 1, 2; 20 % >= 3
        "medium": np.r_[np.full(85, 0.0), np.full(15, 1.5)],                   # 15 % >= 1 only
        "weak": np.r_[np.full(95, 0.0), np.full(5, 4.0)],                       # 5 % reach anything
        "extreme": np.r_[np.full(50, 0.0), np.full(50, 8.2)],                   # p95 = 8.2
    })
    z.loc[0, "medium"] = np.nan   # missing values are ignored
    with pytest.warns(UserWarning, match="region\\(s\\) weak; they keep the single level 1"):
        levels, z_max = default_z_levels(z, candidates=(3, 1, 2), min_fraction=0.1)
    assert levels == [[1.0, 2.0, 3.0], [1.0], [1.0], [1.0, 2.0, 3.0]]
    np.testing.assert_array_equal(z_max, [5.0, 3.0, 3.0, 9.0])
    assert len(z) == n
    with pytest.raises(ValueError, match="candidates must be distinct positive"):
        default_z_levels(z, candidates=(0, 1))
    with pytest.raises(ValueError, match="region 'empty' has no z-scores"):
        default_z_levels(z.assign(empty=np.nan))


def _mixture_data(rng, n_controls=400, n_patients=600, weight=0.6, mean=3.0, sd=1.2):
    abnormal = rng.random(n_patients) < weight
    patients = np.where(abnormal, rng.normal(mean, sd, n_patients), rng.normal(0, 1, n_patients))
    return np.r_[rng.normal(0, 1, n_controls), patients], np.r_[np.ones(n_controls, bool), np.zeros(n_patients, bool)]


def test_mixture_recovers_a_known_mixture(rng):
    x, is_control = _mixture_data(rng, n_controls=1500, n_patients=3000)
    fit = fit_biomarker_mixture(x, is_control)
    assert fit["mean_normal"] == pytest.approx(0, abs=0.1) and fit["sd_normal"] == pytest.approx(1, abs=0.06)
    assert fit["mean_abnormal"] == pytest.approx(3.0, abs=0.25)
    assert fit["sd_abnormal"] == pytest.approx(1.2, abs=0.2)
    assert fit["weight_abnormal"] == pytest.approx(0.6, abs=0.07)


def test_mixture_likelihoods_orientation_missing_values_and_errors(rng):
    x, is_control = _mixture_data(rng)
    x2, _ = _mixture_data(rng, weight=0.4, mean=4.0, sd=1.0)
    # Volumes fall with disease: the first biomarker is "lower"; the second rises ("higher").
    values = pd.DataFrame({"volume": 10.0 - x, "lesions": x2}, index=[f"s{i}" for i in range(len(x))])
    values.iloc[5, 0] = np.nan
    L_yes, L_no = mixture_likelihoods(values, is_control, abnormal={"volume": "lower", "lesions": "higher"})
    assert L_yes.shape == values.shape and list(L_yes.index) == list(values.index)
    assert L_yes.iloc[5, 0] == 1.0 and L_no.iloc[5, 0] == 1.0
    rows = np.arange(len(x)) != 5
    fit = fit_biomarker_mixture(x[rows], is_control[rows])
    np.testing.assert_allclose(L_yes["volume"][rows], stats.norm.pdf(x[rows], fit["mean_abnormal"],
                                                                      fit["sd_abnormal"]))
    np.testing.assert_allclose(L_no["volume"][rows], stats.norm.pdf(x[rows], fit["mean_normal"], fit["sd_normal"]))
    # The most abnormal subjects favour the event.
    assert (L_yes["lesions"] > L_no["lesions"])[values["lesions"] > 5].all()

    with pytest.raises(ValueError, match="biomarker 'volume' shows no separation.*abnormal direction"):
        mixture_likelihoods(values[["volume"]], is_control, abnormal="higher")
    # Patients no different from controls (slightly to the normal side, so the test cannot pass by chance).
    same = pd.DataFrame({"noise": rng.normal(0, 1, len(x)) - 0.3 * ~is_control})
    with pytest.raises(ValueError, match="biomarker 'noise' shows no separation"):
        mixture_likelihoods(same, is_control, abnormal="higher")
    with pytest.raises(ValueError, match="is_control has 3 entries but values has 1000 subjects"):
        mixture_likelihoods(values, [True, False, True])
