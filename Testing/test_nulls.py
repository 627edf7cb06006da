"""Tests for neuroatrophy.nulls (matched random seeds and network specificity) on the real fsaverage5 mesh."""

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components, dijkstra
from scipy.spatial import cKDTree

from neuroatrophy.atrophy import atrophy_map
from neuroatrophy.nulls import matched_random_seeds, null_seeds_for_patients, specificity, specificity_batch
from neuroatrophy.parallel import Cancelled
from neuroatrophy.surface import dk_atlas, load_fsaverage5, smooth_on_surface

N = 20484
N_LEFT = 10242


@pytest.fixture(scope="module")
def mesh(fsaverage5):
    adjacency = fsaverage5.adjacency()
    valid = ~dk_atlas().medial_wall
    sphere = load_fsaverage5("sphere").vertices
    return adjacency, valid, sphere


@pytest.fixture(scope="module")
def patient_seeds(fsaverage5, mesh):
    """Three patient-like |z|-weighted seeds: smooth random atrophy maps, clusters >= 20 vertices."""
    adjacency, valid, _ = mesh
    rng = np.random.default_rng(7)
    noise = smooth_on_surface(rng.standard_normal((3, N)), fsaverage5, iterations=15)
    seeds = []
    for z in noise / noise.std(axis=1, keepdims=True):
        atrophy = atrophy_map(z, threshold=-1.5, min_cluster_size=20, adjacency=adjacency, valid=valid)
        seeds.append(np.where(atrophy.mask, np.abs(z), 0.0))
    return np.array(seeds)


def _clusters(mask, adjacency):
    """Sorted sizes of the connected components of ``mask`` on the mesh."""
    nodes = np.flatnonzero(mask)
    _, labels = connected_components(adjacency[nodes][:, nodes], directed=False)
    return np.sort(np.bincount(labels))


def _ball(adjacency, centre, radius):
    return dijkstra(adjacency, indices=centre, unweighted=True) <= radius


# --------------------------------------------------------------------------------------- grow


def test_grow_matches_size_clusters_and_weights_exactly(mesh, patient_seeds):
    adjacency, valid, _ = mesh
    seed = patient_seeds[0]
    seed_clusters = _clusters(seed != 0, adjacency)
    assert 1000 < np.count_nonzero(seed) < 3000 and seed_clusters.size > 5  # a realistic seed
    nulls = matched_random_seeds(seed, adjacency, valid, n_null=10, method="grow", seed=1)
    assert nulls.shape == (10, N) and nulls.dtype == np.float64
    for null in nulls:
        np.testing.assert_array_equal(_clusters(null != 0, adjacency), seed_clusters)
        np.testing.assert_array_equal(np.sort(null[null != 0]), np.sort(seed[seed != 0]))
        assert not null[~valid].any()


def test_grow_nulls_are_random_and_differ_from_the_seed(mesh, patient_seeds):
    adjacency, valid, _ = mesh
    seed = patient_seeds[1] != 0
    nulls = matched_random_seeds(seed, adjacency, valid, n_null=8, seed=2) != 0
    overlap_with_seed = (nulls & seed).sum(axis=1) / seed.sum()
    assert overlap_with_seed.max() < 0.5
    for i in range(8):
        for j in range(i + 1, 8):
            assert (nulls[i] & nulls[j]).sum() / seed.sum() < 0.5
    # Placed uniformly at random: the 8 nulls cover about as much cortex as independent draws would.
    fraction = seed.sum() / valid.sum()
    assert nulls.any(axis=0)[valid].mean() > 0.85 * (1 - (1 - fraction) ** 8)


def test_grow_keeps_the_radial_weight_profile_and_compact_shape(mesh):
    adjacency, valid, _ = mesh
    distance = dijkstra(adjacency, indices=3000, unweighted=True)
    seed = np.where(distance <= 8, 9.0 - distance, 0.0)  # a disc, weights falling off from its centre
    border_seed = ((adjacency @ (seed == 0)) > 0)[seed != 0].sum()
    for null in matched_random_seeds(seed, adjacency, valid, n_null=5, seed=3):
        nodes = np.flatnonzero(null)
        peak = np.searchsorted(nodes, nodes[np.argmax(null[nodes])])
        rings = dijkstra(adjacency[nodes][:, nodes], indices=peak, unweighted=True)
        weights = null[nodes]
        # Every ring around the null's peak carries weights no larger than the ring inside it.
        for k in range(int(rings.max())):
            assert weights[rings == k].min() >= weights[rings == k + 1].max()
        assert rings.max() <= 9  # about the seed's radius (8): a disc, not a streak
        border = ((adjacency @ (null == 0)) > 0)[nodes].sum()
        assert border <= 1.5 * border_seed


