"""Connectome store: preprocessing, on-disk format, resume/extend, reading runs, bad input."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from neuroatrophy.connectome import (
    FORMAT_VERSION,
    ConnectomeStore,
    build_connectome,
    preprocess_timeseries,
    read_confounds,
    read_run,
)
from neuroatrophy.parallel import Cancelled

N_HEMI = 10242


def _write_run(folder, name, data, confounds=None):
    """One fsaverage5 run as two MGH files (10242 x 1 x 1 x T), as brainspace ships them."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for hemi, part in (("lh", data[:, :N_HEMI]), ("rh", data[:, N_HEMI:])):
        path = folder / f"{name}.{hemi}.mgz"
        nib.save(nib.MGHImage(part.T.reshape(part.shape[1], 1, 1, -1).astype(np.float32), np.eye(4)), path)
        files.append(path)
    confounds_path = None
    if confounds is not None:
        confounds_path = folder / f"{name}_confounds.txt"
        np.savetxt(confounds_path, confounds)
    return files, confounds_path


def _runs_table(tmp_path, rng, n_subjects=3, n_time=40):
    rows = []
    for s in range(n_subjects):
        data = rng.standard_normal((n_time, 2 * N_HEMI)).astype(np.float32)
        confounds = rng.standard_normal((n_time, 2))
        (lh, rh), conf = _write_run(tmp_path / "runs", f"sub-{s}", data, confounds)
        rows.append({"subject_id": f"sub-{s}", "lh_file": lh.name, "rh_file": rh.name,
                     "confounds_file": conf.name})
    table = pd.DataFrame(rows)
    path = tmp_path / "runs" / "runs.csv"
    table.to_csv(path, index=False)
    return path


def test_preprocess_removes_confounds_and_normalises(rng):
    n_time = 120
    confounds = rng.standard_normal((n_time, 3))
    data = rng.standard_normal((n_time, 50)) + confounds @ rng.standard_normal((3, 50)) * 3 + 5.0
    data[:, 7] = 2.0  # a constant column, like the medial wall
    out = preprocess_timeseries(data, confounds)
    assert np.allclose(out.mean(axis=0), 0, atol=1e-12)
    norms = np.linalg.norm(out, axis=0)
    assert np.allclose(norms[np.arange(50) != 7], 1.0)
    assert np.all(out[:, 7] == 0)
    # Orthogonal to every confound: nothing of them is left.
    assert np.abs(confounds.T @ out).max() < 1e-10
    # Equal to an independent least-squares residual, scaled.
    design = np.column_stack([np.ones(n_time), confounds])
    residual = data - design @ np.linalg.lstsq(design, data, rcond=None)[0]
    expected = residual[:, 3] / np.linalg.norm(residual[:, 3])
    assert np.allclose(out[:, 3], expected)


def test_global_signal_regression_removes_the_mean_signal(rng):
    shared = rng.standard_normal((100, 1))
    data = rng.standard_normal((100, 200)) + 2 * shared
    global_signal = data.mean(axis=1) - data.mean()
    without = preprocess_timeseries(data)
    with_gsr = preprocess_timeseries(data, global_signal=True)
    # Every node is orthogonal to the global signal after regression, and was not before.
    assert np.abs(global_signal @ with_gsr).max() < 1e-10
    assert np.abs(global_signal @ without).min() > 1.0


def test_bandpass_keeps_the_band(rng):
    tr, n_time = 2.0, 400
    t = np.arange(n_time) * tr
    slow, fast = np.sin(2 * np.pi * 0.05 * t), np.sin(2 * np.pi * 0.2 * t)
    out = preprocess_timeseries(np.column_stack([slow + fast, slow]), bandpass=(0.01, 0.1), tr=tr)
    # After filtering, the mixture is the slow wave alone.
    assert np.corrcoef(out[50:-50, 0], out[50:-50, 1])[0, 1] > 0.99
    with pytest.raises(ValueError, match="repetition time"):
        preprocess_timeseries(np.ones((20, 2)) + np.arange(20)[:, None], bandpass=(0.01, 0.1))


