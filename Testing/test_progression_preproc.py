"""BrLP preprocessing and the MNI <-> native maps (neuroatrophy.progression_preproc).

Real data: the Colin27 head (mricron-data ``ch2.nii.gz``, a 1 mm scan in MNI space) with AAL on
its grid and the JHU white-matter atlas (FSL MNI152 grid). The full preprocessing (N4, deepbet,
registration) runs once per module; a moved copy of the head is registered once more.
"""

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from neuroatrophy.parallel import Cancelled
from neuroatrophy.progression_preproc import (
    BRLP_AFFINE,
    BRLP_SHAPE,
    MNI152_1MM_AFFINE,
    MNI152_1MM_SHAPE,
    MNI152_1P5MM_AFFINE,
    MNI152_1P5MM_SHAPE,
    PreprocessedT1,
    check_mni_space,
    mni_template,
    pad_or_crop,
    pad_or_crop_affine,
    pad_or_crop_slices,
    preprocess_t1,
    to_mni,
    to_native,
    whitestripe,
)

torch.set_num_threads(1)

MRICRON = Path("/usr/share/mricron/templates")
CH2 = MRICRON / "ch2.nii.gz"
AAL_THALAMUS = (77, 78)


def _dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _rigid(angles_deg, shift_mm):
    """A rotation about x, then z, then a shift (4x4, RAS)."""
    ax, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rz @ rx
    out[:3, 3] = shift_mm
    return out


def _on_fsl_mni_grid(data):
    """Colin27's array (RAS, origin (-90, -125, -71)) on FSL's MNI152 1 mm grid, without interpolation."""
    out = np.zeros(MNI152_1MM_SHAPE, dtype=np.float32)
    # FSL voxel i is at x = 90 - i (Colin27 voxel 180 - i); j, k are one voxel further from the origin
    out[:181, 1:, 1:] = data[::-1]
    return nib.Nifti1Image(out, MNI152_1MM_AFFINE)


@pytest.fixture(scope="module")
def ch2():
    img = nib.load(str(CH2))
    return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)


@pytest.fixture(scope="module")
def pre():
    messages = []
    result = preprocess_t1(CH2, progress=lambda fraction, message: messages.append((fraction, message)))
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    return result


@pytest.fixture(scope="module")
def native_mask(pre):
    """The brain mask on Colin27's own grid."""
    return np.asarray(to_native(pre.brain_mask, pre, "nearest").dataobj) > 0


# ------------------------------------------------------------------ grids


def test_crop_drops_the_first_and_last_voxel_as_monai_resize_with_pad_or_crop():
    assert pad_or_crop_slices(MNI152_1P5MM_SHAPE, BRLP_SHAPE) == [(0, 0, 1)] * 3
    np.testing.assert_allclose(BRLP_AFFINE[:3, 3], [88.5, -124.5, -70.5])
    np.testing.assert_allclose(BRLP_AFFINE[:3, :3], np.diag([-1.5, 1.5, 1.5]))
    # padding back restores the 1.5 mm grid, with the drop voxels filled by the minimum
    volume = np.random.default_rng(0).random(MNI152_1P5MM_SHAPE)
    cropped = pad_or_crop(volume, BRLP_SHAPE)
    np.testing.assert_array_equal(cropped, volume[1:121, 1:145, 1:121])
    back = pad_or_crop(cropped, MNI152_1P5MM_SHAPE)
    np.testing.assert_array_equal(back[1:121, 1:145, 1:121], cropped)
    assert back[0].max() == cropped.min()
    np.testing.assert_allclose(pad_or_crop_affine(BRLP_AFFINE, BRLP_SHAPE, MNI152_1P5MM_SHAPE), MNI152_1P5MM_AFFINE)
    # odd differences: MONAI pads the smaller half before, crops from n // 2 - size // 2
    assert pad_or_crop_slices((5, 10, 7), (8, 7, 7)) == [(1, 2, 0), (0, 0, 2), (0, 0, 0)]


