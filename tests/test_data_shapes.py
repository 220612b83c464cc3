"""Row shapes users bring from axolotl, LLaMA-Factory, torchtune and TRL, read from real files
(JSONL, Parquet, Arrow, save_to_disk), the mapping keys, the one-line errors, and which tokens
each data.train_on mode supervises, on small word-level tokenizers built here (nothing loaded
from a hub).

Expected sequences are written out token by token, supervised tokens in [brackets], so a mask
that is off by one token, or that covers a user turn, fails the comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_secvec.config import DataConfig, load_config
from dist_secvec.data import (IGNORE_INDEX, Sample, load_samples, render_prompt, tokenize_sample,
                              tokenize_samples)
from dist_secvec.errors import ConfigError, DataError, UserError
from dist_secvec.readers import read_eval_set

USER = lambda text: {"role": "user", "content": text}  # noqa: E731
SYSTEM = lambda text: {"role": "system", "content": text}  # noqa: E731
ASSISTANT = lambda text: {"role": "assistant", "content": text}  # noqa: E731


def jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def table(path: Path, rows: list[dict]) -> str:
    """rows as Parquet, an .arrow file or a save_to_disk directory, written by `datasets`."""
    import datasets

    ds = datasets.Dataset.from_list(rows)
    if path.suffix == ".parquet":
        ds.to_parquet(str(path))
    elif path.suffix == ".arrow":
        ds.save_to_disk(str(path.parent / "saved_tmp"))
        arrow = next((path.parent / "saved_tmp").glob("*.arrow"))
        arrow.rename(path)
    else:
        ds.save_to_disk(str(path))
    return str(path)


def one_line_error(exc_info, path: str, row: int | None = None) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and path in msg, msg
    if row is not None:
        assert f"row {row}:" in msg or f"line {row}:" in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# row shapes

SHAREGPT = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                              {"from": "gpt", "value": "hello"}, {"from": "human", "value": "and you"},
                              {"from": "gpt", "value": "fine"}]}
SHAPES = {
    "sharegpt": (SHAREGPT, [SYSTEM("be brief"), USER("hi"), ASSISTANT("hello"), USER("and you")], "fine", 0),
    "prompt_completion": ({"prompt": "what is one", "completion": "one is one"}, [USER("what is one")],
                          "one is one", 1),
    "prompt_completion_conversational": (
        {"prompt": [USER("q1"), ASSISTANT("a1"), USER("q2")], "completion": [ASSISTANT("a2")]},
        [USER("q1"), ASSISTANT("a1"), USER("q2")], "a2", 3),
    "alpaca_system_history": (
        {"instruction": "and now", "input": "x", "output": "o3", "system": "sys",
         "history": [["q1", "a1"], ["q2", "a2"]]},
        [SYSTEM("sys"), USER("q1"), ASSISTANT("a1"), USER("q2"), ASSISTANT("a2"), USER("and now\n\nx")], "o3", 0),
    "prompt_response_system": ({"prompt": "p", "response": "r", "system": "s"}, [SYSTEM("s"), USER("p")], "r", 0),
    "chat_list_content": (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "text", "text": "here"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "seen"}]}]},
        [USER("look\nhere")], "seen", 0),
}


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("ext", [".jsonl", ".parquet", ".arrow", "_saved"])
def test_row_shapes(tmp_path, name, ext):
    row, messages, response, context = SHAPES[name]
    if ext == ".jsonl":
        path = jsonl(tmp_path / "d.jsonl", [row, row])
    else:
        path = table(tmp_path / f"d{ext}", [row, row])
    samples = load_samples([path])
    assert [(s.messages, s.response, s.context, s.row) for s in samples] == [(messages, response, context, 1),
                                                                             (messages, response, context, 2)]


def test_text_rows_supervise_every_token(tmp_path, chatml):
    path = jsonl(tmp_path / "t.jsonl", [{"text": "it is one"}])
    (s,) = load_samples([path])
    assert s.kind == "text" and s.response == "it is one" and s.messages == []
    ex, _ = tokenize_sample(chatml, s, DataConfig(train_on="last_assistant"))
    assert_tokens(chatml, ex, "[it is one <|im_end|>]")


def test_save_to_disk_dataset_dict_reads_data_split(tmp_path):
    import datasets

    rows = [{"prompt": "p1", "response": "r1"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list([{"prompt": "p2", "response": "r2"}])}
                         ).save_to_disk(str(tmp_path / "dd"))
    assert [s.response for s in load_samples([str(tmp_path / "dd")], split="test")] == ["r2"]
    with pytest.raises(DataError) as e:
        load_samples([str(tmp_path / "dd")], split="validation")
    assert "no split 'validation'" in one_line_error(e, str(tmp_path / "dd"))


def test_tool_messages_and_tools_column(tmp_path):
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    row = {"messages": [USER("add one"), {"role": "assistant", "tool_calls": [call]},
                        {"role": "tool", "content": "two", "tool_call_id": "c1"}, ASSISTANT("it is two")],
           "tools": [{"type": "function", "function": {"name": "add"}}]}
    for path in (jsonl(tmp_path / "t.jsonl", [row]), table(tmp_path / "t.parquet", [row])):
        (s,) = load_samples([path])
        assert s.tools == row["tools"] and s.response == "it is two"
        assert s.messages[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
        assert s.messages[2] == {"role": "tool", "content": "two", "tool_call_id": "c1"}


def test_sharegpt_function_call_and_observation(tmp_path):
    row = {"conversations": [{"from": "human", "value": "add one"},
                             {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 1}})},
                             {"from": "observation", "value": "two"}, {"from": "gpt", "value": "it is two"}],
           "tools": json.dumps([{"name": "add"}])}
    (s,) = load_samples([jsonl(tmp_path / "s.jsonl", [row])])
    assert s.messages[1]["tool_calls"] == [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]
    assert s.messages[2] == {"role": "tool", "content": "two"} and s.tools == [{"name": "add"}]


# ---------------------------------------------------------------------------------------------
# mapping keys


def test_column_and_role_mapping(tmp_path):
    qa = jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "id": 7}])
    (s,) = load_samples([qa], DataConfig(columns={"prompt": "question", "response": "answer"}))
    assert s.messages == [USER("q")] and s.response == "a"
    chat = jsonl(tmp_path / "c.jsonl", [{"dialog": [{"speaker": "human", "text": "hi"},
                                                    {"speaker": "bot", "text": "hello"}]}])
    cfg = DataConfig(columns={"messages": "dialog", "role": "speaker", "content": "text"},
                     roles={"human": "user", "bot": "assistant"})
    (s,) = load_samples([chat], cfg)
    assert s.messages == [USER("hi")] and s.response == "hello"
    # ShareGPT with its own role names mapped on top of the defaults
    sg = jsonl(tmp_path / "sg.jsonl", [{"conversations": [{"from": "asker", "value": "q"},
                                                          {"from": "gpt", "value": "a"}]}])
    (s,) = load_samples([sg], DataConfig(roles={"asker": "user"}))
    assert s.messages == [USER("q")]


def test_mapping_keys_are_set_through_the_config_file(tmp_path):
    cfg = load_config(None, ["data.columns={prompt: question, response: answer}", "data.roles={human: user}",
                             "data.train_on=last_assistant"])
    assert cfg.data.columns == {"prompt": "question", "response": "answer"} and cfg.data.roles == {"human": "user"}
    with pytest.raises(ConfigError, match="data.train_on"):
        load_config(None, ["data.train_on=everything"])


@pytest.mark.parametrize("cfg, rows, must_contain", [
    (DataConfig(columns={"prompt": "question", "reply": "answer"}), [{"question": "q", "answer": "a"}],
     "'data.columns.reply': unknown field"),
    (DataConfig(columns={"prompt": "question", "response": "answr"}), [{"question": "q", "answer": "a"}],
     "has no column 'answr'"),
    (DataConfig(columns={"prompt": "question", "response": "answer", "system": "sys"}),
     [{"question": "q", "answer": "a"}], "has no column 'sys'"),
    (DataConfig(columns={"text": "body"}), [{"prompt": "q", "response": "a", "body": "x"}], "would be ignored"),
    (DataConfig(columns={"role": "speaker"}), [{"prompt": "q", "response": "a"}],
     "'data.columns.role': not used by the prompt_response rows"),
    (DataConfig(roles={"bot": "assistant"}), [{"prompt": "q", "response": "a"}], "'data.roles'"),
    (DataConfig(roles={"bot": "robot"}), [{"prompt": "q", "response": "a"}], "'data.roles.bot'"),
])
def test_unknown_or_unused_mapping_keys_are_refused(tmp_path, cfg, rows, must_contain):
    path = jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError) as e:
        load_samples([path], cfg)
    assert must_contain in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------------
# one-line errors naming the file and row


@pytest.mark.parametrize("rows, row, must_contain", [
    ([{"messages": [USER("a"), ASSISTANT("b")]},
      {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                    ASSISTANT("b")]}], 2, "content part 0 is of type 'image_url'"),
    ([{"messages": [USER("a"), ASSISTANT("b")]}, {"messages": [USER("a"), {"role": "assistant", "content": "b",
                                                                           "weight": 0}]}],
     2, "'weight' that would be ignored"),
    ([SHAREGPT, {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}], 2,
     "data.roles"),
    ([{"messages": [USER("a"), {"role": "tool", "content": "x"}, ASSISTANT("b")]}], 1, "tool message must follow"),
    ([{"instruction": "i", "output": "o", "history": [["q"]]}], 1, "'history' item 0"),
    ([{"prompt": [USER("a")], "completion": [USER("b")]}], 1, "'completion' must start with an assistant"),
    ([{"text": ""}], 1, "field 'text'"),
])
def test_malformed_rows_name_file_and_row(tmp_path, rows, row, must_contain):
    path = jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_samples([path])
    assert must_contain in one_line_error(e, path, row)


@pytest.mark.parametrize("row, must_contain", [
    ({"messages": [USER("a"), ASSISTANT("b")], "prompt": "x", "response": "y"}, "'prompt', 'response' would be ignored"),
    ({"prompt": "a", "response": "b", "history": [["q", "a"]]}, "'history' would be ignored"),
    ({"prompt": "a", "response": "b", "chosen": "b", "rejected": "c"}, "'chosen', 'rejected' would be ignored"),
    ({"chosen": "b", "rejected": "c"}, "preference (DPO) pairs"),
])
def test_columns_another_shape_reads_are_refused(tmp_path, row, must_contain):
    path = jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError) as e:
        load_samples([path])
    assert must_contain in one_line_error(e, path)


def test_broken_arrow_and_plain_directory(tmp_path):
    bad = tmp_path / "x.arrow"
    bad.write_bytes(b"not arrow at all")
    with pytest.raises(DataError) as e:
        load_samples([str(bad)])
    assert "cannot be read as Arrow" in one_line_error(e, str(bad))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError) as e:
        load_samples([str(tmp_path / "plain")])
    assert "save_to_disk" in one_line_error(e, str(tmp_path / "plain"))


# ---------------------------------------------------------------------------------------------
# supervision on real tokenizers

CHATML = (
    "{% if tools %}<|im_start|>system tools : {% for t in tools %}{{ t['function']['name'] }} {% endfor %}"
    "<|im_end|> {% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% if m.get('tool_calls') %}call {% for c in m['tool_calls'] %}{{ c['function']['name'] }} {% endfor %}"
    "{% else %}{{ m['content'] }} {% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
WORDS = ("system user assistant tool tools call add what is one two and it be brief hi hello fine q a "
         "Q A : ### System Instruction Response it's").split()


def word_tokenizer(template=CHATML, words=WORDS):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<s>", "<|im_end|>", "<|im_start|>"]
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=special, min_frequency=1))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = template
    return tok


@pytest.fixture
def chatml():
    return word_tokenizer()


def assert_tokens(tok, ex, marked: str):
    """`marked`: the expected tokens, the supervised ones in [brackets]."""
    want_ids, want_labels, on = [], [], False
    for word in marked.split():
        start, end = word.startswith("["), word.endswith("]")
        word = word.strip("[]")
        on = on or start
        tid = tok.convert_tokens_to_ids(word)
        assert tid != tok.unk_token_id or word == "<unk>", word
        want_ids.append(tid)
        want_labels.append(tid if on else IGNORE_INDEX)
        on = on and not end
    got = " ".join(f"[{t}]" if lab != IGNORE_INDEX else t
                   for t, lab in zip(tok.convert_ids_to_tokens(ex["input_ids"]), ex["labels"]))
    assert (ex["input_ids"], ex["labels"]) == (want_ids, want_labels), got


TWO_TURNS = Sample([SYSTEM("be brief"), USER("what is one"), ASSISTANT("it is one"), USER("and two")], "it is two",
                   "t.jsonl", 1)
TWO_TURNS_TOKENS = {
    "all_assistant": "<|im_start|> system be brief <|im_end|> <|im_start|> user what is one <|im_end|> "
                     "<|im_start|> assistant [it is one <|im_end|>] <|im_start|> user and two <|im_end|> "
                     "<|im_start|> assistant [it is two <|im_end|>]",
    "last_assistant": "<|im_start|> system be brief <|im_end|> <|im_start|> user what is one <|im_end|> "
                      "<|im_start|> assistant it is one <|im_end|> <|im_start|> user and two <|im_end|> "
                      "<|im_start|> assistant [it is two <|im_end|>]",
    "all": "[<|im_start|> system be brief <|im_end|> <|im_start|> user what is one <|im_end|> "
           "<|im_start|> assistant it is one <|im_end|> <|im_start|> user and two <|im_end|> "
           "<|im_start|> assistant it is two <|im_end|>]",
}


@pytest.mark.parametrize("train_on", list(TWO_TURNS_TOKENS))
def test_chat_template_masks_exactly_the_assistant_turns(chatml, train_on):
    ex, truncated = tokenize_sample(chatml, TWO_TURNS, DataConfig(train_on=train_on))
    assert_tokens(chatml, ex, TWO_TURNS_TOKENS[train_on])
    assert not truncated


@pytest.mark.parametrize("overrides", [["data.mask_prompt=false"], ["data.mask_prompt=true", "data.train_on=all"],
                                       ["data.mask_prompt=maybe"]])
def test_mask_prompt_is_refused_naming_train_on(overrides):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert "'data.mask_prompt'" in msg and "data.train_on" in msg and "\n" not in msg
    assert e.value.exit_code == 2


@pytest.mark.parametrize("mask, train_on", [(True, "all_assistant"), (True, "last_assistant"), (False, "all")])
def test_a_saved_config_with_an_agreeing_mask_prompt_still_loads(tmp_path, mask, train_on):
    """config.yaml files written before data.mask_prompt was retired hold it beside data.train_on."""
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {"mask_prompt": mask, "train_on": train_on}}))
    assert load_config(str(path)).data.train_on == train_on


def test_tool_turns_rendered_and_only_assistant_turns_supervised(tmp_path, chatml):
    call = {"type": "function", "function": {"name": "add", "arguments": {}}}
    row = {"messages": [USER("what is one and one"), {"role": "assistant", "tool_calls": [call]},
                        {"role": "tool", "content": "two"}, ASSISTANT("it is two")],
           "tools": [{"type": "function", "function": {"name": "add"}}]}
    (s,) = load_samples([jsonl(tmp_path / "t.jsonl", [row])])
    ex, _ = tokenize_sample(chatml, s, DataConfig())
    assert_tokens(chatml, ex, "<|im_start|> system tools : add <|im_end|> <|im_start|> user what is one and one "
                              "<|im_end|> <|im_start|> assistant [call add <|im_end|>] <|im_start|> tool two "
                              "<|im_end|> <|im_start|> assistant [it is two <|im_end|>]")


def test_prompt_completion_prompt_turns_are_never_supervised(tmp_path, chatml):
    row = {"prompt": [USER("q"), ASSISTANT("a"), USER("what is one")], "completion": [ASSISTANT("it is one")]}
    (s,) = load_samples([jsonl(tmp_path / "pc.jsonl", [row])])
    ex, _ = tokenize_sample(chatml, s, DataConfig(train_on="all_assistant"))
    assert_tokens(chatml, ex, "<|im_start|> user q <|im_end|> <|im_start|> assistant a <|im_end|> "
                              "<|im_start|> user what is one <|im_end|> <|im_start|> assistant [it is one <|im_end|>]")


def test_template_that_rewrites_earlier_turns_falls_back_to_the_last_turn(chatml):
    """A template that drops earlier answers' text once later turns follow (as reasoning
    templates do): the prefixes are not prefixes of the whole, so only the final answer is
    supervised, and the row is counted in the report."""
    rewriting = CHATML.replace("{% else %}{{ m['content'] }} {% endif %}",
                               "{% elif m['role'] == 'assistant' and not loop.last %}it {% else %}"
                               "{{ m['content'] }} {% endif %}")
    tok = word_tokenizer(rewriting)
    ts = tokenize_samples(tok, [TWO_TURNS], DataConfig(train_on="all_assistant"))
    assert_tokens(tok, ts.examples[0], "<|im_start|> system be brief <|im_end|> <|im_start|> user what is one "
                                       "<|im_end|> <|im_start|> assistant it <|im_end|> <|im_start|> user and two "
                                       "<|im_end|> <|im_start|> assistant [it is two <|im_end|>]")
    assert ts.n_last_turn == 1 and "1 supervised on their last assistant turn only" in ts.report("train")
    assert tokenize_samples(tok, [TWO_TURNS], DataConfig(train_on="last_assistant")).n_last_turn == 0


def test_unstable_prefix_tokenization_tokenizes_turn_by_turn(tmp_path):
    """The generation prompt ends in 'it' and the answer starts with "'s": tokenized whole, the
    boundary merges into one token (it's); the turns are then tokenized piece by piece, so the
    supervised tokens are exactly the answer's."""
    from tokenizers import pre_tokenizers

    template = CHATML.replace("<|im_start|>assistant {% endif %}", "<|im_start|>assistant it{% endif %}") \
        .replace("{% else %}{{ m['content'] }} {% endif %}",
                 "{% elif m['role'] == 'assistant' %}it{{ m['content'] }} {% else %}{{ m['content'] }} {% endif %}")
    tok = word_tokenizer(template)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    s = Sample([USER("hi")], "'s fine", "t.jsonl", 1)
    whole = tok(tok.apply_chat_template(s.conversation, tokenize=False), add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("it's") in whole  # the merge really happens
    ex, _ = tokenize_sample(tok, s, DataConfig())
    assert tok.convert_ids_to_tokens(ex["input_ids"]) == ["<|im_start|>", "user", "hi", "<|im_end|>", "<|im_start|>",
                                                          "assistant", "it", "<unk>", "fine", "<|im_end|>"]
    assert [lab != IGNORE_INDEX for lab in ex["labels"]] == [False] * 7 + [True] * 3


def test_chat_template_override_from_a_jinja_file(tmp_path, chatml):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <|im_end|> {% endfor %}"
                    "{% if add_generation_prompt %}assistant : {% endif %}")
    cfg = DataConfig(chat_template=str(path), train_on="all_assistant")
    ex, _ = tokenize_sample(chatml, Sample([USER("hi")], "hello", "t", 1), cfg)
    assert_tokens(chatml, ex, "user : hi <|im_end|> assistant : [hello <|im_end|>]")
    assert render_prompt(chatml, "hi") == "user : hi <|im_end|> assistant : "  # generation renders the same
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ConfigError, match="data.chat_template.*bad.jinja"):
        tokenize_sample(chatml, Sample([USER("hi")], "hello", "t", 1), DataConfig(chat_template=str(tmp_path / "bad.jinja")))
    with pytest.raises(ConfigError, match="not found"):
        load_samples([jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])],
                     DataConfig(chat_template=str(tmp_path / "nope.jinja")))


