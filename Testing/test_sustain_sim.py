"""Tests of neuroatrophy.sustain_sim: simulated SuStaIn cohorts and recovery metrics."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neuroatrophy.sustain_sim import (
    SimulatedCohort,
    event_order,
    random_sequence,
    recovery,
    simulate_mixture_sustain,
    simulate_zscore_sustain,
    trajectory_points,
)

REFERENCE = Path(__file__).parent / "data" / "pysustain_reference.json"


def _is_valid(sequence, event_biomarker, event_z):
    """Each biomarker's events appear in increasing z-level and the sequence is a permutation."""
    if sorted(sequence) != list(range(len(event_biomarker))):
        return False
    for b in np.unique(event_biomarker):
        z_in_order = [event_z[e] for e in sequence if event_biomarker[e] == b]
        if z_in_order != sorted(z_in_order):
            return False
    return True


# ------------------------------------------------------------------------ events
def test_event_order_is_z_level_major_like_pysustain():
    biomarker, z = event_order([[1, 2, 3], [1, 2, 3]])
    assert biomarker.tolist() == [0, 1, 0, 1, 0, 1]
    assert z.tolist() == [1, 1, 2, 2, 3, 3]
    # A biomarker with fewer levels is skipped where it has none (pySuStaIn's Z_vals 0 entries).
    biomarker, z = event_order([[1, 2, 3], [1.5], [1, 2]])
    assert biomarker.tolist() == [0, 1, 2, 0, 2, 0]
    assert z.tolist() == [1, 1.5, 1, 2, 2, 3]


def test_random_sequences_are_valid_and_cover_the_choices():
    biomarker, z = event_order([[1, 2, 3], [1, 2], [2]])
    rng = np.random.default_rng(3)
    draws = [tuple(random_sequence(biomarker, z, rng)) for _ in range(300)]
    assert all(_is_valid(list(s), biomarker, z) for s in draws)
    # Six events, three biomarkers: many distinct valid orders, and every biomarker comes first sometimes.
    assert len(set(draws)) > 20
    assert {biomarker[s[0]] for s in draws} == {0, 1, 2}


def test_trajectory_points_hand_computed():
    # One biomarker, z 1 and 2, z_max 5, sequence [0, 1]: knots (0,0), (1,1), (2,2), (3,5).
    biomarker, z = event_order([[1, 2]])
    assert trajectory_points([0, 1], biomarker, z, [5.0])[:, 0].tolist() == [0, 1, 2, 5]
    # Two biomarkers: events e0 = (b0, 1), e1 = (b1, 1), e2 = (b0, 2), e3 = (b1, 2); order e1, e3, e0, e2.
    biomarker, z = event_order([[1, 2], [1, 2]])
    points = trajectory_points([1, 3, 0, 2], biomarker, z, [5.0, 5.0])
    np.testing.assert_allclose(points[:, 0], [0, 1 / 3, 2 / 3, 1, 2, 5])
    np.testing.assert_allclose(points[:, 1], [0, 1, 2, 3, 4, 5])


# -------------------------------------------------------------------- simulation
def test_simulation_is_reproducible_by_seed():
    a = simulate_zscore_sustain(n_subjects=200, seed=11)
    b = simulate_zscore_sustain(n_subjects=200, seed=11)
    c = simulate_zscore_sustain(n_subjects=200, seed=12)
    pd.testing.assert_frame_equal(a.data, b.data)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    np.testing.assert_array_equal(a.subtype, b.subtype)
    np.testing.assert_array_equal(a.stage, b.stage)
    assert not np.allclose(a.data.to_numpy(), c.data.to_numpy())
    m1, m2 = simulate_mixture_sustain(n_subjects=100, seed=4), simulate_mixture_sustain(n_subjects=100, seed=4)
    pd.testing.assert_frame_equal(m1.L_yes, m2.L_yes)
    np.testing.assert_array_equal(m1.sequences, m2.sequences)


