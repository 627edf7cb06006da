"""Tests for neuroatrophy.atrophy on the real fsaverage5 mesh."""

import numpy as np
import pytest

from neuroatrophy.atrophy import atrophy_map, atrophy_maps, detection_rates, regional_summary
from neuroatrophy.surface import dk_atlas

N = 20484


def _grow_patches(adjacency, seeds, sizes):
    """Connected patches of exactly ``sizes`` vertices grown breadth-first from ``seeds``.

    A patch never touches an earlier one (nor its neighbours), so each is its own
    connected component of the union.
    """
    blocked = np.zeros(adjacency.shape[0], dtype=bool)
    patches = []
    for seed, size in zip(seeds, sizes):
        assert not blocked[seed]
        patch, frontier, seen = [], [seed], {seed}
        while len(patch) < size:
            vertex = frontier.pop(0)
            patch.append(vertex)
            for neighbour in adjacency[vertex].indices:
                if neighbour not in seen and not blocked[neighbour]:
                    seen.add(neighbour)
                    frontier.append(neighbour)
        patch = np.array(patch)
        blocked[patch] = True
        blocked[adjacency[patch].indices] = True  # keep a one-vertex gap to the next patch
        patches.append(patch)
    return patches


@pytest.fixture(scope="module")
def planted(fsaverage5):
    """A z map with planted atrophic patches of known sizes (and isolated noise vertices)."""
    adjacency = fsaverage5.adjacency()
    atlas = dk_atlas()
    sizes = [60, 30, 12, 11, 3, 1, 1]
    # one seed per region, spread over both hemispheres
    regions = ["L_precentral", "R_superiorfrontal", "L_lingual", "R_insula", "L_fusiform", "R_cuneus", "L_precuneus"]
    seeds = [int(np.flatnonzero(atlas.region_mask(r))[0]) for r in regions]
    patches = _grow_patches(adjacency, seeds, sizes)
    z = np.zeros(N)
    for k, patch in enumerate(patches):
        z[patch] = -2.5 - 0.1 * k
    return z, patches, sizes, adjacency


def test_cluster_filter_recovers_planted_clusters_exactly(planted):
    z, patches, sizes, adjacency = planted
    result = atrophy_map(z, threshold=-1.96, min_cluster_size=12, adjacency=adjacency)
    expected = np.zeros(N, dtype=bool)
    for patch, size in zip(patches, sizes):
        if size >= 12:
            expected[patch] = True
    np.testing.assert_array_equal(result.mask, expected)
    assert result.n_atrophic == 60 + 30 + 12 and result.n_clusters == 3
    for label, patch in enumerate(patches[:3], start=1):  # numbered by decreasing size
        assert (result.cluster_labels[patch] == label).all()
    assert (result.cluster_labels[~expected] == 0).all()
    table = result.clusters()
    assert table["n_vertices"].tolist() == [60, 30, 12]
    assert table["mean_z"].tolist() == pytest.approx([-2.5, -2.6, -2.7])
    assert table["min_z"].tolist() == pytest.approx([-2.5, -2.6, -2.7])
    assert table["peak_vertex"].tolist() == [int(p.min()) for p in patches[:3]]  # ties: lowest vertex
    assert result.threshold == -1.96 and result.min_cluster_size == 12


def test_without_size_filter_every_cluster_is_labelled(planted, fsaverage5):
    z, patches, sizes, adjacency = planted
    result = atrophy_map(z, adjacency=fsaverage5)  # a Surface works as adjacency
    assert result.n_atrophic == sum(sizes) and result.n_clusters == len(sizes)
    assert sorted(result.clusters()["n_vertices"], reverse=True) == sorted(sizes, reverse=True)
    # without adjacency connectivity is unknown: one label for every atrophic vertex
    plain = atrophy_map(z)
    np.testing.assert_array_equal(plain.mask, result.mask)
    assert set(np.unique(plain.cluster_labels)) == {0, 1}


def test_threshold_nan_and_valid(planted):
    z, patches, sizes, adjacency = planted
    atlas = dk_atlas()
    noisy = z.copy()
    noisy[atlas.medial_wall] = -10.0
    noisy[patches[0][:5]] = np.nan
    result = atrophy_map(noisy, threshold=-2.55, valid=~atlas.medial_wall)
    assert not result.mask[atlas.medial_wall].any()
    assert not result.mask[patches[0]].any()  # -2.5 is above -2.55; NaN never atrophic
    assert result.mask[patches[1]].all()
    assert result.n_atrophic == sum(sizes[1:])


def test_atrophy_maps_matches_single_maps(planted, rng):
    z, patches, sizes, adjacency = planted
    Z = np.vstack([z, z + rng.normal(0, 0.3, N), np.zeros(N)])
    maps = atrophy_maps(Z, threshold=-2.0, min_cluster_size=5, adjacency=adjacency)
    assert len(maps) == 3
    for row, result in zip(Z, maps):
        single = atrophy_map(row, threshold=-2.0, min_cluster_size=5, adjacency=adjacency)
        np.testing.assert_array_equal(result.mask, single.mask)
        np.testing.assert_array_equal(result.cluster_labels, single.cluster_labels)
    assert maps[2].n_atrophic == 0 and len(maps[2].clusters()) == 0