def test_grow_is_reproducible_and_independent_of_n_jobs(mesh, patient_seeds):
    adjacency, valid, _ = mesh
    a = null_seeds_for_patients(patient_seeds, adjacency, valid, n_null=4, seed=11, n_jobs=1)
    b = null_seeds_for_patients(patient_seeds, adjacency, valid, n_null=4, seed=11, n_jobs=2)
    assert a.shape == (3, 4, N)
    np.testing.assert_array_equal(a, b)
    # Patient k uses the k-th spawned child of the root seed.
    children = np.random.SeedSequence(11).spawn(3)
    single = matched_random_seeds(patient_seeds[2], adjacency, valid, n_null=4, seed=children[2])
    np.testing.assert_array_equal(a[2], single)
    c = null_seeds_for_patients(patient_seeds, adjacency, valid, n_null=4, seed=12)
    assert not np.array_equal(a, c)


def test_grow_works_on_a_voxel_graph():
    shape = (12, 12, 12)
    index = np.arange(np.prod(shape)).reshape(shape)
    pairs = [(index[:-1].ravel(), index[1:].ravel()), (index[:, :-1].ravel(), index[:, 1:].ravel()),
             (index[:, :, :-1].ravel(), index[:, :, 1:].ravel())]  # fmt: skip
    rows = np.concatenate([p[0] for p in pairs])
    cols = np.concatenate([p[1] for p in pairs])
    adjacency = sp.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(index.size,) * 2).tocsr()
    seed = np.zeros(index.size)
    seed[index[1:4, 1:4, 1:4].ravel()] = 2.0  # 27 voxels
    seed[index[8:10, 8:10, 8:11].ravel()] = 1.0  # 12 voxels
    nulls = matched_random_seeds(seed, adjacency, n_null=5, seed=0)
    for null in nulls:
        np.testing.assert_array_equal(_clusters(null != 0, adjacency + adjacency.T), [12, 27])
        assert np.count_nonzero(null == 2.0) == 27


def test_grow_accepts_a_surface_and_binary_masks(fsaverage5, mesh):
    adjacency, valid, _ = mesh
    seed = _ball(adjacency, 500, 4)
    from_surface = matched_random_seeds(seed, fsaverage5, valid, n_null=3, seed=5)
    from_matrix = matched_random_seeds(seed.astype(float), adjacency, valid, n_null=3, seed=5)
    np.testing.assert_array_equal(from_surface, from_matrix)
    assert set(np.unique(from_surface)) == {0.0, 1.0}
    assert matched_random_seeds(seed.astype(np.float32), adjacency, valid, n_null=1).dtype == np.float32


# --------------------------------------------------------------------------------------- spin


def test_spin_keeps_the_shape_away_from_the_medial_wall(mesh):
    adjacency, valid, sphere = mesh
    seed = _ball(adjacency, 3000, 10).astype(float)  # a compact patch of ~325 vertices
    n_seed = int(seed.sum())
    nulls = matched_random_seeds(seed, adjacency, valid, n_null=40, method="spin", coordinates=sphere, seed=4)
    assert not nulls[:, ~valid].any()
    checked = 0
    for null in nulls:
        support = null != 0
        near_wall = ((adjacency @ support) > 0)[~valid].any()
        if not support.any() or near_wall:
            continue
        checked += 1
        assert _clusters(support, adjacency).size == 1
        # Nearest-neighbour resampling on the icosphere (uneven vertex density) changes the count a little.
        assert abs(support.sum() / n_seed - 1) < 0.12
    assert checked >= 20
    overlap = ((nulls != 0) & (seed != 0)).sum(axis=1) / n_seed
    assert np.median(overlap) < 0.2


