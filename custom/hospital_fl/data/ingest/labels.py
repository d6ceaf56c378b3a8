"""Label files for ingested chest radiographs: the ChestX-ray14 CSV layout or a plain file,label CSV.

Rules (stated once, applied everywhere):
- An entry names an image by its path under the DICOM folder or by its file name; a known
  image extension (.dcm .dicom .png .jpg .jpeg) is ignored, anything else is part of the
  name (PACS files named by UID keep every UID component). "00000001_000.png" in a
  ChestX-ray14 CSV matches "00000001_000.dcm". A bare file name that more than one file in
  the export carries (PAT1/IM1 and PAT2/IM1) is ambiguous: those files are rejected
  ("ambiguous_label") rather than given one patient's label; name them by path instead.
  Keys must be unique within a label file.
- An unknown finding name is an error for the whole file (a typo would otherwise drop a
  positive label without anyone noticing); a DICOM file with no entry is a listed
  rejection ("no_label") and an entry with no DICOM file is listed in the report
  ("label_without_image"), while everything else ingests.
- Labels are stored as the 14 ChestX-ray14 findings (multi-hot). A plain file,label CSV
  labels pneumonia only (label 0/1, or normal/pneumonia): its images are usable for the
  binary pneumonia task and refused for the 14-label task.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path, PurePath

from hospital_fl.data.findings import CHESTXRAY14_FINDINGS
from hospital_fl.errors import InputError

__all__ = [
    "CXR14_FINDINGS",
    "IMAGE_EXTENSIONS",
    "base_key",
    "read_csv_rows",
    "LabelEntry",
    "LabelTable",
    "NO_FINDING",
    "image_key",
    "read_labels",
]

CXR14_FINDINGS = CHESTXRAY14_FINDINGS
NO_FINDING = "No Finding"
_PLAIN_VALUES = {"0": 0, "1": 1, "normal": 0, "pneumonia": 1}
LAYOUT_CXR14 = "chestxray14"
LAYOUT_PLAIN = "file,label"


IMAGE_EXTENSIONS = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")


def image_key(name: str) -> str:
    """The key a file path or label entry is matched by: the path without a known image extension."""
    path = PurePath(name.strip().replace("\\", "/"))
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        path = path.with_suffix("")
    return path.as_posix()


def base_key(name: str) -> str:
    """The file-name part of ``image_key`` (what a label naming no folder matches)."""
    return PurePath(image_key(name)).name


@dataclass(frozen=True)
class LabelEntry:
    """One image's labels: ``labels`` is multi-hot over ``LabelTable.label_names``."""

    labels: tuple[int, ...]
    patient_id: str | None = None
    view_position: str | None = None


@dataclass(frozen=True)
class LabelTable:
    layout: str
    label_names: tuple[str, ...]
    entries: dict[str, LabelEntry]
    source: str

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, relative_path: str) -> LabelEntry | None:
        """The entry naming this path, else the entry naming its file name (callers check ambiguity)."""
        return self.entries.get(image_key(relative_path)) or self.entries.get(base_key(relative_path))


def read_csv_rows(path: Path, name: str, fix: str) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a UTF-8 CSV; a row with more fields than the header is an error naming its line."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = []
            for line, row in enumerate(reader, start=2):
                if None in row:  # DictReader puts surplus fields under the key None
                    raise InputError(
                        f"{path.name} line {line}",
                        ",".join([*(v or "" for k, v in row.items() if k is not None), *row[None]]),
                        f"the row has more fields than the header ({len(header)})",
                        "quote values that contain commas, or remove the extra fields",
                    )
                rows.append({(k or "").strip(): (v or "").strip() for k, v in row.items()})
    except (UnicodeDecodeError, csv.Error) as err:
        raise InputError(name, str(path), f"the file must be UTF-8 CSV text ({err})", fix) from None
    except OSError as err:
        raise InputError(
            name, str(path), f"the file must be readable ({err.strerror})", "check its permissions"
        ) from None
    return header, rows


