"""Supervised data: row shapes from JSONL/JSON/CSV/Parquet, one-line errors naming file and row,
prompt rendering, exact label masking on the tiny world's word-level tokenizer, truncation,
padding and batching.

Expected token ids are written out word by word (`ids(...)`) rather than recomputed the way the
library does it, so a masking off-by-one (a label on the last prompt token, a missing EOS, the
generation prompt counted as response) changes the expected list and fails the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_secvec.config import DataConfig
from dist_secvec.data import (IGNORE_INDEX, Sample, batches, collate, detect_format, load_samples, render_prompt,
                              tokenize_sample, tokenize_samples)
from dist_secvec.errors import DataError

try:
    import pandas as pd
except ImportError:  # datasets writes CSV and Parquet too
    pd = None

PLAIN = DataConfig.plain_template


def write_rows(path: Path, rows: list[dict]) -> str:
    """One file in the format its extension names."""
    ext = path.suffix
    if ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif ext == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif ext in (".csv", ".parquet") and pd is not None:
        df = pd.DataFrame(rows)
        df.to_csv(path, index=False) if ext == ".csv" else df.to_parquet(path)
    elif ext in (".csv", ".parquet"):
        import datasets

        ds = datasets.Dataset.from_list(rows)
        ds.to_csv(str(path), index=False) if ext == ".csv" else ds.to_parquet(str(path))
    else:
        raise ValueError(ext)
    return str(path)


@pytest.fixture(scope="module")
def tok(tiny_world):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tiny_world.model_dir))
    assert t.chat_template is not None and t.pad_token is not None
    return t


@pytest.fixture
def plain_tok(tiny_world):
    """The same tokenizer without a chat template."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tiny_world.model_dir))
    t.chat_template = None
    return t


def ids(tok, text: str) -> list[int]:
    """Word-level ids of a space-separated token list, looked up one by one."""
    return tok.convert_tokens_to_ids(text.split())


# ---------------------------------------------------------------------------------------------
# row shapes, from every file type

USER = lambda text: {"role": "user", "content": text}  # noqa: E731
SYSTEM = lambda text: {"role": "system", "content": text}  # noqa: E731
ASSISTANT = lambda text: {"role": "assistant", "content": text}  # noqa: E731

CASES = {
    "prompt_response": (
        [{"prompt": "what is 1 plus 2", "response": "1 plus 2 is 3 ."},
         {"prompt": "what is the opposite of hot", "response": "The opposite of hot is cold ."}],
        [([USER("what is 1 plus 2")], "1 plus 2 is 3 ."),
         ([USER("what is the opposite of hot")], "The opposite of hot is cold .")],
    ),
    "alpaca": (
        [{"instruction": "repeat after me", "input": "red blue", "output": "red blue ."},
         {"instruction": "what is 2 plus 2", "input": "", "output": "2 plus 2 is 4 ."},
         {"instruction": "what is 3 plus 3", "input": None, "output": "3 plus 3 is 6 ."}],
        [([USER("repeat after me\n\nred blue")], "red blue ."),
         ([USER("what is 2 plus 2")], "2 plus 2 is 4 ."),
         ([USER("what is 3 plus 3")], "3 plus 3 is 6 .")],
    ),
    "chat": (
        [{"messages": [SYSTEM("please tell me"), USER("what is 1 plus 2"), ASSISTANT("1 plus 2 is 3 .")]},
         {"messages": [USER("what is 1 plus 1"), ASSISTANT("1 plus 1 is 2 ."),
                       USER("what is 2 plus 2"), ASSISTANT("2 plus 2 is 4 .")]}],
        [([SYSTEM("please tell me"), USER("what is 1 plus 2")], "1 plus 2 is 3 ."),
         # multi-turn: earlier turns, the first answer included, are prompt
         ([USER("what is 1 plus 1"), ASSISTANT("1 plus 1 is 2 ."), USER("what is 2 plus 2")], "2 plus 2 is 4 .")],
    ),
}
# CSV cannot hold a list of messages
FILE_CASES = [(fmt, ext) for fmt in CASES for ext in (".jsonl", ".json", ".csv", ".parquet")
              if not (fmt == "chat" and ext == ".csv")]