def test_spin_mirrors_the_rotation_in_the_right_hemisphere(mesh):
    adjacency, _, sphere = mesh
    unit = sphere[:N_LEFT] - sphere[:N_LEFT].mean(axis=0)
    unit /= np.linalg.norm(unit, axis=1)[:, None]
    tree = cKDTree(unit)
    left_centre = 3000
    right_centre = N_LEFT + tree.query(unit[left_centre] * [-1, 1, 1])[1]
    seed = (_ball(adjacency, left_centre, 6) | _ball(adjacency, right_centre, 6)).astype(float)
    nulls = matched_random_seeds(seed, adjacency, None, n_null=5, method="spin", coordinates=sphere, seed=0)
    for null in nulls:
        left = np.flatnonzero(null[:N_LEFT])
        mirrored = np.unique(tree.query(unit[np.flatnonzero(null[N_LEFT:])] * [-1, 1, 1])[1])
        dice = 2 * np.intersect1d(left, mirrored).size / (left.size + mirrored.size)
        assert dice > 0.6


def test_spin_is_reproducible_and_independent_of_n_jobs(mesh, patient_seeds):
    adjacency, valid, sphere = mesh
    kwargs = {"n_null": 3, "method": "spin", "coordinates": sphere, "seed": 9}
    a = null_seeds_for_patients(patient_seeds, adjacency, valid, n_jobs=1, **kwargs)
    b = null_seeds_for_patients(patient_seeds, adjacency, valid, n_jobs=2, **kwargs)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0, 0], a[0, 1])
    # Weights move with the rotation: the null's values come from the seed's values.
    assert set(np.unique(a[0])) - {0.0} <= set(np.unique(patient_seeds[0]))


# --------------------------------------------------------------------------------------- errors


def test_null_seed_errors_name_the_problem(mesh, patient_seeds):
    adjacency, valid, _ = mesh
    seeds = patient_seeds.copy()
    seeds[1] = 0
    with pytest.raises(ValueError, match="seed 1 has no nodes"):
        null_seeds_for_patients(seeds, adjacency, valid, n_null=2)
    with pytest.raises(ValueError, match="seed 'sub-02' has no nodes"):
        null_seeds_for_patients(seeds, adjacency, valid, n_null=2, names=["sub-01", "sub-02", "sub-03"])
    with pytest.raises(ValueError, match="adjacency has shape"):
        matched_random_seeds(patient_seeds[0], adjacency[:100, :100], valid)
    with pytest.raises(ValueError, match="n_null must be a positive integer"):
        matched_random_seeds(patient_seeds[0], adjacency, valid, n_null=0)
    with pytest.raises(ValueError, match="method must be one of"):
        matched_random_seeds(patient_seeds[0], adjacency, valid, method="shuffle")
    with pytest.raises(ValueError, match="needs coordinates"):
        matched_random_seeds(patient_seeds[0], adjacency, valid, method="spin")
    with pytest.raises(ValueError, match="not sphere coordinates"):
        matched_random_seeds(
            patient_seeds[0], adjacency, valid, method="spin", coordinates=load_fsaverage5("pial").vertices
        )
    small_area = _ball(adjacency, 3000, 5)
    with pytest.raises(ValueError, match=r"seed 'p7' has \d+ nodes, more than the \d+ valid nodes"):
        matched_random_seeds(_ball(adjacency, 3000, 7), adjacency, small_area, name="p7")


def test_grow_raises_when_the_clusters_cannot_be_placed(mesh):
    adjacency, _, _ = mesh
    area = _ball(adjacency, 3000, 6)  # ~127 valid vertices
    n_area = int(area.sum())
    # Two clusters that together fit in the area's count but not side by side with a gap.
    seed = np.zeros(N)
    seed[np.flatnonzero(_ball(adjacency, 8000, 5))[: n_area - 40]] = 1
    seed[np.flatnonzero(_ball(adjacency, 9000, 3))[:30]] = 1
    assert np.count_nonzero(seed) <= n_area
    with pytest.raises(ValueError, match="Could not place random clusters"):
        matched_random_seeds(seed, adjacency, area, n_null=2, name="crowded")


def test_progress_reports_every_patient_and_can_cancel(mesh, patient_seeds):
    adjacency, valid, _ = mesh
    calls = []
    null_seeds_for_patients(patient_seeds, adjacency, valid, n_null=1, progress=lambda f, m: calls.append(f))
    assert calls[0] == 0.0 and calls[-1] == 1.0 and len(calls) == 4

    def cancel(fraction, message):
        if fraction > 0:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        null_seeds_for_patients(patient_seeds, adjacency, valid, n_null=1, progress=cancel)


# --------------------------------------------------------------------------------------- specificity


