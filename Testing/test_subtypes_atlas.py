"""Atlas regions of SuStaIn biomarkers: matching, files, the default atlas, stage and onset maps."""

import nibabel as nib
import numpy as np
import pytest

from neuroatrophy.subtypes_atlas import (
    RegionAtlas,
    match_biomarkers,
    normalise_name,
    onset_map,
    stage_maps,
    unmatched_biomarkers,
)
from neuroatrophy.sustain import SustainModel, event_spec, mixture_spec

AFFINE = np.array([[2.0, 0, 0, -10], [0, 2.0, 0, -20], [0, 0, 2.0, -30], [0, 0, 0, 1]])

# Events of the model below, z-level-major: e0 = (Cortical GM, z 1), e1 = (Brainstem, z 1),
# e2 = (Cortical GM, z 2). Its one subtype's sequence is e1, e0, e2.
# Trajectory knots (stage position, z), N = 3 events, z_max = (3, 2):
#   Cortical GM: (0, 0), (2, 1), (3, 2), (4, 3) -> points 0, .5, 1, 2, 3 -> stage means .25, .75, 1.5, 2.5
#   Brainstem:   (0, 0), (1, 1), (4, 2)         -> points 0, 1, 4/3, 5/3, 2 -> means .5, 7/6, 1.5, 11/6
HAND_CORTEX = np.array([0.25, 0.75, 1.5, 2.5])
HAND_BRAINSTEM = np.array([0.5, 7 / 6, 1.5, 11 / 6])


def _labels():
    labels = np.zeros((6, 5, 4), dtype=np.int16)
    labels[:2] = 1
    labels[2:4] = 2
    labels[4, :3] = 3
    return labels


def _atlas(regions=None):
    regions = regions or {"Cortical GM": [1, 2], "Brainstem": [3], "ctx-lh-precuneus": [2]}
    return RegionAtlas(_labels(), AFFINE, regions, aliases={"Brain stem": "Brainstem"}, name="toy")


def _zscore_model(biomarkers=("Cortical GM", "Brainstem")):
    spec = event_spec([[1, 2], [1]], [3.0, 2.0], list(biomarkers))
    sequence = [[1, 0, 2]]
    return SustainModel("zscore", spec, sequence, [1.0], 0.0, np.array([sequence]), [[1.0]], [0.0])


def test_normalise_name_ignores_case_spaces_hyphens_underscores():
    assert normalise_name("ctx-lh-precuneus") == normalise_name("CTX_LH Precuneus") == "ctxlhprecuneus"


def test_match_biomarkers_is_insensitive_and_reports_regionless_biomarkers():
    atlas = _atlas()
    matches = match_biomarkers(atlas, ["cortical_gm", "BRAIN STEM", "Spinal cord", "ctx lh precuneus"])
    assert matches == {"cortical_gm": "Cortical GM", "BRAIN STEM": "Brainstem", "Spinal cord": None,
                       "ctx lh precuneus": "ctx-lh-precuneus"}
    assert unmatched_biomarkers(matches) == ["Spinal cord"]


def test_match_biomarkers_error_lists_the_available_regions():
    with pytest.raises(ValueError, match=r"none of the biomarkers \['Spinal cord'\].*available regions: "
                                         r"Cortical GM, Brainstem, ctx-lh-precuneus"):
        match_biomarkers(_atlas(), ["Spinal cord"])
    with pytest.raises(ValueError, match="not a single string"):
        match_biomarkers(_atlas(), "Brainstem")


def test_atlas_checks_its_input():
    with pytest.raises(ValueError, match="3-D"):
        RegionAtlas(np.zeros((3, 3), dtype=int), AFFINE, {"a": [1]})
    with pytest.raises(ValueError, match="integers"):
        RegionAtlas(np.zeros((3, 3, 3)), AFFINE, {"a": [1]})
    with pytest.raises(ValueError, match="unknown regions"):
        RegionAtlas(_labels(), AFFINE, {"a": [1]}, aliases={"b": "c"})
    np.testing.assert_array_equal(_atlas().region_mask("brain_stem"), _labels() == 3)


