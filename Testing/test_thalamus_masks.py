"""Importing thalamus masks made by other tools (neuroatrophy.thalamus_masks)."""

import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from neuroatrophy.thalamus_labels import LEFT, RIGHT
from neuroatrophy.thalamus_masks import (
    MASK_FORMATS,
    dbsegment_nuclei,
    detect_format,
    load_external_mask,
    mindglide_dgm,
    resample_to,
    save_mask,
)

SHAPE = (40, 32, 24)
AAL = Path("/usr/share/mricron/templates/aal.nii.gz")
CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")

# Left thalamus at low voxel x (negative RAS x with a RAS affine), right one at high x: different sizes.
LEFT_BOX = (slice(10, 16), slice(12, 20), slice(8, 14))   # 6 * 8 * 6 = 288 voxels
RIGHT_BOX = (slice(24, 31), slice(12, 20), slice(8, 14))  # 7 * 8 * 6 = 336 voxels
N_LEFT, N_RIGHT = 288, 336


def ras_affine(shape=SHAPE, zoom=1.0):
    """RAS affine with the volume centred on world x = 0."""
    affine = np.diag([zoom, zoom, zoom, 1.0])
    affine[:3, 3] = -zoom * (np.array(shape) - 1) / 2
    return affine


def las_affine(shape=SHAPE):
    """LAS affine (x flipped): voxel index 0 is the subject's right."""
    affine = ras_affine(shape)
    affine[0, 0] = -1.0
    affine[0, 3] = (shape[0] - 1) / 2
    return affine


def save(data, path, affine=None):
    img = nib.Nifti1Image(np.asarray(data), ras_affine() if affine is None else affine)
    nib.save(img, str(path))
    return path


def thalamus_phantom():
    data = np.zeros(SHAPE, dtype=np.int16)
    data[LEFT_BOX] = LEFT
    data[RIGHT_BOX] = RIGHT
    return data


def aseg_phantom():
    """A FreeSurfer-coded map: thalami plus white matter, caudate, putamen, hippocampus."""
    data = np.zeros(SHAPE, dtype=np.int16)
    data[2:19, 2:30, 2:22] = 2
    data[21:38, 2:30, 2:22] = 41
    data[3:8, 3:8, 3:8] = 11
    data[32:37, 3:8, 3:8] = 50
    data[3:8, 24:29, 3:8] = 12
    data[32:37, 24:29, 3:8] = 51
    data[3:6, 3:6, 16:20] = 17
    data[33:36, 3:6, 16:20] = 53
    data[LEFT_BOX] = LEFT
    data[RIGHT_BOX] = RIGHT
    return data


def counts(img):
    data = np.asarray(img.dataobj)
    return int((data == LEFT).sum()), int((data == RIGHT).sum())


def test_formats_are_documented():
    for fmt in ("freesurfer", "synthseg", "fastsurfer", "first", "dbsegment", "mindglide", "aal", "binary", "labels"):
        assert MASK_FORMATS.get(fmt)
    assert "more than the thalamus" in MASK_FORMATS["mindglide"]


@pytest.mark.parametrize("suffix", [".mgz", ".nii.gz"])
def test_freesurfer_aseg_mgz_and_nifti(tmp_path, suffix):
    path = tmp_path / f"aseg{suffix}"
    data = aseg_phantom()
    if suffix == ".mgz":
        nib.save(nib.MGHImage(data.astype(np.int32), ras_affine()), str(path))
    else:
        save(data, path)
    assert detect_format(path) == "freesurfer"
    img = load_external_mask(path)
    assert img.get_data_dtype() == np.int16
    assert counts(img) == (N_LEFT, N_RIGHT)
    assert set(np.unique(np.asarray(img.dataobj))) == {0, LEFT, RIGHT}
    np.testing.assert_allclose(img.affine, ras_affine())
    # the same file read through the aliases
    assert counts(load_external_mask(path, fmt="synthseg")) == (N_LEFT, N_RIGHT)
    assert counts(load_external_mask(path, fmt="fastsurfer")) == (N_LEFT, N_RIGHT)