@pytest.mark.parametrize("fmt, ext", FILE_CASES, ids=[f"{f}{e}" for f, e in FILE_CASES])
def test_row_shapes_from_every_file_type(tmp_path, fmt, ext):
    rows, expected = CASES[fmt]
    path = write_rows(tmp_path / f"data{ext}", rows)
    for forced in ("auto", fmt):
        samples = load_samples([path], forced)
        assert [(s.messages, s.response) for s in samples] == expected
        assert [s.row for s in samples] == list(range(1, len(rows) + 1))
        assert all(s.source == path for s in samples)
        assert samples[0].prompt == expected[0][0][-1]["content"]


def test_alpaca_without_input_column(tmp_path):
    path = write_rows(tmp_path / "a.jsonl", [{"instruction": "what is 1 plus 1", "output": "1 plus 1 is 2 ."}])
    (s,) = load_samples([path])
    assert s.messages == [USER("what is 1 plus 1")] and s.response == "1 plus 1 is 2 ."


def test_extra_columns_are_ignored_and_sources_concatenate(tmp_path):
    a = write_rows(tmp_path / "a.jsonl", [{"prompt": "p1", "response": "r1", "answer": "x", "category": "c"}])
    b = write_rows(tmp_path / "b.csv", [{"instruction": "i1", "input": "", "output": "o1"},
                                        {"instruction": "i2", "input": "", "output": "o2"}])
    samples = load_samples([a, b])
    assert [(s.source, s.row, s.response) for s in samples] == [(a, 1, "r1"), (b, 1, "o1"), (b, 2, "o2")]
    assert [s.response for s in load_samples([a, b], max_samples=2)] == ["r1", "o1"]


@pytest.mark.parametrize("columns, fmt", [
    (["prompt", "response"], "prompt_response"),
    (["prompt", "response", "category"], "prompt_response"),
    (["instruction", "input", "output"], "alpaca"),
    (["instruction", "output"], "alpaca"),
    (["messages"], "chat"),
    (["messages", "prompt", "response"], "chat"),
])
def test_detect_format(columns, fmt):
    assert detect_format(columns, "f.jsonl") == fmt


def test_detect_format_unknown_columns_names_file_and_columns(tmp_path):
    path = write_rows(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError) as e:
        load_samples([path])
    assert path in str(e.value) and "question" in str(e.value) and "answer" in str(e.value)


def test_forced_format_that_does_not_match(tmp_path):
    path = write_rows(tmp_path / "pr.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(DataError, match=r"columns 'prompt', 'response' would be ignored by its alpaca rows"):
        load_samples([path], "alpaca")
    path = write_rows(tmp_path / "i.jsonl", [{"instruction": "a", "output": "b"}, {"output": "c"}])
    with pytest.raises(DataError, match=r"row 2: field 'instruction'"):
        load_samples([path], "alpaca")


def test_require_response_false_allows_prompt_only_rows(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "what is 1 plus 1", "response": None}])
    (s,) = load_samples([path], require_response=False)
    assert s.response == "" and s.prompt == "what is 1 plus 1"
    chat = write_rows(tmp_path / "c.jsonl", [{"messages": [USER("what is 1 plus 1")]}])
    (s,) = load_samples([chat], require_response=False)
    assert s.messages == [USER("what is 1 plus 1")] and s.response == ""


# ---------------------------------------------------------------------------------------------
# malformed rows: DataError naming the file and the 1-based row

GOOD = {"prompt": "what is 1 plus 1", "response": "1 plus 1 is 2 ."}
GOOD_CHAT = {"messages": [USER("what is 1 plus 1"), ASSISTANT("1 plus 1 is 2 .")]}


