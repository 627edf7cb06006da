"""``neuroatrophy progression ...``: BrLP brain-MRI forecasting, headless.

Examples
--------
Forecast a subject's T1w at three future ages with BrLP's published weights (a folder with
BrLP's ``confs.yaml`` or the weight files, see docs/progression.md)::

    neuroatrophy progression predict --t1 sub-01_T1w.nii.gz --age 70 --sex F --diagnosis MCI \\
        --labels sub-01_synthseg.nii.gz --target-ages 72 74 76 --weights brlp-weights/ --out sub-01-forecast

Preprocess only (N4, skull stripping, affine MNI registration, 1.5 mm grid, WhiteStripe)::

    neuroatrophy progression preprocess --t1 sub-01_T1w.nii.gz --out sub-01-preprocessed

Compare a forecast with the real follow-up scan::

    neuroatrophy progression evaluate --forecast sub-01-forecast --age 74 --followup sub-01_ses-2_T1w.nii.gz \\
        --out sub-01-evaluation
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["add_progression_parser"]


# --- inputs -----------------------------------------------------------------------------------

def _preprocessed(args, reporter, progress):
    """The baseline after preprocessing: a saved preprocessing folder, or the raw T1w processed now."""
    from .progression_preproc import PreprocessedT1, preprocess_t1

    if args.preprocessed:
        return PreprocessedT1.load(args.preprocessed)
    if not args.t1:
        raise ValueError("give the baseline scan (--t1) or a preprocessing folder (--preprocessed)")
    skull_strip = args.skull_strip
    if skull_strip not in ("deepbet", "none"):
        skull_strip = Path(skull_strip)
        if not skull_strip.is_file():
            raise FileNotFoundError(f"--skull-strip: brain mask not found: {skull_strip}")
    reporter.info(f"preprocessing {args.t1} (N4 {'on' if not args.no_n4 else 'off'}, skull strip {args.skull_strip})")
    return preprocess_t1(args.t1, n4=not args.no_n4, skull_strip=skull_strip, register=not args.no_register,
                         progress=progress)


def _baseline_volumes(args, pre, reporter) -> tuple[dict, str]:
    """The five conditioning volumes at baseline (mm3 in MNI space) and where they came from."""
    from .progression_volumes import estimate_volumes, read_volumes, volumes_from_labels

    if args.volumes:
        return read_volumes(args.volumes), f"table {args.volumes}"
    if args.labels:
        scale = 1.0 if args.labels_in_mni else pre.volume_scale
        return volumes_from_labels(args.labels, volume_scale=scale), f"label map {args.labels}"
    reporter.info("warning: no segmentation given (--labels or --volumes): the regional volumes are our "
                  "approximate atlas-based estimate; a SynthSeg/FreeSurfer segmentation is better")
    return estimate_volumes(pre), "approximate estimate (atlas + tissue classes)"


def _visits(path):
    from .cli import _read_table
    from .progression_covariates import REGIONS

    if not path:
        return None
    return _read_table(path, "visits table", required=("age", *REGIONS))


def _course_models(cfg):
    """The disease-course model(s) the configuration names: BrLP's 1.x JSONs or our fitted folder."""
    from .progression_dcm import DiseaseCourseModel, RegressionCourse, load_brlp_dcms

    dcm = cfg.weights.get("dcm")
    if isinstance(dcm, dict) and dcm:
        dcm = load_brlp_dcms(dcm)
    elif dcm:
        dcm = DiseaseCourseModel.load(dcm)
    else:
        dcm = None
    regression = cfg.weights.get("regression")
    return dcm, (RegressionCourse.load(regression) if regression else None)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to PyTorch here; use --device cpu")
    return name


# --- commands --------------------------------------------------------------------------------

def cmd_preprocess(args, reporter) -> int:
    from .cli import _throttled

    pre = _preprocessed(args, reporter, _throttled(reporter.progress))
    pre.save(args.out)
    reporter.progress(1.0, f"wrote {args.out}")
    return 0


