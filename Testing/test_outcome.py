"""Tests for neuroatrophy.outcome (target connectivity vs treatment outcome) and its scatter figure."""

import time

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from scipy import stats

from neuroatrophy.cohort import read_cohort
from neuroatrophy.outcome import association, fit_line, permutation_indices, target_outcome_analysis
from neuroatrophy.plotting import target_outcome_figure


def _correlated(rng, n, r):
    """x, y with population correlation r."""
    x = rng.standard_normal(n)
    return x, r * x + np.sqrt(1 - r**2) * rng.standard_normal(n)


def _naive_permutation_p(statistic, permutations):
    """Two-sided permutation p of statistic(permuted index) by a plain loop."""
    observed = abs(statistic(np.arange(permutations.shape[1])))
    null = np.array([abs(statistic(p)) for p in permutations])
    return (1 + np.sum(null >= observed - 1e-12)) / (1 + len(permutations))


def _ols_t(design, y, column):
    """t statistic of one coefficient by numpy least squares."""
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ beta
    df = len(y) - design.shape[1]
    covariance = residual @ residual / df * np.linalg.inv(design.T @ design)
    return beta[column] / np.sqrt(covariance[column, column])


@pytest.fixture
def cohort_and_connectivity(rng):
    """40 patients: outcome depends on connectivity to 'DLPFC' (r ~ 0.6), age and site; 4 null targets."""
    n = 40
    subjects = [f"sub-{i:02d}" for i in range(n)]
    age = rng.uniform(20, 60, n)
    site = rng.choice(["A", "B", "C"], n)
    connectivity = pd.DataFrame(rng.standard_normal((n, 5)), index=subjects,
                                columns=["DLPFC", "sgACC", "TPJ", "F3", "BA9"])
    outcome = (0.8 * connectivity["DLPFC"].to_numpy() + 0.03 * (age - 40) + (site == "B") * 0.5
               + 0.8 * rng.standard_normal(n))
    cohort = pd.DataFrame({"subject_id": subjects, "age": age, "sex": rng.choice(["F", "M"], n), "site": site,
                           "PANSS_change": outcome})
    return cohort, connectivity


# ------------------------------------------------------------ association
def test_pearson_and_spearman_match_scipy(rng):
    x, y = _correlated(rng, 50, 0.3)
    result = association(x, y, n_permutations=0)
    expected = stats.pearsonr(x, y)
    assert result["n"] == 50 and result["method"] == "pearson"
    assert result["r"] == pytest.approx(expected.statistic, abs=1e-12)
    assert result["p_parametric"] == pytest.approx(expected.pvalue, rel=1e-9)
    assert np.isnan(result["p_permutation"])
    y_tied = np.round(y * 2) / 2  # ties get average ranks
    spearman = association(x, y_tied, n_permutations=0, method="spearman")
    expected = stats.spearmanr(x, y_tied)
    assert spearman["r"] == pytest.approx(expected.statistic, abs=1e-12)
    assert spearman["p_parametric"] == pytest.approx(expected.pvalue, rel=1e-9)


def test_simulated_effect_is_recovered_with_its_sign(rng):
    for true_r in (0.5, -0.5):
        x, y = _correlated(rng, 60, true_r)
        result = association(x, y, n_permutations=2000, seed=1)
        assert np.sign(result["r"]) == np.sign(true_r)
        assert 0.3 < abs(result["r"]) < 0.7
        assert result["p_parametric"] < 0.05 and result["p_permutation"] < 0.05
        # With normal data the permutation p approximates the t-test p.
        assert result["p_permutation"] == pytest.approx(result["p_parametric"], abs=0.003)
        spearman = association(x, y, n_permutations=2000, seed=1, method="spearman")
        assert np.sign(spearman["r"]) == np.sign(true_r) and spearman["p_permutation"] < 0.05


