"""Resting-state data behind the demo connectome: one real fsaverage5 run and simulated subjects.

Three sources, all offline:

* **One real run** (:func:`brainspace_run`): the resting-state fMRI run that the
  ``brainspace`` 0.3.0 wheel ships for its preprocessing tutorial, already sampled
  on fsaverage5 (subject ``sub-010188`` of the MPI-Leipzig Mind-Brain-Body
  dataset, OpenNeuro ds000221, session 2, run ``acq-AP_run-01``; 652 volumes) with
  its confound table. ``brainspace`` is not imported (it imports ``vtk``); only its
  data files are read.
* **HCP group connectivity** (:func:`hcp_dk_connectivity`): the group-average
  functional connectivity of the Human Connectome Project between the 68
  Desikan-Killiany cortical regions, as distributed by the ENIGMA Toolbox
  (vendored in ``data/``, BSD-3-Clause, see ``data/LICENSE-ENIGMA``).
* **Simulated subjects** (:func:`simulate_connectome_subjects`): any number of
  fsaverage5 resting-state runs whose group connectivity between regions matches
  the HCP matrix, with known ground truth, streamed one subject at a time.

Simulation model (per subject ``s``; ``r(v)`` the DK region of vertex ``v``)::

    y_s[t, v] = a_v * x_s[t, r(v)] + sqrt(1 - a_v**2) * e_s[t, v]

* ``x_s`` (T x 68): region time series, Gaussian, unit variance, stationary
  AR(1) in time with coefficient ``ar_coefficient`` (0.4 by default, in the
  range of unfiltered BOLD at TR ~2 s; band-passed data are smoother: the real
  run's lag-one autocorrelation is 0.95 at TR 1.4 s), with correlation matrix
  ``C_s`` between regions: the HCP matrix (Fisher z, see
  :func:`hcp_dk_connectivity`) plus symmetric normal noise of SD
  ``subject_variability`` per connection in Fisher-z space, back-transformed
  and projected on the nearest valid correlation matrix
  (:func:`nearest_correlation`).
* ``e_s`` (T x V): vertex noise, white noise smoothed on the fsaverage5 mesh
  (``noise_smoothing`` neighbour-averaging steps, the operator of
  :func:`~neuroatrophy.surface.smooth_on_surface`), rescaled to unit variance at
  every vertex, with the same AR(1) temporal structure as ``x_s``. Signal and
  noise share one temporal spectrum, so temporal filtering (band-pass) leaves
  the expected correlations unchanged.
* ``a_v`` (:attr:`SimulationTruth.loadings`): the vertex's loading on its region,
  ``a_v**2`` the fraction of its variance shared with the region. The mean of
  ``a_v**2`` over the cortex is ``within_region`` (0.6). By default ``a_v**2``
  varies smoothly over the cortex by +-30 % (1 SD; a fixed smooth random field
  drawn from ``seed``), mimicking the regional differences in signal-to-noise of
  real data; ``loading_pattern`` replaces that field, e.g. with
  :func:`region_loadings` of the real run.
* Medial-wall vertices (DK label 0) are exactly 0 at every time point (constant),
  as in real fsaverage5 runs.

Every vertex then has unit variance. With the defaults (2 smoothing steps,
``within_region = 0.6``) the median correlation of neighbouring vertices is
0.91 and of vertices two edges apart 0.76; in the real run they are 0.91 and
0.75.

``subject_variability`` is the SD of the deviation added in Fisher z *before*
the projection onto a valid correlation matrix, which shrinks it: the realised
SD of a subject's deviation from the group is ~0.11 for the default 0.15 and
~0.16 for 0.3. Each simulated subject (200 time points) then matches the HCP
matrix with r ~0.76 (default) or ~0.58 (0.3), the group average of 40 subjects
with r ~0.98; the single real run (652 time points) matches it with r = 0.54.

Every subject has its own random stream, spawned from ``seed`` by subject index,
so subject ``i`` is the same whatever ``n_subjects`` is and can be regenerated
on its own (:meth:`ConnectomeSimulation.subject`).

References
----------
Mendes N, et al. A functional connectome phenotyping dataset including
cognitive state and personality measures. Sci Data 6, 180307 (2019).
(MPI-Leipzig Mind-Brain-Body, the source of the brainspace run.)

Larivière S, et al. Network-based atrophy modeling in the common epilepsies: A
worldwide ENIGMA study. Sci Adv 6, eabc6457 (2020). (HCP connectivity matrices.)

Larivière S, et al. The ENIGMA Toolbox: multiscale neural contextualization of
multisite neuroimaging datasets. Nat Methods 18, 698-700 (2021).

Vos de Wael R, et al. BrainSpace: a toolbox for the analysis of macroscale
gradients in neuroimaging and connectomics datasets. Commun Biol 3, 103 (2020).
"""

