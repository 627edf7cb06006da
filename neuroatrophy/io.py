"""Reading and writing per-vertex surface data and finding subjects' thickness files.

Supported formats: FreeSurfer MGH (``.mgh``, ``.mgz``), GIfTI (``.gii``, ``.gii.gz``),
FreeSurfer curv/morph files (``lh.thickness`` and any other name) and NumPy ``.npy``.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np

from .surface import TEMPLATE_VERTICES, match_vertex_count

__all__ = [
    "read_surface_data",
    "write_surface_data",
    "atomic_write",
    "replace_folder",
    "package_data",
    "find_thickness_files",
    "load_cohort_surface_data",
]

_WRITE_FORMATS = (".mgh", ".mgz", ".gii", ".npy")
_READ_FORMATS = ".mgh, .mgz, .gii, .gii.gz, .npy or FreeSurfer curv (such as lh.thickness)"
_CURV_MAGIC = b"\xff\xff\xff"  # FreeSurfer "new" curv format


class _FileFormatError(ValueError):
    """A reader's own error, whose message already names the file."""


def _format_of(path: Path) -> str:
    name = path.name.lower()
    for suffix, fmt in ((".mgh", "mgh"), (".mgz", "mgh"), (".gii", "gifti"), (".gii.gz", "gifti"), (".npy", "npy")):
        if name.endswith(suffix):
            return fmt
    return "curv"