def test_store_round_trip_and_manifest(tmp_path, rng):
    store = ConnectomeStore.create(tmp_path / "c", dtype="float32", global_signal=True)
    data = rng.standard_normal((30, 2 * N_HEMI)).astype(np.float32)
    store.add_subject("sub-1", data)
    reopened = ConnectomeStore.open(tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "connectome.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["preprocessing"]["global_signal"] is True
    assert reopened.subject_ids == ["sub-1"] and reopened.n_timepoints == [30]
    expected = preprocess_timeseries(data, global_signal=True).astype(np.float32)
    assert np.array_equal(reopened.timeseries(0), expected)
    assert isinstance(reopened.timeseries(0), np.memmap)
    in_memory = ConnectomeStore.open(tmp_path / "c", mmap=False)
    assert not isinstance(in_memory.timeseries(0), np.memmap)
    assert np.array_equal(in_memory.timeseries(0), expected)


def test_float16_storage_keeps_r_within_1e3(tmp_path, rng):
    shared = rng.standard_normal((200, 1))
    data = (rng.standard_normal((200, 2 * N_HEMI)) + shared * rng.uniform(0, 2, 2 * N_HEMI)).astype(np.float32)
    exact = preprocess_timeseries(data)
    store = ConnectomeStore.create(tmp_path / "c16", dtype="float16")
    store.add_subject("s", data)
    stored = store.timeseries(0).astype(np.float64)
    columns = rng.choice(2 * N_HEMI, 300, replace=False)
    r_exact = exact[:, columns].T @ exact[:, columns]
    r_half = stored[:, columns].T @ stored[:, columns]
    assert np.abs(r_exact - r_half).max() < 1e-3


def test_build_resumes_after_interruption_and_extends(tmp_path, rng):
    runs = _runs_table(tmp_path, rng, n_subjects=3)

    def stop_at_third(fraction, message):
        if "3/3" in message:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        build_connectome(tmp_path / "c", runs, base_dir=runs.parent, progress=stop_at_third)
    assert ConnectomeStore.open(tmp_path / "c").subject_ids == ["sub-0", "sub-1"]
    resumed = build_connectome(tmp_path / "c", runs, base_dir=runs.parent)
    oneshot = build_connectome(tmp_path / "d", runs, base_dir=runs.parent)
    assert resumed.subject_ids == oneshot.subject_ids == ["sub-0", "sub-1", "sub-2"]
    for i in range(3):
        assert np.array_equal(resumed.timeseries(i), oneshot.timeseries(i))
    # Extending: a longer table adds only the new subject.
    table = pd.read_csv(runs)
    extra = table.iloc[[0]].assign(subject_id="sub-9")
    pd.concat([table, extra]).to_csv(runs, index=False)
    extended = build_connectome(tmp_path / "c", runs, base_dir=runs.parent)
    assert extended.subject_ids[-1] == "sub-9" and len(extended) == 4
    assert np.array_equal(extended.timeseries(3), extended.timeseries(0))


def test_resume_with_other_options_is_refused(tmp_path, rng):
    runs = _runs_table(tmp_path, rng, n_subjects=1)
    build_connectome(tmp_path / "c", runs, base_dir=runs.parent)
    with pytest.raises(ValueError, match="global_signal: store has False, requested True"):
        build_connectome(tmp_path / "c", runs, base_dir=runs.parent, global_signal=True)


def test_runs_of_one_subject_are_concatenated(tmp_path, rng):
    a = rng.standard_normal((25, 2 * N_HEMI))
    b = rng.standard_normal((35, 2 * N_HEMI))
    store = ConnectomeStore.create(tmp_path / "c", dtype="float32")
    store.add_subject("s", [a, b])
    assert store.n_timepoints == [60]
    assert np.allclose(np.linalg.norm(store.timeseries(0), axis=0), 1.0, atol=1e-5)


def test_read_run_checks_lengths_and_vertex_counts(tmp_path, rng):
    data = rng.standard_normal((20, 2 * N_HEMI)).astype(np.float32)
    (lh, rh), _ = _write_run(tmp_path, "ok", data)
    assert read_run((lh, rh)).shape == (20, 2 * N_HEMI)
    short = tmp_path / "short.rh.mgz"
    nib.save(nib.MGHImage(data[:15, N_HEMI:].T.reshape(N_HEMI, 1, 1, 15), np.eye(4)), short)
    with pytest.raises(ValueError, match="different lengths.*20 time points.*15"):
        read_run((lh, short))
    fsaverage6 = tmp_path / "fs6.lh.mgz"
    nib.save(nib.MGHImage(np.zeros((40962, 1, 1, 20), np.float32), np.eye(4)), fsaverage6)
    with pytest.raises(ValueError, match="40962 vertices.*fsaverage6"):
        read_run((fsaverage6, rh))
    with pytest.raises(FileNotFoundError, match="missing.lh.mgz"):
        read_run((tmp_path / "missing.lh.mgz", rh))


def test_add_subject_errors_name_the_subject(tmp_path, rng):
    store = ConnectomeStore.create(tmp_path / "c")
    with pytest.raises(ValueError, match="subject 'bad'.*shape \\(20, 100\\)"):
        store.add_subject("bad", rng.standard_normal((20, 100)))
    with pytest.raises(ValueError, match="subject 'conf'.*confounds have 19 rows.*20 time points"):
        store.add_subject("conf", rng.standard_normal((20, 2 * N_HEMI)), confounds=np.ones((19, 2)))
    store.add_subject("ok", rng.standard_normal((20, 2 * N_HEMI)))
    with pytest.raises(ValueError, match="'ok' is already"):
        store.add_subject("ok", rng.standard_normal((20, 2 * N_HEMI)))
    nan = rng.standard_normal((20, 2 * N_HEMI))
    nan[3, 11] = np.nan
    with pytest.raises(ValueError, match="subject 'nan'.*non-finite.*node 11"):
        store.add_subject("nan", nan)
    assert ConnectomeStore.open(tmp_path / "c").subject_ids == ["ok"]  # nothing half-written


def test_open_refuses_foreign_or_newer_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no connectome.json"):
        ConnectomeStore.open(tmp_path)
    store = ConnectomeStore.create(tmp_path / "c")
    manifest = json.loads((store.path / "connectome.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (store.path / "connectome.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format version 2.*Update NeuroAtrophy"):
        ConnectomeStore.open(store.path)
    with pytest.raises(ValueError, match="not empty"):
        ConnectomeStore.create(store.path)


def test_read_confounds_formats(tmp_path):
    plain = tmp_path / "c.txt"
    np.savetxt(plain, np.arange(12.0).reshape(4, 3))
    assert read_confounds(plain).shape == (4, 3)
    fmriprep = tmp_path / "c.tsv"
    fmriprep.write_text("trans_x\ttrans_x_derivative1\tcsf\n0.1\tn/a\t3\n0.2\t0.1\t4\n")
    values = read_confounds(fmriprep, columns=["trans_x_derivative1", "csf"])
    assert np.array_equal(values, [[0.0, 3.0], [0.1, 4.0]])
    with pytest.raises(ValueError, match="no column\\(s\\) \\['wm'\\]"):
        read_confounds(fmriprep, columns=["wm"])


def test_volume_store_on_a_small_grid(tmp_path, rng):
    mask = np.zeros((6, 7, 5), bool)
    mask[1:5, 1:6, 1:4] = True
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-6, -7, -5]
    store = ConnectomeStore.create(tmp_path / "v", space="MNI152-2mm", mask_img=nib.Nifti1Image(mask.astype(np.uint8), affine))
    assert store.n_nodes == mask.sum()
    series = rng.standard_normal(mask.shape + (30,)).astype(np.float32)
    nib.save(nib.Nifti1Image(series, affine), tmp_path / "run.nii.gz")
    data = read_run(tmp_path / "run.nii.gz", "MNI152-2mm", store.mask())
    assert data.shape == (30, mask.sum())
    assert np.array_equal(data[:, 0], series[1, 1, 1])
    store.add_subject("v1", data)
    coordinates = store.coordinates()
    assert np.allclose(coordinates[0], affine[:3, :3] @ [1, 1, 1] + affine[:3, 3])
    adjacency = store.adjacency()
    assert adjacency.shape == (mask.sum(), mask.sum())
    # Interior voxel (2, 2, 2) has all six neighbours inside the mask.
    interior = np.flatnonzero(np.all(np.argwhere(mask) == [2, 2, 2], axis=1))[0]
    assert adjacency[interior].nnz == 6


def test_subjects_without_a_recorded_signal_count_still_work(tmp_path, rng):
    """Stores written before the manifest recorded ``n_signal`` are read by counting it."""
    store = ConnectomeStore.create(tmp_path / "c", dtype="float32")
    data = rng.standard_normal((20, 2 * N_HEMI))
    data[:, :7] = 0.0
    store.add_subject("s", data)
    manifest = json.loads((store.path / "connectome.json").read_text())
    del manifest["subjects"][0]["n_signal"]
    (store.path / "connectome.json").write_text(json.dumps(manifest))
    assert ConnectomeStore.open(store.path).n_signal(0) == 2 * N_HEMI - 7 == store.n_signal(0)


def test_subject_files_differ_case_insensitively(tmp_path, rng):
    """'Sub-1' and 'sub-1' must not share a file on macOS or Windows file systems."""
    store = ConnectomeStore.create(tmp_path / "c", dtype="float32")
    store.add_subject("Sub-1", rng.standard_normal((20, 2 * N_HEMI)))
    store.add_subject("sub-1", rng.standard_normal((20, 2 * N_HEMI)))
    files = [s["file"] for s in json.loads((store.path / "connectome.json").read_text())["subjects"]]
    assert len({f.lower() for f in files}) == 2
    assert not np.array_equal(store.timeseries(0), store.timeseries(1))
