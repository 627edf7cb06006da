"""Tests of neuroatrophy.progression_train: BrLP's trainers on tiny configurations on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from neuroatrophy import progression_train as pt
from neuroatrophy.parallel import Cancelled
from neuroatrophy.progression_config import load_config, tiny_config
from neuroatrophy.progression_covariates import REGIONS
from neuroatrophy.progression_nets import BrLPNetworks, read_state_dict

torch.set_num_threads(1)

def _blob_image(shape, radius):
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(sum(g ** 2 for g in grids))
    return (np.exp(-r ** 2 / 0.5) - 0.5 * (r < radius)).astype(np.float32)


def _write_table(folder: Path, cfg, n_subjects=3, n_visits=2, valid_subject=None, valid_copy=False) -> Path:
    rows = []
    for s in range(n_subjects):
        for v in range(n_visits):
            path = folder / f"sub{s}_v{v}.nii.gz"
            nib.save(nib.Nifti1Image(_blob_image(cfg.image_shape, 0.3 + 0.1 * s + 0.05 * v), np.eye(4)), path)
            rows.append({"subject_id": f"sub{s}", "image_path": path.name, "age": 70.0 + 2 * v + s,
                             "sex": "F" if s % 2 else "M", "diagnosis": "MCI" if s == 2 else "CN",
                             "cerebral_cortex": 500000.0 - 3000 * v, "hippocampus": 8000.0 - 100 * v - 50 * s,
                             "amygdala": 3000.0 - 30 * v - 20 * s, "cerebral_white_matter": 500000.0 - 2000 * v + 1000 * s,
                             "lateral_ventricle": 30000.0 + 4000 * v + 1000 * s,
                             "split": "valid" if s == valid_subject else "train"})
    if valid_copy:  # the same scans again as validation rows: a fixed-noise measure of the training fit
        rows += [dict(row, subject_id="copy_" + row["subject_id"], split="valid") for row in list(rows)]
    path = folder / "table.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _tensors_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """AE -> latents -> UNet -> ControlNet on six tiny images, once for the module."""
    cfg = tiny_config()
    folder = tmp_path_factory.mktemp("progression_train")
    table = _write_table(folder, cfg, valid_copy=True)
    out = folder / "model"
    messages = []
    ae = pt.train_autoencoder(table, cfg, out, epochs=3, batch_size=2, grad_accum=1, lr=2e-3,
                              discriminator_channels=4, seed=0, progress=lambda f, m: messages.append((f, m)))
    nets = BrLPNetworks.from_config(ae.config, networks=("autoencoder",))
    latents = pt.extract_latents(nets.autoencoder, table, out / "latents", image_shape=cfg.image_shape)
    unet = pt.train_unet(latents, ae.config, out, epochs=4, batch_size=3, lr=3e-3, seed=0)
    cnet = pt.train_controlnet(latents, unet.config, None, out, epochs=5, batch_size=3, lr=3e-3, seed=0)
    return {"cfg": cfg, "folder": folder, "table": table, "out": out, "ae": ae, "latents": latents, "unet": unet, "cnet": cnet,
                "messages": messages, "nets": nets}


# --- table validation ---------------------------------------------------------------------------


def test_read_training_table_resolves_and_normalises(tmp_path):
    cfg = tiny_config()
    path = _write_table(tmp_path, cfg, valid_subject=1)
    table = pt.read_training_table(path, image_shape=cfg.image_shape)
    assert len(table) == 6
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in table["image_path"])
    assert set(table["split"]) == {"train", "valid"}
    assert table.loc[table.subject_id == "sub1", "split"].eq("valid").all()


@pytest.mark.parametrize("column, value, error, words", [
    ("sex", "2", ValueError, ["row 2", "sub0", "sex must be 'F' or 'M'"]),
    ("age", "old", ValueError, ["row 2", "sub0", "age 'old'"]),
    ("age", "0.7", ValueError, ["row 2", "age"]),
    ("diagnosis", "dementia", ValueError, ["row 2", "diagnosis must be one of CN, MCI, AD"]),
    ("hippocampus", "-5", ValueError, ["row 2", "'hippocampus'", "positive volume"]),
    ("split", "test", ValueError, ["row 2", "split must be 'train' or 'valid'"]),
    ("image_path", "missing.nii.gz", FileNotFoundError, ["row 2", "sub0", "missing.nii.gz"]),
])
def test_bad_table_values_are_named(tmp_path, column, value, error, words):
    cfg = tiny_config()
    path = _write_table(tmp_path, cfg)
    table = pd.read_csv(path, dtype=str)
    table.loc[0, column] = value
    table.to_csv(path, index=False)
    with pytest.raises(error) as info:
        pt.read_training_table(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_bad_table_structure(tmp_path):
    cfg = tiny_config()
    path = _write_table(tmp_path, cfg)
    pd.read_csv(path).drop(columns=["amygdala"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match="no amygdala column"):
        pt.read_training_table(path)
    path = _write_table(tmp_path, cfg)
    with pytest.raises(ValueError, match=r"shape \(24, 32, 24\), expected \(120, 144, 120\)"):
        pt.read_training_table(path, image_shape=(120, 144, 120))
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(pt.TABLE_COLUMNS) + "\n")
    with pytest.raises(ValueError, match="has no rows"):
        pt.read_training_table(empty)
    with pytest.raises(ValueError, match="no rows with split 'train'"):
        only_valid = pd.read_csv(path).assign(split="valid")
        pt.train_unet(only_valid.assign(latent_path=[str(tmp_path / p) for p in only_valid["image_path"]]), cfg, tmp_path / "x",
                      epochs=1, batch_size=1)


def test_make_pairs_every_earlier_later_pair():
    table = pd.DataFrame({"subject_id": ["a", "a", "a", "b", "c", "c"], "age": [72, 70, 75, 60, 80, 81],
                          "sex": ["F"] * 3 + ["M"] * 3, "split": "train", "latent_path": list("123456")})
    pairs = pt.make_pairs(table)
    assert len(pairs) == 3 + 0 + 1
    a = pairs[pairs.subject_id == "a"]
    assert list(zip(a.starting_age, a.followup_age)) == [(70, 72), (70, 75), (72, 75)]
    assert list(a.starting_latent_path) == ["2", "2", "1"] and list(a.followup_latent_path) == ["1", "3", "3"]


# --- the trainers -----------------------------------------------------------------------------------


def test_autoencoder_trains_and_reloads(trained):
    history = trained["ae"].history
    assert len(history) == 3 and history[-1]["valid_l1"] < 0.8 * history[0]["valid_l1"]
    assert all(h["perceptual"] == 0.0 for h in history)  # no LPIPS weights offline
    assert "perceptual loss off" in trained["messages"][0][1]
    fractions = [f for f, _ in trained["messages"][1:]]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    record = json.loads(trained["ae"].record_path.read_text())
    assert record["steps"] == 9 and record["settings"]["batch_size"] == 2 and "torch" in record["versions"]
    assert "perceptual loss off" in record["perceptual"]
    assert (trained["out"] / "discriminator.safetensors").is_file()


def test_extract_latents_are_encoder_means(trained):
    cfg, latents = trained["cfg"], trained["latents"]
    assert len(latents) == 12 and all(p.endswith("_latent.npz") for p in latents["latent_path"])
    with np.load(latents["latent_path"].iloc[0]) as data:
        z = data["data"]
    assert z.shape == cfg.latent_shape_ae and z.dtype == np.float32
    image = pt.load_training_image(latents["image_path"].iloc[0], cfg.image_shape)
    with torch.no_grad():
        z_mu = trained["nets"].autoencoder.encode(torch.from_numpy(image)[None, None])[0][0].numpy()
    np.testing.assert_allclose(z, z_mu, rtol=1e-5, atol=1e-6)
    written = pd.read_csv(trained["out"] / "latents" / "latents.csv")
    assert list(written["latent_path"]) == list(latents["latent_path"])
    all_values = np.concatenate([np.load(p)["data"].ravel() for p in latents["latent_path"]])
    assert pt.compute_scale_factor(latents) == pytest.approx(1.0 / all_values.std())
    assert pt.compute_scale_factor([np.array([1.0, -1.0])]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no spread"):
        pt.compute_scale_factor([np.zeros(4)])


def test_unet_trains_with_scale_factor_in_config(trained):
    result = trained["unet"]
    losses = [h["valid_mse"] for h in result.history]  # same noise every epoch
    assert losses[-1] < 0.9 * losses[0]
    expected = pt.compute_scale_factor(trained["latents"])
    assert result.config.scale_factor == pytest.approx(expected)
    saved = load_config(trained["out"] / "config.json")
    assert saved.scale_factor == pytest.approx(expected)


def test_controlnet_starts_from_unet_and_keeps_it_frozen(trained, tmp_path):
    result = trained["cnet"]
    losses = [h["valid_mse"] for h in result.history]  # same noise every epoch
    assert losses[-1] < 0.95 * losses[0]
    unet_state = read_state_dict(trained["unet"].weights)
    record = json.loads(result.record_path.read_text())
    assert record["n_pairs"] == 6  # three subjects with two visits each, and their validation copies
    # The frozen UNet file is untouched and is the one the configuration names.
    assert Path(result.config.weights["unet"]).resolve() == trained["unet"].weights.resolve()
    assert _tensors_equal(read_state_dict(result.config.weights["unet"]), unet_state)
    # Before any step the ControlNet carries the UNet's encoder weights (BrLP's strict=False copy).
    one = pt.train_controlnet(trained["latents"], trained["unet"].config, None, tmp_path, epochs=1, batch_size=8,
                              lr=1e-12, seed=0)
    cnet_state = read_state_dict(one.weights)
    shared = [k for k in cnet_state if k in unet_state and cnet_state[k].shape == unet_state[k].shape]
    assert len(shared) > 20
    assert all(torch.allclose(cnet_state[k], unet_state[k], atol=1e-6) for k in shared)


def test_outputs_load_with_brlp_networks(trained):
    cfg = load_config(trained["out"] / "config.json")
    assert set(cfg.weights) >= {"autoencoder", "unet", "controlnet"}
    nets = BrLPNetworks.from_config(cfg)
    for name in ("autoencoder", "unet", "controlnet"):
        saved = read_state_dict(trained["out"] / f"{name}.safetensors")
        assert _tensors_equal(getattr(nets, name).state_dict(), saved)
    assert cfg.minmax_params == trained["cfg"].minmax_params


# --- resume ----------------------------------------------------------------------------------------


def _unet_run(latents, cfg, out, epochs, progress=None, **kw):
    return pt.train_unet(latents, cfg, out, epochs=epochs, batch_size=2, grad_accum=2, lr=1e-3, seed=3,
                         progress=progress, **kw)


def _cancel_after(n):
    calls = [0]

    def progress(fraction, message):
        if message.startswith(("unet: epoch", "autoencoder: epoch")):
            calls[0] += 1
            if calls[0] == n:
                raise Cancelled("stop")

    return progress


def test_unet_resume_equals_uninterrupted(trained, tmp_path):
    latents, cfg = trained["latents"], trained["ae"].config
    latents = latents[latents.split == "train"]
    whole = _unet_run(latents, cfg, tmp_path / "whole", epochs=3)
    # Stop at an epoch boundary, then ask for more epochs.
    _unet_run(latents, cfg, tmp_path / "split", epochs=1)
    resumed = _unet_run(latents, cfg, tmp_path / "split", epochs=3)
    assert resumed.steps == whole.steps == 6
    assert _tensors_equal(read_state_dict(resumed.weights), read_state_dict(whole.weights))
    assert resumed.history == whole.history
    # Cancel in the middle of an epoch: the checkpoint is written at the last step.
    with pytest.raises(Cancelled):
        _unet_run(latents, cfg, tmp_path / "cancel", epochs=3, progress=_cancel_after(3))
    state = torch.load(tmp_path / "cancel" / "checkpoint-unet" / "state.pt", weights_only=True)
    assert (state["epoch"], state["group"], state["step"]) == (1, 1, 3)
    again = _unet_run(latents, cfg, tmp_path / "cancel", epochs=3)
    assert _tensors_equal(read_state_dict(again.weights), read_state_dict(whole.weights))
    assert again.history == whole.history
    # A resume with other settings is refused; resume=False starts afresh.
    with pytest.raises(ValueError, match="lr"):
        pt.train_unet(latents, cfg, tmp_path / "cancel", epochs=3, batch_size=2, grad_accum=2, lr=5e-4, seed=3)
    fresh = pt.train_unet(latents, cfg, tmp_path / "cancel", epochs=1, batch_size=2, grad_accum=2, lr=5e-4, seed=3,
                          resume=False)
    assert fresh.steps == 2


def test_autoencoder_resume_after_cancel_is_exact(tmp_path):
    cfg = tiny_config()
    table = _write_table(tmp_path, cfg, n_subjects=2)
    settings = {"epochs": 2, "batch_size": 1, "grad_accum": 2, "lr": 1e-3, "discriminator_channels": 4, "seed": 1}
    whole = pt.train_autoencoder(table, cfg, tmp_path / "whole", **settings)
    with pytest.raises(Cancelled):
        pt.train_autoencoder(table, cfg, tmp_path / "split", progress=_cancel_after(3), **settings)
    resumed = pt.train_autoencoder(table, cfg, tmp_path / "split", **settings)
    assert resumed.steps == whole.steps == 4
    for name in ("autoencoder", "discriminator"):
        assert _tensors_equal(read_state_dict(tmp_path / "split" / f"{name}.safetensors"),
                              read_state_dict(tmp_path / "whole" / f"{name}.safetensors"))


def test_validation_split_gives_validation_loss(trained, tmp_path):
    latents = trained["latents"]
    latents = latents[latents.split == "train"].copy()
    latents.loc[latents.subject_id == "sub2", "split"] = "valid"
    result = pt.train_unet(latents, trained["ae"].config, tmp_path, epochs=1, batch_size=4, lr=1e-3, seed=0,
                           minmax="data")
    assert "valid_mse" in result.history[0] and np.isfinite(result.history[0]["valid_mse"])
    train_rows = latents[latents.split == "train"]
    assert result.config.minmax_params["lateral_ventricle"] == (train_rows.lateral_ventricle.min(),
                                                                 train_rows.lateral_ventricle.max())


def test_bad_settings_are_refused(trained, tmp_path):
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        pt.train_unet(trained["latents"], trained["ae"].config, tmp_path, epochs=0)
    with pytest.raises(ValueError, match="amp=True needs a CUDA device"):
        pt.train_unet(trained["latents"], trained["ae"].config, tmp_path, epochs=1, amp=True)
    with pytest.raises(FileNotFoundError, match="no unet weights"):
        pt.train_controlnet(trained["latents"], tiny_config(), None, tmp_path, epochs=1)
    single = trained["latents"].drop_duplicates("subject_id")
    with pytest.raises(ValueError, match="two or more scans"):
        pt.train_controlnet(single, trained["unet"].config, None, tmp_path, epochs=1)


# --- disease-course model ---------------------------------------------------------------------------


def test_train_dcm_writes_models_and_config(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for s in range(8):
        pace = rng.uniform(0.7, 1.3)  # subject-specific speed of atrophy
        for v in range(4):
            age = 62.0 + 2 * s + 1.5 * v
            vols = {r: 400000.0 * (1 - 0.004 * pace * (age - 60)) * (1 + rng.normal(0, 0.003)) for r in REGIONS}
            vols["lateral_ventricle"] = 30000.0 + 1500 * pace * (age - 60) + rng.normal(0, 300)
            rows.append(dict(subject_id=f"s{s}", age=age, sex="F", diagnosis="CN", **vols))
    table = pd.DataFrame(rows)
    cfg = tiny_config()
    result = pt.train_dcm(table, tmp_path, cfg=cfg, n_iter=30, minmax="data")
    assert (result["dcm"] / "dcm_cn.json").is_file() and result["regression"].is_file()
    saved = load_config(result["config"])
    assert Path(saved.weights["dcm"]["cn"]).is_file() and Path(saved.weights["regression"]).is_file()
    from neuroatrophy.progression_dcm import RegressionCourse

    rate = RegressionCourse.load(result["regression"]).rate([70.0], "CN")["lateral_ventricle"].iloc[0]
    lo, hi = saved.minmax_params["lateral_ventricle"]
    assert rate == pytest.approx(1500 / (hi - lo), rel=0.35)  # paces average about 1
