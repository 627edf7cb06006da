"""Synthetic subtypes cohort (Zhuo-like regional volumes) and the demo's subtypes step."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from neuroatrophy.demo_subtypes import (
    REGIONS,
    SUBTYPE_REGION_ORDER,
    atlas_region_volumes,
    make_demo_cohort,
    run_subtypes_demo,
    subtype_recovery,
)
from neuroatrophy.subtypes_input import regional_zscores
from neuroatrophy.subtypes_pipeline import SubtypesResult


@pytest.fixture(scope="module")
def cohort():
    return make_demo_cohort(seed=0)


def test_atlas_volumes_are_plausible_adult_volumes():
    volumes = atlas_region_volumes()
    assert list(volumes.index) == REGIONS
    # Measured on the MNI152 aparc+aseg atlas, rescaled to a 1,150 mL brain (mL).
    assert 350 < volumes["cortical_gm"] < 550 and 400 < volumes["cerebral_wm"] < 600
    assert 80 < volumes["cerebellar_gm"] < 130 and 20 < volumes["cerebellar_wm"] < 40
    assert 14 < volumes["thalamus"] < 24 and 15 < volumes["brainstem"] < 35
    assert 30 < volumes["subcortical_gm"] < 60
    assert volumes["spinal_cord"] == 75.0   # synthetic cord area, mm²
    assert volumes.drop("spinal_cord").sum() < 1150


def test_cohort_is_reproducible_and_seeded(cohort):
    table, truth = cohort
    again, truth_again = make_demo_cohort(seed=0)
    pd.testing.assert_frame_equal(table, again)
    pd.testing.assert_series_equal(truth.stage, truth_again.stage)
    other, _ = make_demo_cohort(seed=1)
    assert not np.allclose(other[REGIONS].to_numpy(), table[REGIONS].to_numpy())


def test_cohort_layout_and_truth(cohort):
    table, truth = cohort
    assert list(table.columns) == ["subject_id", "group", "age", "sex", "icv", *REGIONS, "edss", "sdmt"]
    assert (table["group"] == "control").sum() == 300 and (table["group"] == "patient").sum() == 300
    assert table["subject_id"].is_unique and table["age"].between(18, 70).all()
    assert set(table["sex"]) == {"F", "M"} and (table[REGIONS] > 0).all().all()
    patients = table["group"] == "patient"
    assert table.loc[~patients, ["edss", "sdmt"]].isna().all().all()
    assert table.loc[patients, ["edss", "sdmt"]].notna().all().all()
    assert table.loc[patients, "edss"].between(0, 9.5).all()

    ids = table["subject_id"]
    assert (truth.subtype[ids[~patients]] == 0).all() and set(truth.subtype[ids[patients]]) == {1, 2, 3}
    assert (truth.stage[ids[~patients]] == 0).all()
    assert 0.1 < (truth.stage[ids[patients]] == 0).mean() < 0.3   # a normal-appearing group
    assert truth.n_events == 24 and truth.stage.max() <= 24
    # Each subtype's regions become abnormal in its planted order, z-levels in increasing order.
    onset = truth.region_onset()
    for c, order in enumerate(SUBTYPE_REGION_ORDER):
        assert list(np.array(REGIONS)[np.argsort(onset[c])]) == order
        for b in range(len(REGIONS)):
            positions = [list(truth.sequences[c]).index(e) for e in np.flatnonzero(truth.event_biomarker == b)]
            assert positions == sorted(positions)


def test_zscores_against_controls_recover_the_planted_atrophy(cohort):
    table, truth = cohort
    z, _ = regional_zscores(table, REGIONS, covariates=("age", "sex", "icv"), abnormal="lower",
                            patients_only=False)
    residual = z - truth.atrophy.loc[z.index]
    # Age, sex and ICV are regressed out: what is left is unit noise around the true z (larger = atrophy).
    assert residual.mean().abs().max() < 0.15
    assert residual.std().between(0.85, 1.2).all()
    patients = truth.subtype.loc[z.index] > 0
    assert (z[patients].mean() > 1.0).all()


def test_clinical_scores_follow_stage_and_subtype(cohort):
    table, truth = cohort
    patients = table.set_index("subject_id").loc[truth.subtype.index[truth.subtype > 0]]
    stage, subtype = truth.stage[patients.index], truth.subtype[patients.index]
    for c in (1, 2, 3):
        members = subtype == c
        assert stats.spearmanr(stage[members], patients.loc[members, "edss"])[0] > 0.5
    means = patients.groupby(subtype.to_numpy())["edss"].mean()
    assert means[2] > means[1]   # the spinal cord-brainstem subtype is the most disabled


def test_recovery_of_the_truth_itself_is_perfect(cohort):
    _, truth = cohort
    staged = pd.DataFrame({"ml_subtype": truth.subtype.clip(lower=1), "ml_stage": truth.stage})
    recovery = subtype_recovery(truth, staged)
    assert recovery["ari_cases"] == 1.0 and recovery["accuracy_cases"] == 1.0
    assert recovery["stage_spearman"] == pytest.approx(1.0) and recovery["stage0_agreement"] == 1.0
    with pytest.raises(ValueError, match="lacks 300 demo patient"):
        subtype_recovery(truth, staged.iloc[:10])


def test_quick_demo_recovers_the_planted_subtypes(tmp_path):
    messages = []
    outcome = run_subtypes_demo(tmp_path / "subtypes", quick=True, progress=lambda f, m: messages.append((f, m)))
    recovery = outcome["recovery"]
    # Thresholds: measured 0.66, 0.76, 0.76 (ARI), 0.87-0.91 (accuracy), 0.95-0.96 (stage rho) for seeds 0-2
    # with the quick settings; pySuStaIn's own 5-region simulation reaches ARI 0.35 on cases (sustain.md §10).
    assert recovery["chosen_n_subtypes"] == 3
    assert recovery["ari_cases"] > 0.5 and recovery["accuracy_cases"] > 0.8
    assert recovery["stage_spearman"] > 0.9
    assert np.mean(list(recovery["onset_kendall"].values())) > 0.5
    assert messages[-1][0] == 1.0

    folder = tmp_path / "subtypes"
    for name in ("cohort.csv", "ground_truth.csv", "scorer.json", "recovery.json", "analysis/settings.json",
                 "analysis/subjects.csv", "associations/stage_associations.csv"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "recovery.json").read_text())["ari_cases"] == recovery["ari_cases"]
    loaded = SubtypesResult.load(folder / "analysis")
    pd.testing.assert_frame_equal(loaded.staged, outcome["result"].staged, check_exact=True)
    truth = pd.read_csv(folder / "ground_truth.csv", dtype={"subject_id": str}).set_index("subject_id")
    assert set(truth.columns) == {"true_subtype", "true_stage"} and len(truth) == 600
    stages = outcome["associations"].stage_associations
    assert (stages.loc[stages["score"] == "edss", "beta"] > 0).all()