def test_freesurfer_detected_from_labels_without_name_hint(tmp_path):
    path = save(aseg_phantom(), tmp_path / "sub-01_labels.nii.gz")
    assert detect_format(path) == "freesurfer"
    assert counts(load_external_mask(path)) == (N_LEFT, N_RIGHT)


def test_first_firstseg(tmp_path):
    data = aseg_phantom()
    data[data == 2] = 0
    data[data == 41] = 0
    path = save(data, tmp_path / "T1_all_fast_firstseg.nii.gz")
    assert detect_format(path) == "first"
    assert counts(load_external_mask(path)) == (N_LEFT, N_RIGHT)


def test_first_single_structure_files(tmp_path):
    left = np.zeros(SHAPE, dtype=np.int16)
    left[LEFT_BOX] = LEFT + 100  # uncorrected boundary label
    left[11:15, 13:19, 9:13] = LEFT
    right = np.zeros(SHAPE, dtype=np.int16)
    right[RIGHT_BOX] = RIGHT
    left_path = save(left, tmp_path / "T1-L_Thal_first.nii.gz")
    right_path = save(right, tmp_path / "T1-R_Thal_first.nii.gz")
    assert detect_format(left_path) == "first"
    assert counts(load_external_mask(left_path)) == (N_LEFT, 0)
    assert counts(load_external_mask(right_path, fmt="first")) == (0, N_RIGHT)
    # side given explicitly for a renamed file
    renamed = save(left, tmp_path / "thal_first.nii.gz")
    assert counts(load_external_mask(renamed, fmt="first", side="left")) == (N_LEFT, 0)
    with pytest.raises(ValueError, match=r"thal_first\.nii\.gz.*right thalamus"):
        load_external_mask(renamed, fmt="first", side="right")


def test_dbsegment_whole_thalamus_is_union_of_parts(tmp_path):
    data = np.zeros(SHAPE, dtype=np.int16)
    data[2:38, 2:30, 2:22] = 1  # other brain
    data[3:8, 3:8, 3:8] = 14  # putamen
    data[32:37, 3:8, 3:8] = 15
    data[3:8, 24:29, 3:8] = 10  # internal capsule (label 10 is not thalamus here)
    data[LEFT_BOX] = 24
    data[10:16, 12:14, 8:14] = 26  # VPL_L: 6*2*6 = 72
    data[10:12, 14:20, 8:14] = 30  # VIM_L: 2*6*6 = 72
    data[RIGHT_BOX] = 25
    data[24:31, 18:20, 8:14] = 27  # VPL_R: 7*2*6 = 84
    data[29:31, 12:18, 8:14] = 31  # VIM_R: 2*6*6 = 72
    path = save(data, tmp_path / "sub-01_T1w_seg.nii.gz")
    assert detect_format(path) == "dbsegment"
    assert counts(load_external_mask(path)) == (N_LEFT, N_RIGHT)
    # 24/25 alone would under-count
    assert (data == 24).sum() < N_LEFT and (data == 25).sum() < N_RIGHT
    nuclei = dbsegment_nuclei(path)
    sizes = {name: int(np.asarray(img.dataobj).sum()) for name, img in nuclei.items()}
    assert sizes == {"THAL_L": N_LEFT - 144, "VPL_L": 72, "VIM_L": 72,
                     "THAL_R": N_RIGHT - 156, "VPL_R": 84, "VIM_R": 72}


def test_aal_real_atlas_on_colin27_grid():
    img = load_external_mask(AAL, reference=CH2)
    aal = np.asarray(nib.load(str(AAL)).dataobj)
    assert counts(img) == (int((aal == 77).sum()), int((aal == 78).sum()))
    assert detect_format(AAL) == "aal"
    # AAL's thalami lie on the correct sides of the MNI mid-plane
    x = img.affine[0, 0] * np.argwhere(np.asarray(img.dataobj) == LEFT)[:, 0] + img.affine[0, 3]
    assert x.mean() < 0