def cmd_predict(args, reporter) -> int:
    import torch

    from .cli import _throttled
    from .parallel import scaled_progress
    from .progression_config import load_config
    from .progression_nets import BrLPNetworks
    from .progression_predict import BrainForecaster, Subject

    progress = _throttled(reporter.progress)
    cfg = load_config(args.weights)
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Load (and check) everything before the long preprocessing.
    reporter.progress(0.0, f"loading the networks ({cfg.name}) on {device}")
    networks = BrLPNetworks.from_config(cfg, device=device)
    dcm, regression = _course_models(cfg)
    subject_visits = _visits(args.visits)

    pre = _preprocessed(args, reporter, scaled_progress(progress, 0.02, 0.15))
    volumes, source = _baseline_volumes(args, pre, reporter)
    reporter.info("baseline volumes (mm3, MNI): " + ", ".join(f"{k} {v:.0f}" for k, v in volumes.items())
                  + f" [{source}]")
    subject = Subject(age=args.age, sex=args.sex, diagnosis=args.diagnosis, volumes=volumes,
                      visits=subject_visits, subject_id=args.subject)
    target_volumes = None
    if dcm is None and regression is None:
        target_volumes = _constant_volumes(volumes, cfg, len(args.target_ages), reporter)
    forecaster = BrainForecaster(networks, dcm=dcm, regression=regression, m=args.m, ddim_steps=args.steps,
                                 uncertainty=not args.no_uncertainty, seed=args.seed, batch_size=args.batch_size,
                                 amp_dtype=torch.float16 if args.amp and device.startswith("cuda") else None)
    result = forecaster.predict(pre, subject, args.target_ages, target_volumes=target_volumes,
                                progress=scaled_progress(progress, 0.15, 0.97))
    result.settings["baseline_volume_source"] = source
    result.save(args.out)
    for age, u in zip(result.target_ages, result.global_uncertainty):
        reporter.info(f"age {age:.1f}: global uncertainty (mean voxel SD in the brain) {u:.4f}")
    reporter.progress(1.0, f"wrote {args.out}")
    return 0


def _constant_volumes(volumes, cfg, n_ages, reporter):
    from .progression_covariates import REGIONS, normalise_volumes

    reporter.info("warning: the configuration names no disease-course model (dcm): the baseline volumes are "
                  "used at every target age, so the forecast follows age, sex and diagnosis only")
    norm = normalise_volumes(volumes, cfg.minmax_params)
    table = pd.DataFrame([norm] * n_ages)[list(REGIONS)]
    table["source"] = "baseline"
    return table