def test_brlp_grid_matches_monai_spacing_and_crop_at_world_points():
    from monai import transforms
    from monai.data import MetaTensor

    from neuroatrophy.progression_preproc import _resample

    data = np.random.default_rng(1).random(MNI152_1MM_SHAPE).astype(np.float32)
    tensor = MetaTensor(torch.from_numpy(data)[None], affine=torch.from_numpy(MNI152_1MM_AFFINE))
    spaced = transforms.Spacing(pixdim=1.5)(tensor)
    np.testing.assert_allclose(np.asarray(spaced.affine), MNI152_1P5MM_AFFINE, atol=1e-9)
    cropped = transforms.ResizeWithPadOrCrop(spatial_size=BRLP_SHAPE, mode="minimum")(spaced)
    np.testing.assert_allclose(np.asarray(cropped.affine), BRLP_AFFINE, atol=1e-9)
    monai = cropped[0].numpy()
    ours = _resample(data, MNI152_1MM_AFFINE, BRLP_SHAPE, BRLP_AFFINE, np.eye(4), order=1)
    np.testing.assert_allclose(ours, monai, atol=1e-5)
    # one world point: the voxel holding it in the crop has the input's value interpolated there
    world = np.array([-30.0, 12.0, 21.0, 1.0])
    ijk = np.linalg.inv(BRLP_AFFINE) @ world
    assert np.allclose(ijk, np.round(ijk))
    i, j, k = np.round(ijk[:3]).astype(int)
    x, y, z = (np.linalg.inv(MNI152_1MM_AFFINE) @ world)[:3]  # (120, 138, 93): integer 1 mm voxel
    assert monai[i, j, k] == pytest.approx(data[int(x), int(y), int(z)], abs=1e-6)


# ------------------------------------------------------------------ Colin27 end to end


def test_colin27_is_preprocessed_onto_brlp_grid(pre):
    assert pre.image.shape == BRLP_SHAPE and pre.image.dtype == np.float32
    assert pre.brain_mask.shape == BRLP_SHAPE and pre.brain_mask.dtype == bool
    np.testing.assert_allclose(pre.affine, BRLP_AFFINE)
    assert pre.image.min() == 0.0 and pre.image.max() == 1.0
    assert np.all(pre.image[~pre.brain_mask] == 0.0)
    assert pre.native_shape == (181, 217, 181) and pre.source == "ch2.nii.gz"
    # brain volume in MNI mm^3: template brain 1.92 L; Colin27's deepbet mask 2.05 L (with the cerebellum
    # and some sulcal CSF); a head mask would be > 3 L
    volume_l = pre.brain_mask.sum() * 1.5**3 / 1e6
    assert 1.7 < volume_l < 2.3


def test_colin27_registration_agrees_with_the_template(pre):
    template, template_mask = mni_template()
    # measured: brain-mask Dice 0.958, intensity correlation in the template's brain 0.666
    assert _dice(pre.brain_mask, template_mask) > 0.93
    r = np.corrcoef(pre.image[template_mask], template[template_mask])[0, 1]
    assert r > 0.6
    assert check_mni_space(pre.mni_image(), name="preprocessed Colin27") > 0.85  # smoothed: 0.89
    # Colin27 is already in MNI space: the map is near the identity (volume +4.7 %, points within 2.3 mm)
    assert 0.95 < pre.volume_scale < 1.12
    brain_points = np.array([[0, 0, 0], [-40, -20, 30], [40, 30, -10], [0, -70, 10], [0, 40, 40]], float)
    moved = brain_points @ pre.native_to_mni[:3, :3].T + pre.native_to_mni[:3, 3]
    assert np.abs(moved - brain_points).max() < 4.0  # measured 2.3 mm


def test_whitestripe_puts_the_white_matter_mode_at_the_white_matter(pre):
    jhu = nib.load(str(MRICRON / "JHU-WhiteMatter-labels-1mm.nii.gz"))
    from neuroatrophy.progression_preproc import _resample

    wm = _resample(np.asarray(jhu.dataobj), jhu.affine, BRLP_SHAPE, BRLP_AFFINE, np.eye(4), order=0) > 0
    wm &= pre.brain_mask
    aal = nib.load(str(MRICRON / "aal.nii.gz"))
    cortex = (to_mni(aal, pre, "nearest") > 0) & (to_mni(aal, pre, "nearest") < 71)  # AAL cortical labels
    level = pre.whitestripe["wm_level"]
    # the stripe's mean sits at the deep white matter's median, well above the cortex
    assert np.median(pre.image[wm]) == pytest.approx(level, abs=0.05)
    assert np.median(pre.image[cortex]) < level - 0.15
    assert pre.whitestripe["lower"] < pre.whitestripe["mode"] < pre.whitestripe["upper"]


