"""Normative resting-state connectome store.

A connectome store is a folder of preprocessed resting-state time series of healthy
subjects, each kept as one ``(T, V)`` array whose columns (vertices or voxels) are
centred and scaled to unit L2 norm. With that normalisation the Pearson correlation
of any two nodes, or of a node and a seed time series, is a plain dot product, which
is what makes seed-based connectivity (:mod:`neuroatrophy.network`) one matrix
product per subject. Arrays are ``.npy`` files opened memory-mapped, so a store
larger than RAM works: one subject is in memory at a time.

On-disk layout (format version 1; see ``docs/connectome-format.md``)::

    <store>/
        connectome.json           manifest: format, version, space, dtype, preprocessing, subjects
        valid.npy                 (V,) bool, nodes with signal in every subject
        mask.nii.gz               MNI152-2mm stores only: the grey-matter grid (nodes = mask voxels, C order)
        subjects/<id>.npy         (T_s, V) float16 or float32, one per subject

Subjects are written atomically (temporary file, then rename) and the manifest is
rewritten after each one, so an interrupted build resumes where it stopped and a
finished store can be extended with more subjects.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .io import atomic_write, safe_file_stem

__all__ = [
    "FORMAT_VERSION",
    "SPACES",
    "ConnectomeStore",
    "preprocess_timeseries",
    "read_run",
    "read_confounds",
    "build_connectome",
    "mni_gm_grid",
    "fsaverage5_coordinates",
]

FORMAT_VERSION = 1
FORMAT_NAME = "neuroatrophy-connectome"
SPACES = ("fsaverage5", "MNI152-2mm")
DTYPES = ("float16", "float32")
MANIFEST = "connectome.json"
MIN_TIMEPOINTS = 10
_EPS = 1e-8


# --------------------------------------------------------------------------- preprocessing
def preprocess_timeseries(timeseries, confounds=None, global_signal=False, bandpass=None, tr=None,
                          name="time series") -> np.ndarray:
    """Denoise a run and normalise every column to zero mean and unit L2 norm.

    Parameters
    ----------
    timeseries : array of shape (T, V)
        Time along axis 0.
    confounds : array of shape (T, C), optional
        Nuisance regressors (motion, CSF, WM, ...), regressed out together with a constant.
    global_signal : bool
        Also regress the mean time series over nodes with signal (global signal
        regression, as the sgACC-anticorrelation literature does).
    bandpass : (low, high) in Hz, optional
        Zero-phase Butterworth band-pass (either bound may be None). Data and confounds
        are filtered alike before the regression, so that the regression does not
        re-introduce frequencies the filter removed. Requires ``tr``.
    tr : float, optional
        Repetition time in seconds.
    name : str
        How the run is named in error messages.

    Returns
    -------
    ndarray of shape (T, V), float64
        Columns centred with unit norm; columns without signal (constant, e.g. the
        medial wall) are all zero.
    """
    data = np.array(timeseries, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"{name}: time series must be 2-D (time, nodes), got shape {data.shape}")
    n_time = data.shape[0]
    if n_time < MIN_TIMEPOINTS:
        raise ValueError(f"{name}: only {n_time} time points; at least {MIN_TIMEPOINTS} are needed")
    if not np.all(np.isfinite(data)):
        bad = np.flatnonzero(~np.isfinite(data).all(axis=0))
        raise ValueError(f"{name}: non-finite values in {len(bad)} node(s), first at node {bad[0]}")
    regressors = _check_confounds(confounds, n_time, name)
    if bandpass is not None:
        data = _bandpass(data, bandpass, tr, name)
        if regressors is not None:
            regressors = _bandpass(regressors, bandpass, tr, name)
    if global_signal:
        signal = np.ptp(data, axis=0) > _EPS
        regressors = _stack(regressors, data[:, signal].mean(axis=1, keepdims=True))
    data -= data.mean(axis=0)
    if regressors is not None:
        data -= _projection(regressors) @ data
    return _unit_norm_columns(data)


def _check_confounds(confounds, n_time, name):
    if confounds is None:
        return None
    regressors = np.asarray(confounds, dtype=np.float64)
    if regressors.ndim == 1:
        regressors = regressors[:, None]
    if regressors.ndim != 2 or regressors.shape[0] != n_time:
        raise ValueError(
            f"{name}: confounds have {regressors.shape[0] if regressors.ndim else 0} rows but the time series "
            f"has {n_time} time points; they must match"
        )
    if not np.all(np.isfinite(regressors)):
        raise ValueError(f"{name}: confounds contain non-finite values")
    return regressors


def _stack(first, second):
    return second if first is None else np.hstack([first, second])


def _projection(regressors: np.ndarray) -> np.ndarray:
    """(T, T) projection onto the centred confounds' column space (rank-revealing)."""
    centred = regressors - regressors.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    keep = s > s.max() * 1e-10 if s.size and s.max() > 0 else np.zeros(0, bool)
    basis = u[:, keep]
    return basis @ basis.T


