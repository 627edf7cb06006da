"""Tests for neuroatrophy.targets: the target library, tables, markups and ROIs on real fsaverage5 geometry."""

import re
from collections import Counter

import numpy as np
import pytest
import slicer
from scipy.spatial import cKDTree

from neuroatrophy import mrml
from neuroatrophy.surface import dk_atlas, load_fsaverage5
from neuroatrophy.targets import (
    DEFAULT_RADIUS_MM,
    STANDARD_TARGETS,
    Target,
    get_target,
    standard_targets,
    target_roi,
    target_rois,
    targets_from_points,
    targets_from_table,
    targets_table,
    user_target,
)


@pytest.fixture(scope="module")
def midthickness():
    """fsaverage5 midthickness coordinates (mean of pial and white), as the connectome uses."""
    return (load_fsaverage5("pial").vertices + load_fsaverage5("white").vertices) / 2


@pytest.fixture(scope="module")
def atlas():
    return dk_atlas()


@pytest.fixture(scope="module")
def cortex(atlas):
    """Valid nodes: every vertex off the medial wall."""
    return ~atlas.medial_wall


# ----------------------------------------------------------------- library
def test_standard_targets_have_published_coordinates_and_citations():
    targets = {t.name: t for t in standard_targets()}
    assert len(targets) == len(STANDARD_TARGETS) == 8
    expected = {
        "DLPFC_5cm": (-41, 16, 54), "DLPFC_F3": (-37, 26, 49), "DLPFC_BA9": (-36, 39, 43),
        "DLPFC_BA46": (-44, 40, 29), "DLPFC_sgACC_Fox2012": (-38, 44, 26),
        "DLPFC_sgACC_Weigand2018": (-42, 44, 30), "sgACC": (6, 16, -10),
    }
    for name, xyz in expected.items():
        assert targets[name].mni == tuple(float(v) for v in xyz)
    fox_doi = "doi:10.1016/j.biopsych.2012.04.028"
    for name in ("DLPFC_5cm", "DLPFC_F3", "DLPFC_BA9", "DLPFC_BA46", "DLPFC_sgACC_Fox2012", "sgACC"):
        assert fox_doi in targets[name].citation
    assert "Herbsman" in targets["DLPFC_5cm"].citation and "Beam" in targets["DLPFC_F3"].citation
    assert "Hoffman" in targets["TPJ_T3P3"].citation
    for target in targets.values():
        assert target.kind == "standard" and target.radius_mm == DEFAULT_RADIUS_MM == 10.0
        assert target.indication and target.citation and target.note
    # Coordinates taken from third-party code or derived here say so.
    for name in ("DLPFC_sgACC_Fox2012", "DLPFC_sgACC_Weigand2018", "TPJ_T3P3"):
        assert "nverified" in targets[name].note
    # The library is immutable: the list is a copy, the targets are frozen.
    standard_targets().clear()
    assert len(standard_targets()) == 8
    with pytest.raises(AttributeError):
        STANDARD_TARGETS[0].radius_mm = 20.0


def test_get_target_is_case_insensitive_and_lists_names_when_unknown():
    assert get_target("dlpfc_f3") is get_target(" DLPFC_F3 ")
    assert get_target("SGACC").mni == (6.0, 16.0, -10.0)
    with pytest.raises(ValueError, match="No standard target named 'DLPFC'") as info:
        get_target("DLPFC")
    for target in STANDARD_TARGETS:
        assert target.name in str(info.value)


def test_user_target_normalises_and_validates():
    target = user_target("  my site ", [-40, 30.5, np.float32(40)], radius_mm=6)
    assert target == Target("my site", (-40.0, 30.5, 40.0), 6.0, kind="user")
    assert target.kind == "user" and isinstance(target.mni[2], float)
    with pytest.raises(ValueError, match="'bad': coordinates must be 3 finite numbers"):
        user_target("bad", (1, np.nan, 2))
    with pytest.raises(ValueError, match="'bad': coordinates must be 3 finite numbers"):
        user_target("bad", (1, 2))
    with pytest.raises(ValueError, match="'bad': coordinates must be 3 numbers"):
        user_target("bad", ("a", 1, 2))
    with pytest.raises(ValueError, match="'bad': radius_mm must be a positive number"):
        user_target("bad", (1, 2, 3), radius_mm=0)
    with pytest.raises(ValueError, match="'bad': radius_mm must be a positive number"):
        user_target("bad", (1, 2, 3), radius_mm=np.inf)
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        user_target("  ", (1, 2, 3))
    with pytest.raises(ValueError, match="kind must be one of standard, user"):
        Target("x", (1, 2, 3), kind="custom")


