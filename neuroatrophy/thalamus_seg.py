"""Thalamus segmentation of raw T1w, FLAIR or R1 scans, singly or as an ensemble.

:class:`ThalamusSegmenter` runs, for every input scan and every model:
registration to MNI and resampling onto the network's box (:mod:`neuroatrophy.thalamus_preproc`),
the network (MONAI sliding window over the box; optional left/right mirror test-time
augmentation), the probabilities back on the first input's grid, labels with the largest
connected component per side. With several inputs (contrasts of the same head) or several
models, the members are combined by majority vote, by the mean of their probabilities, or by
STAPLE, and the fraction of members voting "thalamus" is kept as an uncertainty map.

Examples
--------
>>> seg = ThalamusSegmenter()                                         # doctest: +SKIP
>>> result = seg.segment({"T1w": "t1.nii.gz", "FLAIR": "flair.nii.gz"})  # doctest: +SKIP
>>> result.volumes                                                     # doctest: +SKIP
{'left': 7712.0, 'right': 7598.0, 'both': 15310.0}
>>> result.save("out/")                                                # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from .io import replace_folder, safe_file_stem
from .thalamus_image import input_name, load_image
from .thalamus_labels import LEFT, RIGHT, thalamus_volumes
from .thalamus_net import ThalamusModel, load_model
from .thalamus_preproc import box_to_native, crop_to_box, register_to_template

__all__ = ["ThalamusSegmenter", "ThalamusResult", "ensemble_labels", "largest_component_per_side",
           "ENSEMBLE_METHODS"]

ENSEMBLE_METHODS = ("majority", "mean", "staple")


@dataclass
class ThalamusResult:
    """Segmentation of one subject.

    Attributes
    ----------
    labels : nibabel image
        0 / 10 (left) / 49 (right) on the grid of the first input.
    probability : nibabel image
        float32 probability of thalamus (either side), averaged over ensemble members.
    volumes : dict
        ``left``, ``right``, ``both`` in mm³.
    per_input : dict
        Member name -> its own label image (only with several members).
    vote_fraction : nibabel image or None
        Fraction of members voting thalamus at each voxel (only with several members).
    registrations : dict
        Input name -> :class:`~neuroatrophy.thalamus_preproc.Registration` (template -> scan).
    """

    labels: nib.Nifti1Image
    probability: nib.Nifti1Image
    volumes: dict
    per_input: dict = field(default_factory=dict)
    vote_fraction: nib.Nifti1Image | None = None
    registrations: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def volume_table(self) -> pd.DataFrame:
        """Volumes as a table with columns ``structure, volume_mm3`` (left, right, both)."""
        return pd.DataFrame({"structure": list(self.volumes), "volume_mm3": list(self.volumes.values())})

    def save(self, folder) -> Path:
        """Write the result folder atomically (replacing an existing one).

        Files: ``thalamus_labels.nii.gz``, ``thalamus_probability.nii.gz``, ``volumes.csv``,
        ``settings.json`` (inputs, models, options, registration matrices) and, with several
        members, ``labels_<member>.nii.gz`` and ``vote_fraction.nii.gz``.
        """
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
        tmp.mkdir()
        try:
            nib.save(self.labels, str(tmp / "thalamus_labels.nii.gz"))
            nib.save(self.probability, str(tmp / "thalamus_probability.nii.gz"))
            self.volume_table().to_csv(tmp / "volumes.csv", index=False)
            used: set = set()
            for name, img in self.per_input.items():
                nib.save(img, str(tmp / f"labels_{safe_file_stem(name, used)}.nii.gz"))
            if self.vote_fraction is not None:
                nib.save(self.vote_fraction, str(tmp / "vote_fraction.nii.gz"))
            settings = dict(self.settings)
            settings["registrations"] = {k: {"template_to_scan": np.round(r.template_to_scan, 6).tolist(),
                                             "metric": r.metric} for k, r in self.registrations.items()}
            settings["volumes_mm3"] = self.volumes
            (tmp / "settings.json").write_text(json.dumps(settings, indent=2, default=str) + "\n")
            replace_folder(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder


class ThalamusSegmenter:
    """Segment the left and right thalamus.

    Parameters
    ----------
    models : path, ThalamusModel or list of them, optional
        Model file(s) (``.safetensors`` + ``.json``); default: the weights shipped with the
        library. Several models form an ensemble.
    tta : bool
        Also run the left/right mirrored box and average (its left and right outputs swapped).
    device : str
        ``"cpu"``, ``"cuda"``, ... (``"auto"``: CUDA when available).
    sw_batch_size, overlap : int, float
        MONAI sliding-window settings; the default window is the whole box (one pass).
    roi_size : tuple, optional
        Sliding-window size; default the model's box.
    threads : int, optional
        torch CPU threads (default: torch's own choice).
    threshold : float, optional
        A voxel is thalamus when its thalamus probability (left + right) exceeds this; its side is
        the likelier one. Default: the model file's calibrated ``threshold`` (the mean over an
        ensemble's models), 0.5 for a model without one.
    """

    def __init__(self, models=None, tta: bool = False, device: str = "cpu", sw_batch_size: int = 1,
                 overlap: float = 0.5, roi_size=None, threads: int | None = None, threshold: float | None = None):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        if models is None or isinstance(models, (str, os.PathLike, ThalamusModel)):
            models = [models]
        if len(models) == 0:
            raise ValueError("models: give at least one model file (or None for the shipped weights)")
        self.models = [m if isinstance(m, ThalamusModel) else load_model(m, device=device) for m in models]
        self.tta = bool(tta)
        if threshold is None:
            threshold = float(np.mean([m.threshold for m in self.models]))
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold!r}")
        self.threshold = float(threshold)
        self.sw_batch_size = int(sw_batch_size)
        self.overlap = float(overlap)
        self.roi_size = roi_size
        if threads is not None:
            torch.set_num_threads(int(threads))

    # -- network on the box ------------------------------------------------------------------

    def predict_box(self, box_image: np.ndarray, model: ThalamusModel | None = None) -> np.ndarray:
        """Softmax probabilities (3, X, Y, Z) of one normalised box image."""
        from monai.inferers import SlidingWindowInferer

        model = model or self.models[0]
        roi = tuple(self.roi_size or model.box["shape"])
        inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=self.sw_batch_size, overlap=self.overlap,
                                       mode="gaussian")
        x = torch.from_numpy(np.ascontiguousarray(box_image, dtype=np.float32))[None, None].to(self.device)
        with torch.inference_mode():
            prob = torch.softmax(inferer(x, model.network), dim=1)[0]
            if self.tta:  # mirror left/right (the box is symmetric about x = 0) and swap the sides
                mirrored = torch.softmax(inferer(torch.flip(x, dims=[2]), model.network), dim=1)[0]
                mirrored = torch.flip(mirrored, dims=[1])[[0, 2, 1]]
                prob = 0.5 * (prob + mirrored)
        return prob.cpu().numpy()

    # -- whole scans ---------------------------------------------------------------------------

    def segment(self, images, progress=None, ensemble: str = "majority") -> ThalamusResult:
        """Segment one subject from one scan or several (a dict: contrast name -> path or image).

        Parameters
        ----------
        images : path, nibabel image, or mapping name -> path/image
            Scans of the same head in the same scanner (world) space, e.g. one session: their grids
            may differ (each is registered on its own), but the result is mapped onto the first
            one's grid through world coordinates, so scans from different sessions must be
            co-registered first.
        progress : callable(fraction, message), optional
            Raising :class:`~neuroatrophy.parallel.Cancelled` from it stops the run.
        ensemble : {"majority", "mean", "staple"}
            How several members (inputs × models) are combined.
        """
        if ensemble not in ENSEMBLE_METHODS:
            raise ValueError(f"ensemble must be one of {ENSEMBLE_METHODS}, got {ensemble!r}")
        inputs = _named_inputs(images)
        report = progress or (lambda fraction, message: None)
        reference = inputs[next(iter(inputs))]
        n_steps = len(inputs) * (1 + len(self.models)) + 1
        step = 0
        registrations, member_probs = {}, {}
        for name, img in inputs.items():
            report(step / n_steps, f"registering {name} to the MNI template")
            registrations[name] = register_to_template(img, cancel=lambda: report(step / n_steps, "registering"))
            step += 1
            for m, model in enumerate(self.models):
                report(step / n_steps, f"segmenting {name}" + (f" with model {m + 1}" if len(self.models) > 1 else ""))
                box = crop_to_box(img, registrations[name].template_to_scan, model.box)
                prob = self.predict_box(box, model)
                member = name if len(self.models) == 1 else f"{name}_model{m + 1}"
                member_probs[member] = box_to_native(prob, registrations[name].template_to_scan, reference, model.box)
                step += 1
        report(step / n_steps, "combining" if len(member_probs) > 1 else "labelling")
        result = _combine(member_probs, reference, ensemble, self.threshold)
        result.registrations = registrations
        result.settings = {
            "inputs": {name: input_name(images[name] if isinstance(images, Mapping) else images, name)
                       for name in inputs},
            "models": [str(m.path) if m.path else "in memory" for m in self.models],
            "tta": self.tta, "threshold": self.threshold, "ensemble": ensemble if len(member_probs) > 1 else None,
            "sw_batch_size": self.sw_batch_size, "overlap": self.overlap, "device": self.device,
        }
        _warn_if_implausible(result, inputs)
        report(1.0, "done")
        return result


#: a side smaller than this (mm³) is implausible for an adult thalamus (typically 6,000-11,000)
MIN_PLAUSIBLE_SIDE_MM3 = 3000.0


def _warn_if_implausible(result, inputs) -> None:
    """Warn (naming the inputs) when a side is implausibly small: usually a failed registration."""
    small = [side for side in ("left", "right") if result.volumes[side] < MIN_PLAUSIBLE_SIDE_MM3]
    if small:
        metrics = ", ".join(f"{name}: {reg.metric:.3f}" for name, reg in result.registrations.items())
        warnings.warn(f"thalamus segmentation of {', '.join(inputs)}: the {' and '.join(small)} thalamus is only "
                      f"{', '.join(f'{result.volumes[s]:.0f}' for s in small)} mm³; the registration to MNI has "
                      f"probably failed (final metrics {metrics}); check the input's orientation and field of view")


def _named_inputs(images) -> dict:
    if isinstance(images, Mapping):
        if not images:
            raise ValueError("images: give at least one scan")
        return {str(name): load_image(img, name=f"{name} ({input_name(img)})") for name, img in images.items()}
    return {"image": load_image(images)}


def _common_region(members: dict, shape) -> tuple:
    """The members' probabilities embedded in the union of their regions (background 1 elsewhere)."""
    lo = np.min([[r.start for r in region] for _, region in members.values()], axis=0)
    hi = np.max([[r.stop for r in region] for _, region in members.values()], axis=0)
    union = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    out = {}
    for name, (sub, region) in members.items():
        full = np.zeros((3,) + tuple(int(b - a) for a, b in zip(lo, hi)), dtype=np.float32)
        full[0] = 1.0
        inner = tuple(slice(r.start - int(a), r.stop - int(a)) for r, a in zip(region, lo))
        full[(slice(None),) + inner] = sub
        out[name] = full
    return out, union


def _labels_from_probabilities(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Thalamus where P(left) + P(right) > threshold, on the likelier side; largest component per side."""
    thalamus = (1.0 - prob[0]) > threshold
    labels = np.zeros(thalamus.shape, dtype=np.int16)
    left = prob[1] >= prob[2]
    labels[thalamus & left] = LEFT
    labels[thalamus & ~left] = RIGHT
    return largest_component_per_side(labels)


def largest_component_per_side(labels: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component of each side (10 and 49)."""
    out = np.zeros_like(labels)
    structure = np.ones((3, 3, 3), dtype=bool)
    for side in (LEFT, RIGHT):
        components, n = ndimage.label(labels == side, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(components.ravel())[1:]
        out[components == 1 + int(np.argmax(sizes))] = side
    return out


def _combine(member_probs: dict, reference, method: str, threshold: float = 0.5) -> ThalamusResult:
    """Labels and probability on the reference grid; the work is done in the members' region only."""
    members, region = _common_region(member_probs, reference.shape[:3])
    shape, affine = tuple(reference.shape[:3]), reference.affine

    def on_grid(values, dtype):
        full = np.zeros(shape, dtype=dtype)
        full[region] = values
        return nib.Nifti1Image(full, affine)

    mean_prob = np.mean(list(members.values()), axis=0)
    probability = on_grid(1.0 - mean_prob[0], np.float32)
    if len(members) == 1:
        labels = on_grid(_labels_from_probabilities(mean_prob, threshold), np.int16)
        return ThalamusResult(labels=labels, probability=probability, volumes=thalamus_volumes(labels))
    member_labels = {name: _labels_from_probabilities(p, threshold) for name, p in members.items()}
    if method == "mean":
        labels = _labels_from_probabilities(mean_prob, threshold)
        vote = np.mean([m > 0 for m in member_labels.values()], axis=0)
    else:
        labels, vote = _ensemble_arrays(list(member_labels.values()), method, tie_break=mean_prob)
    labels = on_grid(labels, np.int16)
    return ThalamusResult(labels=labels, probability=probability, volumes=thalamus_volumes(labels),
                          per_input={name: on_grid(m, np.int16) for name, m in member_labels.items()},
                          vote_fraction=on_grid(vote, np.float32))


def ensemble_labels(label_images, method: str = "majority", tie_break: np.ndarray | None = None):
    """Combine thalamus label maps (0/10/49, same grid) into one.

    Parameters
    ----------
    label_images : list of nibabel images
    method : {"majority", "staple"}
        ``majority``: per-voxel most frequent label; ties go to the larger mean probability
        (``tie_break``, (3, ...) background/left/right) or to background. ``staple``: SimpleITK's
        multi-label STAPLE (Warfield et al. 2004), which weights each member by its estimated
        performance.
    tie_break : array, optional

    Returns
    -------
    labels, vote_fraction : nibabel images (the second: fraction of members labelling thalamus)
    """
    if len(label_images) < 2:
        raise ValueError("ensemble_labels needs at least two label maps")
    first = label_images[0]
    for i, img in enumerate(label_images[1:], start=1):
        if tuple(img.shape) != tuple(first.shape) or not np.allclose(img.affine, first.affine, atol=1e-3):
            raise ValueError(f"label map {i} ({input_name(img, f'member {i}')}) is not on the grid of the first one")
    labels, vote = _ensemble_arrays([np.asarray(img.dataobj) for img in label_images], method, tie_break)
    return nib.Nifti1Image(labels, first.affine), nib.Nifti1Image(vote.astype(np.float32), first.affine)


def _ensemble_arrays(label_arrays, method: str, tie_break=None):
    stack = np.stack([np.asarray(a).astype(np.int16) for a in label_arrays])
    vote_fraction = (stack > 0).mean(axis=0).astype(np.float32)
    if method == "majority":
        counts = np.stack([(stack == value).sum(axis=0) for value in (0, LEFT, RIGHT)]).astype(np.float32)
        if tie_break is not None:
            counts += 1e-3 * tie_break  # breaks ties only: a vote outweighs any probability
        labels = np.array([0, LEFT, RIGHT], dtype=np.int16)[counts.argmax(axis=0)]
    elif method == "staple":
        labels = _staple(stack)
    else:
        raise ValueError(f"method must be 'majority' or 'staple', got {method!r}")
    return largest_component_per_side(labels), vote_fraction


def _staple(stack: np.ndarray) -> np.ndarray:
    import SimpleITK as sitk

    compact = np.zeros_like(stack, dtype=np.uint8)
    compact[stack == LEFT] = 1
    compact[stack == RIGHT] = 2
    members = [sitk.GetImageFromArray(np.ascontiguousarray(m)) for m in compact]
    staple = sitk.MultiLabelSTAPLEImageFilter()
    staple.SetLabelForUndecidedPixels(0)
    out = sitk.GetArrayFromImage(staple.Execute(members))
    return np.array([0, LEFT, RIGHT], dtype=np.int16)[np.clip(out, 0, 2)]