def cmd_evaluate(args, reporter) -> int:
    from .io import atomic_write
    from .progression_eval import evaluate_forecast
    from .progression_preproc import PreprocessedT1, preprocess_t1
    from .progression_volumes import volumes_from_labels

    forecast = Path(args.forecast)
    record = _forecast_record(forecast)
    key = f"{float(args.age):.1f}"
    if key not in record["files"]["predicted"]:
        raise ValueError(f"{forecast} has no prediction at age {key} (ages: {', '.join(record['files']['predicted'])})")
    import nibabel as nib

    predicted = nib.load(forecast / record["files"]["predicted"][key])
    mask = np.asarray(nib.load(forecast / record["files"]["brain_mask"]).dataobj) > 0
    if args.followup_preprocessed:
        follow = PreprocessedT1.load(args.followup_preprocessed)
    elif not args.followup:
        raise ValueError("give the follow-up scan (--followup) or its preprocessing folder (--followup-preprocessed)")
    else:
        reporter.info(f"preprocessing the follow-up {args.followup}")
        follow = preprocess_t1(args.followup, n4=not args.no_n4, skull_strip=args.skull_strip)
    followup = _on_grid(follow.image, follow.affine, predicted)
    followup_volumes = predicted_volumes = None
    if args.followup_labels:
        followup_volumes = volumes_from_labels(args.followup_labels, volume_scale=follow.volume_scale)
        table = pd.read_csv(forecast / record["files"]["volumes"])
        row = table.loc[np.isclose(table["target_age"], float(args.age))]
        predicted_volumes = row.iloc[0].drop(["target_age", "source"], errors="ignore").astype(float).to_dict()
    metrics = evaluate_forecast(np.asarray(predicted.dataobj, np.float32), followup, mask=mask,
                                predicted_volumes=predicted_volumes, followup_volumes=followup_volumes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from .cli import _jsonable

    if isinstance(metrics.get("volume_errors"), pd.DataFrame):
        metrics["volume_errors"] = metrics["volume_errors"].to_dict(orient="records")
    with atomic_write(out / "evaluation.json") as tmp:
        Path(tmp).write_text(json.dumps(_jsonable(metrics), indent=2) + "\n")
    for name in ("ssim", "mse"):
        if name in metrics:
            reporter.info(f"{name.upper()} {metrics[name]:.4f}")
    reporter.progress(1.0, f"wrote {out / 'evaluation.json'}")
    return 0


def _forecast_record(folder: Path) -> dict:
    path = folder / "forecast.json"
    if not path.is_file():
        raise FileNotFoundError(f"not a forecast folder (no forecast.json): {folder}")
    return json.loads(path.read_text())


def _on_grid(image, affine, target) -> np.ndarray:
    """``image`` (MNI grid ``affine``) resampled onto ``target``'s grid (same MNI space)."""
    from scipy import ndimage

    if image.shape == target.shape and np.allclose(affine, target.affine):
        return np.asarray(image, np.float32)
    index = np.linalg.inv(affine) @ target.affine
    return ndimage.affine_transform(np.asarray(image, np.float32), index[:3, :3], index[:3, 3],
                                    output_shape=target.shape, order=1).astype(np.float32)


# --- parser ----------------------------------------------------------------------------------

def add_progression_parser(sub, common) -> None:
    """Register ``neuroatrophy progression <command>`` on the main parser's subparsers."""
    p = common(sub.add_parser("progression", help="forecast future brain MRI with latent diffusion (BrLP)"),
               cohort=False)
    psub = p.add_subparsers(dest="progression_command", required=True)

    def preprocessing_options(q, required=False):
        q.add_argument("--t1", required=required, help="the raw T1w scan (NIfTI/MGZ)")
        q.add_argument("--no-n4", action="store_true", help="skip N4 bias-field correction")
        q.add_argument("--skull-strip", default="deepbet",
                       help="deepbet (default; shipped weights, offline), none (already skull-stripped), "
                            "or a brain-mask file on the scan's grid")
        q.add_argument("--no-register", action="store_true",
                       help="the scan is already affinely registered to MNI152 (e.g. BrLP/turboprep output)")

    q = common(psub.add_parser("preprocess", help="BrLP's preprocessing of a T1w (MNI152 1.5 mm, WhiteStripe)"),
               cohort=False)
    preprocessing_options(q, required=True)
    q.set_defaults(preprocessed=None)
    q.add_argument("--out", required=True, help="output folder (t1_mni.nii.gz, brain_mask_mni.nii.gz, JSON)")
    q.set_defaults(func=cmd_preprocess)

    f = common(psub.add_parser("predict", help="forecast the T1w MRI at future ages with uncertainty"),
               cohort=False)
    preprocessing_options(f)
    f.add_argument("--preprocessed", default=None, help="a folder written by 'progression preprocess' instead of --t1")
    f.add_argument("--age", type=float, required=True, help="age at the baseline scan (years)")
    f.add_argument("--sex", required=True, help="F or M")
    f.add_argument("--diagnosis", required=True, help="CN, MCI or AD (picks the disease-course model)")
    f.add_argument("--target-ages", type=float, nargs="+", required=True, help="ages to forecast (years)")
    f.add_argument("--labels", default=None,
                   help="SynthSeg/FreeSurfer label map of the baseline (native space unless --labels-in-mni)")
    f.add_argument("--labels-in-mni", action="store_true", help="the label map is in MNI space already")
    f.add_argument("--volumes", default=None, help="the five baseline volumes (mm3, MNI space) as JSON/CSV")
    f.add_argument("--visits", default=None,
                   help="CSV of earlier visits: age and the five volumes (mm3) for the disease-course model")
    f.add_argument("--subject", default="subject", help="subject name for the records")
    f.add_argument("--weights", required=True,
                   help="configuration file (JSON/YAML; BrLP's confs.yaml works) or a folder with it or with "
                        "BrLP's weight files")
    f.add_argument("--m", type=int, default=None, help="LAS samples per target age (default: the configuration's, 4)")
    f.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the configuration's, 25)")
    f.add_argument("--no-uncertainty", action="store_true", help="skip the voxel uncertainty map (m-1 fewer decodes)")
    f.add_argument("--batch-size", type=int, default=None, help="LAS chains run together (default all)")
    f.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    f.add_argument("--amp", action="store_true", help="float16 mixed precision on CUDA")
    f.add_argument("--threads", type=int, default=None, help="CPU threads")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    f.set_defaults(func=cmd_predict)

    e = common(psub.add_parser("evaluate", help="SSIM, MSE and regional volume error against a real follow-up"),
               cohort=False)
    e.add_argument("--forecast", required=True, help="a folder written by 'progression predict'")
    e.add_argument("--age", type=float, required=True, help="the target age the follow-up was scanned at")
    e.add_argument("--followup", default=None, help="the follow-up T1w (raw; preprocessed here)")
    e.add_argument("--followup-preprocessed", default=None, help="or its 'progression preprocess' folder")
    e.add_argument("--followup-labels", default=None, help="SynthSeg/FreeSurfer labels of the follow-up (native)")
    e.add_argument("--no-n4", action="store_true")
    e.add_argument("--skull-strip", default="deepbet")
    e.add_argument("--out", required=True, help="output folder (evaluation.json)")
    e.set_defaults(func=cmd_evaluate)
    add_train_parsers(psub, common)


def _config_for_training(path):
    from .progression_config import brlp_config, load_config, tiny_config

    if path in (None, "brlp"):
        return brlp_config()
    if path == "tiny":
        return tiny_config()
    return load_config(path)


def _training_options(args) -> dict:
    amp = None if args.amp == "auto" else args.amp == "on"
    return dict(epochs=args.epochs, device=_device(args.device), amp=amp, resume=not args.restart, seed=args.seed)


def cmd_train(args, reporter) -> int:
    from . import progression_train as pt
    from .cli import _throttled
    from .progression_nets import BrLPNetworks

    progress = _throttled(reporter.progress)
    cfg = _config_for_training(args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stage = args.stage
    if stage == "autoencoder":
        result = pt.train_autoencoder(args.table, cfg, out, batch_size=args.batch_size or 2, grad_accum=args.grad_accum,
                                      lr=args.lr or 1e-4, preprocess=args.preprocess, progress=progress,
                                      **_training_options(args))
    elif stage == "latents":
        nets = BrLPNetworks.from_config(cfg, device=_device(args.device), networks=("autoencoder",))
        latents = pt.extract_latents(nets.autoencoder, args.table, out, preprocess=args.preprocess, progress=progress)
        scale = pt.compute_scale_factor(latents)
        reporter.info(f"{len(latents)} latents in {out}; scale factor 1/std = {scale:.4f}")
        reporter.progress(1.0, f"wrote {out / 'latents.csv'}")
        return 0
    elif stage == "unet":
        result = pt.train_unet(args.table, cfg, out, batch_size=args.batch_size or 16, grad_accum=args.grad_accum,
                               lr=args.lr or 2.5e-5, progress=progress, **_training_options(args))
    elif stage == "controlnet":
        result = pt.train_controlnet(args.table, cfg, out_dir=out, batch_size=args.batch_size or 16,
                                     grad_accum=args.grad_accum, lr=args.lr or 2.5e-5, progress=progress,
                                     **_training_options(args))
    else:  # dcm
        pt.train_dcm(args.table, out, cfg=cfg, n_iter=args.n_iter, seed=args.seed, progress=progress)
        reporter.progress(1.0, f"wrote the disease-course models to {out}")
        return 0
    reporter.info(f"final loss {result.history[-1] if getattr(result, 'history', None) else 'n/a'}")
    reporter.progress(1.0, f"wrote {result.weights} and {result.config_path}")
    return 0


def add_train_parsers(psub, common) -> None:
    """``neuroatrophy progression train STAGE``: the four BrLP components on your own data."""
    t = common(psub.add_parser("train", help="train BrLP's components on your own longitudinal data"), cohort=False)
    t.add_argument("stage", choices=["autoencoder", "latents", "unet", "controlnet", "dcm"],
                   help="autoencoder -> latents (encoder means + scale factor) -> unet -> controlnet; dcm any time")
    t.add_argument("--table", required=True,
                   help="training table (subject_id, image_path, age, sex, diagnosis, 5 volumes[, split]); "
                        "for unet/controlnet the latents.csv of the 'latents' stage")
    t.add_argument("--config", default=None,
                   help="configuration (JSON/YAML) with the previous stages' weights; 'brlp' (default) or 'tiny'")
    t.add_argument("--out", required=True, help="output folder (weights, checkpoints, config.json)")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    t.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help="mixed precision (auto: on CUDA)")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    t.add_argument("--preprocess", action="store_true", help="the table's images are raw scans: preprocess them")
    t.add_argument("--n-iter", type=int, default=5000, help="MCMC-SAEM iterations of the disease-course fit")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)
