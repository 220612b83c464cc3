"""Model and tokenizer loading (fp32/bf16, bitsandbytes NF4/FP4/int8 on CPU) and the trainable part.

The quantized checks use a hidden-64 copy of the tiny Llama (same tokenizer): bitsandbytes' CPU
inference path packs 4-bit weights in blocks of 64 input features and fails on the fixture's
hidden-32 linears ("shape '[32, 0]' is invalid"), a limit of the kernel, not of the library.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dist_secvec.config import AdapterConfig, ModelConfig
from dist_secvec.errors import UserError
from dist_secvec.model import (add_trainable_adapter, count_parameters, load_model, load_tokenizer,
                               unwrap_base)

PROMPTS = ["what is the capital of {c} ?", "please tell me what is 3 plus 4 .", "how do I rob the bank ?"]


@pytest.fixture(scope="module")
def model64(tiny_world, tmp_path_factory) -> Path:
    """A random tiny Llama with 64-wide linears, saved with the tiny world's tokenizer."""
    from transformers import AutoTokenizer

    from dist_secvec.worlds.embedded import build_tiny_llama

    out = tmp_path_factory.mktemp("model64")
    tok = AutoTokenizer.from_pretrained(str(tiny_world.model_dir))
    build_tiny_llama(tok, out, seed=1, hidden=64, layers=2)
    return out


def batch(tok):
    enc = tok([p.format(c="lobri") for p in PROMPTS], return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs).logits.float()
    mask = inputs["attention_mask"].bool()
    return out[mask]  # real positions only


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


# ---------------------------------------------------------------------------------------------
# full-precision loading


def test_load_fp32_frozen_and_same_as_transformers(tiny_world):
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(path=str(tiny_world.model_dir))
    model = load_model(cfg)
    tok = load_tokenizer(cfg)
    params = list(model.named_parameters())
    assert params and all(p.dtype == torch.float32 for _, p in params)
    assert not any(p.requires_grad for _, p in params)
    assert count_parameters(model) == (0, sum(p.numel() for _, p in params))
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_world.model_dir)).eval()
    x = batch(tok)
    torch.testing.assert_close(logits(model, x), logits(ref, x), rtol=0, atol=0)
    assert model.generation_config.pad_token_id is not None