# ---------------------------------------------------------------- markups
def test_targets_from_points_names_and_validation():
    points = np.array([[-38.0, 44.0, 26.0], [10.0, 20.0, 30.0], [0.0, 0.0, 0.0]])
    targets = targets_from_points(points, ["peak A", "", None], radius_mm=8)
    assert [t.name for t in targets] == ["peak A", "point-2", "point-3"]
    assert targets[0].mni == (-38.0, 44.0, 26.0) and all(t.radius_mm == 8.0 and t.kind == "user" for t in targets)
    assert [t.name for t in targets_from_points(points[:2])] == ["point-1", "point-2"]
    with pytest.raises(ValueError, match="Duplicate target names in markup labels.*: a, A$"):
        targets_from_points(points[:2], ["a", "A"])
    with pytest.raises(ValueError, match="Got 1 labels for 3 points"):
        targets_from_points(points, ["a"])
    with pytest.raises(ValueError, match=r"shape \(n_points, 3\)"):
        targets_from_points(points[:, :2])
    with pytest.raises(ValueError, match="no points"):
        targets_from_points(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="non-finite coordinates: b"):
        targets_from_points([[1, 2, 3], [np.nan, 0, 0]], ["a", "b"])


def test_targets_from_markups_node_of_a_real_scene():
    scene = slicer.vtkMRMLScene()
    points = np.array([[-41.0, 16.0, 54.0], [-63.0, -50.0, 19.0]])
    node = mrml.add_markups_points(scene, points, ["5-cm site", "T3P3"], "TMS targets")
    targets = targets_from_points(*mrml.points_from_markups(node))
    assert [t.name for t in targets] == ["5-cm site", "T3P3"]
    np.testing.assert_allclose([t.mni for t in targets], points)


# ------------------------------------------------------------------ tables
def test_table_round_trip_through_csv_keeps_every_field(tmp_path):
    targets = standard_targets() + [user_target("mine", (-40.25, 30.125, 41.0), 7.5, note="from a study, p. 3")]
    table = targets_table(targets)
    assert list(table.columns) == ["name", "x", "y", "z", "radius_mm", "indication", "kind", "citation", "note"]
    assert table.loc[0, "citation"] == targets[0].citation
    path = tmp_path / "targets.csv"
    table.to_csv(path, index=False)
    assert targets_from_table(path) == targets
    assert targets_from_table(table) == targets  # DataFrame input


def test_table_minimal_columns_defaults_and_tsv(tmp_path):
    path = tmp_path / "mine.tsv"
    path.write_text("Name\tX\tY\tZ\tradius_mm\nA\t-40\t30\t40\t\nB\t10\t20\t30\t6\n")
    a, b = targets_from_table(path)
    assert a == Target("A", (-40, 30, 40), DEFAULT_RADIUS_MM) and b.radius_mm == 6.0
    assert a.kind == "user"


@pytest.mark.parametrize("text, message", [
    ("name,x,y\nA,1,2\n", r"missing column\(s\) 'z'; available columns: 'name', 'x', 'y'"),
    ("name,x,y,z\nA,1,2,3\nB,1,two,3\n", r"row 2 \('B'\): column 'y' must be a finite number, got 'two'"),
    ("name,x,y,z\nA,1,2,3\n,1,2,3\n", r"row 2: column 'name' is empty"),
    ("name,x,y,z,radius_mm\nA,1,2,3,-5\n", r"row 1 \('A'\): column 'radius_mm' must be positive"),
    ("name,x,y,z\nA,1,2,3\na,4,5,6\n", r"Duplicate target names .*: A, a$"),
    ("name,x,y,z,kind\nA,1,2,3,weird\n", r"row 1 \('A'\): column 'kind' must be one of standard, user"),
    ("name,x,y,z\n", r"has no rows"),
    ("", r"is empty"),
])
def test_table_errors_name_file_row_and_column(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        targets_from_table(path)
    assert str(path) in str(info.value)


def test_table_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="Target table not found: .*nothing.csv"):
        targets_from_table(tmp_path / "nothing.csv")


