"""Supervised data: load rows, normalise their shape, render, tokenize and mask.

Row shapes (one per file, detected from its columns or forced by `data.format`; docs/data.md):
    prompt_response    {"prompt": str, "response": str, "system": str (optional)}
    alpaca             {"instruction", "input" (optional), "output", "system", "history": [[q, a], ...]}
    chat               {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}], "tools"}
    sharegpt           {"conversations": [{"from": "human"|"gpt"|..., "value": str}], "system", "tools"}
    prompt_completion  {"prompt": str | messages, "completion": str | messages}  (TRL)
    text               {"text": str}: language-modelling loss on every token
`data.columns` renames file columns (and message keys) to these names, `data.roles` maps role
names. Every row becomes a `Sample`: the turns before the final answer and the answer.

Loss (`data.train_on`): every assistant turn (all_assistant), the final one (last_assistant) or
every token (all). With a chat template the turns are located by rendering the conversation
prefix by prefix and masking by token position (`_chat_tokens` says how it falls back); without
one, `data.plain_template` renders each user turn and the answers follow it. Truncation cuts the
end and is counted; a row left without a supervised token is dropped and counted.

Tokenizing a set runs in data.num_proc processes (datasets' map); the training sets are kept in
the tokenization cache, one entry per rows + tokenizer + token-shaping settings, built once and
read back by later runs and the other ranks (`tokenize_samples(cache=True)`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from dist_secvec.config import DataConfig, looks_local, read_utf8
from dist_secvec.errors import ConfigError, DataError, UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FORMATS = ("prompt_response", "alpaca", "chat", "sharegpt", "prompt_completion", "text")
TRAIN_ON = ("all_assistant", "last_assistant", "all")
LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's role names as axolotl and LLaMA-Factory write them; data.roles adds to (or overrides) these
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "observation": "tool", "function_call": "assistant",
                  "function": "tool", "system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# the columns each shape reads; another shape's column in a file is refused, not silently dropped
SHAPE_FIELDS = {
    "prompt_response": ("prompt", "response", "system"),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "chat": ("messages", "system", "tools"),
    "sharegpt": ("conversations", "system", "tools"),
    "prompt_completion": ("prompt", "completion", "system", "tools"),
    "text": ("text",),
}
CONTENT_COLUMNS = frozenset(c for cols in SHAPE_FIELDS.values() for c in cols) | {"chosen", "rejected"}
MESSAGE_KEYS = ("role", "content")  # data.columns may rename these inside messages too
COLUMN_KEYS = tuple(sorted(CONTENT_COLUMNS - {"chosen", "rejected"})) + MESSAGE_KEYS
# message keys passed on to the chat template besides role and content
MESSAGE_EXTRAS = ("tool_calls", "tool_call_id", "name")
PLAIN_SYSTEM = "### System:\n{system}\n\n"  # without a chat template: a system turn before the first prompt


@dataclass
class Sample:
    """One supervised example: the conversation before the final answer, and the answer."""

    messages: list[dict]  # the turns before the answer (empty for text rows)
    response: str  # the final assistant answer (the whole text for text rows)
    source: str  # file or dataset name, for error messages
    row: int  # 1-based row number in that source
    tools: Optional[list] = None  # function definitions for the chat template
    context: int = 0  # the first `context` turns are prompt only (TRL's prompt): never supervised
    kind: str = "chat"  # chat | text
    final: Optional[dict] = None  # the answer message when it carries more than text (tool calls)

    @property
    def prompt(self) -> str:
        """The last user turn ("" when there is none)."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")

    @property
    def conversation(self) -> list[dict]:
        return self.messages + [self.final or {"role": "assistant", "content": self.response}]

    @property
    def where(self) -> str:
        return f"data file '{self.source}' row {self.row}"


# ---------------------------------------------------------------------------------------------
# config keys this module reads


_TEMPLATES: dict[str, str] = {}


def check_data_config(data: DataConfig) -> None:
    """data.columns, data.roles and data.chat_template: an unknown name, a bad value or an
    unreadable template is refused naming the key, before any model loads."""
    for key, col in (data.columns or {}).items():
        if key not in COLUMN_KEYS:
            raise ConfigError(f"config key 'data.columns.{key}': unknown field (allowed: {', '.join(COLUMN_KEYS)}); "
                              "map a field to the column that holds it, e.g. data.columns={prompt: question}")
        if not isinstance(col, str) or not col:
            raise ConfigError(f"config key 'data.columns.{key}': expected a column name, got {col!r}")
    targets = [c for k, c in (data.columns or {}).items() if k not in MESSAGE_KEYS]
    twice = sorted({c for c in targets if targets.count(c) > 1})
    if twice:
        raise ConfigError(f"config key 'data.columns': column {twice[0]!r} is mapped to two fields")
    for name, role in (data.roles or {}).items():
        if role not in ROLES:
            raise ConfigError(f"config key 'data.roles.{name}': {role!r} is not one of {', '.join(ROLES)}")
    if data.chat_template is not None:
        chat_template_text(data)
    if data.num_proc is not None and data.num_proc <= 0:
        raise ConfigError(f"config key 'data.num_proc': must be > 0, got {data.num_proc} (leave it unset for one "
                          "process per CPU core)")


def chat_template_text(data: DataConfig) -> Optional[str]:
    """The Jinja text of data.chat_template (read once), or None when unset."""
    path = data.chat_template
    if path is None:
        return None
    if data.template == "plain":
        raise ConfigError("config key 'data.chat_template': set, but data.template=plain renders without it; "
                          "remove one of them")
    if path not in _TEMPLATES:
        _TEMPLATES[path] = read_jinja(path, "data.chat_template")
    return _TEMPLATES[path]


