"""Atrophy network mapping: seed-based connectivity of atrophy maps in a normative connectome.

Each patient's atrophic vertices form a seed; its time series in every connectome
subject (the mean over the seed's nodes, optionally weighted by |z|) is correlated with
every node, the correlations are Fisher-z transformed and aggregated across connectome
subjects into a mean-r map, a mean Fisher-z map and a one-sample t-map (the maps
Lead-DBS calls AvgR, AvgR_Fz and T). Thresholding the t-map gives the patient's atrophy
network (positive and negative connectivity kept apart); the percentage of patients
whose network holds each node is the convergence map.

The kernel is exact and fast because the store keeps every node's time series centred
with unit norm (:mod:`neuroatrophy.connectome`): for K seeds with weights ``W (V, K)``
and one subject's ``Z (T, V)``, ``S = Z W`` (centred, normalised) are the seed time
series and ``Sᵀ Z`` are all K Pearson maps at once, two matrix products per subject.
All seeds go through one pass over the connectome.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from .parallel import parallel_map

__all__ = [
    "ENGINES",
    "SeedMaps",
    "seed_maps",
    "reference_seed_maps",
    "atrophy_seeds",
    "t_threshold",
    "Networks",
    "threshold_networks",
    "convergence_map",
    "convergent_regions",
    "target_connectivity",
    "fisher_z",
]

ENGINES = ("auto", "numpy", "torch")
# r is clipped below 1 before the Fisher transform: a node correlates perfectly with a
# one-node seed containing it, and atanh(1) is infinite.
R_CLIP = 1.0 - 1e-6
_FORMAT_TYPE = "seed-maps"


def fisher_z(r):
    """Fisher transform ``atanh(r)`` of correlations clipped to ``±(1 - 1e-6)``."""
    return np.arctanh(np.clip(r, -R_CLIP, R_CLIP))


# --------------------------------------------------------------------------- results
@dataclass(eq=False)
class SeedMaps:
    """Seed-based connectivity maps aggregated over the subjects of a connectome.

    Attributes
    ----------
    names : list of str
        One name per seed (K).
    mean_z : ndarray (K, V) float32
        Mean Fisher z across connectome subjects.
    mean_r : ndarray (K, V) float32
        Mean Pearson r across connectome subjects.
    t : ndarray (K, V) float32
        One-sample t of the Fisher z across subjects (NaN with one subject or zero variance).
    seed_z : ndarray (K, K) float64
        Mean Fisher z between the seeds' own time series (ROI-to-ROI connectivity).
    degree : ndarray (V,) float32
        Mean correlation of each node with all nodes, averaged over subjects: the
        connectome's (weighted) degree, against which seed maps are compared.
    n_subjects : int
    space : str
    """

    names: list
    mean_z: np.ndarray
    mean_r: np.ndarray
    t: np.ndarray
    seed_z: np.ndarray
    degree: np.ndarray
    n_subjects: int
    space: str
    metadata: dict = field(default_factory=dict)

    @property
    def n_seeds(self) -> int:
        return len(self.names)

    def index(self, name) -> int:
        try:
            return self.names.index(str(name))
        except ValueError:
            raise KeyError(f"No seed named {name!r}; seeds are {self.names[:10]}") from None

    def subset(self, rows) -> "SeedMaps":
        """The maps of some seeds (indices), with their seed-to-seed block."""
        rows = np.asarray(rows, dtype=int)
        return SeedMaps([self.names[i] for i in rows], self.mean_z[rows], self.mean_r[rows], self.t[rows],
                        self.seed_z[np.ix_(rows, rows)], self.degree, self.n_subjects, self.space,
                        dict(self.metadata))

    def save(self, path):
        """Save as a NeuroAtrophy model-format file (zip of JSON + ``.npy``, no pickle)."""
        from .modelio import save_model_file

        arrays = {"mean_z": self.mean_z, "mean_r": self.mean_r, "t": self.t, "seed_z": self.seed_z,
                  "degree": self.degree}
        metadata = {"model_type": _FORMAT_TYPE, "names": list(self.names), "n_subjects": int(self.n_subjects),
                    "space": self.space, "info": self.metadata}
        return save_model_file(path, arrays, metadata)

    @classmethod
    def load(cls, path) -> "SeedMaps":
        from .modelio import load_model_file

        arrays, metadata = load_model_file(path, expected_type=_FORMAT_TYPE)
        return cls(list(metadata["names"]), arrays["mean_z"], arrays["mean_r"], arrays["t"], arrays["seed_z"],
                   arrays["degree"], int(metadata["n_subjects"]), metadata["space"], metadata.get("info", {}))


# --------------------------------------------------------------------------- kernel
def seed_maps(store, seeds, names=None, engine="auto", device="cpu", subjects=None, block_size=4, n_jobs=1,
              backend=None, progress=None) -> SeedMaps:
    """Seed-based connectivity of K seeds in one pass over a connectome.

    Parameters
    ----------
    store : ConnectomeStore
    seeds : array (K, V) or (V,)
        Non-negative seed weights per node (a binary mask, or |z| on atrophic nodes).
        The seed's time series is the weighted mean of its nodes' time series.
    names : list of str, optional
        Seed names (default ``seed-1`` ...).
    engine : {"auto", "numpy", "torch"}
        ``"torch"`` is about twice as fast on a CPU and runs on a GPU (``device="cuda"``);
        ``"auto"`` uses torch when it is installed.
    subjects : sequence of int, optional
        Connectome subjects to use (default all).
    block_size : int
        Subjects per work item; each worker keeps float64 running sums of its block.
    n_jobs, backend :
        The executor seam (:func:`neuroatrophy.parallel.parallel_map`). Matrix products
        already use all cores; more jobs help with many small seeds.
    progress : callable(fraction, message), optional
        May raise :class:`~neuroatrophy.parallel.Cancelled`.
    """
    weights, names = _check_seeds(seeds, names, store.n_nodes)
    subjects = list(range(len(store))) if subjects is None else [int(s) for s in subjects]
    if not subjects:
        raise ValueError(f"Connectome {store.path} has no subjects")
    kernel = _make_kernel(engine, device)
    blocks = [subjects[i:i + max(1, int(block_size))] for i in range(0, len(subjects), max(1, int(block_size)))]
    sums = _Sums(len(names), store.n_nodes)
    done = [0]

    def run_block(block):
        partial = _Sums(len(names), store.n_nodes)
        for s in block:
            partial.add(kernel(store.timeseries(s), weights, names, store.subject_ids[s], store.n_signal(s)))
        return partial

    def merge(_, partial):
        sums.merge(partial)
        done[0] += partial.n
        if progress is not None:
            progress(done[0] / len(subjects), f"Seed maps: {done[0]}/{len(subjects)} connectome subjects")

    parallel_map(run_block, blocks, n_jobs=n_jobs, backend=backend, on_result=merge, collect=False)
    return sums.result(names, store.space, {"engine": kernel.name, "dtype": store.dtype})


class _Sums:
    """Running float64 sums over subjects: Σr, Σz, Σz², Σ seed-to-seed z, Σ degree."""

    def __init__(self, k, v):
        self.n = 0
        self.r = np.zeros((k, v))
        self.z = np.zeros((k, v))
        self.z2 = np.zeros((k, v))
        self.seed = np.zeros((k, k))
        self.degree = np.zeros(v)

    def add(self, subject):
        r, z, seed, degree = subject
        self.r += r
        self.z += z
        z *= z
        self.z2 += z
        self.seed += seed
        self.degree += degree
        self.n += 1

    def merge(self, other):
        for name in ("r", "z", "z2", "seed", "degree"):
            getattr(self, name).__iadd__(getattr(other, name))
        self.n += other.n

    def result(self, names, space, metadata) -> SeedMaps:
        n = self.n
        mean_z = self.z / n
        with np.errstate(divide="ignore", invalid="ignore"):
            variance = (self.z2 - n * mean_z ** 2) / (n - 1) if n > 1 else np.full_like(mean_z, np.nan)
            t = mean_z / np.sqrt(np.clip(variance, 0, None) / n)
        t[~np.isfinite(t)] = np.nan
        return SeedMaps(list(names), mean_z.astype(np.float32), (self.r / n).astype(np.float32),
                        t.astype(np.float32), self.seed / n, (self.degree / n).astype(np.float32), n, space,
                        metadata)


def _check_seeds(seeds, names, n_nodes):
    weights = np.asarray(seeds, dtype=np.float64)
    if weights.ndim == 1:
        weights = weights[None]
    if weights.ndim != 2 or weights.shape[1] != n_nodes:
        raise ValueError(f"seeds must have shape (n_seeds, {n_nodes}) to match the connectome, got {weights.shape}")
    names = [f"seed-{i + 1}" for i in range(len(weights))] if names is None else [str(n) for n in names]
    if len(names) != len(weights):
        raise ValueError(f"{len(names)} seed names for {len(weights)} seeds")
    if len(set(names)) != len(names):
        raise ValueError("seed names must be unique")
    bad = ~np.isfinite(weights).all(axis=1) | (weights < 0).any(axis=1)
    if bad.any():
        raise ValueError(f"seed(s) {_listing(np.array(names)[bad])} have negative or non-finite weights")
    empty = ~(weights > 0).any(axis=1)
    if empty.any():
        raise ValueError(f"seed(s) {_listing(np.array(names)[empty])} have no nodes (all weights are zero)")
    # Weights sum to 1 per seed: S is then the weighted mean time series.
    weights /= weights.sum(axis=1, keepdims=True)
    return np.ascontiguousarray(weights.T, dtype=np.float32), names


def _listing(items):
    from .cohort import format_listing

    return format_listing(list(items))


def _make_kernel(engine, device):
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "auto":
        engine = "torch" if _torch_available() else "numpy"
    if engine == "torch":
        return _TorchKernel(device)
    if device not in ("cpu", None):
        raise ValueError(f"the numpy engine runs on the CPU only; device={device!r} needs engine='torch'")
    return _NumpyKernel()


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _seedless_error(names, norms, subject_id):
    missing = np.array(names)[norms <= 0]
    return ValueError(f"seed(s) {_listing(missing)} have no signal in connectome subject {subject_id!r} "
                      "(all their nodes are outside its data)")


class _NumpyKernel:
    name = "numpy"

    def __call__(self, timeseries, weights, names, subject_id, n_signal):
        z = np.asarray(timeseries, dtype=np.float32)
        series = z @ weights  # (T, K) seed time series
        series -= series.mean(axis=0)
        norms = np.linalg.norm(series, axis=0)
        if not np.all(norms > 0):
            raise _seedless_error(names, norms, subject_id)
        series /= norms
        r = series.T @ z  # (K, V) Pearson r: columns of z are centred with unit norm
        np.clip(r, -R_CLIP, R_CLIP, out=r)
        fz = _fisher_z_inplace(r.copy())
        seed = fisher_z(series.T @ series)
        # Weighted degree: each node's mean correlation with all nodes that have signal.
        degree = z.T @ z.sum(axis=1) / max(1, n_signal)
        return r, fz, seed, degree


def _fisher_z_inplace(r):
    # 0.5 log((1 + r) / (1 - r)) is ten times faster than np.arctanh in float32, same result.
    denominator = 1.0 - r
    r += 1.0
    r /= denominator
    np.log(r, out=r)
    r *= 0.5
    return r


class _TorchKernel:
    name = "torch"

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = torch.device(device or "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was requested but no CUDA GPU is available")
        self._weights = None

    def __call__(self, timeseries, weights, names, subject_id, n_signal):
        torch = self.torch
        if self._weights is None or self._weights[0] is not weights:
            self._weights = (weights, torch.from_numpy(weights).to(self.device))
        w = self._weights[1]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            z = torch.as_tensor(np.asarray(timeseries)).to(self.device, dtype=torch.float32)
        series = z @ w
        series -= series.mean(dim=0)
        norms = torch.linalg.vector_norm(series, dim=0)
        if not bool((norms > 0).all()):
            raise _seedless_error(names, norms.cpu().numpy(), subject_id)
        series /= norms
        r = (series.T @ z).clamp_(-R_CLIP, R_CLIP)
        fz = torch.atanh(r)
        seed = torch.atanh((series.T @ series).clamp_(-R_CLIP, R_CLIP))
        degree = (z.T @ z.sum(dim=1)) / max(1, n_signal)
        return tuple(x.double().cpu().numpy() if self.device.type != "cpu" else x.numpy()
                     for x in (r, fz, seed, degree))


def reference_seed_maps(store, seeds, names=None) -> SeedMaps:
    """The straightforward computation, for tests and benchmarks: per seed and per subject,
    the Pearson correlation (textbook formula, float64) of the seed's weighted mean time
    series with every node. Slow: O(K · N) separate correlation passes."""
    weights, names = _check_seeds(seeds, names, store.n_nodes)
    k, v, n = len(names), store.n_nodes, len(store)
    fz = np.zeros((n, k, v))
    r_sum = np.zeros((k, v))
    for s in range(n):
        data = np.asarray(store.timeseries(s), dtype=np.float64)
        signal = np.abs(data).max(axis=0) > 0
        for j in range(k):
            seed_series = data @ weights[:, j].astype(np.float64)
            r = np.zeros(v)
            r[signal] = _pearson(seed_series, data[:, signal])
            r_sum[j] += r
            fz[s, j] = fisher_z(r)
    mean_z = fz.mean(axis=0)
    t = stats.ttest_1samp(fz, 0.0, axis=0).statistic if n > 1 else np.full((k, v), np.nan)
    return SeedMaps(names, mean_z, r_sum / n, t, np.full((k, k), np.nan), np.zeros(v), n, store.space,
                    {"engine": "reference"})


def _pearson(x, y):
    """Pearson r of a series ``x`` (T,) with every column of ``y`` (T, n)."""
    x = x - x.mean()
    y = y - y.mean(axis=0)
    return (x @ y) / np.sqrt((x @ x) * (y * y).sum(axis=0))


# --------------------------------------------------------------------------- seeds
def atrophy_seeds(patient_maps, weighting="binary"):
    """Seeds from personalized atrophy maps: ``(weights (K, V), names)``.

    ``weighting="binary"`` gives every atrophic vertex weight 1; ``"abs_z"`` weights
    them by |z| so that the most deviant vertices dominate the seed time series.
    ``patient_maps`` are :class:`~neuroatrophy.thickness_model.PatientMap` objects (or
    anything with ``subject_id``, ``z`` and ``atrophy.mask``).
    """
    if weighting not in ("binary", "abs_z"):
        raise ValueError(f"weighting must be 'binary' or 'abs_z', got {weighting!r}")
    maps = list(patient_maps)
    if not maps:
        raise ValueError("No patient maps were given")
    names = [str(pm.subject_id) for pm in maps]
    masks = np.array([np.asarray(pm.atrophy.mask, bool) for pm in maps])
    empty = ~masks.any(axis=1)
    if empty.any():
        raise ValueError(
            f"Patient(s) {_listing(np.array(names)[empty])} have no atrophic vertices, so their atrophy map "
            "cannot seed a network; lower the z threshold or minimum cluster size, or leave them out"
        )
    if weighting == "binary":
        return masks.astype(np.float64), names
    z = np.array([np.asarray(pm.z, float) for pm in maps])
    return np.where(masks, np.abs(np.nan_to_num(z)), 0.0), names


# --------------------------------------------------------------------------- networks
def t_threshold(n_subjects: int, n_nodes: int, alpha: float = 0.05) -> float:
    """Bonferroni-corrected two-sided t threshold for a one-sample t over ``n_subjects``.

    For 1,000 connectome subjects and fsaverage5 this is about 4.9; the classic lesion
    network mapping threshold |t| > 7 is stricter.
    """
    if n_subjects < 2:
        raise ValueError(f"A t threshold needs at least 2 connectome subjects, got {n_subjects}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return float(stats.t.isf(alpha / (2 * max(1, n_nodes)), n_subjects - 1))


@dataclass(eq=False)
class Networks:
    """Binary atrophy networks: ``positive``/``negative`` (K, V) bool at ``|t| > threshold``."""

    names: list
    positive: np.ndarray
    negative: np.ndarray
    threshold: float

    def signed(self) -> np.ndarray:
        """(K, V) int8: +1 positive network, -1 negative network, 0 neither."""
        return self.positive.astype(np.int8) - self.negative.astype(np.int8)

    def sizes(self) -> pd.DataFrame:
        return pd.DataFrame({"subject_id": self.names, "n_positive": self.positive.sum(axis=1),
                             "n_negative": self.negative.sum(axis=1)})


def threshold_networks(maps: SeedMaps, threshold="auto", valid=None, alpha=0.05) -> Networks:
    """Threshold the t-maps into positive and negative networks.

    ``threshold="auto"`` is :func:`t_threshold` (Bonferroni over the valid nodes); a
    number is used as |t|. ``valid`` (V,) bool restricts the networks to nodes with signal.
    """
    n_nodes = maps.t.shape[1]
    valid = np.ones(n_nodes, bool) if valid is None else np.asarray(valid, bool)
    if threshold == "auto":
        threshold = t_threshold(maps.n_subjects, int(valid.sum()), alpha)
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be 'auto' or a positive number, got {threshold!r}") from None
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    if maps.n_subjects < 2:
        raise ValueError("Networks are thresholded t-maps, which need a connectome of at least 2 subjects")
    t = np.nan_to_num(maps.t, nan=0.0)
    return Networks(list(maps.names), (t > threshold) & valid, (t < -threshold) & valid, threshold)


def convergence_map(masks) -> np.ndarray:
    """Percentage of patients whose network includes each node, shape (V,)."""
    masks = np.asarray(masks, bool)
    if masks.ndim != 2 or len(masks) == 0:
        raise ValueError(f"network masks must be (n_patients, V) with at least one patient, got {masks.shape}")
    return 100.0 * masks.mean(axis=0)


def convergent_regions(percent, parcellation, fraction=0.75) -> pd.DataFrame:
    """Regions shared by at least ``fraction`` of patients.

    Returns one row per region of ``parcellation`` (medial wall excluded): ``region``,
    ``n_vertices``, ``peak_percent`` (highest convergence), ``mean_percent`` and
    ``convergent_fraction`` (fraction of the region's vertices reached by at least
    ``fraction`` of patients), sorted by that fraction, regions with any convergent
    vertex first.
    """
    percent = np.asarray(percent, float)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(parcellation.labels)
    if labels.shape != percent.shape:
        raise ValueError(f"convergence map has {percent.size} nodes, parcellation has {labels.size}")
    rows = []
    for label, name in enumerate(parcellation.names, start=1):  # label 0 is the medial wall
        inside = labels == label
        if not inside.any():
            continue
        values = percent[inside]
        rows.append({"region": name, "n_vertices": int(inside.sum()), "peak_percent": float(values.max()),
                     "mean_percent": float(values.mean()),
                     "convergent_fraction": float(np.mean(values >= 100 * fraction))})
    table = pd.DataFrame(rows)
    return table.sort_values(["convergent_fraction", "peak_percent"], ascending=False, ignore_index=True)


# --------------------------------------------------------------------------- targets
def target_connectivity(maps: SeedMaps, patients, targets, target_rois, method="map") -> pd.DataFrame:
    """Connectivity between each patient's atrophy network and each target.

    ``method="map"``: mean of the patient's mean-Fisher-z map over the target's nodes
    (the value of the network map at the target, as in lesion network mapping);
    ``"roi"``: mean over connectome subjects of the Fisher z between the patient's seed
    time series and the target's mean time series (needs the targets among the seeds of
    ``maps``, named ``target:<name>``). Returns a (patients × targets) DataFrame.
    """
    patients = [str(p) for p in patients]
    rows = [maps.index(p) for p in patients]
    names = [t.name if hasattr(t, "name") else str(t) for t in targets]
    rois = np.asarray(target_rois, float)
    if rois.shape != (len(names), maps.mean_z.shape[1]):
        raise ValueError(f"target_rois must have shape ({len(names)}, {maps.mean_z.shape[1]}), got {rois.shape}")
    if method == "map":
        weights = rois / rois.sum(axis=1, keepdims=True)
        values = maps.mean_z[rows].astype(np.float64) @ weights.T
    elif method == "roi":
        cols = [maps.index(f"target:{n}") for n in names]
        values = maps.seed_z[np.ix_(rows, cols)]
    else:
        raise ValueError(f"method must be 'map' or 'roi', got {method!r}")
    return pd.DataFrame(values, index=pd.Index(patients, name="subject_id"), columns=names)

