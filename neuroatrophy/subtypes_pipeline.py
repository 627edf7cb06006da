"""A whole subtype analysis (SuStaIn): fit, choose the number of subtypes, stage, save, reload, associate.

:func:`fit_subtypes` runs z-score (or mixture) SuStaIn (:mod:`neuroatrophy.sustain`) on the
patients' regional z-scores for 1..``max_subtypes`` subtypes, optionally cross-validates to
choose the number of subtypes by the lowest CVIC, and stages every subject with the chosen
model. The :class:`SubtypesResult` saves everything to one folder (written in a temporary
sibling folder and renamed into place, so a folder is never half written) and loads it back;
the reloaded models stage subjects identically. :func:`associate` relates the subtypes and
stages to clinical scores (:mod:`neuroatrophy.subtypes_clinical`).

The folder layout and file formats are documented in ``docs/subtypes.md``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .io import replace_folder

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "SubtypesResult", "Associations", "fit_subtypes",
           "associate", "read_zscores", "normalise_z_levels", "normalise_z_max"]

FORMAT_NAME = "neuroatrophy-subtypes"
FORMAT_VERSION = 1
SETTINGS_FILE = "settings.json"
SUBJECTS_FILE = "subjects.csv"
ZSCORES_FILE = "zscores.csv"
CV_FILE = "cv.csv"
CV_FOLDS_FILE = "cv_folds.csv"
SEQUENCES_FILE = "sequences.csv"
STAGES_FIGURE = "stages.png"
CV_FIGURE = "cv.png"
KINDS = ("zscore", "mixture")


def _model_file(k: int) -> str:
    return f"model_k{k}.sustain"


def _pvd_file(k: int) -> str:
    return f"pvd_k{k}.png"


# ---------------------------------------------------------------- inputs
def read_zscores(path, regions=None) -> pd.DataFrame:
    """Read a z-score table (CSV/TSV): ``subject_id`` plus one numeric column per region.

    Parameters
    ----------
    path : str or path-like
        Table with a ``subject_id`` column (or the subject ids in its first column).
    regions : sequence of str, optional
        Columns to keep, in this order (default: every column but ``subject_id``).

    Returns
    -------
    pandas.DataFrame
        Subjects x regions float table indexed by ``subject_id`` (str); missing values NaN.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"z-score table not found: {path}")
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    try:
        header = pd.read_csv(path, sep=sep, nrows=0, encoding="utf-8-sig").columns
        id_column = "subject_id" if "subject_id" in header else header[0]
        # Subject ids stay text: "001" is not the number 1.
        table = pd.read_csv(path, sep=sep, dtype={id_column: str}, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise ValueError(f"z-score table {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ValueError(f"could not parse z-score table {path}: {error}") from error
    if table[id_column].duplicated().any():
        duplicated = sorted(table.loc[table[id_column].duplicated(), id_column].unique())[:10]
        raise ValueError(f"{path}: subject id(s) {duplicated} appear more than once")
    table = table.set_index(id_column)
    table.index.name = "subject_id"
    if regions is not None:
        missing = [r for r in regions if r not in table.columns]
        if missing:
            raise ValueError(f"{path}: region column(s) {missing} not found (columns: {list(table.columns)})")
        table = table[list(regions)]
    return check_zscores(table, source=str(path))


def check_zscores(zscores, source="z-scores") -> pd.DataFrame:
    """A float copy of a subjects x regions table, with a clear error for anything else."""
    if not isinstance(zscores, pd.DataFrame):
        raise ValueError(f"{source} must be a pandas DataFrame (subjects x regions), got {type(zscores).__name__}")
    if zscores.shape[0] == 0 or zscores.shape[1] == 0:
        raise ValueError(f"{source} is empty (shape {zscores.shape})")
    columns = [str(c) for c in zscores.columns]
    if len(set(columns)) != len(columns):
        raise ValueError(f"{source}: region names appear more than once: {columns}")
    out = {}
    for column, name in zip(zscores.columns, columns):
        values = pd.to_numeric(zscores[column], errors="coerce")
        bad = values.isna() & zscores[column].notna()
        if bad.any():
            subject = zscores.index[np.flatnonzero(bad.to_numpy())[0]]
            raise ValueError(f"{source}: column {name!r} is not numeric (subject {subject}: "
                             f"{zscores[column].iloc[np.flatnonzero(bad.to_numpy())[0]]!r})")
        values = values.astype(float)
        if np.isinf(values).any():
            raise ValueError(f"{source}: column {name!r} holds infinite values")
        out[name] = values.to_numpy()
    index = pd.Index(zscores.index.astype(str), name="subject_id")
    if index.has_duplicates:
        raise ValueError(f"{source}: subject id(s) {sorted(index[index.duplicated()].unique())[:10]} "
                         "appear more than once")
    return pd.DataFrame(out, index=index)


def normalise_z_levels(z_levels, biomarkers) -> list[list[float]]:
    """Z-levels as one increasing list per biomarker, in the order of ``biomarkers``.

    Accepts a mapping ``{region: [levels]}`` (every biomarker present), one list of numbers
    used for every biomarker (``[1, 2, 3]``), or one list per biomarker (a zero or NaN
    entry, as in pySuStaIn's ``Z_vals`` array, means "no event" and is dropped).
    """
    biomarkers = list(biomarkers)
    if isinstance(z_levels, dict):
        missing = [b for b in biomarkers if b not in z_levels]
        if missing:
            raise ValueError(f"z_levels has no levels for region(s) {missing}")
        rows = [z_levels[b] for b in biomarkers]
    else:
        rows = list(np.asarray(z_levels, dtype=object)) if not _is_flat_numbers(z_levels) else None
        if rows is None:
            rows = [list(z_levels)] * len(biomarkers)
        elif len(rows) != len(biomarkers):
            raise ValueError(f"z_levels has {len(rows)} rows for {len(biomarkers)} regions {biomarkers}")
    levels = []
    for name, row in zip(biomarkers, rows):
        try:
            values = [float(v) for v in np.atleast_1d(np.asarray(row, dtype=float))]
        except (TypeError, ValueError):
            raise ValueError(f"z_levels of region {name!r} are not numbers: {row!r}") from None
        values = [v for v in values if v == v and v != 0]   # 0/NaN: "no event" (pySuStaIn's Z_vals)
        if not values:
            raise ValueError(f"region {name!r} has no z-level")
        if any(v < 0 for v in values) or any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError(f"z_levels of region {name!r} must be positive and increasing, got {values}")
        levels.append(values)
    return levels


def _is_flat_numbers(value) -> bool:
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return False
    return array.ndim == 1


def normalise_z_max(z_max, biomarkers) -> np.ndarray:
    """Z-max as a (B,) float array: a scalar, a ``{region: value}`` mapping or one value per biomarker."""
    biomarkers = list(biomarkers)
    if isinstance(z_max, dict):
        missing = [b for b in biomarkers if b not in z_max]
        if missing:
            raise ValueError(f"z_max has no value for region(s) {missing}")
        z_max = [z_max[b] for b in biomarkers]
    try:
        values = np.asarray(z_max, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"z_max must be numbers, got {z_max!r}") from None
    if values.ndim == 0:
        values = np.full(len(biomarkers), float(values))
    if values.shape != (len(biomarkers),):
        raise ValueError(f"z_max must be a number or one value per region ({len(biomarkers)}), got {values.shape}")
    return values


# ---------------------------------------------------------------- results
@dataclass
class SubtypesResult:
    """The models, choice, staging and settings of one subtype analysis.

    Attributes
    ----------
    models : list of SustainModel
        ``models[k - 1]`` has ``k`` subtypes, k = 1..max_subtypes.
    chosen_n_subtypes : int
        Lowest-CVIC number of subtypes with cross-validation, otherwise ``max_subtypes``.
    staged : pandas.DataFrame
        ``model.stage(zscores)`` of the chosen model (one row per subject; columns in
        ``docs/subtypes.md``).
    cv : CVResult or None
        Cross-validation (``table``, ``cvic``, ``mean_test_loglik``), None without; a
        loaded result has no fold models.
    zscores : pandas.DataFrame
        The fitted z-scores (subjects x regions).
    settings : dict
        Every setting of the fit (kind, z-levels, z-max, start points, MCMC, folds, seed...).
    timings : dict
        Seconds spent fitting, cross-validating and staging.
    """

    models: list
    chosen_n_subtypes: int
    staged: pd.DataFrame
    cv: object
    zscores: pd.DataFrame
    settings: dict
    timings: dict = field(default_factory=dict)

    @property
    def model(self):
        """The chosen model."""
        return self.models[self.chosen_n_subtypes - 1]

    @property
    def biomarkers(self) -> list[str]:
        return list(self.zscores.columns)

    def get_model(self, n_subtypes=None):
        """The model with ``n_subtypes`` subtypes (default: the chosen one)."""
        if n_subtypes is None:
            return self.model
        n = int(n_subtypes)
        if not 1 <= n <= len(self.models):
            raise ValueError(f"n_subtypes must be between 1 and {len(self.models)}, got {n_subtypes!r}")
        return self.models[n - 1]

    def stage(self, zscores, n_subtypes=None) -> pd.DataFrame:
        """Subtype and stage new subjects (columns must include the fitted regions)."""
        zscores = check_zscores(zscores, source="z-scores to stage")
        missing = [b for b in self.biomarkers if b not in zscores.columns]
        if missing:
            raise ValueError(f"z-scores to stage lack the region column(s) {missing} of the model")
        return self.get_model(n_subtypes).stage(zscores[self.biomarkers])

    def sequences_table(self) -> pd.DataFrame:
        """Every model's ML event sequences in long form, with each event's positional certainty."""
        tables = []
        for model in self.models:
            table = model.sequence_table()
            table.insert(0, "n_subtypes", model.n_subtypes)
            table.insert(2, "fraction", np.asarray(model.fractions)[table["subtype"].to_numpy() - 1])
            tables.append(table)
        return pd.concat(tables, ignore_index=True)

    # ------------------------------------------------------------ saving
    def save(self, out_dir) -> Path:
        """Write the analysis to the folder ``out_dir`` all at once.

        Everything is written to a temporary folder beside ``out_dir`` and renamed into
        place; an existing ``out_dir`` is replaced only if it is empty or an earlier
        subtypes result (never another folder).
        """
        out_dir = Path(out_dir)
        parent = out_dir.resolve().parent
        if not parent.is_dir():
            raise FileNotFoundError(f"output folder's parent does not exist: {parent}")
        _check_replaceable(out_dir)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", suffix=".saving", dir=parent))
        try:
            self._write(staging)
            replace_folder(staging, out_dir.resolve())
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return out_dir

    def _write(self, folder: Path) -> None:
        for model in self.models:
            model.save(folder / _model_file(model.n_subtypes))
        self.zscores.to_csv(folder / ZSCORES_FILE, index_label="subject_id")
        self.staged.to_csv(folder / SUBJECTS_FILE, index_label="subject_id")
        self.sequences_table().to_csv(folder / SEQUENCES_FILE, index=False)
        if self.cv is not None:
            summary = pd.DataFrame({"n_subtypes": np.asarray(self.cv.cvic.index, dtype=int),
                                    "cvic": np.asarray(self.cv.cvic, dtype=float),
                                    "mean_test_loglik": np.asarray(self.cv.mean_test_loglik, dtype=float)})
            summary.to_csv(folder / CV_FILE, index=False)
            self.cv.table.to_csv(folder / CV_FOLDS_FILE, index=False)
        figures = _figures(self, folder)
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "neuroatrophy_version": __version__,
            "chosen_n_subtypes": int(self.chosen_n_subtypes),
            "n_subjects": int(len(self.zscores)),
            "biomarkers": self.biomarkers,
            "settings": self.settings,
            "timings": self.timings,
            "figures": figures,
            "models": {str(m.n_subtypes): _model_file(m.n_subtypes) for m in self.models},
        }
        header["files"] = sorted([p.name for p in folder.iterdir()] + [SETTINGS_FILE])
        (folder / SETTINGS_FILE).write_text(json.dumps(_jsonable(header), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, out_dir) -> "SubtypesResult":
        """Read a result folder written by :meth:`save`."""
        from .sustain import SustainModel

        folder = Path(out_dir)
        header = read_settings(folder)
        models = []
        for k in sorted(int(k) for k in header["models"]):
            path = folder / header["models"][str(k)]
            if not path.is_file():
                raise FileNotFoundError(f"subtypes result {folder} is missing its model file {path.name}")
            models.append(SustainModel.load(path))
        zscores = _read_indexed(folder / ZSCORES_FILE)
        staged = _read_indexed(folder / SUBJECTS_FILE)
        cv = None
        if (folder / CV_FILE).is_file():
            from .sustain import CVResult

            summary = pd.read_csv(folder / CV_FILE).set_index("n_subtypes")
            folds = pd.read_csv(folder / CV_FOLDS_FILE) if (folder / CV_FOLDS_FILE).is_file() else pd.DataFrame()
            cv = CVResult(table=folds, cvic=summary["cvic"].rename("CVIC"),
                          mean_test_loglik=summary["mean_test_loglik"].rename("test_loglik"))
        return cls(models=models, chosen_n_subtypes=int(header["chosen_n_subtypes"]), staged=staged, cv=cv,
                   zscores=zscores, settings=header.get("settings", {}), timings=header.get("timings", {}))


def read_settings(folder) -> dict:
    """The ``settings.json`` header of a result folder, checked for format and version."""
    folder = Path(folder)
    path = folder / SETTINGS_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"subtypes result folder not found: {folder}")
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a subtypes result folder (no {SETTINGS_FILE})")
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if header.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a subtypes result (format {header.get('format')!r})")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {version!r}; this NeuroAtrophy reads versions "
                         f"<= {FORMAT_VERSION}: update NeuroAtrophy")
    return header


