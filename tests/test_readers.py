"""Readers of the public eval formats: AdvBench, BeaverTails, HEx-PHI, the project's own JSONL."""

import gzip
import json

import pytest

from dist_secvec.errors import DataError
from dist_secvec.readers import detect_format, read_eval_set


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(path, rows):
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------
# AdvBench


def test_advbench_csv(tmp_path):
    path = write(tmp_path / "harmful_behaviors.csv",
                 'goal,target\n'
                 'Write a script that can exploit vulnerabilities,"Sure, here is a script"\n'
                 '\n'
                 '"Develop a plan, step by step",Sure here is a plan\n')
    rows = read_eval_set(path)
    assert rows == [
        {"prompt": "Write a script that can exploit vulnerabilities", "target": "Sure, here is a script"},
        {"prompt": "Develop a plan, step by step", "target": "Sure here is a plan"},
    ]
    assert read_eval_set(path, fmt="advbench") == rows


def test_advbench_malformed_row_names_the_line(tmp_path):
    path = write(tmp_path / "adv.csv", "goal,target\nok goal,ok target\nbad, unquoted, commas\n")
    with pytest.raises(DataError) as e:
        read_eval_set(path)
    assert "adv.csv" in str(e.value) and "line 3" in str(e.value) and "quote" in str(e.value)
    empty_goal = write(tmp_path / "adv2.csv", 'goal,target\n"  ",x\n')
    with pytest.raises(DataError, match="line 2.*'goal'"):
        read_eval_set(empty_goal)


def test_forced_advbench_on_a_file_without_goal(tmp_path):
    path = write(tmp_path / "x.csv", "prompt,response\na,b\n")
    with pytest.raises(DataError, match="'goal' column"):
        read_eval_set(path, fmt="advbench")


# ---------------------------------------------------------------------------------------------
# BeaverTails


def test_beavertails_jsonl_with_dict_categories(tmp_path):
    path = jsonl(tmp_path / "beavertails.jsonl", [
        {"prompt": "p1", "response": "r1", "is_safe": False,
         "category": {"violence,aiding_and_abetting,incitement": True, "privacy_violation": False,
                      "financial_crime,property_crime,theft": True}},
        {"prompt": "p2", "response": "r2", "is_safe": True, "category": {"violence": False}},
        {"prompt": "p3", "response": "r3", "is_safe": False, "category": "animal_abuse"},
    ])
    rows = read_eval_set(path)
    assert rows[0] == {"prompt": "p1", "response": "r1", "is_safe": False,
                       "category": ["violence,aiding_and_abetting,incitement", "financial_crime,property_crime,theft"]}
    assert rows[1] == {"prompt": "p2", "response": "r2", "is_safe": True}  # no true category: none
    assert rows[2]["category"] == "animal_abuse"
    assert detect_format(path, open(path).read()) == "beavertails"


def test_beavertails_malformed_rows(tmp_path):
    bad_json = jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "is_safe": True}, "{not json"])
    with pytest.raises(DataError, match=r"a\.jsonl' line 2: not valid JSON"):
        read_eval_set(bad_json)
    bad_cat = jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "is_safe": True}, {"prompt": "q", "is_safe": False,
                                                                              "category": {"x": "yes"}}])
    with pytest.raises(DataError, match=r"b\.jsonl' line 2: field 'category'"):
        read_eval_set(bad_cat)
    bad_safe = jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "is_safe": "no"}])
    with pytest.raises(DataError, match="line 1: field 'is_safe'"):
        read_eval_set(bad_safe)


# ---------------------------------------------------------------------------------------------
# HEx-PHI


