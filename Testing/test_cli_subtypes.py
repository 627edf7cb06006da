"""The ``neuroatrophy subtypes`` commands, end to end on a small simulated cohort (fast settings)."""

import json
import time

import numpy as np
import pandas as pd
import pytest

from neuroatrophy.cli import main
from neuroatrophy.demo_subtypes import make_demo_cohort
from neuroatrophy.jobs import Job, parse_output_line
from neuroatrophy.subtypes_pipeline import SubtypesResult

REGIONS = "cortical_gm,thalamus,cerebellar_gm,spinal_cord"
FAST = ["--max-subtypes", "2", "--startpoints", "3", "--mcmc", "2000", "--tune", "300", "--jobs", "1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A cohort table, its z-scores and a fitted analysis (with 2-fold CV), made through the CLI."""
    folder = tmp_path_factory.mktemp("cli_subtypes")
    table, _ = make_demo_cohort(seed=1, n_controls=80, n_patients=120)
    table.to_csv(folder / "cohort.csv", index=False)
    assert main(["subtypes", "zscore", "--table", str(folder / "cohort.csv"), "--regions", REGIONS,
                 "--covariates", "age,sex,icv", "--out", str(folder / "z.csv"), "--scorer", str(folder / "scorer.json"),
                 "--progress", "none"]) == 0
    assert main(["subtypes", "fit", "--zscores", str(folder / "z.csv"), "--z-levels", "1,2", "--cv-folds", "2",
                 *FAST, "--out", str(folder / "fit"), "--progress", "none"]) == 0
    return folder


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_zscore_writes_patients_against_controls(folder):
    z = pd.read_csv(folder / "z.csv", dtype={"subject_id": str}).set_index("subject_id")
    assert list(z.columns) == REGIONS.split(",")
    assert len(z) == 120 and all(s.startswith("PT") for s in z.index)
    assert (z.mean() > 0.5).all()   # patients are atrophic: larger z = smaller volume
    # The saved scorer z-scores the controls to mean ~0, SD ~1.
    out = folder / "z_controls.csv"
    table = pd.read_csv(folder / "cohort.csv")
    table[table["group"] == "control"].to_csv(folder / "controls.csv", index=False)
    assert main(["subtypes", "zscore", "--table", str(folder / "controls.csv"), "--regions", REGIONS,
                 "--apply-scorer", str(folder / "scorer.json"), "--out", str(out), "--progress", "none"]) == 0
    controls = pd.read_csv(out).set_index("subject_id")
    np.testing.assert_allclose(controls.mean(), 0, atol=1e-9)
    np.testing.assert_allclose(controls.std(), 1, atol=0.02)


def test_fit_writes_a_result_that_reloads(folder):
    result = SubtypesResult.load(folder / "fit")
    assert result.settings["z_levels"] == {r: [1.0, 2.0] for r in REGIONS.split(",")}
    assert result.settings["z_max"] == {r: 4.0 for r in REGIONS.split(",")}   # highest level + 2
    assert result.cv is not None and result.chosen_n_subtypes == result.cv.best_n_subtypes
    assert len(result.staged) == 120
    pd.testing.assert_frame_equal(result.stage(result.zscores), result.staged, check_exact=True)


def test_fit_with_default_and_file_z_levels(folder, tmp_path):
    levels = {"z_levels": {"cortical_gm": [1, 2, 3], "thalamus": [1, 2], "cerebellar_gm": [1], "spinal_cord": [1, 2]},
              "z_max": {"cortical_gm": 6, "thalamus": 5, "cerebellar_gm": 3, "spinal_cord": 4}}
    (tmp_path / "levels.json").write_text(json.dumps(levels))
    assert main(["subtypes", "fit", "--zscores", str(folder / "z.csv"),
                 "--z-levels-file", str(tmp_path / "levels.json"), *FAST,
                 "--max-subtypes", "1", "--out", str(tmp_path / "a"), "--progress", "none"]) == 0
    settings = SubtypesResult.load(tmp_path / "a").settings
    assert settings["z_levels"]["cortical_gm"] == [1.0, 2.0, 3.0] and settings["z_max"]["cerebellar_gm"] == 3.0
    assert main(["subtypes", "fit", "--zscores", str(folder / "z.csv"), "--regions", "thalamus,spinal_cord", *FAST,
                 "--max-subtypes", "1", "--out", str(tmp_path / "b"), "--progress", "none"]) == 0
    settings = SubtypesResult.load(tmp_path / "b").settings
    assert list(settings["z_levels"]) == ["thalamus", "spinal_cord"]   # data-driven levels (default_z_levels)
    assert all(settings["z_max"][r] >= settings["z_levels"][r][-1] + 2 for r in settings["z_levels"])


def test_stage_new_subjects_from_folder_or_model_file(folder, tmp_path):
    result = SubtypesResult.load(folder / "fit")
    assert main(["subtypes", "stage", "--model", str(folder / "fit"), "--zscores", str(folder / "z.csv"),
                 "--out", str(tmp_path / "staged.csv"), "--progress", "none"]) == 0
    staged = pd.read_csv(tmp_path / "staged.csv", dtype={"subject_id": str}).set_index("subject_id")
    pd.testing.assert_frame_equal(staged, result.staged, check_exact=True)
    assert main(["subtypes", "stage", "--model", str(folder / "fit" / "model_k1.sustain"), "--zscores",
                 str(folder / "z.csv"), "--out", str(tmp_path / "k1.csv"), "--progress", "none"]) == 0
    k1 = pd.read_csv(tmp_path / "k1.csv", dtype={"subject_id": str}).set_index("subject_id")
    pd.testing.assert_frame_equal(k1, result.stage(result.zscores, 1), check_exact=True)
    assert (k1["ml_subtype"] == 1).all()


def test_associate_writes_the_tables(folder, tmp_path, capsys):
    assert main(["subtypes", "associate", "--model", str(folder / "fit"), "--clinical", str(folder / "cohort.csv"),
                 "--scores", "edss,sdmt", "--covariates", "age,sex", "--out", str(tmp_path / "assoc"),
                 "--progress", "json"]) == 0
    lines = _json_lines(capsys.readouterr().out)
    assert any("edss: subtype difference" in line.get("message", "") for line in lines)
    stages = pd.read_csv(tmp_path / "assoc" / "stage_associations.csv")
    overall = stages[stages["subtype"] == "all"].set_index("score")
    # The demo's EDSS rises and SDMT falls with stage.
    assert overall.loc["edss", "beta"] > 0 and overall.loc["edss", "p"] < 1e-6
    assert overall.loc["sdmt", "beta"] < 0
    assert (tmp_path / "assoc" / "subtype_differences.csv").is_file()


def test_progress_json_lines_parse(folder, tmp_path, capsys):
    assert main(["subtypes", "fit", "--zscores", str(folder / "z.csv"), "--z-levels", "1,2", *FAST,
                 "--out", str(tmp_path / "fit"), "--progress", "json"]) == 0
    lines = _json_lines(capsys.readouterr().out)   # every stdout line is one JSON object
    fractions = [line["progress"] for line in lines if "progress" in line]
    assert len(fractions) >= 3 and fractions[-1] == 1.0 and all(0 <= f <= 1 for f in fractions)
    events = [event for line in lines for event in parse_output_line(json.dumps(line))]
    assert any("progress" in e for e in events) and any("log" in e for e in events)


@pytest.mark.parametrize("argv, message", [
    (["subtypes", "zscore", "--table", "{cohort_bad}", "--regions", "cortical_gm,thalamus", "--out", "{tmp}/z.csv"],
     "'thalamus'"),
    (["subtypes", "zscore", "--table", "{cohort}", "--regions", "cortical_gm,putamen", "--out", "{tmp}/z.csv"],
     "'putamen'"),
    (["subtypes", "zscore", "--table", "{cohort}", "--regions", "cortical_gm", "--covariates", "age,height",
      "--out", "{tmp}/z.csv"], "'height'"),
    (["subtypes", "fit", "--zscores", "{z_bad}", "--out", "{tmp}/fit"], "column 'thalamus' is not numeric"),
    (["subtypes", "fit", "--zscores", "{z}", "--z-levels", "1,x", "--out", "{tmp}/fit"], "--z-levels"),
    (["subtypes", "fit", "--zscores", "{z}", "--z-levels", "1,2", "--z-max", "1.5", "--out", "{tmp}/fit"],
     "z_max of region 'cortical_gm'"),
    (["subtypes", "stage", "--model", "{fit}", "--zscores", "{z_partial}", "--out", "{tmp}/s.csv"], "'spinal_cord'"),
    (["subtypes", "associate", "--model", "{fit}", "--clinical", "{cohort}", "--scores", "edss,moca",
      "--out", "{tmp}/a"], "'moca'"),
    (["subtypes", "associate", "--model", "{fit}", "--clinical", "{clinical_partial}", "--scores", "edss",
      "--out", "{tmp}/a"], "missing from the clinical table: PT001, PT002"),
    (["subtypes", "stage", "--model", "{tmp}", "--zscores", "{z}", "--out", "{tmp}/s.csv"],
     "not a subtypes result folder"),
])
def test_bad_input_exits_2_naming_the_problem(folder, tmp_path, capsys, argv, message):
    table = pd.read_csv(folder / "cohort.csv")
    bad = table.astype({"thalamus": object})
    bad.loc[5, "thalamus"] = "12,5 mL"
    bad.to_csv(tmp_path / "cohort_bad.csv", index=False)
    z = pd.read_csv(folder / "z.csv").astype({"thalamus": object})
    z.loc[3, "thalamus"] = "oops"
    z.to_csv(tmp_path / "z_bad.csv", index=False)
    z.drop(columns=["spinal_cord", "thalamus"]).to_csv(tmp_path / "z_partial.csv", index=False)
    table[table["subject_id"] > "PT002"].to_csv(tmp_path / "clinical_partial.csv", index=False)
    paths = {"cohort": folder / "cohort.csv", "cohort_bad": tmp_path / "cohort_bad.csv", "z": folder / "z.csv",
             "z_bad": tmp_path / "z_bad.csv", "z_partial": tmp_path / "z_partial.csv", "fit": folder / "fit",
             "clinical_partial": tmp_path / "clinical_partial.csv", "tmp": tmp_path}
    argv = [a.format(**paths) for a in argv]
    assert main([*argv, "--progress", "json"]) == 2
    captured = capsys.readouterr()
    errors = [line["error"] for line in _json_lines(captured.out) if "error" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert message in captured.err
    assert not (tmp_path / "fit").exists() and not (tmp_path / "z.csv").exists()


def test_fit_job_in_a_subprocess_reports_progress_and_cancels_cleanly(folder, tmp_path):
    out = tmp_path / "fit"
    args = ["subtypes", "fit", "--zscores", str(folder / "z.csv"), "--z-levels", "1,2", "--max-subtypes", "2",
            "--startpoints", "3", "--mcmc", "2000", "--tune", "300", "--jobs", "1", "--out", str(out)]
    events = []
    assert Job(args).run(on_event=events.append) == 0
    progress = [e["progress"] for e in events if "progress" in e]
    assert progress[-1] == 1.0 and SubtypesResult.load(out).chosen_n_subtypes == 2

    # A long fit, cancelled once it reports progress: no result folder, no staging folder left.
    long_out = tmp_path / "long"
    job = Job([*args[:-1], str(long_out), "--mcmc", "50000000"]).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any("MCMC" in e.get("message", "") for e in job.poll()):
        time.sleep(0.05)
    job.cancel()
    job.wait(30)
    assert job.cancelled and job.error is None
    assert not long_out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit"]


def test_fit_mixture_kind_from_likelihood_tables(folder, tmp_path):
    from neuroatrophy.subtypes_input import mixture_likelihoods

    table = pd.read_csv(folder / "cohort.csv", dtype={"subject_id": str})
    regions = REGIONS.split(",")
    L_yes, L_no = mixture_likelihoods(table[["subject_id", *regions]].set_index("subject_id"),
                                      table["group"].eq("control").to_numpy(), abnormal="lower")
    patients = table.loc[table["group"] == "patient", "subject_id"]
    L_yes.loc[patients].to_csv(tmp_path / "yes.csv", index_label="subject_id")
    L_no.loc[patients].to_csv(tmp_path / "no.csv", index_label="subject_id")
    assert main(["subtypes", "fit", "--zscores", str(folder / "z.csv"), "--kind", "mixture", "--likelihoods",
                 str(tmp_path / "yes.csv"), str(tmp_path / "no.csv"), *FAST, "--out", str(tmp_path / "mix"),
                 "--progress", "none"]) == 0
    result = SubtypesResult.load(tmp_path / "mix")
    assert result.model.kind == "mixture" and result.model.n_events == 4 and len(result.staged) == 120
    assert main(["subtypes", "fit", "--zscores", str(folder / "z.csv"), "--kind", "mixture", *FAST,
                 "--out", str(tmp_path / "mix2"), "--progress", "none"]) == 2
