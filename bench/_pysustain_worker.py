"""Run pySuStaIn's ZscoreSustain on one problem; used by ``bench/subtypes.py``.

Runs under pySuStaIn's own Python environment (numpy, scipy, pathos, dill, ...), not the
NeuroAtrophy one, and imports nothing from NeuroAtrophy. pySuStaIn is imported from a
checkout of its repository (github.com/ucl-pond/pySuStaIn) put first on ``sys.path``.

Usage::

    python _pysustain_worker.py PYSUSTAIN_CHECKOUT INPUT.npz OUTPUT.npz

``INPUT.npz`` (``allow_pickle=False``) holds ``data`` (M, B), ``Z_vals`` (B, n_z; 0 = no event),
``Z_max`` (B,), ``N_startpoints``, ``N_S_max``, ``N_iterations_MCMC``, ``seed`` and
``use_parallel_startpoints``. ``OUTPUT.npz`` gets, for the model with ``N_S_max`` subtypes:

* ``ml_subtype`` (M,) 1-based (pySuStaIn's 0-based index + 1), ``prob_ml_subtype``, ``ml_stage``
  (0..N), ``prob_ml_stage`` (pySuStaIn's joint probability), ``prob_subtype`` (M, K);
  subtypes are in pySuStaIn's staging order (mean MCMC fraction descending), so that
  ``ml_subtype == j + 1`` is row ``j`` of the sequences;
* ``sequences_em`` (K, N): the E-M maximum-likelihood sequences (``ml_sequence_EM`` of the last
  pickle), ``sequences_mcmc_ml`` (K, N): the MCMC sample of highest likelihood, ``f_em``,
  ``f_mean`` (K,), in the same order;
* ``elapsed_s``: wall seconds of ``run_sustain_algorithm`` (E-M, MCMC and staging for every
  number of subtypes 1..N_S_max, pickles written to a temporary folder); ``cpu_s`` (this
  process and its reaped pool workers), ``construct_s``, ``import_s``;
* ``maxrss_self_bytes``, ``maxrss_children_bytes`` (largest pool worker), ``pickle_keys``,
  ``versions`` (JSON text).
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import sys
import tempfile
import time


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _close_pool(sustain) -> None:
    """Stop pathos' worker processes so that their usage is reaped into RUSAGE_CHILDREN."""
    pool = getattr(sustain, "pool", None)
    for method in ("close", "join", "clear"):
        try:
            getattr(pool, method)()
        except Exception:  # serial pools lack some of these; nothing to reap there
            pass


def main(checkout: str, in_path: str, out_path: str) -> int:
    t0 = time.perf_counter()
    sys.path.insert(0, os.path.abspath(checkout))
    import numpy as np
    from pySuStaIn.ZscoreSustain import ZscoreSustain
    import pathos, dill, scipy  # noqa: E401  (versions only)

    import_s = time.perf_counter() - t0
    with np.load(in_path, allow_pickle=False) as npz:
        spec = {key: npz[key] for key in npz.files}
    data = np.asarray(spec["data"], dtype=float)
    z_vals = np.asarray(spec["Z_vals"], dtype=float)
    z_max = np.asarray(spec["Z_max"], dtype=float)
    n_s_max = int(spec["N_S_max"])
    labels = [f"Biomarker {b + 1}" for b in range(data.shape[1])]

    with tempfile.TemporaryDirectory(prefix="na-bench-pysustain-") as output_folder:
        t0 = time.perf_counter()
        sustain = ZscoreSustain(data, z_vals, z_max, labels, int(spec["N_startpoints"]), n_s_max,
                                int(spec["N_iterations_MCMC"]), output_folder, "bench",
                                bool(spec["use_parallel_startpoints"]), seed=int(spec["seed"]))
        construct_s = time.perf_counter() - t0
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        (samples_sequence, samples_f, ml_subtype, prob_ml_subtype, ml_stage, prob_ml_stage,
         prob_subtype_stage) = sustain.run_sustain_algorithm(plot=False)
        elapsed_s = time.perf_counter() - t0
        _close_pool(sustain)
        cpu_s = _cpu_seconds() - cpu0
        pickle_path = os.path.join(output_folder, "pickle_files", f"bench_subtype{n_s_max - 1}.pickle")
        with open(pickle_path, "rb") as handle:
            saved = pickle.load(handle)

    # pySuStaIn stages with the subtypes sorted by mean MCMC fraction, descending: same order here.
    order = np.argsort(np.mean(samples_f, axis=1))[::-1]
    best = int(np.argmax(saved["samples_likelihood"]))
    prob_subtype = np.asarray(saved["prob_subtype"], dtype=float)
    out = {
        "ml_subtype": np.asarray(ml_subtype, dtype=float).ravel().astype(int) + 1,
        "prob_ml_subtype": np.asarray(prob_ml_subtype, dtype=float).ravel(),
        "ml_stage": np.asarray(ml_stage, dtype=float).ravel().astype(int),
        "prob_ml_stage": np.asarray(prob_ml_stage, dtype=float).ravel(),
        "prob_subtype": prob_subtype.reshape(len(data), -1),
        "sequences_em": np.asarray(saved["ml_sequence_EM"], dtype=float)[order].astype(int),
        "sequences_mcmc_ml": np.asarray(samples_sequence[:, :, best], dtype=float)[order].astype(int),
        "f_em": np.asarray(saved["ml_f_EM"], dtype=float).ravel()[order],
        "f_mean": np.mean(samples_f, axis=1)[order],
        "elapsed_s": elapsed_s,
        "cpu_s": cpu_s,
        "construct_s": construct_s,
        "import_s": import_s,
        "maxrss_self_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0,
        "maxrss_children_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024.0,
        "pickle_keys": np.array(sorted(saved)),
        "versions": json.dumps({"python": sys.version.split()[0], "numpy": np.__version__,
                                "scipy": scipy.__version__, "pathos": pathos.__version__, "dill": dill.__version__,
                                "n_cpus": os.cpu_count()}),
    }
    directory = os.path.dirname(os.path.abspath(out_path))
    fd, tmp = tempfile.mkstemp(prefix=".pysustain-", suffix=".npz", dir=directory)
    with os.fdopen(fd, "wb") as handle:
        np.savez(handle, **out)
    os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