def test_whitestripe_finds_the_last_mode_of_a_tissue_mixture():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(30, 5, 15_000), rng.normal(70, 6, 40_000), rng.normal(110, 5, 45_000)])
    image = values.reshape(100, 100, 10)
    ws = whitestripe(image, np.ones(image.shape, bool))
    assert ws.mode == pytest.approx(110, abs=2.0)
    assert ws.mu == pytest.approx(110, abs=1.0)
    assert 0.5 < ws.sigma < 2.0  # +-5 % of all voxels is +-0.28 SD of the WM class
    with pytest.raises(ValueError, match="brain mask holds 0 voxels"):
        whitestripe(image, np.zeros(image.shape, bool))


def test_native_mni_round_trip_of_a_mask_overlaps_itself(ch2, pre, native_mask):
    aal = np.asarray(nib.load(str(MRICRON / "aal.nii.gz")).dataobj)
    thalamus = np.isin(aal, AAL_THALAMUS)
    in_mni = to_mni(nib.Nifti1Image(thalamus.astype(np.uint8), ch2.affine), pre, "nearest")
    assert in_mni.dtype == np.int32 and set(np.unique(in_mni)) == {0, 1}
    back = np.asarray(to_native(in_mni, pre, "nearest").dataobj) > 0
    assert _dice(back, thalamus) > 0.9  # measured 0.94
    # volumes in MNI = native x volume_scale (linear interpolation keeps partial volumes)
    soft = to_mni(nib.Nifti1Image(thalamus.astype(np.float32), ch2.affine), pre, "linear")
    assert soft.sum() * 1.5**3 == pytest.approx(thalamus.sum() * pre.volume_scale, rel=0.02)
    # the brain mask itself, MNI -> native -> MNI
    again = to_mni(nib.Nifti1Image(native_mask.astype(np.uint8), ch2.affine), pre, "nearest") > 0
    assert _dice(again, pre.brain_mask) > 0.99


def test_to_native_accepts_the_uncropped_grid_and_mni_images(pre):
    pre = dataclasses.replace(pre, native_shape=(90, 108, 90), native_affine=np.diag([2.0, 2.0, 2.0, 1.0]) @ [
        [1, 0, 0, -45], [0, 1, 0, -63], [0, 0, 1, -36], [0, 0, 0, 1]])  # a coarser native grid: faster
    volume = np.zeros(BRLP_SHAPE, np.float32)  # zero border: the two grids differ only at their edges
    volume[2:-2, 2:-2, 2:-2] = np.random.default_rng(4).random(tuple(n - 4 for n in BRLP_SHAPE))
    direct = np.asarray(to_native(volume, pre).dataobj)
    padded = pad_or_crop(volume, MNI152_1P5MM_SHAPE, value=0.0)
    np.testing.assert_allclose(np.asarray(to_native(padded, pre).dataobj), direct, atol=1e-6)
    image = nib.Nifti1Image(volume, BRLP_AFFINE)
    np.testing.assert_allclose(np.asarray(to_native(image, pre).dataobj), direct, atol=1e-6)
    assert to_native(volume, pre).shape == pre.native_shape
    with pytest.raises(ValueError, match="expected a volume of shape"):
        to_native(np.zeros((10, 10, 10)), pre)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        to_mni(nib.Nifti1Image(volume, BRLP_AFFINE), pre, interpolation="cubic")


def test_a_moved_copy_of_the_head_lands_at_the_same_mni_place(ch2, pre, native_mask):
    move = _rigid((9.0, -12.0), (14.0, -9.0, 20.0))
    moved_affine = move @ ch2.affine
    moved = nib.Nifti1Image(np.asarray(ch2.dataobj), moved_affine)
    # the voxel array is unchanged, so the brain mask is too; deepbet runs in the fixture
    again = preprocess_t1(moved, n4=False, skull_strip=nib.Nifti1Image(native_mask.astype(np.uint8), moved_affine))
    np.testing.assert_allclose(again.native_affine, moved_affine)
    # the same anatomical points map to the same MNI points (mm)
    points = np.array([[0, 0, 0], [-40, -20, 30], [40, 30, -10], [0, -70, 10], [0, 40, 40], [-25, -20, -15]], float)
    native = points @ pre.mni_to_native[:3, :3].T + pre.mni_to_native[:3, 3]
    in_moved = native @ move[:3, :3].T + move[:3, 3]
    mapped = in_moved @ again.native_to_mni[:3, :3].T + again.native_to_mni[:3, 3]
    assert np.abs(mapped - points).max() < 1.0  # measured 0.3 mm
    assert again.volume_scale == pytest.approx(pre.volume_scale, rel=0.02)
    both = pre.brain_mask & again.brain_mask
    assert _dice(pre.brain_mask, again.brain_mask) > 0.99  # measured 0.999
    assert np.corrcoef(pre.image[both], again.image[both])[0, 1] > 0.97  # measured 0.987
    # register=False refuses it: its header does not put it in MNI space
    with pytest.raises(ValueError, match="does not look like an image in MNI152 space"):
        check_mni_space(moved, name="moved head")


