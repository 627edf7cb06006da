"""Make the toy BrLP model in ``Testing/data/progression_toy/`` (run from the repository root).

    .venv/bin/python Testing/data/make_progression_toy.py [--out Testing/data/progression_toy]

A synthetic longitudinal cohort on ``tiny_config``'s 24 x 32 x 24 grid: a smooth template head
(an ellipsoid brain with a brighter white-matter core) with two lateral 'ventricles' whose radii grow
with age, each at its own subject-specific random rate. The conditioning volume (lateral ventricle)
is the sum of both, so the split of the growth between left and right is not determined by the
covariates: the spread of possible follow-ups grows with the time gap. The tiny autoencoder, UNet
and ControlNet are trained briefly on the CPU with ``neuroatrophy.progression_train`` (a few minutes
on 2 cores) and their weights, configuration and a few held-out test subjects are written to the
output folder (< 2 MB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SHAPE = (24, 32, 24)
VENTRICLE_X = 4.5           # voxels from the midline
GROWTH_MAX = 0.2            # voxels of radius per year, per side
VISIT_GAPS = (0.0, 1.0, 3.0, 6.0, 10.0)
OTHER_VOLUMES = {"cerebral_cortex": 500000.0, "hippocampus": 8000.0, "amygdala": 3000.0,
                 "cerebral_white_matter": 480000.0}
VOXEL_MM3 = 1.5 ** 3


def _grid():
    return np.meshgrid(*[np.arange(s, dtype=np.float32) - (s - 1) / 2 for s in SHAPE], indexing="ij")


def toy_image(radius_left: float, radius_right: float) -> np.ndarray:
    """The template head with ventricles of the given radii (voxels), smooth edges, values in [0, 1]."""
    x, y, z = _grid()

    def soft(distance, edge=0.8):  # 1 inside, 0 outside, a smooth edge
        return 1.0 / (1.0 + np.exp(distance / edge))

    brain = soft(np.sqrt((x / 10.0) ** 2 + (y / 14.0) ** 2 + (z / 10.0) ** 2) * 10.0 - 10.0)
    core = soft(np.sqrt((x / 6.0) ** 2 + (y / 9.0) ** 2 + (z / 6.0) ** 2) * 6.0 - 6.0)
    image = 0.55 * brain + 0.35 * core
    for side, radius in ((-1, radius_left), (1, radius_right)):
        # Ventricles elongated front to back (y), as lateral ventricles are.
        d = np.sqrt((x - side * VENTRICLE_X) ** 2 + (y / 2.0) ** 2 + z ** 2)
        image = image * (1.0 - 0.85 * soft(d - radius, edge=0.5))
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def ventricle_mm3(radius_left: float, radius_right: float) -> float:
    """Volume of the two ellipsoidal ventricles (semi-axes r, 2r, r) in mm3."""
    return float(sum(4.0 / 3.0 * np.pi * 2.0 * r ** 3 for r in (radius_left, radius_right)) * VOXEL_MM3)


def make_subject(rng, index: int) -> dict:
    return {"subject_id": f"toy{index:03d}", "age0": float(rng.uniform(60.0, 78.0)),
            "r0": float(rng.uniform(1.5, 2.2)), "rates": rng.uniform(0.0, GROWTH_MAX, size=2),
            "sex": "F" if rng.random() < 0.5 else "M"}


def visit_row(subject: dict, gap: float) -> dict:
    left, right = subject["r0"] + subject["rates"] * gap
    age = subject["age0"] + gap
    row = {"subject_id": subject["subject_id"], "age": round(age, 3), "sex": subject["sex"], "diagnosis": "CN",
           "lateral_ventricle": ventricle_mm3(left, right), "radius_left": left, "radius_right": right}
    for region, volume in OTHER_VOLUMES.items():  # a mild, deterministic decline with age
        row[region] = volume * (1.0 - 0.002 * (age - 60.0))
    return row


def expected_ventricle_mm3(subject: dict, gap: float) -> float:
    """What a population model predicts without the subject's rates: both sides at the mean rate."""
    r = subject["r0"] + GROWTH_MAX / 2 * gap
    return ventricle_mm3(r, r)