def test_from_files_reads_a_label_volume_and_a_region_table(tmp_path):
    nib.save(nib.Nifti1Image(_labels(), AFFINE), tmp_path / "labels.nii.gz")
    (tmp_path / "regions.csv").write_text("region,label\nCortical GM,1\nCortical GM,2\nBrainstem,3\n")
    atlas = RegionAtlas.from_files(tmp_path / "labels.nii.gz", tmp_path / "regions.csv")
    assert atlas.regions == {"Cortical GM": (1, 2), "Brainstem": (3,)}
    np.testing.assert_array_equal(atlas.labels, _labels())
    np.testing.assert_allclose(atlas.affine, AFFINE)

    (tmp_path / "bad.csv").write_text("name,label\nCortical GM,1\n")
    with pytest.raises(ValueError, match=r"bad.csv: missing column\(s\) \['region'\]"):
        RegionAtlas.from_files(tmp_path / "labels.nii.gz", tmp_path / "bad.csv")
    (tmp_path / "bad.csv").write_text("region,label\nCortical GM,1.5\n")
    with pytest.raises(ValueError, match=r"bad.csv: labels must be non-negative integers, got '1.5' \(row 2\)"):
        RegionAtlas.from_files(tmp_path / "labels.nii.gz", tmp_path / "bad.csv")
    (tmp_path / "bad.csv").write_text("region,label\nThalamus,9\n")
    with pytest.raises(ValueError, match=r"regions with no voxel in labels.nii.gz: \['Thalamus'\]"):
        RegionAtlas.from_files(tmp_path / "labels.nii.gz", tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        RegionAtlas.from_files(tmp_path / "missing.nii.gz", tmp_path / "regions.csv")


def test_desikan_killiany_regions_and_tissue_groups():
    atlas = RegionAtlas.desikan_killiany()
    assert atlas.shape == (143, 155, 181)
    cortex = set(atlas.regions["Cortical GM"])
    assert {1025, 2025, 1035, 2035} <= cortex and not {1000, 2000, 17} & cortex
    assert len(cortex) == 68
    assert set(atlas.regions["Subcortical GM"]) == {10, 11, 12, 13, 17, 18, 26, 28, 49, 50, 51, 52, 53, 54, 58, 60}
    assert atlas.regions["Brainstem"] == (16,) and atlas.regions["precuneus"] == (1025, 2025)
    matches = match_biomarkers(atlas, ["Cortical grey matter", "Cerebellar WM", "L_precuneus", "Left-Hippocampus",
                                       "Spinal cord"])
    assert list(matches.values()) == ["Cortical GM", "Cerebellar WM", "ctx-lh-precuneus", "Left-Hippocampus", None]
    # Left precuneus voxels lie left of the midline (RAS x < 0).
    voxels = np.argwhere(atlas.region_mask("ctx-lh-precuneus"))
    x = (atlas.affine @ np.c_[voxels, np.ones(len(voxels))].T)[0]
    assert np.all(x <= 0) and x.mean() < -5


def test_downsampled_keeps_world_positions():
    atlas = RegionAtlas.desikan_killiany()
    coarse = atlas.downsampled(2)
    assert coarse.shape == (72, 78, 91)
    ijk = np.array([10, 20, 30, 1.0])
    np.testing.assert_allclose(coarse.affine @ ijk, atlas.affine @ np.r_[2 * ijk[:3], 1])
    assert coarse.labels[10, 20, 30] == atlas.labels[20, 40, 60]
    with pytest.raises(ValueError, match="step"):
        atlas.downsampled(0)


def test_stage_maps_paint_the_hand_computed_trajectories():
    model = _zscore_model()
    np.testing.assert_allclose(model.trajectories()[0], np.c_[HAND_CORTEX, HAND_BRAINSTEM])
    labels = _labels()
    maps = stage_maps(model, _atlas(), 1, background=-1.0)
    assert maps.shape == (4, *labels.shape) and maps.dtype == np.float32
    for stage in range(4):
        np.testing.assert_allclose(maps[stage][np.isin(labels, [1, 2])], HAND_CORTEX[stage], rtol=1e-6)
        np.testing.assert_allclose(maps[stage][labels == 3], HAND_BRAINSTEM[stage], rtol=1e-6)
        assert np.all(maps[stage][labels == 0] == -1.0)


def test_overlapping_regions_show_the_largest_value_and_the_earliest_onset():
    atlas = _atlas({"Cortical GM": [1, 2], "Brainstem": [2, 3]})
    maps = stage_maps(atlas=atlas, model=_zscore_model(), subtype=1)
    shared = _labels() == 2
    np.testing.assert_allclose(maps[:, shared][:, 0], np.maximum(HAND_CORTEX, HAND_BRAINSTEM), rtol=1e-6)
    onset = onset_map(_zscore_model(), atlas, 1)
    assert np.all(onset[shared] == 1)  # Brainstem's z=1 event is first


def test_onset_map_levels_and_regionless_biomarkers():
    model = _zscore_model(("Cortical GM", "Spinal cord"))
    labels = _labels()
    first = onset_map(model, _atlas(), 1)
    assert np.all(first[np.isin(labels, [1, 2])] == 2)  # e0 at position 2
    assert np.all(first[(labels == 0) | (labels == 3)] == 0)  # outside, and Brainstem is not a biomarker
    second = onset_map(model, _atlas(), 1, level=1)
    assert np.all(second[np.isin(labels, [1, 2])] == 3)
    maps = stage_maps(model, _atlas(), 1)
    assert np.all(maps[:, labels == 3] == 0)  # "Spinal cord" has no region: nothing painted


def test_mixture_model_maps_events_that_have_occurred():
    spec = mixture_spec(["Cortical GM", "Brainstem"])
    model = SustainModel("mixture", spec, [[1, 0]], [1.0], 0.0, np.array([[[1, 0]]]), [[1.0]], [0.0])
    labels = _labels()
    maps = stage_maps(model, _atlas(), 1)
    np.testing.assert_array_equal(maps[:, labels == 3][:, 0], [0, 1, 1])
    np.testing.assert_array_equal(maps[:, labels == 1][:, 0], [0, 0, 1])
    assert np.all(onset_map(model, _atlas(), 1)[labels == 1] == 2)


def test_bad_subtype_and_no_region_are_errors():
    with pytest.raises(ValueError, match=r"subtype must be an integer from 1 to 1 .*got 2"):
        stage_maps(_zscore_model(), _atlas(), 2)
    with pytest.raises(ValueError, match="none of the biomarkers"):
        onset_map(_zscore_model(("Optic nerve", "Spinal cord")), _atlas(), 1)