def test_simulated_cohort_layout_and_valid_sequences():
    cohort = simulate_zscore_sustain(n_subjects=120, n_biomarkers=4, z_levels=[[1, 2, 3], [1, 2], [1, 2, 3], [2]],
                                     z_max=[5, 4, 6, 3], n_subtypes=2, fractions=(0.6, 0.4), seed=1,
                                     biomarkers=["a", "b", "c", "d"])
    assert list(cohort.data.columns) == ["a", "b", "c", "d"]
    assert cohort.data.index[0] == "sub-0001" and cohort.data.index[-1] == "sub-0120"
    assert cohort.n_events == 9 and cohort.sequences.shape == (2, 9)
    assert cohort.event_biomarker.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 2]
    for sequence in cohort.sequences:
        assert _is_valid(list(sequence), cohort.event_biomarker, cohort.event_z)
    assert not np.array_equal(cohort.sequences[0], cohort.sequences[1])
    # pySuStaIn's Z_vals: one row per biomarker, 0 where there is no event.
    np.testing.assert_array_equal(cohort.z_vals(), [[1, 2, 3], [1, 2, 0], [1, 2, 3], [2, 0, 0]])
    assert np.all(cohort.subtype[cohort.stage == 0] == 0)
    assert np.all(np.isin(cohort.subtype[cohort.stage > 0], [1, 2]))


def test_stage_and_subtype_proportions():
    cohort = simulate_zscore_sustain(n_subjects=6000, seed=5)
    n_events = cohort.n_events
    assert np.sum(cohort.stage == 0) == 1500  # exactly round(0.25 * 6000) controls
    cases = cohort.stage > 0
    counts = np.bincount(cohort.stage[cases], minlength=n_events + 1)[1:]
    expected = cases.sum() / n_events
    assert counts.min() > 0.75 * expected and counts.max() < 1.25 * expected  # uniform over 1..N
    fractions = np.bincount(cohort.subtype[cases], minlength=4)[1:] / cases.sum()
    np.testing.assert_allclose(fractions, [0.5, 0.3, 0.2], atol=0.025)


def test_noiseless_values_follow_the_curve_at_the_stage():
    cohort = simulate_zscore_sustain(n_subjects=300, noise_sd=0.0, seed=2)
    np.testing.assert_array_equal(cohort.data.to_numpy(), cohort.noiseless)
    n_events = cohort.n_events
    for k, sequence in enumerate(cohort.sequences):
        curve = trajectory_points(sequence, cohort.event_biomarker, cohort.event_z, cohort.z_max)
        position = np.argsort(sequence)
        for e in range(n_events):  # the knot of every event: pos(e) + 1 -> z_e
            assert curve[position[e] + 1, cohort.event_biomarker[e]] == cohort.event_z[e]
        np.testing.assert_array_equal(curve[0], 0.0)
        np.testing.assert_array_equal(curve[n_events + 1], cohort.z_max)
        assert np.all(np.diff(curve, axis=0) >= 0)
        members = cohort.subtype == k + 1
        np.testing.assert_array_equal(cohort.noiseless[members], curve[cohort.stage[members]])
    np.testing.assert_array_equal(cohort.noiseless[cohort.stage == 0], 0.0)
    # With noise, residuals are N(0, noise_sd).
    noisy = simulate_zscore_sustain(n_subjects=2000, noise_sd=0.5, seed=2)
    residual = noisy.data.to_numpy() - noisy.noiseless
    assert abs(residual.std() - 0.5) < 0.02 and abs(residual.mean()) < 0.02


def test_mixture_simulation_has_exact_densities_and_event_pattern():
    sim = simulate_mixture_sustain(n_subjects=3000, n_biomarkers=4, shift=3.0, seed=9)
    x = sim.data.to_numpy()
    np.testing.assert_allclose(sim.L_yes.to_numpy(), np.exp(-0.5 * (x - 3.0) ** 2) / np.sqrt(2 * np.pi))
    np.testing.assert_allclose(sim.L_no.to_numpy(), np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi))
    assert all(sorted(s) == [0, 1, 2, 3] for s in sim.sequences)
    assert sim.stage.max() == 4 and np.sum(sim.stage == 0) == 750
    # A subject's abnormal biomarkers are the first `stage` events of its subtype.
    for k, sequence in enumerate(sim.sequences):
        members = np.flatnonzero(sim.subtype == k + 1)
        abnormal = np.zeros((len(members), 4), bool)
        for row, subject in enumerate(members):
            abnormal[row, sequence[: sim.stage[subject]]] = True
        values = x[members]
        assert abs(values[abnormal].mean() - 3.0) < 0.1 and abs(values[~abnormal].mean()) < 0.1