def read_jinja(path: str, key: str) -> str:
    """The text of the Jinja file config key `key` names, its syntax checked (one line otherwise)."""
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise ConfigError(f"config key '{key}': Jinja file '{path}' not found: fix the path")
    text = read_utf8(full, "chat template", error=ConfigError, name=path)
    try:
        import jinja2

        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"config key '{key}': '{path}' line {e.lineno}: not a valid Jinja template "
                          f"({e.message})") from None
    return text


def prepare_tokenizer(tokenizer, data: DataConfig):
    """Install data.chat_template on the tokenizer (training, generation and the saved tokenizer
    then agree on one template)."""
    text = chat_template_text(data)
    if text is not None and getattr(tokenizer, "chat_template", None) != text:
        tokenizer.chat_template = text
    return tokenizer


# ---------------------------------------------------------------------------------------------
# loading


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def is_dataset_dir(path: str) -> bool:
    """A directory written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n))
                                       for n in ("state.json", "dataset_dict.json"))


def _read_rows(source: str, split: str, key: Optional[str] = None) -> tuple[list[str], list[tuple[int, dict]]]:
    """(columns, [(row number, row)]) from a local file or directory, or a hub dataset.

    Row numbers are what a user finds in an editor: the line of a JSONL file, the data line of a
    CSV (header excluded), the index (from 1) of a JSON array, Parquet/Arrow table or saved
    dataset. Text files are read without `datasets` (no cache written next to them, errors that
    name the row). A directory that is not a save_to_disk one (a downloaded hub dataset) and a
    hub name are read by datasets.load_dataset; `key` names the config key in its errors.
    """
    if looks_local(source):
        path = os.path.expanduser(source)
        if not os.path.exists(path):
            raise DataError(f"data file '{source}' not found: fix the path in the config")
        if os.path.isdir(path):
            if is_dataset_dir(path):
                return _read_saved_dataset(path, source, split)
            return _table_rows(load_dataset_rows(path, split, source, key).data, source)
        ext = os.path.splitext(path)[1].lower()
        if ext not in LOADERS:
            raise DataError(f"data file '{source}': unsupported extension '{ext}' "
                            f"(use one of {', '.join(LOADERS)}, or a save_to_disk directory)")
        if os.path.getsize(path) == 0:
            raise DataError(f"data file '{source}' is empty: add rows or remove it from the config")
        if ext == ".parquet":
            return _read_parquet(path, source)
        if ext == ".arrow":
            return _read_arrow(path, source)
        text = _read_text(path, source)
        if not text.strip():
            raise DataError(f"data file '{source}' has no rows (only blank lines): add rows or remove it from "
                            "the config")
        if ext == ".csv":
            return _read_csv(text, source)
        if ext == ".json" and text.lstrip().startswith("["):
            return _read_json_array(text, source)
        return _read_jsonl(text, source)
    return _table_rows(load_dataset_rows(source, split, source, key).data, source)


def load_dataset_rows(name: str, split: str, source: str, key: Optional[str] = None):
    """datasets.load_dataset(name, split=split): a hub name (HF_HUB_OFFLINE respected: then only
    its local cache is read) or a local directory of data files. A failure is one line naming the
    config key, saying to download the dataset or give a local path."""
    import datasets

    datasets.disable_progress_bars()
    where = f"config key '{key}': dataset '{source}'" if key else f"dataset '{source}'"
    local = os.path.isdir(name)
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:
        if local:
            raise DataError(f"data file '{source}' is a directory that is neither a save_to_disk directory nor a "
                            f"dataset datasets can load ({type(e).__name__}: {_first_line(e)}); name the files in "
                            f"it ({', '.join(LOADERS)})") from e
        why = ("HF_HUB_OFFLINE is set and it is not in the local hub cache" if datasets.config.HF_HUB_OFFLINE
               else f"{type(e).__name__}: {_first_line(e)}")
        raise DataError(f"{where} cannot be loaded from the hub ({why}); download it (huggingface-cli download "
                        f"--repo-type dataset {source} --local-dir DIR) and give DIR, or give a local file") from e


def _table_rows(table, source: str) -> tuple[list[str], list[tuple[int, dict]]]:
    rows = table.to_pylist()
    if not rows:
        raise DataError(f"data file '{source}' has no rows: add rows or remove it from the config")
    return list(table.column_names), list(enumerate(rows, 1))


def _read_saved_dataset(path: str, source: str, split: str) -> tuple[list[str], list[tuple[int, dict]]]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise DataError(f"data file '{source}': cannot be read as a saved dataset ({type(e).__name__}: "
                        f"{_first_line(e)}); save it again with save_to_disk") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"data file '{source}': the saved dataset has no split '{split}' (it has "
                            f"{', '.join(ds)}); set data.split")
        ds = ds[split]
    return _table_rows(ds.data, source)


def _read_arrow(path: str, source: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """An .arrow file as datasets writes it (an IPC stream), or an Arrow IPC file."""
    import datasets
    import pyarrow as pa

    try:
        return _table_rows(datasets.Dataset.from_file(path).data, source)
    except DataError:
        raise
    except Exception as e:
        try:
            with pa.memory_map(path) as f:
                return _table_rows(pa.ipc.open_file(f).read_all(), source)
        except DataError:
            raise
        except Exception:
            raise DataError(f"data file '{source}': cannot be read as Arrow ({type(e).__name__}: {_first_line(e)}); "
                            "re-export it") from e


def _read_text(path: str, source: str) -> str:
    text = read_utf8(path, "data file", unit="row", error=DataError, name=source)
    return text[1:] if text.startswith("\ufeff") else text  # a byte-order mark is not data


def _read_csv(text: str, source: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """The csv module keeps every cell a string ("4" stays an answer). Row N is the Nth data line."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for i, r in enumerate(reader, 1):
            if None in r:  # more cells than header columns
                raise DataError(f"data file '{source}' row {i}: {len(reader.fieldnames) + len(r[None])} cells "
                                f"but the header has {len(reader.fieldnames)} columns; quote cells that contain "
                                "commas")
            rows.append((i, dict(r)))
    except csv.Error as e:
        raise DataError(f"data file '{source}' row {max(len(rows), 1)}: not valid CSV ({e})") from None
    if not rows:
        raise DataError(f"data file '{source}' has no rows: add rows or remove it from the config")
    return list(reader.fieldnames or []), rows


