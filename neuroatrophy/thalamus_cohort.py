"""Cohort mode: segment every subject of a table of file paths and evaluate the methods.

The table (CSV/TSV) has one row per scan session:

* ``subject`` (required) and optionally ``session`` and ``time`` (years, or dates) for
  longitudinal designs;
* one or more image columns ``t1w``, ``flair``, ``r1`` (case-insensitive): scans of that session
  (all given ones are segmented together as an ensemble);
* optionally ``reference``: a manual (or otherwise trusted) thalamus mask, 10/49 or any format
  :func:`~neuroatrophy.thalamus_masks.load_external_mask` detects;
* optionally ``mask:<method>`` columns: other methods' masks (FreeSurfer aseg, FIRST, DBSegment,
  ...) to evaluate side by side with ours.

Relative paths are relative to the table's folder. The output folder gets ``volumes.csv`` (one
row per session and method), per-session result folders, and with references ``metrics.csv``
(:func:`~neuroatrophy.thalamus_eval.evaluate_masks` rows), ``agreement.csv``
(:func:`~neuroatrophy.thalamus_eval.agreement_table`), ``bland_altman.png``, ``metrics.png``;
with a ``time`` column and repeated subjects, ``change.csv``
(:func:`~neuroatrophy.thalamus_eval.annualized_change`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pandas as pd

from .io import replace_folder, safe_file_stem
from .thalamus_labels import thalamus_volumes

__all__ = ["IMAGE_COLUMNS", "read_path_table", "segment_cohort", "OURS"]

IMAGE_COLUMNS = {"t1w": "T1w", "flair": "FLAIR", "r1": "R1"}
OURS = "ThalamusSeg"


def read_path_table(path) -> pd.DataFrame:
    """Read and check a cohort table of file paths (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cohort table not found: {path}")
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises several parser error types
        raise ValueError(f"could not read the cohort table {path}: {exc}") from exc
    table.columns = [c.strip() for c in table.columns]
    lower = {c.lower(): c for c in table.columns}
    if "subject" not in lower:
        raise ValueError(f"cohort table {path} has no 'subject' column (columns: {list(table.columns)})")
    table = table.rename(columns={lower[k]: k for k in ("subject", "session", "time", "reference", *IMAGE_COLUMNS)
                                  if k in lower})
    images = [c for c in IMAGE_COLUMNS if c in table.columns]
    if not images:
        raise ValueError(f"cohort table {path} needs at least one image column of {list(IMAGE_COLUMNS)}")
    if (table["subject"].str.strip() == "").any():
        raise ValueError(f"cohort table {path}: row {int((table['subject'].str.strip() == '').idxmax()) + 2} "
                         "has an empty subject")
    key = ["subject"] + (["session"] if "session" in table.columns else [])
    duplicated = table.duplicated(key)
    if duplicated.any():
        raise ValueError(f"cohort table {path}: subject {table.loc[duplicated, 'subject'].iloc[0]!r} appears twice"
                         + (" with the same session" if "session" in key else "; add a 'session' column"))
    base = path.resolve().parent
    path_columns = images + [c for c in table.columns if c == "reference" or c.startswith("mask:")]
    for column in path_columns:
        table[column] = [str(base / v) if v and not os.path.isabs(v) else v for v in table[column]]
    for _, row in table.iterrows():
        if not any(row[c] for c in images):
            raise ValueError(f"cohort table {path}: subject {row['subject']!r} has no image in {images}")
        for column in path_columns:
            if row[column] and not Path(row[column]).exists():
                raise FileNotFoundError(f"cohort table {path}: subject {row['subject']!r}, column {column!r}: "
                                        f"file not found: {row[column]}")
    return table


def _session_name(row) -> str:
    return f"{row['subject']}_{row['session']}" if "session" in row and row["session"] else str(row["subject"])


def segment_cohort(table, out, segmenter, ensemble: str = "majority", progress=None):
    """Segment and evaluate a cohort; writes the output folder atomically and returns its path.

    Parameters
    ----------
    table : DataFrame or path
        See :func:`read_path_table`.
    out : path
        Output folder (replaced if it exists).
    segmenter : ThalamusSegmenter
    progress : callable(fraction, message), optional
        Raising :class:`~neuroatrophy.parallel.Cancelled` stops the run (nothing is written).
    """
    from .thalamus_eval import agreement_table, annualized_change, evaluate_masks
    from .thalamus_masks import load_external_mask
    from .thalamus_plot import metrics_figure, save_bland_altman

    if not isinstance(table, pd.DataFrame):
        table = read_path_table(table)
    report = progress or (lambda fraction, message: None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        volume_rows, metric_tables, used = [], [], set()
        n = len(table)
        for i, (_, row) in enumerate(table.iterrows()):
            name = _session_name(row)
            images = {label: row[col] for col, label in IMAGE_COLUMNS.items() if col in row and row[col]}

            def member_progress(fraction, message, i=i, name=name):
                report((i + 0.9 * fraction) / n, f"{name}: {message}")

            result = segmenter.segment(images, progress=member_progress, ensemble=ensemble)
            result.save(tmp / safe_file_stem(name, used))
            masks = {OURS: result.labels}
            if len(result.per_input) > 1:  # the ensemble's single-contrast members, side by side
                masks.update({f"{OURS} ({member})": img for member, img in result.per_input.items()})
            for column in [c for c in table.columns if c.startswith("mask:")]:
                if row[column]:
                    masks[column[len("mask:"):]] = load_external_mask(row[column])
            for method, img in masks.items():
                volume_rows.append({"subject": row["subject"], **({"session": row["session"]} if "session" in row
                                                                   else {}),
                                    **({"time": row["time"]} if "time" in row else {}), "method": method,
                                    **thalamus_volumes(img)})
            if "reference" in row and row["reference"]:
                reference = load_external_mask(row["reference"])
                metric_tables.append(evaluate_masks(masks, reference, subject=name))
        report(0.95, "writing cohort tables")
        volumes = pd.DataFrame(volume_rows)
        volumes.to_csv(tmp / "volumes.csv", index=False)
        if metric_tables:
            metrics = pd.concat(metric_tables, ignore_index=True)
            metrics.to_csv(tmp / "metrics.csv", index=False)
            agreement_table(metrics).to_csv(tmp / "agreement.csv", index=False)
            if metrics["subject"].nunique() >= 3:
                save_bland_altman(tmp / "bland_altman.png", metrics)  # bilateral volumes, a panel per method
            metrics_figure(metrics, save=tmp / "metrics.png")
        if "time" in volumes.columns and volumes["subject"].duplicated().any():
            change = annualized_change(volumes.rename(columns={"both": "volume"}), method="method")
            change.to_csv(tmp / "change.csv", index=False)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(1.0, f"wrote {out}")
    return out

