"""Tests for neuroatrophy.cohort."""

import numpy as np
import pandas as pd
import pytest

from neuroatrophy.cohort import read_cohort, split_groups, validate_covariates


def _write(path, text):
    path.write_text(text)
    return path


def test_read_cohort_normalises_aliases_and_values(tmp_path):
    path = _write(
        tmp_path / "cohort.csv",
        "Participant_ID,Age,Gender,Scanner,Group,PANSS_change,lh_file,note\n"
        " 001 ,34.5, f ,1,Control,-3,a/lh.mgh,first\n"
        "002,61,Male,site B,PATIENT,12.5,b/lh.mgh,\n"
        "sub-3,18,woman,1,hc,,c/lh.mgh,x\n"
        "sub-4,70,MAN,2,patient,4,,y\n",
    )
    cohort = read_cohort(path)
    assert list(cohort.columns) == ["subject_id", "age", "sex", "site", "group", "PANSS_change", "lh_file", "note"]
    assert cohort["subject_id"].tolist() == ["001", "002", "sub-3", "sub-4"]  # leading zeros kept
    assert cohort["age"].dtype == np.float64 and cohort["age"].tolist() == [34.5, 61.0, 18.0, 70.0]
    assert cohort["sex"].tolist() == ["F", "M", "F", "M"]
    assert cohort["site"].tolist() == ["1", "site B", "1", "2"]
    assert cohort["group"].tolist() == ["control", "patient", "hc", "patient"]
    assert cohort["PANSS_change"].dtype == np.float64
    np.testing.assert_array_equal(cohort["PANSS_change"], [-3.0, 12.5, np.nan, 4.0])
    assert cohort["note"].tolist()[0] == "first"
    assert cohort.attrs["source"] == str(path)


@pytest.mark.parametrize("name, sep", [("c.tsv", "\t"), ("c.txt", "\t"), ("c.dat", ";"), ("c.table", "\t")])
def test_read_cohort_separators(tmp_path, name, sep):
    rows = [["subject", "age", "sex", "centre"], ["s1", "20", "M", "Paris"], ["s2", "30", "F", "Lyon"]]
    path = _write(tmp_path / name, "\n".join(sep.join(r) for r in rows) + "\n")
    cohort = read_cohort(path)
    assert cohort["subject_id"].tolist() == ["s1", "s2"]
    assert cohort["site"].tolist() == ["Paris", "Lyon"]


def test_read_cohort_spreadsheet_export(tmp_path):
    """Byte-order mark and Windows line endings, as written by spreadsheet programs."""
    path = tmp_path / "export.csv"
    path.write_bytes(b"\xef\xbb\xbfSubject_ID,AGE,Sex,Site\r\ns1, 34.5 ,F,A\r\n")
    cohort = read_cohort(path)
    assert cohort["subject_id"].tolist() == ["s1"] and cohort["age"].tolist() == [34.5]


def test_read_cohort_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_cohort(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="empty.csv' is empty"):
        read_cohort(_write(tmp_path / "empty.csv", ""))
    with pytest.raises(ValueError, match="header.csv' has no rows"):
        read_cohort(_write(tmp_path / "header.csv", "subject_id,age,sex,site\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "subject_id,age,sex\ns1,20,F\n",
            r"missing required column\(s\) 'site'; available columns: 'subject_id', 'age', 'sex'",
        ),
        (
            "subject_id,age,sex,site\ns1,twenty,F,A\ns2,30,F,A\ns3,?,M,A\n",
            r"'age' is not a number for s1 \('twenty'\), s3 \('\?'\)",
        ),
        ("subject_id,age,sex,site\ns1,20,F,A\ns2,,F,A\n", "'age' has missing values for s2"),
        ("subject_id,age,sex,site\ns1,-2,F,A\n", "'age' is negative for s1"),
        ("subject_id,age,sex,site\ns1,20,F,A\ns2,30,x,A\ns3,40,1,A\n", r"'sex' must be F or M.*s2 \('x'\), s3 \('1'\)"),
        ("subject_id,age,sex,site\ns1,20,,A\n", "'sex' has missing values for s1"),
        ("subject_id,age,sex,site\ns1,20,F,A\ns2,30,M, \n", "'site' has missing values for s2"),
        ("subject_id,age,sex,site\ns1,20,F,A\ns2,30,M,A\ns1,40,M,B\n", "duplicate subject ids: s1"),
        ("subject_id,age,sex,site\ns1,20,F,A\n,30,M,A\n", "'subject_id' has missing values for row 2"),
        ("subject,participant_id,age,sex,site\ns1,p1,20,F,A\n", "'subject', 'participant_id' all mean 'subject_id'"),
    ],
)
def test_read_cohort_content_errors_name_file_column_and_subject(tmp_path, text, message):
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(ValueError, match="bad.csv") as error:
        read_cohort(path)
    assert error.match(message)


def test_validate_covariates_on_a_frame_built_in_code():
    frame = pd.DataFrame(
        {"age": [20, 30.5], "Gender": ["female", "M"], "site": [1, 2]},
        index=pd.Index(["a", "b"], name="subject_id"),
    )
    frame.attrs = {}
    out = validate_covariates(frame)
    assert out["sex"].tolist() == ["F", "M"] and out["site"].tolist() == ["1", "2"]
    assert out["age"].dtype == np.float64
    assert list(frame.columns) == ["age", "Gender", "site"]  # input untouched
    assert frame["site"].tolist() == [1, 2]
    bad = frame.assign(age=[20, np.nan])
    with pytest.raises(ValueError, match="Covariates: column 'age' has missing values for b"):
        validate_covariates(bad)
    # only the required columns must be complete
    assert validate_covariates(frame.drop(columns="site"), require=("age", "sex")).shape == (2, 2)
    with pytest.raises(ValueError, match="'site'"):
        validate_covariates(frame.drop(columns="site"))
    with pytest.raises(ValueError, match="DataFrame"):
        validate_covariates(frame.to_numpy())


def test_many_bad_subjects_are_listed_briefly():
    frame = pd.DataFrame({"subject_id": [f"s{i}" for i in range(25)], "age": "old", "sex": "F", "site": "A"})
    with pytest.raises(ValueError, match=r"s9 \('old'\) and 15 more"):
        validate_covariates(frame)


def test_split_groups(tmp_path):
    cohort = read_cohort(
        _write(
            tmp_path / "c.csv",
            "subject_id,age,sex,site,group\na,20,F,A,Control\nb,30,M,A,SZ\nc,40,F,B,healthy\nd,50,M,B,HC\n",
        )
    )
    controls, patients = split_groups(cohort)
    assert controls["subject_id"].tolist() == ["a", "c", "d"]
    assert patients["subject_id"].tolist() == ["b"]
    assert controls.attrs["source"] == cohort.attrs["source"]
    controls, patients = split_groups(cohort, control_labels=("SZ",))
    assert controls["subject_id"].tolist() == ["b"] and len(patients) == 3
    with pytest.raises(ValueError, match="c.csv' has no 'group' column"):
        split_groups(cohort.drop(columns="group"))
    cohort.loc[2, "group"] = None
    with pytest.raises(ValueError, match="'group' has missing values for c"):
        split_groups(cohort)