def test_permutation_p_values_are_uniform_under_the_null(rng):
    """200 null datasets: the plain and the Freedman-Lane tests keep their size.

    For Freedman-Lane, x and y both depend on a covariate z but x has no effect given z:
    the unadjusted test is then (correctly) significant far more often than 5 %.
    """
    n_datasets, n = 200, 30
    plain, adjusted, unadjusted_confounded = [], [], []
    for i in range(n_datasets):
        x, y = rng.standard_normal(n), rng.standard_normal(n)
        plain.append(association(x, y, n_permutations=499, seed=i)["p_permutation"])
        z = rng.standard_normal(n)
        xc, yc = z + 0.7 * rng.standard_normal(n), z + 0.7 * rng.standard_normal(n)
        result = association(xc, yc, covariates=z[:, None], n_permutations=499, seed=i)
        adjusted.append(result["p_permutation_adjusted"])
        unadjusted_confounded.append(result["p_permutation"])
    # 99.9 % binomial interval of the number of p < 0.05 among 200 null tests.
    low, high = stats.binom.ppf([0.0005, 0.9995], n_datasets, 0.05)
    for p_values in (plain, adjusted):
        p_values = np.asarray(p_values)
        assert low <= np.sum(p_values < 0.05) <= high
        assert stats.kstest(p_values, "uniform").pvalue > 0.001
        assert p_values.min() >= 1 / 500 and p_values.max() <= 1
    assert np.mean(np.asarray(unadjusted_confounded) < 0.05) > 0.5


def test_permutation_p_equals_a_naive_loop_and_freedman_lane_without_covariates(rng):
    x, y = _correlated(rng, 25, 0.35)
    permutations = permutation_indices(25, 999, seed=7)
    assert permutations.shape == (999, 25)
    assert all(np.array_equal(np.sort(p), np.arange(25)) for p in permutations)
    naive = _naive_permutation_p(lambda p: np.corrcoef(x, y[p])[0, 1], permutations)
    result = association(x, y, n_permutations=999, seed=7)
    assert result["p_permutation"] == naive
    # Freedman-Lane with an empty covariate set is the plain permutation test.
    empty = association(x, y, covariates=np.empty((25, 0)), n_permutations=999, seed=7)
    assert empty["p_permutation_adjusted"] == naive
    assert empty["partial_r"] == pytest.approx(result["r"], abs=1e-12)
    assert empty["p_parametric_adjusted"] == pytest.approx(result["p_parametric"], rel=1e-9)
    # The same seed gives the same permutations; another seed other ones.
    assert association(x, y, n_permutations=999, seed=7)["p_permutation"] == naive
    assert not np.array_equal(permutation_indices(25, 999, seed=8), permutations)


def test_freedman_lane_equals_a_naive_refit_of_every_permutation(rng):
    n = 24
    covariates = pd.DataFrame({"age": rng.uniform(20, 60, n), "sex": rng.choice(["F", "M"], n)})
    nuisance = np.column_stack([np.ones(n), covariates["age"], covariates["sex"] == "M"]).astype(float)
    x = 0.05 * covariates["age"].to_numpy() + rng.standard_normal(n)
    y = 0.3 * x + 0.04 * covariates["age"].to_numpy() + rng.standard_normal(n)
    gamma, *_ = np.linalg.lstsq(nuisance, y, rcond=None)
    fitted, residual = nuisance @ gamma, y - nuisance @ gamma
    full = np.column_stack([nuisance, x])
    permutations = permutation_indices(n, 300, seed=3)
    naive = _naive_permutation_p(lambda p: _ols_t(full, fitted + residual[p], 3), permutations)
    result = association(x, y, covariates, n_permutations=300, seed=3)
    assert result["p_permutation_adjusted"] == naive
    assert result["t"] == pytest.approx(_ols_t(full, y, 3), rel=1e-9)


