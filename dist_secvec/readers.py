"""Read local evaluation sets of the common public formats into one row shape.

Every reader returns a list of dicts
    {"prompt": str, "response": str (when the file has one), "category": str | list[str] (when known)}
plus a few format-specific keys ("target" for AdvBench, "is_safe" for BeaverTails).
Formats (`fmt`, or detected from the file with fmt="auto"):
    advbench         CSV with header goal,target (harmful_behaviors.csv). `target` is the
                     affirmative prefix the attack aims for, not a model response.
    beavertails      JSONL (or a JSON list) with prompt, response, is_safe, category; category may
                     be BeaverTails' dict of {name: bool} (the true names are kept, as a list)
                     or a string.
    hexphi           HEx-PHI: one CSV per category, one prompt per row, no header; the category
                     is the file name without "category_" (category_3.csv -> "3",
                     3_hate_harass_violence.csv -> "3_hate_harass_violence"). A directory reads
                     every .csv in it.
    txt              one prompt per line (blank lines skipped).
    prompt_response, alpaca, chat, sharegpt, prompt_completion
                     the training row shapes, read by the same parser (dist_secvec.data): JSONL,
                     JSON list, CSV, Parquet, Arrow or a save_to_disk directory. The prompt is the
                     last user turn; with earlier turns (or a system turn) the row also carries
                     "messages", the whole conversation before the answer, which generation
                     renders. A final assistant turn is the row's `response`. Optional category
                     in the column named by `category_field`. data.columns / data.roles map
                     other column and role names (a mapped column a file lacks is skipped).
A hub dataset name, or a directory of data files (a downloaded hub dataset), is read by
datasets.load_dataset as one of those shapes.
Files may be gzip/xz compressed (.gz/.xz). Errors are DataError naming the file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import lzma
import os
from typing import Optional

from dist_secvec.config import DataConfig, looks_local
from dist_secvec.errors import DataError

SHAPES = ("prompt_response", "alpaca", "chat", "sharegpt", "prompt_completion")  # dist_secvec.data's row shapes
FORMATS = ("advbench", "beavertails", "hexphi", "txt") + SHAPES
TEXT_EXTENSIONS = (".csv", ".jsonl", ".json")  # what a directory of eval files is read for
TABLE_EXTENSIONS = (".parquet", ".arrow")
DATA_FILE_EXTENSIONS = TEXT_EXTENSIONS + TABLE_EXTENSIONS  # what datasets.load_dataset reads in a directory


def _open_text(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else lzma.open if path.endswith(".xz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"eval file '{path}': cannot be read as UTF-8 text ({type(e).__name__}: {e})") from e


def _extension(path: str) -> str:
    base = path[:-3] if path.endswith(".gz") else path[:-3] if path.endswith(".xz") else path
    return os.path.splitext(base)[1].lower()


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".gz", ".xz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return os.path.splitext(name)[0]


# ---------------------------------------------------------------------------------------------
# raw rows: (line number, row) pairs


def _json_rows(path: str, text: str) -> list[tuple[str, dict]]:
    """("line N" or "row N", object) for JSONL, or a .json file holding a list of objects."""
    if _extension(path) == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"eval file '{path}' line {e.lineno}: not valid JSON ({e.msg})") from e
        rows = list(enumerate(data, 1))
        where = "row"
    else:
        rows, where = [], "line"
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"eval file '{path}' line {i}: not valid JSON ({e.msg}); fix or remove "
                                "the line") from e
    for i, obj in rows:
        if not isinstance(obj, dict):
            raise DataError(f"eval file '{path}' {where} {i}: expected a JSON object, got {type(obj).__name__}")
    return [(f"{where} {i}", obj) for i, obj in rows]


def _csv_rows(path: str, text: str) -> list[tuple[int, list[str]]]:
    """Every non-blank CSV record with the line it starts on."""
    reader = csv.reader(io.StringIO(text))
    rows = []
    start = 1
    try:
        for record in reader:
            if any(cell.strip() for cell in record):
                rows.append((start, record))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"eval file '{path}' line {reader.line_num}: not valid CSV ({e})") from e
    return rows


def _string(value, key: str, path: str, where: str, required: bool = True) -> Optional[str]:
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise DataError(f"eval file '{path}' {where}: field '{key}' must be a non-empty string, got {value!r}")
    return value


def _category(value, key: str, path: str, where: str):
    """str, list of str, or BeaverTails' {name: bool} (the true names); None when absent/empty."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if not all(isinstance(v, bool) for v in value.values()):
            raise DataError(f"eval file '{path}' {where}: field '{key}' as a mapping must map names to "
                            f"true/false, got {value!r}")
        names = [str(k) for k, v in value.items() if v]
        return names or None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value or None
    raise DataError(f"eval file '{path}' {where}: field '{key}' must be a string, a list of strings or a "
                    f"mapping of name -> true/false, got {value!r}")


# ---------------------------------------------------------------------------------------------
# one reader per format


