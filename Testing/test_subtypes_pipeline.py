"""Subtype analysis pipeline: fit, cross-validated choice, atomic save, identical reload, clinical join."""

import json

import numpy as np
import pandas as pd
import pytest

from neuroatrophy.subtypes_clinical import stage_associations, subtype_differences
from neuroatrophy.subtypes_pipeline import (
    FORMAT_VERSION,
    SubtypesResult,
    associate,
    check_zscores,
    fit_subtypes,
    normalise_z_levels,
    normalise_z_max,
    read_zscores,
)
from neuroatrophy.sustain import SustainModel
from neuroatrophy.sustain_sim import event_order, simulate_zscore_sustain, trajectory_points

FAST = dict(n_startpoints=3, n_mcmc=2000, n_tune=300, n_jobs=1)


@pytest.fixture(scope="module")
def cohort():
    return simulate_zscore_sustain(n_subjects=160, n_biomarkers=4, z_levels=(1, 2), z_max=4.0, n_subtypes=2,
                                   fractions=(0.5, 0.5), control_fraction=0.1, seed=3)


@pytest.fixture(scope="module")
def result(cohort):
    return fit_subtypes(cohort.data, [1, 2], 4.0, max_subtypes=2, seed=0, **FAST)


# ------------------------------------------------------------------ fitting
def test_fit_keeps_every_model_and_stages_the_chosen_one(result, cohort):
    assert [m.n_subtypes for m in result.models] == [1, 2]
    assert result.chosen_n_subtypes == 2 and result.cv is None
    assert result.staged.index.equals(cohort.data.index)
    expected = result.models[1].stage(cohort.data)
    pd.testing.assert_frame_equal(result.staged, expected, check_exact=True)
    assert result.settings["z_levels"] == {b: [1.0, 2.0] for b in cohort.biomarkers}
    assert result.settings["z_max"] == {b: 4.0 for b in cohort.biomarkers}
    assert result.settings["seed"] == 0 and result.settings["n_mcmc"] == 2000
    assert result.timings["total_s"] >= result.timings["fit_s"] > 0
    # Staged subjects recover the simulated stages.
    cases = cohort.stage > 0
    rho = pd.Series(result.staged["ml_stage"].to_numpy()[cases]).corr(pd.Series(cohort.stage[cases]),
                                                                        method="spearman")
    assert rho > 0.8


def test_same_seed_same_result(cohort, result):
    again = fit_subtypes(cohort.data, [1, 2], 4.0, max_subtypes=2, seed=0, **FAST)
    pd.testing.assert_frame_equal(again.staged, result.staged, check_exact=True)
    np.testing.assert_array_equal(again.model.sequences, result.model.sequences)


def test_progress_reaches_one_and_is_reported(cohort):
    seen = []
    fit_subtypes(cohort.data, [1, 2], 4.0, max_subtypes=1, seed=0, progress=lambda f, m: seen.append((f, m)),
                 **FAST)
    assert seen[0][0] == 0.0 and seen[-1][0] == 1.0
    assert all(0.0 <= f <= 1.0 for f, _ in seen)
    assert any("MCMC" in m for _, m in seen) and any("E-M" in m for _, m in seen)


def _planted(n_true, n_subjects=240, seed=11):
    """Z-scores of 4 regions x z 1, 2 with focal, opposite orders (a clear case): region 1 first or last."""
    event_biomarker, event_z = event_order([[1.0, 2.0]] * 4)
    orders = [np.array([0, 4, 1, 5, 2, 6, 3, 7]), np.array([3, 7, 2, 6, 1, 5, 0, 4])][:n_true]
    rng = np.random.default_rng(seed)
    subtype = rng.integers(0, n_true, n_subjects)
    stage = rng.integers(1, 9, n_subjects)
    curves = np.stack([trajectory_points(o, event_biomarker, event_z, np.full(4, 4.0)) for o in orders])
    values = curves[subtype, stage] + rng.standard_normal((n_subjects, 4))
    index = pd.Index([f"s{i}" for i in range(n_subjects)], name="subject_id")
    return pd.DataFrame(values, index=index, columns=["a", "b", "c", "d"])


@pytest.mark.parametrize("n_true", [1, 2])
def test_cross_validation_picks_the_true_number_of_subtypes(n_true):
    data = _planted(n_true)
    result = fit_subtypes(data, [1, 2], 4.0, max_subtypes=3, cv_folds=3, seed=1, **FAST)
    assert result.chosen_n_subtypes == n_true == result.cv.best_n_subtypes
    assert list(result.cv.cvic.index) == [1, 2, 3]
    assert set(result.cv.table["fold"]) == {1, 2, 3}
    pd.testing.assert_frame_equal(result.staged, result.models[n_true - 1].stage(data), check_exact=True)