def test_aal_codes_detected_from_labels(tmp_path):
    data = np.zeros(SHAPE, dtype=np.int16)
    flat = data.reshape(-1)
    flat[: 116 * 10] = np.repeat(np.arange(1, 117), 10)  # all AAL codes present
    data = flat.reshape(SHAPE)
    data[LEFT_BOX] = 77
    data[RIGHT_BOX] = 78
    path = save(data, tmp_path / "atlas.nii.gz")
    assert detect_format(path) == "aal"
    left, right = counts(load_external_mask(path))
    assert (left, right) == (N_LEFT + 10, N_RIGHT + 10)


@pytest.mark.parametrize("orientation", ["RAS", "LAS"])
def test_binary_mask_split_by_ras_x(tmp_path, orientation):
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[LEFT_BOX] = 1
    mask[RIGHT_BOX] = 1
    affine = ras_affine() if orientation == "RAS" else las_affine()
    path = save(mask, tmp_path / "thalamus_mask.nii.gz", affine)
    assert detect_format(path) == "binary"
    img = load_external_mask(path)
    # In the LAS file the low-index box lies at positive x: it is the right thalamus.
    expected = (N_LEFT, N_RIGHT) if orientation == "RAS" else (N_RIGHT, N_LEFT)
    assert counts(img) == expected
    data = np.asarray(img.dataobj)
    world_x = img.affine[0, 0] * np.argwhere(data == LEFT)[:, 0] + img.affine[0, 3]
    assert world_x.max() < 0


def test_binary_mask_off_centre_uses_own_midplane(tmp_path):
    """A native-space mask far from world x = 0 is still split between its two thalami."""
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[LEFT_BOX] = 255
    mask[RIGHT_BOX] = 255
    affine = ras_affine()
    affine[0, 3] += 40.0  # both thalami at positive world x
    img = load_external_mask(save(mask, tmp_path / "mask.nii.gz", affine), fmt="binary")
    assert counts(img) == (N_LEFT, N_RIGHT)


def test_binary_mask_connected_split_at_centroid(tmp_path):
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[10:30, 12:20, 8:14] = 1  # one blob, 20 voxels wide: centroid at its middle
    img = load_external_mask(save(mask, tmp_path / "mask.nii.gz"), fmt="binary")
    assert counts(img) == (10 * 8 * 6, 10 * 8 * 6)
    one_side = load_external_mask(tmp_path / "mask.nii.gz", fmt="binary", side="right")
    assert counts(one_side) == (0, 20 * 8 * 6)


def test_user_labels(tmp_path):
    data = np.zeros(SHAPE, dtype=np.int16)
    data[LEFT_BOX] = 5
    data[24:31, 12:16, 8:14] = 6
    data[24:31, 16:20, 8:14] = 7
    data[1:3, 1:3, 1:3] = 8
    path = save(data, tmp_path / "nuclei.nii.gz")
    img = load_external_mask(path, fmt="labels", left_label=5, right_label=[6, 7])
    assert counts(img) == (N_LEFT, N_RIGHT)
    with pytest.raises(ValueError, match="left_label"):
        load_external_mask(path, fmt="labels")