def _unit_norm_columns(data: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(data, axis=0)
    signal = norms > _EPS * np.sqrt(data.shape[0])
    data[:, ~signal] = 0.0
    data[:, signal] /= norms[signal]
    return data


def _bandpass(data, bandpass, tr, name):
    from scipy import signal

    if tr is None or not np.isfinite(tr) or tr <= 0:
        raise ValueError(f"{name}: band-pass filtering needs the repetition time (tr > 0 seconds), got {tr!r}")
    low, high = bandpass
    nyquist = 0.5 / tr
    low = None if low in (None, 0) else float(low)
    high = None if high is None or float(high) >= nyquist else float(high)
    if low is not None and high is not None and low >= high:
        raise ValueError(f"{name}: band-pass low cut-off {low} Hz must be below the high cut-off {high} Hz")
    if low is None and high is None:
        return data
    if low is None:
        sos = signal.butter(4, high, btype="lowpass", fs=1 / tr, output="sos")
    elif high is None:
        sos = signal.butter(4, low, btype="highpass", fs=1 / tr, output="sos")
    else:
        sos = signal.butter(4, [low, high], btype="bandpass", fs=1 / tr, output="sos")
    return signal.sosfiltfilt(sos, data, axis=0)


# --------------------------------------------------------------------------- grids and geometry
@functools.lru_cache(maxsize=None)
def fsaverage5_coordinates() -> np.ndarray:
    """(20484, 3) mid-thickness coordinates of fsaverage5 (mean of pial and white), MNI305 mm.

    fsaverage's space is MNI305; it differs from MNI152 by a few mm, which is below the
    10-mm radius of the spheres used for targets and seeds.
    """
    from .surface import load_fsaverage5

    coordinates = 0.5 * (load_fsaverage5("pial").vertices + load_fsaverage5("white").vertices)
    coordinates.flags.writeable = False
    return coordinates


@functools.lru_cache(maxsize=None)
def mni_gm_grid():
    """nilearn's MNI152 (2009) grey-matter mask at 2 mm: ``(mask (99, 117, 95) bool, affine (4, 4))``."""
    from nilearn import datasets

    image = datasets.load_mni152_gm_mask(resolution=2)
    mask = np.asarray(image.dataobj) > 0
    mask.flags.writeable = False
    return mask, np.array(image.affine, dtype=np.float64)


def _grid_coordinates(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask)  # C order, the node order of volume stores
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _grid_adjacency(mask: np.ndarray) -> sp.csr_matrix:
    index = np.full(mask.shape, -1, dtype=np.int64)
    index[mask] = np.arange(int(mask.sum()))
    rows, cols = [], []
    for axis in range(3):
        a = np.moveaxis(index, axis, 0)
        here, there = a[:-1].ravel(), a[1:].ravel()
        both = (here >= 0) & (there >= 0)
        rows.append(here[both])
        cols.append(there[both])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    n = int(mask.sum())
    graph = sp.coo_matrix((np.ones(2 * len(rows)), (np.r_[rows, cols], np.r_[cols, rows])), shape=(n, n))
    return graph.tocsr()


# --------------------------------------------------------------------------- the store
class ConnectomeStore:
    """A folder of normalised resting-state time series (see the module docstring).

    Create with :meth:`create`, open with :meth:`open`, fill with :meth:`add_subject`
    or :func:`build_connectome`. ``timeseries(i)`` returns subject ``i``'s ``(T, V)``
    array, memory-mapped unless the store was opened with ``mmap=False``.
    """

    def __init__(self, path, manifest: dict, mmap: bool = True):
        self.path = Path(path)
        self._manifest = manifest
        self.mmap = bool(mmap)
        self._cache: dict[int, np.ndarray] = {}
        self._valid = None

    # -- creation and opening
    @classmethod
    def create(cls, path, space="fsaverage5", dtype="float16", global_signal=False, bandpass=None, tr=None,
               confound_columns=None, mask_img=None, description="") -> "ConnectomeStore":
        """Create an empty store at ``path`` (a new or empty folder).

        ``space`` is ``"fsaverage5"`` (20,484 vertices) or ``"MNI152-2mm"`` (the voxels of
        ``mask_img``, a 3-D NIfTI mask; default nilearn's 2-mm MNI152 grey-matter mask).
        ``dtype`` ``"float16"`` halves the size at an error in r below 1e-3.
        Preprocessing options are recorded and applied to every subject added.
        """
        path = Path(path)
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        if str(dtype) not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if path.exists() and any(path.iterdir()):
            raise ValueError(f"Connectome folder {path} exists and is not empty; open it to add subjects")
        if bandpass is not None:
            bandpass = [None if b is None else float(b) for b in bandpass]
            _bandpass(np.zeros((MIN_TIMEPOINTS, 1)), bandpass, tr, "bandpass option")
        path.mkdir(parents=True, exist_ok=True)
        (path / "subjects").mkdir(exist_ok=True)
        if space == "fsaverage5":
            n_nodes = 2 * 10242
        else:
            mask, affine = _mask_from_image(mask_img)
            n_nodes = int(mask.sum())
            _write_mask(path / "mask.nii.gz", mask, affine)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "space": space,
            "n_nodes": n_nodes,
            "dtype": str(dtype),
            "description": description,
            "preprocessing": {
                "global_signal": bool(global_signal),
                "bandpass_hz": bandpass,
                "tr": None if tr is None else float(tr),
                "confound_columns": None if confound_columns is None else list(confound_columns),
                "normalisation": "columns centred, unit L2 norm",
            },
            "subjects": [],
        }
        store = cls(path, manifest)
        store._write_manifest()
        return store

    @classmethod
    def open(cls, path, mmap: bool = True) -> "ConnectomeStore":
        """Open an existing store; ``mmap=False`` reads every subject into memory on first use."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"Not a connectome store: {path} has no {MANIFEST}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"Connectome manifest {manifest_path} is not valid JSON: {err}") from None
        if manifest.get("format") != FORMAT_NAME:
            raise ValueError(f"{manifest_path} is not a NeuroAtrophy connectome manifest")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path} has format version {version!r}; this NeuroAtrophy reads versions up to "
                f"{FORMAT_VERSION}. Update NeuroAtrophy."
            )
        if manifest.get("space") not in SPACES or manifest.get("dtype") not in DTYPES:
            raise ValueError(f"{manifest_path}: unknown space or dtype ({manifest.get('space')}, {manifest.get('dtype')})")
        return cls(path, manifest, mmap=mmap)

    # -- properties
    @property
    def space(self) -> str:
        return self._manifest["space"]

    @property
    def dtype(self) -> str:
        return self._manifest["dtype"]

    @property
    def n_nodes(self) -> int:
        return int(self._manifest["n_nodes"])

    @property
    def preprocessing(self) -> dict:
        return dict(self._manifest["preprocessing"])

    @property
    def subject_ids(self) -> list[str]:
        return [s["id"] for s in self._manifest["subjects"]]

    @property
    def n_timepoints(self) -> list[int]:
        return [int(s["n_timepoints"]) for s in self._manifest["subjects"]]

    def n_signal(self, index: int) -> int:
        """Number of nodes with signal in subject ``index`` (recorded at build time; counted
        from the data for subjects added before the manifest recorded it)."""
        entry = self._manifest["subjects"][index]
        if "n_signal" not in entry:
            entry["n_signal"] = int(np.count_nonzero(np.abs(self.timeseries(index)).max(axis=0)))
        return int(entry["n_signal"])

    def __len__(self) -> int:
        return len(self._manifest["subjects"])

    def __repr__(self) -> str:
        return (f"ConnectomeStore({str(self.path)!r}, space={self.space!r}, subjects={len(self)}, "
                f"nodes={self.n_nodes}, dtype={self.dtype!r})")

    def info(self) -> dict:
        """The manifest's summary (no subject list) plus size on disk, for ``neuroatrophy connectome info``."""
        size = sum((self.path / s["file"]).stat().st_size for s in self._manifest["subjects"])
        timepoints = self.n_timepoints
        return {
            "path": str(self.path),
            "format_version": self._manifest["format_version"],
            "space": self.space,
            "n_nodes": self.n_nodes,
            "n_valid_nodes": int(self.valid.sum()) if len(self) else 0,
            "dtype": self.dtype,
            "n_subjects": len(self),
            "timepoints_min": min(timepoints) if timepoints else 0,
            "timepoints_max": max(timepoints) if timepoints else 0,
            "size_bytes": size,
            "preprocessing": self.preprocessing,
            "description": self._manifest.get("description", ""),
        }

    @property
    def valid(self) -> np.ndarray:
        """(V,) bool: nodes with signal in every subject."""
        if self._valid is None:
            file = self.path / "valid.npy"
            self._valid = np.load(file, allow_pickle=False) if file.is_file() else np.zeros(self.n_nodes, bool)
        return self._valid

    def mask(self):
        """MNI stores: ``(mask bool 3-D, affine)`` of the voxel grid; None for surface stores."""
        if self.space != "MNI152-2mm":
            return None
        import nibabel as nib

        image = nib.load(self.path / "mask.nii.gz")
        return np.asarray(image.dataobj) > 0, np.array(image.affine, dtype=np.float64)

    def coordinates(self) -> np.ndarray:
        """(V, 3) MNI coordinates (mm) of the nodes."""
        if self.space == "fsaverage5":
            return np.array(fsaverage5_coordinates())
        mask, affine = self.mask()
        return _grid_coordinates(mask, affine)

    def adjacency(self) -> sp.csr_matrix:
        """Node adjacency: fsaverage5 mesh edges, or 6-connected neighbouring voxels."""
        if self.space == "fsaverage5":
            from .surface import load_fsaverage5

            return load_fsaverage5("white").adjacency()
        return _grid_adjacency(self.mask()[0])

    def timeseries(self, index: int) -> np.ndarray:
        """Subject ``index``'s normalised ``(T, V)`` time series (read-only)."""
        subjects = self._manifest["subjects"]
        if not -len(subjects) <= index < len(subjects):
            raise IndexError(f"subject index {index} out of range for {len(subjects)} subjects")
        index = index % len(subjects)
        if not self.mmap and index in self._cache:
            return self._cache[index]
        entry = subjects[index]
        file = self.path / entry["file"]
        if not file.is_file():
            raise FileNotFoundError(f"Connectome subject {entry['id']!r}: file {file} is missing")
        array = np.load(file, mmap_mode="r" if self.mmap else None, allow_pickle=False)
        if array.shape != (entry["n_timepoints"], self.n_nodes) or array.dtype != np.dtype(self.dtype):
            raise ValueError(f"Connectome subject {entry['id']!r}: {file} has shape {array.shape} {array.dtype}, "
                             f"expected ({entry['n_timepoints']}, {self.n_nodes}) {self.dtype}")
        if not self.mmap:
            array.flags.writeable = False
            self._cache[index] = array
        return array

    # -- writing
    def has_subject(self, subject_id) -> bool:
        return str(subject_id) in self.subject_ids

    def add_subject(self, subject_id, timeseries, confounds=None, preprocessed=False) -> None:
        """Preprocess one subject's run(s) with the store's options and add it.

        ``timeseries`` is ``(T, V)`` or a list of runs (each ``(T_r, V)``, with ``confounds``
        a matching list); runs are preprocessed separately and concatenated in time.
        ``preprocessed=True`` stores already denoised data (only centring and scaling).
        """
        subject_id = _check_subject_id(subject_id)
        if self.has_subject(subject_id):
            raise ValueError(f"Connectome subject {subject_id!r} is already in {self.path}")
        runs = timeseries if isinstance(timeseries, (list, tuple)) else [timeseries]
        confounds = confounds if isinstance(confounds, (list, tuple)) else [confounds] * len(runs)
        if len(confounds) != len(runs):
            raise ValueError(f"Subject {subject_id!r}: {len(runs)} runs but {len(confounds)} confound tables")
        options = self._manifest["preprocessing"]
        parts = []
        for r, (run, conf) in enumerate(zip(runs, confounds)):
            name = f"subject {subject_id!r}" + (f" run {r + 1}" if len(runs) > 1 else "")
            run = np.asarray(run)
            if run.ndim != 2 or run.shape[1] != self.n_nodes:
                raise ValueError(
                    f"{name}: time series has shape {run.shape}; this {self.space} connectome needs "
                    f"(time, {self.n_nodes})"
                )
            if preprocessed:
                parts.append(preprocess_timeseries(run, name=name))
            else:
                parts.append(preprocess_timeseries(
                    run, conf, global_signal=options["global_signal"], bandpass=options["bandpass_hz"],
                    tr=options["tr"], name=name,
                ))
        data = parts[0] if len(parts) == 1 else _unit_norm_columns(np.vstack(parts))
        self._write_subject(subject_id, data)

    def _write_subject(self, subject_id: str, data: np.ndarray) -> None:
        stored = data.astype(self.dtype)
        file = f"subjects/{safe_file_stem(subject_id, self._used_files(), default='subject')}.npy"
        with atomic_write(self.path / file) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, stored, allow_pickle=False)
        signal = np.abs(stored).max(axis=0) > 0
        valid = signal if len(self) == 0 else (self.valid & signal)
        with atomic_write(self.path / "valid.npy") as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, valid, allow_pickle=False)
        self._valid = valid
        self._manifest["subjects"].append(
            {"id": subject_id, "file": file, "n_timepoints": int(stored.shape[0]), "n_signal": int(signal.sum())}
        )
        self._write_manifest()

    def _used_files(self) -> set[str]:
        return {Path(s["file"]).stem.lower() for s in self._manifest["subjects"]}

    def _write_manifest(self) -> None:
        with atomic_write(self.path / MANIFEST) as tmp:
            tmp.write_text(json.dumps(self._manifest, indent=2))