from __future__ import annotations

import functools
import importlib.util
import operator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .surface import DK_NAMES, TEMPLATE_VERTICES, dk_atlas, load_fsaverage5, smooth_on_surface

__all__ = [
    "BRAINSPACE_TR",
    "RestingRun",
    "brainspace_data_files",
    "brainspace_run",
    "hcp_dk_connectivity",
    "nearest_correlation",
    "region_mean_timeseries",
    "region_loadings",
    "SimulationTruth",
    "ConnectomeSimulation",
    "simulate_connectome_subjects",
]

#: Repetition time (s) of the brainspace run. The MGH headers of the two files say
#: 1000 ms, but that is not the acquisition's: the run comes from the
#: MPI-Leipzig Mind-Brain-Body dataset (OpenNeuro ds000221, ``ses-02`` =
#: "Neuroanatomy & Connectivity" protocol), whose resting-state runs were acquired
#: with TR = 1.4 s (2.3 mm voxels); the dataset's preprocessing pipelines
#: (``lsd_resting``, ``TR=1.4``, ``vol_to_remove=5``) drop the first 5 volumes,
#: consistent with the 652 volumes here (Mendes et al., Sci Data 2019).
BRAINSPACE_TR = 1.4

_BRAINSPACE_RUN = "sub-010188_ses-02_task-rest_acq-AP_run-01"
_BRAINSPACE_SUBJECT = "sub-010188"
_BRAINSPACE_HINT = "pip install brainspace==0.3.0"
_N_PER_HEMISPHERE = TEMPLATE_VERTICES["fsaverage5"]

# Simulation constants (see the module docstring).
_LOADING_SPREAD = 0.3          # relative SD of a_v**2 over the cortex (default pattern)
_LOADING_FIELD_STEPS = 20      # smoothing steps of the default loading pattern
_LOADING_SQ_RANGE = (0.02, 0.98)
_MIN_EIGENVALUE = 1e-2         # floor of the subject correlation matrices' eigenvalues


# ---------------------------------------------------------------- the real run
@dataclass(eq=False)
class RestingRun:
    """One resting-state fMRI run on fsaverage5.

    Attributes
    ----------
    timeseries : ndarray of shape (T, 20484), float32
        Vertex time series, time along axis 0, left hemisphere then right.
    confounds : ndarray of shape (T, C), float64
        Nuisance regressors, one row per time point.
    subject_id : str
    tr : float
        Repetition time in seconds.
    files : list of Path
        The files read (left hemisphere, right hemisphere, confounds).
    """

    timeseries: np.ndarray
    confounds: np.ndarray
    subject_id: str
    tr: float
    files: list = field(default_factory=list)

    @property
    def n_timepoints(self) -> int:
        """Number of time points (volumes)."""
        return int(self.timeseries.shape[0])