def _read_parquet(path: str, source: str) -> tuple[list[str], list[tuple[int, dict]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's errors carry no row; say which file
        raise DataError(f"data file '{source}': cannot be read as parquet ({type(e).__name__}: {_first_line(e)}); "
                        "re-export it") from e
    return _table_rows(table, source)


def _check_object(obj: Any, source: str, i: int) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"data file '{source}' row {i}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_json_array(text: str, source: str) -> tuple[list[str], list[tuple[int, dict]]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"data file '{source}' line {e.lineno}: not valid JSON ({e.msg}); fix the file") from None
    rows = [(i, _check_object(obj, source, i)) for i, obj in enumerate(data, 1)]
    if not rows:
        raise DataError(f"data file '{source}' has no rows: add rows or remove it from the config")
    columns: dict = {}
    for _, obj in rows:
        columns.update(dict.fromkeys(obj))
    return list(columns), rows


def _read_jsonl(text: str, source: str) -> tuple[list[str], list[tuple[int, dict]]]:
    rows, columns = [], {}
    for i, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"data file '{source}' row {i}: not valid JSON ({e.msg}); fix or remove the line") from None
        columns.update(dict.fromkeys(_check_object(obj, source, i)))
        rows.append((i, obj))
    if not rows:
        raise DataError(f"data file '{source}' has no rows: add rows or remove it from the config")
    return list(columns), rows


# ---------------------------------------------------------------------------------------------
# row shapes


def detect_format(columns: list[str], source: str, require_response: bool = True) -> str:
    cols = set(columns)
    if "messages" in cols:
        return "chat"
    if "conversations" in cols:
        return "sharegpt"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "response"} <= cols or (not require_response and "prompt" in cols):
        return "prompt_response"
    if "text" in cols:
        return "text"
    if {"chosen", "rejected"} <= cols:
        raise DataError(f"data file '{source}': columns chosen/rejected are preference (DPO) pairs, not supervised "
                        "rows; give prompt+response (e.g. the chosen answer) rows instead")
    raise DataError(f"data file '{source}': columns {sorted(cols)} match no known row shape; expected "
                    "prompt+response, prompt+completion, instruction+output (Alpaca), messages (chat), "
                    "conversations (ShareGPT) or text; map other names with data.columns (e.g. "
                    "data.columns={prompt: question, response: answer})")


def _rename_columns(columns: list[str], mapping: dict, source: str, optional: bool = False) -> dict:
    """{file column: field} for the row-level entries of data.columns, checked against the file
    (optional: a mapped column the file lacks is skipped, as eval files lack the answer column)."""
    renames = {}
    for fld, col in mapping.items():
        if fld in MESSAGE_KEYS or (optional and col not in columns):
            continue
        if col not in columns:
            raise DataError(f"config key 'data.columns.{fld}': data file '{source}' has no column '{col}' "
                            f"(it has {', '.join(map(str, columns))})")
        if fld in columns and fld != col and fld not in mapping.values():
            raise DataError(f"config key 'data.columns.{fld}': data file '{source}' has a '{fld}' column too; "
                            "map one of them, or remove the other")
        renames[col] = fld
    return renames


