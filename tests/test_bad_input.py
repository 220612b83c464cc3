"""The bad-input suite: for every user-facing input, the malformed cases a user really
produces, each run through the real CLI (or launch script) in a subprocess. Every case must:

- exit with code 2 (a user error),
- print exactly ONE line on stderr (no traceback, no log noise) that names the file, key or row and
  says what to do,
- leave every pre-existing file under its inputs and its output dir byte-identical (sha256 before
  and after) and create nothing new there.

Each case builds its inputs in its own directory from one tiny model and one tiny security vector
made once for the module. The subprocesses of all selected cases run side by side (a few at a
time) in one module fixture; each parametrised test then checks its own case. Most cases fail in
validation or in the CLI's preflight (model directory and vector files are checked before
anything is loaded); data cases pay for loading the tokenizer.

Also here: an internal error is exit 1 with one line and `--debug` shows the traceback, and an
atomic save that fails keeps the previous directory.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

from conftest import tree_digest, write_random_vector

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
WORKERS = 3  # subprocesses at a time (most of their time is imports, on a 2-core machine)

GOOD_ROWS = [{"prompt": "what is 1 plus 2", "response": "3 ."}, {"prompt": "what is 2 plus 2", "response": "4 ."}]


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# ---------------------------------------------------------------------------------------------
# the shared tiny world: a model, a sealed vector, vectors for other bases


@dataclass
class Env:
    model: Path  # tiny Llama + tokenizer, safetensors (read-only)
    train: Path  # a good JSONL training file (read-only)
    vector: Path  # a security vector for `model`, with file hashes in secvec.json (read-only)
    other_weights_vector: Path  # same shapes, other base weights
    other_hidden_vector: Path  # another hidden size
    shared: list = field(default_factory=list)  # read-only inputs every case must leave unchanged


@pytest.fixture(scope="module")
def env(tiny_world, random_vector, tmp_path_factory) -> Env:
    from transformers import AutoTokenizer

    from dist_secvec.worlds.embedded import build_tiny_llama
    from dist_secvec.secvec import record_file_hashes

    root = tmp_path_factory.mktemp("bad_input_env")
    vector = root / "sv"
    shutil.copytree(random_vector, vector)
    record_file_hashes(vector)
    tok = AutoTokenizer.from_pretrained(str(tiny_world.model_dir))
    other = {}
    for name, seed, hidden in (("weights", 123, 32), ("hidden", 0, 48)):
        build_tiny_llama(tok, root / f"base_{name}", seed=seed, hidden=hidden, layers=2)
        other[name] = write_random_vector(root / f"base_{name}", root / f"sv_{name}")
        record_file_hashes(other[name])
    train = root / "train.jsonl"
    train.write_text(jsonl(GOOD_ROWS * 4))
    return Env(Path(tiny_world.model_dir), train, vector, other["weights"], other["hidden"],
               shared=[Path(tiny_world.model_dir), vector, train])


# ---------------------------------------------------------------------------------------------
# cases


@dataclass
class Spec:
    argv: list  # after `python -m dist_secvec` (or the script for kind="script")
    must: list  # substrings of the one error line
    kind: str = "cli"  # cli | script | python (argv after `python`)
    code: int = 2
    limit_fsize: Optional[int] = None  # RLIMIT_FSIZE for the child (disk full), SIGXFSZ ignored
    protect: list = field(default_factory=list)  # extra paths that must stay unchanged
    may_create: list = field(default_factory=list)  # files (relative to the case dir) a run may add before it fails


CASES: dict[str, Callable[[Path, Env], Spec]] = {}


def case(name: str):
    def register(fn):
        assert name not in CASES, name
        CASES[name] = fn
        return fn
    return register


def finetune(d: Path, e: Env, *extra: str, train: Optional[Path] = None) -> list:
    return ["finetune", f"model.path={e.model}", f"data.train={train or e.train}", f"output_dir={d / 'out'}",
            "logging.progress=false", "optim.max_steps=1", *extra]


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# ---- YAML config


def yaml_case(name: str, content, must: list):
    @case(f"yaml-{name}")
    def build(d: Path, e: Env) -> Spec:
        cfg = write(d / "run.yaml", content.replace("{model}", str(e.model)) if isinstance(content, str) else content)
        return Spec(["finetune", "--config", str(cfg), f"data.train={e.train}", f"output_dir={d / 'out'}"], must)
    return build


yaml_case("unknown-key", "model:\n  path: {model}\noptim:\n  lrr: 1.0e-4\n", ["'optim.lrr'", "allowed:"])
yaml_case("misspelled-section", "model:\n  path: {model}\noptimizer:\n  lr: 1.0e-4\n", ["'optimizer'", "allowed:"])
yaml_case("wrong-type", "model:\n  path: {model}\noptim:\n  micro_batch_size: big\n",
          ["'optim.micro_batch_size'", "integer"])
yaml_case("list-for-section", "model:\n  - {model}\n", ["'model'", "mapping"])
yaml_case("not-a-mapping", "- model\n- optim\n", ["run.yaml", "top level must be a mapping"])
yaml_case("invalid-yaml", "model:\n  path: x\n  dtype: a: b\n", ["run.yaml", "line 3", "not valid YAML"])
yaml_case("tab-indent", "model:\n\tpath: x\n", ["run.yaml", "not valid YAML"])
yaml_case("empty-file", "", ["run.yaml", "is empty", "leave out --config"])
yaml_case("non-utf8", b"model:\n  path: caf\xe9\n", ["run.yaml", "line 2", "not UTF-8", "re-save"])


@case("yaml-missing-file")
def _(d: Path, e: Env) -> Spec:
    return Spec(["finetune", "--config", str(d / "nope.yaml"), f"output_dir={d / 'out'}"], ["nope.yaml' not found"])


@case("yaml-is-a-directory")
def _(d: Path, e: Env) -> Spec:
    (d / "configs").mkdir()
    return Spec(["finetune", "--config", str(d / "configs"), f"output_dir={d / 'out'}"], ["configs' not found"])


# ---- CLI overrides


@case("override-no-equals")
def _(d: Path, e: Env) -> Spec:
    return Spec(finetune(d, e, "optim.lr"), ["override 'optim.lr'", "key.sub=value"])


@case("override-unknown-key")
def _(d: Path, e: Env) -> Spec:
    return Spec(finetune(d, e, "optim.lrr=1e-4"), ["'optim.lrr'", "allowed:"])


@case("override-unknown-section")
def _(d: Path, e: Env) -> Spec:
    return Spec(finetune(d, e, "optimizer.lr=1e-4"), ["'optimizer'", "allowed:"])


@case("override-wrong-type")
def _(d: Path, e: Env) -> Spec:
    return Spec(finetune(d, e, "optim.max_steps=many"), ["'optim.max_steps'", "integer"])


@case("override-value-for-section")
def _(d: Path, e: Env) -> Spec:
    return Spec(finetune(d, e, "optim=3"), ["'optim'", "mapping"])


@case("override-empty-key")
def _(d: Path, e: Env) -> Spec:
    return Spec(finetune(d, e, "=3"), ["override '=3'", "empty"])


# ---- data files (stage 2's data.train; the tokenizer is loaded before the data)


def data_case(name: str, filename: str, content, must: list, *extra: str):
    @case(f"data-{name}")
    def build(d: Path, e: Env) -> Spec:
        path = d / filename
        if callable(content):
            content(path)
        elif content is not None:
            write(path, content)
        return Spec(finetune(d, e, *extra, train=path), [str(path)] + must)
    return build


def parquet(rows):
    def make(path: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), str(path))
    return make


ROW2_NO_RESPONSE = [GOOD_ROWS[0], {"prompt": "what is 2 plus 2"}]
data_case("missing", "nope.jsonl", None, ["'data.train'", "not found"])
data_case("empty-jsonl", "empty.jsonl", "", ["is empty"])
data_case("non-utf8-jsonl", "latin1.jsonl", jsonl(GOOD_ROWS[:1]).encode() + b'{"prompt": "caf\xe9", "response": "x"}\n',
          ["row 2", "not UTF-8", "re-save"])
data_case("row-missing-field-jsonl", "rows.jsonl", jsonl(ROW2_NO_RESPONSE), ["row 2", "'response'"])
data_case("malformed-json-line", "rows.jsonl", jsonl(GOOD_ROWS[:1]) + '{"prompt": "a", "response": \n',
          ["row 2", "not valid JSON"])
data_case("row-missing-field-csv", "rows.csv", "prompt,response\nwhat is 1 plus 2,3 .\nwhat is 2 plus 2\n",
          ["row 2", "'response'"])
data_case("row-missing-field-json", "rows.json", json.dumps(ROW2_NO_RESPONSE), ["row 2", "'response'"])
data_case("row-missing-field-parquet", "rows.parquet",
          parquet([GOOD_ROWS[0], {"prompt": "what is 2 plus 2", "response": None}]), ["row 2", "'response'"])
# rows longer than data.max_length are truncated (the response is cut, counted and logged: the
# design); a row whose prompt alone fills max_length is dropped and named, and when that is every
# row the run stops instead of training on nothing
data_case("prompt-exceeds-max-length", "long.jsonl",
          jsonl([{"prompt": "what is 1 plus 2 " * 8, "response": "3 ."}] * 3),
          ["every example was dropped", "data.max_length=8", "row 1", "raise data.max_length"], "data.max_length=8")


# more reader cases, in-process (the CLI cases above show a DataError is exit 2 and one line)
READER_CASES = [
    ("datadir", lambda p: p.mkdir(), ["is a directory"]),
    ("blank.jsonl", "\n \n", ["has no rows"]),
    ("rows.jsonl", jsonl(GOOD_ROWS[:1]) + '["a", "b"]\n', ["row 2", "JSON object"]),
    ("rows.csv", "prompt,response\nwhat is 1, plus 2,3 .\n", ["row 1", "quote"]),
    ("header.csv", "prompt,response\n", ["has no rows"]),
    ("rows.json", '[{"prompt": "a", "response": "b"},\n', ["line 2", "not valid JSON"]),
    ("rows.json", '[{"prompt": "a", "response": "b"}, 3]', ["row 2", "JSON object"]),
    ("empty.parquet", "", ["is empty"]),
    ("rows.jsonl", jsonl([{"question": "a", "answer": "b"}]), ["match no known row shape"]),
    ("empty.csv", "", ["is empty"]),
    ("rows.csv", b"prompt,response\nwhat is 1 plus 2,3 .\ncaf\xe9,x\n", ["row 3", "not UTF-8"]),
    ("rows.parquet", b"PAR1 this is not a parquet file", ["cannot be read as parquet"]),
    ("rows.parquet", parquet([{"question": "a"}]), ["match no known row shape"]),
    ("rows.jsonl", jsonl([{"messages": [{"role": "user", "content": "a"}]}]), ["row 1", "assistant"]),
]


@pytest.mark.parametrize("filename, content, must", READER_CASES,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(READER_CASES)])
def test_data_reader_errors_name_file_and_row(tmp_path, filename, content, must):
    from dist_secvec.data import load_samples
    from dist_secvec.errors import DataError

    path = tmp_path / filename
    content(path) if callable(content) else write(path, content)
    with pytest.raises(DataError) as e:
        load_samples([str(path)])
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and all(m in msg for m in must), msg


def test_long_rows_truncated_or_dropped_and_named(env, tmp_path):
    """The design: a response that does not fit is cut (counted); a row whose prompt alone fills
    data.max_length is dropped, counted and named in the logged report, the rest trains."""
    from transformers import AutoTokenizer

    from dist_secvec.config import DataConfig
    from dist_secvec.data import load_samples, tokenize_samples

    path = write(tmp_path / "mixed.jsonl", jsonl([GOOD_ROWS[0], {"prompt": "what is 1 plus 2 " * 8, "response": "3 ."},
                                                  {"prompt": "what is 2 plus 2", "response": "4 . " * 20}]))
    ts = tokenize_samples(AutoTokenizer.from_pretrained(str(env.model)), load_samples([str(path)]),
                          DataConfig(max_length=16))
    assert (len(ts.examples), ts.n_truncated, ts.n_dropped) == (2, 1, 1)
    report = ts.report("train data")
    assert "1 of 3 truncated" in report and f"1 dropped (prompt alone exceeds data.max_length: '{path}' row 2)" in report


def test_good_rows_in_every_format_load(tmp_path):
    """The readers behind the error cases still read good files (UTF-8 BOM, CRLF, U+2028 in a string)."""
    from dist_secvec.data import load_samples

    rows = GOOD_ROWS + [{"prompt": "line\u2028sep", "response": "ok"}]
    write(tmp_path / "a.jsonl", "\ufeff" + jsonl(rows).replace("\n", "\r\n"))
    write(tmp_path / "a.json", json.dumps(rows))
    write(tmp_path / "a.csv", "prompt,response\r\n" + "".join(f'"{r["prompt"]}",{r["response"]}\r\n' for r in rows))
    parquet(rows)(tmp_path / "a.parquet")
    for ext in ("jsonl", "json", "csv", "parquet"):
        got = load_samples([str(tmp_path / f"a.{ext}")])
        assert [(s.prompt, s.response, s.row) for s in got] == [(r["prompt"], r["response"], i)
                                                                 for i, r in enumerate(rows, 1)], ext


# ---- model directory


def model_case(name: str, make: Callable[[Path, Path], None], must: list):
    @case(f"model-{name}")
    def build(d: Path, e: Env) -> Spec:
        m = d / "model"
        make(m, e.model)
        return Spec(finetune(d, e, f"model.path={m}"), ["'model.path'", str(m)] + must)
    return build


def copy_model(dst: Path, src: Path, drop=(), **replace) -> None:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    for name, fn in replace.items():
        name = name.replace("__", ".")
        (dst / name).write_bytes(fn((dst / name).read_bytes()))


def to_pickle(dst: Path, src: Path) -> None:
    import torch
    from safetensors.torch import load_file

    copy_model(dst, src, drop=["model.safetensors"])
    torch.save(load_file(str(src / "model.safetensors")), str(dst / "pytorch_model.bin"))


model_case("missing", lambda m, src: None, ["not found"])
model_case("empty-dir", lambda m, src: m.mkdir(), ["is empty"])
model_case("tokenizer-only", lambda m, src: copy_model(m, src, drop=["config.json", "model.safetensors"]),
           ["no config.json"])
model_case("config-without-weights", lambda m, src: copy_model(m, src, drop=["model.safetensors"]),
           ["no weights", "model.safetensors"])
model_case("truncated-safetensors", lambda m, src: copy_model(m, src, model__safetensors=lambda b: b[: len(b) // 2]),
           ["model.safetensors' is corrupted", "truncated"])
model_case("garbage-safetensors", lambda m, src: copy_model(m, src, model__safetensors=lambda b: b"\x00" * 5),
           ["model.safetensors' is corrupted"])
model_case("pickle-weights", to_pickle, ["pytorch_model.bin", "pickle", "safetensors"])
model_case("broken-config-json", lambda m, src: copy_model(m, src, config__json=lambda b: b[:-3]),
           ["config.json' is not valid JSON"])


# ---- security vector (stage 2's security_vector.path)


def vector_case(name: str, make: Callable[[Path, Env], Path], must: list):
    @case(f"vector-{name}")
    def build(d: Path, e: Env) -> Spec:
        v = make(d, e)
        return Spec(finetune(d, e, f"security_vector.path={v}"), must)
    return build


def vector_copy(d: Path, e: Env, edit: Optional[Callable[[Path], None]] = None) -> Path:
    v = d / "sv"
    shutil.copytree(e.vector, v)
    if edit:
        edit(v)
    return v


def edit_json(name: str, **changes):
    def edit(v: Path):
        obj = json.loads((v / name).read_text())
        obj.update(changes)
        (v / name).write_text(json.dumps(obj))
    return edit


def edit_bytes(fn):
    def edit(v: Path):
        f = v / "adapter_model.safetensors"
        f.write_bytes(fn(f.read_bytes()))
    return edit


def to_pickle_adapter(v: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(v / "adapter_model.safetensors")), str(v / "adapter_model.bin"))
    (v / "adapter_model.safetensors").unlink()


def to_pickle_adapter_from(src: Path, dst: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(src / "adapter_model.safetensors")), str(dst / "adapter_model.bin"))


def flip_last_byte(b: bytes) -> bytes:
    return b[:-1] + bytes([b[-1] ^ 0x01])


vector_case("missing", lambda d, e: d / "nope", ["'security_vector.path'", "not found", "train-sv"])
vector_case("other-base-weights", lambda d, e: e.other_weights_vector,
            ["another base model", "weights_sha256", "train-sv"])
vector_case("other-base-hidden-size", lambda d, e: e.other_hidden_vector,
            ["another base model", "hidden_size: vector has 48, model has 32"])
vector_case("rank-differs-from-files", lambda d, e: vector_copy(d, e, edit_json("adapter_config.json", r=8)),
            ["says rank r=8", "holds rank 4", "re-copy"])
vector_case("target-modules-differ-from-files",
            lambda d, e: vector_copy(d, e, edit_json("adapter_config.json", target_modules=["q_proj", "k_proj"])),
            ["holds weights for 'down_proj'", "target_modules", "re-copy"])
vector_case("metadata-differs-from-files",
            lambda d, e: vector_copy(d, e, edit_json("secvec.json", rank=16, target_modules=["q_proj"])),
            ["secvec.json says rank 16", "adapter_config.json says r=4"])
vector_case("truncated-safetensors", lambda d, e: vector_copy(d, e, edit_bytes(lambda b: b[: len(b) // 2])),
            ["adapter_model.safetensors is corrupted or truncated"])
vector_case("pickle-adapter", lambda d, e: vector_copy(d, e, to_pickle_adapter),
            ["adapter_model.bin is a pickle", "only safetensors"])
vector_case("tampered-one-byte", lambda d, e: vector_copy(d, e, edit_bytes(flip_last_byte)),
            ["adapter_model.safetensors does not match the sha256", "tampered", "re-train"])
vector_case("no-fingerprint", lambda d, e: vector_copy(d, e, edit_json("secvec.json", base_fingerprint=None)),
            ["no base_fingerprint", "train-sv"])
vector_case("not-a-vector-dir", lambda d, e: e.model, ["adapter_model.safetensors is missing"])


def wide_vectors(*ranks: int):
    """A case's vectors of these ranks for the env's model, with file hashes."""
    def make(d: Path, e: Env) -> list[Path]:
        from dist_secvec.secvec import record_file_hashes

        out = []
        for i, r in enumerate(ranks):
            v = write_random_vector(e.model, d / f"sv{i}", seed=i, rank=r, alpha=float(r), targets=("q_proj",))
            record_file_hashes(v)
            out.append(v)
        return out
    return make


@case("vector-rank-above-triton-kernel")
def _(d: Path, e: Env) -> Spec:
    (v,) = wide_vectors(130)(d, e)
    return Spec(finetune(d, e, f"security_vector.path={v}", "security_vector.backend=triton"),
                ["'security_vector.path'", "rank 130", "security_vector.backend=torch"])


@case("vector-summed-rank-above-triton-kernel")
def _(d: Path, e: Env) -> Spec:
    a, b = wide_vectors(70, 70)(d, e)
    return Spec(finetune(d, e, f"security_vector.path=[{a},{b}]", "security_vector.backend=triton"),
                ["'security_vector.path'", "sum to 140", "fewer or smaller vectors"])


# security_vector.rank / target_modules set by the user but not the vector's: stage 2 takes both
# from the vector's files when they are unset (None), and refuses a vector of another shape when set
VECTOR_SHAPE_CASES = {
    "rank": (["security_vector.rank=8"], ["'security_vector.rank'", "the config says 8", "has rank 4",
                                          "set security_vector.rank=4 or remove the key"]),
    "target-modules": (["security_vector.target_modules=[q_proj,k_proj]"],
                       ["'security_vector.target_modules'", "the config says [k_proj,q_proj]",
                        "targets [down_proj,q_proj,v_proj]",
                        "set security_vector.target_modules=[down_proj,q_proj,v_proj] or remove the key"]),
    "target-modules-subset": (["security_vector.target_modules=[q_proj,v_proj]", "security_vector.rank=4"],
                              ["'security_vector.target_modules'", "targets [down_proj,q_proj,v_proj]"]),
}
for _name, (_extra, _must) in VECTOR_SHAPE_CASES.items():
    @case(f"vector-config-{_name}-differs")
    def _(d: Path, e: Env, _extra=_extra, _must=_must) -> Spec:
        return Spec(finetune(d, e, f"security_vector.path={e.vector}", *_extra), [str(e.vector)] + _must)


# ---- output dir that already holds a finished run; export into a non-empty dir


@case("output-finished-finetune")
def _(d: Path, e: Env) -> Spec:
    write(d / "out" / "final" / "dist_secvec_run.json", '{"steps": 10}\n')
    write(d / "out" / "train_log.jsonl", '{"step": 10, "loss": 0.5}\n')
    return Spec(finetune(d, e), ["'output_dir'", "already holds a finished finetune run", "new output_dir"])


@case("output-finished-train-sv")
def _(d: Path, e: Env) -> Spec:
    write(d / "out" / "secvec" / "secvec.json", "{}\n")
    return Spec(["train-sv", f"model.path={e.model}", f"security_vector.harmful_data={e.train}",
                 "security_vector.kl_weight=0", f"output_dir={d / 'out'}"],
                ["'output_dir'", "already holds a finished train-sv run"])


@case("output-export-not-empty")
def _(d: Path, e: Env) -> Spec:
    write(d / "out" / "config.json", "{}\n")
    return Spec(["export", f"export.checkpoint={e.model}", f"output_dir={d / 'out'}"],
                ["'output_dir'", "not empty", "new directory"])


@case("output-finished-eval")
def _(d: Path, e: Env) -> Spec:
    write(d / "out" / "responses.jsonl", jsonl([{"prompt": "p", "response": "r", "harmful": {"refusal": True}}]))
    write(d / "out" / "summary.json", '{"judges": {}}\n')
    return Spec(["eval", f"eval.responses={e.train}", f"output_dir={d / 'out'}"],
                ["'output_dir'", "already holds a finished eval run (summary.json)", "new output_dir"])


# output_dir naming a file (or under one): refused by every command that writes one, before any load
OUTPUT_IS_FILE = {
    "finetune": lambda d, e, out: finetune(d, e, f"output_dir={out}"),
    "train-sv": lambda d, e, out: ["train-sv", f"model.path={e.model}", f"security_vector.harmful_data={e.train}",
                                   "security_vector.kl_weight=0", f"output_dir={out}"],
    "eval": lambda d, e, out: ["eval", f"model.path={e.model}", f"eval.harmful_prompts={e.train}", f"output_dir={out}"],
    "eval-judge-only": lambda d, e, out: ["eval", f"eval.responses={e.train}", f"output_dir={out}"],
    "export": lambda d, e, out: ["export", f"export.checkpoint={e.model}", f"output_dir={out}"],
    "demo": lambda d, e, out: ["demo", "--quick", f"output_dir={out}"],
    "profile": lambda d, e, out: ["profile", f"output_dir={out}"],
}
for _name, _argv in OUTPUT_IS_FILE.items():
    @case(f"output-is-a-file-{_name}")
    def _(d: Path, e: Env, _argv=_argv) -> Spec:
        out = write(d / "results", "a file where the output dir should be\n")
        return Spec(_argv(d, e, out), ["'output_dir'", f"'{out}' is a file", "directory"])


@case("output-under-a-file")
def _(d: Path, e: Env) -> Spec:
    parent = write(d / "runs", "a file\n")
    return Spec(finetune(d, e, f"output_dir={parent / 'ft'}"),
                ["'output_dir'", f"'{parent / 'ft'}' is under '{parent}', which is a file"])


# ---- checkpoint.resume: checked before the model loads


def fake_checkpoint(parent: Path) -> Path:
    """parent/step_00000002 with a checkpoint's layout (trainer state, a weights file, the
    manifest), not loadable: the preflight checks layout and sizes only."""
    from dist_secvec.manifest import write_manifest

    ck = parent / "step_00000002"
    write(ck / "trainer_state.json", '{"step": 2}\n')
    write(ck / "trainable.safetensors", b"\0" * 64)
    write_manifest(ck)
    return ck


@case("resume-missing-dir")
def _(d: Path, e: Env) -> Spec:
    return Spec(finetune(d, e, f"checkpoint.resume={d / 'nope'}"),
                ["'checkpoint.resume'", str(d / "nope"), "not found", "latest"])


@case("resume-not-a-checkpoint")
def _(d: Path, e: Env) -> Spec:
    return Spec(finetune(d, e, f"checkpoint.resume={e.model}"),
                ["'checkpoint.resume'", str(e.model), "is not a checkpoint", "step_NNNNNNNN", "latest"])


@case("resume-run-dir")
def _(d: Path, e: Env) -> Spec:
    run = d / "kept"
    fake_checkpoint(run / "checkpoints")
    return Spec(finetune(d, e, f"checkpoint.resume={run}"),
                ["'checkpoint.resume'", "is not a checkpoint", f"output_dir={run} checkpoint.resume=latest"])


@case("resume-truncated-file")
def _(d: Path, e: Env) -> Spec:
    ck = fake_checkpoint(d / "kept")
    (ck / "trainable.safetensors").write_bytes(b"\0" * 10)
    return Spec(finetune(d, e, f"checkpoint.resume={ck}"),
                ["checkpoint", str(ck), "'trainable.safetensors' is corrupted", "earlier checkpoint"])


@case("resume-latest-without-manifest")
def _(d: Path, e: Env) -> Spec:
    ck = fake_checkpoint(d / "out" / "checkpoints")
    (ck / "manifest.json").unlink()
    return Spec(finetune(d, e, "checkpoint.resume=latest"),
                ["checkpoint", str(ck), "no manifest.json", "not completely written"])


# ---- train-sv: DeepSpeed only with deepspeed.zero_stage or deepspeed.config; other keys alone are refused


@case("train-sv-deepspeed-keys")
def _(d: Path, e: Env) -> Spec:
    return Spec(["train-sv", f"model.path={e.model}", f"security_vector.harmful_data={e.train}",
                 "security_vector.kl_weight=0", "deepspeed.offload_optimizer=true", "deepspeed.offload_param=true",
                 f"output_dir={d / 'out'}"],
                ["'deepspeed.offload_optimizer', 'deepspeed.offload_param'", "without DeepSpeed unless",
                 "deepspeed.zero_stage", "remove them"])


@case("export-pickle-model")
def _(d: Path, e: Env) -> Spec:
    to_pickle(d / "final", e.model)
    return Spec(["export", f"export.checkpoint={d / 'final'}", f"output_dir={d / 'out'}"],
                ["'export.checkpoint'", "pytorch_model.bin", "pickle", "only safetensors"])


@case("export-pickle-adapter")
def _(d: Path, e: Env) -> Spec:
    final = d / "run" / "final"  # the run directory is given: final/ is found inside it
    final.mkdir(parents=True)
    shutil.copy(e.vector / "adapter_config.json", final)
    to_pickle_adapter_from(e.vector, final)
    return Spec(["export", f"export.checkpoint={d / 'run'}", f"output_dir={d / 'out'}", f"model.path={e.model}"],
                ["'export.checkpoint'", "adapter_model.bin", "pickle", "safe_serialization=True"])


@case("export-truncated-model")
def _(d: Path, e: Env) -> Spec:
    copy_model(d / "final", e.model, model__safetensors=lambda b: b[:-100])
    return Spec(["export", f"export.checkpoint={d / 'final'}", f"output_dir={d / 'out'}"],
                ["'export.checkpoint'", "model.safetensors' is corrupted", "truncated"])


# ---- the disk fills up during a save


@case("disk-full-export")
def _(d: Path, e: Env) -> Spec:
    """The model file (~100 kB) exceeds a 20 kB file-size limit: writes fail with EFBIG."""
    prev = d / "exports" / "prev"
    shutil.copytree(e.model, prev)  # an earlier export next to the new one
    return Spec(["export", f"export.checkpoint={e.model}", f"output_dir={d / 'exports' / 'new'}",
                 "export.dtype=float32", "logging.progress=false"],
                ["cannot save", str(d / "exports" / "new"), "disk is full or the file is too large",
                 "nothing was written"], limit_fsize=20_000)


# stage 2 and stage 1 through the CLI: the run trains, then its save hits the limit. What the run
# wrote before (config.yaml, its log) may stay; no final/, checkpoint or vector directory appears
# (not even a half-written one), and an earlier checkpoint or file in output_dir is unchanged

DISK_FULL = ["disk is full or the file is too large", "ulimit -f"]


@case("disk-full-finetune-final")
def _(d: Path, e: Env) -> Spec:
    return Spec(finetune(d, e, "logging.level=error"),
                ["cannot save", str(d / "out" / "final"), *DISK_FULL, "nothing was written"],
                limit_fsize=20_000, may_create=["out/config.yaml", "out/train_log.jsonl"])


@case("disk-full-finetune-checkpoint")
def _(d: Path, e: Env) -> Spec:
    from dist_secvec.manifest import write_manifest

    earlier = d / "out" / "checkpoints" / "step_00000005"  # of an earlier run in the same output_dir
    write(earlier / "trainer_state.json", '{"step": 5}\n')
    write_manifest(earlier)
    return Spec(finetune(d, e, "checkpoint.every_steps=1", "logging.level=error"),
                ["cannot write checkpoint", str(d / "out" / "checkpoints" / "step_00000001"), *DISK_FULL,
                 "earlier checkpoints are intact"],
                limit_fsize=20_000, may_create=["out/config.yaml", "out/train_log.jsonl"])


@case("disk-full-train-sv")
def _(d: Path, e: Env) -> Spec:
    write(d / "out" / "notes.txt", "a file already in the output dir\n")
    return Spec(["train-sv", f"model.path={e.model}", f"security_vector.harmful_data={e.train}",
                 "security_vector.kl_weight=0", "security_vector.rank=16", "optim.max_steps=1",
                 "logging.progress=false", "logging.level=error", f"output_dir={d / 'out'}"],
                ["cannot save", str(d / "out" / "secvec"), *DISK_FULL, "nothing was written"],
                limit_fsize=20_000, may_create=["out/config.yaml", "out/train_sv_log.jsonl"])


# ---- hostfiles of the launch scripts


def hostfile_case(name: str, content: Optional[str], must: list):
    @case(f"hostfile-{name}")
    def build(d: Path, e: Env) -> Spec:
        hf = d / "hostfile"
        if content is not None:
            write(hf, content)
        return Spec(["deepspeed.sh", "--hostfile", str(hf), "--", "finetune", "--config", "x.yaml"],
                    ["launch/deepspeed.sh:", str(hf)] + must, kind="script")
    return build


hostfile_case("missing", None, ["not found"])
hostfile_case("no-slots", "node001 slots=8\nnode002\n", ["line 2", "malformed", "'<host> slots=<N>'"])
hostfile_case("bad-slots", "node001 slots=eight\n", ["line 1", "malformed"])
hostfile_case("zero-slots", "# comment\nnode001 slots=0\n", ["line 2", "malformed"])
hostfile_case("duplicate-host", "node001 slots=8\nnode001 slots=8\n", ["line 2", "twice"])
hostfile_case("only-comments", "# node001 slots=8\n\n", ["names no host"])


@case("make-hostfile-missing-dir")
def _(d: Path, e: Env) -> Spec:
    return Spec(["make_hostfile.sh", "-n", "a,b", "-s", "2", "-o", str(d / "nodir" / "hostfile")],
                ["launch/make_hostfile.sh:", "nodir' does not exist"], kind="script")


@case("make-hostfile-disk-full")
def _(d: Path, e: Env) -> Spec:
    write(d / "hostfile", "old slots=1\n")
    return Spec(["make_hostfile.sh", "-n", ",".join(f"node{i:04d}" for i in range(100)), "-s", "8", "-o",
                 str(d / "hostfile")], ["cannot write", "hostfile", "nothing was changed"], kind="script",
                limit_fsize=512)


# ---------------------------------------------------------------------------------------------
# running


@dataclass
class Result:
    spec: Spec
    proc: subprocess.CompletedProcess
    before: dict
    after: dict
    root: Path
    seconds: float


def _limits(fsize: Optional[int]):
    if fsize is None:
        return None

    def apply():  # in the child: writes past fsize fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return apply


def _command(spec: Spec) -> list:
    if spec.kind == "script":
        return ["bash", str(REPO / "launch" / spec.argv[0]), *spec.argv[1:]]
    if spec.kind == "python":
        return [PY, *spec.argv]
    return [PY, "-m", "dist_secvec", *spec.argv]


def run_case(name: str, root: Path, e: Env) -> Result:
    d = root / name
    d.mkdir()
    spec = CASES[name](d, e)
    watched = [d, *e.shared, *spec.protect]
    before = {str(p): tree_digest(p) for p in watched if p.exists()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIST_SECVEC_", "DRY_RUN", "SLURM_"))}
    t0 = time.time()
    proc = subprocess.run(_command(spec), cwd=REPO, capture_output=True, text=True, timeout=240, env=env,
                          preexec_fn=_limits(spec.limit_fsize))
    seconds = time.time() - t0
    after = {str(p): tree_digest(p) for p in watched if p.exists()}
    return Result(spec, proc, before, after, d, seconds)


@pytest.fixture(scope="module")
def results(request, env, tmp_path_factory) -> dict:
    """Run the subprocesses of every selected case, a few at a time."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "name" in item.callspec.params]
    root = tmp_path_factory.mktemp("bad_input_cases")
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {name: pool.submit(run_case, name, root, env) for name in dict.fromkeys(selected)}
        out = {name: f.result() for name, f in futures.items()}
    if os.environ.get("BAD_INPUT_TIMES"):
        for name, r in sorted(out.items(), key=lambda kv: -kv[1].seconds):
            print(f"{r.seconds:6.1f}s {name}", file=sys.stderr)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, results):
    r = results[name]
    err, spec = r.proc.stderr, r.spec
    lines = err.splitlines()
    assert r.proc.returncode == spec.code, (r.proc.returncode, err[-3000:])
    assert len(lines) == 1, f"stderr must be one line, got {len(lines)}:\n{err[-3000:]}"
    line = lines[0]
    assert "Traceback" not in err and "internal error" not in line, line
    if spec.kind == "cli":
        assert line.startswith(f"dist-secvec {spec.argv[0]}: error: "), line
    for text in spec.must:
        assert text in line, f"{text!r} not in: {line}"
    after = {root: {k: v for k, v in files.items() if k in r.before.get(root, {}) or
                    not (root == str(r.root) and k in spec.may_create)} for root, files in r.after.items()}
    assert after == r.before, "an existing file changed, or a new one was written"
    leftovers = [p for p in r.root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name or ".hostfile." in p.name]
    assert not leftovers, leftovers


