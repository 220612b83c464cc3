"""The tokenization cache (data.tokenize_samples(cache=True)): a second run reads the rows back
without tokenizing, a changed file, setting or tokenizer tokenizes again, concurrent builders
(ranks) take turns so that one tokenizes, and datasets' parallel map gives the same rows as one
process. Tokenizing is observed by counting calls of data._tokenize, the one function that
tokenizes a row."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from dist_secvec import data as data_mod
from dist_secvec.config import DataConfig
from dist_secvec.data import load_samples, tokenize_samples
from dist_secvec.errors import DataError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
WORDS = "system user assistant what is one two three four and it be brief hi hello fine q a".split()


def word_tokenizer(template=CHATML, extra=()):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<s>", "<|im_end|>", "<|im_start|>"]
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([" ".join(WORDS + list(extra))],
                           trainers.WordLevelTrainer(special_tokens=special, min_frequency=1))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = template
    return tok


def rows(n: int = 12) -> list[dict]:
    words = ["one", "two", "three", "four"]
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"what is {words[i % 4]}"},
                {"role": "assistant", "content": " ".join(["it", "is"] + [words[i % 4]] * (1 + i % 3))}]
        if i % 2:
            msgs += [{"role": "user", "content": "and two"}, {"role": "assistant", "content": "it is two"}]
        out.append({"messages": msgs})
    out.append({"messages": [{"role": "user", "content": "hi " * 40}, {"role": "assistant", "content": "hello"}]})
    return out


def write_rows(path: Path, data: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return str(path)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DIST_SECVEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokenized"


@pytest.fixture
def calls(monkeypatch) -> list:
    """Every row data._tokenize tokenizes, in this process."""
    seen = []
    real = data_mod._tokenize

    def counting(tokenizer, sample, cfg):
        seen.append(sample.row)
        return real(tokenizer, sample, cfg)

    monkeypatch.setattr(data_mod, "_tokenize", counting)
    return seen


CFG = DataConfig(max_length=24)  # row 13 (40 prompt tokens) is dropped, longer rows truncated


def test_second_run_reads_the_cache_without_tokenizing(tmp_path, cache_dir, calls):
    path = write_rows(tmp_path / "train.jsonl", rows())
    tok = word_tokenizer()
    uncached = tokenize_samples(tok, load_samples([path]), CFG)
    assert len(calls) == 13 and uncached.cache == "" and not cache_dir.exists()
    assert uncached.n_dropped == 1 and uncached.n_truncated >= 1  # both counts go through the cache
    calls.clear()
    first = tokenize_samples(tok, load_samples([path]), CFG, cache=True)
    assert len(calls) == 13 and "tokenized, kept in the tokenization cache" in first.report("train data")
    assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 1
    calls.clear()
    second = tokenize_samples(word_tokenizer(), load_samples([path]), CFG, cache=True)  # a new run: a new tokenizer
    assert calls == []
    assert "read from the tokenization cache" in second.report("train data")
    assert second.examples == first.examples == uncached.examples
    assert (second.n_truncated, second.n_dropped, second.dropped, second.n_last_turn) == \
        (uncached.n_truncated, uncached.n_dropped, uncached.dropped, uncached.n_last_turn)
    assert second.report("x").split(" (read from")[0] == uncached.report("x")


def test_changed_file_tokenizes_again(tmp_path, cache_dir, calls):
    path = tmp_path / "train.jsonl"
    data = rows()
    tok = word_tokenizer()
    tokenize_samples(tok, load_samples([write_rows(path, data)]), CFG, cache=True)
    data[0]["messages"][1]["content"] = "it is four"
    calls.clear()
    changed = tokenize_samples(tok, load_samples([write_rows(path, data)]), CFG, cache=True)
    assert len(calls) == 13 and changed.cache.startswith("tokenized")
    assert changed.examples[0]["input_ids"] != tokenize_samples(tok, load_samples([write_rows(path, rows())]),
                                                                CFG).examples[0]["input_ids"]
    calls.clear()
    subset = load_samples([str(path)])[2:]  # another selection of the same file is another set
    tokenize_samples(tok, subset, CFG, cache=True)
    assert len(calls) == 11


@pytest.mark.parametrize("changed, tokenizes", [
    ({"max_length": 20}, True),
    ({"train_on": "last_assistant"}, True),
    ({"train_on": "all"}, True),
    ({"template": "plain"}, True),
    ({"plain_template": "Q : {prompt} A : "}, True),
    ({"shuffle": False}, False),  # batching, not tokens
    ({"num_proc": 1}, False),
    ({"max_samples": 100}, False),  # the rows themselves are the key
])
def test_changed_setting_tokenizes_again(tmp_path, cache_dir, calls, changed, tokenizes):
    path = write_rows(tmp_path / "train.jsonl", rows())
    tok = word_tokenizer()
    tokenize_samples(tok, load_samples([path]), CFG, cache=True)
    calls.clear()
    cfg = DataConfig(**{"max_length": CFG.max_length, **changed})
    again = tokenize_samples(tok, load_samples([path]), cfg, cache=True)
    assert bool(calls) is tokenizes
    assert again.cache.startswith("tokenized" if tokenizes else "read from")


def test_changed_mapping_or_chat_template_file_tokenizes_again(tmp_path, cache_dir, calls):
    path = write_rows(tmp_path / "train.jsonl", rows())
    renamed = write_rows(tmp_path / "renamed.jsonl", [{"dialog": r["messages"]} for r in rows()])
    tok = word_tokenizer()
    tokenize_samples(tok, load_samples([path]), CFG, cache=True)
    calls.clear()
    tokenize_samples(tok, load_samples([renamed], data=DataConfig(columns={"messages": "dialog"})),
                     DataConfig(max_length=24, columns={"messages": "dialog"}), cache=True)
    assert len(calls) == 13  # another file (its name is in the rows' error messages)
    jinja = tmp_path / "t.jinja"
    jinja.write_text(CHATML.replace("<|im_end|> ", "<|im_end|> <|im_end|> "))
    calls.clear()
    tokenize_samples(word_tokenizer(), load_samples([path]), DataConfig(max_length=24, chat_template=str(jinja)),
                     cache=True)
    assert len(calls) == 13


def test_changed_tokenizer_tokenizes_again(tmp_path, cache_dir, calls):
    path = write_rows(tmp_path / "train.jsonl", rows())
    tokenize_samples(word_tokenizer(), load_samples([path]), CFG, cache=True)
    for other in (word_tokenizer(extra=["zebra"]),  # another vocabulary
                  word_tokenizer(template=CHATML.replace("{{ m['role'] }} ", "{{ m['role'] }} : "))):
        calls.clear()
        tokenize_samples(other, load_samples([path]), CFG, cache=True)
        assert len(calls) == 13


def test_cache_off_and_damaged_entry(tmp_path, cache_dir, calls):
    path = write_rows(tmp_path / "train.jsonl", rows())
    tok = word_tokenizer()
    off = DataConfig(max_length=24, cache=False)
    tokenize_samples(tok, load_samples([path]), off, cache=True)
    assert not cache_dir.exists() and len(calls) == 13
    first = tokenize_samples(tok, load_samples([path]), CFG, cache=True)
    (entry,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    for f in (entry / "rows").iterdir():  # damaged: the rows are gone
        f.unlink()
    calls.clear()
    again = tokenize_samples(tok, load_samples([path]), CFG, cache=True)
    assert len(calls) == 13 and again.examples == first.examples and again.cache.startswith("tokenized")
    calls.clear()
    assert tokenize_samples(tok, load_samples([path]), CFG, cache=True).cache.startswith("read from")
    assert calls == []


def test_parallel_tokenization_matches_one_process(tmp_path):
    path = write_rows(tmp_path / "train.jsonl", rows(30))
    tok = word_tokenizer()
    one = tokenize_samples(tok, load_samples([path]), DataConfig(max_length=24, num_proc=1))
    two = tokenize_samples(tok, load_samples([path]), DataConfig(max_length=24, num_proc=2))
    assert two.examples == one.examples
    assert (two.n_truncated, two.n_dropped, two.dropped) == (one.n_truncated, one.n_dropped, one.dropped)
    bad = write_rows(tmp_path / "bad.jsonl", rows(3) + [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": {}}}]}]}])
    with pytest.raises(DataError) as e:  # a bad row in a worker: the same one line
        tokenize_samples(word_tokenizer(), load_samples([bad]), DataConfig(template="plain", num_proc=2))
    assert "row 5:" in str(e.value) and "\n" not in str(e.value)


def test_num_proc_is_checked():
    from dist_secvec.data import check_data_config
    from dist_secvec.errors import ConfigError

    with pytest.raises(ConfigError, match="data.num_proc"):
        check_data_config(DataConfig(num_proc=0))


def _build_in_child(path: str, out) -> None:
    ts = tokenize_samples(word_tokenizer(), load_samples([path]), CFG, cache=True)
    out.put(ts.cache.split(" ")[0])


def test_concurrent_builders_tokenize_once(tmp_path, cache_dir):
    """Ranks (here: two processes at once) share one build: one tokenizes, the other reads it."""
    path = write_rows(tmp_path / "train.jsonl", rows(1000))  # long enough for the two to overlap
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(path, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(out.get(timeout=5) for _ in procs) == ["read", "tokenized,"]
