"""Speed, memory and agreement benchmark of the vertex-wise normative model.

Simulates a cohort on all 20,484 fsaverage5 vertices in memory, then

1. times ``neuroatrophy.normative.NormativeModel().fit(controls)`` followed by
   ``.score(patients)`` (wall and CPU time, peak memory; several repeats);
2. runs PCNtoolkit 1.3.0's BLR on a subset of vertices as the reference, in its
   own virtual environment ``bench/.pcn-venv`` (created on first use), through
   ``bench/_pcn_worker.py``;
3. compares the two models' patient z-scores vertex by vertex (Pearson r, |dZ|)
   and their CPU cost per 1000 vertices;
4. projects the largest cohort that fits in 8 GiB from the peak memory of
   fit + score measured in fresh processes at a few cohort sizes.

It prints its results (and writes them as JSON with ``--out``); it is not a test.

Usage::

    .venv/bin/python bench/normative.py              # full run (a few minutes)
    .venv/bin/python bench/normative.py --quick      # smoke run
    .venv/bin/python bench/normative.py --no-pcn --out bench/results/run.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

PCN_VENV = BENCH_DIR / ".pcn-venv"
PCN_WORKER = BENCH_DIR / "_pcn_worker.py"
PCN_VERSION = "1.3.0"

N_KNOTS, DEGREE = 5, 3
SITES = ("site_A", "site_B", "site_C", "site_D")
AGE_RANGE = (18.0, 80.0)
ATROPHY_FRACTION = 0.10     # patients: first 10 % of vertices ...
ATROPHY_SD = 2.0            # ... thinned by 2 noise SDs
MIN_TEMPLATE_MM = 0.5       # the template is ~0 on the medial wall

GOAL_WALL_S = 2.0           # ours: fit + score of 20,484 vertices, wall seconds
GOAL_SPEEDUP = 1000.0       # ours vs PCNtoolkit, CPU seconds per vertex
GOAL_MIN_R = 0.999          # agreement of patient z-scores, every vertex of the subset
MEMORY_BUDGET_BYTES = 8 * 1024**3
CAPACITY_SIZES = "800x20484,1600x20484,3200x20484,800x10242"
QUICK_CAPACITY_SIZES = "300x20484,600x20484,300x10242"
MIB = 1024.0**2
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
PCN_CONFIGS = {
    "default": "PCNtoolkit defaults (L-BFGS-B, finite-difference gradients with step 0.1, L2 penalty 0.1)",
    "cg": "optimizer='cg' (PCNtoolkit's analytic evidence gradient, run to convergence)",
}


# ------------------------------------------------------------------ simulation
def template_thickness() -> np.ndarray:
    """fsaverage5 template thickness (mm), left then right hemisphere, medial wall raised to 0.5 mm."""
    from nilearn.datasets import load_fsaverage_data

    surface = load_fsaverage_data("fsaverage5", data_type="thickness")
    thickness = np.concatenate(
        [np.asarray(surface.data.parts["left"]), np.asarray(surface.data.parts["right"])]
    ).astype(float)
    return np.maximum(thickness, MIN_TEMPLATE_MM)


def simulate_cohort(n_controls: int, n_patients: int, seed: int = 0, n_vertices: int | None = None) -> dict:
    """Simulate controls and patients on fsaverage5 vertices (vectorised, seeded).

    thickness = template + vertex-wise quadratic age effect + sex offset + site
    offset + Gaussian noise whose SD grows mildly with age. Effects and noise are
    scaled down where the template is thin (medial wall) so values stay positive. Patients have the first 10 % of vertices thinned by 2 noise SDs.
    Patient ages are clipped into the controls' age range so that neither model
    extrapolates (they extrapolate differently by design).

    ``n_vertices`` keeps only the first vertices (for the memory projection).
    Returns a dict with ``Y_controls``, ``cov_controls``, ``Y_patients``,
    ``cov_patients`` and ``atrophied`` (boolean mask over vertices).
    """
    rng = np.random.default_rng(seed)
    template = template_thickness()[:n_vertices]
    n_vert = template.size
    n = n_controls + n_patients

    # Vertex-wise effects; 'scale' keeps thin (medial-wall) vertices positive.
    scale = np.clip(template / 2.0, 0.25, 1.0)
    slope = rng.normal(-0.20, 0.06, n_vert) * scale        # mm per 31 years of age
    curvature = rng.normal(-0.06, 0.03, n_vert) * scale    # mm at the age extremes
    sex_offset = rng.normal(0.04, 0.02, n_vert) * scale    # male - female, mm
    site_offset = (rng.normal(0.0, 0.05, (len(SITES), 1)) + rng.normal(0.0, 0.03, (len(SITES), n_vert))) * scale
    noise_sd = rng.uniform(0.15, 0.30, n_vert) * scale

    age = rng.uniform(*AGE_RANGE, n)
    ctrl_lo, ctrl_hi = age[:n_controls].min(), age[:n_controls].max()
    age[n_controls:] = np.clip(age[n_controls:], ctrl_lo, ctrl_hi)
    sex = rng.choice(np.array(["F", "M"]), n)
    site_index = rng.integers(0, len(SITES), n)
    a = (age - 49.0) / 31.0                                  # age mapped to about [-1, 1]
    sd_factor = 1.0 + 0.15 * a                               # noise SD grows with age
    male = (sex == "M").astype(float)

    n_atrophied = int(round(ATROPHY_FRACTION * n_vert))
    Y = np.empty((n, n_vert))
    for start in range(0, n, 256):  # row blocks: no (n, V) temporaries
        rows = slice(start, min(start + 256, n))
        block = rng.standard_normal((rows.stop - start, n_vert))
        block *= noise_sd
        block *= sd_factor[rows, None]
        block += template
        block += a[rows, None] * slope
        block += (a[rows, None] ** 2) * curvature
        block += male[rows, None] * sex_offset
        block += site_offset[site_index[rows]]
        Y[rows] = block
    patient_rows = slice(n_controls, n)
    Y[patient_rows, :n_atrophied] -= ATROPHY_SD * noise_sd[:n_atrophied] * sd_factor[patient_rows, None]
    # Thickness must be positive: this floor touches a handful of values (a few per 10^7,
    # thinned patients on the 0.5 mm medial wall), which neither model notices.
    np.maximum(Y, 0.01, out=Y)

    ids = np.array([f"sub-{i:05d}" for i in range(n)])
    cov = pd.DataFrame({"subject_id": ids, "age": age, "sex": sex, "site": np.array(SITES)[site_index]})
    atrophied = np.zeros(n_vert, bool)
    atrophied[:n_atrophied] = True
    return {
        "Y_controls": Y[:n_controls],
        "cov_controls": cov.iloc[:n_controls].reset_index(drop=True),
        "Y_patients": Y[n_controls:],
        "cov_patients": cov.iloc[n_controls:].reset_index(drop=True),
        "atrophied": atrophied,
    }


# -------------------------------------------------------------------- our model
def make_model():
    from neuroatrophy.normative import NormativeModel

    return NormativeModel(n_knots=N_KNOTS, degree=DEGREE, heteroskedastic=False, warp=None)


def fit_and_score(cohort: dict):
    model = make_model().fit(cohort["Y_controls"], cohort["cov_controls"])
    return model.score(cohort["Y_patients"], cohort["cov_patients"])


def time_ours(cohort: dict, repeats: int) -> tuple[list[dict], np.ndarray]:
    """Wall and CPU seconds of fit + score, ``repeats`` times (no tracing active)."""
    runs, z = [], None
    for _ in range(repeats):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        deviations = fit_and_score(cohort)
        runs.append({"wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0})
        z = deviations.z
    return runs, z


def traced_peak_ours(cohort: dict) -> float:
    """Peak bytes allocated by Python and numpy during one fit + score (tracemalloc)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fit_and_score(cohort)
        return float(tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()


def max_rss_bytes() -> float:
    """Peak resident set size of this process so far, from ``getrusage`` (Linux reports KiB).

    Linux carries it over fork and exec, so a child started from a big parent
    reports at least the parent's size: use :func:`window_peak_rss` there.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def _proc_status_bytes(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def window_peak_rss(func) -> tuple[float, float]:
    """(RSS before, peak RSS while running ``func()``), in bytes, from VmRSS and VmHWM.

    Falls back to ``getrusage`` (peak over the process lifetime) without /proc.
    """
    before = _proc_status_bytes("VmRSS")
    reset = reset_peak_rss()
    func()
    peak = _proc_status_bytes("VmHWM") if reset else None
    return (before if before is not None else float("nan")), (peak if peak is not None else max_rss_bytes())


def blas_threads() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    pools = threadpool_info()
    return ", ".join(f"{p['internal_api']}={p['num_threads']}" for p in pools) or "none found"


# ------------------------------------------------------------------ PCNtoolkit
def pcn_python() -> Path:
    return PCN_VENV / "bin" / "python"


def ensure_pcn_venv() -> Path:
    """Create ``bench/.pcn-venv`` with pcntoolkit 1.3.0 unless it is already there."""
    python = pcn_python()
    if python.exists():
        probe = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('pcntoolkit'))"],
            capture_output=True, text=True,
        )
        if probe.returncode == 0 and probe.stdout.strip() == PCN_VERSION:
            return python
    print(f"Creating {PCN_VENV} with pcntoolkit=={PCN_VERSION} (first run only; a few minutes)...", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(PCN_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"pcntoolkit=={PCN_VERSION}"], check=True)
    return python


def run_pcn(cohort: dict, vertices: np.ndarray, configs=("default", "cg"), single_thread: bool = True) -> dict:
    """Fit PCNtoolkit's BLR on ``vertices`` of the controls and score the patients, per configuration.

    Returns ``{"scalars": {...}, "arrays": {...}}`` as written by ``_pcn_worker.py``
    (keys suffixed by configuration), plus the subprocess wall time.
    """
    python = ensure_pcn_venv()
    cc, cp = cohort["cov_controls"], cohort["cov_patients"]
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH="")
    if single_thread:
        env.update({name: "1" for name in THREAD_VARIABLES})
    with tempfile.TemporaryDirectory(prefix="na-bench-pcn-") as tmp:
        in_path, out_path = os.path.join(tmp, "input.npz"), os.path.join(tmp, "output.npz")
        np.savez(
            in_path,
            age_train=cc["age"].to_numpy(float), sex_train=cc["sex"].to_numpy(str),
            site_train=cc["site"].to_numpy(str), Y_train=cohort["Y_controls"][:, vertices],
            age_test=cp["age"].to_numpy(float), sex_test=cp["sex"].to_numpy(str),
            site_test=cp["site"].to_numpy(str), Y_test=cohort["Y_patients"][:, vertices],
            n_knots=N_KNOTS, degree=DEGREE, configs=np.array(list(configs)),
        )
        env["PCN_SAVE_DIR"] = tmp  # PCNtoolkit's fallback save folder: keep it out of the repository
        wall0 = time.perf_counter()
        proc = subprocess.run([str(python), str(PCN_WORKER), in_path, out_path], cwd=tmp, env=env,
                              capture_output=True, text=True)
        total_wall = time.perf_counter() - wall0
        if proc.returncode != 0:
            raise RuntimeError(f"PCNtoolkit worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with np.load(out_path, allow_pickle=False) as out:
            result = {key: out[key] for key in out.files}
    scalars = {k: float(v) for k, v in result.items() if v.ndim == 0 and k != "pcntoolkit_version"}
    scalars.update(pcntoolkit_version=str(result["pcntoolkit_version"]), subprocess_wall_s=total_wall,
                   n_vertices=int(len(vertices)), blas_threads="1" if single_thread else "default")
    return {"scalars": scalars, "arrays": {k: v for k, v in result.items() if v.ndim > 0}}


# -------------------------------------------------------------------- capacity
def capacity_child(n_subjects: int, n_vertices: int, seed: int) -> dict:
    """Peak memory of fit + score in this (fresh) process, for one cohort size."""
    cohort = simulate_cohort(n_subjects, 100, seed=seed, n_vertices=n_vertices)
    make_model()  # import the library before the baseline
    rss_before, peak = window_peak_rss(lambda: fit_and_score(cohort))
    return {"n_subjects": n_subjects, "n_vertices": n_vertices, "rss_before_fit_bytes": rss_before,
            "peak_rss_bytes": peak, "traced_peak_bytes": traced_peak_ours(cohort)}


def measure_capacity(sizes: list[tuple[int, int]], seed: int) -> dict:
    """Run :func:`capacity_child` for each (n_subjects, n_vertices) in a fresh process; fit a linear model."""
    points = []
    for n_subjects, n_vertices in sizes:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--_capacity-child",
             str(n_subjects), str(n_vertices), str(seed)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"capacity run n={n_subjects}, V={n_vertices} failed:\n{proc.stderr[-4000:]}")
        points.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    n = np.array([p["n_subjects"] for p in points], float)
    v = np.array([p["n_vertices"] for p in points], float)
    peak = np.array([p["peak_rss_bytes"] for p in points], float)
    # peak = a + b * n_subjects * n_vertices (+ c * n_vertices when the sizes vary in vertices:
    # per-vertex parameters and the patients' outputs do not scale with the cohort).
    columns = [np.ones_like(n), n * v] + ([v] if len(set(v)) > 1 else [])
    coef = np.linalg.lstsq(np.column_stack(columns), peak, rcond=None)[0]
    a, b, c = coef[0], coef[1], (coef[2] if len(coef) > 2 else 0.0)
    budget = MEMORY_BUDGET_BYTES
    return {
        "points": points,
        "fit": {"a_bytes": float(a), "b_bytes_per_subject_vertex": float(b), "c_bytes_per_vertex": float(c)},
        "max_subjects_at_20484": int((budget - a - c * 20484) / (b * 20484)) if b > 0 else None,
        "max_vertices_at_800": int((budget - a) / (b * 800 + c)) if b * 800 + c > 0 else None,
    }


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"800,1600x20484,800x10242"`` -> [(800, 20484), (1600, 20484), (800, 10242)]."""
    sizes = []
    for item in text.split(","):
        n_subjects, _, n_vertices = item.strip().partition("x")
        try:
            size = (int(n_subjects), int(n_vertices or 20484))
        except ValueError:
            raise ValueError(f"--capacity-sizes: cannot read {item!r}; expected N or NxV, e.g. 800x20484") from None
        if size[0] < 50 or not 1 <= size[1] <= 20484:
            raise ValueError(f"--capacity-sizes: {item!r} out of range (N >= 50, 1 <= V <= 20484)")
        sizes.append(size)
    return sizes


# ------------------------------------------------------------------- reporting
def agreement(z_ours: np.ndarray, z_pcn: np.ndarray) -> dict:
    """Per-vertex Pearson r across patients, and |dZ| over all patients and vertices."""
    a = z_ours - z_ours.mean(axis=0)
    b = z_pcn - z_pcn.mean(axis=0)
    r = (a * b).sum(axis=0) / np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))
    dz = np.abs(z_ours - z_pcn)
    return {"r_min": float(r.min()), "r_median": float(np.median(r)), "worst_vertex_position": int(r.argmin()),
            "mean_abs_dz": float(dz.mean()), "max_abs_dz": float(dz.max()), "r": r}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def pcn_subset(n_vertices_total: int, k: int) -> np.ndarray:
    """``k`` vertices evenly spread over both hemispheres (about 10 % of them atrophied in patients)."""
    return np.unique(np.linspace(0, n_vertices_total - 1, k).round().astype(int))