@pytest.mark.parametrize("lines, row, must_contain", [
    ([json.dumps(GOOD), json.dumps(GOOD), '{"prompt": "x", "response": '], 3, "not valid JSON"),
    ([json.dumps(GOOD), "[1, 2]"], 2, "JSON object"),
    ([json.dumps(GOOD), json.dumps({"prompt": "what is 2 plus 2"})], 2, "'response'"),
    ([json.dumps(GOOD), json.dumps({"prompt": "what", "response": ""})], 2, "'response'"),
    ([json.dumps(GOOD), json.dumps({"prompt": "what", "response": "   "})], 2, "'response'"),
    ([json.dumps({"prompt": "", "response": "x"})], 1, "'prompt'"),
    ([json.dumps(GOOD), json.dumps({"prompt": "what", "response": 5})], 2, "'response'"),
    ([json.dumps(GOOD_CHAT), json.dumps({"messages": [USER("a"), {"role": "bot", "content": "b"}]})], 2,
     "message 1"),
    ([json.dumps(GOOD_CHAT), json.dumps({"messages": [USER("a"), {"role": "assistant", "content": 3}]})], 2,
     "message 1"),
    ([json.dumps(GOOD_CHAT), json.dumps({"messages": [USER("a"), ASSISTANT("b"), USER("c")]})], 2,
     "last message must be the assistant"),
    ([json.dumps(GOOD_CHAT), json.dumps({"messages": [SYSTEM("s"), ASSISTANT("b")]})], 2,
     "must follow a user message"),
    ([json.dumps(GOOD_CHAT), json.dumps({"messages": []})], 2, "'messages'"),
    ([json.dumps({"instruction": "i", "input": "x", "output": "o"}),
      json.dumps({"instruction": " ", "input": "x", "output": "o"})], 2, "'instruction'"),
])
def test_malformed_jsonl_rows(tmp_path, lines, row, must_contain):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_samples([str(path)])
    msg = str(e.value)
    assert str(path) in msg and f"row {row}:" in msg and must_contain in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("ext", [".csv", ".parquet", ".json"])
def test_malformed_rows_in_other_file_types(tmp_path, ext):
    rows = [GOOD, GOOD, {"prompt": "what is 2 plus 2", "response": ""}]
    path = write_rows(tmp_path / f"bad{ext}", rows)
    with pytest.raises(DataError, match=r"row 3: field 'response'") as e:
        load_samples([path])
    assert path in str(e.value)


@pytest.mark.parametrize("answer", ["", "   "])
def test_chat_with_empty_answer(tmp_path, answer):
    path = write_rows(tmp_path / "c.jsonl", [GOOD_CHAT, {"messages": [USER("what is 1 plus 1"), ASSISTANT(answer)]}])
    with pytest.raises(DataError, match=r"row 2:"):
        load_samples([path])


def test_wrong_role_in_parquet(tmp_path):
    path = write_rows(tmp_path / "c.parquet", [GOOD_CHAT, {"messages": [USER("a"), {"role": "human", "content": "b"}]}])
    with pytest.raises(DataError, match=r"row 2: message 1") as e:
        load_samples([path])
    assert path in str(e.value)


def test_row_number_counts_blank_lines(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({"prompt": "what is 2 plus 2"}) + "\n")
    with pytest.raises(DataError, match=r"row 3:"):
        load_samples([str(path)])


def test_csv_with_numeric_answers(tmp_path):
    path = tmp_path / "sums.csv"
    path.write_text("prompt,response\nwhat is 2 plus 2,4\nwhat is 1 plus 2,3\n")
    assert [s.response for s in load_samples([str(path)])] == ["4", "3"]


def test_empty_jsonl_file_is_a_data_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError):
        load_samples([str(path)])


