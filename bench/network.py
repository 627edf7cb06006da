"""Speed benchmark of the one-pass seed-map kernel (``neuroatrophy.network.seed_maps``).

Builds a synthetic fsaverage5 connectome store (default 200 subjects x 300 time
points x 20,484 vertices, float16: 2.5 GB), draws 100 atrophy-like seeds (compact
patches of 500-3000 cortical vertices) and measures, in the same run:

1. reading the connectome once from memory (page cache warm): plain reads that
   touch every byte, and float16 -> float32 conversion passes; the fastest plain
   read is the anchor;
2. ``seed_maps(store, seeds, engine=...)`` with the numpy and torch engines (all
   seeds, all subjects, one pass);
3. the straightforward approach on a subset, scaled to the full problem: the
   library's ``reference_seed_maps`` (per seed and per connectome subject, the float64
   textbook Pearson correlation of the seed's mean time series with every node); for
   information also the same computation one patient at a time (each subject re-read
   per patient) and the kernel called once per patient;
4. agreement of the kernel's maps with ``reference_seed_maps`` on the subset;
5. where the kernel's time goes, stage by stage, on a few subjects.

It prints its results and goal verdicts and writes them as JSON
(``bench/results/network-<date>.json``); it is not a test and does not fail on a
missed goal.

Usage::

    .venv/bin/python bench/network.py                  # full run (~3 min with a 2.5 GB temporary store)
    .venv/bin/python bench/network.py --quick          # smoke run (~10-20 s)
    .venv/bin/python bench/network.py --store /tmp/na-connectome   # build once, reuse in later runs
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

from neuroatrophy import network
from neuroatrophy.connectome import ConnectomeStore, fsaverage5_coordinates

GOAL_SPEEDUP = 20.0          # kernel vs the straightforward approach, wall time of the full problem
GOAL_READ_RATIO = 2.0        # kernel vs reading the connectome once from memory
# Agreement with the float64 straightforward maps: max |delta| of mean r and of mean Fisher z. The
# straightforward approach re-centres and re-normalises the float16-rounded columns that the kernel
# takes as exactly centred with unit norm, so part of the difference is the store's float16
# rounding (documented as below 1e-3 in r), not arithmetic; z = atanh(r) magnifies it near |r| = 1.
TOLERANCE_R = 1e-4
TOLERANCE_Z = 1e-3
SEED_SIZES = (500, 3000)     # vertices per atrophy-like seed
GENERATOR = "bench/network.py synthetic connectome v1"
N_COMPONENTS = 12            # smooth spatial components (distributed "networks") ...
BUMPS_PER_COMPONENT = 3      # ... each a sum of Gaussian bumps on the cortex
BUMP_SD_MM = (10.0, 25.0)
SIGNAL_SD = (0.4, 1.0)       # per subject and component, relative to unit vertex noise
FULL = {"subjects": 200, "timepoints": 300, "seeds": 100, "ref_seeds": 5, "ref_subjects": 10, "repeats": 3,
        "profile_subjects": 20}
QUICK = {"subjects": 20, "timepoints": 150, "seeds": 20, "ref_seeds": 3, "ref_subjects": 4, "repeats": 2,
         "profile_subjects": 4}


# ------------------------------------------------------------------ synthetic connectome
class SyntheticConnectome:
    """Resting-state-like fsaverage5 runs: a few smooth spatial components plus white noise.

    Component ``c`` is a sum of Gaussian bumps (SD 10-25 mm) around random cortical
    vertices, so that nodes far apart share a signal, as in a distributed network.
    Subject ``i``'s run is ``courses (T, C) @ components (C, V) + noise``, with
    independent Gaussian courses whose SD varies by subject and component; the medial
    wall is constant (0). Subject ``i`` is drawn from its own stream, so it is the
    same whatever the number of subjects.
    """

    def __init__(self, n_timepoints: int, seed: int = 0):
        from neuroatrophy.surface import dk_atlas

        self.n_timepoints = int(n_timepoints)
        self.seed = int(seed)
        self.cortex = ~dk_atlas().medial_wall
        coordinates = fsaverage5_coordinates()
        rng = np.random.default_rng([self.seed, 0])
        centres = rng.choice(np.flatnonzero(self.cortex), size=(N_COMPONENTS, BUMPS_PER_COMPONENT), replace=False)
        widths = rng.uniform(*BUMP_SD_MM, size=centres.shape)
        components = np.zeros((N_COMPONENTS, len(coordinates)))
        for c in range(N_COMPONENTS):
            for centre, width in zip(centres[c], widths[c]):
                distance2 = ((coordinates - coordinates[centre]) ** 2).sum(axis=1)
                components[c] += np.exp(-0.5 * distance2 / width**2)
        self.components = (components * self.cortex).astype(np.float32)

    def params(self) -> dict:
        return {"generator": GENERATOR, "n_timepoints": self.n_timepoints, "seed": self.seed}

    def subject(self, index: int) -> np.ndarray:
        """Subject ``index``'s raw ``(T, V)`` float32 run."""
        rng = np.random.default_rng([self.seed, 1, int(index)])
        amplitude = rng.uniform(*SIGNAL_SD, size=N_COMPONENTS).astype(np.float32)
        courses = rng.standard_normal((self.n_timepoints, N_COMPONENTS), dtype=np.float32) * amplitude
        data = rng.standard_normal((self.n_timepoints, self.components.shape[1]), dtype=np.float32)
        data += courses @ self.components
        data[:, ~self.cortex] = 0.0
        return data