def test_mindglide_dgm_split_with_prior(tmp_path):
    thalamus = thalamus_phantom()
    data = np.zeros(SHAPE, dtype=np.uint8)
    data[2:38, 2:30, 2:22] = 13  # white matter
    data[17:23, 4:28, 4:20] = 9  # ventricles
    data[thalamus != 0] = 3
    data[3:7, 12:20, 8:14] = 3   # left putamen, 4 voxels lateral of the left thalamus
    data[34:38, 12:20, 8:14] = 3  # right putamen
    data[10:16, 20:30, 8:14] = 3  # caudate running forward from the left thalamus (connected)
    path = save(data, tmp_path / "sub-01_mindglide.nii.gz")
    assert int(np.asarray(mindglide_dgm(path).dataobj).sum()) == N_LEFT + N_RIGHT + 2 * 4 * 8 * 6 + 6 * 10 * 6

    with pytest.raises(ValueError, match=r"sub-01_mindglide\.nii\.gz.*DGM.*prior"):
        load_external_mask(path, fmt="mindglide")

    # prior: our thalamus shrunk by one voxel on every face
    prior = np.zeros(SHAPE, dtype=np.int16)
    prior[11:15, 13:19, 9:13] = LEFT
    prior[25:30, 13:19, 9:13] = RIGHT
    prior_path = save(prior, tmp_path / "prior.nii.gz")
    # 1.8 mm reaches the thalamus's corners (sqrt(3) voxels from the prior) but not the caudate (2 voxels)
    img = load_external_mask(path, prior=prior_path, margin_mm=1.8)
    np.testing.assert_array_equal(np.asarray(img.dataobj), thalamus)
    # 3 mm: the caudate voxels within 3 mm of the prior join the left thalamus; the putamina (5 mm) stay out
    wide = np.asarray(load_external_mask(path, prior=prior_path).dataobj)
    caudate = np.argwhere(data[:, 20:30] == 3) + [0, 20, 0]
    nearest = np.clip(caudate, [11, 13, 9], [14, 18, 12])
    n_near = int((((caudate - nearest) ** 2).sum(axis=1) <= 9).sum())
    assert 0 < n_near < len(caudate)
    assert counts(nib.Nifti1Image(wide, ras_affine())) == (N_LEFT + n_near, N_RIGHT)
    assert not wide[3:7].any() and not wide[34:38].any()
    # a binary prior and a probability prior give the same split
    binary = load_external_mask(path, fmt="mindglide", prior=nib.Nifti1Image((prior != 0).astype(np.uint8),
                                                                             ras_affine()), margin_mm=1.8)
    np.testing.assert_array_equal(np.asarray(binary.dataobj), np.asarray(img.dataobj))
    probability = np.where(prior != 0, 0.9, 0.1).astype(np.float32)
    prob = load_external_mask(path, fmt="mindglide", prior=nib.Nifti1Image(probability, ras_affine()), margin_mm=1.8)
    np.testing.assert_array_equal(np.asarray(prob.dataobj), np.asarray(img.dataobj))


def test_mindglide_prior_on_another_grid_is_refused(tmp_path):
    data = np.zeros(SHAPE, dtype=np.uint8)
    data[2:38, 2:30, 2:22] = 13
    data[thalamus_phantom() != 0] = 3
    data[1, 1, 1] = 9
    path = save(data, tmp_path / "mindglide.nii.gz")
    prior = save(thalamus_phantom(), tmp_path / "prior.nii.gz", ras_affine(zoom=1.5))
    with pytest.raises(ValueError, match=r"mindglide\.nii\.gz.*prior\.nii\.gz"):
        load_external_mask(path, prior=prior)


def test_reference_grid_mismatch_names_both_files(tmp_path):
    path = save(aseg_phantom(), tmp_path / "aseg.nii.gz")
    reference = save(np.ones(SHAPE, np.float32), tmp_path / "T1w.nii.gz", ras_affine(zoom=1.2))
    with pytest.raises(ValueError, match=r"aseg\.nii\.gz.*T1w\.nii\.gz"):
        load_external_mask(path, reference=reference)
    other_shape = save(np.ones((40, 32, 20), np.float32), tmp_path / "small.nii.gz")
    with pytest.raises(ValueError, match=r"aseg\.nii\.gz.*small\.nii\.gz"):
        load_external_mask(path, reference=other_shape)
    same = save(np.ones(SHAPE, np.float32), tmp_path / "same.nii.gz")
    assert counts(load_external_mask(path, reference=same)) == (N_LEFT, N_RIGHT)


def test_no_thalamus_label_names_file_and_labels(tmp_path):
    data = aseg_phantom()
    data[data == LEFT] = 2
    data[data == RIGHT] = 41
    path = save(data, tmp_path / "aseg_nothal.nii.gz")
    with pytest.raises(ValueError, match=r"aseg_nothal\.nii\.gz.*no FreeSurfer thalamus label.*\[2, 11, 12"):
        load_external_mask(path, fmt="freesurfer")