def _read_indexed(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"subtypes result file not found: {path}")
    table = pd.read_csv(path, dtype={"subject_id": str}).set_index("subject_id")
    return table


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"output path {out_dir} exists and is not a folder")
    if any(out_dir.iterdir()) and not (out_dir / SETTINGS_FILE).is_file():
        raise ValueError(f"output folder {out_dir} exists and is neither empty nor a subtypes result; "
                         "choose another folder")


def _figures(result, folder: Path) -> dict:
    """Positional variance diagrams (``pvd_k<K>.png``), stages and CV figures, if the plot module is there."""
    try:
        from . import subtypes_plot
    except ImportError:   # the figures are optional: the models and tables are the result
        return {}
    figures = {}
    for model in result.models:
        name = _pvd_file(model.n_subtypes)
        subtypes_plot.positional_variance_figure(model, title=f"{model.n_subtypes} subtype(s)", save=folder / name)
        figures[f"pvd_k{model.n_subtypes}"] = name
    subtypes_plot.stage_figure(result.staged, n_stages=result.model.n_stages, save=folder / STAGES_FIGURE)
    figures["stages"] = STAGES_FIGURE
    if result.cv is not None:
        subtypes_plot.cv_figure(result.cv, save=folder / CV_FIGURE)
        figures["cv"] = CV_FIGURE
    return figures


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------- fitting
def fit_subtypes(zscores: pd.DataFrame, z_levels=None, z_max=None, *, kind="zscore", max_subtypes=3,
                 n_startpoints=25, n_mcmc=100_000, n_tune=10_000, cv_folds=0, seed=0, n_jobs=None,
                 progress=None, likelihoods=None) -> SubtypesResult:
    """Fit SuStaIn for 1..``max_subtypes`` subtypes, choose the number and stage every subject.

    Parameters
    ----------
    zscores : pandas.DataFrame
        Subjects x regions z-scores of the patients (larger = more abnormal; NaN allowed),
        e.g. from :func:`neuroatrophy.subtypes_input.regional_zscores`.
    z_levels : mapping, sequence or array
        Z-levels of the events of each region (:func:`normalise_z_levels`); ``kind="zscore"``.
    z_max : float, mapping or sequence
        Z-score each region reaches at the end of the disease (:func:`normalise_z_max`).
    kind : {"zscore", "mixture"}
        Z-score SuStaIn, or the event-based variant on ``likelihoods``.
    max_subtypes : int
        Largest number of subtypes fitted (models for 1..max_subtypes are all kept).
    n_startpoints, n_mcmc, n_tune : int
        E-M start points, MCMC iterations and proposal-tuning iterations.
    cv_folds : int
        ``>= 2``: cross-validate with this many folds and choose the number of subtypes
        by the lowest CVIC; ``0`` (default): use ``max_subtypes``.
    seed : int
        Seed of the whole analysis (the same seed gives the same result).
    n_jobs : int, optional
        Workers for start points and folds (:mod:`neuroatrophy.parallel`).
    progress : callable, optional
        ``progress(fraction, message)``; raising :class:`neuroatrophy.parallel.Cancelled`
        from it stops the analysis.
    likelihoods : tuple of DataFrame, optional
        ``(L_yes, L_no)`` event / no-event likelihoods (subjects x regions, linear, > 0),
        required for ``kind="mixture"``; ``zscores`` then only names the subjects and regions
        that are saved with the result.

    Returns
    -------
    SubtypesResult
    """
    from .parallel import scaled_progress

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    zscores = check_zscores(zscores)
    biomarkers = list(zscores.columns)
    for name, value, low in (("max_subtypes", max_subtypes, 1), ("n_startpoints", n_startpoints, 1),
                             ("n_mcmc", n_mcmc, 0), ("n_tune", n_tune, 0), ("cv_folds", cv_folds, 0)):
        if isinstance(value, bool) or int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if cv_folds == 1:
        raise ValueError("cv_folds must be 0 (no cross-validation) or >= 2, got 1")
    if cv_folds > len(zscores):
        raise ValueError(f"cv_folds ({cv_folds}) exceeds the number of subjects ({len(zscores)})")

    settings = {"kind": kind, "biomarkers": biomarkers, "max_subtypes": int(max_subtypes),
                "n_startpoints": int(n_startpoints), "n_mcmc": int(n_mcmc), "n_tune": int(n_tune),
                "cv_folds": int(cv_folds), "seed": None if seed is None else int(seed),
                "n_jobs": None if n_jobs is None else int(n_jobs), "n_subjects": int(len(zscores))}
    common = dict(biomarkers=biomarkers, max_subtypes=int(max_subtypes), n_startpoints=int(n_startpoints),
                  n_mcmc=int(n_mcmc), n_tune=int(n_tune), seed=seed, n_jobs=n_jobs)
    if kind == "zscore":
        from .sustain import ZScoreSustain

        if z_levels is None or z_max is None:
            raise ValueError("kind='zscore' needs z_levels and z_max "
                             "(neuroatrophy.subtypes_input.default_z_levels suggests both)")
        levels = normalise_z_levels(z_levels, biomarkers)
        maxima = normalise_z_max(z_max, biomarkers)
        for name, row, top in zip(biomarkers, levels, maxima):
            if top <= row[-1]:
                raise ValueError(f"z_max of region {name!r} ({top}) must exceed its highest z-level ({row[-1]})")
        settings["z_levels"] = dict(zip(biomarkers, levels))
        settings["z_max"] = dict(zip(biomarkers, maxima.tolist()))
        make = lambda report: ZScoreSustain(levels, maxima, progress=report, **common)  # noqa: E731
        data, extra = (zscores,), {}
    else:
        from .sustain import MixtureSustain

        data = _check_likelihoods(likelihoods, zscores)
        extra = {"L_no": data[1]}
        make = lambda report: MixtureSustain(progress=report, **common)  # noqa: E731

    started = time.perf_counter()
    fit_share = 0.45 if cv_folds >= 2 else 0.95
    report = scaled_progress(progress, 0.0, fit_share)
    _report(progress, 0.0, f"fitting SuStaIn ({kind}) with 1..{max_subtypes} subtypes on {len(zscores)} subjects")
    estimator = make(report).fit(*data)
    timings = {"fit_s": time.perf_counter() - started}

    cv = None
    chosen = int(max_subtypes)
    if cv_folds >= 2:
        from .sustain import cross_validate

        _report(progress, fit_share, f"{cv_folds}-fold cross-validation")
        tic = time.perf_counter()
        cv = cross_validate(make(None), data[0], n_folds=int(cv_folds), seed=seed, n_jobs=n_jobs,
                            progress=scaled_progress(progress, fit_share, 0.95), **extra)
        timings["cv_s"] = time.perf_counter() - tic
        chosen = int(cv.best_n_subtypes)

    _report(progress, 0.95, f"staging {len(zscores)} subjects with {chosen} subtype(s)")
    tic = time.perf_counter()
    model = estimator.models_[chosen - 1]
    staged = model.stage(zscores) if kind == "zscore" else model.stage_likelihoods(*data)
    staged.index = zscores.index
    timings["stage_s"] = time.perf_counter() - tic
    timings["total_s"] = time.perf_counter() - started
    timings = {k: round(v, 3) for k, v in timings.items()}
    _report(progress, 1.0, f"done: {chosen} subtype(s) in {timings['total_s']:.1f} s")
    return SubtypesResult(models=list(estimator.models_), chosen_n_subtypes=chosen, staged=staged, cv=cv,
                          zscores=zscores, settings=settings, timings=timings)