def open_or_build_store(path: Path, n_subjects: int, n_timepoints: int, dtype: str, seed: int) -> ConnectomeStore:
    """Open the store at ``path`` if this benchmark built it with the same settings (adding
    missing subjects), else build it; ``preprocessed=True`` still centres and normalises."""
    generator = SyntheticConnectome(n_timepoints, seed)
    if (path / "connectome.json").is_file():
        store = ConnectomeStore.open(path)
        try:
            built_with = json.loads(store.info()["description"] or "{}")
        except json.JSONDecodeError:
            built_with = {}
        if built_with != generator.params() or store.dtype != dtype:
            raise SystemExit(f"network.py: error: {path} holds another connectome (built with {built_with}, "
                             f"dtype {store.dtype}); use another --store folder or remove it")
        if len(store):
            check_readable(store)
    else:
        store = ConnectomeStore.create(path, space="fsaverage5", dtype=dtype,
                                       description=json.dumps(generator.params()))
    start, wall0 = len(store), time.perf_counter()
    for i in range(start, n_subjects):
        store.add_subject(f"sub-{i:04d}", generator.subject(i), preprocessed=True)
        if (i + 1) % 25 == 0 or i + 1 == n_subjects:
            print(f"    {i + 1}/{n_subjects} subjects ({time.perf_counter() - wall0:.0f} s)", flush=True)
    if start:
        print(f"  reused {min(start, n_subjects)} subject(s) already in {path}")
    return store


def check_readable(store: ConnectomeStore) -> None:
    """Exit with a clear message if this library cannot compute seed maps from the store
    (one built by an earlier version of NeuroAtrophy may lack what the kernel needs now)."""
    seed = np.zeros((1, store.n_nodes))
    seed[0, np.flatnonzero(store.valid)[:10]] = 1.0
    try:
        network.seed_maps(store, seed, engine="numpy", subjects=[0])
    except (KeyError, ValueError) as error:
        raise SystemExit(f"network.py: error: seed_maps cannot read the store {store.path} ({type(error).__name__}: "
                         f"{error}); it was probably built by another version of NeuroAtrophy: remove it") from None


class StoreView:
    """The first ``n`` subjects of a store, for the functions that take a whole store."""

    def __init__(self, store: ConnectomeStore, n: int):
        self.store, self.n = store, int(n)
        self.path, self.space, self.dtype, self.n_nodes = store.path, store.space, store.dtype, store.n_nodes
        self.subject_ids = store.subject_ids[:self.n]

    def __len__(self) -> int:
        return self.n

    def timeseries(self, index: int) -> np.ndarray:
        return self.store.timeseries(index)

    def n_signal(self, index: int) -> int:
        return self.store.n_signal(index)


# ------------------------------------------------------------------ seeds
def atrophy_like_seeds(n_seeds: int, valid: np.ndarray, seed: int = 0, sizes=SEED_SIZES) -> np.ndarray:
    """``(n_seeds, V)`` binary seeds, each a compact patch of 500-3000 valid vertices.

    A patch is the first ``size`` vertices of a breadth-first walk over the white-surface
    mesh (restricted to the valid vertices) from a random start: a roughly disc-shaped
    cluster, as an atrophic region on the cortex.
    """
    from scipy.sparse.csgraph import breadth_first_order

    from neuroatrophy.surface import load_fsaverage5

    nodes = np.flatnonzero(valid)
    graph = load_fsaverage5("white").adjacency()[nodes][:, nodes]
    rng = np.random.default_rng([seed, 2])
    weights = np.zeros((n_seeds, len(valid)), dtype=np.float32)
    for k in range(n_seeds):
        size = int(rng.integers(sizes[0], sizes[1] + 1))
        order = breadth_first_order(graph, int(rng.integers(len(nodes))), directed=False,
                                    return_predecessors=False)
        weights[k, nodes[order[:size]]] = 1.0
    return weights