def test_atrophy_map_parameter_errors(planted):
    z, _, _, adjacency = planted
    with pytest.raises(ValueError, match="adjacency"):
        atrophy_map(z, min_cluster_size=5)
    with pytest.raises(ValueError, match="adjacency must have shape"):
        atrophy_map(z, adjacency=adjacency[:100, :100])
    with pytest.raises(ValueError, match="valid must have shape"):
        atrophy_map(z, valid=np.ones(10, dtype=bool))
    with pytest.raises(ValueError, match="valid must be a boolean"):
        atrophy_map(z, valid=np.ones(N))
    with pytest.raises(ValueError, match="min_cluster_size"):
        atrophy_map(z, min_cluster_size=-1, adjacency=adjacency)
    with pytest.raises(ValueError, match="threshold"):
        atrophy_map(z, threshold=np.nan)
    with pytest.raises(ValueError, match="z must be a 1-D"):
        atrophy_map(np.vstack([z, z]))
    with pytest.raises(ValueError, match="Z must have shape"):
        atrophy_maps(z)


def test_regional_summary_on_planted_map():
    atlas = dk_atlas()
    z = np.zeros(N)
    precentral = np.flatnonzero(atlas.region_mask("L_precentral"))
    insula = np.flatnonzero(atlas.region_mask("R_insula"))
    z[precentral] = -3.0
    half = insula[: len(insula) // 2]
    z[half] = -2.0
    z[insula[-1]] = np.nan
    z[atlas.medial_wall] = -9.0  # must not count anywhere
    mask = z < -1.96
    summary = regional_summary(z, mask, atlas)

    assert len(summary) == 68 and set(summary["region"]) == set(atlas.names)
    assert summary["n_vertices"].sum() == N - atlas.medial_wall.sum()
    first, second = summary.iloc[0], summary.iloc[1]
    assert first["region"] == "L_precentral" and first["hemisphere"] == "left"
    assert first["n_atrophic"] == first["n_vertices"] == len(precentral)
    assert first["fraction_atrophic"] == 1.0 and first["mean_z"] == -3.0 and first["min_z"] == -3.0
    assert second["region"] == "R_insula" and second["hemisphere"] == "right"
    assert second["n_vertices"] == len(insula) and second["n_atrophic"] == len(half)
    assert second["fraction_atrophic"] == pytest.approx(len(half) / len(insula))
    assert second["mean_z"] == pytest.approx(-2.0 * len(half) / (len(insula) - 1))  # NaN vertex ignored
    assert second["min_z"] == -2.0
    rest = summary.iloc[2:]
    assert (rest["n_atrophic"] == 0).all() and (rest["mean_z"] == 0).all()
    with pytest.raises(ValueError, match="mask must be a boolean"):
        regional_summary(z, mask.astype(int), atlas)
    with pytest.raises(ValueError, match="z must have shape"):
        regional_summary(z[:10], mask, atlas)


def test_regional_summary_orders_ties_by_mean_z():
    atlas = dk_atlas()
    z = np.zeros(N)
    for name, value in (("L_cuneus", -2.5), ("R_cuneus", -4.0), ("L_insula", -3.0)):
        z[atlas.region_mask(name)] = value
    summary = regional_summary(z, z < -1.96, atlas)
    assert summary["region"].tolist()[:3] == ["R_cuneus", "L_insula", "L_cuneus"]


def test_detection_rates_on_hand_made_masks():
    predicted = np.array([1, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
    truth = np.array([1, 0, 0, 1, 0, 0, 0, 0], dtype=bool)
    # TP=1, FP=2, FN=1, TN=4
    rates = detection_rates(predicted, truth)
    assert rates == pytest.approx({"sensitivity": 0.5, "specificity": 4 / 6, "precision": 1 / 3, "dice": 2 / 5})
    # excluding vertices 1 and 2 removes both false positives
    valid = np.array([1, 0, 0, 1, 1, 1, 1, 1], dtype=bool)
    rates = detection_rates(predicted, truth, valid=valid)
    assert rates == pytest.approx({"sensitivity": 0.5, "specificity": 1.0, "precision": 1.0, "dice": 2 / 3})
    # pooled over subjects: rows add up
    pooled = detection_rates(np.vstack([predicted, truth]), np.vstack([truth, truth]))
    assert pooled == pytest.approx({"sensitivity": 0.75, "specificity": 10 / 12, "precision": 0.6, "dice": 6 / 9})
    # nothing true and nothing predicted: sensitivity, precision and dice are undefined
    empty = detection_rates(np.zeros(4, dtype=bool), np.zeros(4, dtype=bool))
    assert empty["specificity"] == 1.0
    assert np.isnan(empty["sensitivity"]) and np.isnan(empty["precision"]) and np.isnan(empty["dice"])
    with pytest.raises(ValueError, match="differ in shape"):
        detection_rates(predicted, truth[:4])
    with pytest.raises(ValueError, match="boolean"):
        detection_rates(predicted.astype(int), truth)
    with pytest.raises(ValueError, match="valid"):
        detection_rates(predicted, truth, valid=valid[:3])