def test_bad_simulation_input_raises():
    with pytest.raises(ValueError, match="z_max of biomarker 0"):
        simulate_zscore_sustain(z_levels=(1, 2, 3), z_max=3.0)
    with pytest.raises(ValueError, match="not increasing"):
        simulate_zscore_sustain(z_levels=(1, 3, 2))
    with pytest.raises(ValueError, match="fractions"):
        simulate_zscore_sustain(fractions=(0.5, 0.3, 0.3))
    with pytest.raises(ValueError, match="fractions"):
        simulate_zscore_sustain(n_subtypes=2)
    with pytest.raises(ValueError, match="control_fraction"):
        simulate_mixture_sustain(control_fraction=1.0)
    with pytest.raises(ValueError, match="z_levels: 2 lists"):
        simulate_zscore_sustain(n_biomarkers=3, z_levels=[[1, 2], [1]])


# ---------------------------------------------------------------------- recovery
class _Model:
    def __init__(self, sequences, event_biomarker=None, event_z=None):
        self.sequences = np.asarray(sequences)
        if event_biomarker is not None:
            self.event_biomarker, self.event_z = event_biomarker, event_z


def test_recovery_of_the_truth_is_perfect_and_invariant_to_relabelling():
    cohort = simulate_zscore_sustain(n_subjects=400, seed=3)
    perfect = recovery(cohort, cohort.truth(), cohort)
    for key in ("ari_all", "ari_cases", "matched_accuracy_cases", "stage_spearman_all", "stage_spearman_cases",
                "stage_kendall_all", "stage_kendall_cases", "sequence_kendall_mean"):
        assert perfect[key] == pytest.approx(1.0), key
    assert perfect["subtype_match"] == [1, 2, 3]

    # A noisy estimate: 20 % of cases moved to another subtype, stages jittered, two events swapped.
    rng = np.random.default_rng(0)
    estimate = cohort.truth()
    cases = np.flatnonzero(cohort.stage > 0)
    moved = rng.choice(cases, size=len(cases) // 5, replace=False)
    estimate.iloc[moved, 0] = estimate.iloc[moved, 0] % 3 + 1
    estimate["ml_stage"] = np.clip(estimate["ml_stage"] + rng.integers(-2, 3, len(estimate)), 0, cohort.n_events)
    estimate.loc[estimate["ml_subtype"] == 0, "ml_subtype"] = rng.integers(1, 4, (estimate["ml_subtype"] == 0).sum())
    sequences = cohort.sequences.copy()
    sequences[0, [3, 4]] = sequences[0, [4, 3]]
    base = recovery(cohort, estimate, _Model(sequences))
    assert 0.3 < base["ari_cases"] < 0.9 and base["matched_accuracy_cases"] == pytest.approx(0.8, abs=0.01)

    relabel = np.array([0, 3, 1, 2])  # estimated subtype s -> relabel[s]; model rows follow the new labels
    permuted = estimate.assign(ml_subtype=relabel[estimate["ml_subtype"].to_numpy()])
    permuted_sequences = np.empty_like(sequences)
    permuted_sequences[relabel[1:] - 1] = sequences
    shuffled = permuted.sample(frac=1.0, random_state=1)  # row order does not matter either
    other = recovery(cohort, shuffled, _Model(permuted_sequences))
    for key in ("ari_all", "ari_cases", "matched_accuracy_cases", "stage_spearman_all", "stage_kendall_cases",
                "sequence_kendall"):
        assert other[key] == pytest.approx(base[key]), key
    assert other["subtype_match"] == relabel[base["subtype_match"]].tolist()


def test_recovery_hand_checked_case():
    # Two biomarkers x z (1, 2): events e0 = (b0, 1), e1 = (b1, 1), e2 = (b0, 2), e3 = (b1, 2).
    biomarker, z = event_order([[1, 2], [1, 2]])
    truth = SimulatedCohort(
        data=pd.DataFrame(np.zeros((8, 2)), index=[f"s{i}" for i in range(8)], columns=["a", "b"]),
        noiseless=np.zeros((8, 2)),
        subtype=np.array([0, 0, 1, 1, 1, 2, 2, 2]),
        stage=np.array([0, 0, 1, 2, 3, 4, 4, 4]),
        sequences=np.array([[0, 1, 2, 3], [1, 3, 0, 2]]), fractions=np.array([0.5, 0.5]),
        event_biomarker=biomarker, event_z=z, z_levels=[[1.0, 2.0], [1.0, 2.0]], z_max=np.array([5.0, 5.0]),
    )
    truth.stage[2:] = [1, 2, 3, 4, 5, 6]  # cases at distinct stages for hand-computed rank correlations
    staged = pd.DataFrame({"ml_subtype": [1, 2, 2, 2, 1, 1, 1, 1], "ml_stage": [0, 0, 1, 2, 3, 4, 6, 5]},
                          index=truth.data.index)
    # Estimated subtype 1 sequence = true subtype 2's; estimated 2 = true 1's with e0, e1 swapped.
    result = recovery(truth, staged, _Model([[1, 3, 0, 2], [1, 0, 2, 3]], biomarker, z))
    # Cases' confusion (rows true 1, 2; columns estimated 1, 2): [[1, 2], [3, 0]].
    assert result["confusion_cases"] == [[1, 2], [3, 0]]
    assert result["subtype_match"] == [2, 1]
    assert result["matched_accuracy_cases"] == pytest.approx(5 / 6)
    # ARI: sum C(n_ij, 2) = 4, rows 6, columns 7, C(6, 2) = 15: (4 - 2.8) / (6.5 - 2.8).
    assert result["ari_cases"] == pytest.approx(1.2 / 3.7)
    # Stages 1..6 against 1, 2, 3, 4, 6, 5: one swapped pair.
    assert result["stage_spearman_cases"] == pytest.approx(1 - 6 * 2 / (6 * 35))
    assert result["stage_kendall_cases"] == pytest.approx(13 / 15)
    # Sequences: true 1 vs [1, 0, 2, 3] (one discordant pair of 6), true 2 exact.
    assert result["sequence_kendall"] == pytest.approx([4 / 6, 1.0])
    assert result["n_cases"] == 6 and result["n_subjects"] == 8


def test_recovery_rejects_mismatched_inputs():
    cohort = simulate_zscore_sustain(n_subjects=50, seed=0)
    with pytest.raises(ValueError, match="ml_stage"):
        recovery(cohort, cohort.truth().drop(columns="ml_stage"))
    with pytest.raises(ValueError, match="rows"):
        recovery(cohort, cohort.truth().iloc[:10])
    with pytest.raises(ValueError, match="event_z"):
        recovery(cohort, cohort.truth(), _Model(cohort.sequences, cohort.event_biomarker, cohort.event_z + 1))
    with pytest.raises(ValueError, match="sequences of shape"):
        recovery(cohort, cohort.truth(), cohort.sequences[:, :5])


def test_pysustain_reference_data_spec_still_reproduces_its_cohort():
    """The recovery anchor in Testing/data was computed on this exact simulated cohort."""
    reference = json.loads(REFERENCE.read_text())
    cohort = simulate_zscore_sustain(**reference["data_spec"])
    digest = hashlib.sha256(np.ascontiguousarray(cohort.data.to_numpy(), dtype="<f8").tobytes()).hexdigest()
    assert digest == reference["data_sha256"]
    assert cohort.sequences.tolist() == reference["true_sequences"]
    for key in ("ari_cases", "matched_accuracy_cases", "stage_spearman_cases"):
        assert 0.0 < reference["pysustain"]["recovery"][key] <= 1.0
