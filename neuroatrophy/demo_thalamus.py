"""The demo's thalamus step: a real scan and a small synthetic cohort, evaluated like a method study.

1. **Colin27** (real full-head T1 from Debian's mricron-data): segmented and compared with the
   AAL thalamus on the same grid.
2. **Synthetic cohort** (held-out generator draws, never used in training): per subject one
   deformed label map rendered as a T1w and a FLAIR scan, its exact thalamus labels as the
   reference, and an atlas-based mask (the MNI atlas thalamus carried onto the scan by the
   affine registration: what a registration-only method gives). The cohort mode segments every
   subject from both scans (majority-vote ensemble, with the single-contrast members kept) and
   evaluates all methods against the reference: metrics, agreement, Bland-Altman plots.
3. **Clinical association**: a simulated score that depends on the true thalamic volume
   (standardised effect -0.6) plus age; each method's volumes are tested against it, showing how
   segmentation error weakens the association.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

__all__ = ["run_thalamus_demo"]

DEMO = 4  # random-stream purpose key of the demo cohort (training uses 1, validation 2, test 3)
TRUE_BETA = -0.6


def _atlas_mask(image, registration) -> nib.Nifti1Image:
    """The MNI atlas thalamus carried onto the scan through its registration (nearest label)."""
    from scipy import ndimage

    from .thalamus_preproc import box_to_native
    from .thalamus_seg import _combine
    from .thalamus_synth import THALAMUS_BOX, box_affine, source_label_map

    atlas = source_label_map()
    to_atlas = np.linalg.inv(atlas.affine) @ box_affine(THALAMUS_BOX)
    grid = np.indices(THALAMUS_BOX["shape"]).reshape(3, -1)
    labels = ndimage.map_coordinates(np.asarray(atlas.dataobj), to_atlas[:3, :3] @ grid + to_atlas[:3, 3:4],
                                     order=0).reshape(THALAMUS_BOX["shape"])
    prob = np.stack([(labels != 10) & (labels != 49), labels == 10, labels == 49]).astype(np.float32)
    return _combine({"atlas": box_to_native(prob, registration.template_to_scan, image)}, image, "majority").labels


def _synthetic_subject(index: int, seed: int):
    from .thalamus_synth import box_affine
    from .thalamus_validation import HEAD_BOX, _head_synth, reference_image

    synth = _head_synth()
    rng = np.random.default_rng(np.random.SeedSequence([DEMO, seed, index]))
    labels = synth.sample_labels(rng)
    affine = box_affine(HEAD_BOX)
    scans = {}
    for contrast in ("t1", "flair"):
        image, target = synth.render(rng, labels, contrast, lesions=True)
        scans[contrast] = nib.Nifti1Image(image, affine)
    return scans, reference_image(target, affine)


def run_thalamus_demo(out_dir, n_subjects: int = 6, seed: int = 0, progress=None, segmenter=None) -> dict:
    """Run the thalamus demo into ``out_dir`` (see the module docstring); returns headline numbers."""
    from .parallel import scaled_progress
    from .thalamus_cohort import segment_cohort
    from .thalamus_eval import clinical_association, evaluate_masks
    from .thalamus_preproc import register_to_template
    from .thalamus_seg import ThalamusSegmenter
    from .thalamus_validation import colin27

    if int(n_subjects) != n_subjects or n_subjects < 4:
        raise ValueError(f"n_subjects must be an integer >= 4 (the clinical association adjusts for age), "
                         f"got {n_subjects!r}")
    report = progress or (lambda fraction, message: print(f"[thalamus {100 * fraction:3.0f} %] {message}", flush=True))
    started = time.perf_counter()
    out = Path(out_dir)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    segmenter = segmenter or ThalamusSegmenter()

    report(0.0, "Colin27 (real T1, mricron-data): segmenting and comparing with the AAL thalamus")
    t1, aal = colin27()
    colin = segmenter.segment(t1)
    colin.save(out / "colin27")
    colin_metrics = evaluate_masks({"ThalamusSeg": colin.labels}, aal, subject="Colin27")
    colin_metrics.to_csv(out / "colin27" / "metrics_vs_aal.csv", index=False)

    rows, clinical = [], []
    rng = np.random.default_rng([seed, 99])
    for i in range(n_subjects):
        report(0.1 + 0.3 * i / n_subjects, f"synthetic subject {i + 1}/{n_subjects}: T1w, FLAIR, reference, atlas mask")
        scans, reference = _synthetic_subject(i, seed)
        name = f"sub-{i + 1:02d}"
        paths = {}
        for contrast, img in scans.items():
            paths[contrast] = data / f"{name}_{contrast}.nii.gz"
            nib.save(img, str(paths[contrast]))
        nib.save(reference, str(data / f"{name}_reference.nii.gz"))
        nib.save(_atlas_mask(scans["t1"], register_to_template(scans["t1"])), str(data / f"{name}_atlas.nii.gz"))
        rows.append({"subject": name, "t1w": f"data/{name}_t1.nii.gz", "flair": f"data/{name}_flair.nii.gz",
                     "reference": f"data/{name}_reference.nii.gz", "mask:Atlas": f"data/{name}_atlas.nii.gz"})
        clinical.append({"subject": name, "age": rng.uniform(25, 65), "sex": rng.choice(["F", "M"]),
                         "true_volume": float(np.count_nonzero(np.asarray(reference.dataobj)))})
    table_path = out / "cohort.csv"
    pd.DataFrame(rows).to_csv(table_path, index=False)

    report(0.4, "cohort mode: segmenting every subject from T1w + FLAIR and evaluating all methods")
    segment_cohort(table_path, out / "cohort", segmenter, progress=scaled_progress(report, 0.4, 0.9))

    report(0.9, "clinical association with a simulated score")
    clin = pd.DataFrame(clinical)
    z = (clin["true_volume"] - clin["true_volume"].mean()) / clin["true_volume"].std()
    clin["score"] = 3.0 + TRUE_BETA * z + 0.02 * (clin["age"] - 45) + rng.normal(0, 0.5, len(clin))
    volumes = pd.read_csv(out / "cohort" / "volumes.csv").pivot(index="subject", columns="method", values="both")
    clin = clin.merge(volumes, left_on="subject", right_index=True)
    clin.to_csv(out / "clinical.csv", index=False)
    association = clinical_association(clin, "score", ["true_volume", *volumes.columns], covariates=["age"],
                                       outcome="score")
    association.to_csv(out / "association.csv", index=False)

    agreement = pd.read_csv(out / "cohort" / "agreement.csv")
    summary = {
        "synthetic": "cohort images are synthetic (SynthSeg-style draws from the DK aparc+aseg label map); "
                     "Colin27 and AAL are real",
        "colin27_vs_aal": colin_metrics[colin_metrics["structure"] == "both"].iloc[0][
            ["dice", "sensitivity", "precision", "hd95_mm", "volume_diff_pct"]].to_dict(),
        "cohort": agreement[agreement["structure"] == "both"][
            ["method", "n", "dice_mean", "bias", "bias_pct_of_mean", "prop_slope", "prop_p"]].to_dict("records"),
        "association": association[["column", "beta_std", "p_value"]].to_dict("records"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    c = summary["colin27_vs_aal"]
    report(1.0, f"thalamus: Colin27 Dice {c['dice']:.3f} vs AAL (volume {c['volume_diff_pct']:+.0f} %); "
                f"results in {out}")
    return summary