def test_template_that_cannot_render_tools_is_one_line(tmp_path):
    tok = word_tokenizer("{% for m in messages %}{% if m['role'] != 'tool' %}{{ m['content'] }} {% endif %}"
                         "{% endfor %}")
    row = {"messages": [USER("add"), ASSISTANT("call"), {"role": "tool", "content": "seven"}, ASSISTANT("it is two")]}
    path = jsonl(tmp_path / "t.jsonl", [row])
    with pytest.raises(DataError) as e:
        tokenize_samples(tok, load_samples([path]), DataConfig())
    assert "does not render tool messages" in one_line_error(e, path, 1)


PLAIN = DataConfig(template="plain", plain_template="Q : {prompt} A :")


@pytest.mark.parametrize("train_on, marked", [
    ("all_assistant", "### System : be brief Q : what is one A : [it is one <|im_end|>] Q : and two A : "
                      "[it is two <|im_end|>]"),
    ("last_assistant", "### System : be brief Q : what is one A : it is one <|im_end|> Q : and two A : "
                       "[it is two <|im_end|>]"),
    ("all", "[### System : be brief Q : what is one A : it is one <|im_end|> Q : and two A : it is two <|im_end|>]"),
])
def test_plain_template_keeps_the_roles_in_multi_turn_rows(chatml, train_on, marked):
    import dataclasses

    ex, _ = tokenize_sample(chatml, TWO_TURNS, dataclasses.replace(PLAIN, train_on=train_on))
    assert_tokens(chatml, ex, marked)
    prompt = render_prompt(chatml, TWO_TURNS.messages, "plain", PLAIN.plain_template)
    assert prompt == "### System:\nbe brief\n\nQ : what is one A :it is one<|im_end|>Q : and two A :"