def checkpointing_on(model) -> bool:
    """Whether any module recomputes its activations (what either transformers name reports)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def test_load_bf16_and_gradient_checkpointing(tiny_world):
    import warnings

    cfg = ModelConfig(path=str(tiny_world.model_dir), dtype="bfloat16", gradient_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(cfg, for_training=True)
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                  and "checkpointing" in str(w.message)]
    assert not deprecated, deprecated  # the non-deprecated API turns it on
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert checkpointing_on(model)
    assert not checkpointing_on(load_model(cfg, for_training=False))


# ---------------------------------------------------------------------------------------------
# bitsandbytes on CPU


@pytest.fixture(scope="module")
def fp32_logits(model64):
    cfg = ModelConfig(path=str(model64))
    tok = load_tokenizer(cfg)
    return tok, logits(load_model(cfg), batch(tok))


@pytest.fixture(scope="module")
def quantized(model64, fp32_logits):
    """quant -> (model, logits on the test batch), each loaded once."""
    tok, _ = fp32_logits
    cache = {}

    def get(quant):
        if quant not in cache:
            model = load_model(ModelConfig(path=str(model64), quantization=quant))
            cache[quant] = model, logits(model, batch(tok))
        return cache[quant]

    return get


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_load_4bit(fp32_logits, quantized, quant):
    import bitsandbytes as bnb

    tok, ref = fp32_logits
    model, out = quantized(quant)
    linears4 = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    # every attention and MLP projection of both layers is 4-bit; the LM head stays full precision
    assert len(linears4) == 7 * 2 and not any("lm_head" in n for n in linears4)
    assert {m.weight.quant_state.quant_type for m in linears4.values()} == {quant}
    assert not any(p.requires_grad for p in model.parameters())
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert corr(out, ref) > 0.95
    assert (out - ref).abs().max() > 1e-4  # really quantized, not the fp32 weights
    # nearly the same greedy next token as the fp32 model on most positions
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.5


def test_nf4_and_fp4_differ(fp32_logits, quantized):
    _, ref = fp32_logits
    nf4, fp4 = quantized("nf4")[1], quantized("fp4")[1]
    assert not torch.allclose(nf4, fp4)
    # NF4 is the better 4-bit code for normally distributed weights
    assert (nf4 - ref).pow(2).mean() < (fp4 - ref).pow(2).mean()


def test_load_int8(fp32_logits, quantized):
    import bitsandbytes as bnb

    _, ref = fp32_logits
    model, out = quantized("int8")
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()) == 7 * 2
    assert corr(out, ref) > 0.99


# ---------------------------------------------------------------------------------------------
# tokenizer


def copy_tokenizer(src: Path, dst: Path, drop: tuple[str, ...]) -> Path:
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (dst / name).exists():
            d = json.loads((dst / name).read_text())
            for key in drop:
                d.pop(key, None)
            (dst / name).write_text(json.dumps(d))
    return dst


def test_pad_token_set_to_eos_when_missing(tiny_world, tmp_path):
    orig = load_tokenizer(ModelConfig(path=str(tiny_world.model_dir)))
    assert orig.pad_token == "<pad>" and orig.pad_token_id != orig.eos_token_id
    no_pad = copy_tokenizer(tiny_world.model_dir, tmp_path / "tok", drop=("pad_token",))
    # model.tokenizer points at the copy; the weights stay where they are
    tok = load_tokenizer(ModelConfig(path=str(tiny_world.model_dir), tokenizer=str(no_pad)))
    assert tok.pad_token == "<eos>" and tok.pad_token_id == tok.eos_token_id == orig.eos_token_id
    assert tok("what is 1 plus 2")["input_ids"] == orig("what is 1 plus 2")["input_ids"]


def test_tokenizer_without_pad_or_eos_is_a_user_error(tiny_world, tmp_path):
    bare = copy_tokenizer(tiny_world.model_dir, tmp_path / "tok", drop=("pad_token", "eos_token"))
    with pytest.raises(UserError, match="neither a pad nor an EOS"):
        load_tokenizer(ModelConfig(path=str(bare)))


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_missing_model_dir_is_a_user_error(tmp_path, loader):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(UserError) as e:
        loader(ModelConfig(path=missing))
    assert "model.path" in str(e.value) and missing in str(e.value) and "\n" not in str(e.value)


def test_dir_without_weights_is_a_user_error(tiny_world, tmp_path):
    tok_only = copy_tokenizer(tiny_world.model_dir, tmp_path / "tok", drop=())
    with pytest.raises(UserError, match="model.path"):
        load_model(ModelConfig(path=str(tok_only)))


# ---------------------------------------------------------------------------------------------
# the trainable part


def test_adapter_none_unfreezes_everything(tiny_world):
    model = load_model(ModelConfig(path=str(tiny_world.model_dir)))
    assert count_parameters(model)[0] == 0
    out = add_trainable_adapter(model, AdapterConfig(type="none"))
    assert out is model
    trainable, total = count_parameters(model)
    assert trainable == total > 0


def test_lora_trains_only_lora_on_the_named_modules(tiny_world):
    from peft import PeftModel

    model = load_model(ModelConfig(path=str(tiny_world.model_dir)))
    targets = ["q_proj", "v_proj"]
    r = 4
    # what a rank-r LoRA on exactly these linears adds: r * (in + out) each
    want = sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
               if n.split(".")[-1] in targets)
    peft_model = add_trainable_adapter(model, AdapterConfig(type="lora", rank=r, alpha=8, target_modules=targets))
    assert isinstance(peft_model, PeftModel)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert {n.split(".lora_")[0].split(".")[-1] for n in trainable} == set(targets)
    assert sum(p.numel() for p in trainable.values()) == want == count_parameters(peft_model)[0]
    assert unwrap_base(peft_model) is peft_model.get_base_model()
    assert unwrap_base(model) is model


@pytest.mark.parametrize("targets", [["q_projection"], ["no_such_layer", "also_missing"]])
def test_lora_bad_target_module_is_a_user_error(tiny_world, targets):
    model = load_model(ModelConfig(path=str(tiny_world.model_dir)))
    with pytest.raises(UserError) as e:
        add_trainable_adapter(model, AdapterConfig(type="lora", target_modules=targets))
    assert "adapter.target_modules" in str(e.value) and "\n" not in str(e.value)


def test_lora_on_4bit_base(model64):
    """QLoRA: LoRA weights in full precision on frozen 4-bit linears, and gradients reach them."""
    import bitsandbytes as bnb

    cfg = ModelConfig(path=str(model64), quantization="nf4")
    tok = load_tokenizer(cfg)
    model = add_trainable_adapter(load_model(cfg, for_training=True),
                                  AdapterConfig(type="lora", rank=4, target_modules=["q_proj", "down_proj"]))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    model.train()
    x = batch(tok)
    loss = model(**x, labels=x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)).loss
    loss.backward()
    # lora_B starts at zero, so lora_A gets no gradient on the first step; lora_B must
    grads_b = [p.grad for n, p in trainable if "lora_B" in n]
    assert grads_b and all(g is not None and g.abs().sum() > 0 for g in grads_b)


@pytest.fixture(scope="module")
def other_architectures(tiny_world, tmp_path_factory) -> dict:
    """Tiny Phi-3 (fused qkv_proj, gate_up_proj) and GPT-2 (Conv1D layers) models on the tiny world's
    tokenizer, saved as model directories."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, Phi3Config, Phi3ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tiny_world.model_dir))
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    models = {"phi3": Phi3ForCausalLM(Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=4,
                                                 max_position_embeddings=128, **ids)),
              "gpt2": GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids))}
    out = {}
    for name, m in models.items():
        d = tmp_path_factory.mktemp(name)
        m.save_pretrained(str(d), safe_serialization=True)
        tok.save_pretrained(str(d))
        out[name] = d
    return out