class _Parser:
    """Rows of one file (one shape) into Samples; every error names the file and the row."""

    def __init__(self, fmt: str, source: str, data: Optional[DataConfig], require_response: bool,
                 where: Callable[[int], str]):
        self.fmt, self.source, self.require_response, self.where = fmt, source, require_response, where
        columns = dict(data.columns) if data and data.columns else {}
        sharegpt = fmt == "sharegpt"
        self.role_key = columns.get("role", "from" if sharegpt else "role")
        self.content_key = columns.get("content", "value" if sharegpt else "content")
        self.roles = {**(SHAREGPT_ROLES if sharegpt else {r: r for r in ROLES}), **(data.roles if data else {})}

    def err(self, i: int, msg: str) -> DataError:
        return DataError(f"{self.where(i)}: {msg}")

    # fields

    def text(self, row: dict, key: str, i: int, required: bool = True) -> str:
        value = row.get(key)
        if value is None and not required:
            return ""
        if not isinstance(value, str) or (required and not value.strip()):
            raise self.err(i, f"field '{key}' must be a non-empty string, got {value!r}")
        return value

    def _json_list(self, value: Any, key: str, i: int) -> Any:
        if isinstance(value, str) and value.lstrip().startswith("["):  # a CSV cell, LLaMA-Factory's tools
            try:
                return json.loads(value)
            except json.JSONDecodeError as e:
                raise self.err(i, f"field '{key}' holds text that is not a valid JSON list ({e.msg})") from None
        return value

    def content(self, value: Any, i: int, j: int) -> Optional[str]:
        """A message's text: a string, or a list of parts whose text parts are joined."""
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list):
            texts = []
            for k, part in enumerate(value):
                if isinstance(part, str):
                    texts.append(part)
                    continue
                kind = part.get("type", "text") if isinstance(part, dict) else type(part).__name__
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise self.err(i, f"message {j} content part {k} is of type '{kind}': only text parts can "
                                      "be trained on (the model reads text only); remove the part or the row")
                texts.append(part["text"])
            return "\n".join(texts)
        raise self.err(i, f"message {j} content must be a string or a list of text parts, got {value!r}")

    def messages(self, value: Any, key: str, i: int) -> list[dict]:
        value = self._json_list(value, key, i)
        if not isinstance(value, list) or not value:
            raise self.err(i, f"'{key}' must be a non-empty list of {{{self.role_key}, {self.content_key}}} objects")
        out = []
        allowed = (self.role_key, self.content_key, *MESSAGE_EXTRAS)
        for j, m in enumerate(value):
            if not isinstance(m, dict):
                raise self.err(i, f"message {j} must be a {{{self.role_key}, {self.content_key}}} object, got {m!r}")
            m = {k: v for k, v in m.items() if v is not None}  # Parquet/Arrow fill absent struct keys with null
            unknown = [k for k in m if k not in allowed]
            if unknown:
                raise self.err(i, f"message {j} has key{'s' if len(unknown) > 1 else ''} "
                                  f"{', '.join(map(repr, unknown))} that would be ignored (allowed: "
                                  f"{', '.join(allowed)}); remove {'them' if len(unknown) > 1 else 'it'} or map it "
                                  "with data.columns")
            name = m.get(self.role_key)
            role = self.roles.get(name) if isinstance(name, str) else None
            if role not in ROLES:
                raise self.err(i, f"message {j} must be {{{self.role_key}: system|user|assistant|tool, "
                                  f"{self.content_key}: str}}, got role {name!r}; map other role names with "
                                  f"data.roles (e.g. data.roles={{{name}: assistant}})")
            msg = {"role": role, "content": self.content(m.get(self.content_key), i, j)}
            if self.fmt == "sharegpt" and name == "function_call" and "tool_calls" not in m:
                msg.update(self._function_call(msg["content"]))
            for k in MESSAGE_EXTRAS:
                if k in m:
                    msg[k] = m[k]
            if msg.get("tool_calls") is not None:
                if role != "assistant" or not isinstance(msg["tool_calls"], list):
                    raise self.err(i, f"message {j}: 'tool_calls' must be a list on an assistant message")
                msg["content"] = msg["content"] or ""
            elif not isinstance(msg["content"], str):
                raise self.err(i, f"message {j} must be {{{self.role_key}: system|user|assistant|tool, "
                                  f"{self.content_key}: str}}, got {value[j]!r}")
            out.append(msg)
        return out

    @staticmethod
    def _function_call(value: Optional[str]) -> dict:
        """ShareGPT's function_call turn (a JSON {name, arguments}) as an assistant tool call."""
        try:
            call = json.loads(value or "")
        except json.JSONDecodeError:
            return {}  # not JSON: kept as the assistant's text
        calls = call if isinstance(call, list) else [call]
        if not calls or not all(isinstance(c, dict) and "name" in c for c in calls):
            return {}
        return {"content": "", "tool_calls": [{"type": "function", "function": {"name": c["name"],
                                                                                 "arguments": c.get("arguments", {})}}
                                              for c in calls]}

    def tools(self, row: dict, i: int) -> Optional[list]:
        value = self._json_list(row.get("tools"), "tools", i)
        if value is None or value == []:
            return None
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            raise self.err(i, f"field 'tools' must be a list of function definitions, got {value!r}")
        return value

    def system(self, row: dict, conv: list[dict], i: int) -> list[dict]:
        system = self.text(row, "system", i, required=False)
        if not system.strip():
            return conv
        if conv and conv[0]["role"] == "system":
            raise self.err(i, "field 'system' and a system message: keep one of them")
        return [{"role": "system", "content": system}] + conv

    # shapes

    def conversation(self, row: dict, i: int) -> tuple[list[dict], int]:
        """(the turns of one row, how many of them are prompt only)."""
        fmt = self.fmt
        if fmt == "prompt_response":
            conv = [{"role": "user", "content": self.text(row, "prompt", i)},
                    {"role": "assistant", "content": self.text(row, "response", i, self.require_response)}]
            return self.system(row, conv, i), 0
        if fmt == "alpaca":
            instruction = self.text(row, "instruction", i)
            extra = self.text(row, "input", i, required=False)
            conv = []
            history = self._json_list(row.get("history"), "history", i) or []
            if not isinstance(history, list):
                raise self.err(i, f"field 'history' must be a list of [instruction, answer] pairs, got {history!r}")
            for k, pair in enumerate(history):
                if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                        or not all(isinstance(t, str) for t in pair)):
                    raise self.err(i, f"field 'history' item {k} must be an [instruction, answer] pair of "
                                      f"strings, got {pair!r}")
                conv += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
            conv += [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction},
                     {"role": "assistant", "content": self.text(row, "output", i, self.require_response)}]
            return self.system(row, conv, i), 0
        if fmt == "text":
            return [], 0
        if fmt == "prompt_completion":
            prompt, completion = row.get("prompt"), row.get("completion")
            head = ([{"role": "user", "content": self.text(row, "prompt", i)}] if not isinstance(prompt, list)
                    else self.messages(prompt, "prompt", i))
            if completion is None and not self.require_response:
                tail = []
            elif isinstance(completion, list):
                tail = self.messages(completion, "completion", i)
                if tail[0]["role"] != "assistant":
                    raise self.err(i, "'completion' must start with an assistant message")
            else:
                tail = [{"role": "assistant", "content": self.text(row, "completion", i, self.require_response)}]
            head = self.system(row, head, i)
            return head + tail, len(head)
        key = "messages" if fmt == "chat" else "conversations"
        return self.system(row, self.messages(row.get(key), key, i), i), 0

    def sample(self, row: dict, i: int) -> Sample:
        if self.fmt == "text":
            return Sample([], self.text(row, "text", i), self.source, i, kind="text")
        conv, context = self.conversation(row, i)
        last = conv[-1]
        if last["role"] == "assistant":
            before = conv[:-1]
            if self.require_response and not last["content"].strip() and not last.get("tool_calls"):
                raise self.err(i, "the final assistant message is empty")
        elif self.require_response:
            raise self.err(i, "the last message must be the assistant's answer")
        else:
            before, last = conv, None
        first_user = next((k for k, m in enumerate(conv) if m["role"] == "user"), None)
        first_answer = next((k for k, m in enumerate(conv) if m["role"] == "assistant"), None)
        if first_user is None or (first_answer is not None and first_answer < first_user):
            raise self.err(i, "the answer must follow a user message")
        for k, m in enumerate(conv):
            if m["role"] == "tool" and (k == 0 or conv[k - 1]["role"] not in ("assistant", "tool")):
                raise self.err(i, f"message {k}: a tool message must follow the assistant's call (or another "
                                  "tool message)")
        final = last if last is not None and set(last) != {"role", "content"} else None
        return Sample(before, last["content"] if last is not None else "", self.source, i,
                      tools=self.tools(row, i) if "tools" in SHAPE_FIELDS[self.fmt] else None,
                      context=min(context, len(before)), final=final)