# ------------------------------------------------------------------ timing helpers
def timed(func, repeats: int) -> tuple[dict, object]:
    """Wall and CPU seconds of ``func()`` over ``repeats`` runs with their medians, and the last result."""
    runs, result = [], None
    for _ in range(repeats):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = func()
        runs.append({"wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0})
    timing = {"runs": runs, "median_wall_s": statistics.median(r["wall_s"] for r in runs),
              "median_cpu_s": statistics.median(r["cpu_s"] for r in runs)}
    return timing, result


def quiet_torch():
    """torch, with its warning about read-only (memory-mapped) arrays silenced."""
    import torch

    warnings.filterwarnings("ignore", message=".*not writable.*")
    return torch


# ------------------------------------------------------------------ 1. read once
def read_passes(store: ConnectomeStore, subjects: list, with_torch: bool) -> dict:
    """Callables that each touch every subject's array once."""
    n_max = max(store.timeseries(s).shape[0] for s in subjects)
    copy_buffer = np.empty((n_max, store.n_nodes), dtype=store.dtype)
    float_buffer = np.empty((n_max, store.n_nodes), dtype=np.float32)
    copy_buffer.fill(0)  # touch the pages now, not in the first timed pass
    float_buffer.fill(0)

    def memcpy_mmap():
        for s in subjects:
            series = store.timeseries(s)
            np.copyto(copy_buffer[:len(series)], series)

    def read_file():
        raw = copy_buffer.reshape(-1).view(np.uint8)
        for s in subjects:
            series = store.timeseries(s)
            with open(series.filename, "rb", buffering=0) as handle:
                handle.seek(series.offset)
                handle.readinto(memoryview(raw)[:series.nbytes])

    def numpy_sum():
        for s in subjects:
            np.asarray(store.timeseries(s)).sum(dtype=np.float32)

    def numpy_astype():
        for s in subjects:
            np.asarray(store.timeseries(s), dtype=np.float32)

    passes = {
        "memcpy_mmap": ("plain read: np.copyto(buffer, memory map), the kernel's path (store.timeseries)", memcpy_mmap),
        "read_file": ("plain read: file.readinto(buffer) from the page cache", read_file),
        "numpy_sum_f32": ("np.asarray(ts).sum(dtype=float32)", numpy_sum),
        "numpy_astype_f32": ("np.asarray(ts, float32), new array per subject (numpy engine's conversion)",
                             numpy_astype),
    }
    if with_torch:
        torch = quiet_torch()
        out = torch.from_numpy(float_buffer)

        def torch_copy():
            for s in subjects:
                series = store.timeseries(s)
                out[:len(series)].copy_(torch.from_numpy(np.asarray(series)))

        def torch_to():
            for s in subjects:
                torch.as_tensor(np.asarray(store.timeseries(s))).to(torch.float32)

        passes["torch_copy_f32"] = ("torch: float16 -> float32 into a reused buffer (Tensor.copy_)", torch_copy)
        passes["torch_to_f32"] = ("torch: .to(float32), new tensor per subject (torch engine's conversion)",
                                  torch_to)
    return passes


def measure_read_once(store, subjects, repeats, with_torch) -> dict:
    passes = read_passes(store, subjects, with_torch)
    passes["memcpy_mmap"][1]()  # warm-up: every page in the page cache, buffers touched
    nbytes = sum(store.timeseries(s).nbytes for s in subjects)
    out = {"bytes": nbytes}
    for key, (label, func) in passes.items():
        timing, _ = timed(func, repeats)
        timing.update(label=label, gb_per_s=nbytes / timing["median_wall_s"] / 1e9)
        out[key] = timing
        print(f"  {label:<86} {timing['median_wall_s']:7.3f} s  ({timing['gb_per_s']:5.1f} GB/s)", flush=True)
    plain = {k: out[k]["median_wall_s"] for k in ("memcpy_mmap", "read_file")}
    out["anchor"] = min(plain, key=plain.get)
    out["anchor_s"] = plain[out["anchor"]]
    print(f"  anchor (fastest plain read of every byte): {out['anchor']} {out['anchor_s']:.3f} s")
    return out


# ------------------------------------------------------------------ 2. the kernel
def measure_kernel(store, seeds, subjects, engines, repeats) -> dict:
    out = {}
    for engine in engines:
        def run_kernel(engine=engine):
            return network.seed_maps(store, seeds, engine=engine, subjects=subjects)

        timing, maps = timed(run_kernel, repeats)
        timing["per_subject_ms"] = 1000 * timing["median_wall_s"] / len(subjects)
        timing["engine_used"] = maps.metadata.get("engine")
        out[engine] = timing
        walls = ", ".join(f"{r['wall_s']:.2f}" for r in timing["runs"])
        print(f"  engine={engine:<6} wall {walls} s (median {timing['median_wall_s']:.2f} s, "
              f"{timing['per_subject_ms']:.1f} ms per subject); CPU median {timing['median_cpu_s']:.2f} s", flush=True)
    return out


# ------------------------------------------------------------------ 3. straightforward approaches
def time_patient_at_a_time(store, seeds, subjects) -> list:
    """Wall seconds per seed-subject pair of the straightforward approach run one patient at a time.

    For every seed, for every connectome subject: read and convert the subject's run to
    float64, form the seed's weighted mean time series, its Pearson r with every node
    (textbook formula) and the Fisher z. Unlike ``reference_seed_maps`` the subject is read
    again for every patient, as when patients are processed one by one.
    """
    weights = np.asarray(seeds, np.float64)
    weights /= weights.sum(axis=1, keepdims=True)
    pair_s = []
    for j in range(len(weights)):
        for s in subjects:
            wall0 = time.perf_counter()
            data = np.asarray(store.timeseries(s), dtype=np.float64)
            seed_series = data @ weights[j]
            seed_series -= seed_series.mean()
            data -= data.mean(axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):
                r = (seed_series @ data) / np.sqrt((seed_series @ seed_series) * np.einsum("ij,ij->j", data, data))
            network.fisher_z(np.nan_to_num(r))
            pair_s.append(time.perf_counter() - wall0)
    return pair_s


def agreement(ours, theirs) -> dict:
    """max |delta| of mean r, mean z and t, and max relative |delta t| where |t| > 1; nodes
    where either t is NaN (no variance: medial wall) are left out of the t figures."""
    out = {}
    for key in ("mean_r", "mean_z", "t"):
        a, b = np.asarray(getattr(ours, key), np.float64), np.asarray(getattr(theirs, key), np.float64)
        both = np.isfinite(a) & np.isfinite(b)
        out[f"max_abs_d_{key}"] = float(np.abs(a[both] - b[both]).max()) if both.any() else float("nan")
        out[f"nan_pattern_equal_{key}"] = bool(np.array_equal(np.isfinite(a), np.isfinite(b)))
    t_ours, t_theirs = np.asarray(ours.t, np.float64), np.asarray(theirs.t, np.float64)
    big = np.isfinite(t_ours) & np.isfinite(t_theirs) & (np.abs(t_theirs) > 1)
    out["max_rel_d_t"] = float((np.abs(t_ours - t_theirs)[big] / np.abs(t_theirs[big])).max()) if big.any() \
        else float("nan")
    out["max_abs_t"] = float(np.nanmax(np.abs(t_theirs))) if np.isfinite(t_theirs).any() else float("nan")
    out["pass"] = bool(out["max_abs_d_mean_r"] <= TOLERANCE_R and out["max_abs_d_mean_z"] <= TOLERANCE_Z
                       and out["nan_pattern_equal_mean_r"] and out["nan_pattern_equal_mean_z"])
    return out


def print_agreement(label: str, agree: dict) -> None:
    print(f"  agreement, {label}: max |d mean r| {agree['max_abs_d_mean_r']:.1e} (tolerance {TOLERANCE_R:g}), "
          f"max |d mean z| {agree['max_abs_d_mean_z']:.1e} (tolerance {TOLERANCE_Z:g}), max relative |d t| "
          f"{agree['max_rel_d_t']:.1e} (|t| up to {agree['max_abs_t']:.0f}) -> {verdict(agree['pass'])}")


def measure_reference(store, seeds, k: int, n: int, repeats: int, n_seeds_full: int, n_subjects_full: int):
    """Time ``reference_seed_maps`` on n subjects with 1 and with k seeds; scale to the full problem.

    It reads and converts each subject once for all its seeds, so its time is
    ``n (a + k b)``: ``a`` per subject (read, float64 conversion, signal mask), ``b`` per
    seed-subject pair (one Pearson map and its Fisher z). The two runs give ``a`` and
    ``b``, and the full problem costs ``N (a + K b)``. Returns (results, maps of the k seeds).
    """
    view = StoreView(store, n)
    one, _ = timed(lambda: network.reference_seed_maps(view, seeds[:1]), repeats)
    many, maps = timed(lambda: network.reference_seed_maps(view, seeds[:k]), repeats)
    out = {"seeds": k, "subjects": n, "one_seed": one, "k_seeds": many}
    for clock in ("wall", "cpu"):
        t1, tk = one[f"median_{clock}_s"] / n, many[f"median_{clock}_s"] / n
        per_pair = max((tk - t1) / (k - 1), 0.0)
        per_subject = max(t1 - per_pair, 0.0)
        full = n_subjects_full * (per_subject + n_seeds_full * per_pair)
        out[clock] = {"per_subject_s": per_subject, "per_pair_s": per_pair, "estimated_full_s": full,
                      "per_pair_at_full_scale_s": full / (n_seeds_full * n_subjects_full)}
    return out, maps


def measure_straightforward(store, seeds, args, engines, n_subjects_full) -> dict:
    """The straightforward approaches on a subset, scaled to the full problem; agreement of the kernel."""
    k, n = min(args.ref_seeds, len(seeds)), min(args.ref_subjects, len(store))
    n_pairs_full = len(seeds) * n_subjects_full
    out = {}
    out["reference"], reference = measure_reference(store, seeds, k, n, args.repeats, len(seeds), n_subjects_full)
    wall = out["reference"]["wall"]
    print(f"  reference_seed_maps (float64 textbook Pearson per seed x subject; each subject read once for its "
          f"seeds), {n} subjects with 1 and {k} seeds: {1000 * wall['per_subject_s']:.1f} ms per subject (read, "
          f"convert) + {1000 * wall['per_pair_s']:.1f} ms per seed-subject pair -> full problem "
          f"{wall['estimated_full_s']:,.0f} s ({1000 * wall['per_pair_at_full_scale_s']:.1f} ms per pair at "
          f"{len(seeds)} seeds); CPU {out['reference']['cpu']['estimated_full_s']:,.0f} s", flush=True)

    pair_s = time_patient_at_a_time(store, seeds[:k], list(range(n)))
    per_pair = float(np.median(pair_s))
    out["patient_at_a_time"] = {"seeds": k, "subjects": n, "pair_s": pair_s, "median_pair_s": per_pair,
                                "estimated_full_s": per_pair * n_pairs_full}
    print(f"  straightforward one patient at a time (subject re-read per pair), {k} seeds x {n} subjects: median "
          f"{1000 * per_pair:.1f} ms per pair -> {per_pair * n_pairs_full:,.0f} s for {n_pairs_full:,} pairs", flush=True)

    wall0 = time.perf_counter()
    for j in range(k):  # the kernel once per patient: what batching the seeds saves
        network.seed_maps(store, seeds[j:j + 1], engine="numpy", subjects=list(range(n)))
    per_pair = (time.perf_counter() - wall0) / (k * n)
    out["kernel_one_seed_at_a_time"] = {"engine": "numpy", "mean_pair_s": per_pair,
                                        "estimated_full_s": per_pair * n_pairs_full}
    print(f"  seed_maps one patient at a time (numpy): {1000 * per_pair:.1f} ms per pair -> "
          f"{per_pair * n_pairs_full:,.0f} s for {n_pairs_full:,} pairs")

    out["agreement"] = {}
    for engine in engines:
        agree = agreement(network.seed_maps(store, seeds[:k], engine=engine, subjects=list(range(n))), reference)
        out["agreement"][engine] = agree
        print_agreement(f"seed_maps engine={engine} vs reference_seed_maps ({k} seeds x {n} subjects)", agree)
    return out


# ------------------------------------------------------------------ 5. profile
class Stopwatch:
    """Wall seconds of named stages, summed over subjects."""

    def __init__(self, n_subjects: int):
        self.n_subjects = n_subjects
        self.samples: dict[str, list] = {}
        self._last = time.perf_counter()

    def restart(self):
        self._last = time.perf_counter()

    def lap(self, stage: str):
        now = time.perf_counter()
        self.samples.setdefault(stage, []).append(now - self._last)
        self._last = now

    def per_subject_ms(self) -> dict:
        """Mean milliseconds per subject of every stage (some stages, such as merging a
        block's sums, happen once every few subjects)."""
        return {stage: 1000 * sum(values) / self.n_subjects for stage, values in self.samples.items()}


class BlockSums:
    """The kernel's reduction, as ``seed_maps`` does it: float64 sums per block of subjects
    (a fresh ``_Sums`` per block), merged into the total when the block is done."""

    def __init__(self, n_seeds: int, n_nodes: int):
        self.shape = (n_seeds, n_nodes)
        self.block_size = inspect.signature(network.seed_maps).parameters["block_size"].default
        self.total, self.partial = network._Sums(*self.shape), None

    def add(self, subject_maps, clock: Stopwatch):
        if self.partial is None:
            self.partial = network._Sums(*self.shape)
        self.partial.add(subject_maps)
        clock.lap("accumulate (float64 sums of r, z, z^2)")
        if self.partial.n == self.block_size:
            self.finish(clock)

    def finish(self, clock: Stopwatch):
        if self.partial is not None:
            self.total.merge(self.partial)
            self.partial = None
            clock.lap("merge block sums")


def profile_numpy(store, weights, subjects) -> dict:
    """The numpy kernel's steps (as in ``network._NumpyKernel``), timed one by one."""
    sums, clock = BlockSums(weights.shape[1], store.n_nodes), Stopwatch(len(subjects))
    for s in subjects:
        clock.restart()
        z = np.asarray(store.timeseries(s), dtype=np.float32)
        clock.lap("convert float16 -> float32 (new array)")
        series = z @ weights
        clock.lap("product 1: S = Z W")
        series -= series.mean(axis=0)
        series /= np.linalg.norm(series, axis=0)
        clock.lap("centre and scale S")
        r = series.T @ z
        clock.lap("product 2: r = S^T Z")
        np.clip(r, -network.R_CLIP, network.R_CLIP, out=r)
        fz = network._fisher_z_inplace(r.copy())
        clock.lap("clip + Fisher z")
        seed = network.fisher_z(series.T @ series)
        clock.lap("seed-to-seed z")
        degree = z.T @ z.sum(axis=1) / max(1, store.n_signal(s))
        clock.lap("degree (Z^T Z 1)")
        sums.add((r, fz, seed, degree), clock)
    clock.restart()
    sums.finish(clock)
    return clock.per_subject_ms()


def profile_torch(store, weights, subjects) -> dict:
    """The torch kernel's steps (as in ``network._TorchKernel``), timed one by one."""
    torch = quiet_torch()
    w = torch.from_numpy(weights)
    sums, clock = BlockSums(weights.shape[1], store.n_nodes), Stopwatch(len(subjects))
    for s in subjects:
        clock.restart()
        z = torch.as_tensor(np.asarray(store.timeseries(s))).to(torch.float32)
        clock.lap("convert float16 -> float32 (new array)")
        series = z @ w
        clock.lap("product 1: S = Z W")
        series -= series.mean(dim=0)
        series /= torch.linalg.vector_norm(series, dim=0)
        clock.lap("centre and scale S")
        r = series.T @ z
        clock.lap("product 2: r = S^T Z")
        r = r.clamp_(-network.R_CLIP, network.R_CLIP)
        fz = torch.atanh(r)
        clock.lap("clip + Fisher z")
        seed = torch.atanh((series.T @ series).clamp_(-network.R_CLIP, network.R_CLIP))
        clock.lap("seed-to-seed z")
        degree = (z.T @ z.sum(dim=1)) / max(1, store.n_signal(s))
        clock.lap("degree (Z^T Z 1)")
        sums.add(tuple(x.numpy() for x in (r, fz, seed, degree)), clock)
    clock.restart()
    sums.finish(clock)
    return clock.per_subject_ms()


def profile_floor(store, weights, subjects, with_torch) -> dict:
    """What the steps could cost at best here: conversion into a reused buffer, the products alone.

    numpy (OpenBLAS threads) and torch (OpenMP threads) run in separate loops: interleaved,
    each library's idle threads spin while the other works and slow it down.
    """
    n_max = max(store.timeseries(s).shape[0] for s in subjects)
    buffer = np.empty((n_max, store.n_nodes), np.float32)
    buffer.fill(0)
    clock = Stopwatch(len(subjects))
    for s in subjects:
        ts = store.timeseries(s)
        clock.restart()
        np.copyto(buffer[:len(ts)], ts)
        clock.lap("numpy: convert into a reused float32 buffer")
        z = buffer[:len(ts)]
        (z @ weights).T @ z
        clock.lap("numpy (OpenBLAS): the two products only")
    if with_torch:
        torch = quiet_torch()
        tw = torch.from_numpy(weights)
        for s in subjects:
            ts = store.timeseries(s)
            tz = torch.from_numpy(buffer)[:len(ts)]
            clock.restart()
            tz.copy_(torch.from_numpy(np.asarray(ts)))
            clock.lap("torch: convert into a reused float32 buffer")
            (tz @ tw).T @ tz
            clock.lap("torch (MKL): the two products only")
    return clock.per_subject_ms()


def measure_profile(store, seeds, n_subjects, engines) -> dict:
    weights = np.ascontiguousarray((seeds / seeds.sum(axis=1, keepdims=True)).T, dtype=np.float32)
    subjects = list(range(min(n_subjects, len(store))))
    n_time = store.timeseries(subjects[0]).shape[0]
    out = {"subjects": len(subjects), "statistic": "mean ms per subject",
           "product_flops_per_subject": 2 * 2 * n_time * store.n_nodes * len(seeds)}
    profilers = {"numpy": profile_numpy, "torch": profile_torch}
    for engine in engines:
        profilers[engine](store, weights, subjects[:1])  # warm-up
        out[engine] = profilers[engine](store, weights, subjects)
    out["floor"] = profile_floor(store, weights, subjects, "torch" in engines)
    return out


def print_profile(profile: dict, engines, read_ms: float, kernel: dict) -> None:
    print(f"  ms per connectome subject, mean over {profile['subjects']} subjects (read once: {read_ms:.1f} ms "
          "per subject):")
    for engine in engines:
        stages = profile[engine]
        total = sum(stages.values())
        print(f"   engine={engine}: stages sum to {total:.1f} ms (the timed kernel: {kernel[engine]['per_subject_ms']:.1f} "
              "ms per subject)")
        for stage, ms in stages.items():
            print(f"     {stage:<44} {ms:7.2f} ms  {100 * ms / total:5.1f} %")
    print("   best case on this machine:")
    for stage, ms in profile["floor"].items():
        rate = f", {profile['product_flops_per_subject'] / ms / 1e6:.0f} GFLOP/s" if "products" in stage else ""
        print(f"     {stage:<44} {ms:7.2f} ms  ({ms / read_ms:5.1f}x the read{rate})")
    print(f"   the two products are {profile['product_flops_per_subject'] / 1e9:.2f} GFLOP per subject "
          f"(4 T V K): compute, not the read, bounds the kernel here")


# ------------------------------------------------------------------ reporting
def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def machine_facts(torch_ok: bool) -> dict:
    facts = {"machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
             "cpu": _cpu_model(), "memory_gib": _memory_gib(), "python": platform.python_version(),
             "numpy": np.__version__, "blas": _blas_pools(), "load_average_start": list(os.getloadavg())}
    if torch_ok:
        import torch

        facts.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                     torch_blas="MKL" if torch.backends.mkl.is_available() else "other")
    return facts


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        return None


def _blas_pools() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    pools = [f"{p['internal_api']} {p.get('version') or ''}".strip() + f" ({p['num_threads']} threads)"
             for p in threadpool_info()]
    return ", ".join(pools) or "none found"


def print_summary(results: dict) -> None:
    """The table: times, ratios against both anchors, verdicts."""
    read, kernel, subset = results["read_once"], results["kernel"], results["subset"]
    reference = subset["reference"]
    c = results["conditions"]
    print(f"\n[summary] {c['seeds']} seeds x {c['subjects']} subjects x {c['timepoints']} time points x 20,484 "
          f"vertices ({c['dtype']}); medians (min) of wall seconds; goals on the median wall time")
    rows = [(f"read once from memory (anchor: {read['anchor']})", read["anchor_s"], None, None, None, None)]
    if "torch_copy_f32" in read:
        rows.append(("  float16 -> float32 pass, torch, reused buffer", read["torch_copy_f32"]["median_wall_s"],
                     None, read["torch_copy_f32"]["median_cpu_s"], None, None))
    for engine, timing in kernel.items():
        goal = results["goals"][engine]
        rows.append((f"seed_maps engine={engine}", timing["median_wall_s"], min(r["wall_s"] for r in timing["runs"]),
                     timing["median_cpu_s"], goal["speedup_vs_straightforward"], goal["ratio_vs_read_once"]))
    rows.append(("straightforward: reference_seed_maps (estimate)", reference["wall"]["estimated_full_s"], None,
                 reference["cpu"]["estimated_full_s"], None, None))
    rows.append(("  same, one patient at a time (estimate)", subset["patient_at_a_time"]["estimated_full_s"],
                 None, None, None, None))
    rows.append(("  seed_maps one patient at a time (estimate)",
                 subset["kernel_one_seed_at_a_time"]["estimated_full_s"], None, None, None, None))
    print(f"  {'':<50} {'wall (s)':>16} {'CPU (s)':>9}   {'vs straightforward':>18}   {'vs read once':>13}")
    print(f"  {'':<50} {'':>16} {'':>9}   {f'(goal >= {GOAL_SPEEDUP:.0f}x)':>18}   "
          f"{f'(goal <= {GOAL_READ_RATIO:.0f}x)':>13}")
    for name, wall, wall_min, cpu, speedup, ratio in rows:
        wall_text = f"{wall:,.2f}" + (f" ({wall_min:,.2f})" if wall_min is not None else "")
        cpu_text = f"{cpu:,.2f}" if cpu is not None else ""
        speed = f"{speedup:,.0f}x {verdict(speedup >= GOAL_SPEEDUP)}" if speedup is not None else ""
        read_ratio = f"{ratio:.1f}x {verdict(ratio <= GOAL_READ_RATIO)}" if ratio is not None else ""
        print(f"  {name:<50} {wall_text:>16} {cpu_text:>9}   {speed:>18}   {read_ratio:>13}")
    for engine in kernel:
        goal = results["goals"][engine]
        print(f"  engine={engine}: {goal['speedup_cpu_vs_straightforward']:,.0f}x less CPU time than "
              f"reference_seed_maps; fastest run {goal['speedup_vs_straightforward_min']:,.0f}x faster, "
              f"{goal['ratio_vs_read_once_min']:.1f}x the read; {goal['speedup_vs_patient_at_a_time']:,.0f}x faster "
              f"than the straightforward approach one patient at a time, {goal['speedup_vs_kernel_one_seed']:,.0f}x "
              "than seed_maps one patient at a time")
    for engine, agree in subset["agreement"].items():
        print(f"  agreement with reference_seed_maps on the subset, engine={engine}: max |d mean r| "
              f"{agree['max_abs_d_mean_r']:.1e}, max |d mean z| {agree['max_abs_d_mean_z']:.1e} -> "
              f"{verdict(agree['pass'])}")
    if c["quick"]:
        print(f"  (--quick: {c['seeds']} seeds only; the goals are set for the full problem, where the kernel "
              "shares each subject's read among 100 seeds)")
    print(f"  load average at start {c['load_average_start'][0]:.2f}, at end {c['load_average_end'][0]:.2f} "
          f"({os.cpu_count()} CPUs; well above 0 other processes shared the cores and wall times are inflated)")


def goal_verdicts(results: dict) -> dict:
    subset = results["subset"]
    reference = subset["reference"]
    read_s = results["read_once"]["anchor_s"]
    goals = {}
    for engine, timing in results["kernel"].items():
        wall, fastest = timing["median_wall_s"], min(r["wall_s"] for r in timing["runs"])
        speedup = reference["wall"]["estimated_full_s"] / wall
        goals[engine] = {"speedup_vs_straightforward": speedup, "speedup_pass": speedup >= GOAL_SPEEDUP,
                         "speedup_vs_straightforward_min": reference["wall"]["estimated_full_s"] / fastest,
                         "speedup_cpu_vs_straightforward": reference["cpu"]["estimated_full_s"] / timing["median_cpu_s"],
                         "ratio_vs_read_once": wall / read_s, "read_once_pass": wall / read_s <= GOAL_READ_RATIO,
                         "ratio_vs_read_once_min": fastest / read_s,
                         "speedup_vs_patient_at_a_time": subset["patient_at_a_time"]["estimated_full_s"] / wall,
                         "speedup_vs_kernel_one_seed": subset["kernel_one_seed_at_a_time"]["estimated_full_s"] / wall}
    goals["targets"] = {"speedup": GOAL_SPEEDUP, "read_once_ratio": GOAL_READ_RATIO,
                        "tolerance_mean_r": TOLERANCE_R, "tolerance_mean_z": TOLERANCE_Z}
    return goals


def run(args) -> dict:
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ("numpy", "torch")]
    if unknown or not engines:
        raise SystemExit(f"network.py: error: --engines takes numpy and/or torch, got {args.engines!r}")
    torch_ok = network._torch_available()
    if "torch" in engines and not torch_ok:
        print("  torch is not installed: the torch engine is left out")
        engines.remove("torch")
    if torch_ok:
        quiet_torch()  # import outside the timed regions

    results: dict = {"conditions": machine_facts(torch_ok)}
    c = results["conditions"]
    c.update(subjects=args.subjects, timepoints=args.timepoints, seeds=args.seeds, dtype=args.dtype,
             repeats=args.repeats, seed=args.seed, quick=bool(args.quick), engines=engines)
    print("NeuroAtrophy seed-map kernel benchmark")
    print(f"  machine: {c['machine']}; {c['cpu']}; {c['memory_gib']:.0f} GiB")
    print(f"  Python {c['python']}, numpy {c['numpy']} (BLAS: {c['blas']})"
          + (f", torch {c['torch']} ({c['torch_threads']} threads, {c['torch_blas']})" if torch_ok else ""))
    print(f"  load average at start: {' '.join(f'{x:.2f}' for x in c['load_average_start'])}")

    temporary = args.store is None
    path = Path(tempfile.mkdtemp(prefix="na-bench-network-")) if temporary else Path(args.store)
    try:
        size_gb = args.subjects * args.timepoints * 20484 * np.dtype(args.dtype).itemsize / 1e9
        free_gb = shutil.disk_usage(path if path.exists() else path.parent).free / 1e9
        if size_gb > 0.9 * free_gb:
            raise SystemExit(f"network.py: error: the store needs {size_gb:.1f} GB, {path} has {free_gb:.1f} GB free")
        print(f"\n[store] {args.subjects} subjects x {args.timepoints} time points x 20,484 vertices, {args.dtype} "
              f"({size_gb:.2f} GB) in {path}" + (" (temporary)" if temporary else ""), flush=True)
        wall0 = time.perf_counter()
        store = open_or_build_store(path, args.subjects, args.timepoints, args.dtype, args.seed)
        results["store"] = {"path": str(path), "temporary": temporary, "build_s": time.perf_counter() - wall0,
                            "bytes": int(size_gb * 1e9), "valid_nodes": int(store.valid.sum())}
        print(f"  ready in {results['store']['build_s']:.0f} s; {results['store']['valid_nodes']:,} nodes with signal")
        subjects = list(range(args.subjects))

        seeds = atrophy_like_seeds(args.seeds, store.valid, args.seed)
        sizes = seeds.sum(axis=1)
        results["seeds"] = {"n": len(seeds), "size_min": int(sizes.min()), "size_median": float(np.median(sizes)),
                            "size_max": int(sizes.max())}
        print(f"[seeds] {len(seeds)} compact patches on the white-surface mesh, {int(sizes.min())}-{int(sizes.max())} "
              f"vertices (median {np.median(sizes):.0f}), binary weights")

        print(f"\n[1. read once] every subject's array once, page cache warm (after one untimed pass); "
              f"median of {args.repeats}", flush=True)
        results["read_once"] = measure_read_once(store, subjects, args.repeats, "torch" in engines)

        print(f"\n[2. kernel] seed_maps(store, {len(seeds)} seeds), all {len(subjects)} subjects in one pass, "
              f"n_jobs=1 (BLAS threads); {args.repeats} runs per engine", flush=True)
        results["kernel"] = measure_kernel(store, seeds, subjects, engines, args.repeats)

        print(f"\n[3-4. straightforward approach on a subset, scaled to {len(seeds)} seeds x {len(subjects)} subjects; "
              "agreement]", flush=True)
        results["subset"] = measure_straightforward(store, seeds, args, engines, len(subjects))

        if args.profile_subjects > 0:
            print("\n[5. profile] the kernels' steps replayed one by one", flush=True)
            results["profile"] = measure_profile(store, seeds, args.profile_subjects, engines)
            print_profile(results["profile"], engines, 1000 * results["read_once"]["anchor_s"] / len(subjects),
                          results["kernel"])
    finally:
        if temporary:
            shutil.rmtree(path, ignore_errors=True)

    results["goals"] = goal_verdicts(results)
    c["load_average_end"] = list(os.getloadavg())
    print_summary(results)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (~10-20 s): 20 subjects x 150 time points, 20 seeds, small subsets")
    parser.add_argument("--subjects", type=int, default=None, help="connectome subjects (default 200)")
    parser.add_argument("--timepoints", type=int, default=None, help="time points per subject (default 300)")
    parser.add_argument("--seeds", type=int, default=None, help="patient seeds (default 100)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--store", default=None,
                        help="folder of the synthetic store, kept and reused between runs (default: a temporary one)")
    parser.add_argument("--engines", default="numpy,torch", help="comma-separated seed_maps engines")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each measurement (default 3)")
    parser.add_argument("--ref-seeds", type=int, default=None, help="seeds of the straightforward subset (default 5, at least 2)")
    parser.add_argument("--ref-subjects", type=int, default=None,
                        help="subjects of the straightforward subset (default 10)")
    parser.add_argument("--profile-subjects", type=int, default=None,
                        help="subjects of the stage-by-stage profile (default 20; 0 skips)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the store and the seeds")
    parser.add_argument("--out", default=None,
                        help="JSON results path (default bench/results/network-<date>[-quick].json)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    minimum = {"subjects": 2, "timepoints": 10, "seeds": 2, "repeats": 1, "ref_seeds": 2, "ref_subjects": 2}
    for key, low in minimum.items():
        if getattr(args, key) < low:
            parser.error(f"--{key.replace('_', '-')} must be at least {low}, got {getattr(args, key)}")
    return args


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(results, handle, indent=2, default=float)
    os.chmod(tmp, 0o644)  # mkstemp creates it private
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    out = Path(args.out) if args.out else \
        BENCH_DIR / "results" / f"network-{time.strftime('%Y-%m-%d')}{'-quick' if args.quick else ''}.json"
    write_json(results, out)
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    warnings.simplefilter("default")
    sys.exit(main())