# ------------------------------------------------------------------ images already in MNI space


def test_register_false_reproduces_brlp_monai_transforms_on_an_mni_brain(ch2, native_mask):
    from monai import transforms
    from monai.data import MetaTensor

    brain = _on_fsl_mni_grid(np.where(native_mask, np.asarray(ch2.dataobj), 0.0))
    ours = preprocess_t1(brain, n4=False, skull_strip="none", register=False, name="colin27_brain_mni")
    np.testing.assert_allclose(ours.native_to_mni, np.eye(4))
    assert ours.source == "colin27_brain_mni"
    chain = transforms.Compose([
        transforms.Spacing(pixdim=1.5),
        transforms.ResizeWithPadOrCrop(spatial_size=BRLP_SHAPE, mode="minimum"),
        transforms.ScaleIntensity(minv=0, maxv=1),
    ])
    data = torch.from_numpy(np.asarray(brain.dataobj))[None]
    monai = chain(MetaTensor(data, affine=torch.from_numpy(MNI152_1MM_AFFINE)))[0].numpy()
    # WhiteStripe then min-max equals min-max alone (both affine in intensity): same image in the brain
    np.testing.assert_allclose(ours.image[ours.brain_mask], monai[ours.brain_mask], atol=1e-5)
    assert check_mni_space(brain) > 0.85  # measured 0.895
    # a turboprep-style output (WhiteStripe units, negative background) gives the same image
    data = np.asarray(brain.dataobj)
    normalised = nib.Nifti1Image(np.where(data > 0, (data - 120.0) / 15.0, -8.0).astype(np.float32), brain.affine)
    again = preprocess_t1(normalised, n4=False, skull_strip="none", register=False)
    np.testing.assert_array_equal(again.brain_mask, ours.brain_mask)
    np.testing.assert_allclose(again.image, ours.image, atol=1e-5)


def test_register_false_rejects_an_image_outside_mni_space(ch2):
    shifted = np.array(ch2.affine)
    shifted[:3, 3] += (0.0, 40.0, -30.0)
    with pytest.raises(ValueError, match=r"shifted_head.*MNI152 space.*register=True"):
        preprocess_t1(nib.Nifti1Image(np.asarray(ch2.dataobj), shifted), n4=False, skull_strip="none",
                      register=False, name="shifted_head")


# ------------------------------------------------------------------ files


def test_save_and_load_round_trip(pre, tmp_path):
    folder = pre.save(tmp_path / "baseline")
    (tmp_path / "baseline" / "other.txt").write_text("kept")
    loaded = PreprocessedT1.load(folder)
    np.testing.assert_array_equal(loaded.image, pre.image)
    np.testing.assert_array_equal(loaded.brain_mask, pre.brain_mask)
    np.testing.assert_allclose(loaded.native_to_mni, pre.native_to_mni)
    np.testing.assert_allclose(loaded.native_affine, pre.native_affine)
    assert loaded.native_shape == pre.native_shape and loaded.source == pre.source
    assert loaded.volume_scale == pytest.approx(pre.volume_scale)
    assert loaded.whitestripe == pytest.approx(pre.whitestripe)
    record = json.loads((folder / "preprocessing.json").read_text())
    assert record["volume_scale"] == pytest.approx(pre.volume_scale)
    mni = nib.load(str(folder / "t1_mni.nii.gz"))
    np.testing.assert_allclose(mni.affine, BRLP_AFFINE)
    # saving again over it leaves no temporary files and keeps other files
    pre.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["brain_mask_mni.nii.gz", "other.txt",
                                                         "preprocessing.json", "t1_mni.nii.gz"]
    # an image replaced behind the JSON's back is detected
    nib.Nifti1Image(np.zeros(BRLP_SHAPE, np.float32), BRLP_AFFINE).to_filename(str(folder / "t1_mni.nii.gz"))
    with pytest.raises(ValueError, match="t1_mni.nii.gz does not match"):
        PreprocessedT1.load(folder)
    with pytest.raises(FileNotFoundError, match="preprocessing.json"):
        PreprocessedT1.load(tmp_path)


