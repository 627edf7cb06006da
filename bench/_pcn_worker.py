"""Fit and score PCNtoolkit 1.3.0 BLR models; runs inside ``bench/.pcn-venv``.

Called by ``bench/normative.py`` as a subprocess::

    .pcn-venv/bin/python _pcn_worker.py INPUT.npz OUTPUT.npz

INPUT.npz (read with ``allow_pickle=False``) holds ``age_train, sex_train,
site_train, Y_train`` (training controls; ``Y`` of shape (n, k)), the same four
arrays with the suffix ``_test`` (the subjects to score), the scalars ``n_knots``
and ``degree`` of the age B-spline, and ``configs``, the BLR configurations to
run, among:

``default``
    PCNtoolkit's defaults: hyperparameters by L-BFGS-B with finite-difference
    gradients (step ``l_bfgs_b_epsilon=0.1``) and an L2 penalty (0.1) on them.
``cg``
    ``optimizer="cg"``: conjugate gradients on PCNtoolkit's analytic gradient of
    the log evidence (no penalty), i.e. empirical Bayes run to convergence.

Both are the same model as ours: homoskedastic Gaussian BLR, age as a cubic
B-spline with ``n_knots`` uniform knots over the training range widened by 5 %
on each side, sex and site as fixed batch effects on the intercept.

OUTPUT.npz holds, for each configuration ``c``: ``z_c`` (n_test, k), in the
column order of the input; the hyperparameters ``log_beta_c``, ``log_alpha_c``
(k,); CPU (``time.process_time``) and wall seconds of ``fit`` and ``predict``
(``fit_cpu_c`` ...). Plus ``import_cpu``, ``import_wall``, ``max_rss_mb`` (peak RSS, VmHWM) and
``pcntoolkit_version``. Saving, plotting and evaluation are switched off and the
save directory is a temporary folder, so nothing is written into the repository.
"""

import os
import resource
import sys
import tempfile
import time

CONFIGS = {
    "default": {},
    "cg": {"optimizer": "cg"},
}


def _peak_rss_mb():
    """Peak RSS of this process in MiB: VmHWM, which (unlike getrusage's maxrss) is not
    inherited from the parent process that started us."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load_input(path):
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _norm_data(name, age, sex, site, Y):
    """NormData with covariate ``age``, batch effects ``sex`` and ``site``, responses v0..v{k-1}."""
    import numpy as np
    from pcntoolkit import NormData

    response_vars = [f"v{i}" for i in range(Y.shape[1])]
    data = NormData.from_ndarrays(
        name,
        X=np.asarray(age, dtype=float)[:, None],
        Y=np.asarray(Y, dtype=float),
        batch_effects=np.column_stack([sex.astype(str), site.astype(str)]),
        attrs={"covariates": ["age"], "batch_effect_dims": ["sex", "site"], "response_vars": response_vars},
    )
    return data, response_vars


def _fit_and_score(config, data):
    import numpy as np
    from pcntoolkit import BLR, BsplineBasisFunction, NormativeModel

    if config not in CONFIGS:
        raise SystemExit(f"unknown PCNtoolkit configuration {config!r}; expected one of {sorted(CONFIGS)}")
    train, names = _norm_data("train", data["age_train"], data["sex_train"], data["site_train"], data["Y_train"])
    test, _ = _norm_data("test", data["age_test"], data["sex_test"], data["site_test"], data["Y_test"])
    blr = BLR(
        basis_function_mean=BsplineBasisFunction(degree=int(data["degree"]), nknots=int(data["n_knots"])),
        fixed_effect=True,
        heteroskedastic=False,
        warp_name=None,
        **CONFIGS[config],
    )
    with tempfile.TemporaryDirectory(prefix="pcn-bench-") as save_dir:
        model = NormativeModel(
            blr, savemodel=False, evaluate_model=False, saveresults=False, saveplots=False, save_dir=save_dir
        )
        cpu0, wall0 = time.process_time(), time.perf_counter()
        model.fit(train)  # PCNtoolkit also predicts the training set inside fit()
        fit_cpu, fit_wall = time.process_time() - cpu0, time.perf_counter() - wall0

        cpu0, wall0 = time.process_time(), time.perf_counter()
        scored = model.predict(test)
        predict_cpu, predict_wall = time.process_time() - cpu0, time.perf_counter() - wall0

    # Z's response order follows a set inside PCNtoolkit: select by name.
    return {
        f"z_{config}": scored["Z"].sel(response_vars=names).values,
        f"log_beta_{config}": np.array([model[name].hyp[0] for name in names]),
        f"log_alpha_{config}": np.array([model[name].hyp[1] for name in names]),
        f"fit_cpu_{config}": fit_cpu,
        f"fit_wall_{config}": fit_wall,
        f"predict_cpu_{config}": predict_cpu,
        f"predict_wall_{config}": predict_wall,
    }


def main(argv):
    if len(argv) != 3:
        raise SystemExit("usage: _pcn_worker.py INPUT.npz OUTPUT.npz")
    in_path, out_path = argv[1], argv[2]

    cpu0, wall0 = time.process_time(), time.perf_counter()
    import numpy as np
    import pcntoolkit
    from pcntoolkit.util.output import Output

    results = {"import_cpu": time.process_time() - cpu0, "import_wall": time.perf_counter() - wall0}
    Output.set_show_messages(False)
    Output.set_show_warnings(False)

    data = _load_input(in_path)
    for config in [str(c) for c in data["configs"]]:
        results.update(_fit_and_score(config, data))
    results["max_rss_mb"] = _peak_rss_mb()
    results["pcntoolkit_version"] = np.array(pcntoolkit.__version__)

    # Write next to the destination, then rename: the reader never sees half a file.
    directory = os.path.dirname(os.path.abspath(out_path))
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=directory)
    with os.fdopen(fd, "wb") as handle:
        np.savez(handle, **results)
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main(sys.argv)