def parse_rows(columns: list[str], rows: list[tuple[int, dict]], source: str, fmt: str = "auto",
               require_response: bool = True, data: Optional[DataConfig] = None,
               where: Optional[Callable[[int], str]] = None,
               optional_columns: bool = False) -> tuple[str, list[Sample]]:
    """(the shape, Samples) of one file's rows: data.columns applied, the shape detected (or
    `fmt`), a column the shape would drop refused. `where(i)` names row i in errors;
    optional_columns: a mapped column the file lacks is no error (eval sets)."""
    where = where or (lambda i: f"data file '{source}' row {i}")
    renames = _rename_columns(columns, data.columns, source, optional_columns) if data and data.columns else {}
    named = [renames.get(c, c) for c in columns]
    fmt = detect_format(named, source, require_response) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ConfigError(f"config key 'data.format': {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    unused = [c for c in named if c in CONTENT_COLUMNS and c not in SHAPE_FIELDS[fmt]]
    if unused:
        shown = [next((k for k, v in renames.items() if v == c), c) for c in unused]
        raise DataError(f"data file '{source}': column{'s' if len(shown) > 1 else ''} "
                        f"{', '.join(map(repr, shown))} would be ignored by its {fmt} rows (columns "
                        f"{', '.join(SHAPE_FIELDS[fmt])}); remove {'them' if len(shown) > 1 else 'it'}, or set "
                        "data.format / data.columns")
    if data and data.columns:
        for fld, col in data.columns.items():
            if optional_columns and fld not in MESSAGE_KEYS and col not in columns:
                continue
            used = fld in SHAPE_FIELDS[fmt] or (fld in MESSAGE_KEYS and fmt in ("chat", "sharegpt",
                                                                                   "prompt_completion"))
            if not used:
                raise DataError(f"config key 'data.columns.{fld}': not used by the {fmt} rows of data file "
                                f"'{source}'; remove it")
    parser = _Parser(fmt, source, data, require_response, where)
    samples = []
    for i, row in rows:
        if renames:
            row = {renames.get(k, k): v for k, v in row.items()}
        samples.append(parser.sample(row, i))
    return fmt, samples


def row_to_sample(row: dict, fmt: str, source: str, i: int, require_response: bool = True,
                  data: Optional[DataConfig] = None) -> Sample:
    return _Parser(fmt, source, data, require_response, lambda n: f"data file '{source}' row {n}").sample(row, i)


def load_samples(sources: list[str], fmt: "str | DataConfig" = "auto", split: str = "train",
                 max_samples: Optional[int] = None, require_response: bool = True,
                 data: Optional[DataConfig] = None) -> list[Sample]:
    """Read every source into Samples; errors name the file and 1-based row.

    `data` (or a DataConfig in place of `fmt`) brings data.format, data.columns and data.roles."""
    if isinstance(fmt, DataConfig):
        data, fmt = fmt, fmt.format
    if data is not None:
        check_data_config(data)
    samples: list[Sample] = []
    shapes = set()
    for source in sources:
        columns, rows = _read_rows(source, split)
        shape, got = parse_rows(columns, rows, source, fmt, require_response, data)
        shapes.add(shape)
        samples += got
    if data is not None and data.roles and sources and not shapes & {"chat", "sharegpt", "prompt_completion"}:
        raise ConfigError(f"config key 'data.roles': no file of {sources} has messages with roles "
                          f"(they are {', '.join(sorted(shapes))}); remove it")
    if not samples:
        raise DataError(f"data {sources}: no rows found; check the files are not empty")
    return samples[:max_samples] if max_samples else samples


def refuse_text_rows(samples: list[Sample], key: str) -> list[Sample]:
    """Sets whose rows must carry a prompt (the stage-1 harmful sets are also generated from)."""
    for s in samples:
        if s.kind == "text":
            raise DataError(f"config key '{key}': {s.where} is a text row; these rows need a prompt and an "
                            "answer (prompt_response, alpaca, chat, ShareGPT or prompt_completion)")
    return samples


# ---------------------------------------------------------------------------------------------
# rendering


def uses_chat_template(tokenizer, template: str) -> bool:
    has = getattr(tokenizer, "chat_template", None) is not None
    if template == "chat" and not has:
        raise DataError("config key 'data.template': 'chat' but the tokenizer has no chat template; "
                        "use data.template=plain or auto, or name a Jinja file in data.chat_template")
    return template == "chat" or (template == "auto" and has)


def _apply_template(tokenizer, messages: list[dict], tools, generation: bool, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation)
    except Exception as e:  # the template's own raise_exception(), or a role it does not know
        raise DataError(f"{where}: the chat template cannot render this conversation ({type(e).__name__}: "
                        f"{_first_line(e)}); fix the row or use another template (data.chat_template)") from e
    return text if isinstance(text, str) else text[0]


def _plain_segments(messages: list[dict], plain_template: str, where: str) -> list[tuple[str, Optional[int]]]:
    """Without a chat template: (text, the assistant message's index or None for prompt text).
    Each run of user turns is one plain_template block (system turns before it), each answer
    follows its block: the roles stay apart."""
    segments: list[tuple[str, Optional[int]]] = []
    system: list[str] = []
    user: list[str] = []

    def block():
        head = PLAIN_SYSTEM.format(system="\n\n".join(system)) if system else ""
        try:
            body = plain_template.format(prompt="\n\n".join(user)) if user else ""
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"config key 'data.plain_template': {plain_template!r} must hold one {{prompt}} "
                              f"and no other braces (double them: {{{{ }}}}); {type(e).__name__}: {e}") from None
        if head or body:
            segments.append((head + body, None))
        system.clear()
        user.clear()

    for k, m in enumerate(messages):
        if m["role"] == "tool" or m.get("tool_calls"):
            raise DataError(f"{where}: tool messages and tool calls need a chat template (the tokenizer has none "
                            "or data.template=plain); name one in data.chat_template")
        if m["role"] == "system":
            system.append(m["content"])
        elif m["role"] == "user":
            user.append(m["content"])
        else:
            block()
            segments.append((m["content"], k))
    block()
    return segments