def test_plain_template_refuses_tool_turns(chatml):
    s = Sample([USER("add"), ASSISTANT("x"), {"role": "tool", "content": "two"}], "it is two", "f.jsonl", 3)
    with pytest.raises(DataError, match=r"f\.jsonl' row 3: tool messages .* need a chat template"):
        tokenize_sample(chatml, s, PLAIN)


def test_truncation_keeps_earlier_turns_and_drops_rows_left_unsupervised(chatml):
    ex, truncated = tokenize_sample(chatml, TWO_TURNS, DataConfig(max_length=14))
    assert truncated and len(ex["input_ids"]) == 14
    assert [lab != IGNORE_INDEX for lab in ex["labels"]][-3:] == [False, False, True]  # "it" of the first answer
    ts = tokenize_samples(chatml, [TWO_TURNS, TWO_TURNS], DataConfig(max_length=20))
    assert ts.n_truncated == 2 and len(ts.examples) == 2
    with pytest.raises(DataError, match="every example was dropped"):
        tokenize_samples(chatml, [TWO_TURNS], DataConfig(max_length=11, train_on="last_assistant"))


# ---------------------------------------------------------------------------------------------
# eval reads the same shapes


def test_eval_reads_chat_rows_with_context(tmp_path):
    path = jsonl(tmp_path / "e.jsonl", [
        {"messages": [SYSTEM("be brief"), USER("q1"), ASSISTANT("a1"), USER("q2")], "category": "c"},
        {"messages": [USER("q3"), ASSISTANT("a3")]},
    ])
    rows = read_eval_set(path)
    assert rows[0] == {"prompt": "q2", "messages": [SYSTEM("be brief"), USER("q1"), ASSISTANT("a1"), USER("q2")],
                       "category": "c"}
    assert rows[1] == {"prompt": "q3", "response": "a3"}
    assert read_eval_set(path, fmt="chat") == rows
    with pytest.raises(DataError) as e:
        read_eval_set(path, require_response=True)
    assert "needs a 'response'" in one_line_error(e, path, 1)