def test_unset_targets_are_every_linear_layer_of_the_model(tiny_world, other_architectures):
    from dist_secvec.errors import ConfigError
    from dist_secvec.model import linear_targets

    llama = load_model(ModelConfig(path=str(tiny_world.model_dir)))
    assert linear_targets(llama, None, "k", "m") == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"])  # lm_head is not one
    phi3 = load_model(ModelConfig(path=str(other_architectures["phi3"])))
    assert linear_targets(phi3, None, "k", "m") == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert linear_targets(phi3, ["layers.1.self_attn.qkv_proj"], "k", "m") == ["layers.1.self_attn.qkv_proj"]
    with pytest.raises(ConfigError, match=r"'adapter.target_modules': q_proj, v_proj not among .*qkv_proj"):
        linear_targets(phi3, ["q_proj", "v_proj"], "adapter.target_modules", "m")
    # a LoRA on phi3 with the default targets adapts its fused projections too
    lora = add_trainable_adapter(phi3, AdapterConfig(type="lora", rank=2))
    assert {n.split(".lora_")[0].split(".")[-1] for n, p in lora.named_parameters() if p.requires_grad} == {
        "down_proj", "gate_up_proj", "o_proj", "qkv_proj"}
    gpt2 = load_model(ModelConfig(path=str(other_architectures["gpt2"])))
    assert linear_targets(gpt2, None, "k", "m") == ["c_attn", "c_fc", "c_proj"]  # peft adapts Conv1D
    with pytest.raises(ConfigError, match="Conv1D"):
        linear_targets(gpt2, None, "security_vector.target_modules", "m", vector=True)


def test_train_sv_on_phi3_adapts_its_fused_projections_and_refuses_gpt2(tiny_world, other_architectures, tmp_path,
                                                                         capsys):
    from dist_secvec.cli import main

    d = tiny_world.data
    args = [f"security_vector.harmful_data={d['harmful_sv']}", f"security_vector.benign_data={d['kl_benign']}",
            "optim.epochs=1", "logging.progress=false"]
    out = tmp_path / "phi3"
    assert main(["train-sv", f"model.path={other_architectures['phi3']}", f"output_dir={out}", *args]) == 0
    meta = json.loads((out / "secvec" / "secvec.json").read_text())
    assert sorted(meta["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    capsys.readouterr()
    assert main(["train-sv", f"model.path={other_architectures['gpt2']}", f"output_dir={tmp_path / 'gpt2'}",
                 *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("dist-secvec train-sv: error: config key 'security_vector.target_modules'")
    assert "Conv1D" in err[0]
    assert not (tmp_path / "gpt2" / "secvec").exists()