def render_prompt(tokenizer, messages: list[dict] | str, template: str = "auto",
                  plain_template: str = DataConfig.plain_template, tools: Optional[list] = None) -> str:
    """The text the model sees before it answers (generation prompt included)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if uses_chat_template(tokenizer, template):
        return _apply_template(tokenizer, messages, tools, True, "prompt")
    eos = tokenizer.eos_token or ""
    return "".join(text + (eos if k is not None else "")
                   for text, k in _plain_segments(messages, plain_template, "prompt"))


# ---------------------------------------------------------------------------------------------
# tokenization and supervision


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"] if text else []


_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _assistant_mask_tokens(tokenizer, sample: Sample, mode: str) -> Optional[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, spans) from the template's own assistant mask, when it marks the answers with
    {% generation %} blocks: one span per assistant turn, in order. None when the template has no
    such blocks, the tokenizer cannot map them to tokens, or the spans do not match the turns."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not _GENERATION_BLOCK.search(template):
        return None
    conv = sample.conversation
    try:
        out = tokenizer.apply_chat_template(conv, tools=sample.tools, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    except Exception:  # a slow tokenizer (no char-to-token map): the rendering below does the job
        return None
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    runs, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    assistant = [k for k, m in enumerate(conv) if m["role"] == "assistant"]
    if len(runs) != len(assistant):  # an empty answer, or blocks that are not one per turn
        return None
    spans = [r for r, k in zip(runs, assistant) if k >= sample.context]
    return ids, spans if mode == "all_assistant" else spans[-1:]


def _chat_tokens(tokenizer, sample: Sample, mode: str) -> tuple[list[int], list[tuple[int, int]], bool]:
    """(ids, [start, end) token span of each supervised assistant turn, fell back).

    A template that marks its answers with {% generation %} blocks gives the spans itself (the
    tokenizer's assistant mask). Otherwise each supervised turn k is located by rendering the
    conversation before it (with the generation prompt) and through it. When every such prefix tokenizes to a prefix of the whole
    conversation's tokens, the spans are those token positions. Otherwise, when the prefixes are
    prefixes of the text, the conversation is tokenized piece by piece at those boundaries (as a
    prompt is tokenized alone at inference). Otherwise the template renders earlier turns
    differently once later ones follow (e.g. it drops their reasoning): only the final answer is
    supervised, after the prompt the template renders for it, and the row counts as fallen back.
    """
    conv, where = sample.conversation, sample.where
    tools = [m["content"].strip() for m in conv if m["role"] == "tool" and m["content"].strip()]
    full = _apply_template(tokenizer, conv, sample.tools, False, where) if tools else None
    if any(t not in full for t in tools):
        raise DataError(f"{where}: the chat template does not render tool messages; use one that does "
                        "(data.chat_template) or remove the tool turns")
    masked = _assistant_mask_tokens(tokenizer, sample, mode)  # renders the conversation itself
    if masked is not None:
        return masked[0], masked[1], False
    if full is None:
        full = _apply_template(tokenizer, conv, sample.tools, False, where)
    seen: dict[str, list[int]] = {}  # the last prefix is the whole conversation: tokenize each text once

    def encode(text: str) -> list[int]:
        if text not in seen:
            seen[text] = _encode(tokenizer, text)
        return seen[text]

    full_ids = encode(full)
    turns = [k for k, m in enumerate(conv) if m["role"] == "assistant" and k >= sample.context]
    if mode != "all_assistant":  # "all" labels every token, but still needs where the answer starts
        turns = turns[-1:]
    bounds = [(_apply_template(tokenizer, conv[:k], sample.tools, True, where),
               _apply_template(tokenizer, conv[:k + 1], sample.tools, False, where)) for k in turns]
    spans = []
    for start, end in bounds:
        s, e = encode(start), encode(end)
        if len(s) > len(e) or full_ids[:len(s)] != s or full_ids[:len(e)] != e:
            break
        spans.append((len(s), len(e)))
    else:
        return full_ids, spans, False
    cuts = sorted({0, len(full), *(len(t) for b in bounds for t in b)})
    if all(full.startswith(t) for b in bounds for t in b) and all(len(s) <= len(e) for s, e in bounds):
        ids, at = [], {}
        for a, b in zip(cuts, cuts[1:]):
            at[a] = len(ids)
            ids += _encode(tokenizer, full[a:b])
        at[len(full)] = len(ids)
        return ids, [(at[len(s)], at[len(e)]) for s, e in bounds], False
    prompt = _apply_template(tokenizer, conv[:-1], sample.tools, True, where)
    answer = full[len(prompt):] if full.startswith(prompt) else sample.response
    ids = _encode(tokenizer, prompt)
    start = len(ids)
    ids += _encode(tokenizer, answer)
    return ids, [(start, len(ids))], len(turns) > 1


def _plain_tokens(tokenizer, sample: Sample, plain_template: str, mode: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Piece by piece: the first piece with the tokenizer's own BOS, each answer followed by EOS."""
    conv = sample.conversation
    eos = tokenizer.eos_token_id
    turns = [k for k, m in enumerate(conv) if m["role"] == "assistant" and k >= sample.context]
    supervised = set(turns if mode == "all_assistant" else turns[-1:])
    ids: list[int] = []
    spans = []
    for text, k in _plain_segments(conv, plain_template, sample.where):
        piece = _encode(tokenizer, text, special=not ids)
        if k is not None and eos is not None and k < len(conv) - 1:
            piece.append(eos)  # the final answer's EOS is added by the caller
        if k in supervised:
            spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
    return ids, spans


def _tokenize(tokenizer, sample: Sample, cfg: DataConfig) -> tuple[dict, bool, bool]:
    """(example, truncated, fell back to the last turn)."""
    mode = cfg.train_on
    eos = tokenizer.eos_token_id
    fell_back = False
    if sample.kind == "text":
        ids = _encode(tokenizer, sample.response, special=True)
        spans = [(0, len(ids))]
    elif uses_chat_template(tokenizer, cfg.template):
        ids, spans, fell_back = _chat_tokens(tokenizer, sample, mode)
    else:
        ids, spans = _plain_tokens(tokenizer, sample, cfg.plain_template, mode)
    if mode == "all":
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for a, b in spans:
            if eos is not None and eos in ids[a:b]:  # what follows the end-of-turn token is never generated
                b = a + max(i for i, t in enumerate(ids[a:b]) if t == eos) + 1
            labels[a:b] = ids[a:b]
    # the final answer ends in EOS (supervised): the model learns to stop
    if eos is not None and (ids[-1:] != [eos] if sample.kind == "text" else eos not in ids[spans[-1][0]:]):
        ids, labels = ids + [eos], labels + [eos]
    truncated = len(ids) > cfg.max_length
    return {"input_ids": ids[: cfg.max_length], "labels": labels[: cfg.max_length]}, truncated, fell_back


def tokenize_sample(tokenizer, sample: Sample, cfg: DataConfig) -> tuple[dict, bool]:
    """input_ids + labels for one sample; returns (example, truncated)."""
    prepare_tokenizer(tokenizer, cfg)
    ex, truncated, _ = _tokenize(tokenizer, sample, cfg)
    return ex, truncated


@dataclass
class TokenizedSet:
    examples: list[dict]
    n_truncated: int
    n_dropped: int  # prompt alone filled max_length: no response token left to learn from
    dropped: list[str] = field(default_factory=list)  # "file row N" of the first dropped rows
    n_last_turn: int = 0  # chat template unstable across prefixes: only the final answer supervised
    cache: str = ""  # how the tokenization cache served these rows ("" when it was not asked)

    def report(self, name: str) -> str:
        n = len(self.examples) + self.n_dropped
        msg = f"{name}: {len(self.examples)} examples"
        if self.n_truncated:
            msg += f", {self.n_truncated} of {n} truncated to data.max_length"
        if self.n_dropped:
            more = f" and {self.n_dropped - len(self.dropped)} more" if self.n_dropped > len(self.dropped) else ""
            msg += (f", {self.n_dropped} dropped (prompt alone exceeds data.max_length: "
                    f"{', '.join(self.dropped)}{more})")
        if self.n_last_turn:
            msg += (f", {self.n_last_turn} supervised on their last assistant turn only (the chat template "
                    "renders earlier turns differently once later ones follow)")
        if self.cache:
            msg += f" ({self.cache})"
        return msg


def tokenize_samples(tokenizer, samples: list[Sample], cfg: DataConfig, cache: bool = False) -> TokenizedSet:
    """Tokenize every sample (in data.num_proc processes). The end of a row longer than
    data.max_length is cut (counted); a row left without a supervised token is dropped (counted
    and named in the report); when every row is dropped, a DataError names the first.

    cache=True (the training sets; data.cache=false turns it off): the result is kept under
    cache_root()/tokenized, keyed by the rows, the tokenizer, the settings that shape tokens and
    this module's code, and read back by later runs and by the other ranks (one builds it under
    a file lock while they wait)."""
    prepare_tokenizer(tokenizer, cfg)
    if not (cache and cfg.cache):
        return _tokenize_set(tokenizer, samples, cfg)
    from dist_secvec.files import atomic_dir, cache_root, file_lock

    key = tokenization_key(tokenizer, samples, cfg)
    entry = cache_root() / "tokenized" / key
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(entry.parent / f"{key}.lock"))
        except OSError as e:
            log.warning("tokenization cache %s cannot be used (%s): tokenizing without it", entry.parent, e)
            return _tokenize_set(tokenizer, samples, cfg)
        if (entry / "meta.json").is_file():
            try:
                return _read_tokenized(entry)
            except Exception as e:  # a damaged entry is rebuilt
                log.warning("tokenization cache entry %s unreadable (%s: %s): tokenizing again", entry,
                            type(e).__name__, _first_line(e))
        t0 = time.perf_counter()
        ts = _tokenize_set(tokenizer, samples, cfg)
        log.info("tokenized %d rows in %.1f s with %d process(es)", len(samples), time.perf_counter() - t0,
                 _num_proc(cfg, len(samples)))
        try:
            with atomic_dir(entry) as tmp:
                _write_tokenized(tmp, ts)
            ts.cache = f"tokenized, kept in the tokenization cache {entry}"
        except UserError as e:
            log.warning("tokenization cache not written: %s", e)
            ts.cache = "tokenized; the tokenization cache could not be written"
        return ts