def make_cohort(folder: Path, n_subjects: int, seed: int = 0):
    import nibabel as nib
    import pandas as pd

    rng = np.random.default_rng(seed)
    subjects = [make_subject(rng, i) for i in range(n_subjects)]
    rows = []
    for subject in subjects:
        for gap in VISIT_GAPS:
            row = visit_row(subject, gap)
            path = folder / f"{row['subject_id']}_{gap:04.1f}.nii.gz"
            nib.save(nib.Nifti1Image(toy_image(row["radius_left"], row["radius_right"]), np.diag([1.5, 1.5, 1.5, 1.0])), path)
            rows.append(dict(row, image_path=path.name))
    return pd.DataFrame(rows), subjects


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "Testing" / "data" / "progression_toy"))
    parser.add_argument("--subjects", type=int, default=24)
    parser.add_argument("--ae-images", type=int, default=40)
    parser.add_argument("--ae-epochs", type=int, default=8)
    parser.add_argument("--unet-epochs", type=int, default=40)
    parser.add_argument("--cnet-epochs", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=None,
                        help="keep the training folder here; a rerun resumes the trainers from their checkpoints "
                             "(raise --unet-epochs/--cnet-epochs to train longer)")
    args = parser.parse_args(argv)

    import torch

    from neuroatrophy import progression_config as pc
    from neuroatrophy import progression_train as pt
    from neuroatrophy.progression_nets import BrLPNetworks

    torch.set_num_threads(args.threads)
    unet = dict(pc.tiny_config().unet, channels=[8, 16, 16], num_head_channels=[0, 16, 16], norm_num_groups=8)
    cfg = pc.tiny_config(
        unet=unet, name="toy",
        controlnet=pc._controlnet_kwargs(unet, {"conditioning_embedding_in_channels": 4,
                                                    "conditioning_embedding_num_channels": [8]}),
    )
    out = Path(args.out)
    times = {}
    with (contextlib.nullcontext(args.work) if args.work else tempfile.TemporaryDirectory()) as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "table.csv").is_file():
            table, _ = make_cohort(work, args.subjects, seed=0)
            table.to_csv(work / "table.csv", index=False)
            # The autoencoder learns the head from a subset of the scans (it is the slowest part on a CPU).
            table.sample(n=min(args.ae_images, len(table)), random_state=0).to_csv(work / "ae_table.csv", index=False)

        t0 = time.time()
        ae = pt.train_autoencoder(work / "ae_table.csv", cfg, work, epochs=args.ae_epochs, batch_size=4, grad_accum=1,
                                  lr=2e-3, discriminator_channels=8, adv_weight=0.005, seed=0, progress=_printer())
        times["autoencoder"] = time.time() - t0
        print(f"autoencoder: {times['autoencoder']:.0f} s, last epoch {ae.history[-1]}")
        nets = BrLPNetworks.from_config(ae.config, networks=("autoencoder",))
        t0 = time.time()
        latents = pt.extract_latents(nets.autoencoder, work / "table.csv", work / "latents", image_shape=cfg.image_shape)
        times["latents"] = time.time() - t0
        t0 = time.time()
        un = pt.train_unet(latents, ae.config, work, epochs=args.unet_epochs, batch_size=16, lr=2e-3, minmax="data",
                           seed=0, progress=_printer())
        times["unet"] = time.time() - t0
        print(f"unet: {times['unet']:.0f} s, last epoch {un.history[-1]}, scale {un.config.scale_factor:.3f}")
        t0 = time.time()
        cn = pt.train_controlnet(latents, un.config, None, work, epochs=args.cnet_epochs, batch_size=16, lr=2e-3,
                                 seed=0, progress=_printer())
        times["controlnet"] = time.time() - t0
        print(f"controlnet: {times['controlnet']:.0f} s, last epoch {cn.history[-1]}")

        staging = out.parent / f".{out.name}-tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        final = pc.load_config(cn.config_path)
        weights = {}
        for network in ("autoencoder", "unet", "controlnet"):
            shutil.copy(final.weights[network], staging / f"{network}.safetensors")
            weights[network] = str(staging / f"{network}.safetensors")
            record = json.loads((work / f"training_{network}.json").read_text())
            (staging / f"training_{network}.json").write_text(json.dumps(
                {k: record[k] for k in ("network", "settings", "history", "steps", "versions")}, indent=1))
        final.weights = weights
        final.save(staging / "config.json")
        _write_test_cases(staging / "test_cases.json", seed=1)
        (staging / "timings.json").write_text(json.dumps({k: round(v, 1) for k, v in times.items()}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    print("toy model written to", out, {k: round(v) for k, v in times.items()})


def _printer():
    last = [-1]

    def say(fraction, message):
        if int(fraction * 10) > last[0] or "off" in message:
            last[0] = int(fraction * 10)
            print(f"  {fraction:6.1%} {message}", flush=True)

    return say


def _write_test_cases(path: Path, seed: int, n: int = 3):
    """Held-out subjects: baseline radii/age/sex and the population-expected volumes at gaps 1 and 10."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        subject = make_subject(rng, 900 + i)
        base = visit_row(subject, 0.0)
        targets = {}
        for gap in (1.0, 10.0):
            row = visit_row(subject, gap)
            row["lateral_ventricle"] = expected_ventricle_mm3(subject, gap)
            targets[str(gap)] = {k: row[k] for k in ("age", *OTHER_VOLUMES, "lateral_ventricle")}
        cases.append({"subject_id": subject["subject_id"], "age": base["age"], "sex": subject["sex"], "diagnosis": "CN",
                      "radius": subject["r0"], "targets": targets})
    path.write_text(json.dumps(cases, indent=1))


if __name__ == "__main__":
    main()
