"""Forecast a subject's future T1w MRI with BrLP: the whole pipeline, and its output folder.

``BrainForecaster.predict`` takes a preprocessed baseline (``progression_preproc.PreprocessedT1``),
the subject's covariates and visits, and a list of target ages, and returns a
``ForecastResult``:

1. regional volumes at each target age from the disease-course model (``progression_dcm``), or the
   volumes the caller gives;
2. the 8-value conditioning vector per target age (``progression_covariates.encode_context``);
3. the baseline latent (encoder mean);
4. Latent Average Stabilisation: ``m`` DDIM chains per target age, all target ages in one batch
   with shared initial noise so the trajectory is consistent (``progression_sampling``);
5. decoding of the mean latent (BrLP's prediction) and of every sample (the voxel SD map);
6. BrLP's output post-processing: intensities clipped to the 5th-99.5th percentile and masked
   with the baseline brain mask.

The networks run on the configuration's image grid. For BrLP that is the 120 x 144 x 120 grid of
the preprocessing; a smaller configuration (tests, toy models) runs on a coarser grid covering the
same field of view, and the baseline is resampled onto it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from .io import replace_folder
from .parallel import scaled_progress
from .progression_covariates import (
    REGIONS,
    denormalise_volumes,
    encode_age,
    encode_context,
    normalise_diagnosis,
    normalise_volumes,
)
from .progression_nets import BrLPNetworks

FORMAT_VERSION = 1
PERCENTILES = (5.0, 99.5)  # BrLP's percnorm of the decoded image


@dataclass
class Subject:
    """The covariates BrLP conditions on.

    ``volumes``: the five regional volumes at the baseline (mm3 in MNI space, see
    ``progression_volumes``). ``visits``: earlier visits for the disease-course model, a table with
    ``age`` and the five volumes in mm3 (the baseline is added when it is not in it).
    """

    age: float
    sex: str
    diagnosis: str
    volumes: dict | None = None
    visits: pd.DataFrame | None = None
    subject_id: str = "subject"

    def __post_init__(self):
        encode_age(self.age, "baseline age")
        self.diagnosis = normalise_diagnosis(self.diagnosis)
        # The sex letter is checked by encode_context; check it now for an early, clear error.
        encode_context(self.age, self.sex, self.diagnosis, [0.5] * len(REGIONS))

    def visit_table(self) -> pd.DataFrame:
        """Visits (age + volumes in mm3), sorted by age, including the baseline."""
        rows = []
        if self.visits is not None:
            missing = [c for c in ("age",) + REGIONS if c not in self.visits.columns]
            if missing:
                raise ValueError(f"visits of {self.subject_id} lack column(s) {', '.join(missing)}")
            rows.append(self.visits[["age", *REGIONS]].astype(float))
        if self.volumes is not None:
            baseline = {"age": float(self.age), **{r: float(self.volumes[r]) for r in REGIONS}}
            rows.append(pd.DataFrame([baseline]))
        if not rows:
            raise ValueError(f"{self.subject_id}: give the baseline regional volumes or the visits")
        table = pd.concat(rows, ignore_index=True).drop_duplicates("age", keep="last")
        if table[list(REGIONS)].isna().any().any():
            raise ValueError(f"visits of {self.subject_id} have missing volumes")
        return table.sort_values("age").reset_index(drop=True)


@dataclass
class ForecastResult:
    """Predictions at several target ages on the model grid (MNI152), with their uncertainty."""

    target_ages: np.ndarray
    baseline_age: float
    images: np.ndarray            # (k, *grid) predicted T1w, BrLP's [0, 1] scale
    uncertainty: np.ndarray       # (k, *grid) voxel SD of the m decoded samples
    baseline: np.ndarray          # (*grid) the baseline on the same grid
    brain_mask: np.ndarray        # (*grid) bool
    affine: np.ndarray            # voxel -> MNI world of the grid
    global_uncertainty: np.ndarray  # (k,) mean voxel SD in the brain
    latent_sd: np.ndarray         # (k,) mean SD of the m latents
    volumes: pd.DataFrame         # target_age, REGIONS (mm3), source
    settings: dict = field(default_factory=dict)
    preprocessed: object = None   # PreprocessedT1, for the native-space outputs

    @property
    def difference(self) -> np.ndarray:
        """Predicted minus baseline intensity, per target age."""
        return self.images - self.baseline[None]

    def native(self, index: int, what: str = "images") -> nib.Nifti1Image:
        """One prediction (or uncertainty/difference map) resampled onto the subject's scan grid."""
        from .progression_preproc import to_native

        if self.preprocessed is None:
            raise ValueError("no preprocessing record: the native-space map needs the PreprocessedT1 of the baseline")
        volume = getattr(self, what)[index]
        return to_native(nib.Nifti1Image(np.asarray(volume, np.float32), self.affine), self.preprocessed)

    def save(self, folder, native: bool = True, plot: bool = True) -> Path:
        """Write the forecast folder (layout in docs/progression.md) all at once."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            self._write(staging, native=native and self.preprocessed is not None, plot=plot)
            replace_folder(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return folder

    def _write(self, out: Path, native: bool, plot: bool) -> None:
        files = {"baseline": "baseline_mni.nii.gz", "volumes": "volumes.csv", "brain_mask": "brain_mask_mni.nii.gz",
                 "predicted": {}, "uncertainty": {}, "difference": {}}
        self._nifti(self.baseline, out / files["baseline"])
        self._nifti(self.brain_mask.astype(np.uint8), out / files["brain_mask"])
        if native:
            files["native"] = {}
        difference = self.difference
        for i, age in enumerate(self.target_ages):
            key = f"{age:.1f}"
            for kind, volume in (("predicted", self.images[i]), ("uncertainty", self.uncertainty[i]),
                                 ("difference", difference[i])):
                files[kind][key] = f"{kind}_{key}.nii.gz"
                self._nifti(volume, out / files[kind][key])
            if native:
                files["native"][key] = f"predicted_{key}_native.nii.gz"
                nib.save(self.native(i), out / files["native"][key])
        self.volumes.to_csv(out / files["volumes"], index=False)
        if plot:
            from .progression_plot import plot_volume_trajectories

            files["plot"] = "volumes.png"
            observed = self.settings.get("observed_volumes")
            plot_volume_trajectories(self.volumes, observed=pd.DataFrame(observed) if observed else None,
                                     out_path=out / files["plot"])
        record = {
            "format_version": FORMAT_VERSION,
            "target_ages": [float(a) for a in self.target_ages],
            "baseline_age": float(self.baseline_age),
            "global_uncertainty": [float(u) for u in self.global_uncertainty],
            "latent_sd": [float(u) for u in self.latent_sd],
            "files": files,
            **{k: v for k, v in self.settings.items() if k != "observed_volumes"},
        }
        (out / "forecast.json").write_text(json.dumps(record, indent=2, default=_json_default) + "\n")

    def _nifti(self, volume, path) -> None:
        img = nib.Nifti1Image(np.asarray(volume), self.affine)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, path)


class BrainForecaster:
    """BrLP forecasting with Latent Average Stabilisation and uncertainty.

    Parameters
    ----------
    networks : BrLPNetworks
        Autoencoder, UNet and ControlNet with their configuration.
    dcm : DiseaseCourseModel or dict of LeaspyV1Logistic, optional
        The auxiliary disease-course model (``progression_dcm``). Without it (and without
        ``regression``), ``predict`` needs the target volumes.
    regression : RegressionCourse, optional
        The fallback for subjects with a single visit.
    m, ddim_steps : int, optional
        LAS samples per target age and DDIM steps (default: the configuration's).
    uncertainty : bool
        Decode every LAS sample for the voxel SD map (``m - 1`` more decodes per target age).
    seed : int
        Seed of the chains' initial noise.
    batch_size : int, optional
        LAS chains run together (default: all); lower it to bound memory.
    amp_dtype : torch.dtype, optional
        Mixed precision for the networks (e.g. ``torch.float16`` on CUDA).
    """

    def __init__(self, networks: BrLPNetworks, dcm=None, regression=None, m: int | None = None,
                 ddim_steps: int | None = None, uncertainty: bool = True, seed: int = 0,
                 batch_size: int | None = None, amp_dtype=None):
        self.networks = networks
        self.dcm = dcm
        self.regression = regression
        self.m = int(m or networks.config.las_m)
        self.ddim_steps = int(ddim_steps or networks.config.ddim_steps)
        self.uncertainty = uncertainty
        self.seed = seed
        self.batch_size = batch_size
        self.amp_dtype = amp_dtype
        if self.m < 1 or self.ddim_steps < 1:
            raise ValueError(f"m and ddim_steps must be at least 1 (got m={self.m}, ddim_steps={self.ddim_steps})")

    @property
    def config(self):
        return self.networks.config

    def target_volumes(self, subject: Subject, target_ages) -> pd.DataFrame:
        """Normalised volumes at the target ages from the disease-course model (with ``source``)."""
        from .progression_dcm import predict_volumes

        if self.dcm is None and self.regression is None:
            raise ValueError(
                "no disease-course model: load one (BrLP's dcm_*.json or a fitted model) or give the "
                "target volumes (target_volumes=...)"
            )
        visits = normalise_volumes(subject.visit_table(), self.config.minmax_params)
        return predict_volumes(visits, target_ages, subject.diagnosis, dcm=self.dcm, regression=self.regression,
                               median_corrections=self.config.median_corrections or None)

    def predict(self, baseline, subject: Subject, target_ages, target_volumes=None, progress=None) -> ForecastResult:
        """Forecast the T1w MRI at each of ``target_ages``.

        Parameters
        ----------
        baseline : PreprocessedT1
            The baseline scan after ``progression_preproc.preprocess_t1``.
        subject : Subject
        target_ages : sequence of float
            Ages (years) not before the baseline age.
        target_volumes : DataFrame, optional
            Normalised volumes per target age (rows in ``target_ages`` order, ``REGIONS`` columns)
            instead of the disease-course model's.
        progress : callable, optional
            ``progress(fraction, message)``; raising ``neuroatrophy.parallel.Cancelled`` stops.
        """
        from .progression_sampling import decode_las, sample_latents

        ages = _check_target_ages(target_ages, subject.age)
        report = progress or (lambda fraction, message: None)
        report(0.0, "disease-course model: regional volumes at the target ages")
        volumes = self._volumes(subject, ages, target_volumes)
        contexts = np.stack([encode_context(age, subject.sex, subject.diagnosis, volumes.loc[i, list(REGIONS)])
                             for i, age in enumerate(ages)])

        image, mask, affine = model_grid(baseline, self.config.image_shape)
        device = self.networks.device
        report(0.02, "encoding the baseline")
        with torch.inference_mode():
            x = torch.from_numpy(image)[None, None].to(device)
            latent = self.networks.autoencoder.encode(x)[0][0].float()
        latents = sample_latents(
            self.networks.unet, self.networks.controlnet, latent, subject.age, contexts,
            m=self.m, num_inference_steps=self.ddim_steps, scheduler_cfg=self.config.scheduler,
            scale_factor=self.config.scale_factor, latent_shape_ae=self.config.latent_shape_ae,
            latent_shape_dm=self.config.latent_shape_dm, seed=self.seed, batch_size=self.batch_size,
            amp_dtype=self.amp_dtype, progress=scaled_progress(progress, 0.05, 0.8),
        )
        decoded = decode_las(self.networks.autoencoder, latents, uncertainty=self.uncertainty, mask=mask,
                             progress=scaled_progress(progress, 0.8, 0.98))
        images = np.stack([postprocess(img, mask) for img in decoded.mean_images])
        uncertainty = decoded.sd_maps if decoded.sd_maps is not None else np.zeros_like(images)
        uncertainty = np.where(mask[None], uncertainty, 0).astype(np.float32)
        report(1.0, "forecast done")
        return ForecastResult(
            target_ages=ages, baseline_age=float(subject.age), images=images, uncertainty=uncertainty,
            baseline=np.where(mask, image, 0).astype(np.float32), brain_mask=mask, affine=affine,
            global_uncertainty=np.asarray(decoded.global_uncertainty if decoded.global_uncertainty is not None
                                          else np.zeros(len(ages)), float),
            latent_sd=np.asarray(decoded.latent_sd, float),
            volumes=self._volume_table(volumes, ages),
            settings=self._settings(subject),
            preprocessed=baseline if hasattr(baseline, "native_to_mni") else None,
        )

    def _volumes(self, subject, ages, target_volumes) -> pd.DataFrame:
        if target_volumes is None:
            table = self.target_volumes(subject, ages).reset_index(drop=True)
        else:
            table = pd.DataFrame(target_volumes).reset_index(drop=True)
            missing = [r for r in REGIONS if r not in table.columns]
            if missing or len(table) != len(ages):
                raise ValueError(f"target_volumes needs one row per target age ({len(ages)}) and the columns "
                                 f"{', '.join(REGIONS)}")
            table = table.copy()
            table["source"] = table.get("source", "given")
        return table

    def _volume_table(self, normalised: pd.DataFrame, ages) -> pd.DataFrame:
        mm3 = denormalise_volumes(normalised[list(REGIONS)].astype(float), self.config.minmax_params)
        out = pd.concat([pd.Series(ages, name="target_age"), mm3.reset_index(drop=True)], axis=1)
        out["source"] = normalised["source"].to_numpy() if "source" in normalised else "given"
        return out

    def _settings(self, subject: Subject) -> dict:
        import monai

        observed = None
        try:
            observed = subject.visit_table().to_dict(orient="list")
        except ValueError:
            pass
        return {
            "subject_id": subject.subject_id, "sex": subject.sex, "diagnosis": subject.diagnosis,
            "m": self.m, "ddim_steps": self.ddim_steps, "seed": self.seed, "uncertainty": self.uncertainty,
            "config": self.config.name, "scale_factor": self.config.scale_factor,
            "versions": {"torch": torch.__version__, "monai": monai.__version__},
            "observed_volumes": observed,
        }


def _check_target_ages(target_ages, baseline_age) -> np.ndarray:
    ages = np.atleast_1d(np.asarray(target_ages, dtype=float))
    if ages.size == 0:
        raise ValueError("give at least one target age")
    for age in ages:
        encode_age(age, "target age")
        if age < baseline_age:
            raise ValueError(f"target age {age:g} is before the baseline age {baseline_age:g}; BrLP forecasts forward")
    if len(np.unique(ages)) != len(ages):
        raise ValueError("target ages must be distinct")
    return np.sort(ages)


def model_grid(baseline, image_shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The baseline image, brain mask and affine on the networks' grid.

    ``baseline`` is a ``PreprocessedT1`` or ``(image, brain_mask, affine)``. When the network grid
    is coarser (a small configuration), the same field of view is resampled onto it.
    """
    if hasattr(baseline, "image"):
        image, mask, affine = baseline.image, baseline.brain_mask, baseline.affine
    else:
        image, mask, affine = baseline
    image = np.asarray(image, np.float32)
    mask = np.asarray(mask, bool)
    affine = np.asarray(affine, float)
    shape = tuple(int(s) for s in image_shape)
    if image.shape == shape:
        return image, mask, affine
    zoom = np.array(image.shape) / np.array(shape)
    # voxel centres of the coarse grid in the fine grid's index space
    offset = (zoom - 1) / 2
    coords = np.indices(shape, dtype=np.float32).reshape(3, -1) * zoom[:, None] + offset[:, None]
    coarse = ndimage.map_coordinates(image, coords, order=1, mode="nearest").reshape(shape)
    coarse_mask = ndimage.map_coordinates(mask.astype(np.float32), coords, order=1, mode="nearest").reshape(shape) > 0.5
    scale = np.diag(list(zoom) + [1.0])
    scale[:3, 3] = offset
    return coarse.astype(np.float32), coarse_mask, affine @ scale


def postprocess(image, mask) -> np.ndarray:
    """BrLP's output step: clip to the 5th-99.5th percentile of the volume, then mask the brain."""
    lo, hi = np.percentile(image, PERCENTILES)
    return np.where(mask, np.clip(image, lo, hi), 0).astype(np.float32)


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