def brainspace_data_files() -> dict:
    """Paths of the brainspace wheel's fsaverage5 resting-state run.

    Returns
    -------
    dict
        ``{"lh": Path, "rh": Path, "confounds": Path}``: the two hemispheres'
        ``.mgz`` time series (10242 x 1 x 1 x 652 each) and the confound table
        (652 rows, whitespace-separated).

    Raises
    ------
    FileNotFoundError
        If brainspace is not installed or its data files are missing; the message
        says how to install it.
    """
    spec = importlib.util.find_spec("brainspace")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The brainspace package (data files of the demo resting-state run) is not installed: {_BRAINSPACE_HINT}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "preprocessing"
    files = {
        "lh": folder / f"{_BRAINSPACE_RUN}.fsa5.lh.mgz",
        "rh": folder / f"{_BRAINSPACE_RUN}.fsa5.rh.mgz",
        "confounds": folder / f"{_BRAINSPACE_RUN}_confounds.txt",
    }
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"brainspace is installed but its resting-state run is missing ({', '.join(missing)}): {_BRAINSPACE_HINT}"
        )
    return files


def brainspace_run() -> RestingRun:
    """The real fsaverage5 resting-state run shipped with brainspace 0.3.0.

    Subject ``sub-010188`` of the MPI-Leipzig Mind-Brain-Body dataset (session 2,
    run ``acq-AP_run-01``): 652 volumes at TR = 1.4 s (:data:`BRAINSPACE_TR`;
    the files' headers say 1 s, see there), sampled on fsaverage5 by the
    brainspace authors, with its 29 confound columns (6 unit-norm, CompCor-like
    components, 6 motion parameters and their 6 derivatives, 8 spike regressors,
    and a constant, linear and quadratic trend). Every vertex is already
    demeaned, and the confounds explain only chance-level variance (median R^2
    0.045 with 29 regressors over 652 points), so the time series appear to be
    cleaned of them already; regressing them again is harmless. About 1,770
    vertices, nearly all on the medial wall, are constant (0).

    Returns
    -------
    RestingRun
        ``timeseries`` (652, 20484) float32, ``confounds`` (652, 29) float64.

    Raises
    ------
    FileNotFoundError
        If brainspace is not installed (``pip install brainspace==0.3.0``).
    ValueError
        If a file does not hold what is expected (the message names it).
    """
    files = brainspace_data_files()
    hemispheres = [_read_hemisphere_timeseries(files[hemi]) for hemi in ("lh", "rh")]
    if hemispheres[0].shape[1] != hemispheres[1].shape[1]:
        raise ValueError(
            f"The hemispheres have different numbers of time points: {files['lh'].name} "
            f"{hemispheres[0].shape[1]}, {files['rh'].name} {hemispheres[1].shape[1]}"
        )
    timeseries = np.ascontiguousarray(np.concatenate(hemispheres).T)
    confounds = np.loadtxt(files["confounds"], dtype=np.float64, ndmin=2)
    if confounds.shape[0] != timeseries.shape[0]:
        raise ValueError(
            f"{files['confounds']} has {confounds.shape[0]} rows but the run has {timeseries.shape[0]} time points"
        )
    return RestingRun(
        timeseries=timeseries,
        confounds=confounds,
        subject_id=_BRAINSPACE_SUBJECT,
        tr=BRAINSPACE_TR,
        files=[files["lh"], files["rh"], files["confounds"]],
    )


def _read_hemisphere_timeseries(path: Path) -> np.ndarray:
    """(10242, T) float32 time series of one fsaverage5 hemisphere from an MGH/MGZ file."""
    import nibabel as nib

    image = nib.load(str(path))
    shape = image.shape
    if len(shape) != 4 or shape[0] != _N_PER_HEMISPHERE or shape[1] != 1 or shape[2] != 1:
        raise ValueError(
            f"{path} is not an fsaverage5 hemisphere time series: shape {shape}, expected (10242, 1, 1, T)"
        )
    data = np.asarray(image.dataobj, dtype=np.float32).reshape(_N_PER_HEMISPHERE, shape[3])
    if not np.isfinite(data).all():
        raise ValueError(f"{path} contains non-finite values")
    return data