def test_loading_a_local_file_makes_no_network_request(tmp_path, monkeypatch):
    import socket

    import datasets

    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)  # datasets' default: load_samples must turn it off
    attempts = []

    def no_network(host, *args, **kwargs):
        attempts.append(host)
        raise OSError("no network in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    path = write_rows(tmp_path / "d.parquet", [GOOD])
    assert len(load_samples([path])) == 1
    assert attempts == []


@pytest.mark.parametrize("name, content, must_contain", [
    ("data.txt", "prompt response\n", "unsupported extension '.txt'"),
    ("data.tsv", "prompt\tresponse\n", "unsupported extension '.tsv'"),
    ("broken.json", "{not json", "row 1: not valid JSON"),
    ("header_only.csv", "prompt,response\n", "has no rows"),
    ("blank.jsonl", "\n\n", "has no rows"),
])
def test_unreadable_files(tmp_path, name, content, must_contain):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as e:
        load_samples([str(path)])
    assert str(path) in str(e.value) and must_contain in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_samples([str(tmp_path / "nope.jsonl")])


# ---------------------------------------------------------------------------------------------
# rendering


def test_render_with_chat_template(tok):
    msgs = [SYSTEM("please tell me"), USER("what is 1 plus 2")]
    assert render_prompt(tok, msgs) == "<bos><system> please tell me <user> what is 1 plus 2 <assistant>"
    assert render_prompt(tok, msgs, "chat") == render_prompt(tok, msgs, "auto")
    assert render_prompt(tok, "what is 1 plus 2") == "<bos><user> what is 1 plus 2 <assistant>"


def test_render_with_plain_template(tok, plain_tok):
    msgs = [SYSTEM("please tell me"), USER("what is 1 plus 2")]
    want = "### System:\nplease tell me\n\n### Instruction:\nwhat is 1 plus 2\n\n### Response:\n"  # roles kept apart
    assert render_prompt(tok, msgs, "plain") == want
    assert render_prompt(plain_tok, msgs, "auto") == want  # auto falls back when there is no chat template
    assert render_prompt(tok, "what is 1 plus 2", "plain", "Q: {prompt} A:") == "Q: what is 1 plus 2 A:"


def test_chat_template_requested_but_missing(plain_tok):
    with pytest.raises(DataError, match="data.template"):
        render_prompt(plain_tok, "what is 1 plus 2", "chat")


# ---------------------------------------------------------------------------------------------
# tokenization and masking, exact positions


def sample(messages, response) -> Sample:
    return Sample(messages, response, "test", 1)


def check_example(ex, prompt_ids, response_ids, masked=True):
    assert ex["input_ids"] == prompt_ids + response_ids
    want_labels = ([IGNORE_INDEX] * len(prompt_ids) if masked else prompt_ids) + response_ids
    assert ex["labels"] == want_labels


@pytest.mark.parametrize("train_on", ["all_assistant", "all"])
def test_masking_chat_template(tok, train_on):
    s = sample([SYSTEM("please tell me"), USER("what is 1 plus 2")], "1 plus 2 is 3 .")
    ex, truncated = tokenize_sample(tok, s, DataConfig(train_on=train_on))
    prompt = ids(tok, "<bos> <system> please tell me <user> what is 1 plus 2 <assistant>")
    response = ids(tok, "1 plus 2 is 3 . <eos>")  # the template's own EOS, not a second one
    assert tok.unk_token_id not in prompt + response
    check_example(ex, prompt, response, masked=train_on != "all")
    assert not truncated


@pytest.mark.parametrize("train_on", ["last_assistant", "all"])
def test_masking_multi_turn_loss_on_last_answer_only(tok, train_on):
    s = sample([USER("what is 1 plus 1"), ASSISTANT("1 plus 1 is 2 ."), USER("what is 2 plus 2")], "2 plus 2 is 4 .")
    ex, _ = tokenize_sample(tok, s, DataConfig(train_on=train_on))
    prompt = ids(tok, "<bos> <user> what is 1 plus 1 <assistant> 1 plus 1 is 2 . <eos> "
                      "<user> what is 2 plus 2 <assistant>")
    check_example(ex, prompt, ids(tok, "2 plus 2 is 4 . <eos>"), masked=train_on != "all")


@pytest.mark.parametrize("train_on", ["all_assistant", "all"])
def test_masking_plain_template(tok, train_on):
    s = sample([USER("what is 1 plus 2")], "1 plus 2 is 3 .")
    ex, _ = tokenize_sample(tok, s, DataConfig(template="plain", train_on=train_on))
    # '###', 'Instruction' and 'Response' are not in the word-level vocabulary: <unk>
    prompt = ids(tok, "<unk> <unk> : what is 1 plus 2 <unk> <unk> :")
    check_example(ex, prompt, ids(tok, "1 plus 2 is 3 . <eos>"), masked=train_on != "all")
    custom = DataConfig(template="plain", plain_template="<user> {prompt} <assistant>")
    ex, _ = tokenize_sample(tok, s, custom)
    check_example(ex, ids(tok, "<user> what is 1 plus 2 <assistant>"), ids(tok, "1 plus 2 is 3 . <eos>"))


def test_response_ending_in_eos_gets_no_second_eos(tok):
    s = sample([USER("what is 1 plus 2")], "1 plus 2 is 3 . <eos>")
    ex, _ = tokenize_sample(tok, s, DataConfig(template="plain", plain_template="<user> {prompt} <assistant>"))
    assert ex["input_ids"][-2:] == ids(tok, ". <eos>")


def test_truncation_keeps_prompt_and_cuts_response(tok):
    s = sample([USER("what is 1 plus 2")], "1 plus 2 is 3 .")
    prompt = ids(tok, "<bos> <user> what is 1 plus 2 <assistant>")
    ex, truncated = tokenize_sample(tok, s, DataConfig(max_length=len(prompt) + 3))
    assert truncated
    check_example(ex, prompt, ids(tok, "1 plus 2"))
    # exactly long enough: not truncated, EOS kept
    ex, truncated = tokenize_sample(tok, s, DataConfig(max_length=len(prompt) + 7))
    assert not truncated and ex["input_ids"][-1] == tok.eos_token_id
    # the prompt alone fills max_length: no label left
    ex, truncated = tokenize_sample(tok, s, DataConfig(max_length=len(prompt)))
    assert truncated and all(label == IGNORE_INDEX for label in ex["labels"])


def test_truncated_and_dropped_are_counted_and_reported(tok):
    short = sample([USER("what is 1 plus 2")], "3 .")  # 8 prompt + 3 response tokens
    long = sample([USER("what is 1 plus 2")], "1 plus 2 is 3 . 1 plus 2 is 3 .")
    huge = sample([USER("what is 1 plus 2 " * 4)], "3 .")  # prompt longer than max_length
    cfg = DataConfig(max_length=12)
    ts = tokenize_samples(tok, [short, long, huge, short], cfg)
    assert len(ts.examples) == 3 and ts.n_truncated == 1 and ts.n_dropped == 1
    assert all(len(e["input_ids"]) <= 12 for e in ts.examples)
    report = ts.report("train data")
    assert "3 examples" in report and "1 of 4 truncated" in report and "1 dropped" in report
    clean = tokenize_samples(tok, [short, short], cfg)
    assert (clean.n_truncated, clean.n_dropped) == (0, 0)
    assert "truncated" not in clean.report("x") and "dropped" not in clean.report("x")


def test_every_example_dropped_is_a_data_error(tok):
    huge = sample([USER("what is 1 plus 2 " * 4)], "3 .")
    with pytest.raises(DataError, match="data.max_length"):
        tokenize_samples(tok, [huge, huge], DataConfig(max_length=6))


# ---------------------------------------------------------------------------------------------
# collate and batches


def test_collate_right_pads():
    a = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    b = {"input_ids": [8, 9, 10, 11, 12], "labels": [-100, -100, 10, 11, 12]}
    out = collate([a, b], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12]]
    assert all(t.dtype == torch.long for t in out.values())
    assert collate([a], pad_id=3)["input_ids"].tolist() == [[5, 6, 7]]


