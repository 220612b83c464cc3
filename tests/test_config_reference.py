"""docs/configuration.md: generated from dist_secvec/config.py, complete, and never stale."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from pathlib import Path

import pytest

from dist_secvec import config
from dist_secvec.config_reference import COMMAND, NO_DESCRIPTION, md_escape, reference_markdown, rows

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _sections(cls: type = config.Config, prefix: str = "") -> list[tuple[str, type]]:
    """(key prefix, dataclass) for Config and every nested section."""
    hints = typing.get_type_hints(cls)
    out = [(prefix, cls)]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _sections(hints[f.name], f"{prefix}{f.name}.")
    return out


def _row(markdown: str, key: str) -> str:
    found = [line for line in markdown.splitlines() if line.startswith(f"| `{key}` |")]
    assert len(found) == 1, f"{key}: {len(found)} rows"
    return found[0]


def _run_config_part(markdown: str) -> str:
    return markdown.split("## Experiment files")[0]


def test_every_field_has_one_row():
    md = _run_config_part(reference_markdown())
    keys = _leaf_keys(config.Config)
    assert len(keys) > 50
    for key in keys:
        _row(md, key)
    table = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(table) == len(keys)
    assert [r.key for r in rows()] == keys


def test_comments_appear_on_their_rows():
    """Read independently of the generator (line by line): a field's trailing comment, and the
    comment lines directly above it, are in that field's row."""
    md = _run_config_part(reference_markdown())
    checked = 0
    for prefix, cls in _sections():
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])}
        source = textwrap.dedent("".join(inspect.getsourcelines(cls)[0]))
        lines = source.splitlines()
        comments = {}  # line number -> (text, whole line)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = (tok.string.lstrip("#").strip(), not tok.line[: tok.start[1]].strip())
        for n, line in enumerate(lines, 1):
            name = line.strip().split(":", 1)[0]
            if line.startswith("    ") and not line.startswith("     ") and name in names:
                expected = []
                above = n - 1
                while above in comments and comments[above][1]:
                    expected.insert(0, comments[above][0])
                    above -= 1
                if n in comments and not comments[n][1]:
                    expected.append(comments[n][0])
                row = _row(md, prefix + name)
                for text in expected:
                    assert md_escape(text) in row, (prefix + name, text)
                    checked += 1
                if not expected:
                    assert NO_DESCRIPTION in row
    assert checked > 50
    assert "local model directory or hub id" in _row(md, "model.path")
    # a comment block above a field joins into one description
    assert "rows the vector explains train with it on" in _row(md, "security_vector.gate")


def test_defaults_and_choices():
    md = reference_markdown()
    assert "| `16.0` |" in _row(md, "security_vector.alpha")
    assert "| `null` |" in _row(md, "security_vector.path")
    assert "| `true` |" in _row(md, "security_vector.gate")
    assert "`warn` \\| `stop` \\| `none`" in _row(md, "monitor.rule")


def test_docs_configuration_md_is_current():
    assert DOC.is_file(), f"docs/configuration.md is missing: run `{COMMAND}`"
    assert DOC.read_text(encoding="utf-8") == reference_markdown(), (
        f"docs/configuration.md is stale: regenerate it with `{COMMAND}`")


FAKE = '''
from __future__ import annotations
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Inner:
    described: int = 1  # has a comment
    # the comment lines above
    # a field
    above: Optional[str] = None
    bare: float = 2.5


@dataclass
class Root:
    inner: Inner = field(default_factory=Inner)
    names: list[str] = field(default_factory=lambda: ["a", "b"])

    top: bool = False
'''


@pytest.fixture
def fake_root(tmp_path):
    path = tmp_path / "fake_config_for_reference.py"
    path.write_text(FAKE)
    spec = importlib.util.spec_from_file_location("fake_config_for_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module.Root
    finally:
        del sys.modules[spec.name]


def test_a_field_without_a_comment_is_marked(fake_root):
    """A field with no comment is not an error: its row says NO_DESCRIPTION (visible in the docs)."""
    md = reference_markdown(fake_root)
    assert "has a comment" in _row(md, "inner.described")
    assert "the comment lines above a field" in _row(md, "inner.above")
    assert NO_DESCRIPTION in _row(md, "inner.bare")
    assert "| `2.5` |" in _row(md, "inner.bare")
    assert NO_DESCRIPTION in _row(md, "names")
    assert "| `[a, b]` |" in _row(md, "names")
    assert NO_DESCRIPTION in _row(md, "top")  # a blank line separates it from anything above
    assert NO_DESCRIPTION not in _row(md, "inner.described")


def test_experiment_keys_have_rows_with_their_comments():
    """Every key an experiment file takes (experiment.Experiment, nested sections walked) has one
    row in the experiment section, described."""
    from dist_secvec.experiment import Experiment

    part = reference_markdown().split("## Experiment files")[1]
    keys = [k for k in _leaf_keys(Experiment) if k != "source"]
    for key in keys:
        row = _row(part, key)
        assert NO_DESCRIPTION not in row, row
    assert "smollm2" in _row(part, "world") and "harmful rows hidden" in _row(part, "sweep.n_harmful_ft")