def read_surface_data(path) -> np.ndarray:
    """Read one per-vertex map as a 1-D float64 array.

    Parameters
    ----------
    path : str or path-like
        ``.mgh``/``.mgz`` (MGH), ``.gii``/``.gii.gz`` (GIfTI, first data array),
        ``.npy`` (NumPy, no pickles); any other name is read as a FreeSurfer
        curv/morph file (e.g. ``lh.thickness``).

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file cannot be read in its format, or does not hold one value per vertex.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Surface data file not found: {path}")
    if not path.is_file():
        raise ValueError(f"Surface data path is not a file: {path}")
    fmt = _format_of(path)
    try:
        data = _READERS[fmt](path)
    except _FileFormatError:
        raise
    except Exception as exc:  # nibabel, gzip and numpy raise many exception types for corrupt files
        raise ValueError(f"Could not read {path} as {_FORMAT_NAMES[fmt]}: {exc}") from exc
    data = np.squeeze(np.asarray(data))
    if data.ndim != 1:
        raise ValueError(f"{path} holds data of shape {data.shape}; expected one value per vertex (a 1-D map)")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise ValueError(f"{path} holds non-numeric data ({data.dtype})")
    return data.astype(np.float64)


def _read_mgh(path: Path) -> np.ndarray:
    import nibabel as nib

    # Read the bytes ourselves: nib.load leaves the file handle to the garbage collector.
    raw = path.read_bytes()
    if path.name.lower().endswith(".mgz"):
        raw = gzip.decompress(raw)
    return np.asarray(nib.MGHImage.from_bytes(raw).dataobj)


def _read_gifti(path: Path) -> np.ndarray:
    import nibabel as nib

    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rb") as stream:
            image = nib.GiftiImage.from_bytes(stream.read())
    else:
        image = nib.load(path)
    if not getattr(image, "darrays", None):
        raise _FileFormatError(f"{path} is a GIfTI file without data arrays")
    return np.asarray(image.darrays[0].data)


def _read_npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _read_curv(path: Path) -> np.ndarray:
    from nibabel.freesurfer import read_morph_data

    with open(path, "rb") as stream:
        header = stream.read(15)
    if len(header) < 15 or header[:3] != _CURV_MAGIC:
        raise _FileFormatError(f"Unknown format for {path}: not a FreeSurfer curv file (supported: {_READ_FORMATS})")
    n_vertices = int.from_bytes(header[3:7], "big")
    data = read_morph_data(path)
    if len(data) != n_vertices:
        raise _FileFormatError(f"{path} is truncated: header announces {n_vertices} values, found {len(data)}")
    return data


_READERS = {"mgh": _read_mgh, "gifti": _read_gifti, "npy": _read_npy, "curv": _read_curv}
_FORMAT_NAMES = {"mgh": "MGH", "gifti": "GIfTI", "npy": "NumPy .npy", "curv": "FreeSurfer curv"}


@contextlib.contextmanager
def atomic_write(path):
    """Context manager for writing ``path`` all at once or not at all.

    Yields a temporary path in the destination folder whose name ends with the
    destination's name (so the suffix, and format detection by suffix, is the
    same). On success the temporary file replaces ``path`` (``os.replace``); on
    error it is removed and ``path`` is left untouched.

    Examples
    --------
    >>> with atomic_write("out/z.npy") as tmp:  # doctest: +SKIP
    ...     np.save(tmp, z)
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"Output folder does not exist: {folder} (for {path.name})")
    tmp = folder / f".tmp-{uuid.uuid4().hex[:12]}-{path.name}"
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"Nothing was written to the temporary file for {path}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def replace_folder(staging, target) -> None:
    """Rename the folder ``staging`` to ``target``, replacing an existing ``target``.

    The old ``target`` is moved aside first and restored if the rename fails, so ``target`` is
    always either the old or the new folder, never a half-written one.
    """
    staging, target = Path(staging), Path(target)
    backup = None
    if target.exists():
        backup = target.parent / f".{target.name}-previous-{uuid.uuid4().hex[:8]}"
        os.replace(target, backup)
    try:
        os.replace(staging, target)
    except BaseException:
        if backup is not None:
            os.replace(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def package_data(package: str, *parts: str, needed_for: str) -> Path:
    """Path of a data file shipped inside an installed package, found without importing it.

    Raises ``FileNotFoundError`` naming the package (and what needs it) when it is not
    installed, or the path when the package lacks the file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{needed_for} needs the {package} package (pip install {package.replace('_', '-')})")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{needed_for}: {path} not found in the installed {package} package")
    return path


def safe_file_stem(name, used=None, default="file") -> str:
    """A file-system friendly stem for ``name`` (letters, digits, ``._-``; others become ``_``).

    With ``used`` (a set, updated), the stem is also unique case-insensitively among the
    stems already in it (``_1``, ``_2`` ... appended), so that two names never share a
    file on case-insensitive file systems (macOS, Windows).
    """
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name or "")).strip("._") or default
    if used is None:
        return stem
    candidate, counter = stem, 1
    while candidate.lower() in used:
        candidate, counter = f"{stem}_{counter}", counter + 1
    used.add(candidate.lower())
    return candidate


def write_surface_data(path, data) -> Path:
    """Write a 1-D per-vertex map to ``.mgh``, ``.mgz``, ``.gii`` or ``.npy`` (atomically).

    MGH and GIfTI files store float32, as FreeSurfer and Workbench expect; ``.npy``
    keeps the array's dtype. Returns the path written.
    """
    path = Path(path)
    values = np.asarray(data)
    if values.ndim != 1:
        raise ValueError(f"data for {path} must be a 1-D per-vertex array, got shape {values.shape}")
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == bool):
        raise ValueError(f"data for {path} must be numeric, got {values.dtype}")
    name = path.name.lower()
    suffix = next((s for s in _WRITE_FORMATS if name.endswith(s)), None)
    if suffix is None:
        raise ValueError(f"Cannot write {path}: unsupported extension (supported: {', '.join(_WRITE_FORMATS)})")
    with atomic_write(path) as tmp:
        if suffix == ".npy":
            np.save(tmp, values, allow_pickle=False)
        else:
            _write_nibabel(tmp, values.astype(np.float32), suffix)
    return path


def _write_nibabel(tmp: Path, values: np.ndarray, suffix: str) -> None:
    import nibabel as nib

    if suffix in (".mgh", ".mgz"):
        image = nib.MGHImage(values.reshape(-1, 1, 1), affine=np.eye(4))
    else:
        array = nib.gifti.GiftiDataArray(values, intent="NIFTI_INTENT_NONE", datatype="NIFTI_TYPE_FLOAT32")
        image = nib.GiftiImage(darrays=[array])
    nib.save(image, tmp)


def find_thickness_files(subjects_dir, subject_id, template: str = "fsaverage5", measure: str = "thickness"):
    """Find a subject's left and right per-vertex files resampled to a template.

    Looks in ``<subjects_dir>/<subject_id>/surf/`` then ``<subjects_dir>/<subject_id>/``
    for, per hemisphere, ``{hemi}.{measure}.{template}.mgh`` (or ``.mgz``), then the
    smoothed ``{hemi}.{measure}.fwhm*.{template}.mgh`` (or ``.mgz``) as written by
    ``recon-all -qcache``; a smoothed file is used only if it is the only candidate.

    Returns
    -------
    (lh_path, rh_path) : tuple of Path

    Raises
    ------
    FileNotFoundError
        If the subject folder or a hemisphere's file is missing (names the subject
        and the folders searched).
    ValueError
        If several smoothed files match, or the two hemispheres' files differ in
        anything but the hemisphere.
    """
    subject_id = str(subject_id)
    subject_dir = Path(subjects_dir) / subject_id
    if not subject_dir.is_dir():
        raise FileNotFoundError(f"Subject '{subject_id}': folder {subject_dir} does not exist")
    folders = [subject_dir / "surf", subject_dir]
    found = {hemi: _find_hemisphere_file(folders, subject_id, hemi, template, measure) for hemi in ("lh", "rh")}
    lh, rh = found["lh"], found["rh"]
    if rh.name != "rh" + lh.name[2:]:
        raise ValueError(f"Subject '{subject_id}': left and right files do not match: {lh} and {rh}")
    return lh, rh


def _find_hemisphere_file(folders, subject_id, hemi, template, measure) -> Path:
    for folder in folders:
        for ext in (".mgh", ".mgz"):
            exact = folder / f"{hemi}.{measure}.{template}{ext}"
            if exact.is_file():
                return exact
        smoothed = sorted(
            p for ext in (".mgh", ".mgz") for p in folder.glob(f"{hemi}.{measure}.fwhm*.{template}{ext}") if p.is_file()
        )
        if len(smoothed) == 1:
            return smoothed[0]
        if len(smoothed) > 1:
            names = ", ".join(p.name for p in smoothed)
            raise ValueError(
                f"Subject '{subject_id}': several smoothed {hemi} {measure} files in {folder}: {names}; "
                "give lh_file/rh_file in the cohort table to choose one"
            )
    searched = " and ".join(str(f) for f in folders)
    raise FileNotFoundError(
        f"Subject '{subject_id}': no {hemi} {measure} file on {template}; looked for "
        f"{hemi}.{measure}.{template}.mgh/.mgz and {hemi}.{measure}.fwhm*.{template}.mgh/.mgz in {searched}"
    )


def load_cohort_surface_data(
    cohort,
    subjects_dir=None,
    template: str = "fsaverage5",
    measure: str = "thickness",
    executor: str | None = None,
    n_jobs: int | None = None,
    on_result=None,
) -> np.ndarray:
    """Read every subject's left and right maps into one array.

    Parameters
    ----------
    cohort : pandas.DataFrame
        Cohort table (see :func:`neuroatrophy.cohort.read_cohort`) with a ``subject_id``
        column (or index). Rows with ``lh_file`` and ``rh_file`` use those paths;
        relative paths are resolved against the folder of ``cohort.attrs["source"]``
        when set, else the working directory. Other rows are looked up with
        :func:`find_thickness_files` in ``subjects_dir``.
    subjects_dir : str or path-like, optional
        FreeSurfer subjects folder.
    template : str
        Template the maps are resampled to; sets the expected vertex count.
    measure : str
        Morphometric measure (``"thickness"``, ``"area"``, ...). Negative values are
        rejected for thickness (zeros, as on the medial wall, are allowed).
    executor : {"joblib", "sequential", "dask"}, optional
        Backend of :func:`neuroatrophy.parallel.parallel_map` used to read the files.
    n_jobs : int, optional
        Number of parallel readers.
    on_result : callable, optional
        Progress callback ``on_result(index, row)`` passed to ``parallel_map``.

    Returns
    -------
    ndarray of shape (n_subjects, 2 * n_per_hemi), float64
        Left hemisphere then right, rows in the cohort's order.
    """
    from .parallel import parallel_map

    if template not in TEMPLATE_VERTICES:
        raise ValueError(f"template must be one of {list(TEMPLATE_VERTICES)}, got {template!r}")
    n_per_hemi = TEMPLATE_VERTICES[template]
    subject_ids = _subject_ids(cohort)
    if not subject_ids:
        raise ValueError("The cohort has no subjects")
    base = Path(cohort.attrs["source"]).parent if cohort.attrs.get("source") else Path.cwd()
    has_files = "lh_file" in cohort.columns and "rh_file" in cohort.columns

    tasks = []
    for row, subject_id in enumerate(subject_ids):
        files = None
        if has_files:
            lh, rh = cohort["lh_file"].iloc[row], cohort["rh_file"].iloc[row]
            if _is_given(lh) and _is_given(rh):
                files = (_resolve(lh, base), _resolve(rh, base))
        if files is None and subjects_dir is None:
            raise ValueError(
                f"Subject '{subject_id}': no lh_file/rh_file in the cohort table and no subjects_dir given"
            )
        tasks.append((subject_id, files))

    def read_subject(task):
        subject_id, files = task
        if files is None:
            files = find_thickness_files(subjects_dir, subject_id, template, measure)
        return np.concatenate([_read_checked(path, subject_id, n_per_hemi, template, measure) for path in files])

    rows = parallel_map(read_subject, tasks, n_jobs=n_jobs, backend=executor, prefer="threads", on_result=on_result)
    return np.vstack(rows)


def _subject_ids(cohort) -> list[str]:
    if "subject_id" in cohort.columns:
        return [str(s) for s in cohort["subject_id"]]
    return [str(s) for s in cohort.index]


def _resolve(value, base: Path) -> Path:
    path = Path(str(value).strip()).expanduser()
    return path if path.is_absolute() else base / path


def _is_given(value) -> bool:
    import pandas as pd

    return not pd.isna(value) and bool(str(value).strip())


def _read_checked(path: Path, subject_id: str, n_per_hemi: int, template: str, measure: str) -> np.ndarray:
    try:
        data = read_surface_data(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"Subject '{subject_id}': {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"Subject '{subject_id}': {exc}") from exc
    if len(data) != n_per_hemi:
        raise ValueError(
            f"Subject '{subject_id}': {path} has {len(data)} values; {template} expects {n_per_hemi} per hemisphere"
            f"{_count_hint(len(data))}"
        )
    bad = ~np.isfinite(data)
    if bad.any():
        raise ValueError(
            f"Subject '{subject_id}': {path} has {int(bad.sum())} NaN or infinite values "
            f"(first at vertex {int(np.flatnonzero(bad)[0])})"
        )
    if measure == "thickness" and (data < 0).any():
        negative = data < 0
        raise ValueError(
            f"Subject '{subject_id}': {path} has {int(negative.sum())} negative thickness values "
            f"(minimum {data.min():.3g} at vertex {int(np.argmin(data))})"
        )
    return data


def _count_hint(n: int) -> str:
    match = match_vertex_count(n)
    if match is None:
        return " (no fsaverage template has this count)"
    template, part = match
    if part == "hemisphere":
        return f" ({n} is the per-hemisphere count of {template})"
    return f" ({n} is the count of both hemispheres of {template}; give one file per hemisphere)"
