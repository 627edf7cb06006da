"""The demo's brain-progression step: what can be shown without BrLP's weights, with known truth.

1. **Preprocessing a real scan**: Colin27 (full-head T1 from Debian's mricron-data) through N4,
   deepbet skull stripping, affine MNI registration, BrLP's 1.5 mm grid and WhiteStripe, then the
   approximate regional volumes (no segmentation is available for it).
2. **Disease-course model**: a simulated longitudinal cohort of the five regional volumes drawn
   from a known leaspy logistic model (CN and AD groups); leaspy 2.1 fitted on it and the
   regression fallback fitted too; both predict held-out subjects' volumes 2 and 4 years ahead,
   compared with the truth and with a no-change forecast.
3. **The forecast workflow**: the preprocessed Colin27 through the whole forecasting pipeline
   (disease-course volumes, LAS with m = 3 at three target ages, uncertainty, native-space maps,
   the output folder the CLI writes) with BrLP's structure at toy size and **random weights**: the
   images show the outputs' format and geometry, not a forecast.

Everything but the Colin27 scan is synthetic. A real forecast needs BrLP's published weights, which
cannot be redistributed (see docs/progression.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["run_progression_demo"]

# A leaspy logistic model of the five regions (all but the ventricles flipped, so every feature
# increases), courses over ages 60-90: the truth of the simulated cohort.
TRUTH = {
    "leaspy_version": "1.4.0", "name": "logistic", "dimension": 5, "source_dimension": 1,
    "noise_model": "gaussian_diagonal",
    "parameters": {
        "g": [0.5, 0.2, 0.4, 0.8, 0.0], "v0": [-3.0, -2.6, -2.8, -3.2, -2.5],
        "betas": [[0.3], [-0.2], [0.1], [0.2]], "tau_mean": 75.0, "tau_std": 5.0, "xi_mean": 0.0,
        "xi_std": 0.3, "sources_mean": 0.0, "sources_std": 1.0, "noise_std": [0.01] * 5,
    },
}


def _simulate(truth, n_subjects, rng, diagnosis, n_visits=4, noise=0.005, prefix="s"):
    from .progression_covariates import REGIONS
    from .progression_dcm import flip_features

    rows, params = [], {}
    for i in range(n_subjects):
        subject = f"{prefix}{i:02d}"
        tau = truth.tau_mean + truth.tau_std * rng.standard_normal()
        xi = truth.xi_std * rng.standard_normal()
        sources = rng.standard_normal(truth.source_dimension)
        ages = 62.0 + 22.0 * rng.random() + 1.5 * np.arange(n_visits)
        values = flip_features(truth.estimate(ages, tau, xi, sources)) + noise * rng.standard_normal((n_visits, 5))
        rows += [{"subject_id": subject, "age": a, "diagnosis": diagnosis, **dict(zip(REGIONS, v))}
                 for a, v in zip(ages, values)]
        params[subject] = (tau, xi, sources)
    return pd.DataFrame(rows), params


def disease_course_step(out: Path, seed: int, report) -> dict:
    """Fit the DCM and the regression fallback on a simulated cohort; errors on held-out subjects."""
    from .progression_covariates import REGIONS
    from .progression_dcm import DiseaseCourseModel, LeaspyV1Logistic, RegressionCourse, flip_features, predict_volumes

    truth_model = dict(TRUTH, features=list(REGIONS))
    truth = LeaspyV1Logistic.from_dict(truth_model)
    rng = np.random.default_rng(seed)
    cn, _ = _simulate(truth, 16, rng, "CN", prefix="cn")
    ad, _ = _simulate(truth, 16, rng, "AD", prefix="ad")
    cohort = pd.concat([cn, ad], ignore_index=True)
    report(0.0, "disease-course model: leaspy 2.1 fit on 32 simulated subjects x 4 visits")
    dcm = DiseaseCourseModel().fit(cohort, n_iter=150, seed=64, source_dimension=1)
    regression = RegressionCourse().fit(cohort)
    dcm.save(out / "dcm")
    regression.save(out / "regression.json")
    cohort.to_csv(out / "simulated_visits.csv", index=False)

    held_out, params = _simulate(truth, 8, rng, "CN", prefix="test")
    errors = {"dcm": [], "regression": [], "no_change": []}
    for subject, visits in held_out.groupby("subject_id"):
        last = visits["age"].max()
        targets = last + np.array([2.0, 4.0])
        true = flip_features(truth.estimate(targets, *params[subject]))
        # the DCM personalised on all visits, the regression from the last one
        for name, method, seen in (("dcm", "dcm", visits), ("regression", "regression", visits.iloc[-1:])):
            pred = predict_volumes(seen, targets, "CN", dcm=dcm, regression=regression, method=method)
            errors[name].append(np.abs(pred[list(REGIONS)].to_numpy() - true))
        errors["no_change"].append(np.abs(visits[list(REGIONS)].to_numpy()[-1] - true))
    summary = {name: float(np.mean(values)) for name, values in errors.items()}
    report(1.0, "disease-course model: mean abs error (normalised volume) at +2/+4 years: "
           + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    return {"mean_abs_error_normalised": summary, "n_train_subjects": 32, "n_test_subjects": 8}


def preprocessing_step(out: Path, report) -> dict:
    """Colin27 through BrLP's preprocessing and the approximate regional volumes."""
    from .progression_preproc import preprocess_t1
    from .progression_volumes import estimate_volumes
    from .thalamus_validation import colin27

    t1 = colin27()[0]
    start = time.perf_counter()
    pre = preprocess_t1(t1, progress=lambda f, m: report(0.9 * f, f"Colin27: {m}"))
    seconds = time.perf_counter() - start
    pre.save(out / "colin27_preprocessed")
    volumes = estimate_volumes(pre)
    (out / "colin27_volumes.json").write_text(json.dumps(volumes, indent=2) + "\n")
    report(1.0, f"Colin27 preprocessed in {seconds:.0f} s; brain {pre.brain_mask.sum() * 1.5 ** 3 / 1e6:.2f} L (MNI)")
    return {"seconds": seconds, "volumes_mm3": volumes, "volume_scale": pre.volume_scale}