def pcn_section(cohort: dict, z_ours: np.ndarray, ours_cpu_s: float, k: int, single_thread: bool) -> dict:
    """Run the PCNtoolkit anchor, print agreement and speed, return the results."""
    n_vert = cohort["Y_controls"].shape[1]
    vertices = pcn_subset(n_vert, k)
    threads = "1 BLAS thread (conservative: with 2, OpenBLAS overhead on its small solves inflates its CPU time)" \
        if single_thread else "default BLAS threads"
    print(f"\n[PCNtoolkit {PCN_VERSION}] BLR, cubic B-spline of age ({N_KNOTS} knots), sex and site as fixed "
          f"batch effects, homoskedastic Gaussian; {len(vertices)} vertices (evenly spaced, "
          f"{int(cohort['atrophied'][vertices].sum())} atrophied in patients); separate process, {threads}")
    pcn = run_pcn(cohort, vertices, configs=tuple(PCN_CONFIGS), single_thread=single_thread)
    s, arrays = pcn["scalars"], pcn["arrays"]
    print(f"  import {s['import_wall']:.1f} s wall (not counted); worker peak RSS {s['max_rss_mb']:.0f} MiB")

    ours = make_model().fit(cohort["Y_controls"][:, vertices], cohort["cov_controls"])  # same per vertex
    ours_hyp = (float(np.median(np.log(ours.beta_))), float(np.median(np.log(ours.alpha_))))
    ours_per_1000 = 1000 * ours_cpu_s / n_vert
    out = {"pcntoolkit": s, "agreement": {"goal_min_r": GOAL_MIN_R, "vertices": vertices.tolist()},
           "speed": {"ours_cpu_s_per_1000_vertices": ours_per_1000, "goal_speedup": GOAL_SPEEDUP},
           "hyperparameters_median": {"ours": {"log_beta": ours_hyp[0], "log_alpha": ours_hyp[1]}}}
    for config, label in PCN_CONFIGS.items():
        cpu = s[f"fit_cpu_{config}"] + s[f"predict_cpu_{config}"]
        per_1000 = 1000 * cpu / len(vertices)
        agree = agreement(z_ours[:, vertices], arrays[f"z_{config}"])
        hyp = (float(np.median(arrays[f"log_beta_{config}"])), float(np.median(arrays[f"log_alpha_{config}"])))
        print(f"  [{config}] {label}")
        print(f"    fit {s[f'fit_cpu_{config}']:.1f} s CPU ({s[f'fit_wall_{config}']:.1f} s wall; fit() also predicts "
              f"the training set), predict 100 patients {s[f'predict_cpu_{config}']:.1f} s CPU "
              f"({s[f'predict_wall_{config}']:.1f} s wall); median log beta {hyp[0]:.3f}, log alpha {hyp[1]:.3f}")
        out["agreement"][config] = {k: v for k, v in agree.items() if k != "r"}
        out["agreement"][config].update(goal_pass=agree["r_min"] >= GOAL_MIN_R, r_per_vertex=agree["r"].tolist())
        out["speed"][config] = {"pcn_cpu_s_per_1000_vertices": per_1000, "speedup": per_1000 / ours_per_1000,
                                "goal_pass": per_1000 / ours_per_1000 >= GOAL_SPEEDUP}
        out["hyperparameters_median"][config] = {"log_beta": hyp[0], "log_alpha": hyp[1]}

    print(f"  ours: median log beta {ours_hyp[0]:.3f}, log alpha {ours_hyp[1]:.3f} (evidence maximum)")
    print(f"\n[agreement] patient z, ours vs PCNtoolkit, Pearson r over the 100 patients at each vertex of the "
          f"subset; goal r >= {GOAL_MIN_R} on every vertex")
    for config in PCN_CONFIGS:
        g = out["agreement"][config]
        print(f"  vs {config:<8} r min {g['r_min']:.5f} (vertex {int(vertices[g['worst_vertex_position']])}), "
              f"median {g['r_median']:.5f}; mean |dZ| {g['mean_abs_dz']:.4f}, max |dZ| {g['max_abs_dz']:.3f} "
              f"-> {verdict(g['goal_pass'])}")
    print(f"\n[speed] CPU seconds per 1000 vertices, fit + score of 100 patients; goal: ours >= {GOAL_SPEEDUP:,.0f}x "
          "faster per vertex")
    print(f"  ours {ours_per_1000:.4f} s (all 20,484 vertices, default threads)")
    for config in PCN_CONFIGS:
        g = out["speed"][config]
        print(f"  PCNtoolkit {config:<8} {g['pcn_cpu_s_per_1000_vertices']:8.1f} s -> ours is "
              f"{g['speedup']:,.0f}x faster -> {verdict(g['goal_pass'])}")
    return out


