"""Resting-state data of the demo connectome: the real brainspace run, the HCP DK matrix, simulated subjects."""

import importlib.util
import sys

import nibabel as nib
import numpy as np
import pytest

from neuroatrophy.demo_connectome import (
    BRAINSPACE_TR,
    ConnectomeSimulation,
    brainspace_data_files,
    brainspace_run,
    hcp_dk_connectivity,
    nearest_correlation,
    region_loadings,
    region_mean_timeseries,
    simulate_connectome_subjects,
)
from neuroatrophy.surface import DK_NAMES, dk_atlas

N_VERTICES = 20484
UPPER = np.triu_indices(68, 1)


def _region_z(timeseries, labels):
    """Upper triangle of the Fisher z of the correlation between region-mean time series."""
    correlation = np.corrcoef(region_mean_timeseries(timeseries, labels).T)
    return np.arctanh(correlation[UPPER])


@pytest.fixture(scope="module")
def run():
    return brainspace_run()


@pytest.fixture(scope="module")
def labels():
    return dk_atlas().labels


@pytest.fixture(scope="module")
def hcp():
    return hcp_dk_connectivity()


@pytest.fixture(scope="module")
def simulation():
    return simulate_connectome_subjects(n_subjects=40, n_timepoints=200, seed=0)


@pytest.fixture(scope="module")
def simulated_region_z(simulation, labels):
    """Per-subject region-mean Fisher z (40 x 2278), streaming the subjects one at a time."""
    return np.array([_region_z(timeseries, labels) for _, timeseries in simulation])


# ------------------------------------------------------------------ the real run
def test_brainspace_files_are_found_without_importing_brainspace():
    files = brainspace_data_files()
    assert set(files) == {"lh", "rh", "confounds"}
    assert all(path.is_file() for path in files.values())
    assert files["lh"].name == "sub-010188_ses-02_task-rest_acq-AP_run-01.fsa5.lh.mgz"
    assert "brainspace" not in sys.modules  # its data files are read, the package (and vtk) never imported


def test_brainspace_run_shapes_values_and_metadata(run):
    assert run.timeseries.shape == (652, N_VERTICES) and run.n_timepoints == 652
    assert run.timeseries.dtype == np.float32 and run.timeseries.flags.c_contiguous
    assert np.isfinite(run.timeseries).all()
    assert run.confounds.shape == (652, 29) and run.confounds.dtype == np.float64
    assert np.isfinite(run.confounds).all()
    assert run.subject_id == "sub-010188"
    assert run.tr == BRAINSPACE_TR == 1.4
    assert [path.name.split(".")[-2] for path in run.files[:2]] == ["lh", "rh"]
    assert run.files[2].name.endswith("_confounds.txt")
    # the hemispheres are the two mgz files, left first
    lh = np.asarray(nib.load(str(run.files[0])).dataobj)[:, 0, 0, :]
    np.testing.assert_array_equal(run.timeseries[:, :10242], lh.T)


def test_real_run_vertex_order_matches_the_dk_atlas_and_hcp(run, labels, hcp):
    # constant vertices lie on the medial wall of the DK atlas: hemisphere order and
    # vertex numbering agree with the atlas
    constant = run.timeseries.std(axis=0) == 0
    assert constant.sum() > 1500
    assert (labels[constant] == 0).mean() > 0.98
    # its (single-subject) region connectivity resembles the HCP group matrix (r = 0.54)
    z = _region_z(run.timeseries, labels)
    assert np.corrcoef(z, hcp.to_numpy()[UPPER])[0, 1] > 0.4


def test_missing_brainspace_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match=r"pip install brainspace==0\.3\.0"):
        brainspace_run()


