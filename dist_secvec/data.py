"""Supervised data: load rows, normalise their shape, render, tokenize and mask the prompt.

Accepted row shapes (one per file, detected from its columns or forced by `data.format`):
    prompt_response  {"prompt": str, "response": str}
    alpaca           {"instruction": str, "input": str (optional), "output": str}
    chat             {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
For chat rows the loss is on the last assistant message; earlier turns are prompt.
Labels are -100 on prompt and padding tokens when `data.mask_prompt` is set, so the loss is on
the response only. Truncation keeps the prompt and cuts the response; it is counted and reported.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from dist_secvec.config import DataConfig, looks_local, read_utf8
from dist_secvec.errors import DataError

IGNORE_INDEX = -100
FORMATS = ("prompt_response", "alpaca", "chat")
LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Sample:
    """One supervised example: the conversation before the answer, and the answer."""

    messages: list[dict]  # the prompt turns, ending with a user turn
    response: str
    source: str  # file or dataset name, for error messages
    row: int  # 1-based row number in that source

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


# ---------------------------------------------------------------------------------------------
# loading


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _read_rows(source: str, split: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """(columns, [(row number, row)]) from a local file or a hub dataset.

    Row numbers are what a user finds in an editor: the line of a JSONL file, the data line of a
    CSV (header excluded), the index (from 1) of a JSON array or Parquet table. Local files are
    read without `datasets` (no cache written next to them, errors that name the row).
    """
    if looks_local(source):
        path = os.path.expanduser(source)
        if not os.path.exists(path):
            raise DataError(f"data file '{source}' not found: fix the path in the config")
        if os.path.isdir(path):
            raise DataError(f"data file '{source}' is a directory: name the files in it "
                            f"({', '.join(LOADERS)}) in the config")
        ext = os.path.splitext(path)[1].lower()
        if ext not in LOADERS:
            raise DataError(f"data file '{source}': unsupported extension '{ext}' "
                            f"(use one of {', '.join(LOADERS)})")
        if os.path.getsize(path) == 0:
            raise DataError(f"data file '{source}' is empty: add rows or remove it from the config")
        if ext == ".parquet":
            return _read_parquet(path, source)
        text = _read_text(path, source)
        if not text.strip():
            raise DataError(f"data file '{source}' has no rows (only blank lines): add rows or remove it from "
                            "the config")
        if ext == ".csv":
            return _read_csv(text, source)
        if ext == ".json" and text.lstrip().startswith("["):
            return _read_json_array(text, source)
        return _read_jsonl(text, source)
    import datasets

    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(source, split=split)
    except Exception as e:
        raise DataError(f"dataset '{source}': cannot be loaded from the hub ({type(e).__name__}); "
                        "download it and point the config at a local file") from e
    return list(table.column_names), list(enumerate(table, 1))


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
    rows = table.to_pylist()
    if not rows:
        raise DataError(f"data file '{source}' has no rows: add rows or remove it from the config")
    return list(table.column_names), list(enumerate(rows, 1))


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


def detect_format(columns: list[str], source: str) -> str:
    cols = set(columns)
    if "messages" in cols:
        return "chat"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "response"} <= cols:
        return "prompt_response"
    raise DataError(f"data file '{source}': columns {sorted(cols)} match no known row shape; expected "
                    "prompt+response, instruction+input+output (Alpaca) or messages (chat)")


def _text(row: dict, key: str, source: str, i: int, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise DataError(f"data file '{source}' row {i}: field '{key}' must be a non-empty string, got {value!r}")
    return value


def row_to_sample(row: dict, fmt: str, source: str, i: int, require_response: bool = True) -> Sample:
    if fmt == "prompt_response":
        prompt = _text(row, "prompt", source, i)
        return Sample([{"role": "user", "content": prompt}],
                      _text(row, "response", source, i, required=require_response), source, i)
    if fmt == "alpaca":
        instruction = _text(row, "instruction", source, i)
        extra = _text(row, "input", source, i, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Sample([{"role": "user", "content": prompt}],
                      _text(row, "output", source, i, required=require_response), source, i)
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"data file '{source}' row {i}: 'messages' must be a non-empty list of "
                        "{role, content} objects")
    for j, m in enumerate(messages):
        if (not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
                or not isinstance(m.get("content"), str)):
            raise DataError(f"data file '{source}' row {i}: message {j} must be "
                            f"{{role: system|user|assistant, content: str}}, got {m!r}")
    if messages[-1]["role"] == "assistant":
        prompt_turns, response = messages[:-1], messages[-1]["content"]
        if require_response and not response.strip():
            raise DataError(f"data file '{source}' row {i}: the final assistant message is empty")
    elif require_response:
        raise DataError(f"data file '{source}' row {i}: the last message must be the assistant's answer")
    else:
        prompt_turns, response = messages, ""
    if not prompt_turns or prompt_turns[-1]["role"] != "user":
        raise DataError(f"data file '{source}' row {i}: the answer must follow a user message")
    return Sample([dict(role=m["role"], content=m["content"]) for m in prompt_turns], response, source, i)


def load_samples(sources: list[str], fmt: str = "auto", split: str = "train",
                 max_samples: Optional[int] = None, require_response: bool = True) -> list[Sample]:
    """Read every source into Samples; errors name the file and 1-based row."""
    samples: list[Sample] = []
    for source in sources:
        columns, rows = _read_rows(source, split)
        file_fmt = detect_format(columns, source) if fmt == "auto" else fmt
        for i, row in rows:
            samples.append(row_to_sample(row, file_fmt, source, i, require_response))
    if not samples:
        raise DataError(f"data {sources}: no rows found; check the files are not empty")
    return samples[:max_samples] if max_samples else samples


# ---------------------------------------------------------------------------------------------
# rendering and tokenization


def uses_chat_template(tokenizer, template: str) -> bool:
    has = getattr(tokenizer, "chat_template", None) is not None
    if template == "chat" and not has:
        raise DataError("config key 'data.template': 'chat' but the tokenizer has no chat template; "
                        "use data.template=plain or auto")
    return template == "chat" or (template == "auto" and has)


def render_prompt(tokenizer, messages: list[dict] | str, template: str = "auto",
                  plain_template: str = DataConfig.plain_template) -> str:
    """The text the model sees before it answers (generation prompt included)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if uses_chat_template(tokenizer, template):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return plain_template.format(prompt="\n\n".join(m["content"] for m in messages))