# -------------------------------------------------------------------- ROIs
def test_every_standard_target_covers_cortex_on_fsaverage5(midthickness, cortex, atlas):
    """Each 10 mm sphere holds at least 10 cortical vertices, in the expected regions."""
    expected_regions = {
        "DLPFC_5cm": {"L_caudalmiddlefrontal"},
        "DLPFC_F3": {"L_caudalmiddlefrontal", "L_rostralmiddlefrontal"},
        "DLPFC_BA9": {"L_rostralmiddlefrontal"},
        "DLPFC_BA46": {"L_rostralmiddlefrontal"},
        "DLPFC_sgACC_Fox2012": {"L_rostralmiddlefrontal"},
        "DLPFC_sgACC_Weigand2018": {"L_rostralmiddlefrontal"},
        "sgACC": {"R_medialorbitofrontal", "R_rostralanteriorcingulate", "R_lateralorbitofrontal"},
        "TPJ_T3P3": {"L_supramarginal", "L_superiortemporal", "L_bankssts"},
    }
    tree = cKDTree(midthickness)
    for target in standard_targets():
        roi = target_roi(target, midthickness, cortex)
        assert roi.dtype == bool and roi.shape == (20484,)
        # Independent check of membership: a k-d tree ball query restricted to the cortex.
        ball = np.zeros(20484, dtype=bool)
        ball[tree.query_ball_point(target.mni, target.radius_mm)] = True
        np.testing.assert_array_equal(roi, ball & cortex, err_msg=target.name)
        assert roi.sum() >= 10, f"{target.name}: only {roi.sum()} vertices"
        regions = Counter(atlas.names[label - 1] for label in atlas.labels[roi])
        assert set(regions) <= expected_regions[target.name], (target.name, regions)
    # The sgACC seed is deep: its sphere reaches the medial wall, which the valid mask removes.
    sgacc = get_target("sgACC")
    assert target_roi(sgacc, midthickness).sum() > target_roi(sgacc, midthickness, cortex).sum()


def test_point_outside_the_brain_raises_with_the_distance(midthickness, cortex):
    target = user_target("above the head", (0, 0, 120))
    nearest = np.linalg.norm(midthickness[cortex] - [0, 0, 120], axis=1).min()
    assert nearest > 30
    with pytest.raises(ValueError) as info:
        target_roi(target, midthickness, cortex)
    message = str(info.value)
    assert "'above the head' at MNI (0, 0, 120) is outside the brain / outside the connectome" in message
    assert f"nearest valid node is {nearest:.1f} mm away" in message
    # A target in the medial wall only: outside the valid nodes even though vertices are near.
    wall = int(np.flatnonzero(~cortex)[0])
    tiny = user_target("wall", midthickness[wall], radius_mm=0.01)
    with pytest.raises(ValueError, match=r"'wall' at MNI .* no valid node within its 0.01 mm radius"):
        target_roi(tiny, midthickness, cortex)


def test_target_rois_weights(midthickness, cortex):
    targets = [get_target("DLPFC_F3"), get_target("TPJ_T3P3"), user_target("small", (-37, 26, 49), 5)]
    weights = target_rois(targets, midthickness, cortex)
    assert weights.shape == (3, 20484) and weights.dtype == np.float64
    assert set(np.unique(weights)) == {0.0, 1.0}
    np.testing.assert_array_equal(weights[0] > 0, target_roi(targets[0], midthickness, cortex))
    assert not np.any(weights[:, ~cortex])
    assert 0 < weights[2].sum() < weights[0].sum()  # smaller sphere, same centre: a subset
    assert np.all(weights[2] <= weights[0])
    np.testing.assert_array_equal(target_rois(targets[1], midthickness, cortex), weights[1:2])
    with pytest.raises(ValueError, match="'far' at MNI"):
        target_rois([targets[0], user_target("far", (200, 0, 0))], midthickness, cortex)


def test_roi_input_validation(midthickness):
    target = get_target("DLPFC_F3")
    with pytest.raises(ValueError, match=r"coordinates must have shape \(V, 3\)"):
        target_roi(target, midthickness[:, :2])
    with pytest.raises(ValueError, match=r"valid must be a boolean array of shape \(20484,\)"):
        target_roi(target, midthickness, np.ones(20484))
    with pytest.raises(ValueError, match="no valid node"):
        target_roi(target, midthickness, np.zeros(20484, dtype=bool))
    with pytest.raises(ValueError, match="target must be a Target"):
        target_roi("DLPFC_F3", midthickness)
    with pytest.raises(ValueError, match="targets must be Target objects"):
        target_rois(["DLPFC_F3"], midthickness)
    # MNI voxel grids work the same way: 2 mm voxel centres around the F3 site.
    grid = np.stack(np.meshgrid(*[np.arange(-60, 61, 2.0)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    roi = target_roi(target, grid)
    expected = np.linalg.norm(grid - target.mni, axis=1) <= 10
    np.testing.assert_array_equal(roi, expected)
    assert re.fullmatch(r"\d+", str(roi.sum())) and 400 < roi.sum() < 600  # ~ 4/3 pi 10^3 / 8 = 524
