"""Reading and checking images for thalamus segmentation: every bad input gets an error naming it."""

import nibabel as nib
import numpy as np
import pytest

from neuroatrophy.thalamus_image import (
    check_same_grid,
    input_name,
    load_image,
    load_label_image,
    same_grid,
    voxel_sizes,
)


def _volume(shape=(6, 7, 8), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32) + 0.1


def _save(tmp_path, name, data, affine=None):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def test_load_image_returns_float32_copy_of_data_and_affine(tmp_path):
    data = (_volume() * 100).astype(np.int16)
    affine = np.diag([0.8, 1.2, 2.0, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 3.0)
    img = load_image(_save(tmp_path, "scan.nii.gz", data, affine))
    assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(img.dataobj), data.astype(np.float32))
    np.testing.assert_allclose(img.affine, affine)
    np.testing.assert_allclose(voxel_sizes(img), [0.8, 1.2, 2.0])


def test_load_image_squeezes_a_single_volume_4d_image():
    data = _volume()
    img = load_image(nib.Nifti1Image(data[..., None], np.eye(4)))
    assert img.shape == data.shape


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "absent_T1w.nii.gz"
    with pytest.raises(FileNotFoundError, match="absent_T1w.nii.gz"):
        load_image(path)
    with pytest.raises(FileNotFoundError, match="absent_T1w.nii.gz"):
        load_label_image(path)


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="garbage.nii.gz"):
        load_image(path)


@pytest.mark.parametrize(
    "data, message",
    [
        (np.zeros((6, 7, 8), np.float32), "empty"),
        (np.full((6, 7, 8), 3.5, np.float32), "constant"),
        (np.random.default_rng(1).random((6, 7)).astype(np.float32), "3-D"),
        (np.random.default_rng(2).random((6, 7, 1)).astype(np.float32), "2-D"),
        (np.random.default_rng(3).random((6, 7, 8, 2)).astype(np.float32), "3-D"),
    ],
    ids=["empty", "constant", "2d", "single-slice", "4d"],
)
def test_bad_intensity_images_raise_naming_the_file(tmp_path, data, message):
    path = _save(tmp_path, "bad_scan.nii.gz", data)
    with pytest.raises(ValueError, match=message) as info:
        load_image(path)
    assert "bad_scan.nii.gz" in str(info.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_counted_and_named(tmp_path, bad):
    data = _volume()
    data[1, 2, 3] = bad
    data[4, 4, 4] = bad
    path = _save(tmp_path, "flair.nii.gz", data)
    with pytest.raises(ValueError, match=r"flair.nii.gz: 2 voxels are NaN or infinite"):
        load_image(path)


def test_in_memory_image_is_named_by_the_given_name():
    data = np.zeros((5, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"^FLAIR \(session 2\): the image is empty"):
        load_image(nib.Nifti1Image(data, np.eye(4)), name="FLAIR (session 2)")


def test_constant_image_is_accepted_when_allowed():
    data = np.full((4, 4, 4), 2.0, np.float32)
    img = load_image(nib.Nifti1Image(data, np.eye(4)), allow_constant=True)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # nibabel and numpy on a singular matrix
def test_singular_affine_is_named():
    affine = np.eye(4)
    affine[2, 2] = 0.0
    # NIfTI refuses such an affine; an in-memory Analyze image keeps it
    with pytest.raises(ValueError, match="scan_x: the image's affine .* is missing or singular"):
        load_image(nib.AnalyzeImage(_volume(), affine), name="scan_x")


def test_non_image_object_is_refused_with_its_type():
    with pytest.raises(ValueError, match="my_input: expected a file path or a nibabel image, got ndarray"):
        load_image(np.ones((3, 3, 3)), name="my_input")


def test_label_image_accepts_integer_valued_floats_and_booleans(tmp_path):
    labels = np.zeros((6, 6, 6), np.float32)
    labels[1:3, 1:3, 1:3] = 10
    labels[4:6, 4:6, 4:6] = 49
    img = load_label_image(_save(tmp_path, "labels.nii.gz", labels))
    assert np.asarray(img.dataobj).dtype == np.int32
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels.astype(np.int32))
    mask = load_label_image(nib.Nifti1Image((labels > 0).astype(np.uint8), np.eye(4)))
    assert set(np.unique(np.asarray(mask.dataobj))) == {0, 1}


def test_label_image_with_non_integer_values_is_named(tmp_path):
    labels = np.zeros((6, 6, 6), np.float32)
    labels[2, 2, 2] = 10.4
    path = _save(tmp_path, "probability_map.nii.gz", labels)
    with pytest.raises(ValueError, match="probability_map.nii.gz: label map holds non-integer values"):
        load_label_image(path)


def test_label_image_with_nan_is_named(tmp_path):
    labels = np.zeros((6, 6, 6), np.float32)
    labels[0, 0, 0] = np.nan
    path = _save(tmp_path, "aseg_nan.nii.gz", labels)
    with pytest.raises(ValueError, match="aseg_nan.nii.gz: label map holds NaN"):
        load_label_image(path)


def test_label_image_2d_is_named(tmp_path):
    path = _save(tmp_path, "slice_labels.nii.gz", np.zeros((6, 6), np.int16))
    with pytest.raises(ValueError, match="slice_labels.nii.gz: expected a 3-D image"):
        load_label_image(path)


def test_input_name_uses_path_or_file_name_or_default(tmp_path):
    path = _save(tmp_path, "named.nii.gz", _volume())
    assert input_name(str(path)) == str(path)
    assert input_name(nib.load(str(path))) == str(path)
    assert input_name(nib.Nifti1Image(_volume(), np.eye(4)), "T1w") == "T1w"


def test_same_grid_and_check_same_grid():
    a = nib.Nifti1Image(_volume((6, 7, 8)), np.eye(4))
    b = nib.Nifti1Image(_volume((6, 7, 8), seed=1), np.eye(4))
    assert same_grid(a, b)
    check_same_grid(a, b, "first", "second")  # no error

    c = nib.Nifti1Image(_volume((6, 7, 9)), np.eye(4))
    assert not same_grid(a, c)
    with pytest.raises(ValueError, match=r"our mask \(shape \(6, 7, 8\)\) and manual mask \(shape \(6, 7, 9\)\) "
                                         "are not on the same voxel grid"):
        check_same_grid(a, c, "our mask", "manual mask")

    shifted = np.eye(4)
    shifted[0, 3] = 1.5
    d = nib.Nifti1Image(_volume(), shifted)
    assert not same_grid(a, d)
    with pytest.raises(ValueError, match=r"our mask and FIRST mask have the same shape but different voxel-to-world "
                                         r"affines \(max difference 1.5\)"):
        check_same_grid(a, d, "our mask", "FIRST mask")

    # differences below the tolerance are the same grid
    nearly = np.eye(4)
    nearly[1, 3] = 1e-4
    assert same_grid(a, nib.Nifti1Image(_volume(), nearly))