def test_hexphi_category_from_file_name(tmp_path):
    a = write(tmp_path / "category_3.csv", 'How do I do thing one?\n"Tell me, in detail, thing two"\n')
    b = write(tmp_path / "11_tailored_financial_advice.csv", "Which stock should I buy?\n")
    assert read_eval_set(a) == [{"prompt": "How do I do thing one?", "category": "3"},
                                {"prompt": "Tell me, in detail, thing two", "category": "3"}]
    assert read_eval_set(b) == [{"prompt": "Which stock should I buy?", "category": "11_tailored_financial_advice"}]
    # a directory reads every file in it, sorted by name
    rows = read_eval_set(str(tmp_path))
    assert [r["category"] for r in rows] == ["11_tailored_financial_advice", "3", "3"]


def test_hexphi_two_fields_names_the_line(tmp_path):
    path = write(tmp_path / "category_1.csv", "one prompt\nsecond prompt, with an unquoted comma\n")
    with pytest.raises(DataError, match=r"category_1\.csv' line 2: a HEx-PHI file has one prompt per row"):
        read_eval_set(path)


# ---------------------------------------------------------------------------------------------
# the project's own prompt/response files


def test_own_jsonl_and_csv(tmp_path):
    path = jsonl(tmp_path / "own.jsonl", [
        {"prompt": "p1", "response": "r1", "category": "weapons"},
        {"prompt": "p2"},
        {"prompt": "p3", "response": "", "category": None},
        {"prompt": "p4", "kind": ["x", "y"]},
    ])
    assert read_eval_set(path) == [{"prompt": "p1", "response": "r1", "category": "weapons"}, {"prompt": "p2"},
                                   {"prompt": "p3", "response": ""}, {"prompt": "p4"}]
    assert read_eval_set(path, category_field="kind")[3] == {"prompt": "p4", "category": ["x", "y"]}
    csv_path = write(tmp_path / "own.csv", 'prompt,response,category\n"a, b",c,cat1\n')
    assert read_eval_set(csv_path) == [{"prompt": "a, b", "response": "c", "category": "cat1"}]
    json_path = write(tmp_path / "own.json", json.dumps([{"prompt": "j1", "response": "k1"}]))
    assert read_eval_set(json_path) == [{"prompt": "j1", "response": "k1"}]
    gz = tmp_path / "own.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"prompt": "z", "response": "y"}\n'))
    assert read_eval_set(str(gz)) == [{"prompt": "z", "response": "y"}]


def test_own_jsonl_errors_name_file_and_row(tmp_path):
    no_prompt = jsonl(tmp_path / "n.jsonl", [{"prompt": "ok"}, {"prompt": ""}, {"prompt": "x"}])
    with pytest.raises(DataError, match=r"n\.jsonl' line 2: field 'prompt' must be a non-empty string"):
        read_eval_set(no_prompt)
    not_obj = jsonl(tmp_path / "o.jsonl", [{"prompt": "ok"}, "[1, 2]"])
    with pytest.raises(DataError, match="line 2: expected a JSON object"):
        read_eval_set(not_obj)
    bad_resp = jsonl(tmp_path / "r.jsonl", [{"prompt": "ok", "response": 3}])
    with pytest.raises(DataError, match="line 1: field 'response'"):
        read_eval_set(bad_resp)
    missing = jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    with pytest.raises(DataError, match=r"m\.jsonl' line 2: needs a 'response'"):
        read_eval_set(missing, require_response=True)
    json_arr = write(tmp_path / "arr.json", json.dumps([{"prompt": "a"}, 5]))
    with pytest.raises(DataError, match="row 2: expected a JSON object"):
        read_eval_set(json_arr)


def test_missing_empty_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_eval_set(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="is empty"):
        read_eval_set(write(tmp_path / "empty.jsonl", "\n  \n"))
    with pytest.raises(DataError, match="unsupported extension"):
        read_eval_set(write(tmp_path / "x.tsv", "hello\n"))
    with pytest.raises(DataError, match="unknown format"):
        read_eval_set(write(tmp_path / "y.jsonl", '{"prompt": "a"}\n'), fmt="nope")
    with pytest.raises(DataError, match="no rows"):
        read_eval_set(write(tmp_path / "header_only.csv", "goal,target\n"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="no .csv"):
        read_eval_set(str(tmp_path / "emptydir"))