# settings that choose which rows are read or how they are batched, never a row's tokens
_NOT_TOKEN_SETTINGS = ("train", "eval", "split", "shuffle", "max_samples", "audit", "packing", "cache", "num_proc")
PARALLEL_MIN_ROWS = 4096  # below this, starting processes costs more than they save
MAX_AUTO_PROC = 8


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what decides a tokenizer's ids: its vocabulary, merges, normalizer and
    post-processor (the fast tokenizer's whole JSON), special and added tokens, chat template."""
    state: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()},
        "added": sorted((int(i), str(t)) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state["backend"] = backend.to_str()
    else:
        state["vocab"] = sorted(tokenizer.get_vocab().items())
        state["init"] = {k: repr(v) for k, v in sorted(tokenizer.init_kwargs.items()) if k != "name_or_path"}
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=repr).encode()).hexdigest()


def tokenization_key(tokenizer, samples: list[Sample], cfg: DataConfig) -> str:
    """The cache key of a tokenized set: the rows as read (so a changed file, another subset or
    another data.columns is another key), the tokenizer, every data setting that shapes tokens,
    the libraries' versions and this module's source."""
    import tokenizers
    import transformers

    h = hashlib.sha256()
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_TOKEN_SETTINGS}
    h.update(json.dumps({"settings": settings, "tokenizer": tokenizer_digest(tokenizer),
                         "versions": [transformers.__version__, tokenizers.__version__],
                         "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()},
                        sort_keys=True, default=repr).encode())
    for s in samples:
        h.update(json.dumps([s.messages, s.response, s.source, s.row, s.tools, s.context, s.kind, s.final],
                            sort_keys=True, default=repr, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _num_proc(cfg: DataConfig, n: int) -> int:
    """data.num_proc, or (unset) one process per CPU core this rank may use, up to 8, for large sets."""
    if cfg.num_proc is not None:
        return max(1, min(cfg.num_proc, n))
    if n < PARALLEL_MIN_ROWS:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # the launcher's ranks on this machine
    return max(1, min(MAX_AUTO_PROC, cores // max(ranks_here, 1)))


def _tokenize_batch(batch: dict, tokenizer, cfg: DataConfig) -> dict:
    """datasets.map's function: pickled Samples in, examples and their flags out."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": [], "fell_back": []}
    for blob in batch["sample"]:
        ex, truncated, fell_back = _tokenize(tokenizer, pickle.loads(blob), cfg)
        out["input_ids"].append(ex["input_ids"])
        out["labels"].append(ex["labels"])
        out["truncated"].append(truncated)
        out["fell_back"].append(fell_back)
    return out


def _tokenize_set(tokenizer, samples: list[Sample], cfg: DataConfig) -> TokenizedSet:
    n_proc = _num_proc(cfg, len(samples))
    if n_proc == 1:
        results = (_tokenize(tokenizer, s, cfg) for s in samples)
    else:
        import datasets

        datasets.disable_progress_bars()
        rows = datasets.Dataset.from_dict({"sample": [pickle.dumps(s) for s in samples]})
        done = rows.map(_tokenize_batch, batched=True, batch_size=256, num_proc=n_proc, remove_columns=["sample"],
                        fn_kwargs={"tokenizer": tokenizer, "cfg": cfg}, new_fingerprint="tokenize",
                        load_from_cache_file=False).data.table
        results = zip(({"input_ids": i, "labels": la} for i, la in
                       zip(done.column("input_ids").to_pylist(), done.column("labels").to_pylist())),
                      done.column("truncated").to_pylist(), done.column("fell_back").to_pylist())
    examples, n_trunc, n_drop, dropped, n_last = [], 0, 0, [], 0
    for s, (ex, truncated, fell_back) in zip(samples, results):
        if all(label == IGNORE_INDEX for label in ex["labels"]):
            n_drop += 1
            if len(dropped) < 3:
                dropped.append(f"'{s.source}' row {s.row}")
            continue
        n_trunc += truncated
        n_last += fell_back
        examples.append(ex)
    if not examples:
        first = f" (e.g. {dropped[0]})" if dropped else ""
        raise DataError(f"data: every example was dropped by truncation: each prompt alone fills "
                        f"data.max_length={cfg.max_length} tokens{first}; raise data.max_length or shorten the "
                        "prompts")
    return TokenizedSet(examples, n_trunc, n_drop, dropped, n_last)


def _write_tokenized(out: Path, ts: TokenizedSet) -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"input_ids": [e["input_ids"] for e in ts.examples],
                                "labels": [e["labels"] for e in ts.examples]}).save_to_disk(str(out / "rows"))
    meta = {"examples": len(ts.examples), "n_truncated": ts.n_truncated, "n_dropped": ts.n_dropped,
            "dropped": ts.dropped, "n_last_turn": ts.n_last_turn}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


def _read_tokenized(entry: Path) -> TokenizedSet:
    import datasets

    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    table = datasets.load_from_disk(str(entry / "rows")).data.table
    examples = [{"input_ids": i, "labels": la} for i, la in
                zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist())]
    if len(examples) != meta["examples"]:
        raise ValueError(f"{len(examples)} rows, meta.json says {meta['examples']}")
    return TokenizedSet(examples, meta["n_truncated"], meta["n_dropped"], meta["dropped"], meta["n_last_turn"],
                        cache=f"read from the tokenization cache {entry}, not tokenized")


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding gets attention 0 and label -100."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batches(examples: list[Any], batch_size: int, generator: Optional[torch.Generator] = None,
            shuffle: bool = True, drop_last: bool = False):
    """Index batches over one epoch (deterministic for a given generator state)."""
    order = torch.randperm(len(examples), generator=generator).tolist() if shuffle else list(range(len(examples)))
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        if drop_last and len(chunk) < batch_size:
            break
        yield [examples[j] for j in chunk]


def endless_batches(examples: list[Any], batch_size: int, generator: Optional[torch.Generator] = None,
                    shuffle: bool = True):
    """Batches epoch after epoch, reshuffled each epoch by the (seeded) generator."""
    while True:
        yield from batches(examples, batch_size, generator, shuffle)
