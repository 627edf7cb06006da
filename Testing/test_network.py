"""Seed-based atrophy networks: exactness against the straightforward computation, real data, pipeline."""

import numpy as np
import pytest

from neuroatrophy.connectome import ConnectomeStore, fsaverage5_coordinates, read_run
from neuroatrophy.network import (
    SeedMaps,
    atrophy_seeds,
    convergence_map,
    convergent_regions,
    reference_seed_maps,
    seed_maps,
    t_threshold,
    target_connectivity,
    threshold_networks,
)
from neuroatrophy.network_analysis import NetworkAnalysis, analyse_networks, surface_to_store
from neuroatrophy.surface import dk_atlas
from neuroatrophy.targets import get_target, target_rois

V = 20484
REGION_A, REGION_B, REGION_C = "L_superiorfrontal", "R_superiorfrontal", "L_lateraloccipital"


def _structured_subjects(n_subjects, n_time, seed):
    """Regions A and B share a signal, C carries its negative; everything else is noise."""
    rng = np.random.default_rng(seed)
    atlas = dk_atlas()
    a, b, c = (atlas.region_mask(n) for n in (REGION_A, REGION_B, REGION_C))
    for s in range(n_subjects):
        data = rng.standard_normal((n_time, V))
        shared = rng.standard_normal((n_time, 1))
        data[:, a | b] += 1.5 * shared
        data[:, c] -= 1.0 * shared
        data[:, atlas.medial_wall] = 0.0
        yield f"sub-{s}", data.astype(np.float32)


@pytest.fixture(scope="module")
def structured_store(tmp_path_factory):
    store = ConnectomeStore.create(tmp_path_factory.mktemp("conn") / "c", dtype="float32")
    for subject_id, data in _structured_subjects(6, 50, seed=1):
        store.add_subject(subject_id, data)
    return store


@pytest.fixture(scope="module")
def seeds():
    atlas = dk_atlas()
    rng = np.random.default_rng(3)
    weights = np.zeros((4, V))
    weights[0, atlas.region_mask(REGION_A)] = 1.0
    weights[1, atlas.region_mask("L_precuneus")] = rng.uniform(0.5, 3.0, atlas.region_mask("L_precuneus").sum())
    weights[2, np.flatnonzero(atlas.region_mask(REGION_C))[:30]] = 1.0
    weights[3, 100] = 1.0  # a one-vertex seed: r = 1 at the vertex itself
    return weights


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_seed_maps_equal_the_straightforward_computation(structured_store, seeds, engine):
    ours = seed_maps(structured_store, seeds, engine=engine)
    reference = reference_seed_maps(structured_store, seeds)
    assert np.abs(ours.mean_r - reference.mean_r).max() < 1e-5
    # Away from the clip at |r| = 1 (a one-node seed's own vertex) Fisher z agrees to float32 precision.
    unclipped = np.abs(reference.mean_r) < 0.999
    assert np.abs(ours.mean_z - reference.mean_z)[unclipped].max() < 1e-4
    finite = np.isfinite(reference.t) & (np.abs(reference.t) < 1e3)
    assert np.allclose(ours.t[finite], reference.t[finite], rtol=1e-3, atol=1e-3)
    assert ours.n_subjects == 6 and ours.names == ["seed-1", "seed-2", "seed-3", "seed-4"]


def test_blocks_jobs_and_memory_mapping_do_not_change_the_maps(structured_store, seeds):
    base = seed_maps(structured_store, seeds, engine="numpy")
    parallel = seed_maps(structured_store, seeds, engine="numpy", block_size=1, n_jobs=2)
    in_memory = seed_maps(ConnectomeStore.open(structured_store.path, mmap=False), seeds, engine="numpy")
    for other in (parallel, in_memory):
        assert np.allclose(other.mean_z, base.mean_z, atol=1e-6)
        assert np.allclose(other.t, base.t, rtol=1e-5, equal_nan=True)


def test_float16_store_keeps_r_within_1e3(tmp_path, seeds):
    store = ConnectomeStore.create(tmp_path / "half", dtype="float16")
    for subject_id, data in _structured_subjects(3, 50, seed=1):
        store.add_subject(subject_id, data)
    half = seed_maps(store, seeds, engine="numpy")
    reference = seed_maps(_float32_copy(tmp_path, store), seeds, engine="numpy")
    assert np.abs(half.mean_r - reference.mean_r).max() < 1e-3