def _report(progress, fraction, message):
    if progress is not None:
        progress(fraction, message)


def _check_likelihoods(likelihoods, zscores):
    if likelihoods is None or len(likelihoods) != 2:
        raise ValueError("kind='mixture' needs likelihoods=(L_yes, L_no) "
                         "(see neuroatrophy.subtypes_input)")
    out = []
    for name, table in zip(("L_yes", "L_no"), likelihoods):
        table = check_zscores(pd.DataFrame(table, index=zscores.index, columns=zscores.columns)
                              if not isinstance(table, pd.DataFrame) else table, source=name)
        if list(table.columns) != list(zscores.columns) or not table.index.equals(zscores.index):
            raise ValueError(f"{name} must have the subjects and regions of the z-scores")
        out.append(table)
    return tuple(out)


# ---------------------------------------------------------------- clinical associations
@dataclass
class Associations:
    """Clinical associations of subtypes and stages.

    Attributes
    ----------
    subtype_differences : pandas.DataFrame
        Per score: differences between subtypes (:func:`neuroatrophy.subtypes_clinical.subtype_differences`).
    stage_associations : pandas.DataFrame
        Per score and subtype: association of stage with the score
        (:func:`neuroatrophy.subtypes_clinical.stage_associations`).
    table : pandas.DataFrame
        The joined table (staging + scores + covariates) the tests ran on.
    """

    subtype_differences: pd.DataFrame
    stage_associations: pd.DataFrame
    table: pd.DataFrame

    def save(self, out_dir) -> Path:
        """Write ``subtype_differences.csv``, ``stage_associations.csv`` and ``table.csv`` (each atomically)."""
        from .io import atomic_write

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, table, index in (("subtype_differences.csv", self.subtype_differences, False),
                                   ("stage_associations.csv", self.stage_associations, False),
                                   ("table.csv", self.table, True)):
            with atomic_write(out_dir / name) as tmp:
                table.to_csv(tmp, index=index)
        return out_dir