def test_eval_reads_sharegpt_alpaca_parquet_and_txt(tmp_path):
    sg = jsonl(tmp_path / "sg.jsonl", [SHAREGPT])
    (row,) = read_eval_set(sg)
    assert row["prompt"] == "and you" and row["response"] == "fine" and len(row["messages"]) == 4
    alpaca = table(tmp_path / "a.parquet", [{"instruction": "do it", "input": "", "output": "done"}])
    assert read_eval_set(alpaca) == [{"prompt": "do it", "response": "done"}]
    txt = tmp_path / "prompts.txt"
    txt.write_text("first prompt\n\n  second prompt  \n")
    assert read_eval_set(str(txt)) == [{"prompt": "first prompt"}, {"prompt": "second prompt"}]
    saved = table(tmp_path / "saved", [{"prompt": "p", "response": "r"}])
    assert read_eval_set(saved) == [{"prompt": "p", "response": "r"}]


def test_eval_errors_name_file_and_line(tmp_path):
    path = jsonl(tmp_path / "e.jsonl", [{"messages": [USER("a")]}, {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError) as e:
        read_eval_set(path)
    assert "data.roles" in one_line_error(e, path, 2)
    text_rows = jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="text rows have no prompt"):
        read_eval_set(text_rows)


def test_eval_honours_data_columns_and_roles(tmp_path):
    mapping = DataConfig(columns={"prompt": "question", "response": "answer"})
    qa = jsonl(tmp_path / "qa.jsonl", [{"question": "q1", "answer": "a1", "category": "c"}, {"question": "q2"}])
    assert read_eval_set(qa, data=mapping) == [{"prompt": "q1", "response": "a1", "category": "c"}, {"prompt": "q2"}]
    with pytest.raises(DataError, match="no known row shape"):
        read_eval_set(qa)
    prompts_only = jsonl(tmp_path / "harmful.jsonl", [{"question": "q3"}])  # the mapped answer column is absent
    assert read_eval_set(prompts_only, data=mapping) == [{"prompt": "q3"}]
    csv_file = tmp_path / "qa.csv"
    csv_file.write_text("Question,Answer\nq4,a4\n")
    assert read_eval_set(str(csv_file), data=DataConfig(columns={"prompt": "Question", "response": "Answer"})) == [
        {"prompt": "q4", "response": "a4"}]
    chat = jsonl(tmp_path / "chat.jsonl", [{"dialog": [{"speaker": "boss", "text": "be brief"},
                                                       {"speaker": "human", "text": "hi"},
                                                       {"speaker": "bot", "text": "hello"}]}])
    roles = DataConfig(columns={"messages": "dialog", "role": "speaker", "content": "text"},
                       roles={"boss": "system", "human": "user", "bot": "assistant"})
    assert read_eval_set(chat, data=roles) == [{"prompt": "hi", "messages": [SYSTEM("be brief"), USER("hi")],
                                                "response": "hello"}]
    with pytest.raises(DataError) as e:  # a role the mapping does not name
        read_eval_set(chat, data=DataConfig(columns=roles.columns))
    assert "data.roles" in one_line_error(e, chat, 1)


def test_eval_hub_name_offline_is_one_line_exit_2(tmp_path, tiny_world):
    """An eval set named like a hub dataset, with the hub unreachable (HF_HUB_OFFLINE), stops
    `dist-secvec eval` with one line naming the key and saying what to do, before the model loads."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "DIST_SECVEC_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "dist_secvec", "eval", f"model.path={tiny_world.model_dir}",
                           "eval.harmful_prompts=[nobody-here/no-such-eval-set]", f"output_dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if "nobody-here/no-such-eval-set" in ln] or [proc.stderr]
    assert "eval.harmful_prompts" in line and "HF_HUB_OFFLINE" in line
    assert "download it" in line and "local file" in line
    assert not (tmp_path / "out").exists()


def test_eval_and_training_read_a_downloaded_hub_dataset_directory(tmp_path, monkeypatch):
    """A directory as `huggingface-cli download --repo-type dataset` leaves it (data files in a
    subfolder, no save_to_disk files) is read by datasets.load_dataset, offline."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    snap = tmp_path / "snapshot"
    (snap / "data").mkdir(parents=True)
    datasets.Dataset.from_list([{"prompt": "p1", "category": "x"}, {"prompt": "p2", "category": "y"}]).to_parquet(
        str(snap / "data" / "train-00000-of-00001.parquet"))
    assert read_eval_set(str(snap)) == [{"prompt": "p1", "category": "x"}, {"prompt": "p2", "category": "y"}]
    train = tmp_path / "train_snapshot"
    (train / "data").mkdir(parents=True)
    datasets.Dataset.from_list([{"prompt": "p", "response": "r"}]).to_parquet(
        str(train / "data" / "train-00000-of-00001.parquet"))
    (s,) = load_samples([str(train)])
    assert (s.prompt, s.response, s.row) == ("p", "r", 1)


def test_responses_file_names_verdicts_for_what_they_mean(tmp_path):
    """eval writes {"harmful": {judge: bool}}; re-reading the file (judge-only mode) keeps working."""
    import inspect

    from dist_secvec import evaluate

    src = inspect.getsource(evaluate.run_eval)
    assert '"harmful": {name: vs[i]' in src and '"verdicts"' not in src
    path = jsonl(tmp_path / "responses.jsonl", [{"prompt": "p", "response": "r", "category": None,
                                                 "harmful": {"refusal": True}}])
    assert read_eval_set(path, require_response=True) == [{"prompt": "p", "response": "r"}]


def test_stage2_reads_mapped_columns(tiny_world, tmp_path):
    """data.columns reaches stage 2's reader: a file with its own column names trains on them."""
    import json

    from dist_secvec.config import load_config
    from dist_secvec.stage2 import setup_stage2

    rows = [json.loads(line) for line in open(tiny_world.data["new_task_ft"])][:6]
    mapped = tmp_path / "mapped.jsonl"
    mapped.write_text("".join(json.dumps({"question": r["prompt"], "answer": r["response"]}) + "\n" for r in rows))
    common = [f"model.path={tiny_world.model_dir}", f"data.train={mapped}", "optim.max_steps=1",
              f"output_dir={tmp_path / 'ft'}", "logging.progress=false"]
    with pytest.raises(Exception, match="question|prompt"):
        setup_stage2(load_config(None, common))
    job = setup_stage2(load_config(None, common + ["data.columns={prompt: question, response: answer}"]))
    assert len(job.train.examples) == len(rows)


def test_generation_blocks_give_the_supervised_tokens(tmp_path):
    """A template that marks its answers with {% generation %} blocks: the tokenizer's assistant mask
    gives each turn's span. Here the generation prompt stops short of how a finished turn starts
    (": "), which the blocks leave out and rendering prefixes cannot."""
    def template(mark: bool) -> str:
        g, eg = ("{% generation %}", "{% endgeneration %}") if mark else ("", "")
        return ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|> assistant : " + g
                + "{{ m['content'] }} <|im_end|>" + eg + " {% else %}<|im_start|> {{ m['role'] }} {{ m['content'] }} "
                "<|im_end|> {% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")

    row = Sample([USER("what is one"), ASSISTANT("it is one"), USER("and two")], "it is two", "t.jsonl", 1)
    prompt = "<|im_start|> user what is one <|im_end|> <|im_start|> assistant : "
    ex, _ = tokenize_sample(word_tokenizer(template(True)), row, DataConfig(train_on="all_assistant"))
    assert_tokens(word_tokenizer(), ex, prompt + "[it is one <|im_end|>] <|im_start|> user and two <|im_end|> "
                  "<|im_start|> assistant : [it is two <|im_end|>]")
    ex, _ = tokenize_sample(word_tokenizer(template(True)), row, DataConfig(train_on="last_assistant"))
    assert_tokens(word_tokenizer(), ex, prompt + "it is one <|im_end|> <|im_start|> user and two <|im_end|> "
                  "<|im_start|> assistant : [it is two <|im_end|>]")
    ex, _ = tokenize_sample(word_tokenizer(template(False)), row, DataConfig(train_on="all_assistant"))
    assert_tokens(word_tokenizer(), ex, "<|im_start|> user what is one <|im_end|> <|im_start|> assistant [: it is one "
                  "<|im_end|>] <|im_start|> user and two <|im_end|> <|im_start|> assistant [: it is two <|im_end|>]")
    tok, renders = word_tokenizer(template(True)), []
    real = type(tok).apply_chat_template
    tok.apply_chat_template = lambda *a, **k: renders.append(k.get("tokenize")) or real(tok, *a, **k)
    tokenize_sample(tok, row, DataConfig(train_on="all_assistant"))
    assert len(renders) == 1  # the mask's own rendering only: each row is rendered once