def test_ambiguous_labels_ask_for_fmt(tmp_path):
    data = np.zeros(SHAPE, dtype=np.int16)
    data[LEFT_BOX] = 1
    data[RIGHT_BOX] = 2
    data[1:3, 1:3, 1:3] = 40
    path = save(data, tmp_path / "mystery.nii.gz")
    with pytest.raises(ValueError, match=r"mystery\.nii\.gz.*\[1, 2, 40\].*fmt="):
        load_external_mask(path)


def test_empty_mask_and_bad_format(tmp_path):
    path = save(np.zeros(SHAPE, np.uint8), tmp_path / "empty.nii.gz")
    with pytest.raises(ValueError, match=r"empty\.nii\.gz"):
        load_external_mask(path, fmt="binary")
    with pytest.raises(ValueError, match=r"empty\.nii\.gz"):
        load_external_mask(path)
    with pytest.raises(ValueError, match="fmt must be"):
        load_external_mask(save(thalamus_phantom(), tmp_path / "x.nii.gz"), fmt="itksnap")
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load_external_mask(tmp_path / "missing.nii.gz")


def test_left_right_flip_warns(tmp_path):
    flipped = np.zeros(SHAPE, dtype=np.int16)
    flipped[LEFT_BOX] = RIGHT
    flipped[RIGHT_BOX] = LEFT
    path = save(flipped, tmp_path / "flipped_aseg.nii.gz")
    with pytest.warns(UserWarning, match=r"flipped_aseg\.nii\.gz.*flipped"):
        load_external_mask(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_external_mask(save(thalamus_phantom(), tmp_path / "ok_aseg.nii.gz"))


def test_resample_to_nearest_neighbour(tmp_path):
    labels = thalamus_phantom()
    mask = nib.Nifti1Image(labels, ras_affine())
    # the same voxels indexed left-to-right flipped: an exact flip of the array
    flipped = resample_to(mask, nib.Nifti1Image(np.zeros(SHAPE, np.float32), las_affine()))
    np.testing.assert_array_equal(np.asarray(flipped.dataobj), labels[::-1])
    # a grid shifted by 3 voxels in y: shifted array, zeros outside the mask's field of view
    shifted_affine = ras_affine()
    shifted_affine[1, 3] += 3.0
    shifted = np.asarray(resample_to(mask, nib.Nifti1Image(np.zeros(SHAPE, np.float32), shifted_affine)).dataobj)
    np.testing.assert_array_equal(shifted[:, :-3], labels[:, 3:])
    assert not shifted[:, -3:].any()
    # half-size voxels: each label voxel becomes 2 x 2 x 2
    fine_shape = tuple(2 * s for s in SHAPE)
    fine_affine = np.diag([0.5, 0.5, 0.5, 1.0])
    fine_affine[:3, 3] = ras_affine()[:3, 3] - 0.25
    fine = np.asarray(resample_to(mask, nib.Nifti1Image(np.zeros(fine_shape, np.float32), fine_affine)).dataobj)
    assert counts(nib.Nifti1Image(fine, fine_affine)) == (8 * N_LEFT, 8 * N_RIGHT)
    assert fine.dtype == np.int16


def test_save_mask_round_trip(tmp_path):
    img = load_external_mask(save(aseg_phantom(), tmp_path / "aseg.nii.gz"))
    out = save_mask(img, tmp_path / "imported.nii.gz")
    back = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(img.dataobj))
    np.testing.assert_allclose(back.affine, img.affine)
    assert sorted(os.listdir(tmp_path)) == ["aseg.nii.gz", "imported.nii.gz"]
    with pytest.raises(ValueError, match=r"imported\.mgz"):
        save_mask(img, tmp_path / "imported.mgz")
    with pytest.raises(FileNotFoundError):
        save_mask(img, tmp_path / "no_such_folder" / "x.nii.gz")
