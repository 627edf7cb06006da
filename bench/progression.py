"""Speed and memory of one BrLP prediction (issue 6) against BrLP's own sampling loop, same run.

One prediction = encode the baseline + ``m`` LAS chains x ``S`` DDIM steps (ControlNet + UNet) +
decode the mean latent + the voxel uncertainty map (decode the ``m`` samples). The networks are the
**full published BrLP architecture** (AutoencoderKL 13.8 M, UNet 553 M, ControlNet 230 M
parameters) with seeded random weights; their zero-initialised output convolutions are filled with
small seeded values so that the chains carry a real signal (timing does not depend on the values).

Each method runs in its own fresh process (this script again, with ``--worker``), so that its peak
memory (Linux ``VmHWM``) is its own:

* **ours**: ``progression_sampling.sample_latents`` (all chains in one batch, the ControlNet's
  condition embedded once, ``inference_mode``) + ``decode_las(uncertainty=True)``, with the weights
  stored channels-last on the CPU (``use_channels_last``; ``--no-channels-last`` to compare);
* **anchor**: BrLP's ``sample_using_controlnet_and_z`` re-expressed with the same MONAI networks:
  batch of ``m``, condition repeated ``m`` times and embedded at every step, plain float32 under
  ``no_grad``, the decode of the mean only (BrLP computes no uncertainty; "+ uncertainty" figures
  add ``m`` of its measured decodes).

To keep the run short, each method times ``--measure-steps`` DDIM steps (default 2, after one
untimed warm-up step) and the total is **extrapolated** to ``S`` steps (a step's cost does not depend
on ``t``); encode and decodes are timed in full. Both start from the same noise, so the latents after
the measured steps are compared (agreement). CPU figures: ``--threads`` threads (default 2); wall and
CPU seconds (all threads) are reported; the machine may be shared (load averages are recorded), so
compare the two methods within one run. Results go to ``bench/results/progression.json``
(git-ignored); it is not a test and does not fail on a missed goal.

Usage::

    .venv/bin/python bench/progression.py              # CPU, m=4 x S=25 (~10-15 min on 2 idle cores)
    .venv/bin/python bench/progression.py --quick      # smoke run on the tiny configuration (NOT a benchmark)
    .venv/bin/python bench/progression.py --gpu        # CUDA: m=64 x S=50, fp16 autocast (--amp fp32|fp16|bf16)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_OUT = BENCH_DIR / "results" / "progression.json"
RESULT_TAG = "PROGRESSION-BENCH-RESULT "
GOAL_CPU_S, GOAL_CPU_BYTES = 180.0, 8e9      # CPU: m=4 x 25 steps with the uncertainty map
GOAL_GPU_S = 60.0                             # GPU: m=64 x 50 steps
BRLP_ANCHOR_NOTE = "reference notes §12: BrLP's loop ~433 s for m=4 x 50 on this CPU (quiet, torch 2.13)"
BASELINE_AGE, SEED = 70.0, 0
GIB = 1024.0**3


# =============================================================================== worker side
def _vm_bytes(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    return None


class Timer:
    """Wall and CPU seconds of a block (CPU of all threads); synchronises CUDA around it."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self._sync()
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.wall_s, self.cpu_s = time.perf_counter() - self.wall0, time.process_time() - self.cpu0

    def _sync(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()

    def read(self) -> dict:
        return {"wall_s": self.wall_s, "cpu_s": self.cpu_s}


def build(args):
    """The configuration, the three networks (seeded) and a smooth random baseline image."""
    import torch

    from neuroatrophy.progression_config import brlp_config, tiny_config
    from neuroatrophy.progression_nets import (
        build_autoencoder,
        build_controlnet,
        build_unet,
    )

    cfg = tiny_config() if args.quick else brlp_config()
    torch.manual_seed(SEED)
    nets = [build_autoencoder(cfg), build_unet(cfg), build_controlnet(cfg)]
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for net in nets[1:]:
            for p in net.parameters():
                if not p.any():  # zero-initialised output convolutions: the chains would carry nothing
                    p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    device = torch.device(args.device)
    nets = [n.to(device).eval() for n in nets]
    image = torch.rand((1, 1, *(s // 8 for s in cfg.image_shape)), generator=generator)
    image = torch.nn.functional.interpolate(image, size=cfg.image_shape, mode="trilinear")
    return cfg, nets, image.to(device), device


def contexts(k: int):
    import numpy as np

    rows = [[(BASELINE_AGE + 2 * (i + 1)) / 100, 1.0, 0.5, 0.45, 0.5, 0.5, 0.45, 0.3] for i in range(k)]
    return np.asarray(rows, dtype=np.float32)


def amp_dtype(name):
    import torch

    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def worker_ours(args) -> dict:
    import torch

    from neuroatrophy.progression_sampling import (
        decode_las,
        sample_latents,
        use_channels_last,
    )

    cfg, (ae, unet, cnet), image, device = build(args)
    if args.channels_last:
        use_channels_last(ae, unet, cnet)
    common = dict(m=args.m, scheduler_cfg=cfg.scheduler, latent_shape_ae=cfg.latent_shape_ae, seed=SEED,
                  amp_dtype=amp_dtype(args.amp))
    with torch.inference_mode(), Timer(device) as t_encode:
        latent = ae.encode(image)[0][0]
    ctx = contexts(args.ages)
    sample_latents(unet, cnet, latent, BASELINE_AGE, ctx, num_inference_steps=1, **common)  # warm-up
    with Timer(device) as t_steps:
        latents = sample_latents(unet, cnet, latent, BASELINE_AGE, ctx, num_inference_steps=args.measure_steps, **common)
    with Timer(device) as t_decode:
        decoded = decode_las(ae, latents, uncertainty=True)
    return {"method": "ours", "encode": t_encode.read(), "steps": t_steps.read(), "decode": t_decode.read(),
            "decodes": args.ages * (args.m + 1 if args.m > 1 else 1),
            "global_uncertainty": decoded.global_uncertainty.tolist(), "latent_sd": decoded.latent_sd.tolist(),
            "latents_digest": _digest(latents[0]), **_memory(device)}


def worker_anchor(args) -> dict:
    """BrLP's ``sample_using_controlnet_and_z`` with MONAI 1.6 networks and the MONAI Generative timesteps."""
    import contextlib

    import torch

    from neuroatrophy.progression_sampling import (
        crop_latent,
        make_scheduler,
        pad_latent,
    )

    cfg, (ae, unet, cnet), image, device = build(args)
    m, shape_dm = args.m, cfg.latent_shape_dm
    dtype = amp_dtype(args.amp)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    with torch.no_grad(), Timer(device) as t_encode:
        latent = ae.encode(image)[0]
    padded = pad_latent(latent, shape_dm)
    age = torch.full((1, 1, *shape_dm[1:]), BASELINE_AGE / 100, device=device)
    condition = torch.cat([padded, age], dim=1).repeat(m, 1, 1, 1, 1)
    context = torch.as_tensor(contexts(1)[0], device=device)[None, None].repeat(m, 1, 1)
    # the same initial noise as ours (BrLP draws torch.randn(m, ...) from the global generator)
    noise = torch.randn((m, *shape_dm), generator=torch.Generator().manual_seed(SEED)).to(device)

    def loop(steps):
        scheduler = make_scheduler(cfg.scheduler, steps)
        z = noise.clone()
        for t in scheduler.timesteps:
            with torch.no_grad(), autocast():
                timestep = torch.tensor([t]).repeat(m).to(device)
                down, mid = cnet(x=z.float(), timesteps=timestep, context=context, controlnet_cond=condition.float())
                eps = unet(x=z.float(), timesteps=timestep, context=context.float(),
                           down_block_additional_residuals=down, mid_block_additional_residual=mid)
                z, _ = scheduler.step(eps, t, z)
        return z

    loop(1)  # warm-up
    with Timer(device) as t_steps:
        z = loop(args.measure_steps)
    mean = crop_latent(z.sum(dim=0) / m, cfg.latent_shape_ae)
    with torch.no_grad(), Timer(device) as t_decode:
        ae.decode_stage_2_outputs(mean[None])
    final = crop_latent(z.float(), cfg.latent_shape_ae)
    return {"method": "anchor", "encode": t_encode.read(), "steps": t_steps.read(), "decode": t_decode.read(),
            "decodes": 1,
            "latents_digest": _digest(final), **_memory(device)}


def _digest(latents) -> dict:
    """Enough of the latents to compare the two methods without shipping them whole."""
    x = latents.float().cpu().reshape(latents.shape[0], -1)
    return {"abs_max": float(x.abs().max()), "sample": x[:, ::97].numpy().tolist()}


def _memory(device) -> dict:
    out = {"peak_rss_bytes": _vm_bytes("VmHWM"),
           "getrusage_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0}
    if device.type == "cuda":
        import torch

        out["cuda_peak_bytes"] = float(torch.cuda.max_memory_allocated())
        out["device_name"] = torch.cuda.get_device_name()
    import monai
    import torch

    out["versions"] = {"torch": torch.__version__, "monai": monai.__version__}
    out["threads"] = torch.get_num_threads()
    return out


# =============================================================================== parent side
def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_worker(kind: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--threads", str(args.threads),
           "--m", str(args.m), "--steps", str(args.steps), "--measure-steps", str(args.measure_steps),
           "--ages", str(args.ages), "--device", args.device, "--amp", args.amp] + (["--quick"] if args.quick else [])
    cmd += [] if args.channels_last else ["--no-channels-last"]
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(args.threads)
    env.setdefault("PYTHONWARNINGS", "ignore")
    load0, cpu0, wall0 = os.getloadavg(), _children_cpu_s(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"progression.py: error: the {kind} worker failed (exit {proc.returncode}):\n"
                         f"{(proc.stderr or proc.stdout)[-3000:]}")
    report = json.loads(lines[-1][len(RESULT_TAG):])
    report["process"] = {"wall_s": time.perf_counter() - wall0, "cpu_s": _children_cpu_s() - cpu0,
                         "load_average_start": list(load0), "load_average_end": list(os.getloadavg())}
    return report


def projected(report: dict, args, runs: int = 1, extra_decodes: int = 0) -> dict:
    """Encode + S steps (extrapolated from the measured ones) x ``runs`` + the decodes."""
    out = {}
    for key in ("wall_s", "cpu_s"):
        step = report["steps"][key] / args.measure_steps
        decode = report["decode"][key] / report["decodes"]
        out[key] = (report["encode"][key] + runs * args.steps * step
                    + report["decode"][key] * runs + extra_decodes * decode)
        out[f"step_{key}"] = step
        out[f"decode_{key}"] = decode
    return out


def agreement(ours: dict, anchor: dict) -> dict:
    import numpy as np

    a = np.asarray(ours["latents_digest"]["sample"])
    b = np.asarray(anchor["latents_digest"]["sample"])
    return {"max_abs_diff": float(np.abs(a - b).max()), "abs_max": anchor["latents_digest"]["abs_max"]}


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(results, handle, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fmt(t: dict, key="wall_s") -> str:
    return f"{t[key]:.1f} s"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="CUDA run: m=64 x S=50 by default, fp16 autocast")
    parser.add_argument("--quick", action="store_true", help="smoke run on the tiny configuration (NOT a benchmark)")
    parser.add_argument("--m", type=int, help="LAS chains (default 4; 64 with --gpu)")
    parser.add_argument("--steps", type=int, help="DDIM steps S of the projected prediction (default 25; 50 with --gpu)")
    parser.add_argument("--measure-steps", type=int, help="DDIM steps timed per method (default 2; S with --gpu)")
    parser.add_argument("--ages", type=int, default=1, help="target ages k run together by ours (default 1)")
    parser.add_argument("--amp", choices=("fp32", "fp16", "bf16"), help="autocast dtype (default fp32; fp16 with --gpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads (default 2)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="ours without channels-last weights (use_channels_last; on by default on the CPU)")
    parser.add_argument("--skip-anchor", action="store_true", help="ours only")
    parser.add_argument("--out", help=f"results JSON (default {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    parser.add_argument("--worker", choices=("ours", "anchor"), help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.m = args.m or (64 if args.gpu else 2 if args.quick else 4)
    args.steps = args.steps or (50 if args.gpu else 5 if args.quick else 25)
    args.measure_steps = args.measure_steps or (args.steps if args.gpu else 2)
    args.amp = args.amp or ("fp16" if args.gpu else "fp32")
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    args.channels_last = args.channels_last and args.device == "cpu"
    if min(args.m, args.steps, args.measure_steps, args.ages, args.threads) < 1:
        parser.error("--m, --steps, --measure-steps, --ages and --threads must be at least 1")

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        report = (worker_ours if args.worker == "ours" else worker_anchor)(args)
        print(RESULT_TAG + json.dumps(report), flush=True)
        return None
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("progression.py: error: --gpu needs CUDA (torch.cuda.is_available() is False)")

    where = f"CUDA, autocast {args.amp}" if args.gpu else f"CPU, {args.threads} threads, {args.amp}"
    print("BrLP prediction speed (issue 6)" + ("  ***  --quick: SMOKE RUN, NOT A BENCHMARK  ***" if args.quick else ""))
    print(f"  {platform.machine()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}; {where}; "
          f"load average at start {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"  {'tiny' if args.quick else 'full BrLP'} architecture, random weights; m={args.m} chains x S={args.steps} "
          f"DDIM steps, {args.ages} target age(s); {args.measure_steps} step(s) timed per method after a warm-up "
          f"step, the rest EXTRAPOLATED; encode and decodes timed in full\n", flush=True)

    ours = run_worker("ours", args)
    p_ours = projected(ours, args)
    print(f"Ours (sample_latents + decode_las with uncertainty{', channels-last weights' if args.channels_last else ''}): encode {_fmt(ours['encode'])}, "
          f"{p_ours['step_wall_s']:.2f} s/step wall ({p_ours['step_cpu_s']:.2f} CPU), {ours['decodes']} decodes "
          f"{_fmt(ours['decode'])} ({p_ours['decode_wall_s']:.1f} s each); peak RSS {ours['peak_rss_bytes'] / GIB:.2f} GiB"
          + (f", CUDA peak {ours['cuda_peak_bytes'] / GIB:.1f} GiB" if "cuda_peak_bytes" in ours else ""))
    print(f"  projected prediction: {p_ours['wall_s']:.1f} s wall, {p_ours['cpu_s']:.1f} s CPU", flush=True)

    anchor = p_anchor = None
    if not args.skip_anchor:
        anchor = run_worker("anchor", args)
        p_anchor = projected(anchor, args, runs=args.ages)
        p_anchor_u = projected(anchor, args, runs=args.ages, extra_decodes=args.ages * args.m)
        print(f"\nAnchor (BrLP's loop, batch m, no_grad fp32, decode of the mean): encode {_fmt(anchor['encode'])}, "
              f"{p_anchor['step_wall_s']:.2f} s/step wall ({p_anchor['step_cpu_s']:.2f} CPU), decode "
              f"{_fmt(anchor['decode'])}; peak RSS {anchor['peak_rss_bytes'] / GIB:.2f} GiB")
        print(f"  projected: {p_anchor['wall_s']:.1f} s wall, {p_anchor['cpu_s']:.1f} s CPU; with {args.m} more "
              f"decodes for an uncertainty map: {p_anchor_u['wall_s']:.1f} s wall")
        agree = agreement(ours, anchor)
        print(f"  agreement of the latents after {args.measure_steps} steps: max |ours - anchor| "
              f"{agree['max_abs_diff']:.2e} (|latent| up to {agree['abs_max']:.2f})")
        print(f"\nRatios (same run): steps {p_anchor['step_wall_s'] / p_ours['step_wall_s'] * args.ages:.2f}x wall, "
              f"{p_anchor['step_cpu_s'] / p_ours['step_cpu_s'] * args.ages:.2f}x CPU per target age; prediction with "
              f"uncertainty: anchor + m decodes / ours = {p_anchor_u['wall_s'] / p_ours['wall_s']:.2f}x wall")
        print(f"  ({BRLP_ANCHOR_NOTE})")

    if args.gpu:
        ok = p_ours["wall_s"] < GOAL_GPU_S
        print(f"\nGoal: GPU m=64 x 50 < {GOAL_GPU_S:.0f} s: {p_ours['wall_s']:.1f} s -> {'PASS' if ok else 'MISS'}")
    elif not args.quick and (args.m, args.steps) == (4, 25):
        ok_t, ok_m = p_ours["wall_s"] < GOAL_CPU_S, ours["peak_rss_bytes"] < GOAL_CPU_BYTES
        print(f"\nGoals: CPU m=4 x 25 with uncertainty < {GOAL_CPU_S:.0f} s: {p_ours['wall_s']:.1f} s wall "
              f"({p_ours['cpu_s'] / args.threads:.1f} s CPU / {args.threads} threads) -> {'PASS' if ok_t else 'MISS'}; "
              f"< {GOAL_CPU_BYTES / 1e9:.0f} GB: {ours['peak_rss_bytes'] / 1e9:.2f} GB -> {'PASS' if ok_m else 'MISS'}")
    result = {"benchmark": "BrLP prediction (issue 6)", "quick": args.quick, "settings": vars(args),
              "ours": ours, "ours_projected": p_ours, "anchor": anchor, "anchor_projected": p_anchor,
              "load_average_end": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out) if args.out else DEFAULT_OUT.with_name(
        "progression-quick.json" if args.quick else "progression-gpu.json" if args.gpu else DEFAULT_OUT.name)
    write_json(result, out)
    print(f"  results written to {out}")
    return result


if __name__ == "__main__":
    main()