def _float32_copy(tmp_path, store):
    copy = ConnectomeStore.create(tmp_path / "full", dtype="float32")
    for subject_id, data in _structured_subjects(len(store), 50, seed=1):
        copy.add_subject(subject_id, data)
    return copy


def test_known_structure_is_recovered(structured_store, seeds):
    maps = seed_maps(structured_store, seeds[:1], names=["A"])
    networks = threshold_networks(maps, threshold=5.0, valid=structured_store.valid)
    atlas = dk_atlas()
    positive, negative = networks.positive[0], networks.negative[0]
    assert positive[atlas.region_mask(REGION_B)].mean() > 0.95
    assert negative[atlas.region_mask(REGION_C)].mean() > 0.95
    noise = ~(atlas.region_mask(REGION_A) | atlas.region_mask(REGION_B) | atlas.region_mask(REGION_C))
    assert (positive | negative)[noise & structured_store.valid].mean() < 0.01
    # One-vertex seed: the vertex itself correlates perfectly (clipped before Fisher z, never infinite).
    single = seed_maps(structured_store, seeds[3:4])
    assert single.mean_r[0, 100] == pytest.approx(1.0, abs=1e-5)
    assert np.isfinite(single.mean_z).all()


def test_seed_to_seed_connectivity_is_the_roi_correlation(structured_store, seeds):
    maps = seed_maps(structured_store, seeds[:3], engine="numpy")
    expected = np.zeros((3, 3))
    for s in range(len(structured_store)):
        data = np.asarray(structured_store.timeseries(s), np.float64)
        series = data @ (seeds[:3] / seeds[:3].sum(axis=1, keepdims=True)).T
        expected += np.arctanh(np.clip(np.corrcoef(series.T), -1 + 1e-6, 1 - 1e-6))
    off_diagonal = ~np.eye(3, dtype=bool)  # the diagonal is the clip value, atanh(1 - 1e-6)
    assert np.allclose(maps.seed_z[off_diagonal], (expected / len(structured_store))[off_diagonal], atol=1e-5)


def test_brainspace_run_one_subject_connectome_equals_reference(tmp_path):
    from neuroatrophy.demo_connectome import brainspace_data_files

    files = brainspace_data_files()
    from neuroatrophy.connectome import read_confounds

    data = read_run((files["lh"], files["rh"]))
    confounds = read_confounds(files["confounds"])
    store = ConnectomeStore.create(tmp_path / "real", dtype="float32")
    store.add_subject("sub-010188", data, confounds)
    dlpfc = get_target("DLPFC_sgACC_Fox2012")
    seed = target_rois([dlpfc], fsaverage5_coordinates(), store.valid)
    ours = seed_maps(store, seed, names=["dlpfc"])
    # Reference: confounds regressed by least squares, then numpy.corrcoef with the seed's mean series.
    design = np.column_stack([np.ones(len(data)), confounds])
    residual = data - design @ np.linalg.lstsq(design, data.astype(np.float64), rcond=None)[0]
    signal = residual.std(axis=0) > 1e-6
    normalised = residual[:, signal] / np.linalg.norm(residual[:, signal] - residual[:, signal].mean(0), axis=0)
    seed_series = normalised[:, seed[0, signal] > 0].mean(axis=1)
    centred = residual[:, signal] - residual[:, signal].mean(axis=0)
    x = seed_series - seed_series.mean()
    r = (x @ centred) / np.sqrt((x @ x) * (centred ** 2).sum(axis=0))
    assert np.abs(ours.mean_r[0, signal] - r).max() < 1e-4
    assert len(data) == 652 and -0.9 < r.min() < 0 < 0.9 < r.max()


def test_atrophy_seeds_and_their_errors():
    class _Atrophy:
        def __init__(self, mask):
            self.mask = mask

    class _Map:
        def __init__(self, subject_id, z, mask):
            self.subject_id, self.z, self.atrophy = subject_id, z, _Atrophy(mask)

    z = np.zeros(V)
    z[:10] = -3.0
    z[10:20] = -2.0
    mask = z < -1.96
    binary, names = atrophy_seeds([_Map("p1", z, mask)])
    weighted, _ = atrophy_seeds([_Map("p1", z, mask)], weighting="abs_z")
    assert names == ["p1"] and binary.sum() == 20
    assert np.array_equal(weighted[0, :20], np.r_[np.full(10, 3.0), np.full(10, 2.0)])
    with pytest.raises(ValueError, match="Patient\\(s\\) p2 have no atrophic vertices"):
        atrophy_seeds([_Map("p1", z, mask), _Map("p2", np.zeros(V), np.zeros(V, bool))])


