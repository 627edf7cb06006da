"""Speed and memory benchmark of thalamus segmentation against a MindGlide-size full-brain network.

Issue 5's goal: segment one 1 mm T1w (181 x 217 x 181) end to end, preprocessing included, in at
most 15 s on a 2-core CPU, at least 5 times faster than a MindGlide-size ``DynUNet`` (the
published configuration, 30.8 M parameters, random weights) run over the full head with the same
sliding-window settings in the same run, with a peak memory under 4 GB.

The scan is Colin27's full-head T1 (Debian ``mricron-data``: ``ch2.nii.gz``, 181 x 217 x 181,
1 mm), the issue's size. Each method runs in its own fresh Python process (this script again,
with ``--worker``), so that imports, model loading and peak memory belong to that method alone:

* **ours**: ``ThalamusSegmenter(model, sw_batch_size=1, overlap=0.5).segment(ch2)``: loading,
  SimpleITK registration to MNI, resampling onto the network's box, the network (the window is
  the box: one window), probabilities back on the scan's grid, labels and connected components.
  ``--repeats`` processes (default 3), medians.
* **baseline**: ``neuroatrophy.mindglide.run_mindglide(ch2, mindglide_network())``: MindGlide's
  own preprocessing (RAS, crop to the non-zero box, 1 mm, z-score), the sliding window with the
  published window (128, 128, 64), overlap 0.5, gaussian blending, ``sw_batch_size=1`` (as ours),
  labels back on the input grid, largest component. ``--baseline-repeats`` processes (default 1;
  it takes minutes).

Each process reports its wall and CPU seconds (all threads) for imports, model loading and the
segmentation call, the number of windows the network actually ran (counted by a forward hook), and
its peak resident memory (Linux ``VmHWM``: per process image, unlike ``getrusage``'s maximum,
which Linux carries over fork and exec). Torch, OpenMP, BLAS and ITK run ``--threads`` threads
(default 2). The machine may be shared: load averages and the CPU that other processes used during
each run are recorded. Results and PASS/MISS verdicts are printed and written as JSON
(``bench/results/thalamus.json``, git-ignored); it is not a test and does not fail on a missed goal.

Usage::

    .venv/bin/python bench/thalamus.py                        # full run (~3-5 min: the baseline ~2-4 min)
    .venv/bin/python bench/thalamus.py --model /path/to/thalamus_unet.safetensors
    .venv/bin/python bench/thalamus.py --quick                # smoke run of the script (NOT a benchmark)
    .venv/bin/python bench/thalamus.py --skip-baseline        # ours only
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
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

SCAN = Path("/usr/share/mricron/templates/ch2.nii.gz")
SHIPPED_MODEL = REPO_ROOT / "neuroatrophy" / "data" / "models" / "thalamus_unet.safetensors"
DEFAULT_OUT = BENCH_DIR / "results" / "thalamus.json"
QUICK_OUT = BENCH_DIR / "results" / "thalamus-quick.json"

GOAL_WALL_S = 15.0          # ours, end to end, on a 2-core CPU
GOAL_SPEEDUP = 5.0          # baseline / ours
GOAL_PEAK_BYTES = 4e9       # "under 4 GB" (decimal: the stricter reading)
SW_BATCH_SIZE, OVERLAP, MODE = 1, 0.5, "gaussian"
QUICK_CROP = (128, 128, 64)  # --quick: the baseline on a centre crop of one MindGlide window
RESULT_TAG = "THALAMUS-BENCH-RESULT "
MIB = 1024.0**2


# =============================================================================== worker side
def _vm_bytes(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in bytes, or None without /proc."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    return None


class Clock:
    """Wall and process CPU seconds since construction (CPU of all threads)."""

    def __init__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def read(self) -> dict:
        return {"wall_s": time.perf_counter() - self.wall0, "cpu_s": time.process_time() - self.cpu0}


class WindowCounter:
    """Forward hooks on a network: windows it ran (batch items) and wall seconds inside it."""

    def __init__(self, network):
        self.windows, self.calls, self.seconds, self.window_shape = 0, 0, 0.0, None
        self._started = 0.0
        network.register_forward_pre_hook(self._pre)
        network.register_forward_hook(self._post)

    def _pre(self, module, inputs):
        batch = inputs[0]
        self.windows += int(batch.shape[0])
        self.calls += 1
        self.window_shape = [int(s) for s in batch.shape[2:]]
        self._started = time.perf_counter()

    def _post(self, module, inputs, output):
        self.seconds += time.perf_counter() - self._started


class PhaseRecorder:
    """``progress(fraction, message)`` callback: when each phase (first word of the message) began."""

    def __init__(self):
        self.clock, self.starts = time.perf_counter(), {}

    def __call__(self, fraction, message):
        key = str(message).removeprefix("MindGlide: ").split(" ")[0]
        self.starts.setdefault(key, time.perf_counter() - self.clock)

    def span(self, first: str, then: str | None, end_s: float) -> float | None:
        if first not in self.starts:
            return None
        stop = self.starts.get(then, end_s) if then else end_s
        return stop - self.starts[first]


def _limit_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    except ImportError:
        pass


def _memory_report() -> dict:
    return {"peak_rss_bytes": _vm_bytes("VmHWM"), "rss_end_bytes": _vm_bytes("VmRSS"),
            "getrusage_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0}


def worker_ours(args) -> dict:
    """Import, load the model and segment the scan once; timings, windows, memory, volumes."""
    start_cpu = time.process_time()  # interpreter start-up until here
    clock = Clock()
    # What segment() would import lazily on its first call, imported here so that the call's
    # time is the segmentation's own (the whole process's time counts them anyway).
    import monai.inferers
    import monai.networks.nets
    import nilearn.datasets  # noqa: F401
    import SimpleITK
    import torch

    from neuroatrophy.thalamus_seg import ThalamusSegmenter

    imports = clock.read()
    clock = Clock()
    seg = ThalamusSegmenter(models=args.model, tta=args.tta, device="cpu", sw_batch_size=SW_BATCH_SIZE,
                            overlap=OVERLAP, threads=args.threads)
    _limit_threads(args.threads)
    model = seg.models[0]
    counter = WindowCounter(model.network)
    load = clock.read()
    rss_before = _vm_bytes("VmRSS")
    phases = PhaseRecorder()
    clock = Clock()
    result = seg.segment(str(args.scan), progress=phases)
    run = clock.read()
    box = [int(s) for s in model.box["shape"]]
    return {
        "method": "ours", "imports": imports, "load": load, "run": run,
        "startup_cpu_s": start_cpu, "total_cpu_s": time.process_time(),
        "phases_s": {"registration": phases.span("registering", "segmenting", run["wall_s"]),
                     "box + network + back to scan": phases.span("segmenting", "labelling", run["wall_s"]),
                     "labels + components": phases.span("labelling", None, run["wall_s"])},
        "network_s": counter.seconds, "windows": counter.windows, "network_calls": counter.calls,
        "window_shape": counter.window_shape, "network_input_shape": box,
        "parameters": sum(p.numel() for p in model.network.parameters()),
        "model": str(model.path), "architecture": model.architecture, "tta": seg.tta,
        "volumes_mm3": {k: float(v) for k, v in result.volumes.items()},
        "rss_before_run_bytes": rss_before, **_memory_report(),
        "threads": torch.get_num_threads(), "versions": {"torch": torch.__version__, "monai": monai.__version__,
                                                         "SimpleITK": SimpleITK.Version.VersionString()},
    }


def _quick_input(path):
    """The scan's centre crop of one MindGlide window (``--quick``), as a nibabel image."""
    import nibabel as nib

    img = nib.load(str(path))
    lo = [(n - c) // 2 for n, c in zip(img.shape[:3], QUICK_CROP)]
    return img.slicer[tuple(slice(a, a + c) for a, c in zip(lo, QUICK_CROP))]


def worker_baseline(args) -> dict:
    """Import, build the MindGlide network (random weights) and run MindGlide's inference once."""
    start_cpu = time.process_time()
    clock = Clock()
    import torch

    from neuroatrophy.mindglide import (
        mindglide_network,
        mindglide_preprocess,
        mindglide_window_settings,
        run_mindglide,
    )

    imports = clock.read()
    clock = Clock()
    torch.manual_seed(0)
    net = mindglide_network().eval()
    _limit_threads(args.threads)
    counter = WindowCounter(net)
    load = clock.read()
    image = _quick_input(args.scan) if args.quick else str(args.scan)
    rss_before = _vm_bytes("VmRSS")
    phases = PhaseRecorder()
    clock = Clock()
    prepared = mindglide_preprocess(image)
    preprocess_s = time.perf_counter() - clock.wall0
    phases.clock = time.perf_counter()
    run_mindglide(prepared, net, sw_batch_size=SW_BATCH_SIZE, overlap=OVERLAP, progress=phases)
    run = clock.read()
    after_pre = run["wall_s"] - preprocess_s
    import monai

    settings = mindglide_window_settings()
    return {
        "method": "baseline", "imports": imports, "load": load, "run": run,
        "startup_cpu_s": start_cpu, "total_cpu_s": time.process_time(),
        "phases_s": {"preprocessing": preprocess_s,
                     "sliding window": phases.span("preprocessing", "mapping", after_pre),
                     "labels back to scan + component": phases.span("mapping", None, after_pre)},
        "network_s": counter.seconds, "windows": counter.windows, "network_calls": counter.calls,
        "window_shape": counter.window_shape, "network_input_shape": [int(s) for s in prepared.data.shape],
        "scan_shape": [int(s) for s in prepared.image.shape[:3]],
        "parameters": sum(p.numel() for p in net.parameters()),
        "window_settings": {**settings, "overlap": OVERLAP, "sw_batch_size": SW_BATCH_SIZE},
        "rss_before_run_bytes": rss_before, **_memory_report(),
        "threads": torch.get_num_threads(), "versions": {"torch": torch.__version__, "monai": monai.__version__},
    }


# =============================================================================== parent side
def _cpu_busy_s() -> float | None:
    """Machine-wide busy CPU seconds (all cores, not idle or iowait) from ``/proc/stat``."""
    try:
        with open("/proc/stat") as stat:
            fields = [float(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
    return busy / ticks


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def child_env(threads: int) -> dict:
    """Environment of a worker: every thread pool limited to ``threads``."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                 "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[name] = str(threads)
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def run_worker(kind: str, args) -> dict:
    """Run one worker process; its report plus what the parent measured around it."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--threads", str(args.threads),
           "--scan", str(args.scan)]
    if kind == "ours":
        cmd += ["--model", str(args.model)] + (["--tta"] if args.tta else [])
    if args.quick:
        cmd.append("--quick")
    load0, busy0, child0 = os.getloadavg(), _cpu_busy_s(), _children_cpu_s()
    wall0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env=child_env(args.threads), cwd=REPO_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - wall0
    process_cpu = _children_cpu_s() - child0
    busy1 = _cpu_busy_s()
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise SystemExit(f"thalamus.py: error: the {kind} worker failed (exit {proc.returncode}):\n{tail}")
    report = json.loads(lines[-1][len(RESULT_TAG):])
    report["process"] = {"wall_s": wall, "cpu_s": process_cpu}
    others = None
    if busy0 is not None and busy1 is not None and wall > 0:
        others = max(busy1 - busy0 - process_cpu, 0.0) / wall
    report["machine_during_run"] = {"load_average_start": list(load0), "load_average_end": list(os.getloadavg()),
                                    "other_processes_cores": others}
    return report


def _median(runs: list, *keys):
    values = []
    for run in runs:
        value = run
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            values.append(value)
    return statistics.median(values) if values else None


def summarise(runs: list) -> dict:
    """Medians over a method's processes of the figures the verdicts use."""
    return {
        "process_wall_s": _median(runs, "process", "wall_s"), "process_cpu_s": _median(runs, "process", "cpu_s"),
        "run_wall_s": _median(runs, "run", "wall_s"), "run_cpu_s": _median(runs, "run", "cpu_s"),
        "imports_wall_s": _median(runs, "imports", "wall_s"), "load_wall_s": _median(runs, "load", "wall_s"),
        "network_s": _median(runs, "network_s"), "peak_rss_bytes": max(r["peak_rss_bytes"] or 0 for r in runs),
        "windows": runs[0]["windows"], "window_shape": runs[0]["window_shape"],
    }


def machine_facts() -> dict:
    cpu = "unknown"
    memory = None
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as handle:
            memory = next((float(line.split()[1]) * 1024.0 for line in handle if line.startswith("MemTotal:")), None)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs ({usable} usable), "
                       f"{platform.system()} {platform.release()}",
            "cpu": cpu, "memory_bytes": memory, "python": platform.python_version(),
            "load_average_start": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M")}


def verdict(ok) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / MIB:,.0f} MiB"


def _seconds(value) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def _phases(phases: dict) -> str:
    return ", ".join(f"{name} {_seconds(value)}" for name, value in phases.items())


def print_run(index: int, run: dict) -> None:
    others = run["machine_during_run"]["other_processes_cores"]
    print(f"  process {index}: {run['process']['wall_s']:.1f} s wall, {run['process']['cpu_s']:.1f} s CPU "
          f"(imports {run['imports']['wall_s']:.1f} s, model {run['load']['wall_s']:.2f} s, "
          f"segmentation call {run['run']['wall_s']:.1f} s wall / {run['run']['cpu_s']:.1f} s CPU: "
          f"{_phases(run['phases_s'])}; network alone {run['network_s']:.1f} s); peak RSS "
          f"{_mib(run['peak_rss_bytes'])}; other processes used "
          f"{'n/a' if others is None else f'{others:.2f}'} cores meanwhile", flush=True)


def goals(ours: dict, baseline: dict | None) -> dict:
    """Verdicts: time on ours' whole process, speed-up on whole processes (the stricter readings)."""
    out = {"time": {"figure_s": ours["process_wall_s"], "goal_s": GOAL_WALL_S,
                    "pass": ours["process_wall_s"] <= GOAL_WALL_S,
                    "segment_call_wall_s": ours["run_wall_s"], "process_cpu_s": ours["process_cpu_s"],
                    "process_cpu_pass": ours["process_cpu_s"] <= GOAL_WALL_S},
           "memory": {"figure_bytes": ours["peak_rss_bytes"], "goal_bytes": GOAL_PEAK_BYTES,
                      "pass": ours["peak_rss_bytes"] < GOAL_PEAK_BYTES}}
    if baseline is not None:
        ratio = baseline["process_wall_s"] / ours["process_wall_s"]
        out["speedup"] = {"figure": ratio, "goal": GOAL_SPEEDUP, "pass": ratio >= GOAL_SPEEDUP,
                          "call_wall": baseline["run_wall_s"] / ours["run_wall_s"],
                          "process_cpu": baseline["process_cpu_s"] / ours["process_cpu_s"],
                          "call_cpu": baseline["run_cpu_s"] / ours["run_cpu_s"]}
    return out


def print_goals(result: dict, quick: bool) -> None:
    g = result["goals"]
    note = "  (--quick: NOT a benchmark, verdicts for the smoke test only)" if quick else ""
    print(f"\nGoals (issue 5){note}")
    t = g["time"]
    print(f"  end to end (process start to labels, loading included) <= {GOAL_WALL_S:.0f} s wall on "
          f"{result['threads']} threads: {t['figure_s']:.1f} s -> {verdict(t['pass'])}   [segmentation call alone "
          f"{t['segment_call_wall_s']:.1f} s wall; process CPU {t['process_cpu_s']:.1f} s, "
          f"<= {GOAL_WALL_S:.0f} s: {verdict(t['process_cpu_pass'])}]")
    if "speedup" in g:
        s = g["speedup"]
        print(f"  >= {GOAL_SPEEDUP:.0f}x faster than the full-brain baseline (whole processes, wall): "
              f"{s['figure']:.1f}x -> {verdict(s['pass'])}   [calls alone {s['call_wall']:.1f}x wall, "
              f"{s['call_cpu']:.1f}x CPU; whole processes {s['process_cpu']:.1f}x CPU]")
    else:
        print(f"  >= {GOAL_SPEEDUP:.0f}x faster than the full-brain baseline: n/a (--skip-baseline)")
    m = g["memory"]
    baseline_peak = result["baseline"]["summary"]["peak_rss_bytes"] if result.get("baseline") else None
    print(f"  peak memory < {GOAL_PEAK_BYTES / 1e9:.0f} GB: {_mib(m['figure_bytes'])} "
          f"({m['figure_bytes'] / 1e9:.2f} GB) -> {verdict(m['pass'])}   [baseline {_mib(baseline_peak)}]")


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(results, handle, indent=1)
        os.chmod(tmp, 0o644)  # mkstemp creates it private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_model(model) -> Path:
    path = Path(model) if model else SHIPPED_MODEL
    base = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    if not base.with_suffix(".safetensors").is_file():
        hint = "" if model else " (no shipped weights yet: give --model PATH)"
        raise SystemExit(f"thalamus.py: error: model not found: {base.with_suffix('.safetensors')}{hint}")
    return base.with_suffix(".safetensors")


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="thalamus model (.safetensors + .json; default: the shipped weights)")
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP/BLAS/ITK threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="fresh processes of ours (default 3; 1 with --quick)")
    parser.add_argument("--baseline-repeats", type=int, default=1, help="fresh processes of the baseline (default 1)")
    parser.add_argument("--skip-baseline", action="store_true", help="ours only")
    parser.add_argument("--tta", action="store_true", help="ours with left/right mirror TTA (2 windows)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: baseline on a {'x'.join(map(str, QUICK_CROP))} centre crop (1 window); "
                             "NOT a benchmark")
    parser.add_argument("--scan", default=str(SCAN), help=f"input T1w (default {SCAN})")
    parser.add_argument("--out", help=f"results JSON (default {DEFAULT_OUT.relative_to(REPO_ROOT)}, "
                                      f"or {QUICK_OUT.name} with --quick)")
    parser.add_argument("--worker", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1 or (args.repeats is not None and args.repeats < 1) or args.baseline_repeats < 1:
        parser.error("--threads, --repeats and --baseline-repeats must be at least 1")
    if not Path(args.scan).is_file():
        parser.error(f"--scan: file not found: {args.scan} (Colin27 is in Debian's mricron-data)")

    if args.worker:
        report = (worker_ours if args.worker == "ours" else worker_baseline)(args)
        print(RESULT_TAG + json.dumps(report), flush=True)
        return None

    args.model = resolve_model(args.model)
    repeats = args.repeats or (1 if args.quick else 3)
    facts = machine_facts()
    print("Thalamus segmentation speed (issue 5)" +
          ("  ***  --quick: SMOKE RUN, NOT A BENCHMARK  ***" if args.quick else ""))
    print(f"  machine: {facts['machine']}; {facts['cpu']}; {_mib(facts['memory_bytes'])}; Python {facts['python']}")
    print(f"  load average at start: {', '.join(f'{v:.2f}' for v in facts['load_average_start'])} (1, 5, 15 min); "
          "the machine may be shared with other jobs: wall times then grow, CPU times less so")
    print(f"  scan: {args.scan}; {args.threads} threads (torch, OpenMP, BLAS, ITK); sliding window "
          f"sw_batch_size={SW_BATCH_SIZE}, overlap={OVERLAP}, mode={MODE} for both\n")

    print(f"Ours: ThalamusSegmenter, model {args.model}; {repeats} fresh process(es)", flush=True)
    ours_runs = []
    for i in range(repeats):
        ours_runs.append(run_worker("ours", args))
        print_run(i + 1, ours_runs[-1])
    first = ours_runs[0]
    ours = summarise(ours_runs)
    print(f"  network {first['parameters'] / 1e6:.1f} M parameters, box {'x'.join(map(str, first['network_input_shape']))},"
          f" {ours['windows']} window(s) of {'x'.join(map(str, ours['window_shape']))}; volumes (mm3) "
          + ", ".join(f"{k} {v:,.0f}" for k, v in first["volumes_mm3"].items()))
    print(f"  median: end to end {ours['process_wall_s']:.1f} s wall / {ours['process_cpu_s']:.1f} s CPU; "
          f"segmentation call alone {ours['run_wall_s']:.1f} s wall / {ours['run_cpu_s']:.1f} s CPU; "
          f"peak RSS {_mib(ours['peak_rss_bytes'])}")

    baseline_runs, baseline = [], None
    if not args.skip_baseline:
        where = (f"a {'x'.join(map(str, QUICK_CROP))} centre crop of the scan (--quick)" if args.quick
                 else "the full head")
        print(f"\nBaseline: MindGlide-size DynUNet (published configuration, random weights) over {where}, "
              f"MindGlide's preprocessing and window (128x128x64); {args.baseline_repeats} fresh process(es)",
              flush=True)
        for i in range(args.baseline_repeats):
            baseline_runs.append(run_worker("baseline", args))
            print_run(i + 1, baseline_runs[-1])
        baseline = summarise(baseline_runs)
        b = baseline_runs[0]
        print(f"  network {b['parameters'] / 1e6:.1f} M parameters, input {'x'.join(map(str, b['scan_shape']))} -> "
              f"{'x'.join(map(str, b['network_input_shape']))} at 1 mm, {baseline['windows']} window(s) of "
              f"{'x'.join(map(str, baseline['window_shape']))}")
        print(f"  median: end to end {baseline['process_wall_s']:.1f} s wall / {baseline['process_cpu_s']:.1f} s CPU; "
              f"run_mindglide call alone {baseline['run_wall_s']:.1f} s wall / {baseline['run_cpu_s']:.1f} s CPU; "
              f"peak RSS {_mib(baseline['peak_rss_bytes'])}")

    facts["load_average_end"] = list(os.getloadavg())
    result = {"benchmark": "thalamus segmentation speed (issue 5)", "quick": args.quick,
              "not_a_benchmark": bool(args.quick), "scan": str(args.scan), "threads": args.threads,
              "sliding_window": {"sw_batch_size": SW_BATCH_SIZE, "overlap": OVERLAP, "mode": MODE},
              "machine": facts, "versions": first["versions"],
              "ours": {"model": str(args.model), "repeats": repeats, "summary": ours, "runs": ours_runs},
              "baseline": ({"repeats": args.baseline_repeats, "summary": baseline, "runs": baseline_runs,
                            "input": f"centre crop {list(QUICK_CROP)}" if args.quick else "full head"}
                           if baseline else None)}
    result["goals"] = goals(ours, baseline)
    print_goals(result, args.quick)
    print(f"\n  load average at end: {', '.join(f'{v:.2f}' for v in facts['load_average_end'])}")
    out = Path(args.out) if args.out else (QUICK_OUT if args.quick else DEFAULT_OUT)
    write_json(result, out)
    print(f"  results written to {out}")
    return result


if __name__ == "__main__":
    main()