def test_mixture_kind_fits_event_likelihoods(cohort):
    from scipy import stats

    # Event / no-event likelihoods of the simulated z-scores: abnormal around 2, normal around 0.
    L_yes = pd.DataFrame(stats.norm.pdf(cohort.data, 2.0, 1.0), index=cohort.data.index, columns=cohort.biomarkers)
    L_no = pd.DataFrame(stats.norm.pdf(cohort.data, 0.0, 1.0), index=cohort.data.index, columns=cohort.biomarkers)
    result = fit_subtypes(cohort.data, kind="mixture", likelihoods=(L_yes, L_no), max_subtypes=2, seed=0, **FAST)
    assert result.model.kind == "mixture" and result.model.n_events == 4
    pd.testing.assert_frame_equal(result.staged, result.model.stage_likelihoods(L_yes, L_no), check_exact=True)
    with pytest.raises(ValueError, match="likelihoods"):
        fit_subtypes(cohort.data, kind="mixture", max_subtypes=1, **FAST)


@pytest.mark.parametrize("kwargs, message", [
    (dict(z_levels=[1, 2], z_max=2.0), "z_max of region 'Biomarker 1'"),
    (dict(z_levels=[2, 1], z_max=4.0), "increasing"),
    (dict(z_levels={"Biomarker 1": [1]}, z_max=4.0), r"no levels for region\(s\) \['Biomarker 2'"),
    (dict(z_levels=[1, 2], z_max=[4.0, 4.0]), "one value per region"),
    (dict(z_levels=[1, 2], z_max=4.0, cv_folds=1), "cv_folds"),
    (dict(z_levels=[1, 2], z_max=4.0, kind="ordinal"), "kind"),
    (dict(z_levels=[1, 2], z_max=4.0, max_subtypes=0), "max_subtypes"),
])
def test_bad_settings_name_the_parameter(cohort, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit_subtypes(cohort.data, **{**FAST, **kwargs})


def test_z_level_and_z_max_forms():
    names = ["a", "b"]
    assert normalise_z_levels([1, 2, 3], names) == [[1.0, 2.0, 3.0]] * 2
    assert normalise_z_levels({"b": [1], "a": [1, 2]}, names) == [[1.0, 2.0], [1.0]]
    assert normalise_z_levels(np.array([[1, 2, 3], [1, 2, 0]]), names) == [[1.0, 2.0, 3.0], [1.0, 2.0]]
    assert normalise_z_levels([[1, 2], [1.5]], names) == [[1.0, 2.0], [1.5]]
    np.testing.assert_array_equal(normalise_z_max(5, names), [5.0, 5.0])
    np.testing.assert_array_equal(normalise_z_max({"a": 4, "b": 6}, names), [4.0, 6.0])
    with pytest.raises(ValueError, match="region 'b' has no z-level"):
        normalise_z_levels([[1], [0]], names)
    with pytest.raises(ValueError, match="3 rows for 2 regions"):
        normalise_z_levels([[1], [1], [1]], names)


def test_non_numeric_region_is_named():
    table = pd.DataFrame({"hippocampus": [1.0, 2.0], "thalamus": ["0.5", "n/a"]}, index=["s1", "s2"])
    with pytest.raises(ValueError, match=r"column 'thalamus' is not numeric \(subject s2: 'n/a'\)"):
        check_zscores(table)
    with pytest.raises(ValueError, match="infinite"):
        check_zscores(pd.DataFrame({"x": [1.0, np.inf]}))


def test_read_zscores(tmp_path):
    path = tmp_path / "z.csv"
    pd.DataFrame({"subject_id": ["001", "002"], "a": [1.0, np.nan], "b": [0.5, 2.0]}).to_csv(path, index=False)
    table = read_zscores(path)
    assert list(table.index) == ["001", "002"] and list(table.columns) == ["a", "b"]
    assert np.isnan(table.loc["002", "a"])
    assert list(read_zscores(path, ["b"]).columns) == ["b"]
    with pytest.raises(ValueError, match=r"region column\(s\) \['c'\] not found"):
        read_zscores(path, ["c"])
    with pytest.raises(FileNotFoundError, match="z-score table not found"):
        read_zscores(tmp_path / "missing.csv")


# ------------------------------------------------------------------ saving and loading
def test_save_load_round_trip_stages_identically(result, cohort, tmp_path):
    folder = result.save(tmp_path / "analysis")
    names = sorted(p.name for p in folder.iterdir())
    for expected in ("model_k1.sustain", "model_k2.sustain", "subjects.csv", "settings.json", "zscores.csv",
                     "sequences.csv", "pvd_k1.png", "pvd_k2.png", "stages.png"):
        assert expected in names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no staging folder left

    loaded = SubtypesResult.load(folder)
    assert loaded.chosen_n_subtypes == 2 and loaded.settings == json.loads(json.dumps(result.settings))
    pd.testing.assert_frame_equal(loaded.zscores, result.zscores, check_exact=True)
    pd.testing.assert_frame_equal(loaded.staged, result.staged, check_exact=True)
    # The reloaded models stage the original and new subjects exactly as the fitted ones.
    pd.testing.assert_frame_equal(loaded.stage(cohort.data), result.staged, check_exact=True)
    new = cohort.data.iloc[::7] + 0.3
    for k in (1, 2):
        pd.testing.assert_frame_equal(loaded.stage(new, k), result.stage(new, k), check_exact=True)
        np.testing.assert_array_equal(loaded.models[k - 1].samples_sequence, result.models[k - 1].samples_sequence)
    header = json.loads((folder / "settings.json").read_text())
    assert header["format_version"] == FORMAT_VERSION and header["neuroatrophy_version"]
    assert header["timings"] == result.timings and header["files"] == sorted(names)

    sequences = pd.read_csv(folder / "sequences.csv")
    chosen = sequences[sequences["n_subtypes"] == 2]
    assert len(chosen) == 2 * result.model.n_events
    assert chosen["certainty"].between(0, 1).all()


def test_cv_results_round_trip(tmp_path, cohort):
    result = fit_subtypes(cohort.data, [1, 2], 4.0, max_subtypes=2, cv_folds=2, seed=0, **FAST)
    loaded = SubtypesResult.load(result.save(tmp_path / "cv"))
    assert (tmp_path / "cv" / "cv.png").is_file()
    np.testing.assert_allclose(loaded.cv.cvic.to_numpy(), result.cv.cvic.to_numpy(), rtol=1e-15)
    assert loaded.cv.best_n_subtypes == result.cv.best_n_subtypes == loaded.chosen_n_subtypes
    pd.testing.assert_frame_equal(loaded.cv.table, result.cv.table, check_dtype=False)


def test_save_replaces_an_earlier_result_but_never_another_folder(result, tmp_path):
    folder = tmp_path / "analysis"
    result.save(folder)
    (folder / "stale.txt").write_text("from an earlier run")
    result.save(folder)
    assert not (folder / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis"]

    other = tmp_path / "data"
    other.mkdir()
    (other / "precious.csv").write_text("x")
    with pytest.raises(ValueError, match="neither empty nor a subtypes result"):
        result.save(other)
    assert (other / "precious.csv").read_text() == "x"
    with pytest.raises(FileNotFoundError, match="parent does not exist"):
        result.save(tmp_path / "no" / "such" / "folder")


def test_failed_save_leaves_the_earlier_result_intact(result, tmp_path):
    folder = result.save(tmp_path / "analysis")
    before = (folder / "subjects.csv").read_bytes()

    class Broken:
        n_subtypes = 1

        def save(self, path):
            raise ValueError("disk full")

    broken = SubtypesResult([Broken()], 1, result.staged, None, result.zscores, result.settings)
    with pytest.raises(ValueError, match="disk full"):
        broken.save(folder)
    assert (folder / "subjects.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis"]


def test_load_refuses_other_folders_and_newer_formats(result, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a subtypes result folder"):
        SubtypesResult.load(tmp_path)
    folder = result.save(tmp_path / "analysis")
    header = json.loads((folder / "settings.json").read_text())
    header["format_version"] = FORMAT_VERSION + 1
    (folder / "settings.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="update NeuroAtrophy"):
        SubtypesResult.load(folder)
    assert isinstance(SustainModel.load(folder / "model_k2.sustain"), SustainModel)


# ------------------------------------------------------------------ clinical associations
def _clinical(staged, rng):
    n = len(staged)
    stage = staged["ml_stage"].to_numpy()
    return pd.DataFrame({
        "subject_id": staged.index,
        "age": rng.uniform(20, 60, n).round(1),
        "sex": rng.choice(["F", "M"], n),
        "edss": (1 + 0.4 * stage + staged["ml_subtype"].to_numpy() + rng.normal(0, 1, n)).round(1),
    })


def test_associate_joins_on_subject_ids(result, rng):
    clinical = _clinical(result.staged, rng)
    extra = pd.DataFrame({"subject_id": ["someone-else"], "age": [40.0], "sex": ["F"], "edss": [3.0]})
    shuffled = pd.concat([clinical.sample(frac=1.0, random_state=1), extra], ignore_index=True)
    associations = associate(result, shuffled, ["edss"], ["age", "sex"])

    table = result.staged.join(clinical.set_index("subject_id"))
    pd.testing.assert_frame_equal(associations.table, table, check_like=True)
    pd.testing.assert_frame_equal(associations.subtype_differences,
                                  subtype_differences(table, ["edss"], covariates=["age", "sex"]))
    pd.testing.assert_frame_equal(associations.stage_associations,
                                  stage_associations(table, ["edss"], covariates=["age", "sex"]))
    overall = associations.stage_associations.set_index("subtype").loc["all"]
    assert overall["beta"] == pytest.approx(0.4, abs=0.15)


def test_associate_names_missing_subjects_and_columns(result, rng, tmp_path):
    clinical = _clinical(result.staged, rng)
    dropped = clinical.iloc[3:]
    with pytest.raises(ValueError, match=r"3 staged subject\(s\) are missing from the clinical table: "
                                         + ", ".join(clinical["subject_id"].iloc[:3])):
        associate(result, dropped, ["edss"])
    with pytest.raises(ValueError, match=r"no column\(s\) \['sdmt'\]"):
        associate(result, clinical, ["edss", "sdmt"], ["age"])
    saved = associate(result.staged, clinical, "edss").save(tmp_path / "assoc")
    assert sorted(p.name for p in saved.iterdir()) == ["stage_associations.csv", "subtype_differences.csv",
                                                       "table.csv"]