# ------------------------------------------------------------------ HCP connectivity
def test_hcp_matrix_names_symmetry_and_values(hcp):
    assert hcp.shape == (68, 68)
    assert list(hcp.index) == list(hcp.columns) == list(DK_NAMES) == dk_atlas().names
    values = hcp.to_numpy()
    np.testing.assert_array_equal(values, values.T)
    np.testing.assert_array_equal(np.diag(values), 0.0)
    assert values.min() == 0.0 and 1.0 < values.max() < 1.5  # Fisher z, negative connections zeroed
    # first row, second column of funcMatrix_ctx.csv
    assert hcp.loc["L_bankssts", "L_caudalanteriorcingulate"] == pytest.approx(0.20754765596393)
    changed = hcp_dk_connectivity()
    changed.iloc[0, 1] = 99.0  # each call returns a new frame
    assert hcp_dk_connectivity().iloc[0, 1] == pytest.approx(0.20754765596393)


def test_nearest_correlation_repairs_an_indefinite_matrix():
    matrix = np.array([[1.0, 0.9, -0.9], [0.9, 1.0, 0.9], [-0.9, 0.9, 1.0]])
    assert np.linalg.eigvalsh(matrix)[0] < 0
    fixed = nearest_correlation(matrix)
    np.testing.assert_allclose(np.diag(fixed), 1.0)
    np.testing.assert_allclose(fixed, fixed.T)
    assert np.linalg.eigvalsh(fixed)[0] > 0
    assert np.all(np.sign(fixed) == np.sign(matrix))
    valid = np.array([[1.0, 0.3], [0.3, 1.0]])
    np.testing.assert_allclose(nearest_correlation(np.array([[0.0, 0.3], [0.3, 0.0]])), valid)
    with pytest.raises(ValueError, match="symmetric"):
        nearest_correlation([[1.0, 0.2], [0.3, 1.0]])
    with pytest.raises(ValueError, match="square"):
        nearest_correlation(np.ones((2, 3)))


# ------------------------------------------------------------------ region helpers
def test_region_mean_timeseries_and_loadings_known_answers(rng):
    labels = np.array([0, 1, 1, 2, 2, 2])
    data = rng.standard_normal((50, 6))
    means = region_mean_timeseries(data, labels)
    np.testing.assert_allclose(means, np.column_stack([data[:, 1:3].mean(1), data[:, 3:].mean(1)]))
    loadings = region_loadings(data, labels)
    assert loadings[0] == 0.0
    assert loadings[3] == pytest.approx(np.corrcoef(data[:, 3], data[:, 3:].mean(1))[0, 1])
    with pytest.raises(ValueError, match=r"regions without vertices: \[2\]"):
        region_mean_timeseries(data, np.array([0, 1, 1, 3, 3, 3]))
    with pytest.raises(ValueError, match=r"labels must be an integer array of shape \(6,\)"):
        region_mean_timeseries(data, labels[:5])


# ------------------------------------------------------------------ simulation
def test_simulated_group_connectivity_matches_hcp(simulation, simulated_region_z, hcp):
    assert isinstance(simulation, ConnectomeSimulation) and len(simulation) == 40
    np.testing.assert_allclose(simulation.truth.group_z, hcp.to_numpy(), atol=1e-9)
    group = simulated_region_z.mean(axis=0)
    match = np.corrcoef(group, hcp.to_numpy()[UPPER])[0, 1]
    assert match >= 0.9  # 0.979 with seed 0
    # single subjects match less well than the group
    single = [np.corrcoef(z, hcp.to_numpy()[UPPER])[0, 1] for z in simulated_region_z[:5]]
    assert max(single) < match


def test_subjects_differ_and_their_own_connectivity_is_recovered(simulation, simulated_region_z):
    own, other = [], []
    for i in range(4):
        truth_i = np.arctanh(simulation.subject_correlation(i)[UPPER])
        truth_next = np.arctanh(simulation.subject_correlation(i + 1)[UPPER])
        assert 0.08 < np.std(truth_i - truth_next) < 0.3  # 0.12: sqrt(2) x 0.15 shrunk by the projection
        own.append(np.corrcoef(simulated_region_z[i], truth_i)[0, 1])
        other.append(np.corrcoef(simulated_region_z[i], truth_next)[0, 1])
    assert min(np.subtract(own, other)) > 0.05
    assert not np.allclose(simulated_region_z[0], simulated_region_z[1], atol=0.05)