def _check_subject_id(subject_id) -> str:
    subject_id = str(subject_id).strip()
    if not subject_id:
        raise ValueError("subject_id must be a non-empty string")
    return subject_id


def _mask_from_image(mask_img):
    if mask_img is None:
        return mni_gm_grid()
    import nibabel as nib

    image = nib.load(mask_img) if isinstance(mask_img, (str, os.PathLike)) else mask_img
    mask = np.asarray(image.dataobj)
    if mask.ndim != 3:
        raise ValueError(f"mask_img must be a 3-D image, got shape {mask.shape}")
    mask = mask > 0
    if not mask.any():
        raise ValueError("mask_img has no voxels inside the mask")
    return mask, np.array(image.affine, dtype=np.float64)


def _write_mask(path: Path, mask: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    with atomic_write(path) as tmp:
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), tmp)


# --------------------------------------------------------------------------- reading runs
def read_confounds(path, columns=None) -> np.ndarray:
    """Confound table: whitespace-separated numbers without a header (FSL/brainspace),
    or a CSV/TSV with a header (fMRIPrep; ``n/a`` in the first rows of derivative
    columns become 0). ``columns`` selects named columns from a table with a header."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Confounds file not found: {path}")
    first = path.read_text().splitlines()[:1]
    has_header = bool(first) and any(re.match(r"^[A-Za-z_]", tok) for tok in re.split(r"[,\t ]+", first[0].strip()))
    if has_header:
        sep = "\t" if "\t" in first[0] else ","
        table = pd.read_csv(path, sep=sep, na_values=["n/a"])
        if columns is not None:
            missing = [c for c in columns if c not in table.columns]
            if missing:
                raise ValueError(f"Confounds file {path}: no column(s) {missing}; it has {list(table.columns)[:20]}")
            table = table[list(columns)]
        try:
            values = table.apply(pd.to_numeric, errors="raise").fillna(0.0).to_numpy(np.float64)
        except (ValueError, TypeError):
            raise ValueError(f"Confounds file {path} has non-numeric columns; select numeric ones") from None
    else:
        if columns is not None:
            raise ValueError(f"Confounds file {path} has no header, so columns cannot be selected by name")
        try:
            values = np.loadtxt(path, ndmin=2)
        except ValueError as err:
            raise ValueError(f"Confounds file {path} could not be read as numbers: {err}") from None
    if not np.all(np.isfinite(values)):
        raise ValueError(f"Confounds file {path} contains non-finite values")
    return values


def read_run(files, space="fsaverage5", grid=None) -> np.ndarray:
    """Read one run as a ``(T, V)`` array in the store's node order.

    ``files`` is ``(lh, rh)`` for fsaverage5 (MGH/MGZ ``10242 x 1 x 1 x T``, a
    functional GIfTI with one data array per time point or one 2-D array, or ``.npy``
    ``(10242, T)``), or one 4-D NIfTI for ``"MNI152-2mm"``; ``grid`` is the store's
    ``(mask, affine)``. An image on another grid is resampled (linear) onto it.
    """
    if space == "fsaverage5":
        if isinstance(files, (str, os.PathLike)) or len(files) != 2:
            raise ValueError("fsaverage5 runs need two files: (left hemisphere, right hemisphere)")
        left, right = (_read_hemisphere_series(Path(f)) for f in files)
        for hemi, f, series in (("left", files[0], left), ("right", files[1], right)):
            if series.shape[0] != 10242:
                raise ValueError(_vertex_count_message(Path(f), hemi, series.shape[0]))
        if left.shape[1] != right.shape[1]:
            raise ValueError(
                f"Time series of different lengths: {Path(files[0]).name} has {left.shape[1]} time points, "
                f"{Path(files[1]).name} has {right.shape[1]}"
            )
        return np.concatenate([left, right]).T
    if space == "MNI152-2mm":
        path = Path(files[0] if isinstance(files, (list, tuple)) else files)
        return _read_volume_series(path, grid)
    raise ValueError(f"space must be one of {SPACES}, got {space!r}")


def _vertex_count_message(path: Path, hemi: str, n: int) -> str:
    from .surface import template_from_n_vertices

    template = template_from_n_vertices(n)
    hint = f" (that is {template}; resample to fsaverage5 with mri_surf2surf)" if template else ""
    return f"{path}: {n} vertices in the {hemi} hemisphere; the connectome needs fsaverage5 (10242){hint}"


def _read_hemisphere_series(path: Path) -> np.ndarray:
    import nibabel as nib

    if not path.is_file():
        raise FileNotFoundError(f"Time-series file not found: {path}")
    name = path.name.lower()
    try:
        if name.endswith(".npy"):
            data = np.load(path, allow_pickle=False)
        elif name.endswith(".gii"):
            image = nib.load(path)
            arrays = [np.asarray(d.data) for d in image.darrays]
            data = np.column_stack(arrays) if len(arrays) > 1 else arrays[0]
        elif name.endswith((".mgh", ".mgz", ".nii", ".nii.gz")):
            data = np.asarray(nib.load(path).dataobj)
            data = data.reshape(data.shape[0], -1)
        else:
            raise ValueError(f"{path}: unknown time-series format (use .mgh/.mgz, .func.gii or .npy)")
    except (OSError, nib.filebasedimages.ImageFileError) as err:
        raise ValueError(f"{path} could not be read: {err}") from None
    if data.ndim != 2:
        raise ValueError(f"{path}: expected (vertices, time) data, got shape {data.shape}")
    return np.asarray(data, dtype=np.float32)


def _read_volume_series(path: Path, grid) -> np.ndarray:
    import nibabel as nib

    if not path.is_file():
        raise FileNotFoundError(f"Time-series file not found: {path}")
    image = nib.load(path)
    if len(image.shape) != 4:
        raise ValueError(f"{path}: a volume run must be a 4-D NIfTI, got shape {image.shape}")
    mask, affine = grid if grid is not None else mni_gm_grid()
    if image.shape[:3] != mask.shape or not np.allclose(image.affine, affine, atol=1e-3):
        from nilearn.image import resample_img

        image = resample_img(image, target_affine=affine, target_shape=mask.shape, interpolation="linear",
                             force_resample=True, copy_header=True)
    data = np.asarray(image.dataobj, dtype=np.float32)
    return data[mask].T


def build_connectome(path, runs: pd.DataFrame, space="fsaverage5", dtype="float16", global_signal=False,
                     bandpass=None, tr=None, confound_columns=None, mask_img=None, base_dir=None,
                     progress=None) -> ConnectomeStore:
    """Build (or resume, or extend) a store from a table of runs.

    ``runs`` has a ``subject_id`` column and either ``lh_file``/``rh_file`` (fsaverage5)
    or ``volume_file`` (MNI152-2mm), and optionally ``confounds_file``. Several rows with
    the same subject are runs concatenated after separate preprocessing. Subjects already
    in an existing store are skipped, so re-running the same command resumes an
    interrupted build and a longer table extends a finished one; the preprocessing
    options must then match the store's.
    """
    runs = _check_runs_table(runs, space)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    path = Path(path)
    if (path / MANIFEST).is_file():
        store = ConnectomeStore.open(path)
        _check_same_options(store, space, dtype, global_signal, bandpass, tr, confound_columns)
    else:
        store = ConnectomeStore.create(path, space=space, dtype=dtype, global_signal=global_signal,
                                       bandpass=bandpass, tr=tr, confound_columns=confound_columns,
                                       mask_img=mask_img)
    grid = store.mask()
    groups = list(runs.groupby("subject_id", sort=False))
    for done, (subject_id, rows) in enumerate(groups):
        if progress is not None:
            progress(done / len(groups), f"Connectome subject {subject_id} ({done + 1}/{len(groups)})")
        if store.has_subject(subject_id):
            continue
        series, confounds = [], []
        for _, row in rows.iterrows():
            files = ((_resolve(row["lh_file"], base), _resolve(row["rh_file"], base)) if space == "fsaverage5"
                     else _resolve(row["volume_file"], base))
            series.append(read_run(files, space, grid))
            confounds.append(_row_confounds(row, base, confound_columns))
        store.add_subject(subject_id, series, confounds)
    if progress is not None:
        progress(1.0, f"Connectome ready: {len(store)} subjects")
    return store


def _check_runs_table(runs, space) -> pd.DataFrame:
    if isinstance(runs, (str, os.PathLike)):
        file = Path(runs)
        if not file.is_file():
            raise FileNotFoundError(f"Runs table not found: {file}")
        runs = pd.read_csv(file, sep=None, engine="python", dtype={"subject_id": str})
    runs = pd.DataFrame(runs).copy()
    needed = ["subject_id"] + (["lh_file", "rh_file"] if space == "fsaverage5" else ["volume_file"])
    missing = [c for c in needed if c not in runs.columns]
    if missing:
        raise ValueError(f"Runs table: missing column(s) {missing} for a {space} connectome; "
                         f"it has {list(runs.columns)}")
    runs["subject_id"] = runs["subject_id"].astype(str).str.strip()
    if runs.empty:
        raise ValueError("Runs table has no rows")
    return runs


def _resolve(value, base: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"Runs table: empty file name ({value!r})")
    path = Path(value)
    return path if path.is_absolute() else base / path


def _row_confounds(row, base, columns):
    value = row.get("confounds_file") if hasattr(row, "get") else None
    if value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value.strip()):
        return None
    return read_confounds(_resolve(value, base), columns)


def _check_same_options(store, space, dtype, global_signal, bandpass, tr, confound_columns):
    options = store.preprocessing
    requested = {
        "space": (store.space, space),
        "dtype": (store.dtype, str(dtype)),
        "global_signal": (options["global_signal"], bool(global_signal)),
        "bandpass_hz": (options["bandpass_hz"], None if bandpass is None else [None if b is None else float(b)
                                                                                for b in bandpass]),
        "tr": (options["tr"], None if tr is None else float(tr)),
        "confound_columns": (options["confound_columns"], None if confound_columns is None
                             else list(confound_columns)),
    }
    different = {k: v for k, v in requested.items() if v[0] != v[1]}
    if different:
        detail = "; ".join(f"{k}: store has {a!r}, requested {b!r}" for k, (a, b) in different.items())
        raise ValueError(f"Connectome {store.path} was built with other options ({detail}). "
                         "Use the same options to resume or extend it, or build a new store.")