def test_every_input_kind_is_covered():
    kinds = {name.split("-")[0] for name in CASES}
    assert {"yaml", "override", "data", "model", "vector", "output", "resume", "export", "disk", "hostfile",
            "make"} <= kinds


# ---------------------------------------------------------------------------------------------
# internal errors: exit 1, one line; --debug shows the traceback


BUG = """
import sys
import dist_secvec.export as export
def run_export(cfg):
    raise KeyError("a bug\\nwith a second line")
export.run_export = run_export
from dist_secvec.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("debug", [False, True])
def test_internal_error_is_exit_1(env, tmp_path, debug):
    argv = ["export", f"export.checkpoint={env.model}", f"output_dir={tmp_path / 'out'}"] + (["--debug"] if debug else [])
    proc = subprocess.run([PY, "-c", BUG, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    if debug:
        assert "Traceback" in proc.stderr and "KeyError" in proc.stderr and "run_export" in proc.stderr
    else:
        (line,) = proc.stderr.splitlines()
        assert line.startswith("dist-secvec export: internal error: KeyError") and "--debug" in line, line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# atomic saves: a failed write keeps the previous directory (in-process: the unit under the CLI)


def _torch_save_error() -> RuntimeError:
    """What torch.save into a file object raises when a write fails: its own message, the
    OSError only as the context."""
    try:
        raise OSError(27, "File too large")
    except OSError:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        except RuntimeError as e:
            return e


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), OSError(27, "File too large"),
                                   RuntimeError("Error while serializing: I/O error: File too large (os error 27)"),
                                   _torch_save_error()])
def test_atomic_dir_failed_save_keeps_previous(tmp_path, error):
    from dist_secvec import files
    from dist_secvec.errors import UserError

    final = tmp_path / "secvec"
    write(final / "adapter_model.safetensors", b"old weights")
    before = tree_digest(tmp_path)
    with pytest.raises(UserError) as e:
        with files.atomic_dir(final) as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"half")
            raise error
    msg = str(e.value)
    assert "\n" not in msg and str(final) in msg and ("disk is full" in msg and "too large" in msg)
    assert tree_digest(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["secvec"]


def test_atomic_dir_other_errors_pass_through(tmp_path):
    from dist_secvec import files

    with pytest.raises(ZeroDivisionError):
        with files.atomic_dir(tmp_path / "x"):
            1 / 0
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_recovers_from_a_killed_save(tmp_path):
    """A save killed midway leaves `.tmp-*` (half-written) or `.old-*` (the previous version moved
    aside) siblings: the next save removes the first and puts the second back if `final` is gone."""
    from dist_secvec.files import atomic_dir

    final = tmp_path / "final"
    (tmp_path / ".final.tmp-99999").mkdir()
    (tmp_path / ".final.tmp-99999" / "half").write_text("x")
    old = tmp_path / ".final.old-99998"
    old.mkdir()
    (old / "weights").write_text("previous")
    with atomic_dir(tmp_path / "other") as tmp:  # another directory's save leaves these alone
        (tmp / "a").write_text("a")
    assert old.exists() and (tmp_path / ".final.tmp-99999").exists()
    with pytest.raises(RuntimeError):
        with atomic_dir(final):
            raise RuntimeError("killed")
    # the previous version is back, the half-written one is gone
    assert (final / "weights").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "other"]


@pytest.mark.parametrize("overrides", [[], ["security_vector.rank=4"],
                                       ["security_vector.target_modules=[v_proj,down_proj,q_proj]"],
                                       ["security_vector.rank=4", "security_vector.target_modules=[q_proj,v_proj,down_proj]"]],
                         ids=["unset", "rank-matches", "targets-match", "both-match"])
def test_vector_shape_keys_unset_or_matching_are_accepted(env, overrides):
    """Unset (None: not given by the user) means "the vector's own"; a set value that matches passes.
    None survives a round trip through to_dict (the demo and the experiment runner build stage
    configs that way, and a run's saved config.yaml can be passed back)."""
    from dist_secvec.config import load_config, validate
    from dist_secvec.stage2 import check_vector_config
    from dist_secvec.secvec import load_security_vector

    cfg = validate(load_config(None, [f"model.path={env.model}", f"data.train={env.train}",
                                      f"security_vector.path={env.vector}", *overrides]), "finetune")
    sv = load_security_vector(str(env.vector))
    check_vector_config(cfg, sv)
    again = load_config(None, None, base={k: v for k, v in cfg.to_dict().items() if k != "source"})
    assert (again.security_vector.rank, again.security_vector.target_modules) == (
        cfg.security_vector.rank, cfg.security_vector.target_modules)
    check_vector_config(again, sv)
    if not overrides:
        assert cfg.security_vector.rank is None and cfg.security_vector.target_modules is None


# ---------------------------------------------------------------------------------------------
# durability: what a save renames into place was fsynced first (files, directories), then the rename


@pytest.fixture
def fsync_log(monkeypatch):
    """Every os.fsync call as the path of its file descriptor (and os.rename calls, in order)."""
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, *a, **k):
        events.append(("rename", str(src), str(dst)))
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    return events