def test_simulated_run_shape_variance_medial_wall_and_autocorrelation(simulation):
    truth = simulation.truth
    timeseries = simulation.subject("sim-002")
    assert timeseries.shape == (200, N_VERTICES) and timeseries.dtype == np.float32
    assert timeseries.flags.c_contiguous and np.isfinite(timeseries).all()
    assert simulation.subject_ids[:2] == ["sim-001", "sim-002"] and len(set(simulation.subject_ids)) == 40
    medial = truth.medial_wall
    assert medial.sum() == (dk_atlas().labels == 0).sum() > 2000
    assert np.all(timeseries[:, medial] == 0)  # constant, as in real fsaverage5 runs
    cortex = timeseries[:, ~medial]
    assert cortex.std(axis=0).mean() == pytest.approx(1.0, abs=0.05)
    centred = cortex - cortex.mean(axis=0)
    lag1 = (centred[1:] * centred[:-1]).sum(axis=0) / (centred**2).sum(axis=0)
    assert np.median(lag1) == pytest.approx(truth.ar_coefficient, abs=0.06)


def test_loadings_have_the_requested_mean_and_are_recovered(simulation):
    truth = simulation.truth
    cortex = ~truth.medial_wall
    assert np.mean(truth.loadings[cortex] ** 2) == pytest.approx(truth.within_region, abs=0.02)
    assert np.all(truth.loadings[truth.medial_wall] == 0)
    estimated = region_loadings(simulation.subject(0), truth.labels)
    assert np.corrcoef(estimated[cortex], truth.loadings[cortex])[0, 1] > 0.9
    assert np.abs(estimated[cortex] - truth.loadings[cortex]).mean() < 0.06


def test_simulation_is_reproducible_per_subject():
    small = simulate_connectome_subjects(n_subjects=3, n_timepoints=20, seed=7)
    larger = simulate_connectome_subjects(n_subjects=5, n_timepoints=20, seed=7)
    iterated = [timeseries for _, timeseries in small]
    np.testing.assert_array_equal(iterated[2], small.subject(2))
    np.testing.assert_array_equal(iterated[2], larger.subject("sim-003"))  # independent of n_subjects
    np.testing.assert_array_equal(small.truth.loadings, larger.truth.loadings)
    assert not np.array_equal(iterated[0], iterated[1])
    other_seed = simulate_connectome_subjects(n_subjects=3, n_timepoints=20, seed=8)
    assert not np.array_equal(iterated[0], other_seed.subject(0))


def test_loading_pattern_from_the_real_run(run, labels):
    pattern = region_loadings(run.timeseries, labels)
    cortex = labels > 0
    assert 0.4 < pattern[cortex].mean() < 0.65  # real vertices share less with their region than the default
    simulation = simulate_connectome_subjects(n_subjects=2, n_timepoints=20, within_region=0.5, loading_pattern=pattern)
    loadings = simulation.truth.loadings
    assert np.corrcoef(loadings[cortex], pattern[cortex])[0, 1] > 0.95
    assert np.mean(loadings[cortex] ** 2) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_subjects": 0}, "n_subjects"),
        ({"n_timepoints": 2}, "n_timepoints"),
        ({"within_region": 1.0}, "within_region"),
        ({"subject_variability": -0.1}, "subject_variability"),
        ({"noise_smoothing": 1.5}, "noise_smoothing"),
        ({"ar_coefficient": 1.0}, "ar_coefficient"),
        ({"loading_pattern": np.ones(10)}, "loading_pattern"),
    ],
)
def test_bad_simulation_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        simulate_connectome_subjects(**kwargs)


def test_unknown_subject_is_named(simulation):
    with pytest.raises(ValueError, match="sim-999"):
        simulation.subject("sim-999")
    with pytest.raises(ValueError, match=r"0\.\.39"):
        simulation.subject(40)