def test_specificity_is_one_when_the_network_is_far_above_its_nulls():
    rng = np.random.default_rng(0)
    null_t = rng.standard_normal((99, 2000))
    network = np.zeros(2000, dtype=bool)
    network[:300] = True
    observed = rng.standard_normal(2000)
    observed[network] = 10.0
    result = specificity(observed, null_t, network)
    assert result["specificity"] == 1.0
    np.testing.assert_allclose(result["p_map"][network], 1 / 100)
    np.testing.assert_array_equal(result["specific_mask"], network)
    # Same network read as negative: nothing is specific.
    assert specificity(observed, null_t, network, sign=-1)["specificity"] == 0.0
    assert specificity(-observed, -null_t, network, sign=-1)["specificity"] == 1.0


def test_specificity_is_about_alpha_when_the_map_is_like_its_nulls():
    rng = np.random.default_rng(1)
    maps = rng.standard_normal((100, 6000))  # observed and 99 nulls exchangeable
    network = np.ones(6000, dtype=bool)
    result = specificity(maps[0], maps[1:], network, alpha=0.05)
    # p = (1 + count) / 100 < 0.05 exactly when count <= 3: probability 4/100.
    assert abs(result["specificity"] - 0.04) < 0.012
    assert abs(np.nanmean(result["p_map"]) - 0.505) < 0.02


def test_specificity_hand_computed_values_and_edge_cases():
    observed = np.array([3.0, 0.0, np.nan, -5.0])
    null_t = np.array([[1.0, 1, 0, 0], [2, -1, 0, 0], [3, 2, 0, -6], [4, 0, 0, 0]])
    network = np.array([True, True, True, False])
    result = specificity(observed, null_t, network, alpha=0.5)
    # vertex 0: nulls >= 3 are 3, 4 -> p = 3/5; vertex 1: nulls >= 0 are 1, 2, 0 -> p = 4/5
    np.testing.assert_allclose(result["p_map"][:2], [3 / 5, 4 / 5])
    assert np.isnan(result["p_map"][2]) and not result["specific_mask"][2]
    np.testing.assert_allclose(specificity(observed, null_t, network, sign=-1)["p_map"][3], 2 / 5)
    assert result["specificity"] == 0.0
    assert np.isnan(specificity(observed, null_t, np.zeros(4, bool))["specificity"])


def test_null_similarity_detects_degree_dominated_maps():
    rng = np.random.default_rng(2)
    degree = rng.gamma(2.0, size=3000)  # a shared, seed-independent pattern
    null_t = degree + 0.3 * rng.standard_normal((20, 3000))
    like_nulls = degree + 0.3 * rng.standard_normal(3000)
    unrelated = rng.standard_normal(3000)
    network = like_nulls > 3
    assert specificity(like_nulls, null_t, network)["null_similarity"] > 0.9
    assert abs(specificity(unrelated, null_t, network)["null_similarity"]) < 0.1


def test_specificity_batch_equals_single():
    rng = np.random.default_rng(3)
    observed = rng.standard_normal((3, 500)) * 2
    null_t = rng.standard_normal((3, 25, 500))
    networks = np.abs(observed) > 1.5
    networks[2] = False
    signs = np.array([1, -1, 1])
    batch = specificity_batch(observed, null_t, networks, sign=signs, alpha=0.1)
    for k in range(3):
        single = specificity(observed[k], null_t[k], networks[k], sign=signs[k], alpha=0.1)
        np.testing.assert_array_equal(batch["p_map"][k], single["p_map"])
        np.testing.assert_array_equal(batch["specific_mask"][k], single["specific_mask"])
        np.testing.assert_equal(batch["specificity"][k], single["specificity"])
        assert batch["null_similarity"][k] == pytest.approx(single["null_similarity"])
    assert np.isnan(batch["specificity"][2])


def test_specificity_errors():
    with pytest.raises(ValueError, match="null_t must have shape"):
        specificity(np.zeros(5), np.zeros((3, 4)), np.ones(5, bool))
    with pytest.raises(ValueError, match="sign must be"):
        specificity(np.zeros(5), np.zeros((3, 5)), np.ones(5, bool), sign=0)
    with pytest.raises(ValueError, match="alpha"):
        specificity(np.zeros(5), np.zeros((3, 5)), np.ones(5, bool), alpha=1.5)
    with pytest.raises(ValueError, match="network_mask must have shape"):
        specificity(np.zeros(5), np.zeros((3, 5)), np.ones(4, bool))
