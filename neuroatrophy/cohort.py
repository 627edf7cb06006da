"""Reading and validating cohort tables.

A cohort table (CSV or TSV) has one row per subject with columns ``subject_id``,
``age``, ``sex``, ``site``, optionally ``group`` (``control``/``patient``) and
``lh_file``/``rh_file`` (per-vertex files), and any outcome columns. Common
column aliases are accepted (``participant_id``, ``gender``, ``scanner``, ...).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["read_cohort", "validate_covariates", "split_groups", "subject_names", "format_listing", "COLUMN_ALIASES"]

#: Accepted column names (case-insensitive) for each standard column.
COLUMN_ALIASES = {
    "subject_id": ("subject_id", "subject", "participant_id", "sub", "id"),
    "age": ("age",),
    "sex": ("sex", "gender"),
    "site": ("site", "scanner", "center", "centre"),
    "group": ("group",),
    "lh_file": ("lh_file",),
    "rh_file": ("rh_file",),
}

_SEX_CODES = {"f": "F", "female": "F", "woman": "F", "m": "M", "male": "M", "man": "M"}
_MAX_LISTED = 10


def read_cohort(path) -> pd.DataFrame:
    """Read and validate a cohort table.

    Parameters
    ----------
    path : str or path-like
        CSV or TSV file. ``.tsv`` and ``.txt`` are read as tab-separated, ``.csv``
        as comma-separated; the separator of other files is sniffed.

    Returns
    -------
    pandas.DataFrame
        One row per subject, in file order: ``subject_id`` (str), ``age`` (float),
        ``sex`` (``"F"``/``"M"``), ``site`` (str), ``group`` (lower-case str, if
        present), other columns kept (numeric where every value is a number).
        ``attrs["source"]`` holds the file path.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the table is empty, a required column is missing, or a value is missing,
        invalid or duplicated (the message names the file, column and subjects).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Cohort table not found: {path}")
    try:
        table = pd.read_csv(path, sep=_separator(path), dtype=str, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise ValueError(f"Cohort table '{path}' is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"Could not parse cohort table '{path}': {exc}") from exc
    table.columns = [str(column).strip() for column in table.columns]
    table.attrs["source"] = str(path)
    table = validate_covariates(table, require=("subject_id", "age", "sex", "site"))
    return _numeric_extra_columns(table)


def _separator(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".txt"):
        return "\t"
    if suffix == ".csv":
        return ","
    with open(path, newline="", encoding="utf-8", errors="replace") as stream:
        sample = stream.read(4096)
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;").delimiter
    except csv.Error:
        return ","


def validate_covariates(df: pd.DataFrame, require=("age", "sex", "site")) -> pd.DataFrame:
    """Check and normalise a covariate table; returns a normalised copy.

    Column aliases are renamed to the standard names. Normalisation: ``subject_id``
    and ``site`` to stripped str, ``age`` to float, ``sex`` to ``"F"``/``"M"``
    (from f/m/female/male/woman/man, any case), ``group`` to lower-case str.
    Subjects are named in messages by ``subject_id`` (column, or the index if it
    is not a plain range), else by row number.

    Parameters
    ----------
    df : pandas.DataFrame
        Covariates, e.g. from :func:`read_cohort` or built in code.
    require : sequence of str
        Standard columns that must be present and complete.

    Raises
    ------
    ValueError
        Missing required column (lists the available ones), missing values in a
        required column, unparseable or negative age, unknown sex code, duplicate
        subject ids, or an empty table. Messages name the file (``attrs["source"]``)
        and the subjects.
    """
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"covariates must be a pandas DataFrame, got {type(df).__name__}")
    where = f"Cohort table '{df.attrs['source']}'" if df.attrs.get("source") else "Covariates"
    out = _rename_aliases(df, where)
    missing = [column for column in require if column not in out.columns]
    if missing:
        raise ValueError(
            f"{where}: missing required column(s) {', '.join(repr(c) for c in missing)}; "
            f"available columns: {', '.join(repr(str(c)) for c in df.columns) or 'none'}"
        )
    if len(out) == 0:
        raise ValueError(f"{where} has no rows")

    if "subject_id" in out.columns:
        out["subject_id"] = _labels_column(out, "subject_id", where, required=True)
        duplicated = out["subject_id"][out["subject_id"].duplicated()].unique().tolist()
        if duplicated:
            raise ValueError(f"{where}: duplicate subject ids: {format_listing(duplicated)}")
    names = subject_names(out)
    if "age" in out.columns:
        out["age"] = _age_column(out["age"], names, where, required="age" in require)
    if "sex" in out.columns:
        out["sex"] = _sex_column(out["sex"], names, where, required="sex" in require)
    if "site" in out.columns:
        out["site"] = _labels_column(out, "site", where, required="site" in require, names=names)
    if "group" in out.columns:
        group = _labels_column(out, "group", where, required="group" in require, names=names)
        out["group"] = group.str.lower()
    return out


def _rename_aliases(df: pd.DataFrame, where: str) -> pd.DataFrame:
    renames = {}
    for standard, aliases in COLUMN_ALIASES.items():
        matches = [c for c in df.columns if str(c).strip().lower() in aliases]
        if len(matches) > 1:
            raise ValueError(
                f"{where}: columns {', '.join(repr(str(c)) for c in matches)} all mean '{standard}'; keep one"
            )
        if matches and matches[0] != standard:
            renames[matches[0]] = standard
    out = df.rename(columns=renames)
    out.attrs = dict(df.attrs)
    return out


def subject_names(df: pd.DataFrame) -> list[str]:
    """How each row of a cohort or covariate table is named in error messages."""
    if "subject_id" in df.columns:
        return df["subject_id"].tolist()
    if not isinstance(df.index, pd.RangeIndex):
        return [str(label) for label in df.index]
    return [f"row {i + 1}" for i in range(len(df))]


def _is_missing(values: pd.Series) -> np.ndarray:
    blank = values.map(lambda v: isinstance(v, str) and not v.strip())
    return (values.isna() | blank.astype(bool)).to_numpy()


def _as_label(value) -> str:
    # Integral floats (e.g. site 1.0 from a numeric column built in code) read as "1".
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _labels_column(df, column, where, required, names=None) -> pd.Series:
    values = df[column]
    missing = _is_missing(values)
    names = names if names is not None else [f"row {i + 1}" for i in range(len(df))]
    if required and missing.any():
        raise ValueError(f"{where}: column '{column}' has missing values for {format_listing(_pick(names, missing))}")
    labels = [None if gone else _as_label(v) for v, gone in zip(values.tolist(), missing)]
    return pd.Series(labels, index=df.index, dtype=object if missing.any() else None, name=column)


def _age_column(values: pd.Series, names, where, required) -> pd.Series:
    missing = _is_missing(values)
    if required and missing.any():
        raise ValueError(f"{where}: column 'age' has missing values for {format_listing(_pick(names, missing))}")
    age = pd.to_numeric(values.where(~missing), errors="coerce").astype(np.float64)
    bad = ~missing & ~np.isfinite(age.to_numpy())
    if bad.any():
        shown = [f"{n} ({v!r})" for n, v in zip(_pick(names, bad), values[bad].tolist())]
        raise ValueError(f"{where}: column 'age' is not a number for {format_listing(shown)}")
    negative = (age < 0).to_numpy()
    if negative.any():
        raise ValueError(f"{where}: column 'age' is negative for {format_listing(_pick(names, negative))}")
    return age


def _sex_column(values: pd.Series, names, where, required) -> pd.Series:
    missing = _is_missing(values)
    if required and missing.any():
        raise ValueError(f"{where}: column 'sex' has missing values for {format_listing(_pick(names, missing))}")
    codes = [None if gone else _SEX_CODES.get(str(v).strip().lower()) for v, gone in zip(values.tolist(), missing)]
    bad = np.array([code is None and not gone for code, gone in zip(codes, missing)])
    if bad.any():
        shown = [f"{n} ({v!r})" for n, v in zip(_pick(names, bad), values[bad].tolist())]
        raise ValueError(
            f"{where}: column 'sex' must be F or M (or female/male, woman/man) but is {format_listing(shown)}"
        )
    return pd.Series(codes, index=values.index, name="sex", dtype=object if missing.any() else None)


def _numeric_extra_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Convert non-standard columns whose values are all numbers (e.g. outcomes) to float."""
    for column in df.columns:
        if column in COLUMN_ALIASES:
            continue
        values = df[column]
        present = ~_is_missing(values)
        if not present.any():
            continue
        try:
            numbers = pd.to_numeric(values.where(present), errors="raise")
        except (ValueError, TypeError):
            df[column] = values.map(lambda v: v.strip() if isinstance(v, str) else v)
            continue
        df[column] = numbers.astype(np.float64)
    return df


def _pick(names, mask) -> list[str]:
    return [n for n, m in zip(names, mask) if m]


def format_listing(items) -> str:
    """``"a, b, c and 4 more"``: at most ten items of a list, for error messages."""
    items = [str(i) for i in items]
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def split_groups(df: pd.DataFrame, control_labels=("control", "hc", "healthy")):
    """Split a cohort into controls and patients by its ``group`` column.

    Rows whose group (case-insensitive) is one of ``control_labels`` are controls;
    all other rows are patients.

    Returns
    -------
    (controls, patients) : tuple of pandas.DataFrame
        Copies in the original row order, with the original ``attrs``.
    """
    where = f"Cohort table '{df.attrs['source']}'" if df.attrs.get("source") else "Cohort"
    if "group" not in df.columns:
        raise ValueError(
            f"{where} has no 'group' column; available columns: {', '.join(repr(str(c)) for c in df.columns)}"
        )
    missing = _is_missing(df["group"])
    if missing.any():
        subjects = format_listing(_pick(subject_names(df), missing))
        raise ValueError(f"{where}: column 'group' has missing values for {subjects}")
    labels = {str(label).strip().lower() for label in control_labels}
    is_control = df["group"].map(lambda v: str(v).strip().lower() in labels).to_numpy(dtype=bool)
    controls, patients = df[is_control].copy(), df[~is_control].copy()
    controls.attrs = dict(df.attrs)
    patients.attrs = dict(df.attrs)
    return controls, patients
