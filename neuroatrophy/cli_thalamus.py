"""``neuroatrophy thalamus ...``: thalamus segmentation, import, evaluation and training, headless.

Examples
--------
Segment one subject from a T1w and a FLAIR scan (majority-vote ensemble)::

    neuroatrophy thalamus segment --image T1w=t1.nii.gz --image FLAIR=flair.nii.gz --out sub-01

Evaluate our mask and FreeSurfer's against a manual one::

    neuroatrophy thalamus evaluate --reference manual.nii.gz --mask ThalamusSeg=sub-01/thalamus_labels.nii.gz \\
        --mask FreeSurfer=aseg.mgz:freesurfer --out eval-01

Segment and evaluate a cohort from a table of paths (see :mod:`neuroatrophy.thalamus_cohort`)::

    neuroatrophy thalamus cohort --table cohort.csv --out cohort-results
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["add_thalamus_parser"]


def _pairs(values, option: str) -> dict:
    """``NAME=PATH`` arguments -> dict (order kept); the name must be unique."""
    out = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{option} expects NAME=PATH, got {value!r}")
        if name in out:
            raise ValueError(f"{option}: the name {name!r} is given twice")
        out[name] = path
    return out


def _segmenter(args):
    from .thalamus_seg import ThalamusSegmenter

    return ThalamusSegmenter(models=args.model or None, tta=args.tta, device=args.device, threads=args.threads)


def cmd_segment(args, reporter) -> int:
    from .cli import _throttled

    images = _pairs(args.image, "--image")
    if not images:
        raise ValueError("--image: give at least one scan, e.g. --image T1w=t1.nii.gz")
    result = _segmenter(args).segment(images, progress=_throttled(reporter.progress), ensemble=args.ensemble)
    result.save(args.out)
    v = result.volumes
    reporter.info(f"thalamus volume: left {v['left']:.0f} mm³, right {v['right']:.0f} mm³, both {v['both']:.0f} mm³")
    reporter.progress(1.0, f"wrote {args.out}")
    return 0


def cmd_cohort(args, reporter) -> int:
    from .cli import _throttled
    from .thalamus_cohort import read_path_table, segment_cohort

    table = read_path_table(args.table)
    reporter.info(f"{len(table)} session(s) of {table['subject'].nunique()} subject(s)")
    segment_cohort(table, args.out, _segmenter(args), ensemble=args.ensemble, progress=_throttled(reporter.progress))
    return 0


def _mask_arg(value: str):
    """``PATH`` or ``PATH:FORMAT`` -> (path, format)."""
    from .thalamus_masks import MASK_FORMATS

    path, sep, fmt = value.rpartition(":")
    if sep and fmt in MASK_FORMATS:
        return path, fmt
    return value, "auto"


def cmd_evaluate(args, reporter) -> int:
    from .io import atomic_write
    from .thalamus_eval import evaluate_masks
    from .thalamus_masks import load_external_mask

    masks = _pairs(args.mask, "--mask")
    if not masks:
        raise ValueError("--mask: give at least one METHOD=PATH[:FORMAT] to evaluate")
    ref_path, ref_fmt = _mask_arg(args.reference)
    reference = load_external_mask(ref_path, fmt=ref_fmt)
    predictions = {}
    for method, value in masks.items():
        path, fmt = _mask_arg(value)
        predictions[method] = load_external_mask(path, fmt=fmt)
    metrics = evaluate_masks(predictions, reference, subject=args.subject)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "metrics.csv") as tmp:
        metrics.to_csv(tmp, index=False)
    for _, row in metrics[metrics["structure"] == "both"].iterrows():
        reporter.info(f"{row['method']}: Dice {row['dice']:.3f}, sensitivity {row['sensitivity']:.3f}, precision "
                      f"{row['precision']:.3f}, HD95 {row['hd95_mm']:.2f} mm, volume {row['volume_diff_pct']:+.1f} %")
    reporter.progress(1.0, f"wrote {out / 'metrics.csv'}")
    return 0


def cmd_import(args, reporter) -> int:
    from .thalamus_labels import thalamus_volumes
    from .thalamus_masks import load_external_mask, save_mask

    img = load_external_mask(args.input, fmt=args.format, left_label=args.left_label, right_label=args.right_label,
                             side=args.side, reference=args.reference, prior=args.prior)
    save_mask(img, args.out)
    v = thalamus_volumes(img)
    reporter.info(f"left {v['left']:.0f} mm³, right {v['right']:.0f} mm³")
    reporter.progress(1.0, f"wrote {args.out}")
    return 0


def cmd_change(args, reporter) -> int:
    from .cli import _read_table
    from .io import atomic_write
    from .thalamus_eval import annualized_change

    table = _read_table(args.table, "volume table", required=())
    change = annualized_change(table, subject=args.subject_column, time=args.time_column,
                               volume=args.volume_column, method=args.method_column)
    with atomic_write(args.out) as tmp:
        change.to_csv(tmp, index=False)
    reporter.info(f"median {change['pct_per_year'].median():+.2f} %/year over {len(change)} rows")
    reporter.progress(1.0, f"wrote {args.out}")
    return 0


def cmd_associate(args, reporter) -> int:
    from .cli import _column_list, _read_table
    from .io import atomic_write
    from .thalamus_eval import clinical_association

    table = _read_table(args.table, "clinical table", required=())
    result = clinical_association(table, args.score, _column_list(args.volumes, "--volumes"),
                                  covariates=_column_list(args.covariates, "--covariates", allow_empty=True),
                                  outcome=args.outcome)
    with atomic_write(args.out) as tmp:
        result.to_csv(tmp, index=False)
    for _, row in result.iterrows():
        reporter.info(f"{row['column']}: standardised beta {row['beta_std']:+.3f} "
                      f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}], p = {row['p_value']:.2g}, n = {int(row['n'])}")
    reporter.progress(1.0, f"wrote {args.out}")
    return 0


def cmd_train(args, reporter) -> int:
    from .thalamus_train import TrainConfig, train

    config = TrainConfig.from_json(args.config) if args.config else TrainConfig()
    for name in ("iterations", "max_minutes", "seed"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    train(config, args.out, progress=reporter.progress, log=reporter.info)
    reporter.progress(1.0, f"wrote {args.out}")
    return 0


def add_thalamus_parser(sub, common) -> None:
    """Register ``neuroatrophy thalamus <command>`` on the main parser's subparsers."""
    p = common(sub.add_parser("thalamus", help="thalamus segmentation (T1w/FLAIR/R1) and its evaluation"),
               cohort=False)
    tsub = p.add_subparsers(dest="thalamus_command", required=True)

    def segmentation_options(q):
        q.add_argument("--model", action="append", default=None,
                       help="model file (.safetensors with its .json); repeat for a model ensemble "
                            "(default: the shipped weights)")
        q.add_argument("--tta", action="store_true", help="left/right mirror test-time augmentation")
        q.add_argument("--ensemble", choices=["majority", "mean", "staple"], default="majority",
                       help="how several inputs/models are combined (default majority vote)")
        q.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
        q.add_argument("--threads", type=int, default=None, help="CPU threads for the network")

    s = common(tsub.add_parser("segment", help="segment the thalami of one subject"), cohort=False)
    s.add_argument("--image", action="append", required=True, metavar="NAME=PATH",
                   help="a scan (T1w=..., FLAIR=..., R1=...); repeat for several contrasts of the same head")
    s.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    segmentation_options(s)
    s.set_defaults(func=cmd_segment)

    c = common(tsub.add_parser("cohort", help="segment and evaluate a cohort from a table of file paths"),
               cohort=False)
    c.add_argument("--table", required=True,
                   help="CSV/TSV: subject[, session, time], t1w/flair/r1 paths[, reference][, mask:<method>...]")
    c.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    segmentation_options(c)
    c.set_defaults(func=cmd_cohort)

    e = common(tsub.add_parser("evaluate", help="overlap, distance and volume metrics against a reference mask"),
               cohort=False)
    e.add_argument("--reference", required=True, help="reference mask PATH[:FORMAT]")
    e.add_argument("--mask", action="append", required=True, metavar="METHOD=PATH[:FORMAT]",
                   help="a mask to evaluate; repeat for several methods (formats: freesurfer, first, dbsegment, "
                        "aal, binary, labels, ...; default auto)")
    e.add_argument("--subject", default=None, help="subject name for the table")
    e.add_argument("--out", required=True, help="output folder (metrics.csv)")
    e.set_defaults(func=cmd_evaluate)

    i = common(tsub.add_parser("import", help="convert another tool's thalamus mask to 10/49 labels"), cohort=False)
    i.add_argument("--input", required=True, help="the tool's label file (.nii/.nii.gz/.mgz)")
    i.add_argument("--format", default="auto",
                   help="freesurfer, synthseg, fastsurfer, first, dbsegment, mindglide, aal, binary, labels, auto")
    i.add_argument("--left-label", type=int, default=None)
    i.add_argument("--right-label", type=int, default=None)
    i.add_argument("--side", choices=["left", "right"], default=None, help="single-structure files (FIRST)")
    i.add_argument("--reference", default=None, help="image whose grid the mask must share")
    i.add_argument("--prior", default=None, help="thalamus prior to split MindGlide's deep grey matter label")
    i.add_argument("--out", required=True, help="output NIfTI (.nii.gz)")
    i.set_defaults(func=cmd_import)

    g = common(tsub.add_parser("change", help="annualised percentage volume change from 2+ timepoints"),
               cohort=False)
    g.add_argument("--table", required=True, help="CSV: subject, time (years or dates), volume[, method]")
    g.add_argument("--subject-column", default="subject")
    g.add_argument("--time-column", default="time")
    g.add_argument("--volume-column", default="volume")
    g.add_argument("--method-column", default=None)
    g.add_argument("--out", required=True, help="output CSV")
    g.set_defaults(func=cmd_change)

    a = common(tsub.add_parser("associate", help="thalamic volume against a clinical score, per method"),
               cohort=False)
    a.add_argument("--table", required=True, help="CSV with the score, volume columns and covariates")
    a.add_argument("--score", required=True, help="clinical score column (e.g. EDSS)")
    a.add_argument("--volumes", required=True, help="comma-separated volume columns (one per method)")
    a.add_argument("--covariates", default="age,sex,icv", help="comma-separated covariates (default age,sex,icv)")
    a.add_argument("--outcome", choices=["volume", "score"], default="volume",
                   help="regress the volume on the score (default) or the score on the volume")
    a.add_argument("--out", required=True, help="output CSV")
    a.set_defaults(func=cmd_associate)

    t = common(tsub.add_parser("train", help="train a thalamus network on synthetic images"), cohort=False)
    t.add_argument("--config", default=None, help="JSON training configuration (thalamus_train.TrainConfig fields)")
    t.add_argument("--iterations", type=int, default=None)
    t.add_argument("--max-minutes", type=float, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--out", required=True, help="model path (writes .safetensors + .json)")
    t.set_defaults(func=cmd_train)
