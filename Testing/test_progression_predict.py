"""The BrLP forecasting pipeline end to end on the CPU with a tiny configuration."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from neuroatrophy.cli import main
from neuroatrophy.progression_config import tiny_config
from neuroatrophy.progression_covariates import BRLP_MINMAX, REGIONS
from neuroatrophy.progression_nets import BrLPNetworks, save_checkpoint
from neuroatrophy.progression_predict import BrainForecaster, Subject, model_grid
from neuroatrophy.progression_preproc import BRLP_AFFINE, PreprocessedT1, mni_template

torch.set_num_threads(1)

VOLUMES = {r: 0.55 * (lo + hi) for r, (lo, hi) in BRLP_MINMAX.items()}


def _rigid(degrees, shift):
    a = np.deg2rad(degrees)
    m = np.eye(4)
    m[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    m[:3, 3] = shift
    return m


@pytest.fixture(scope="module")
def pre():
    """The MNI template as a 'preprocessed' scan whose native space is a rotated, shifted 2 mm grid."""
    image, mask = mni_template()
    native_to_mni = _rigid(8.0, (4.0, -6.0, 3.0))
    grid = np.array([[-2.0, 0, 0, 96], [0, 2.0, 0, -132], [0, 0, 2.0, -78], [0, 0, 0, 1]])
    native_affine = np.linalg.inv(native_to_mni) @ grid
    return PreprocessedT1(image=image * mask, brain_mask=mask, native_to_mni=native_to_mni,
                          native_shape=(96, 114, 96), native_affine=native_affine, source="template")


@pytest.fixture(scope="module")
def networks():
    cfg = tiny_config()
    nets = BrLPNetworks.from_config(cfg, load_weights=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights, none left at MONAI's zero initialisation
        for module in (nets.autoencoder, nets.unet, nets.controlnet):
            for p in module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return nets


def _target_volumes(n):
    norm = {r: 0.5 for r in REGIONS}
    return pd.DataFrame([norm] * n)


def test_forecast_shapes_affines_and_masking(pre, networks):
    subject = Subject(age=70, sex="F", diagnosis="MCI", volumes=VOLUMES)
    result = BrainForecaster(networks, m=3, ddim_steps=4).predict(pre, subject, [75, 71], _target_volumes(2))
    grid = networks.config.image_shape
    assert result.images.shape == result.uncertainty.shape == (2,) + grid
    np.testing.assert_array_equal(result.target_ages, [71, 75])  # sorted
    # the coarse grid covers the same field of view: its centre is the fine grid's centre
    centre = lambda affine, shape: affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]  # noqa: E731
    np.testing.assert_allclose(centre(result.affine, grid), centre(BRLP_AFFINE, (120, 144, 120)), atol=1e-6)
    assert np.all(result.images[:, ~result.brain_mask] == 0)
    assert np.all(result.uncertainty >= 0) and result.uncertainty[:, result.brain_mask].mean() > 0
    assert np.all(result.global_uncertainty > 0)
    assert result.volumes.columns.tolist() == ["target_age", *REGIONS, "source"]
    np.testing.assert_allclose(result.volumes["hippocampus"], np.mean(BRLP_MINMAX["hippocampus"]))


def test_every_ddim_step_is_reported_in_order(pre, networks):
    subject = Subject(age=70, sex="F", diagnosis="CN", volumes=VOLUMES)
    calls = []
    BrainForecaster(networks, m=2, ddim_steps=4).predict(pre, subject, [72], _target_volumes(1),
                                                         progress=lambda f, msg: calls.append((f, msg)))
    steps = [msg for _, msg in calls if "DDIM step" in msg]
    assert [s.split("DDIM step ")[1][:3] for s in steps] == ["1/4", "2/4", "3/4", "4/4"]
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_one_sample_has_zero_uncertainty(pre, networks):
    subject = Subject(age=70, sex="M", diagnosis="CN", volumes=VOLUMES)
    result = BrainForecaster(networks, m=1, ddim_steps=3).predict(pre, subject, [72], _target_volumes(1))
    assert np.all(result.uncertainty == 0) and result.global_uncertainty[0] == 0


def test_seed_reproduces_and_ages_share_their_noise(pre, networks):
    subject = Subject(age=70, sex="M", diagnosis="CN", volumes=VOLUMES)
    fc = BrainForecaster(networks, m=2, ddim_steps=3, seed=7)
    a = fc.predict(pre, subject, [72, 80], _target_volumes(2))
    b = fc.predict(pre, subject, [72], _target_volumes(1))
    np.testing.assert_allclose(a.images[0], b.images[0], atol=1e-5)  # same chain noise at every age


def test_saved_forecast_maps_back_to_the_scan(pre, networks, tmp_path):
    subject = Subject(age=70, sex="F", diagnosis="AD", volumes=VOLUMES)
    result = BrainForecaster(networks, m=2, ddim_steps=3).predict(pre, subject, [71, 73, 76], _target_volumes(3))
    out = result.save(tmp_path / "forecast")
    record = json.loads((out / "forecast.json").read_text())
    assert record["target_ages"] == [71.0, 73.0, 76.0]
    for kind in ("predicted", "uncertainty", "difference", "native"):
        assert sorted(record["files"][kind]) == ["71.0", "73.0", "76.0"]
    native = nib.load(out / record["files"]["native"]["73.0"])
    assert native.shape == pre.native_shape
    np.testing.assert_allclose(native.affine, pre.native_affine, atol=1e-6)
    # The brain mask carried to the scan and back lands on itself.
    from neuroatrophy.progression_preproc import to_mni, to_native

    there = to_native(nib.Nifti1Image(result.brain_mask.astype(np.float32), result.affine), pre)
    back = to_mni(nib.Nifti1Image((np.asarray(there.dataobj) > 0.5).astype(np.float32), pre.native_affine), pre)
    fine_mask = model_grid(pre, pre.image.shape)[1]
    dice = 2 * np.sum((back > 0.5) & fine_mask) / (np.sum(back > 0.5) + fine_mask.sum())
    assert dice > 0.9
    table = pd.read_csv(out / "volumes.csv")
    assert table["target_age"].tolist() == [71.0, 73.0, 76.0]
    assert (out / "volumes.png").stat().st_size > 1000


def test_forecast_loads_as_a_slicer_sequence(pre, networks, tmp_path):
    import slicer

    from neuroatrophy.progression_scene import load_forecast

    subject = Subject(age=70, sex="F", diagnosis="CN", volumes=VOLUMES)
    result = BrainForecaster(networks, m=2, ddim_steps=2).predict(pre, subject, [72, 74, 78], _target_volumes(3))
    result.save(tmp_path / "f", plot=False)
    scene = slicer.vtkMRMLScene()
    nodes = load_forecast(scene, tmp_path / "f")
    sequence = nodes["predicted_sequence"]
    assert sequence.GetNumberOfDataNodes() == 3
    assert [float(sequence.GetNthIndexValue(i)) for i in range(3)] == [72.0, 74.0, 78.0]


def test_target_age_before_baseline_is_refused(pre, networks):
    subject = Subject(age=70, sex="F", diagnosis="CN", volumes=VOLUMES)
    with pytest.raises(ValueError, match="before the baseline age 70"):
        BrainForecaster(networks).predict(pre, subject, [69], _target_volumes(1))
    with pytest.raises(ValueError, match="sex must be"):
        Subject(age=70, sex="2", diagnosis="CN", volumes=VOLUMES)
    with pytest.raises(ValueError, match="no disease-course model"):
        BrainForecaster(networks).predict(pre, subject, [72])


def test_volumes_come_from_the_regression_fallback_for_one_visit(pre, networks):
    from neuroatrophy.progression_dcm import RegressionCourse

    rng = np.random.default_rng(0)
    rows = []
    for s in range(30):
        age0 = rng.uniform(60, 80)
        base = {r: rng.uniform(0.4, 0.6) for r in REGIONS}
        for t in range(3):
            rows.append({"subject_id": f"s{s}", "age": age0 + 2 * t, "diagnosis": "MCI",
                         **{r: base[r] + (0.02 if r == "lateral_ventricle" else -0.01) * 2 * t for r in REGIONS}})
    regression = RegressionCourse().fit(pd.DataFrame(rows))
    subject = Subject(age=70, sex="F", diagnosis="MCI", volumes=VOLUMES)
    result = BrainForecaster(networks, regression=regression, m=1, ddim_steps=2).predict(pre, subject, [70, 80])
    assert set(result.volumes["source"]) == {"regression"}
    ventricles = result.volumes["lateral_ventricle"].to_numpy()
    span = BRLP_MINMAX["lateral_ventricle"][1] - BRLP_MINMAX["lateral_ventricle"][0]
    np.testing.assert_allclose((ventricles[1] - ventricles[0]) / span, 0.2, atol=0.02)  # 0.02/yr x 10 years


# --- the command line ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights_folder(networks, tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    cfg = tiny_config()
    for name in ("autoencoder", "unet", "controlnet"):
        save_checkpoint(getattr(networks, name), folder / f"{name}.safetensors")
        cfg.weights[name] = str(folder / f"{name}.safetensors")
    cfg.save(folder / "brainprogression.json")
    return folder


def test_cli_predicts_from_a_preprocessed_folder(pre, weights_folder, tmp_path, capsys):
    pre.save(tmp_path / "pre")
    (tmp_path / "vol.json").write_text(json.dumps(VOLUMES))
    rc = main(["progression", "predict", "--preprocessed", str(tmp_path / "pre"), "--age", "70", "--sex", "F",
               "--diagnosis", "MCI", "--target-ages", "72", "75", "--volumes", str(tmp_path / "vol.json"),
               "--weights", str(weights_folder), "--m", "2", "--steps", "2", "--out", str(tmp_path / "out"),
               "--progress", "json"])
    assert rc == 0, capsys.readouterr()
    record = json.loads((tmp_path / "out" / "forecast.json").read_text())
    assert record["target_ages"] == [72.0, 75.0] and record["m"] == 2 and record["ddim_steps"] == 2
    assert len(record["global_uncertainty"]) == 2
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    fractions = [e["progress"] for e in events if "progress" in e]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # (the CLI throttles messages to 10/s)


def test_cli_explains_missing_weights(tmp_path, capsys):
    rc = main(["progression", "predict", "--t1", "x.nii.gz", "--age", "70", "--sex", "F", "--diagnosis", "CN",
               "--target-ages", "72", "--weights", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "LemuelPuglisi/BrLP" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_model_grid_is_identity_on_the_full_grid(pre):
    image, mask, affine = model_grid(pre, (120, 144, 120))
    assert image is pre.image or np.array_equal(image, pre.image)
    np.testing.assert_array_equal(affine, pre.affine)
    coarse = model_grid(pre, (24, 32, 24))[0]
    # a block average of the fine grid and the coarse resampling agree roughly (same field of view)
    smooth = ndimage.zoom(pre.image, (24 / 120, 32 / 144, 24 / 120), order=1)
    assert np.corrcoef(coarse.ravel(), smooth.ravel())[0, 1] > 0.9