# ---------------------------------------------------------------- HCP group connectivity
def hcp_dk_connectivity() -> pd.DataFrame:
    """HCP group-average functional connectivity between the 68 Desikan-Killiany regions.

    The cortico-cortical resting-state matrix of the ENIGMA Toolbox
    (``funcMatrix_ctx.csv`` with ``funcLabels_ctx.csv``, from
    ``enigmatoolbox/datasets/matrices/hcp_connectivity/``; Larivière et al., Sci Adv
    2020, Nat Methods 2021). Values are Fisher z of Pearson correlations averaged
    over HCP participants (they exceed 1 for the strongest connections), with
    negative connections set to zero (the minimum is 0) and a zero diagonal.
    Derived from HCP data (WU-Minn consortium), which publications should
    acknowledge.

    We use this DK matrix rather than brainspace's HCP matrices (Schaefer and Vos de
    Wael parcellations, ``load_group_fc``) because those parcellations are defined
    on the conte69 (fs_LR 32k) surface, which has no offline fsaverage5 version,
    while the DK atlas is available on fsaverage5 (``data/aparc_fsa5.csv``,
    :func:`~neuroatrophy.surface.dk_atlas`), the space of the connectome and of the
    atrophy maps.

    Returns
    -------
    pandas.DataFrame
        68 x 68, exactly symmetric, index and columns the region names of
        :data:`~neuroatrophy.surface.DK_NAMES` (``"L_bankssts"`` ...
        ``"R_insula"``, the labels of the ENIGMA file, same spelling and order).
        A new object on each call.
    """
    names, matrix = _hcp_dk_cached()
    frame = pd.DataFrame(matrix.copy(), index=pd.Index(names, name="region"), columns=pd.Index(names, name="region"))
    return frame


@functools.lru_cache(maxsize=None)
def _hcp_dk_cached():
    folder = resources.files("neuroatrophy") / "data"
    with resources.as_file(folder / "funcLabels_ctx.csv") as path:
        labels = [name.strip() for name in Path(path).read_text().strip().split(",")]
    with resources.as_file(folder / "funcMatrix_ctx.csv") as path:
        matrix = np.loadtxt(path, delimiter=",", dtype=np.float64)
        source = Path(path)
    n = len(DK_NAMES)
    if matrix.shape != (n, n) or not np.isfinite(matrix).all():
        raise ValueError(f"{source} must hold a finite {n} x {n} matrix, got shape {matrix.shape}")
    unknown = sorted(set(labels) - set(DK_NAMES))
    if len(labels) != n or unknown:
        labels_file = source.with_name("funcLabels_ctx.csv")
        raise ValueError(f"{labels_file} does not list the 68 DK regions (unknown: {unknown})")
    order = [labels.index(name) for name in DK_NAMES]
    matrix = matrix[np.ix_(order, order)]
    if np.abs(matrix - matrix.T).max() > 1e-8:
        raise ValueError(f"{source} is not symmetric")
    matrix = (matrix + matrix.T) / 2  # exact symmetry (the file is symmetric to ~1e-15)
    matrix.flags.writeable = False
    return tuple(DK_NAMES), matrix