def test_bad_seeds_get_clear_errors(structured_store):
    with pytest.raises(ValueError, match="seed\\(s\\) empty have no nodes"):
        seed_maps(structured_store, np.zeros((1, V)), names=["empty"])
    with pytest.raises(ValueError, match="shape \\(n_seeds, 20484\\).*\\(1, 100\\)"):
        seed_maps(structured_store, np.ones((1, 100)))
    medial = np.zeros((1, V))
    medial[0, dk_atlas().medial_wall] = 1.0
    with pytest.raises(ValueError, match="no signal in connectome subject 'sub-0'"):
        seed_maps(structured_store, medial, names=["wall"])


def test_threshold_convergence_and_regions(structured_store, seeds):
    maps = seed_maps(structured_store, seeds[:3])
    auto = t_threshold(6, int(structured_store.valid.sum()))
    assert auto == pytest.approx(__import__("scipy").stats.t.isf(0.025 / structured_store.valid.sum(), 5))
    networks = threshold_networks(maps, "auto", valid=structured_store.valid)
    assert networks.threshold == pytest.approx(auto)
    percent = convergence_map(networks.positive)
    assert np.allclose(percent, 100 * networks.positive.sum(axis=0) / 3)
    table = convergent_regions(percent, dk_atlas(), fraction=0.6)
    assert len(table) == 68 and table["convergent_fraction"].between(0, 1).all()
    with pytest.raises(ValueError, match="at least 2 connectome subjects"):
        t_threshold(1, 100)


def test_target_connectivity_map_and_roi(structured_store, seeds):
    targets = [get_target("DLPFC_F3"), get_target("TPJ_T3P3")]
    rois = target_rois(targets, structured_store.coordinates(), structured_store.valid)
    maps = seed_maps(structured_store, np.vstack([seeds[:2], rois]),
                     names=["p1", "p2", "target:DLPFC_F3", "target:TPJ_T3P3"])
    by_map = target_connectivity(maps, ["p1", "p2"], targets, rois, method="map")
    by_roi = target_connectivity(maps, ["p1", "p2"], targets, rois, method="roi")
    expected = maps.mean_z[0][rois[1] > 0].mean()
    assert by_map.loc["p1", "TPJ_T3P3"] == pytest.approx(expected, rel=1e-5)
    assert by_roi.loc["p2", "DLPFC_F3"] == pytest.approx(maps.seed_z[1, 2])
    assert list(by_map.columns) == ["DLPFC_F3", "TPJ_T3P3"]


def test_seed_maps_save_load_round_trip(tmp_path, structured_store, seeds):
    maps = seed_maps(structured_store, seeds[:2], names=["a", "b"])
    maps.save(tmp_path / "maps.npz")
    loaded = SeedMaps.load(tmp_path / "maps.npz")
    assert loaded.names == ["a", "b"] and loaded.n_subjects == 6
    for name in ("mean_z", "mean_r", "t", "seed_z", "degree"):
        assert np.array_equal(getattr(loaded, name), getattr(maps, name), equal_nan=True)


def test_analysis_pipeline_round_trip_and_specificity(tmp_path, structured_store, seeds):
    analysis = analyse_networks(structured_store, seeds[:3], ["p1", "p2", "p3"], n_null=20, seed=0)
    summary = analysis.summary.set_index("subject_id")
    assert set(summary.columns) >= {"n_positive", "specificity_positive", "null_similarity", "degree_similarity"}
    assert analysis.target_connectivity.shape == (3, 8)
    analysis.save(tmp_path / "out")
    loaded = NetworkAnalysis.load(tmp_path / "out")
    assert loaded.patients == ["p1", "p2", "p3"]
    assert np.array_equal(loaded.networks.positive, analysis.networks.positive)
    assert np.array_equal(loaded.specific_negative, analysis.specific_negative)
    assert np.array_equal(loaded.specific_convergence("positive"), analysis.specific_convergence("positive"))
    assert np.allclose(loaded.target_connectivity.to_numpy(), analysis.target_connectivity.to_numpy())
    assert (tmp_path / "out" / "maps" / "lh.p1_t.mgh").is_file()
    assert (tmp_path / "out" / "convergent_regions.csv").is_file()
    with pytest.raises(ValueError, match="n_null=4 random seeds cannot give a vertex p < alpha=0.05; use n_null >= 20"):
        analyse_networks(structured_store, seeds[:1], ["p1"], n_null=4)


