"""model.gguf_file: a GGUF checkpoint converted once to a safetensors directory in the cache, which
every stage then loads (and fingerprints) as an ordinary model directory. The GGUF file is written
here with the gguf package: a tiny Llama with a byte-level BPE tokenizer and a chat template."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_secvec.config import load_config, validate
from dist_secvec.errors import ConfigError

CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_tiny_gguf(path: Path, layers: int = 2, hidden: int = 32, ffn: int = 64, heads: int = 4, kv: int = 2,
                    seed: int = 0) -> Path:
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    tokens = specials + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    head = hidden // heads
    w.add_tensor("token_embd.weight", rand(len(tokens), hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(kv * head, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(kv * head, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, ffn))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("DIST_SECVEC_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_converted_once_and_loads_as_the_gguf_does(tiny_gguf, cache, caplog, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_secvec.model import check_model_dir, gguf_model_dir, load_model, load_tokenizer
    from dist_secvec.config import ModelConfig

    with caplog.at_level(logging.INFO, logger="dist_secvec.model"):
        out = gguf_model_dir(str(tiny_gguf))
    assert out.parent == cache / "gguf" and any("converting GGUF" in r.message for r in caplog.records)
    assert "GGUF tensors" not in capsys.readouterr().err  # the reader's own bar: not off a terminal
    check_model_dir(str(out))  # safetensors weights, config.json: an ordinary model directory
    source = json.loads((out / "gguf_source.json").read_text())
    assert source["gguf_file"] == str(tiny_gguf) and len(source["sha256"]) == 64

    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32)
    direct_tok = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    model, tok = load_model(ModelConfig(path=str(out))), load_tokenizer(ModelConfig(path=str(out)))
    ids = torch.tensor([tok("the cat in the hat").input_ids])
    assert ids.tolist() == [direct_tok("the cat in the hat").input_ids]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, direct(input_ids=ids).logits)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == direct_tok.apply_chat_template(msgs, tokenize=False)

    mtime = (out / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dist_secvec.model"):
        assert gguf_model_dir(str(tiny_gguf)) == out  # the second stage, rank or run: no conversion
    assert not any("converting GGUF" in r.message for r in caplog.records)
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_another_file_content_gets_its_own_directory(tiny_gguf, tmp_path, cache):
    from dist_secvec.model import gguf_model_dir

    other = write_tiny_gguf(tmp_path / "tiny.gguf", seed=1)  # same name, other weights
    assert gguf_model_dir(str(other)) != gguf_model_dir(str(tiny_gguf))


def test_config_key_resolves_relative_to_model_path(tiny_gguf):
    cfg = validate(load_config(None, [f"model.path={tiny_gguf.parent}", f"model.gguf_file={tiny_gguf.name}",
                                      "data.train=x.jsonl", "output_dir=/tmp/unused"]), "eval")
    assert cfg.model.gguf_file == str(tiny_gguf)
    cfg = validate(load_config(None, [f"model.gguf_file={tiny_gguf}", "output_dir=/tmp/unused"]), "eval")
    assert cfg.model.gguf_file == str(tiny_gguf) and cfg.model.path == ""  # model.path not required


@pytest.mark.parametrize("value,msg", [("missing.gguf", "not found"), ("model.safetensors", "is not a .gguf file")])
def test_bad_gguf_file_is_one_line(tmp_path, value, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        validate(load_config(None, [f"model.gguf_file={tmp_path / value}", "output_dir=/tmp/unused"]), "train-sv")
    assert "model.gguf_file" in str(e.value) and "\n" not in str(e.value)


def test_not_a_gguf_file_is_a_user_error(tmp_path, cache):
    from dist_secvec.errors import UserError
    from dist_secvec.model import gguf_model_dir

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(UserError, match="cannot load GGUF checkpoint"):
        gguf_model_dir(str(bad))
    assert not list((cache / "gguf").glob("broken-*/"))  # nothing half-written left as a finished entry


@pytest.mark.slow
def test_both_stages_run_from_a_gguf_file_through_the_cli(tiny_gguf, tmp_path, cache, tiny_world):
    """train-sv and finetune given only model.gguf_file: the vector's fingerprint is the converted
    directory's, and stage 2 accepts the vector on the same file."""
    from dist_secvec.cli import main

    common = [f"model.gguf_file={tiny_gguf}", "logging.progress=false", "optim.micro_batch_size=4",
              "optim.max_steps=2", "data.template=plain"]
    assert main(["train-sv", *common, f"security_vector.harmful_data={tiny_world.data['harmful_sv']}",
                 "security_vector.kl_weight=0", "security_vector.rank=2", f"output_dir={tmp_path / 'sv'}"]) == 0
    meta = json.loads((tmp_path / "sv" / "secvec" / "secvec.json").read_text())
    assert Path(meta["base_model"]).parent == cache / "gguf"
    assert main(["finetune", *common, f"data.train={tiny_world.data['new_task_ft']}",
                 f"security_vector.path={tmp_path / 'sv' / 'secvec'}", f"output_dir={tmp_path / 'ft'}"]) == 0
    saved = (tmp_path / "ft" / "config.yaml").read_text()
    assert str(cache / "gguf") in saved and "gguf_file: null" in saved