def nearest_correlation(matrix, min_eigenvalue: float = _MIN_EIGENVALUE) -> np.ndarray:
    """A valid (positive-definite) correlation matrix close to ``matrix``.

    Eigenvalues below ``min_eigenvalue`` are raised to it, then rows and columns are
    rescaled to a unit diagonal (one step of eigenvalue clipping, not the iterative
    Higham projection: enough for matrices that are nearly valid).

    Parameters
    ----------
    matrix : array of shape (n, n)
        Symmetric, finite; its diagonal is ignored (taken as 1).
    min_eigenvalue : float
        Floor of the eigenvalues before rescaling, > 0.

    Returns
    -------
    ndarray of shape (n, n)
        Symmetric, unit diagonal, all eigenvalues > 0.
    """
    values = np.array(matrix, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"matrix must be square, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("matrix contains non-finite values")
    if np.abs(values - values.T).max() > 1e-8:
        raise ValueError("matrix must be symmetric")
    if not min_eigenvalue > 0:
        raise ValueError(f"min_eigenvalue must be > 0, got {min_eigenvalue!r}")
    values = (values + values.T) / 2
    np.fill_diagonal(values, 1.0)
    eigenvalues, eigenvectors = np.linalg.eigh(values)
    if eigenvalues[0] < min_eigenvalue:
        values = (eigenvectors * np.maximum(eigenvalues, min_eigenvalue)) @ eigenvectors.T
        scale = 1.0 / np.sqrt(np.diag(values))
        values = values * scale[:, None] * scale[None, :]
        values = (values + values.T) / 2
        np.fill_diagonal(values, 1.0)
    return values


# ---------------------------------------------------------------- region summaries
def region_mean_timeseries(timeseries, labels) -> np.ndarray:
    """Mean time series of every region.

    Parameters
    ----------
    timeseries : array of shape (T, V)
    labels : int array of shape (V,)
        0 for vertices in no region, ``k`` = 1..K for region ``k`` (as
        :attr:`~neuroatrophy.surface.Parcellation.labels`).

    Returns
    -------
    ndarray of shape (T, K), float64
    """
    data = np.asarray(timeseries)
    labels = _check_labels(labels, data)
    n_regions = int(labels.max())
    counts = np.bincount(labels, minlength=n_regions + 1)[1:]
    if (counts == 0).any():
        raise ValueError(f"labels: regions without vertices: {(np.flatnonzero(counts == 0) + 1).tolist()}")
    in_region = labels > 0
    dtype = data.dtype if data.dtype in (np.float32, np.float64) else np.float64
    weights = np.zeros((data.shape[1], n_regions), dtype=dtype)
    weights[np.flatnonzero(in_region), labels[in_region] - 1] = 1.0 / counts[labels[in_region] - 1]
    return np.asarray(data.astype(dtype, copy=False) @ weights, dtype=np.float64)


def region_loadings(timeseries, labels) -> np.ndarray:
    """Correlation of every vertex's time series with the mean of its region.

    A measure of how much a vertex shares its region's signal; used as the
    ``loading_pattern`` of :func:`simulate_connectome_subjects` to borrow the
    spatial pattern of a real run (pass confound-regressed time series).

    Parameters
    ----------
    timeseries : array of shape (T, V)
    labels : int array of shape (V,)
        0 for vertices in no region, ``k`` = 1..K for region ``k``.

    Returns
    -------
    ndarray of shape (V,)
        Pearson r; 0 for vertices in no region and for constant vertices.
    """
    data = np.asarray(timeseries, dtype=np.float64)
    labels = _check_labels(labels, data)
    centred = data - data.mean(axis=0)
    norms = np.linalg.norm(centred, axis=0)
    regions = region_mean_timeseries(centred, labels)
    regions -= regions.mean(axis=0)
    region_norms = np.linalg.norm(regions, axis=0)
    index = np.maximum(labels - 1, 0)
    products = np.einsum("tv,tv->v", centred, regions[:, index])
    denominator = norms * region_norms[index]
    valid = (labels > 0) & (denominator > 0)
    loadings = np.zeros(data.shape[1])
    loadings[valid] = products[valid] / denominator[valid]
    return loadings


def _check_labels(labels, data: np.ndarray) -> np.ndarray:
    if data.ndim != 2:
        raise ValueError(f"timeseries must have shape (T, V), got {data.shape}")
    labels = np.asarray(labels)
    if labels.shape != (data.shape[1],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be an integer array of shape ({data.shape[1]},), got {labels.dtype} {labels.shape}"
        )
    if labels.min() < 0 or labels.max() < 1:
        raise ValueError("labels must be >= 0 with at least one region (label >= 1)")
    return labels.astype(np.int64, copy=False)


# ---------------------------------------------------------------- simulation
@dataclass(frozen=True, eq=False)
class SimulationTruth:
    """Ground truth of a :class:`ConnectomeSimulation`.

    Attributes
    ----------
    region_names : tuple of str
        The 68 DK regions (:data:`~neuroatrophy.surface.DK_NAMES`).
    group_correlation : ndarray of shape (68, 68)
        The group correlation between region signals: the HCP matrix
        (:func:`hcp_dk_connectivity`) back-transformed from Fisher z, unit diagonal
        (already positive definite, smallest eigenvalue 0.08).
    labels : ndarray of shape (V,), int
        DK label of every vertex (0 = medial wall, ``k`` = ``region_names[k - 1]``).
    loadings : ndarray of shape (V,), float32
        ``a_v``: each vertex's loading on its region's signal (0 on the medial wall).
    subject_ids : tuple of str
    n_timepoints : int
    tr : float
        Nominal repetition time (s) attached to the runs.
    ar_coefficient, subject_variability, within_region : float
    noise_smoothing : int
    seed : int
        Entropy of the random streams (drawn when ``seed=None`` was given).
    """

    region_names: tuple
    group_correlation: np.ndarray
    labels: np.ndarray
    loadings: np.ndarray
    subject_ids: tuple
    n_timepoints: int
    tr: float
    ar_coefficient: float
    subject_variability: float
    within_region: float
    noise_smoothing: int
    seed: int

    @property
    def group_z(self) -> np.ndarray:
        """Fisher z of :attr:`group_correlation`, zero diagonal (the HCP matrix)."""
        z = np.arctanh(np.clip(self.group_correlation, -1 + 1e-12, 1 - 1e-12))
        np.fill_diagonal(z, 0.0)
        return z

    @property
    def medial_wall(self) -> np.ndarray:
        """Boolean mask (V,) of the vertices without signal (constant 0)."""
        return self.labels == 0


class ConnectomeSimulation:
    """Simulated resting-state runs on fsaverage5, generated on demand (see the module docstring).

    Iterating yields ``(subject_id, timeseries)`` with ``timeseries`` a new
    (T, 20484) float32 array, one subject at a time, so memory stays bounded. Every
    iteration yields the same data. Made by :func:`simulate_connectome_subjects`.

    Attributes
    ----------
    truth : SimulationTruth
    """

    def __init__(self, truth: SimulationTruth):
        self.truth = truth

    @property
    def subject_ids(self) -> list:
        """Subject identifiers, in order."""
        return list(self.truth.subject_ids)

    def __len__(self) -> int:
        return len(self.truth.subject_ids)

    def __iter__(self):
        for index, subject_id in enumerate(self.truth.subject_ids):
            yield subject_id, self.subject(index)

    def _index(self, subject) -> int:
        if isinstance(subject, str):
            try:
                return self.truth.subject_ids.index(subject)
            except ValueError:
                raise ValueError(f"Unknown simulated subject {subject!r}") from None
        try:
            index = operator.index(subject)
        except TypeError:
            raise ValueError(f"subject must be an index or a subject id, got {subject!r}") from None
        if not 0 <= index < len(self):
            raise ValueError(f"subject index must lie in 0..{len(self) - 1}, got {subject!r}")
        return index

    def subject_correlation(self, subject) -> np.ndarray:
        """The true (68, 68) correlation between region signals of one subject (index or id)."""
        index = self._index(subject)
        return _subject_correlation(self.truth, self._rng(index))

    def subject(self, subject) -> np.ndarray:
        """Time series (T, 20484) float32 of one subject (index or id)."""
        index = self._index(subject)
        truth = self.truth
        rng = self._rng(index)
        correlation = _subject_correlation(truth, rng)
        n_time, n_regions = truth.n_timepoints, len(truth.region_names)
        regions = rng.standard_normal((n_time, n_regions)) @ np.linalg.cholesky(correlation).T
        _ar1_in_place(regions, truth.ar_coefficient)
        noise = _smooth_noise(rng, n_time, truth.noise_smoothing)
        _ar1_in_place(noise, truth.ar_coefficient)
        loadings = truth.loadings
        noise *= np.where(loadings > 0, np.sqrt(1.0 - loadings**2), np.float32(0.0))  # medial wall: 0
        noise += regions.astype(np.float32)[:, np.maximum(truth.labels - 1, 0)] * loadings
        return noise

    def _rng(self, index: int) -> np.random.Generator:
        # stream (1, index) for subject ``index``; stream (0,) made the loading pattern
        return np.random.default_rng(np.random.SeedSequence(self.truth.seed, spawn_key=(1, index)))


def simulate_connectome_subjects(
    n_subjects: int = 40,
    n_timepoints: int = 200,
    seed=0,
    subject_variability: float = 0.15,
    within_region: float = 0.6,
    noise_smoothing: int = 2,
    ar_coefficient: float = 0.4,
    tr: float = 2.0,
    loading_pattern=None,
) -> ConnectomeSimulation:
    """Simulated fsaverage5 resting-state runs whose group connectivity is the HCP one.

    See the module docstring for the model. Generating 40 subjects x 200 time
    points takes a few seconds; nothing is generated until the result is
    iterated.

    Parameters
    ----------
    n_subjects : int
        Number of simulated subjects (ids ``"sim-001"``, ...).
    n_timepoints : int
        Time points per run (>= 3).
    seed : int, numpy.random.Generator or None
        Seed of all random streams (a Generator is used once to draw one).
    subject_variability : float
        SD, in Fisher z, of the deviation of each subject's connectivity from the
        group's, added to every region pair before the projection onto a valid
        correlation matrix (which shrinks it, see the module docstring); >= 0.
    within_region : float
        Mean over the cortex of the fraction of a vertex's variance shared with its
        region's signal, in (0, 1).
    noise_smoothing : int
        Neighbour-averaging steps applied to the vertex noise (>= 0).
    ar_coefficient : float
        AR(1) coefficient of signal and noise in time, in [0, 1).
    tr : float
        Nominal repetition time (s) recorded in the truth (> 0); the model itself
        is in units of time points.
    loading_pattern : array of shape (20484,), optional
        Spatial pattern of the loadings, e.g. :func:`region_loadings` of a real run:
        ``a_v**2`` is taken proportional to ``max(pattern_v, 0)**2``, scaled to mean
        ``within_region`` over the cortex and clipped to [0.02, 0.98]. Default: a
        smooth random pattern (+-30 % around ``within_region``).

    Returns
    -------
    ConnectomeSimulation
        Iterable of ``(subject_id, timeseries (T, 20484) float32)``, with ``.truth``.
    """
    n_subjects = _positive_int(n_subjects, "n_subjects")
    n_timepoints = _positive_int(n_timepoints, "n_timepoints")
    if n_timepoints < 3:
        raise ValueError(f"n_timepoints must be at least 3, got {n_timepoints}")
    if not (np.isfinite(subject_variability) and subject_variability >= 0):
        raise ValueError(f"subject_variability must be >= 0, got {subject_variability!r}")
    if not 0 < within_region < 1:
        raise ValueError(f"within_region must lie in (0, 1), got {within_region!r}")
    if isinstance(noise_smoothing, bool) or int(noise_smoothing) != noise_smoothing or noise_smoothing < 0:
        raise ValueError(f"noise_smoothing must be a non-negative integer, got {noise_smoothing!r}")
    if not 0 <= ar_coefficient < 1:
        raise ValueError(f"ar_coefficient must lie in [0, 1), got {ar_coefficient!r}")
    if not (np.isfinite(tr) and tr > 0):
        raise ValueError(f"tr must be > 0, got {tr!r}")
    if isinstance(seed, np.random.Generator):
        seed = int(seed.integers(2**63))
    entropy = np.random.SeedSequence(seed).entropy

    labels = dk_atlas().labels
    labels.flags.writeable = False
    loadings = _loadings(labels, within_region, loading_pattern, np.random.SeedSequence(entropy, spawn_key=(0,)))
    width = max(3, len(str(n_subjects)))
    truth = SimulationTruth(
        region_names=tuple(DK_NAMES),
        group_correlation=_group_correlation(),
        labels=labels,
        loadings=loadings,
        subject_ids=tuple(f"sim-{i + 1:0{width}d}" for i in range(n_subjects)),
        n_timepoints=n_timepoints,
        tr=float(tr),
        ar_coefficient=float(ar_coefficient),
        subject_variability=float(subject_variability),
        within_region=float(within_region),
        noise_smoothing=int(noise_smoothing),
        seed=entropy,
    )
    return ConnectomeSimulation(truth)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _group_correlation() -> np.ndarray:
    z = _hcp_dk_cached()[1]
    correlation = np.tanh(z)
    np.fill_diagonal(correlation, 1.0)  # the file's diagonal is 0 (self-connections left out)
    correlation = nearest_correlation(correlation)
    correlation.flags.writeable = False
    return correlation


def _subject_correlation(truth: SimulationTruth, rng: np.random.Generator) -> np.ndarray:
    """One subject's region correlation: group Fisher z + symmetric noise, made valid."""
    n = len(truth.region_names)
    deviation = rng.standard_normal((n, n))
    deviation = np.triu(deviation, 1)
    z = truth.group_z + truth.subject_variability * (deviation + deviation.T)
    correlation = np.tanh(z)
    np.fill_diagonal(correlation, 1.0)
    return nearest_correlation(correlation)


def _loadings(labels: np.ndarray, within_region: float, pattern, seed_sequence) -> np.ndarray:
    """Per-vertex loadings ``a_v`` (float32, 0 on the medial wall), mean ``a_v**2`` = ``within_region``."""
    cortex = labels > 0
    n_vertices = labels.shape[0]
    if pattern is None:
        surface = load_fsaverage5("white")
        white = np.random.default_rng(seed_sequence).standard_normal(n_vertices)
        smooth = smooth_on_surface(white, surface, _LOADING_FIELD_STEPS)
        smooth = (smooth - smooth[cortex].mean()) / smooth[cortex].std()
        squared = within_region * (1.0 + _LOADING_SPREAD * smooth)
    else:
        pattern = np.asarray(pattern, dtype=np.float64)
        if pattern.shape != (n_vertices,) or not np.isfinite(pattern).all():
            raise ValueError(f"loading_pattern must be a finite array of shape ({n_vertices},), got {pattern.shape}")
        squared = np.maximum(pattern, 0.0) ** 2
        mean = squared[cortex].mean()
        if mean <= 0:
            raise ValueError("loading_pattern must be positive somewhere on the cortex")
        squared = within_region * squared / mean
    squared = np.clip(squared, *_LOADING_SQ_RANGE)
    loadings = np.where(cortex, np.sqrt(squared), 0.0).astype(np.float32)
    loadings.flags.writeable = False
    return loadings


def _ar1_in_place(series: np.ndarray, coefficient: float) -> None:
    """Turn white unit-variance rows (time along axis 0) into a stationary unit-variance AR(1)."""
    if coefficient == 0:
        return
    innovation = series.dtype.type(np.sqrt(1.0 - coefficient**2))
    coefficient = series.dtype.type(coefficient)
    # row 0 is left as is: a unit-variance start is the stationary distribution
    for t in range(1, series.shape[0]):
        series[t] *= innovation
        series[t] += coefficient * series[t - 1]


def _smooth_noise(rng: np.random.Generator, n_time: int, steps: int) -> np.ndarray:
    """(n_time, V) float32 white noise smoothed on the mesh, unit variance at every vertex."""
    operator, inverse_sd = _noise_operator(steps)
    noise = rng.standard_normal((operator.shape[0], n_time), dtype=np.float32)
    for _ in range(steps):
        noise = operator @ noise
    noise *= inverse_sd[:, None]
    return np.ascontiguousarray(noise.T)


@functools.lru_cache(maxsize=4)
def _noise_operator(steps: int):
    """The row-normalised ``A + I`` of :func:`smooth_on_surface`, in float32, and 1/SD of smoothed unit noise.

    Built here once rather than per call because :func:`smooth_on_surface`
    rebuilds it and works in float64, ~6 times slower for (T, V) noise.
    """
    surface = load_fsaverage5("white")
    operator = surface.adjacency() + sp.identity(surface.n_vertices, format="csr")
    operator = (sp.diags(1.0 / np.asarray(operator.sum(axis=1)).ravel()) @ operator).tocsr()
    power = sp.identity(surface.n_vertices, format="csr")
    for _ in range(steps):
        power = (power @ operator).tocsr()
    # a smoothed unit white-noise value has variance sum_j (S^steps)_vj^2
    variance = np.asarray(power.multiply(power).sum(axis=1)).ravel()
    return operator.astype(np.float32), (1.0 / np.sqrt(variance)).astype(np.float32)