def test_preprocessed_t1_checks_its_arrays():
    with pytest.raises(ValueError, match=r"scan1: image must have shape \(120, 144, 120\)"):
        PreprocessedT1(np.zeros((10, 10, 10)), np.zeros(BRLP_SHAPE, bool), np.eye(4), (5, 5, 5), np.eye(4),
                       source="scan1")
    with pytest.raises(ValueError, match="native_to_mni must be an invertible"):
        PreprocessedT1(np.zeros(BRLP_SHAPE), np.zeros(BRLP_SHAPE, bool), np.zeros((4, 4)), (5, 5, 5), np.eye(4))


def test_sitk_transform_maps_points_like_the_matrix(pre):
    transform = pre.native_to_mni_sitk()
    ras = np.array([12.0, -30.0, 25.0])
    lps = np.array(transform.TransformPoint([-ras[0], -ras[1], ras[2]]))
    expected = pre.native_to_mni[:3, :3] @ ras + pre.native_to_mni[:3, 3]
    np.testing.assert_allclose(lps * [-1, -1, 1], expected, atol=1e-9)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("shape, message", [((50, 60), "expected a 3-D image"),
                                            ((20, 20, 20, 3), "expected a 3-D image"),
                                            ((40, 1, 40), "not a 3-D volume")])
def test_images_that_are_not_3d_are_refused_by_name(tmp_path, shape, message):
    path = tmp_path / "bad_t1.nii.gz"
    nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)).to_filename(str(path))
    with pytest.raises(ValueError, match=f"bad_t1.nii.gz.*{message}"):
        preprocess_t1(path)


def test_nan_and_empty_images_are_refused_by_name(tmp_path):
    data = np.ones((20, 20, 20), np.float32)
    data[3, 4, 5] = np.nan
    path = tmp_path / "nan_t1.nii.gz"
    nib.Nifti1Image(data, np.eye(4)).to_filename(str(path))
    with pytest.raises(ValueError, match="nan_t1.nii.gz: 1 voxels are NaN"):
        preprocess_t1(path)
    path = tmp_path / "empty_t1.nii.gz"
    nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)).to_filename(str(path))
    with pytest.raises(ValueError, match="empty_t1.nii.gz: the image is empty"):
        preprocess_t1(path)
    with pytest.raises(FileNotFoundError, match="missing_t1.nii.gz"):
        preprocess_t1(tmp_path / "missing_t1.nii.gz")


def test_bad_skull_strip_options_are_refused(ch2, tmp_path):
    with pytest.raises(ValueError, match="skull_strip must be 'deepbet', 'none' or a brain-mask image"):
        preprocess_t1(ch2, n4=False, skull_strip="bet")
    mask_path = tmp_path / "mask_2mm.nii.gz"
    nib.Nifti1Image(np.ones((90, 108, 90), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0])).to_filename(str(mask_path))
    with pytest.raises(ValueError, match="mask_2mm.nii.gz .* are not on the same voxel grid"):
        preprocess_t1(ch2, n4=False, skull_strip=mask_path, name="colin27")
    empty = nib.Nifti1Image(np.zeros(ch2.shape, np.uint8), ch2.affine)
    with pytest.raises(ValueError, match="colin27: the brain mask is empty"):
        preprocess_t1(ch2, n4=False, skull_strip=empty, name="colin27")
    with pytest.raises(ValueError, match="n4 must be True, False or a dict"):
        preprocess_t1(ch2, n4="yes")


def test_progress_can_cancel_before_registration(ch2, native_mask):
    seen = []

    def progress(fraction, message):
        seen.append(message)
        if message.startswith("Registration"):
            raise Cancelled()

    with pytest.raises(Cancelled):
        preprocess_t1(ch2, n4=False, skull_strip=nib.Nifti1Image(native_mask.astype(np.uint8), ch2.affine),
                      progress=progress)
    assert seen[-1].startswith("Registration") and "Resampling to MNI152 1.5 mm" not in seen