def test_adjusted_beta_t_and_partial_r_match_least_squares(rng):
    n = 50
    covariates = pd.DataFrame({"age": rng.uniform(20, 60, n), "site": rng.choice(["s1", "s2", "s3"], n)})
    x = rng.standard_normal(n) + 0.02 * covariates["age"].to_numpy()
    y = 2.0 * x - 0.05 * covariates["age"].to_numpy() + (covariates["site"] == "s2").to_numpy() + rng.standard_normal(n)
    result = association(x, y, covariates, n_permutations=100)
    dummies = np.column_stack([covariates["site"] == "s2", covariates["site"] == "s3"]).astype(float)
    nuisance = np.column_stack([np.ones(n), covariates["age"], dummies])
    zx, zy = (x - x.mean()) / x.std(), (y - y.mean()) / y.std()
    design = np.column_stack([nuisance, zx])
    coefficients, *_ = np.linalg.lstsq(design, zy, rcond=None)
    assert result["beta"] == pytest.approx(coefficients[-1], rel=1e-9)
    t = _ols_t(design, zy, 4)
    assert result["t"] == pytest.approx(t, rel=1e-9)
    assert result["p_parametric_adjusted"] == pytest.approx(2 * stats.t.sf(abs(t), n - 5), rel=1e-8)
    residual_x = x - nuisance @ np.linalg.lstsq(nuisance, x, rcond=None)[0]
    residual_y = y - nuisance @ np.linalg.lstsq(nuisance, y, rcond=None)[0]
    assert result["partial_r"] == pytest.approx(np.corrcoef(residual_x, residual_y)[0, 1], abs=1e-12)
    # Array covariates give the same result as the equivalent numeric DataFrame.
    as_array = association(x, y, np.column_stack([covariates["age"], dummies]), n_permutations=100)
    for key in ("beta", "t", "partial_r", "p_permutation_adjusted"):
        assert as_array[key] == pytest.approx(result[key], rel=1e-9)


def test_association_input_errors(rng):
    x = rng.standard_normal(10)
    with pytest.raises(ValueError, match="same length, got 10 and 9"):
        association(x, x[:9])
    with pytest.raises(ValueError, match="At least 3 subjects"):
        association(x[:2], x[:2])
    with pytest.raises(ValueError, match="y is constant"):
        association(x, np.ones(10))
    with pytest.raises(ValueError, match="x has missing or non-finite values at positions 3"):
        association(np.where(np.arange(10) == 3, np.nan, x), x)
    with pytest.raises(ValueError, match="method must be one of pearson, spearman"):
        association(x, x, method="kendall")
    with pytest.raises(ValueError, match="n_permutations must be a non-negative integer"):
        association(x, x, n_permutations=10.5)
    with pytest.raises(ValueError, match="Covariate 'sex' has a single value"):
        association(x, x[::-1], pd.DataFrame({"sex": ["F"] * 10}))
    with pytest.raises(ValueError, match="Covariate 'age' has missing values for 2"):
        association(x, x[::-1], pd.DataFrame({"age": np.where(np.arange(10) == 2, np.nan, 1.0 * np.arange(10))}))
    with pytest.raises(ValueError, match="collinear"):
        association(x, x[::-1], np.column_stack([np.arange(10), 2 * np.arange(10)]))
    with pytest.raises(ValueError, match="fully explained by the covariates"):
        association(x, rng.standard_normal(10), 3 * x[:, None])
    with pytest.raises(ValueError, match="too few"):
        association(x[:4], x[:4][::-1], rng.standard_normal((4, 2)))


# ------------------------------------------------------ analysis over targets
def test_target_outcome_analysis_recovers_the_effect_and_controls_fwe(cohort_and_connectivity):
    cohort, connectivity = cohort_and_connectivity
    table = target_outcome_analysis(connectivity, cohort, "PANSS_change", n_permutations=2000, seed=5)
    assert list(table.columns) == ["target", "n", "r", "p_parametric", "p_permutation", "p_fwe"]
    assert table["target"].tolist() == list(connectivity.columns) and set(table["n"]) == {40}
    assert table.attrs["outcome"] == "PANSS_change" and table.attrs["n_permutations"] == 2000
    dlpfc = table.set_index("target").loc["DLPFC"]
    assert dlpfc["r"] > 0.3 and dlpfc["p_permutation"] < 0.01 and dlpfc["p_fwe"] < 0.05
    assert np.all(table["p_fwe"] >= table["p_permutation"])
    # Each target's statistics are those of association() with the same permutations.
    y = cohort["PANSS_change"].to_numpy()
    for _, row in table.iterrows():
        single = association(connectivity[row["target"]], y, n_permutations=2000, seed=5)
        assert row["r"] == pytest.approx(single["r"], abs=1e-12)
        assert row["p_permutation"] == single["p_permutation"]
    # p_fwe is the max-statistic p: a naive loop over the same permutations.
    permutations = permutation_indices(40, 2000, seed=5)
    X = connectivity.to_numpy()
    null_max = np.array([np.abs([np.corrcoef(X[:, j], y[p])[0, 1] for j in range(5)]).max() for p in permutations])
    expected = [(1 + np.sum(null_max >= abs(r) - 1e-12)) / 2001 for r in table["r"]]
    np.testing.assert_array_equal(table["p_fwe"], expected)