def test_surface_seeds_project_onto_a_volume_store(tmp_path):
    import nibabel as nib

    mask = np.zeros((20, 20, 20), bool)
    mask[2:18, 2:18, 2:18] = True
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-50, 10, 20]  # a 32-mm box around the left DLPFC
    store = ConnectomeStore.create(tmp_path / "v", space="MNI152-2mm",
                                   mask_img=nib.Nifti1Image(mask.astype(np.uint8), affine))
    surface_seed = np.zeros((1, V))
    near = np.linalg.norm(fsaverage5_coordinates() - [-38, 44, 26], axis=1) < 8
    surface_seed[0, near] = 1.0
    projected = surface_to_store(surface_seed, store)
    assert projected.shape == (1, store.n_nodes) and projected.sum() > 5
    voxels = store.coordinates()[projected[0] > 0]
    assert np.linalg.norm(voxels - [-38, 44, 26], axis=1).max() < 8 + 3 + 2
    with pytest.raises(ValueError, match="20484 fsaverage5 vertices"):
        surface_to_store(np.ones((1, 10)), store)


def test_specificity_separates_a_private_network_from_a_hub_dominated_one(tmp_path):
    """A seed in a small private system beats random seeds of its size; a seed inside a
    system spanning half the cortex does not (any random seed there gives the same map)."""
    rng = np.random.default_rng(5)
    coordinates = fsaverage5_coordinates()
    cortex = ~dk_atlas().medial_wall
    patch_left = cortex & (np.linalg.norm(coordinates - [-40, 20, 40], axis=1) < 10)
    patch_right = cortex & (np.linalg.norm(coordinates - [40, -60, 30], axis=1) < 10)
    hub = cortex & (coordinates[:, 1] < -20) & ~patch_right
    store = ConnectomeStore.create(tmp_path / "c", dtype="float32")
    for s in range(5):
        data = rng.standard_normal((60, V))
        data[:, patch_left | patch_right] += 1.5 * rng.standard_normal((60, 1))
        data[:, hub] += 1.5 * rng.standard_normal((60, 1))
        data[:, ~cortex] = 0.0
        store.add_subject(f"s{s}", data)
    inside_hub = np.flatnonzero(hub & (np.linalg.norm(coordinates - [-30, -80, 10], axis=1) < 10))
    seeds = np.zeros((2, V))
    seeds[0, patch_left] = 1.0
    seeds[1, inside_hub[: patch_left.sum()]] = 1.0
    analysis = analyse_networks(store, seeds, ["private", "hub"], targets=[], threshold=8.0, n_null=20, seed=1)
    summary = analysis.summary.set_index("subject_id")
    assert summary.loc["private", "specificity_positive"] > 0.8
    assert summary.loc["hub", "specificity_positive"] < 0.3
    assert summary.loc["hub", "degree_similarity"] > summary.loc["private", "degree_similarity"]


def test_degree_is_the_mean_correlation_with_all_nodes(structured_store, seeds):
    maps = seed_maps(structured_store, seeds[:1], engine="numpy")
    torch_maps = seed_maps(structured_store, seeds[:1], engine="torch")
    nodes = [5, 3000, 15000]
    expected = np.zeros(len(nodes))
    for s in range(len(structured_store)):
        data = np.asarray(structured_store.timeseries(s), np.float64)
        signal = np.abs(data).max(axis=0) > 0
        expected += (data[:, nodes].T @ data[:, signal]).mean(axis=1)
    expected /= len(structured_store)
    assert np.allclose(maps.degree[nodes], expected, atol=1e-6)
    assert np.allclose(torch_maps.degree[nodes], expected, atol=1e-6)