def print_summary(results: dict) -> None:
    """One line per goal, with its verdict."""
    print("\n[summary]")
    ours = results["ours"]
    print(f"  ours fit + score, 20,484 vertices: median {ours['median_wall_s']:.2f} s wall (goal < "
          f"{GOAL_WALL_S:.0f} s) -> {verdict(ours['goal_wall_pass'])}")
    if "speed" in results:
        for config in PCN_CONFIGS:
            g = results["speed"][config]
            print(f"  speed vs PCNtoolkit {config}: {g['speedup']:,.0f}x per vertex (goal >= {GOAL_SPEEDUP:,.0f}x) "
                  f"-> {verdict(g['goal_pass'])}")
        for config in PCN_CONFIGS:
            g = results["agreement"][config]
            print(f"  z agreement vs PCNtoolkit {config}: min r {g['r_min']:.5f} (goal >= {GOAL_MIN_R} on every "
                  f"vertex) -> {verdict(g['goal_pass'])}")
    if "capacity" in results:
        cap = results["capacity"]
        print(f"  8 GiB holds (projected): {cap['max_subjects_at_20484']:,} subjects x 20,484 vertices, or "
              f"{cap['max_vertices_at_800']:,} vertices x 800 subjects")


def run(args) -> dict:
    n_controls = 300 if args.quick else 800
    repeats = args.repeats or (2 if args.quick else 3)
    pcn_k = args.pcn_vertices or (50 if args.quick else 200)
    sizes = parse_sizes(args.capacity_sizes or (QUICK_CAPACITY_SIZES if args.quick else CAPACITY_SIZES))
    results: dict = {"conditions": {
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        "python": platform.python_version(), "numpy": np.__version__, "pandas": pd.__version__,
        "threads": f"default (not limited); BLAS pools: {blas_threads()}",
        "n_controls": n_controls, "n_patients": 100, "n_vertices": 20484, "repeats": repeats, "seed": args.seed,
        "quick": bool(args.quick),
    }}
    c = results["conditions"]
    print("NeuroAtrophy normative-model benchmark")
    print(f"  machine: {c['machine']}; Python {c['python']}, numpy {c['numpy']}, pandas {c['pandas']}")
    print(f"  threads: {c['threads']}")

    t0 = time.perf_counter()
    cohort = simulate_cohort(n_controls, 100, seed=args.seed)
    print(f"  cohort: {n_controls} controls + 100 patients x 20,484 vertices, {len(SITES)} sites, "
          f"simulated in {time.perf_counter() - t0:.1f} s (seed {args.seed})")
    n_vert = cohort["Y_controls"].shape[1]

    # --- ours: speed and memory -------------------------------------------------
    make_model()  # import outside the timed region
    print(f"\n[ours] NormativeModel(n_knots={N_KNOTS}, degree={DEGREE}).fit(controls) + .score(patients), "
          f"{n_vert} vertices, {repeats} runs")
    runs, z_ours = time_ours(cohort, repeats)
    for i, r in enumerate(runs, 1):
        print(f"  run {i}: wall {r['wall_s']:.3f} s, CPU {r['cpu_s']:.3f} s")
    wall_med = statistics.median(r["wall_s"] for r in runs)
    cpu_med = statistics.median(r["cpu_s"] for r in runs)
    print(f"  median: wall {wall_med:.3f} s, CPU {cpu_med:.3f} s "
          f"(CPU {1000 * cpu_med / n_vert:.4f} s per 1000 vertices)")
    rss_before, rss_peak = window_peak_rss(lambda: fit_and_score(cohort))
    traced = traced_peak_ours(cohort)
    data_bytes = sum(cohort[k].nbytes for k in ("Y_controls", "Y_patients"))
    print(f"  peak memory of fit + score: RSS {rss_peak / MIB:.0f} MiB (VmHWM; {rss_before / MIB:.0f} MiB resident "
          f"before: interpreter, imports, simulated cohort of {data_bytes / MIB:.0f} MiB); tracemalloc: "
          f"{traced / MIB:.0f} MiB allocated by Python/numpy on top; getrusage max RSS of the whole process so far "
          f"{max_rss_bytes() / MIB:.0f} MiB")
    ok_wall = wall_med < GOAL_WALL_S
    print(f"  goal: fit + score < {GOAL_WALL_S:.0f} s wall on this CPU: {wall_med:.2f} s -> {verdict(ok_wall)}")
    results["ours"] = {"runs": runs, "median_wall_s": wall_med, "median_cpu_s": cpu_med,
                       "cpu_s_per_1000_vertices": 1000 * cpu_med / n_vert, "tracemalloc_peak_bytes": traced,
                       "rss_before_bytes": rss_before, "peak_rss_bytes": rss_peak,
                       "getrusage_max_rss_bytes": max_rss_bytes(), "goal_wall_s": GOAL_WALL_S, "goal_wall_pass": ok_wall}

    # --- PCNtoolkit anchor --------------------------------------------------------
    if not args.no_pcn:
        results.update(pcn_section(cohort, z_ours, cpu_med, pcn_k, single_thread=args.pcn_threads == "1"))

    # --- capacity --------------------------------------------------------------
    if not args.no_capacity:
        print(f"\n[capacity] peak RSS (VmHWM) of fit + score, N controls + 100 patients, in a fresh process "
              f"per size (N x V): {', '.join(f'{n}x{v}' for n, v in sizes)}")
        cap = measure_capacity(sizes, args.seed)
        for p in cap["points"]:
            print(f"  {p['n_subjects']:>5} subjects x {p['n_vertices']} vertices: peak RSS "
                  f"{p['peak_rss_bytes'] / MIB:,.0f} MiB (data + imports before fit {p['rss_before_fit_bytes'] / MIB:,.0f} MiB;"
                  f" tracemalloc peak of fit + score {p['traced_peak_bytes'] / MIB:,.0f} MiB)")
        fit = cap["fit"]
        print(f"  least-squares fit of the measured peaks: peak = {fit['a_bytes'] / MIB:.0f} MiB + "
              f"{fit['b_bytes_per_subject_vertex']:.2f} B x subjects x vertices + "
              f"{fit['c_bytes_per_vertex'] / 1024:.1f} KiB x vertices")
        print(f"  PROJECTION from that linear fit of measured peaks (not measured at these sizes): under 8 GiB, "
              f"at most {cap['max_subjects_at_20484']:,} subjects on 20,484 vertices, or "
              f"{cap['max_vertices_at_800']:,} vertices for 800 subjects")
        results["capacity"] = cap
    print_summary(results)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 controls, 2 repeats, 50 PCN vertices")
    parser.add_argument("--no-pcn", action="store_true", help="skip the PCNtoolkit anchor")
    parser.add_argument("--no-capacity", action="store_true", help="skip the memory-capacity projection")
    parser.add_argument("--pcn-vertices", type=int, default=None, help="vertices fitted by PCNtoolkit (default 200)")
    parser.add_argument("--pcn-threads", choices=("1", "default"), default="1",
                        help="BLAS threads of the PCNtoolkit process (default 1: its fastest CPU time)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of ours (default 3)")
    parser.add_argument("--capacity-sizes", default=None,
                        help=f"comma-separated cohort sizes N or NxV for the memory projection (default {CAPACITY_SIZES})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON to this path")
    parser.add_argument("--_capacity-child", nargs=3, type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_json(results: dict, path: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(results, handle, indent=2, default=float)
    os.chmod(tmp, 0o644)  # mkstemp creates it private
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.capacity_sizes:
        try:
            parse_sizes(args.capacity_sizes)
        except ValueError as error:
            raise SystemExit(f"normative.py: error: {error}") from None
    if args._capacity_child:
        print(json.dumps(capacity_child(*args._capacity_child)))
        return 0
    results = run(args)
    if args.out:
        write_json(results, args.out)
        print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    warnings.simplefilter("default")
    sys.exit(main())