def _open_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise InputError(
            "labels", str(path), "the label file must exist and be a file", "pass --labels PATH/TO/labels.csv"
        )
    header, rows = read_csv_rows(path, "labels", "export the labels as CSV")
    if not header:
        raise InputError(
            "labels", str(path), "the label file is empty (no header row)", "export the labels with a header"
        )
    return header, rows


def _cxr14_entry(row: dict[str, str], line: int, path: Path) -> LabelEntry:
    findings = [f.strip() for f in row["Finding Labels"].split("|") if f.strip()]
    unknown = [f for f in findings if f not in CXR14_FINDINGS and f != NO_FINDING]
    if unknown:
        raise InputError(
            f"{path.name} line {line} Finding Labels",
            row["Finding Labels"],
            f"findings must be ChestX-ray14 names {CXR14_FINDINGS} or {NO_FINDING!r}, separated by '|'; "
            f"{unknown[0]!r} is not one",
            "correct the spelling (names are case-sensitive, e.g. Pleural_Thickening) or map the finding before ingest",
        )
    if not findings:
        raise InputError(
            f"{path.name} line {line} Finding Labels",
            "",
            "every image needs at least one finding or 'No Finding'",
            "label the image or remove its row",
        )
    if NO_FINDING in findings and len(findings) > 1:
        raise InputError(
            f"{path.name} line {line} Finding Labels",
            row["Finding Labels"],
            "'No Finding' cannot be combined with a finding",
            "keep either the findings or 'No Finding'",
        )
    labels = tuple(int(name in findings) for name in CXR14_FINDINGS)
    return LabelEntry(labels, row.get("Patient ID") or None, (row.get("View Position") or "").upper() or None)


def _plain_entry(row: dict[str, str], line: int, path: Path) -> LabelEntry:
    value = row["label"].lower()
    if value not in _PLAIN_VALUES:
        raise InputError(
            f"{path.name} line {line} label",
            row["label"],
            "a plain label must be 0, 1, normal or pneumonia",
            "use 1 for pneumonia and 0 for no pneumonia",
        )
    return LabelEntry((_PLAIN_VALUES[value],), row.get("patient_id") or None, (row.get("view") or "").upper() or None)


def read_labels(path: str | Path) -> LabelTable:
    """Read a ChestX-ray14 CSV (Image Index, Finding Labels[, Patient ID, View Position]) or a file,label CSV.

    Raises:
        InputError: unreadable file, unknown layout, unknown finding, bad value or a duplicate
            image, naming the file, line and value.
    """
    path = Path(path)
    header, rows = _open_rows(path)
    if {"Image Index", "Finding Labels"} <= set(header):
        layout, key_col, names, parse = LAYOUT_CXR14, "Image Index", CXR14_FINDINGS, _cxr14_entry
    elif {"file", "label"} <= set(header):
        layout, key_col, names, parse = LAYOUT_PLAIN, "file", ("Pneumonia",), _plain_entry
    else:
        raise InputError(
            "labels",
            f"{path} (columns {header})",
            "the label file must have columns 'Image Index','Finding Labels' (ChestX-ray14) or 'file','label'",
            "rename the columns to one of the two layouts",
        )
    entries: dict[str, LabelEntry] = {}
    first_line: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if not row.get(key_col):
            raise InputError(
                f"{path.name} line {line} {key_col}", "", "every row must name its image", "fill in or remove the row"
            )
        key = image_key(row[key_col])
        if key in entries:
            raise InputError(
                f"{path.name} line {line} {key_col}",
                row[key_col],
                f"each image may be labelled once; line {first_line[key]} already labels it",
                "remove the duplicate row",
            )
        entries[key] = parse(row, line, path)
        first_line[key] = line
    if not entries:
        raise InputError("labels", str(path), "the label file has a header but no rows", "export the labels again")
    return LabelTable(layout, names, entries, str(path))