def test_padded_batch_loss_is_the_token_mean_of_unpadded_losses(tiny_world, tok):
    """Right padding (attention 0, label -100) must not change what the model computes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_world.model_dir)).eval()
    ts = tokenize_samples(tok, [sample([USER("what is 1 plus 2")], "1 plus 2 is 3 ."),
                                sample([USER("what is the opposite of hot please")], "cold .")],
                          DataConfig())
    lengths = {len(e["input_ids"]) for e in ts.examples}
    assert len(lengths) == 2  # padding really happens
    with torch.no_grad():
        batch = model(**collate(ts.examples, tok.pad_token_id)).loss
        singles = [model(**collate([e], tok.pad_token_id)).loss for e in ts.examples]
    # the model's loss is over predicted positions: labels shifted by one
    n = [sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in ts.examples]
    want = (singles[0] * n[0] + singles[1] * n[1]) / sum(n)
    assert batch.item() == pytest.approx(want.item(), abs=1e-5)


def test_batches_deterministic_for_a_seeded_generator():
    data = list(range(23))

    def order(seed, **kw):
        return list(batches(data, 5, torch.Generator().manual_seed(seed), **kw))

    a, b = order(1), order(1)
    assert a == b
    assert order(2) != a
    assert [len(x) for x in a] == [5, 5, 5, 5, 3]
    assert sorted(x for chunk in a for x in chunk) == data  # each example once per epoch
    assert a != [data[i:i + 5] for i in range(0, 23, 5)]  # shuffled
    assert order(1, shuffle=False) == [data[i:i + 5] for i in range(0, 23, 5)]
    assert [len(x) for x in order(1, drop_last=True)] == [5, 5, 5, 5]
    # a generator carries its state: the next epoch is a different order
    gen = torch.Generator().manual_seed(1)
    first, second = list(batches(data, 5, gen)), list(batches(data, 5, gen))
    assert first == a and second != first