BPE_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bpe_tokenizer():
    """A byte-level BPE tokenizer (as GPT-2, Llama 3, Qwen, SmolLM use), trained here on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ["system\nbe brief", "user\nwhat is one? and two?", "assistant\nit is one. it is two.",
              "Hello there, how are you today? I am fine."] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  bos_token="<|im_start|>")
    tok.chat_template = BPE_CHATML
    return tok


@pytest.mark.parametrize("system", [False, True])
def test_byte_level_bpe_template_supervises_exactly_each_answer(system):
    """With a byte-level BPE tokenizer (merges across "\\n" and spaces): each assistant turn's
    supervised tokens decode to exactly its text and the end-of-turn token, nothing else."""
    tok = bpe_tokenizer()
    turns = ([SYSTEM("be brief")] if system else []) + [USER("what is one?"), ASSISTANT("it is one."),
                                                        USER("and two?")]
    ex, _ = tokenize_sample(tok, Sample(turns, "it is two.", "t.jsonl", 1), DataConfig(train_on="all_assistant"))
    full = tok.apply_chat_template(turns + [ASSISTANT("it is two.")], tokenize=False)
    assert tok.decode(ex["input_ids"]) == full  # the whole conversation, as the template renders it
    runs, cur = [], []
    for t, lab in zip(ex["input_ids"], ex["labels"]):
        if lab != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    assert [tok.decode(r) for r in runs] == ["it is one.<|im_end|>", "it is two.<|im_end|>"]