def test_target_outcome_analysis_with_covariates_from_a_cohort_file(cohort_and_connectivity, tmp_path):
    cohort, connectivity = cohort_and_connectivity
    path = tmp_path / "cohort.csv"
    cohort.sample(frac=1.0, random_state=0).to_csv(path, index=False)  # other row order than connectivity
    from_file = read_cohort(path)
    table = target_outcome_analysis(connectivity, from_file, "PANSS_change", ["age", "sex", "site"],
                                    n_permutations=1000, seed=2)
    assert list(table.columns)[6:] == ["beta", "t", "partial_r", "p_parametric_adjusted", "p_permutation_adjusted",
                                       "p_fwe_adjusted"]
    assert table.attrs["covariates"] == ["age", "sex", "site"]
    direct = association(connectivity["DLPFC"], cohort["PANSS_change"], cohort[["age", "sex", "site"]],
                         n_permutations=1000, seed=2)
    row = table.set_index("target").loc["DLPFC"]
    for key in ("r", "beta", "t", "partial_r", "p_parametric_adjusted", "p_permutation_adjusted"):
        assert row[key] == pytest.approx(direct[key], rel=1e-9)
    assert row["p_fwe_adjusted"] < 0.05
    assert np.all(table["p_fwe_adjusted"] >= table["p_permutation_adjusted"])
    # Cohort keyed by its index instead of a subject_id column; extra subjects are ignored.
    extra = pd.DataFrame({"subject_id": ["sub-99"], "age": [30.0], "sex": ["F"], "site": ["A"], "PANSS_change": [1.0]})
    indexed = pd.concat([cohort, extra]).set_index("subject_id")
    again = target_outcome_analysis(connectivity, indexed, "PANSS_change", ["age", "sex", "site"],
                                    n_permutations=1000, seed=2)
    pd.testing.assert_frame_equal(again, table)


def test_analysis_is_fast(rng):
    n, k = 100, 10
    subjects = [f"s{i}" for i in range(n)]
    connectivity = pd.DataFrame(rng.standard_normal((n, k)), index=subjects)
    cohort = pd.DataFrame({"subject_id": subjects, "y": rng.standard_normal(n), "age": rng.uniform(20, 60, n),
                           "sex": rng.choice(["F", "M"], n)})
    start = time.perf_counter()
    table = target_outcome_analysis(connectivity, cohort, "y", ["age", "sex"], n_permutations=5000)
    assert time.perf_counter() - start < 2.0
    assert len(table) == k


def _analysis_error(cohort, connectivity, outcome="PANSS_change", covariates=()):
    with pytest.raises(ValueError) as info:
        target_outcome_analysis(connectivity, cohort, outcome, covariates, n_permutations=10)
    return str(info.value)