def _read_advbench(path: str, text: str) -> list[tuple[str, dict]]:
    rows = _csv_rows(path, text)
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0][1]]
    if "goal" not in header:
        raise DataError(f"eval file '{path}' line 1: an AdvBench CSV needs a header with a 'goal' column "
                        f"(and 'target'), got {header}")
    g = header.index("goal")
    t = header.index("target") if "target" in header else None
    out = []
    for line, rec in rows[1:]:
        if len(rec) != len(header):
            raise DataError(f"eval file '{path}' line {line}: expected {len(header)} fields "
                            f"({', '.join(header)}), got {len(rec)}; quote fields that contain commas")
        row = {"prompt": _string(rec[g], "goal", path, f"line {line}")}
        if t is not None:
            row["target"] = rec[t]
        out.append((f"line {line}", row))
    return out


def _read_hexphi(path: str, text: str) -> list[tuple[str, dict]]:
    stem = _stem(path)
    category = stem[len("category_"):] if stem.lower().startswith("category_") else stem
    out = []
    for line, rec in _csv_rows(path, text):
        cells = [c for c in rec if c.strip()]
        if len(cells) != 1:
            raise DataError(f"eval file '{path}' line {line}: a HEx-PHI file has one prompt per row, got "
                            f"{len(cells)} fields; quote prompts that contain commas")
        out.append((f"line {line}", {"prompt": cells[0].strip(), "category": category}))
    return out


def _read_beavertails(path: str, text: str) -> list[tuple[str, dict]]:
    out = []
    for where, obj in _json_rows(path, text):
        row = {"prompt": _string(obj.get("prompt"), "prompt", path, where)}
        response = _string(obj.get("response"), "response", path, where, required=False)
        if response is not None:
            row["response"] = response
        category = _category(obj.get("category"), "category", path, where)
        if category is not None:
            row["category"] = category
        if "is_safe" in obj:
            if not isinstance(obj["is_safe"], bool):
                raise DataError(f"eval file '{path}' {where}: field 'is_safe' must be true or false, "
                                f"got {obj['is_safe']!r}")
            row["is_safe"] = obj["is_safe"]
        out.append((where, row))
    return out


