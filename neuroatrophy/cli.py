"""The ``neuroatrophy`` command: every analysis, headless.

Examples
--------
Fit a normative model on the controls of a cohort table (20 % held out to report fit quality)::

    neuroatrophy fit --cohort cohort.csv --subjects-dir subjects --out model.npz

Map the patients' atrophy::

    neuroatrophy map --model model.npz --cohort cohort.csv --subjects-dir subjects --out maps

With ``--progress json`` every command prints one JSON object per line on stdout,
``{"progress": 0.42, "message": "..."}``, and on failure ``{"error": "..."}`` with
exit code 2: this is how Slicer runs long jobs in a subprocess (:mod:`neuroatrophy.jobs`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__

__all__ = ["main", "build_parser"]


class _Reporter:
    """Progress and messages, as text or as JSON lines (one object per line, never interleaved)."""

    def __init__(self, mode: str):
        self.mode = mode
        self._lock = threading.Lock()

    def _emit(self, text: str, stream=None) -> None:
        stream = stream or sys.stdout
        with self._lock:
            stream.write(text + "\n")
            stream.flush()

    def progress(self, fraction: float, message: str) -> None:
        if self.mode == "json":
            self._emit(json.dumps({"progress": round(float(fraction), 4), "message": message}))
        elif self.mode == "text":
            self._emit(f"[{100 * fraction:5.1f} %] {message}")

    def info(self, message: str) -> None:
        if self.mode == "json":
            self._emit(json.dumps({"message": message}))
        elif self.mode != "none":
            self._emit(message)

    def error(self, message: str) -> None:
        if self.mode == "json":
            self._emit(json.dumps({"error": message}))
        self._emit(f"neuroatrophy: error: {message}", sys.stderr)


# ---------------------------------------------------------------- commands
def _load_cohort(args, reporter, part: str | None):
    from .cohort import read_cohort, split_groups
    from .io import load_cohort_surface_data

    cohort = read_cohort(args.cohort)
    if part is not None and "group" in cohort.columns:
        controls, patients = split_groups(cohort)
        cohort = controls if part == "controls" else patients
    if getattr(args, "subject", None):
        wanted = [str(s) for s in args.subject]
        missing = sorted(set(wanted) - set(cohort["subject_id"]))
        if missing:
            raise ValueError(f"subject(s) {missing} not found in cohort table {args.cohort}")
        cohort = cohort[cohort["subject_id"].isin(wanted)]
    if cohort.empty:
        raise ValueError(f"cohort table {args.cohort} has no {part or 'subjects'} to process")
    reporter.info(f"reading {args.measure} of {len(cohort)} subjects")
    Y = load_cohort_surface_data(cohort, args.subjects_dir, template=args.template, measure=args.measure)
    return cohort.reset_index(drop=True), Y


def cmd_fit(args, reporter) -> int:
    from .parallel import scaled_progress
    from .thickness_model import CorticalThicknessModel

    _check_output_folder(args.out)
    cohort, Y = _load_cohort(args, reporter, "controls")
    train, test = _holdout_split(len(cohort), args.holdout, args.seed)
    model = CorticalThicknessModel(heteroskedastic=args.heteroskedastic, warp=args.warp, n_knots=args.n_knots,
                                   template=args.template, n_jobs=args.n_jobs)
    reporter.info(f"fitting on {len(train)} controls, {len(test)} held out")
    model.fit(Y[train], cohort.iloc[train], progress=scaled_progress(reporter.progress, 0.0, 0.95))
    quality = model.evaluate(Y[test], cohort.iloc[test]) if len(test) else None
    model.save(args.out)   # the model first: fit-quality files never stand without their model
    if quality is not None:
        _write_quality(args.out, *quality, len(train), len(test))
        reporter.info(_calibration_text(quality[1]))
    reporter.progress(1.0, f"saved model to {args.out}")
    return 0


def cmd_evaluate(args, reporter) -> int:
    from .thickness_model import CorticalThicknessModel

    model = CorticalThicknessModel.load(args.model)
    cohort, Y = _load_cohort(args, reporter, "controls")
    table, calibration = model.evaluate(Y, cohort)
    _write_quality(args.out, table, calibration, model.vertex.n_train_, len(cohort), suffix="")
    reporter.info(_calibration_text(calibration))
    return 0


def cmd_map(args, reporter) -> int:
    from .io import atomic_write, write_surface_data
    from .thickness_model import CorticalThicknessModel

    model = CorticalThicknessModel.load(args.model)
    cohort, Y = _load_cohort(args, reporter, None if args.subject else "patients")
    reporter.progress(0.3, f"scoring {len(cohort)} subjects")
    maps = model.patient_maps(Y, cohort, threshold=args.threshold, min_cluster_size=args.min_cluster_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_left = Y.shape[1] // 2
    rows = []
    for k, pm in enumerate(maps):
        folder = out / pm.subject_id
        folder.mkdir(exist_ok=True)
        for hemi, part in (("lh", slice(0, n_left)), ("rh", slice(n_left, None))):
            write_surface_data(folder / f"{hemi}.z.{args.template}.mgh", np.nan_to_num(pm.z[part]))
            write_surface_data(folder / f"{hemi}.atrophic.{args.template}.mgh",
                               pm.atrophy.cluster_labels[part].astype(np.float32))
        with atomic_write(folder / "regions.csv") as tmp:
            pm.regions.to_csv(tmp, index=False)
        rows.append(_summary_row(pm, model))
        reporter.progress(0.3 + 0.7 * (k + 1) / len(maps), f"mapped {pm.subject_id}")
    with atomic_write(out / "summary.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    reporter.info(f"wrote {len(maps)} atrophy maps to {out}")
    return 0


def cmd_adapt(args, reporter) -> int:
    from .thickness_model import CorticalThicknessModel

    _check_output_folder(args.out)
    model = CorticalThicknessModel.load(args.model)
    cohort, Y = _load_cohort(args, reporter, "controls")
    adapted = model.adapt(Y, cohort)
    adapted.save(args.out)
    reporter.info(f"adapted to site(s) {sorted(set(cohort['site']))} with {len(cohort)} controls; saved {args.out}")
    return 0


def cmd_info(args, reporter) -> int:
    from .modelio import load_model_file

    _, metadata = load_model_file(args.model)
    vertex = metadata.get("vertex", metadata)
    design = vertex.get("design", {})
    summary = {
        "model_type": metadata.get("model_type"),
        "format_version": metadata.get("format_version"),
        "template": metadata.get("template"),
        "n_train": vertex.get("n_train"),
        "sites": design.get("sites", []) + [s["site"] for s in vertex.get("adapted_sites", [])],
        "age_range": [design.get("age_min"), design.get("age_max")],
        "params": metadata.get("params"),
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_demo(args, reporter) -> int:
    from .demo import run_demo
    from .parallel import scaled_progress

    # The subtypes step (its own synthetic cohort, out/subtypes/) and the thalamus step
    # (Colin27 and a synthetic cohort, out/thalamus/) take the last part of the progress bar.
    subtypes_share = 0.0 if args.skip_subtypes else 0.15
    thalamus_share = 0.0 if args.skip_thalamus else 0.2
    progression_share = 0.0 if args.skip_progression else 0.1
    first = 1.0 - subtypes_share - thalamus_share - progression_share
    result = run_demo(args.out, n_controls=args.n_controls, n_patients=args.n_patients, seed=args.seed,
                      progress=scaled_progress(reporter.progress, 0.0, first))
    if not args.skip_subtypes:
        from .demo_subtypes import run_subtypes_demo

        subtypes = run_subtypes_demo(Path(args.out) / "subtypes", seed=args.seed,
                                     progress=scaled_progress(reporter.progress, first, first + subtypes_share))
        result["subtypes"] = {"recovery": subtypes["recovery"], "paths": subtypes["paths"],
                              "seconds": subtypes["seconds"]}
    if not args.skip_thalamus:
        from .demo_thalamus import run_thalamus_demo

        start = first + subtypes_share
        result["thalamus"] = run_thalamus_demo(Path(args.out) / "thalamus", seed=args.seed,
                                               progress=scaled_progress(reporter.progress, start, start + thalamus_share))
    if not args.skip_progression:
        from .demo_progression import run_progression_demo

        result["progression"] = run_progression_demo(
            Path(args.out) / "progression", seed=args.seed,
            progress=scaled_progress(reporter.progress, 1.0 - progression_share, 1.0))
    reporter.info(json.dumps(_jsonable(result), indent=2))
    return 0


def cmd_connectome_build(args, reporter) -> int:
    from .connectome import build_connectome

    bandpass = None if args.bandpass is None else tuple(None if b <= 0 else b for b in args.bandpass)
    store = build_connectome(args.out, args.runs, space=args.space, dtype=args.dtype,
                             global_signal=args.global_signal, bandpass=bandpass, tr=args.tr,
                             confound_columns=args.confound_columns, mask_img=args.mask,
                             base_dir=Path(args.runs).resolve().parent, progress=reporter.progress)
    reporter.info(json.dumps(_jsonable(store.info()), indent=2))
    return 0


def cmd_connectome_info(args, reporter) -> int:
    from .connectome import ConnectomeStore

    info = ConnectomeStore.open(args.connectome).info()
    info["subjects"] = ConnectomeStore.open(args.connectome).subject_ids
    print(json.dumps(_jsonable(info), indent=2))
    return 0


def cmd_network(args, reporter) -> int:
    from .connectome import ConnectomeStore
    from .network import atrophy_seeds
    from .network_analysis import analyse_networks
    from .parallel import scaled_progress
    from .thickness_model import CorticalThicknessModel

    store = ConnectomeStore.open(args.connectome, mmap=True)
    model = CorticalThicknessModel.load(args.model)
    cohort, Y = _load_cohort(args, reporter, None if args.subject else "patients")
    reporter.progress(0.02, f"atrophy maps of {len(cohort)} patients")
    maps = model.patient_maps(Y, cohort, threshold=args.threshold, min_cluster_size=args.min_cluster_size)
    seeds, names = atrophy_seeds(maps, weighting=args.weighting)
    targets = _targets_from_args(args)
    reporter.info(f"mapping {len(names)} atrophy networks in {store!r}")
    analysis = analyse_networks(
        store, seeds, names, targets=targets, threshold=_t_threshold_arg(args.t_threshold),
        n_null=args.n_null, null_method=args.null_method, convergence_fraction=args.convergence,
        engine=args.engine, device=args.device, n_jobs=args.n_jobs, seed=args.seed,
        progress=scaled_progress(reporter.progress, 0.05, 0.97),
    )
    analysis.options.update({"atrophy_threshold": args.threshold, "min_cluster_size": args.min_cluster_size,
                             "weighting": args.weighting, "model": str(args.model)})
    analysis.save(args.out, grid=store.mask())
    reporter.progress(1.0, f"wrote {len(names)} atrophy networks to {args.out}")
    return 0


def _t_threshold_arg(value):
    if value == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--t-threshold must be 'auto' or a number, got {value!r}") from None


def _targets_from_args(args):
    from .targets import get_target, standard_targets, targets_from_table

    if not args.targets:
        return standard_targets()
    if args.targets == ["none"]:
        return []
    chosen = []
    for item in args.targets:
        if item == "standard":
            chosen.extend(standard_targets())
        elif Path(item).suffix.lower() in (".csv", ".tsv", ".txt"):
            chosen.extend(targets_from_table(item))
        else:
            chosen.append(get_target(item))
    names = [t.name for t in chosen]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"--targets: target name(s) {duplicated} given more than once")
    return chosen


def cmd_targets(args, reporter) -> int:
    from .io import atomic_write
    from .targets import standard_targets, targets_table

    table = targets_table(standard_targets())
    if args.out:
        with atomic_write(args.out) as tmp:
            table.to_csv(tmp, index=False)
        reporter.info(f"wrote {len(table)} standard targets to {args.out}")
    else:
        with pd.option_context("display.max_colwidth", 60, "display.width", 200):
            print(table[["name", "x", "y", "z", "radius_mm", "indication", "citation"]].to_string(index=False))
    return 0


def cmd_outcome(args, reporter) -> int:
    from .cohort import read_cohort
    from .io import atomic_write, safe_file_stem
    from .outcome import target_outcome_analysis
    from .plotting import target_outcome_figure

    connectivity = _read_connectivity(args.connectivity)
    cohort = read_cohort(args.cohort)
    reporter.progress(0.1, f"{args.n_permutations} permutations for {connectivity.shape[1]} targets")
    results = target_outcome_analysis(connectivity, cohort, args.outcome, covariates=args.covariates or (),
                                      n_permutations=args.n_permutations, seed=args.seed, method=args.method)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "target_outcome.csv") as tmp:
        results.to_csv(tmp, index=False)
    outcome = cohort.set_index("subject_id").loc[connectivity.index, args.outcome]
    for k, row in results.iterrows():
        target = row["target"]
        target_outcome_figure(connectivity[target].to_numpy(), outcome.to_numpy(float), row.to_dict(),
                              out / f"outcome_{safe_file_stem(target, default='target')}.png", target_name=target,
                              outcome_name=args.outcome)
        reporter.progress(0.5 + 0.5 * (k + 1) / len(results), f"figure for {target}")
    best = results.sort_values("p_permutation").iloc[0]
    reporter.info(f"strongest association: {best['target']} r = {best['r']:+.3f}, "
                  f"permutation p = {best['p_permutation']:.4f} (FWE over targets {best['p_fwe']:.4f})")
    return 0


def _read_connectivity(path):
    path = Path(path)
    if path.is_dir():
        path = path / "target_connectivity.csv"
    if not path.is_file():
        raise FileNotFoundError(f"Target connectivity table not found: {path}")
    table = pd.read_csv(path, dtype={"subject_id": str})
    if "subject_id" not in table.columns:
        raise ValueError(f"{path} has no subject_id column")
    return table.set_index("subject_id")


# ---------------------------------------------------------------- subtypes (SuStaIn)
def cmd_subtypes_zscore(args, reporter) -> int:
    from .io import atomic_write
    from .subtypes_input import RegionalZScorer, regional_zscores

    table = _read_table(args.table, "cohort table")
    regions = _column_list(args.regions, "--regions")
    if args.apply_scorer:
        scorer = RegionalZScorer.load(args.apply_scorer)
        unknown = [r for r in regions if r not in scorer.regions]
        if unknown:
            raise ValueError(f"--regions {unknown} are not regions of the scorer {args.apply_scorer}")
        zscores = scorer.transform(table)[regions]
        reporter.info(f"z-scored {len(zscores)} subjects with the saved scorer {args.apply_scorer}")
    else:
        _check_output_folder(args.out)
        zscores, scorer = regional_zscores(
            table, regions, group_column=args.group_column, control_label=args.control_label,
            covariates=_column_list(args.covariates, "--covariates", allow_empty=True),
            abnormal=_abnormal_arg(args.abnormal, regions), method=args.method,
            patients_only=not args.all_subjects)
        reporter.info(f"z-scores of {len(zscores)} {'subjects' if args.all_subjects else 'patients'} against "
                      f"{int(scorer.n_controls_.min())} controls ({args.method}, covariates: "
                      f"{', '.join(scorer.covariates) or 'none'})")
        if args.scorer:
            scorer.save(args.scorer)
            reporter.info(f"saved the z-scorer to {args.scorer}")
    with atomic_write(args.out) as tmp:
        zscores.to_csv(tmp, index_label="subject_id")
    reporter.progress(1.0, f"wrote {args.out}")
    return 0


def cmd_subtypes_fit(args, reporter) -> int:
    from .subtypes_pipeline import fit_subtypes, read_zscores

    out = Path(args.out)
    if not out.resolve().parent.is_dir():
        raise FileNotFoundError(f"output folder's parent does not exist: {out.resolve().parent}")
    zscores = read_zscores(args.zscores, _column_list(args.regions, "--regions") if args.regions else None)
    if args.kind == "mixture":
        z_levels = z_max = None
        likelihoods = _likelihood_args(args, zscores)
        reporter.info(f"{len(zscores)} subjects x {zscores.shape[1]} regions; event / no-event likelihoods")
    else:
        if args.likelihoods:
            raise ValueError("--likelihoods is for --kind mixture")
        likelihoods = None
        z_levels, z_max = _z_levels_args(args, zscores)
        reporter.info(f"{len(zscores)} subjects x {zscores.shape[1]} regions; z-levels "
                      + "; ".join(f"{r}: {','.join(f'{v:g}' for v in lv)} (max {m:g})"
                                  for r, lv, m in zip(zscores.columns, z_levels, z_max)))
    result = fit_subtypes(zscores, z_levels, z_max, kind=args.kind, likelihoods=likelihoods,
                          max_subtypes=args.max_subtypes,
                          n_startpoints=args.startpoints, n_mcmc=args.mcmc, n_tune=args.tune,
                          cv_folds=args.cv_folds, seed=args.seed, n_jobs=args.jobs,
                          progress=_throttled(reporter.progress))
    result.save(out)
    if result.cv is not None:
        reporter.info("CVIC by number of subtypes: " + ", ".join(
            f"{int(k)}: {v:.1f}" for k, v in result.cv.cvic.items()))
    counts = result.staged["ml_subtype"].where(result.staged["ml_stage"] > 0).value_counts().sort_index()
    reporter.info(f"{result.chosen_n_subtypes} subtype(s); subjects per subtype (stage > 0): "
                  + ", ".join(f"{int(k)}: {int(v)}" for k, v in counts.items())
                  + f"; stage 0 (normal-appearing): {int((result.staged['ml_stage'] == 0).sum())}")
    reporter.progress(1.0, f"saved the subtype analysis to {out}")
    return 0


def cmd_subtypes_stage(args, reporter) -> int:
    from .io import atomic_write
    from .subtypes_pipeline import read_zscores

    model = _subtypes_model(args.model, args.n_subtypes)
    zscores = read_zscores(args.zscores)
    missing = [b for b in model.biomarkers if b not in zscores.columns]
    if missing:
        raise ValueError(f"{args.zscores} lacks the region column(s) {missing} of the model {args.model}")
    staged = model.stage(zscores[model.biomarkers])
    staged.index = zscores.index
    with atomic_write(args.out) as tmp:
        staged.to_csv(tmp, index_label="subject_id")
    reporter.progress(1.0, f"staged {len(staged)} subjects with {model.n_subtypes} subtype(s); wrote {args.out}")
    return 0


def cmd_subtypes_associate(args, reporter) -> int:
    from .subtypes_pipeline import SubtypesResult, associate

    result = SubtypesResult.load(args.model)
    staged = result.staged if args.n_subtypes is None else result.stage(result.zscores, args.n_subtypes)
    clinical = _read_table(args.clinical, "clinical table")
    scores = _column_list(args.scores, "--scores")
    covariates = _column_list(args.covariates, "--covariates", allow_empty=True)
    associations = associate(staged, clinical, scores, covariates, include_stage0=args.include_stage0)
    associations.save(args.out)
    tests = associations.subtype_differences
    for _, row in tests[tests["effect"] == "subtype"].iterrows():
        reporter.info(f"{row['score']}: subtype difference F({row['df_num']:g}, {row['df_den']:g}) = "
                      f"{row['statistic']:.2f}, p = {row['p']:.3g}")
    reporter.progress(1.0, f"wrote the clinical associations to {args.out}")
    return 0


def _subtypes_model(path, n_subtypes):
    """A SustainModel from a result folder (chosen or ``n_subtypes``) or a single model file."""
    path = Path(path)
    if path.is_dir():
        from .subtypes_pipeline import SubtypesResult

        return SubtypesResult.load(path).get_model(n_subtypes)
    from .sustain import SustainModel

    model = SustainModel.load(path)
    if n_subtypes is not None and n_subtypes != model.n_subtypes:
        raise ValueError(f"--n-subtypes {n_subtypes}: the model file {path} has {model.n_subtypes} subtype(s)")
    return model


def _read_table(path, what, required=("subject_id",)):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ("," if path.suffix.lower() == ".csv" else None)
    try:
        table = pd.read_csv(path, sep=sep, engine="python" if sep is None else "c", encoding="utf-8-sig",
                            dtype={"subject_id": str})
    except pd.errors.EmptyDataError:
        raise ValueError(f"{what} {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ValueError(f"could not parse {what} {path}: {error}") from error
    table.columns = [str(c).strip() for c in table.columns]
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise ValueError(f"{what} {path} has no {', '.join(missing)} column (columns: {list(table.columns)})")
    return table


def _column_list(value, option, allow_empty=False) -> list[str]:
    items = [item.strip() for item in (value or "").split(",") if item.strip()]
    if not items and not allow_empty:
        raise ValueError(f"{option} needs at least one column name (comma-separated)")
    return items


def _abnormal_arg(value, regions):
    """``lower``/``higher`` for every region, or ``region=lower,region2=higher``."""
    if "=" not in value:
        return value
    directions = {}
    for item in value.split(","):
        region, _, direction = item.partition("=")
        directions[region.strip()] = direction.strip()
    unknown = [r for r in directions if r not in regions]
    if unknown:
        raise ValueError(f"--abnormal names region(s) {unknown} that are not in --regions")
    return {r: directions.get(r, "lower") for r in regions}


def _number_list(text, option) -> list[float]:
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated numbers, got {text!r}") from None


def _z_levels_args(args, zscores):
    """Z-levels and z-max per region: from --z-levels / --z-levels-file, else the data-driven defaults."""
    from .subtypes_pipeline import normalise_z_levels, normalise_z_max

    regions = list(zscores.columns)
    z_max = None
    if args.z_levels_file:
        path = Path(args.z_levels_file)
        if not path.is_file():
            raise FileNotFoundError(f"--z-levels-file not found: {path}")
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"--z-levels-file {path} is not valid JSON: {error}") from None
        if isinstance(spec, dict) and "z_levels" in spec:
            levels, z_max = spec["z_levels"], spec.get("z_max")
        else:
            levels = spec
        levels = normalise_z_levels(levels, regions)
    elif args.z_levels:
        levels = normalise_z_levels(_number_list(args.z_levels, "--z-levels"), regions)
    else:
        from .subtypes_input import default_z_levels

        levels, z_max = default_z_levels(zscores)
    if args.z_max is not None:
        z_max = args.z_max
    if z_max is None:
        # pySuStaIn's convention: the trajectory ends 2 above the highest level (1, 2, 3 -> 5).
        z_max = [row[-1] + 2.0 for row in levels]
    return levels, normalise_z_max(z_max, regions)


def _likelihood_args(args, zscores):
    """The event / no-event likelihood tables of a mixture fit, on the subjects and regions of the z-scores."""
    from .subtypes_pipeline import read_zscores

    if not args.likelihoods:
        raise ValueError("--kind mixture needs --likelihoods YES.csv NO.csv (event / no-event likelihoods)")
    tables = []
    for path in args.likelihoods:
        table = read_zscores(path)
        missing_regions = [r for r in zscores.columns if r not in table.columns]
        missing_subjects = zscores.index.difference(table.index)
        if missing_regions or len(missing_subjects):
            raise ValueError(f"likelihood table {path} lacks region(s) {missing_regions} or "
                             f"{len(missing_subjects)} subject(s) of {args.zscores} "
                             f"(e.g. {list(missing_subjects[:5])})")
        tables.append(table.loc[zscores.index, list(zscores.columns)])
    return tuple(tables)


def _throttled(progress, interval=0.1):
    """Pass progress on at most every ``interval`` seconds (and always the end), so MCMC does not flood."""
    import time

    last = [-float("inf")]

    def report(fraction, message):
        now = time.monotonic()
        if fraction >= 1.0 or now - last[0] >= interval:
            last[0] = now
            progress(fraction, message)

    return report



# ---------------------------------------------------------------- helpers
def _holdout_split(n, fraction, seed):
    if not 0 <= fraction < 1:
        raise ValueError(f"--holdout must be in [0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(fraction * n))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _check_output_folder(path):
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {folder}")


def _write_quality(model_path, table, calibration, n_train, n_test, suffix=".quality"):
    from .io import atomic_write

    stem = Path(model_path).with_suffix("")
    csv_path = Path(f"{stem}{suffix}.csv")
    json_path = Path(f"{stem}{suffix}.json")
    summary = {
        "n_train": int(n_train), "n_test": int(n_test), "calibration": calibration,
        "median": {k: float(v) for k, v in table[["EV", "SMSE", "MSLL", "Rho"]].median().items()},
    }
    with atomic_write(csv_path) as tmp:
        table.to_csv(tmp)
    with atomic_write(json_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))


def _calibration_text(c):
    return (f"held-out z: mean {c['z_mean']:+.3f}, SD {c['z_sd']:.3f}, "
            f"{100 * c['frac_beyond_1.96']:.1f} % beyond +/-1.96 (5 % expected)")


def _summary_row(pm, model):
    top = pm.regions.head(3)
    cortex = int(model.cortex_.sum())
    return {
        "subject_id": pm.subject_id, "age": pm.age, "sex": pm.sex, "site": pm.site,
        "n_atrophic": pm.atrophy.n_atrophic, "fraction_cortex_atrophic": pm.atrophy.n_atrophic / cortex,
        "n_clusters": pm.atrophy.n_clusters, "mean_z": float(np.nanmean(pm.z)),
        "top_regions": ";".join(top.loc[top["n_atrophic"] > 0, "region"]),
    }


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuroatrophy", description="Individual brain-atrophy analyses from MRI.")
    parser.add_argument("--version", action="version", version=f"neuroatrophy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, cohort=True):
        p.add_argument("--progress", choices=["text", "json", "none"], default="text",
                       help="progress output: text (default), json lines (for Slicer), none")
        if cohort:
            p.add_argument("--cohort", required=True, help="cohort table (CSV/TSV): subject_id, age, sex, site, ...")
            p.add_argument("--subjects-dir", default=None,
                           help="FreeSurfer subjects directory with <id>/surf/?h.thickness.fsaverage5.mgh")
            p.add_argument("--template", default="fsaverage5", choices=["fsaverage5"])
            p.add_argument("--measure", default="thickness")
        return p

    p = common(sub.add_parser("fit", help="fit a normative model of cortical thickness on controls"))
    p.add_argument("--out", required=True, help="model file to write (.npz)")
    p.add_argument("--heteroskedastic", action="store_true", help="noise variance changing with age")
    p.add_argument("--warp", choices=["sinharcsinh"], default=None, help="warp for non-Gaussian thickness")
    p.add_argument("--n-knots", type=int, default=5, help="B-spline knots for age (default 5)")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of controls held out to report fit quality (default 0.2; 0 = fit on all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-jobs", type=int, default=None)
    p.set_defaults(func=cmd_fit)

    p = common(sub.add_parser("evaluate", help="fit quality of a model on held-out controls"))
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="per-vertex metrics CSV (a JSON summary is written beside it)")
    p.set_defaults(func=cmd_evaluate)

    p = common(sub.add_parser("map", help="personalized atrophy maps of patients"))
    p.add_argument("--model", required=True)
    p.add_argument("--subject", nargs="*", help="subject ids to map (default: all non-control subjects)")
    p.add_argument("--threshold", type=float, default=-1.96, help="z threshold of atrophy (default -1.96)")
    p.add_argument("--min-cluster-size", type=int, default=0, help="minimum cluster size in vertices")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_map)

    p = common(sub.add_parser("adapt", help="adapt a model to a new site from some of its controls"))
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="adapted model file to write")
    p.set_defaults(func=cmd_adapt)

    p = common(sub.add_parser("info", help="describe a model file"), cohort=False)
    p.add_argument("--model", required=True)
    p.set_defaults(func=cmd_info)

    p = common(sub.add_parser("connectome", help="build or describe a normative resting-state connectome"),
               cohort=False)
    csub = p.add_subparsers(dest="connectome_command", required=True)
    b = common(csub.add_parser("build", help="build (resume, extend) a connectome store from a runs table"),
               cohort=False)
    b.add_argument("--runs", required=True,
                   help="runs table (CSV/TSV): subject_id, lh_file, rh_file (fsaverage5) or volume_file "
                        "(MNI152-2mm), optional confounds_file; paths relative to the table")
    b.add_argument("--out", required=True, help="connectome folder (created, or resumed/extended)")
    b.add_argument("--space", choices=["fsaverage5", "MNI152-2mm"], default="fsaverage5")
    b.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    b.add_argument("--global-signal", action="store_true", help="regress the global signal")
    b.add_argument("--bandpass", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="band-pass in Hz (0 for no bound), e.g. 0.01 0.1; needs --tr")
    b.add_argument("--tr", type=float, default=None, help="repetition time in seconds")
    b.add_argument("--confound-columns", nargs="*", default=None, help="confound columns to use (tables with a header)")
    b.add_argument("--mask", default=None, help="grey-matter mask NIfTI for MNI152-2mm (default nilearn's)")
    b.set_defaults(func=cmd_connectome_build)
    i = common(csub.add_parser("info", help="describe a connectome store"), cohort=False)
    i.add_argument("--connectome", required=True)
    i.set_defaults(func=cmd_connectome_info)

    p = common(sub.add_parser("network", help="atrophy networks of a cohort's patients in a connectome"))
    p.add_argument("--model", required=True, help="normative model file")
    p.add_argument("--connectome", required=True, help="connectome folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--subject", nargs="*", help="patients to analyse (default: all non-control subjects)")
    p.add_argument("--threshold", type=float, default=-1.96, help="z threshold of atrophy (default -1.96)")
    p.add_argument("--min-cluster-size", type=int, default=20, help="minimum atrophic cluster size (default 20)")
    p.add_argument("--weighting", choices=["binary", "abs_z"], default="binary",
                   help="seed weights: atrophic mask, or |z| on atrophic vertices")
    p.add_argument("--t-threshold", default="auto", help="|t| threshold of networks ('auto': Bonferroni p<0.05)")
    p.add_argument("--n-null", type=int, default=40,
                   help="matched random seeds per patient for specificity (default 40; 0: none; >= 20 for p<0.05)")
    p.add_argument("--null-method", choices=["grow", "spin"], default="grow")
    p.add_argument("--convergence", type=float, default=0.75, help="fraction of patients for convergent regions")
    p.add_argument("--targets", nargs="*", default=["standard"],
                   help="'standard', 'none', target names, or a CSV of name,x,y,z[,radius_mm]")
    p.add_argument("--engine", choices=["auto", "numpy", "torch"], default="auto")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--n-jobs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_network)

    p = common(sub.add_parser("targets", help="list the standard rTMS targets with citations"), cohort=False)
    p.add_argument("--out", default=None, help="write them to a CSV instead of printing")
    p.set_defaults(func=cmd_targets)

    p = common(sub.add_parser("outcome", help="target connectivity against treatment outcome"), cohort=False)
    p.add_argument("--connectivity", required=True,
                   help="target_connectivity.csv from 'neuroatrophy network' (or its folder)")
    p.add_argument("--cohort", required=True, help="cohort table with the outcome column")
    p.add_argument("--outcome", required=True, help="outcome column (e.g. symptom change)")
    p.add_argument("--covariates", nargs="*", default=None, help="covariate columns (e.g. age sex)")
    p.add_argument("--method", choices=["pearson", "spearman"], default="pearson")
    p.add_argument("--n-permutations", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (table and one figure per target)")
    p.set_defaults(func=cmd_outcome)

    p = common(sub.add_parser("subtypes", help="subtypes and stages of regional atrophy (SuStaIn)"), cohort=False)
    ssub = p.add_subparsers(dest="subtypes_command", required=True)
    z = common(ssub.add_parser("zscore", help="covariate-adjusted regional z-scores against controls"), cohort=False)
    z.add_argument("--table", required=True, help="cohort table (CSV/TSV): subject_id, group, covariates, regions")
    z.add_argument("--regions", required=True, help="regional measure columns, comma-separated")
    z.add_argument("--group-column", default="group", help="column telling controls from patients (default group)")
    z.add_argument("--control-label", default="control", help="value of the group column for controls")
    z.add_argument("--covariates", default="age,sex,icv",
                   help="covariate columns, comma-separated (default age,sex,icv; '' for none)")
    z.add_argument("--abnormal", default="lower",
                   help="abnormal side: lower (atrophy, default), higher, or region=lower,region2=higher")
    z.add_argument("--method", choices=["ols", "normative"], default="ols",
                   help="ols regression in controls (default) or the normative model (age, sex, site only)")
    z.add_argument("--all-subjects", action="store_true", help="write controls' z-scores too (default patients)")
    z.add_argument("--scorer", default=None, help="also save the fitted z-scorer (JSON) here")
    z.add_argument("--apply-scorer", default=None,
                   help="z-score every row of --table with a saved z-scorer instead of fitting one")
    z.add_argument("--out", required=True, help="z-score table to write (CSV: subject_id, regions)")
    z.set_defaults(func=cmd_subtypes_zscore)

    f = common(ssub.add_parser("fit", help="fit SuStaIn on patients' z-scores and stage them"), cohort=False)
    f.add_argument("--zscores", required=True, help="z-score table (subject_id + one column per region)")
    f.add_argument("--regions", default=None, help="region columns to use, comma-separated (default all)")
    f.add_argument("--kind", choices=["zscore", "mixture"], default="zscore",
                   help="z-score SuStaIn (default) or the event-based mixture variant (needs --likelihoods)")
    f.add_argument("--likelihoods", nargs=2, metavar=("YES", "NO"), default=None,
                   help="mixture kind: event and no-event likelihood tables (subject_id + regions, linear, > 0)")
    levels = f.add_mutually_exclusive_group()
    levels.add_argument("--z-levels", default=None, help="z-levels of every region, e.g. 1,2,3 "
                        "(default: chosen per region from the data)")
    levels.add_argument("--z-levels-file", default=None,
                        help='JSON: {"region": [1, 2, 3], ...} or {"z_levels": {...}, "z_max": {...}}')
    f.add_argument("--z-max", type=float, default=None,
                   help="z at the end of every trajectory (default: highest level + 2, or the data-driven value)")
    f.add_argument("--max-subtypes", type=int, default=3, help="fit 1..this many subtypes (default 3)")
    f.add_argument("--startpoints", type=int, default=25, help="E-M start points (default 25)")
    f.add_argument("--mcmc", type=int, default=100_000, help="MCMC iterations (default 100000)")
    f.add_argument("--tune", type=int, default=10_000, help="MCMC proposal-tuning iterations (default 10000)")
    f.add_argument("--cv-folds", type=int, default=0,
                   help="cross-validation folds to choose the number of subtypes by CVIC (0: none, default)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--jobs", type=int, default=None, help="parallel workers (default: all CPUs)")
    f.add_argument("--out", required=True, help="result folder (models, subjects.csv, settings.json, figures)")
    f.set_defaults(func=cmd_subtypes_fit)

    g = common(ssub.add_parser("stage", help="subtype and stage new subjects with a fitted model"), cohort=False)
    g.add_argument("--model", required=True, help="result folder of 'subtypes fit' or a .sustain model file")
    g.add_argument("--n-subtypes", type=int, default=None, help="model to use (default: the chosen one)")
    g.add_argument("--zscores", required=True, help="z-score table of the subjects to stage")
    g.add_argument("--out", required=True, help="staging table to write (CSV)")
    g.set_defaults(func=cmd_subtypes_stage)

    a = common(ssub.add_parser("associate", help="clinical scores against subtypes and stages"), cohort=False)
    a.add_argument("--model", required=True, help="result folder of 'subtypes fit'")
    a.add_argument("--n-subtypes", type=int, default=None, help="model to use (default: the chosen one)")
    a.add_argument("--clinical", required=True, help="clinical table (CSV/TSV) with subject_id, scores, covariates")
    a.add_argument("--scores", required=True, help="score columns, comma-separated (e.g. edss,sdmt)")
    a.add_argument("--covariates", default="", help="covariate columns, comma-separated (e.g. age,sex)")
    a.add_argument("--include-stage0", action="store_true",
                   help="keep stage-0 (normal-appearing) subjects in the tests (default: left out)")
    a.add_argument("--out", required=True, help="output folder for the association tables")
    a.set_defaults(func=cmd_subtypes_associate)

    from .cli_thalamus import add_thalamus_parser

    add_thalamus_parser(sub, common)

    from .cli_progression import add_progression_parser

    add_progression_parser(sub, common)

    p = common(sub.add_parser("demo", help="run the demo on a synthetic cohort built from fsaverage5"), cohort=False)
    p.add_argument("--out", default="demo-output")
    p.add_argument("--n-controls", type=int, default=600)
    p.add_argument("--n-patients", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-subtypes", action="store_true",
                   help="leave out the subtypes (SuStaIn) step on its own synthetic cohort (out/subtypes/)")
    p.add_argument("--skip-progression", action="store_true",
                   help="leave out the brain-progression step (Colin27 preprocessing, disease-course model, "
                        "forecast workflow; out/progression/)")
    p.add_argument("--skip-thalamus", action="store_true",
                   help="leave out the thalamus segmentation step (Colin27 and a synthetic cohort, out/thalamus/)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    reporter = _Reporter(args.progress)
    # A terminate request (Slicer's Cancel) ends the job without a traceback.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = lambda msg, cat, *a, **k: reporter.info(f"warning: {msg}")
        try:
            return args.func(args, reporter)
        except (ValueError, FileNotFoundError, RuntimeError) as error:
            reporter.error(str(error))
            return 2
        except KeyboardInterrupt:
            reporter.error("interrupted")
            return 130


if __name__ == "__main__":
    sys.exit(main())