def tokenize_sample(tokenizer, sample: Sample, cfg: DataConfig) -> tuple[dict, bool]:
    """input_ids + labels for one sample; returns (example, truncated)."""
    chat = uses_chat_template(tokenizer, cfg.template)
    prompt_text = render_prompt(tokenizer, sample.messages, cfg.template, cfg.plain_template)
    if chat:
        full = tokenizer.apply_chat_template(
            sample.messages + [{"role": "assistant", "content": sample.response}], tokenize=False)
        # the answer's rendering (with the template's end-of-turn marker) is what follows the prompt
        response_text = full[len(prompt_text):] if full.startswith(prompt_text) else sample.response
    else:
        response_text = sample.response
    # a chat template writes its own BOS; a plain template relies on the tokenizer adding it
    prompt_ids = tokenizer(prompt_text, add_special_tokens=not chat)["input_ids"]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not response_ids or response_ids[-1] != eos):
        response_ids = response_ids + [eos]
    truncated = len(prompt_ids) + len(response_ids) > cfg.max_length
    if truncated:
        response_ids = response_ids[: max(cfg.max_length - len(prompt_ids), 0)]
    prompt_labels = [IGNORE_INDEX] * len(prompt_ids) if cfg.mask_prompt else list(prompt_ids)
    ids = (prompt_ids + response_ids)[: cfg.max_length]
    labels = (prompt_labels + response_ids)[: cfg.max_length]
    return {"input_ids": ids, "labels": labels}, truncated


@dataclass
class TokenizedSet:
    examples: list[dict]
    n_truncated: int
    n_dropped: int  # prompt alone filled max_length: no response token left to learn from
    dropped: list[str] = field(default_factory=list)  # "file row N" of the first dropped rows

    def report(self, name: str) -> str:
        n = len(self.examples) + self.n_dropped
        msg = f"{name}: {len(self.examples)} examples"
        if self.n_truncated:
            msg += f", {self.n_truncated} of {n} truncated to data.max_length"
        if self.n_dropped:
            more = f" and {self.n_dropped - len(self.dropped)} more" if self.n_dropped > len(self.dropped) else ""
            msg += (f", {self.n_dropped} dropped (prompt alone exceeds data.max_length: "
                    f"{', '.join(self.dropped)}{more})")
        return msg


def tokenize_samples(tokenizer, samples: list[Sample], cfg: DataConfig) -> TokenizedSet:
    """Tokenize every sample. A response longer than the room left is cut (counted); a row whose
    prompt alone fills data.max_length has nothing left to learn from and is dropped (counted and
    named in the report); when every row is dropped, a DataError names the first."""
    examples, n_trunc, n_drop, dropped = [], 0, 0, []
    for s in samples:
        ex, truncated = tokenize_sample(tokenizer, s, cfg)
        if all(label == IGNORE_INDEX for label in ex["labels"]):
            n_drop += 1
            if len(dropped) < 3:
                dropped.append(f"'{s.source}' row {s.row}")
            continue
        n_trunc += truncated
        examples.append(ex)
    if not examples:
        first = f" (e.g. {dropped[0]})" if dropped else ""
        raise DataError(f"data: every example was dropped by truncation: each prompt alone fills "
                        f"data.max_length={cfg.max_length} tokens{first}; raise data.max_length or shorten the "
                        "prompts")
    return TokenizedSet(examples, n_trunc, n_drop, dropped)


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