def _synced_before_rename(events: list, tmp_prefix: str, final: Path) -> set:
    """The relative paths fsynced under the temporary directory before it was renamed to `final`."""
    (i,) = [k for k, e in enumerate(events) if e[0] == "rename" and e[2] == str(final)]
    tmp = events[i][1]
    assert Path(tmp).name.startswith(tmp_prefix), events[i]
    synced = {os.path.relpath(e[1], tmp) for e in events[:i] if e[0] == "fsync" and
              (e[1] == tmp or e[1].startswith(tmp + os.sep))}
    assert ("fsync", str(final.parent)) in events[i + 1:], "the parent directory is synced after the rename"
    return synced


def test_atomic_dir_fsyncs_files_and_dirs_before_the_rename(tmp_path, fsync_log):
    from dist_secvec.manifest import verify_manifest, write_manifest
    from dist_secvec.files import atomic_dir

    final = tmp_path / "final"
    write(final / "old", "previous version")
    with atomic_dir(final) as tmp:
        write(tmp / "model.safetensors", b"weights")
        write(tmp / "sub" / "tokenizer.json", "{}")
        write_manifest(tmp)
    synced = _synced_before_rename(fsync_log, ".final.tmp-", final)
    assert synced == {".", "sub", "model.safetensors", os.path.join("sub", "tokenizer.json"), "manifest.json"}
    verify_manifest(final)  # still what was written, and nothing of the previous version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"] and not (final / "old").exists()


def test_checkpoint_fsyncs_before_the_rename(tmp_path, fsync_log):
    import torch

    from dist_secvec.checkpoint import save_checkpoint, verify_manifest
    from dist_secvec.distributed import PlainEngine

    model = torch.nn.Linear(3, 2)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params)
    engine = PlainEngine(model, params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 1.0)
    ck = save_checkpoint(engine, tmp_path, 4, {"losses": [1.0] * 4}, keep=2)
    synced = _synced_before_rename(fsync_log, ".step_00000004.tmp", ck)
    assert synced == {".", "trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng_rank0.json",
                      "trainer_state.json", "manifest.json"}
    verify_manifest(ck)
