"""``neuroatrophy thalamus ...`` on real files: evaluate, import, change, associate, segment, cohort, train."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from neuroatrophy.cli import main
from neuroatrophy.thalamus_eval import annualized_change, clinical_association
from neuroatrophy.thalamus_labels import LEFT, RIGHT
from neuroatrophy.thalamus_net import DEFAULT_ARCHITECTURE, ThalamusModel, build_network, load_model
from neuroatrophy.thalamus_synth import THALAMUS_BOX

torch.set_num_threads(1)

MRICRON = Path("/usr/share/mricron/templates")
SMALL_ARCHITECTURE = {**DEFAULT_ARCHITECTURE, "channels": [4, 8, 16], "strides": [2, 2]}


def _dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _run(capsys, *argv):
    code = main(["thalamus", *[str(a) for a in argv]])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------ small label maps


def _affine():
    """RAS 1 mm grid of 20 voxels centred on x = 0: voxels i < 10 lie at negative x (subject's left)."""
    affine = np.eye(4)
    affine[:3, 3] = (-9.5, -10.0, -10.0)
    return affine


def _reference_labels():
    labels = np.zeros((20, 20, 20), np.int16)
    labels[3:8, 5:15, 5:15] = LEFT     # 5 x 10 x 10 = 500 voxels
    labels[12:17, 5:15, 5:15] = RIGHT  # 500 voxels
    return labels


def test_evaluate_writes_metrics_with_the_right_dice(tmp_path, capsys):
    reference = _reference_labels()
    shifted = np.zeros_like(reference)            # left shifted by 1 voxel in y: overlap 5 x 9 x 10 = 450
    shifted[3:8, 6:16, 5:15] = LEFT
    shifted[12:17, 5:15, 5:15] = RIGHT
    aseg = reference.astype(np.int32).copy()       # FreeSurfer-style: other structures around, right thalamus
    aseg[12:17, 5:15, 5:10] = 50                   # half replaced by the caudate (250 of 500 voxels)
    aseg[0:2] = 2
    aseg[18:20] = 41
    aseg[9, 0:3, 0:3] = 11
    nib.save(nib.Nifti1Image(reference, _affine()), str(tmp_path / "manual.nii.gz"))
    nib.save(nib.Nifti1Image(shifted, _affine()), str(tmp_path / "ours.nii.gz"))
    nib.save(nib.MGHImage(aseg, _affine()), str(tmp_path / "aseg.mgz"))

    code, out, err = _run(capsys, "evaluate", "--reference", tmp_path / "manual.nii.gz",
                          "--mask", f"Ours={tmp_path / 'ours.nii.gz'}",
                          "--mask", f"FreeSurfer={tmp_path / 'aseg.mgz'}:freesurfer",
                          "--subject", "sub-01", "--out", tmp_path / "eval")
    assert code == 0, err
    metrics = pd.read_csv(tmp_path / "eval" / "metrics.csv").set_index(["method", "structure"])
    assert set(metrics["subject"]) == {"sub-01"}
    assert metrics.loc[("Ours", "left"), "dice"] == pytest.approx(2 * 450 / 1000)
    assert metrics.loc[("Ours", "right"), "dice"] == pytest.approx(1.0)
    assert metrics.loc[("Ours", "both"), "dice"] == pytest.approx(2 * 950 / 2000)
    assert metrics.loc[("FreeSurfer", "left"), "dice"] == pytest.approx(1.0)
    assert metrics.loc[("FreeSurfer", "right"), "dice"] == pytest.approx(2 * 250 / 750)
    assert metrics.loc[("FreeSurfer", "right"), "volume_pred_mm3"] == pytest.approx(250.0)
    assert "Ours: Dice 0.950" in out


def test_evaluate_names_a_mask_on_another_grid(tmp_path, capsys):
    nib.save(nib.Nifti1Image(_reference_labels(), _affine()), str(tmp_path / "manual.nii.gz"))
    other = _affine()
    other[0, 3] += 2.0
    nib.save(nib.Nifti1Image(_reference_labels(), other), str(tmp_path / "moved.nii.gz"))
    code, _, err = _run(capsys, "evaluate", "--reference", tmp_path / "manual.nii.gz",
                        "--mask", f"Moved={tmp_path / 'moved.nii.gz'}", "--out", tmp_path / "eval")
    assert code == 2
    assert "method 'Moved' and reference mask" in err and "different voxel-to-world affines" in err
    assert not (tmp_path / "eval" / "metrics.csv").exists()


def test_evaluate_refuses_a_mask_argument_without_a_name(tmp_path, capsys):
    nib.save(nib.Nifti1Image(_reference_labels(), _affine()), str(tmp_path / "manual.nii.gz"))
    code, _, err = _run(capsys, "evaluate", "--reference", tmp_path / "manual.nii.gz",
                        "--mask", tmp_path / "manual.nii.gz", "--out", tmp_path / "eval")
    assert code == 2 and "--mask expects NAME=PATH" in err


def test_import_converts_a_freesurfer_aseg_to_10_49(tmp_path, capsys):
    aseg = np.zeros((20, 20, 20), np.int32)
    aseg[1:9, 2:18, 2:18] = 2       # white matter, left
    aseg[11:19, 2:18, 2:18] = 41    # white matter, right
    aseg[3:8, 5:15, 5:15] = LEFT
    aseg[12:17, 5:15, 5:15] = RIGHT
    aseg[4, 16, 16] = 11            # caudate
    aseg[15, 16, 16] = 50
    affine = _affine() @ np.diag([1.0, 1.2, 0.9, 1.0])
    nib.save(nib.MGHImage(aseg, affine), str(tmp_path / "aseg.mgz"))
    code, out, err = _run(capsys, "import", "--input", tmp_path / "aseg.mgz", "--out", tmp_path / "thalamus.nii.gz")
    assert code == 0, err
    img = nib.load(str(tmp_path / "thalamus.nii.gz"))
    data = np.asarray(img.dataobj)
    np.testing.assert_array_equal(data, np.where(np.isin(aseg, (LEFT, RIGHT)), aseg, 0))
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert "left 540 mm³, right 540 mm³" in out  # 500 voxels of 1.08 mm³


def test_import_names_a_file_without_thalamus(tmp_path, capsys):
    aseg = np.zeros((10, 10, 10), np.int32)
    aseg[2:5] = 2
    aseg[6:8] = 41
    nib.save(nib.MGHImage(aseg, np.eye(4)), str(tmp_path / "no_thalamus_aseg.mgz"))
    code, _, err = _run(capsys, "import", "--input", tmp_path / "no_thalamus_aseg.mgz", "--format", "freesurfer",
                        "--out", tmp_path / "out.nii.gz")
    assert code == 2 and "no_thalamus_aseg.mgz" in err and "no FreeSurfer thalamus label" in err


# ------------------------------------------------------------------ tables


def test_change_of_a_volume_table(tmp_path, capsys):
    """The documented table (subject, time, volume[, method]), e.g. a cohort's volumes.csv."""
    table = pd.DataFrame({
        "subject": ["s1", "s1", "s2", "s2", "s2", "s1", "s1", "s2", "s2", "s2"],
        "method": ["A"] * 5 + ["B"] * 5,
        "time": [0.0, 2.0, 0.0, 1.0, 2.0, 0.0, 2.0, 0.0, 1.0, 2.0],
        "volume": [10000.0, 9800.0, 12000.0, 11880.0, 11760.0, 10000.0, 10000.0, 9000.0, 9000.0, 9090.0],
    })
    table.to_csv(tmp_path / "volumes.csv", index=False)
    code, _, err = _run(capsys, "change", "--table", tmp_path / "volumes.csv", "--method-column", "method",
                          "--out", tmp_path / "change.csv")
    assert code == 0, err
    change = pd.read_csv(tmp_path / "change.csv").set_index(["subject", "method"])
    assert change.loc[("s1", "A"), "pct_per_year"] == pytest.approx(-1.0)
    assert change.loc[("s2", "A"), "pct_per_year"] == pytest.approx(-1.0)
    assert change.loc[("s1", "B"), "pct_per_year"] == pytest.approx(0.0)
    assert change.loc[("s2", "B"), "n_timepoints"] == 3
    expected = annualized_change(table, method="method").set_index(["subject", "method"])
    pd.testing.assert_frame_equal(change.sort_index(), expected.sort_index(), check_dtype=False)


def test_change_names_a_missing_column(tmp_path, capsys):
    pd.DataFrame({"subject": ["s1", "s1"], "time": [0, 1], "vol": [1.0, 2.0]}).to_csv(tmp_path / "t.csv", index=False)
    code, _, err = _run(capsys, "change", "--table", tmp_path / "t.csv", "--out", tmp_path / "change.csv")
    assert code == 2 and "'volume'" in err
    assert not (tmp_path / "change.csv").exists()


def _clinical_table(n=40, seed=0):
    rng = np.random.default_rng(seed)
    edss = rng.uniform(0, 7, n)
    age = rng.uniform(25, 60, n)
    return pd.DataFrame({
        "subject": [f"s{i:02d}" for i in range(n)],
        "edss": edss,
        "age": age,
        "sex": rng.choice(["F", "M"], n),
        "vol_ours": 16000 - 400 * edss - 20 * age + rng.normal(0, 300, n),
        "vol_freesurfer": 17000 - 150 * edss + rng.normal(0, 600, n),
    })


def test_associate_volumes_with_a_clinical_score(tmp_path, capsys):
    table = _clinical_table()
    table.to_csv(tmp_path / "clinical.csv", index=False)
    code, out, err = _run(capsys, "associate", "--table", tmp_path / "clinical.csv", "--score", "edss",
                          "--volumes", "vol_ours,vol_freesurfer", "--covariates", "age,sex",
                          "--out", tmp_path / "association.csv")
    assert code == 0, err
    result = pd.read_csv(tmp_path / "association.csv")
    assert list(result["column"]) == ["vol_ours", "vol_freesurfer"]
    expected = clinical_association(table, "edss", ["vol_ours", "vol_freesurfer"], covariates=["age", "sex"])
    np.testing.assert_allclose(result["beta_std"], expected["beta_std"], rtol=1e-9)
    np.testing.assert_allclose(result["p_value"], expected["p_value"], rtol=1e-6)
    assert (result["n"] == 40).all()
    assert result.loc[0, "beta_std"] < -0.5 and result.loc[0, "p_value"] < 1e-6  # strong atrophy with EDSS
    assert "vol_ours: standardised beta" in out


def test_associate_names_a_missing_covariate(tmp_path, capsys):
    _clinical_table().to_csv(tmp_path / "clinical.csv", index=False)
    code, _, err = _run(capsys, "associate", "--table", tmp_path / "clinical.csv", "--score", "edss",
                        "--volumes", "vol_ours", "--out", tmp_path / "association.csv")  # default covariates
    assert code == 2 and "'icv'" in err


# ------------------------------------------------------------------ segmentation


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = ThalamusModel(network=build_network(SMALL_ARCHITECTURE), architecture=SMALL_ARCHITECTURE,
                          box=THALAMUS_BOX)
    return model.save(tmp_path_factory.mktemp("model") / "random_unet")


def _half_resolution(img):
    """2 mm copy of a 1 mm image (means of 2x2x2 blocks) and the matching affine."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    n = (np.asarray(data.shape) // 2) * 2
    blocks = data[:n[0], :n[1], :n[2]].reshape(n[0] // 2, 2, n[1] // 2, 2, n[2] // 2, 2).mean(axis=(1, 3, 5))
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])
    coarse[:3, 3] = 0.5
    return blocks, img.affine @ coarse


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """Colin27 at 1 mm and 2 mm with AAL-derived reference masks and FreeSurfer-style masks on each grid."""
    folder = tmp_path_factory.mktemp("heads")
    ch2 = nib.load(str(MRICRON / "ch2.nii.gz"))
    aal = np.asarray(nib.load(str(MRICRON / "aal.nii.gz")).dataobj)
    reference_1mm = np.select([aal == 77, aal == 78], [LEFT, RIGHT], 0).astype(np.int16)
    data_2mm, affine_2mm = _half_resolution(ch2)
    reference_2mm = reference_1mm[:-1:2, :-1:2, :-1:2]  # the 1 mm voxel in each block's corner
    out = {}
    for name, image, affine, reference in (("sub-01", data_2mm, affine_2mm, reference_2mm),
                                           ("sub-02", np.asarray(ch2.dataobj), ch2.affine, reference_1mm)):
        (folder / name).mkdir()
        nib.save(nib.Nifti1Image(image, affine), str(folder / name / "t1w.nii.gz"))
        nib.save(nib.Nifti1Image(reference, affine), str(folder / name / "manual.nii.gz"))
        # FreeSurfer-like: the left thalamus one voxel larger all round, white matter label elsewhere
        aseg = np.where(reference == RIGHT, RIGHT, 0).astype(np.int32)
        aseg[ndimage.binary_dilation(reference == LEFT) & (reference != RIGHT)] = LEFT
        aseg[(aseg == 0) & (image > np.percentile(image, 90))] = 2
        nib.save(nib.MGHImage(aseg, affine), str(folder / name / "aseg.mgz"))
        out[name] = {"reference": reference, "aseg": aseg, "voxel_mm3": abs(np.linalg.det(affine[:3, :3])),
                     "shape": image.shape, "affine": affine}
    return folder, out


def test_segment_writes_the_result_folder_on_the_input_grid(model_file, heads, tmp_path, capsys):
    folder, info = heads
    scan = folder / "sub-01" / "t1w.nii.gz"
    code, out, err = _run(capsys, "segment", "--image", f"T1w={scan}", "--model", model_file,
                          "--out", tmp_path / "seg")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == [
        "settings.json", "thalamus_labels.nii.gz", "thalamus_probability.nii.gz", "volumes.csv"]
    labels = nib.load(str(tmp_path / "seg" / "thalamus_labels.nii.gz"))
    assert labels.shape == info["sub-01"]["shape"]
    np.testing.assert_allclose(labels.affine, info["sub-01"]["affine"], atol=1e-5)
    data = np.asarray(labels.dataobj)
    assert set(np.unique(data).tolist()) <= {0, LEFT, RIGHT}
    volumes = pd.read_csv(tmp_path / "seg" / "volumes.csv").set_index("structure")["volume_mm3"]
    assert volumes["left"] == pytest.approx(np.count_nonzero(data == LEFT) * 8.0)
    assert volumes["both"] == pytest.approx(volumes["left"] + volumes["right"])
    settings = json.loads((tmp_path / "seg" / "settings.json").read_text())
    assert settings["models"] == [str(model_file)]
    assert settings["inputs"] == {"T1w": str(scan)}
    assert "thalamus volume: left" in out


def test_segment_names_a_missing_scan_and_a_bad_image_argument(model_file, tmp_path, capsys):
    missing = tmp_path / "absent_flair.nii.gz"
    code, _, err = _run(capsys, "segment", "--image", f"FLAIR={missing}", "--model", model_file,
                        "--out", tmp_path / "seg")
    assert code == 2 and "absent_flair.nii.gz" in err and "FLAIR" in err
    code, _, err = _run(capsys, "segment", "--image", missing, "--model", model_file, "--out", tmp_path / "seg")
    assert code == 2 and "--image expects NAME=PATH" in err
    code, _, err = _run(capsys, "segment", "--image", f"T1w={missing}", "--model", tmp_path / "no_model.safetensors",
                        "--out", tmp_path / "seg")
    assert code == 2 and "no_model.safetensors" in err
    assert not (tmp_path / "seg").exists()


def _write_table(folder, rows, name="cohort.csv"):
    pd.DataFrame(rows).to_csv(folder / name, index=False)
    return folder / name


def test_cohort_segments_and_evaluates_every_subject(model_file, heads, tmp_path, capsys):
    folder, info = heads
    table = _write_table(folder, [
        {"subject": s, "t1w": f"{s}/t1w.nii.gz", "reference": f"{s}/manual.nii.gz", "mask:FreeSurfer": f"{s}/aseg.mgz"}
        for s in ("sub-01", "sub-02")])  # paths relative to the table's folder
    out = tmp_path / "cohort"
    code, stdout, err = _run(capsys, "cohort", "--table", table, "--model", model_file, "--out", out)
    assert code == 0, err
    assert "2 session(s) of 2 subject(s)" in stdout
    for name in ("volumes.csv", "metrics.csv", "agreement.csv", "metrics.png", "sub-01", "sub-02"):
        assert (out / name).exists(), name
    for subject in ("sub-01", "sub-02"):
        labels = nib.load(str(out / subject / "thalamus_labels.nii.gz"))
        assert labels.shape == info[subject]["shape"]

    volumes = pd.read_csv(out / "volumes.csv").set_index(["subject", "method"])
    assert sorted(volumes.index) == [("sub-01", "FreeSurfer"), ("sub-01", "ThalamusSeg"),
                                     ("sub-02", "FreeSurfer"), ("sub-02", "ThalamusSeg")]
    metrics = pd.read_csv(out / "metrics.csv").set_index(["subject", "method", "structure"])
    assert len(metrics) == 2 * 2 * 3
    for subject in ("sub-01", "sub-02"):
        reference, aseg, voxel = info[subject]["reference"], info[subject]["aseg"], info[subject]["voxel_mm3"]
        assert volumes.loc[(subject, "FreeSurfer"), "left"] == pytest.approx(np.count_nonzero(aseg == LEFT) * voxel)
        assert volumes.loc[(subject, "FreeSurfer"), "right"] == pytest.approx(np.count_nonzero(reference == RIGHT)
                                                                            * voxel)
        ours = pd.read_csv(out / subject / "volumes.csv").set_index("structure")["volume_mm3"]
        assert volumes.loc[(subject, "ThalamusSeg"), "both"] == pytest.approx(ours["both"])
        expected = _dice(aseg == LEFT, reference == LEFT)
        assert metrics.loc[(subject, "FreeSurfer", "left"), "dice"] == pytest.approx(expected)
        assert metrics.loc[(subject, "FreeSurfer", "right"), "dice"] == pytest.approx(1.0)
        assert metrics.loc[(subject, "FreeSurfer", "left"), "volume_ref_mm3"] == pytest.approx(
            np.count_nonzero(reference == LEFT) * voxel)
        assert 0.0 <= metrics.loc[(subject, "ThalamusSeg", "both"), "dice"] <= 1.0

    agreement = pd.read_csv(out / "agreement.csv").set_index(["method", "structure"])
    assert len(agreement) == 6 and (agreement["n"] == 2).all()
    left_dice = [metrics.loc[(s, "FreeSurfer", "left"), "dice"] for s in ("sub-01", "sub-02")]
    assert agreement.loc[("FreeSurfer", "left"), "dice_mean"] == pytest.approx(np.mean(left_dice))
    assert agreement.loc[("FreeSurfer", "right"), "bias"] == pytest.approx(0.0, abs=1e-6)


def test_cohort_names_a_missing_subject_column_and_a_missing_file(model_file, heads, tmp_path, capsys):
    folder, _ = heads
    bad = _write_table(tmp_path, [{"participant": "sub-01", "t1w": str(folder / "sub-01" / "t1w.nii.gz")}],
                       name="no_subject.csv")
    code, _, err = _run(capsys, "cohort", "--table", bad, "--model", model_file, "--out", tmp_path / "out")
    assert code == 2 and "no_subject.csv" in err and "'subject'" in err

    shutil.copy(folder / "sub-01" / "t1w.nii.gz", tmp_path / "t1w.nii.gz")
    missing = _write_table(tmp_path, [
        {"subject": "sub-01", "t1w": "t1w.nii.gz", "reference": ""},
        {"subject": "sub-02", "t1w": "t1w.nii.gz", "reference": "sub-02_manual.nii.gz"}], name="missing.csv")
    code, _, err = _run(capsys, "cohort", "--table", missing, "--model", model_file, "--out", tmp_path / "out")
    assert code == 2
    assert "'sub-02'" in err and "'reference'" in err and "sub-02_manual.nii.gz" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ training


def test_train_from_a_json_configuration(tmp_path, capsys):
    config = {"iterations": 50, "validation_every": 1, "validation_cases": 1, "num_workers": 0, "threads": 1,
              "batch_size": 1, "train_shape": [32, 32, 32], "architecture": SMALL_ARCHITECTURE}
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, err = _run(capsys, "train", "--config", tmp_path / "config.json", "--iterations", 2,
                          "--out", tmp_path / "model")
    assert code == 0, err
    model = load_model(tmp_path / "model")
    assert [h["iteration"] for h in model.training["history"]] == [1, 2]
    assert model.training["config"]["iterations"] == 2
    assert model.architecture == SMALL_ARCHITECTURE
    assert "iteration 2" in out