def test_analysis_error_messages(cohort_and_connectivity):
    cohort, connectivity = cohort_and_connectivity
    missing = cohort.copy()
    missing.loc[:11, "PANSS_change"] = np.nan
    message = _analysis_error(missing, connectivity)
    assert "Outcome column 'PANSS_change' has missing values for" in message
    assert "sub-00, sub-01" in message and "sub-09 and 2 more" in message and "sub-10" not in message

    message = _analysis_error(cohort, connectivity, outcome="HAMD")
    assert "no column(s) 'HAMD'" in message and "'PANSS_change'" in message and "'age'" in message
    message = _analysis_error(cohort, connectivity, covariates=["age", "education"])
    assert "no column(s) 'education'" in message

    message = _analysis_error(cohort[cohort["subject_id"] != "sub-07"], connectivity)
    assert "Subjects in the connectivity table are not in the cohort: sub-07" in message

    message = _analysis_error(cohort, connectivity.iloc[:2])
    assert "At least 3 subjects" in message and "sub-00, sub-01" in message

    text = cohort.astype({"PANSS_change": object})
    text.loc[3, "PANSS_change"] = "worse"
    assert "Outcome column 'PANSS_change' is not a number for sub-03 ('worse')" in _analysis_error(text, connectivity)

    constant = cohort.assign(PANSS_change=2.0)
    assert "Outcome column 'PANSS_change' is constant" in _analysis_error(constant, connectivity)

    flat = connectivity.assign(TPJ=0.25)
    assert "constant across subjects for target(s) TPJ" in _analysis_error(cohort, flat)

    holes = connectivity.copy()
    holes.loc["sub-05", "sgACC"] = np.nan
    assert "connectivity of target 'sgACC' is missing or not a number for sub-05" in _analysis_error(cohort, holes)

    no_age = cohort.copy()
    no_age.loc[4, "age"] = np.nan
    assert "Covariate 'age' has missing values for sub-04" in _analysis_error(no_age, connectivity, covariates=["age"])

    duplicated = pd.concat([connectivity, connectivity.iloc[:1]])
    assert "duplicate subject ids: sub-00" in _analysis_error(cohort, duplicated)
    with pytest.raises(ValueError, match="connectivity must be a pandas DataFrame"):
        target_outcome_analysis(connectivity.to_numpy(), cohort, "PANSS_change")


# ------------------------------------------------------------- line and figure
def test_fit_line_matches_polyfit_and_band_formula(rng):
    x, y = _correlated(rng, 30, 0.6)
    line = fit_line(x, y, n_grid=51)
    slope, intercept = np.polyfit(x, y, 1)
    assert line["slope"] == pytest.approx(slope) and line["intercept"] == pytest.approx(intercept)
    assert line["x"][0] == x.min() and line["x"][-1] == x.max() and len(line["x"]) == 51
    np.testing.assert_allclose(line["y"], intercept + slope * line["x"])
    assert np.all(line["lower"] < line["y"]) and np.all(line["y"] < line["upper"])
    # Half-width at x0: t(0.975, n - 2) * s * sqrt(1/n + (x0 - mean x)^2 / Sxx), here at both ends.
    s = np.sqrt(np.sum((y - intercept - slope * x) ** 2) / 28)
    ends = fit_line(x, y, n_grid=2, level=0.95)
    sxx = np.sum((x - x.mean()) ** 2)
    expected = stats.t.ppf(0.975, 28) * s * np.sqrt(1 / 30 + (ends["x"] - x.mean()) ** 2 / sxx)
    np.testing.assert_allclose((ends["upper"] - ends["lower"]) / 2, expected)
    assert (line["upper"] - line["lower"]).argmin() == np.abs(line["x"] - x.mean()).argmin()  # narrowest at the mean
    with pytest.raises(ValueError, match="x is constant"):
        fit_line(np.ones(5), np.arange(5))
    with pytest.raises(ValueError, match="At least 3 points"):
        fit_line([1, 2], [1, 2])


def test_target_outcome_figure_writes_a_png(rng, tmp_path):
    x, y = _correlated(rng, 40, 0.5)
    result = association(x, y, n_permutations=500)
    path = target_outcome_figure(x, y, result, tmp_path / "dlpfc.png", target_name="DLPFC_F3",
                                 outcome_name="PANSS change")
    assert path == tmp_path / "dlpfc.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert pixels.shape[0] >= 400 and pixels.shape[1] >= 500
    assert len(np.unique(np.round(pixels[..., :3] * 255).astype(int).reshape(-1, 3), axis=0)) > 20
    assert [p.name for p in tmp_path.iterdir()] == ["dlpfc.png"]  # no temporary file left
    # A results row of the analysis table works too, and changes the figure (title).
    row = pd.Series({**result, "p_fwe": 0.2, "partial_r": 0.4, "p_permutation_adjusted": 0.01})
    other = target_outcome_figure(x, y, row, tmp_path / "row.png")
    assert other.read_bytes() != path.read_bytes()
    with pytest.raises(ValueError, match="results_row_or_dict has no 'p_permutation'"):
        target_outcome_figure(x, y, {"r": 0.5}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="must end in .png"):
        target_outcome_figure(x, y, result, tmp_path / "bad.pdf")