def run_progression_demo(out_dir, seed: int = 0, progress=None) -> dict:
    """Run the progression demo into ``out_dir`` (see the module docstring); returns headline numbers."""
    from .parallel import scaled_progress

    report = progress or (lambda f, m: print(f"[progression {100 * f:3.0f} %] {m}", flush=True))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"preprocessing": preprocessing_step(out, scaled_progress(report, 0.0, 0.35))}
    summary["disease_course"] = disease_course_step(out, seed, scaled_progress(report, 0.35, 0.7))
    summary["forecast"] = forecast_step(out, seed, scaled_progress(report, 0.7, 1.0))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def forecast_step(out: Path, seed: int, report, dcm=None) -> dict:
    """The forecasting workflow on the preprocessed Colin27 with random toy-size networks."""
    import torch

    from .progression_config import tiny_config
    from .progression_dcm import DiseaseCourseModel
    from .progression_nets import BrLPNetworks
    from .progression_predict import BrainForecaster, Subject
    from .progression_preproc import PreprocessedT1

    torch.manual_seed(seed)
    networks = BrLPNetworks.from_config(tiny_config(), load_weights=False)
    with torch.no_grad():  # MONAI zero-initialises output layers: give every weight a random value
        for module in (networks.autoencoder, networks.unet, networks.controlnet):
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    pre = PreprocessedT1.load(out / "colin27_preprocessed")
    volumes = json.loads((out / "colin27_volumes.json").read_text())
    # Illustrative covariates (Colin27 was scanned in his thirties; these are not his).
    subject = Subject(age=70.0, sex="M", diagnosis="CN", volumes=volumes, subject_id="colin27")
    forecaster = BrainForecaster(networks, dcm=DiseaseCourseModel.load(out / "dcm"), m=3, ddim_steps=10, seed=seed)
    result = forecaster.predict(pre, subject, [72.0, 75.0, 80.0], progress=report)
    result.settings["note"] = "random toy-size weights: the outputs' format, not a forecast"
    result.save(out / "forecast_workflow")
    report(1.0, f"forecast workflow written to {out / 'forecast_workflow'} (random weights)")
    return {"target_ages": result.target_ages.tolist(), "volumes": result.volumes.to_dict(orient="list"),
            "folder": str(out / "forecast_workflow")}