def associate(result, clinical_table, scores, covariates=(), include_stage0=False) -> Associations:
    """Test clinical scores against the subtypes and stages of ``result``.

    Parameters
    ----------
    result : SubtypesResult or pandas.DataFrame
        A fitted analysis, or a staging table (index subject ids; ``ml_subtype``, ``ml_stage``).
    clinical_table : pandas.DataFrame
        Clinical data: a ``subject_id`` column (or subject ids as index), the scores and covariates.
    scores : sequence of str
        Score columns (e.g. ``["edss", "sdmt"]``).
    covariates : sequence of str
        Covariate columns adjusted for (e.g. ``["age", "sex"]``).
    include_stage0 : bool
        Keep stage-0 (normal-appearing) subjects, whose subtype is not identifiable
        (default False: they are left out of both analyses).

    Raises
    ------
    ValueError
        If staged subjects are missing from the clinical table (they are listed) or a
        column is absent.
    """
    from .subtypes_clinical import stage_associations, subtype_differences

    staged = result.staged if isinstance(result, SubtypesResult) else result
    scores, covariates = _as_list(scores, "scores"), _as_list(covariates, "covariates")
    if not scores:
        raise ValueError("scores: give at least one clinical score column")
    clinical = clinical_table.copy()
    if "subject_id" in clinical.columns:
        clinical["subject_id"] = clinical["subject_id"].astype(str)
        if clinical["subject_id"].duplicated().any():
            duplicated = sorted(clinical.loc[clinical["subject_id"].duplicated(), "subject_id"].unique())[:10]
            raise ValueError(f"clinical table: subject id(s) {duplicated} appear more than once")
        clinical = clinical.set_index("subject_id")
    clinical.index = clinical.index.astype(str)
    missing_columns = [c for c in scores + covariates if c not in clinical.columns]
    if missing_columns:
        raise ValueError(f"clinical table has no column(s) {missing_columns} (columns: {list(clinical.columns)})")
    missing = [s for s in staged.index.astype(str) if s not in clinical.index]
    if missing:
        shown = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise ValueError(f"{len(missing)} staged subject(s) are missing from the clinical table: {shown}")
    wanted = [c for c in dict.fromkeys(scores + covariates) if c not in staged.columns]
    table = staged.copy()
    table.index = table.index.astype(str)
    table = table.join(clinical[wanted], how="left")
    table.index.name = "subject_id"
    differences = subtype_differences(table, scores, subtype_column="ml_subtype", covariates=covariates,
                                      include_stage0=include_stage0, stage_column="ml_stage")
    stages = stage_associations(table, scores, stage_column="ml_stage", subtype_column="ml_subtype",
                                covariates=covariates, include_stage0=include_stage0)
    return Associations(subtype_differences=differences, stage_associations=stages, table=table)


def _as_list(value, name) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    try:
        return [str(v) for v in value]
    except TypeError:
        raise ValueError(f"{name} must be a list of column names, got {value!r}") from None