def _read_txt(path: str, text: str) -> list[tuple[str, dict]]:
    return [(f"line {i}", {"prompt": line.strip()}) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _own_rows(path: str, text: Optional[str], split: str = "train",
              key: Optional[str] = None) -> tuple[str, list[str], list[tuple[int, dict]]]:
    """(the unit rows are counted in, columns, [(number, row)]) of a file in a training row shape."""
    from dist_secvec.data import _read_rows

    if text is None:  # Parquet, Arrow, a saved dataset, a hub dataset: read as training files are
        columns, rows = _read_rows(path, split, key)
        return "row", columns, rows
    if _extension(path) == ".csv":
        records = _csv_rows(path, text)
        if not records:
            return "line", [], []
        header = [c.strip().lower() for c in records[0][1]]
        rows = []
        for line, rec in records[1:]:
            if len(rec) != len(header):
                raise DataError(f"eval file '{path}' line {line}: expected {len(header)} fields "
                                f"({', '.join(header)}), got {len(rec)}; quote fields that contain commas")
            rows.append((line, dict(zip(header, rec))))
        return "line", header, rows
    objs = _json_rows(path, text)
    unit = objs[0][0].split()[0] if objs else "line"
    columns: dict = {}
    for _, obj in objs:
        columns.update(dict.fromkeys(obj))
    return unit, list(columns), [(int(where.split()[1]), obj) for where, obj in objs]


def _csv_columns(data: Optional[DataConfig]) -> Optional[DataConfig]:
    """data.columns for an eval CSV, whose header is read in lower case."""
    if data is None or not data.columns:
        return data
    from dist_secvec.data import MESSAGE_KEYS

    return dataclasses.replace(data, columns={k: v if k in MESSAGE_KEYS else v.lower()
                                              for k, v in data.columns.items()})


def _read_shape(path: str, text: Optional[str], fmt: str, category_field: str, require_response: bool,
                data: Optional[DataConfig] = None, split: str = "train",
                key: Optional[str] = None) -> tuple[str, list[tuple[str, dict]]]:
    """Rows of a training row shape as eval rows: {"prompt": the last user turn[, "messages": the
    conversation before the answer][, "response"][, "category"]}."""
    from dist_secvec.data import parse_rows

    unit, columns, rows = _own_rows(path, text, split, key)
    if not rows:
        return fmt if fmt != "auto" else "prompt_response", []
    if text is not None and _extension(path) == ".csv":
        data = _csv_columns(data)
    where = lambda i: f"eval file '{path}' {unit} {i}"  # noqa: E731
    shape, samples = parse_rows(columns, rows, path, fmt, require_response=False, data=data, where=where,
                                optional_columns=True)
    if shape == "text":
        raise DataError(f"eval file '{path}': text rows have no prompt to answer; give prompts (a .txt file "
                        "with one per line, prompt rows or chat rows)")
    response_column = (data.columns.get("response") if data and data.columns else None) or "response"
    if response_column not in columns:
        response_column = "response"
    out = []
    for (i, raw), s in zip(rows, samples):
        if s.tools:
            raise DataError(f"{where(i)}: 'tools' are not passed to generation; remove the column")
        has_answer = (raw.get(response_column) is not None) if shape == "prompt_response" else bool(
            s.response or s.final)
        if require_response and not has_answer:
            raise DataError(f"{where(i)}: needs a 'response' field here (the final assistant turn; read as {shape})")
        row = {"prompt": s.prompt}
        if len(s.messages) > 1:
            row["messages"] = s.messages
        if has_answer:
            row["response"] = s.response
        category = _category(raw.get(category_field), category_field, path, f"{unit} {i}")
        if category is not None:
            row["category"] = category
        out.append((f"{unit} {i}", row))
    return shape, out


# ---------------------------------------------------------------------------------------------
# detection and the entry point


def detect_format(path: str, text: str, data: Optional[DataConfig] = None) -> str:
    ext = _extension(path)
    if ext == ".csv":
        rows = _csv_rows(path, text)
        header = [c.strip().lower() for c in rows[0][1]] if rows else []
        if "goal" in header:
            return "advbench"
        mapped = {c.lower() for c in (data.columns.values() if data and data.columns else ())}
        if ({"prompt", "instruction", "messages", "conversations", "text"} | mapped) & set(header):
            return "auto"  # a training row shape, detected from its columns
        return "hexphi"
    if ext in (".jsonl", ".json"):
        rows = _json_rows(path, text)
        first = rows[0][1] if rows else {}
        if "is_safe" in first or isinstance(first.get("category"), dict):
            return "beavertails"
        return "auto"  # a training row shape, detected from its columns
    if ext == ".txt":
        return "txt"
    raise DataError(f"eval file '{path}': unsupported extension '{ext or os.path.basename(path)}' "
                    f"(use one of {', '.join(TEXT_EXTENSIONS + ('.txt',) + TABLE_EXTENSIONS)}, optionally .gz/.xz "
                    "for text, or a save_to_disk directory)")


def _holds_data_files(path: str) -> bool:
    return any(_extension(n) in DATA_FILE_EXTENSIONS for _, _, names in os.walk(path) for n in names
               if not n.startswith("."))


def read_eval_set(path: str, fmt: str = "auto", category_field: str = "category",
                  require_response: bool = False, data: Optional[DataConfig] = None, split: str = "train",
                  key: Optional[str] = None) -> list[dict]:
    """Rows of one eval file (or every eval file in a directory, sorted by name), or of a hub
    dataset (`split`; `key` names the config key when it cannot be loaded).

    require_response: every row must carry a `response` string (judge-only mode, benign tasks);
    an empty one is allowed (a model may answer nothing). data: data.columns / data.roles for
    the training row shapes.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"eval file '{path}': unknown format '{fmt}' (allowed: auto, {', '.join(FORMATS)})")
    full = os.path.expanduser(path)
    from dist_secvec.data import is_dataset_dir

    if os.path.isdir(full) and not is_dataset_dir(full):
        files = sorted(os.path.join(full, n) for n in os.listdir(full)
                       if _extension(n) in TEXT_EXTENSIONS and not n.startswith("."))
        if files:
            return [row for f in files
                    for row in read_eval_set(f, fmt, category_field, require_response, data, split, key)]
        if not _holds_data_files(full):
            raise DataError(f"eval directory '{path}': no {', '.join(TEXT_EXTENSIONS)} files in it (nor data files "
                            f"datasets can load: {', '.join(DATA_FILE_EXTENSIONS)})")
    hub = not os.path.exists(full) and not looks_local(path)
    if hub or os.path.isdir(full) or (os.path.isfile(full) and _extension(full) in TABLE_EXTENSIONS):
        if fmt not in ("auto",) + SHAPES:
            raise DataError(f"eval file '{path}': format '{fmt}' is read from text files; this is a table "
                            f"(read as one of {', '.join(SHAPES)})")
        file_fmt, rows = _read_shape(path, None, fmt, category_field, require_response, data, split, key)
        return [row for _, row in rows]
    if not os.path.isfile(full):
        raise DataError(f"eval file '{path}' not found: fix the path in the config")
    text = _open_text(full)
    if not text.strip():
        raise DataError(f"eval file '{path}' is empty: it needs at least one row")
    file_fmt = detect_format(path, text, data) if fmt == "auto" else fmt
    if file_fmt == "advbench":
        rows = _read_advbench(path, text)
    elif file_fmt == "hexphi":
        rows = _read_hexphi(path, text)
    elif file_fmt == "beavertails":
        rows = _read_beavertails(path, text)
    elif file_fmt == "txt":
        rows = _read_txt(path, text)
    else:
        file_fmt, rows = _read_shape(path, text, file_fmt, category_field, require_response, data)
    if not rows:
        raise DataError(f"eval file '{path}': no rows found (read as {file_fmt})")
    if require_response:
        for where, row in rows:
            if "response" not in row:
                raise DataError(f"eval file '{path}' {where}: needs a 'response' field here "
                                f"(read as {file_fmt})")
    return [row for _, row in rows]
