"""The config reference, docs/configuration.md, generated from the dataclasses in dist_secvec.config.

    python -m dist_secvec.config_reference > docs/configuration.md

Every key of `Config` (nested sections walked recursively, keys written as `section.key`) becomes
one table row: its type (or its allowed values, from `config.CHOICES`), its default and its
description. The description is the comment on the field's own line, after the comment lines
directly above it (no blank line between), read from the source with `tokenize` and `ast`. A field
with neither is marked NO_DESCRIPTION, so a missing comment shows in the docs instead of failing
the build. tests/test_config_reference.py checks that docs/configuration.md equals this output.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
import typing
from typing import Any, Iterator, Optional

import yaml

NO_DESCRIPTION = "(no description)"
COMMAND = "python -m dist_secvec.config_reference > docs/configuration.md"

HEADER = f"""\
# Configuration reference

Generated from the dataclasses in `dist_secvec/config.py` by `{COMMAND}`.
Do not edit by hand: change the comments in config.py and regenerate.

Every command reads one configuration: a YAML recipe (`--config FILE`, see `configs/`) and any
number of overrides on the command line, written `section.key=value`
(`optim.lr=1e-4 data.train=[a.jsonl,b.jsonl] security_vector.path=null`). A wrong key or value
ends the command with one line naming the key and what is allowed (exit code 2) before any model
is loaded. `null` means unset; where a description says what unset means, that is the default.
"""


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its description} for one dataclass, from the comments in its source: the
    comment lines directly above the field, then the comment on the field's own line(s). A field
    without either maps to ""."""
    lines, _ = inspect.getsourcelines(cls)
    source = textwrap.dedent("".join(lines))
    alone: dict[int, str] = {}  # line -> text of a comment that is the whole line
    trailing: dict[int, str] = {}  # line -> text of a comment after code
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            line, col = tok.start
            (alone if not tok.line[:col].strip() else trailing)[line] = text
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))
    out: dict[str, str] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above = []
        line = stmt.lineno - 1
        while line in alone:
            above.insert(0, alone[line])
            line -= 1
        own = [trailing[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in trailing]
        out[stmt.target.id] = " ".join(t for t in above + own if t)
    return out


@dataclasses.dataclass
class Row:
    key: str
    type: str
    default: str
    description: str


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _type_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        text = " or ".join(_type_text(a) for a in args)
        return f"{text} or null" if len(args) < len(typing.get_args(tp)) else text
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"list of {_type_text(item)}"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _yaml_text(value: Any) -> str:
    """A default as one would write it in YAML."""
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        try:
            plain = value != "" and "\n" not in value and yaml.safe_load(value) == value
        except yaml.YAMLError:
            plain = False
        return value if plain else json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml_text(k)}: {_yaml_text(v)}" for k, v in value.items()) + "}"
    return repr(value)


def rows(root: Optional[type] = None) -> Iterator[Row]:
    """Every leaf field of the dataclass `root` (default: config.Config), depth first, in source
    order; allowed values from config.CHOICES when root is Config."""
    from dist_secvec import config

    if root is None or root is config.Config:
        return _rows(config.Config, "", config.CHOICES)
    return _rows(root, "", {})


def _rows(cls: type, prefix: str, choices: dict) -> Iterator[Row]:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _rows(tp, f"{key}.", choices)
            continue
        allowed = choices.get(key)
        type_text = " \\| ".join(f"`{c}`" for c in allowed) if allowed else _type_text(tp)
        yield Row(key, type_text, _yaml_text(_default(f)), comments.get(f.name) or NO_DESCRIPTION)


def md_escape(text: str) -> str:
    """Text for a markdown table cell: `|` escaped everywhere (GFM tables need it inside code spans
    too), `*` and `<` escaped outside code spans."""
    parts = text.split("`")
    for i, part in enumerate(parts):
        part = part.replace("|", "\\|")
        if i % 2 == 0:  # outside a code span
            part = part.replace("*", "\\*").replace("<", "&lt;")
        parts[i] = part
    return "`".join(parts)


def _code(text: str) -> str:
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _stage_defaults() -> str:
    """A sentence on what unset optim keys become in each stage (config.STAGE_OPTIM_DEFAULTS)."""
    from dist_secvec import config

    per_stage = "; ".join(f"`{stage}`: " + ", ".join(f"`optim.{k}={_yaml_text(v)}`" for k, v in values.items())
                          for stage, values in config.STAGE_OPTIM_DEFAULTS.items())
    return (f"Stage defaults: where these `optim` keys are unset (`null`), the stage fills them in when it "
            f"starts and saves them in the run's `config.yaml`: {per_stage}.\n")


def reference_markdown(root: Optional[type] = None) -> str:
    """The whole of docs/configuration.md: the header and one table row per config key."""
    lines = [HEADER]
    if root is None:
        lines.append(_stage_defaults())
    lines += _table(rows(root))
    if root is None:
        lines += ["", EXPERIMENT_HEADER] + _table(experiment_rows())
    return "\n".join(lines) + "\n"


EXPERIMENT_HEADER = """\
## Experiment files (`dist-secvec experiment --config FILE`)

An experiment file (see `configs/experiments/` and docs/experiments.md) has its own top-level
keys; `base`, `stages.*` and the variants under `sweep.finetune` / `sweep.train_sv` hold run-config
keys from the table above. Overrides on the command line work the same way (`sweep.seeds=[0]`).
"""
EXPERIMENT_INTERNAL = {"source"}  # set by the loader, not a key a file writes


def experiment_rows() -> list[Row]:
    from dist_secvec.experiment import Experiment

    return [r for r in _rows(Experiment, "", {}) if r.key not in EXPERIMENT_INTERNAL]


def _table(rows_: Iterator[Row] | list[Row]) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for r in rows_:
        lines.append(f"| `{r.key}` | {r.type} | {_code(r.default)} | {md_escape(r.description)} |")
    return lines


def undescribed(root: Optional[type] = None) -> list[str]:
    """The keys whose field has no comment in the source."""
    keys = [r.key for r in rows(root) if r.description == NO_DESCRIPTION]
    if root is None:
        keys += [f"experiment {r.key}" for r in experiment_rows() if r.description == NO_DESCRIPTION]
    return keys


def main() -> int:
    sys.stdout.write(reference_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
