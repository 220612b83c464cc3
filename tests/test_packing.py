"""data.packing (dist_secvec.packing) on the tiny Llama in float32, on the CPU kernels (eager, sdpa):

- a packed batch gives every sample the token losses of the padded batch, and the same label
  token count (the loss per token is unchanged);
- no token attends across a sample boundary: changing sample A leaves sample B's logits as they
  were, bit for bit within float32 noise;
- rows are packed only with samples of the same key (the gate's vector on/off), never past
  data.max_length;
- `dist-secvec finetune data.packing=true` trains step for step as the unpacked run does, with the
  per-row gate of a security vector on; other commands refuse the key in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_secvec.config import DataConfig
from dist_secvec.data import IGNORE_INDEX, collate, load_samples, tokenize_samples
from dist_secvec.distributed import label_tokens
from dist_secvec.packing import build_batch, collate_packed, model_inputs, pack_rows
from conftest import plain_base
from test_cli import cli_main  # noqa: F401  (the fixture: cli.main in-process)

MAX_LEN = 64


@pytest.fixture(scope="module")
def examples(tiny_world):
    """Rows of mixed lengths (the task rows and the harmful ones are of different lengths)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_world.model_dir))
    cfg = DataConfig(max_length=MAX_LEN)
    rows = load_samples([tiny_world.data["finetune_mixed"]], cfg)[:10]
    ex = tokenize_samples(tok, rows, cfg).examples
    assert len({len(e["input_ids"]) for e in ex}) > 1  # mixed lengths, or the test shows nothing
    return ex, tok.pad_token_id


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per position: the loss of predicting the next label (0 where it is ignored)."""
    lab = labels[1:]
    ce = F.cross_entropy(logits[:-1].float(), lab.clamp_min(0), reduction="none")
    return ce * (lab != IGNORE_INDEX)


def per_sample_packed(logits: torch.Tensor, rows: list[list[dict]]) -> dict[int, torch.Tensor]:
    """id(sample) -> its token losses, cut out of the packed rows' logits (the layout of collate_packed)."""
    out = {}
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e["input_ids"])
            out[id(e)] = token_losses(logits[r, at:at + n], torch.tensor(e["labels"]))
            at += n
    return out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_batch_gives_each_sample_the_losses_of_the_padded_batch(tiny_world, examples, attn):
    ex, pad = examples
    model = plain_base(tiny_world.model_dir, attn_implementation=attn)
    padded = collate(ex, pad)
    packed, rows = build_batch(ex, pad, True, MAX_LEN)
    assert len(rows) < len(ex)  # it packed something
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    with torch.no_grad():
        lp = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        lk = model(**model_inputs(packed)).logits
        loss_padded = model(**padded).loss
        loss_packed = model(**packed).loss
    mine = per_sample_packed(lk, rows)
    for i, e in enumerate(ex):
        n = len(e["input_ids"])
        want = token_losses(lp[i, :n], padded["labels"][i, :n])
        assert int((want > 0).sum()) > 0
        torch.testing.assert_close(mine[id(e)], want, rtol=1e-5, atol=1e-6)
    assert label_tokens([packed])[0] == label_tokens([padded])[0]
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_no_token_attends_across_a_sample_boundary(tiny_world, examples, attn):
    ex, pad = examples
    model = plain_base(tiny_world.model_dir, attn_implementation=attn)
    a, b = ex[0], ex[1]
    changed = dict(a, input_ids=[(t + 7) % 50 + 3 for t in a["input_ids"]])
    with torch.no_grad():
        before = model(**model_inputs(collate_packed([[a, b]], pad))).logits[0]
        after = model(**model_inputs(collate_packed([[changed, b]], pad))).logits[0]
        alone = model(input_ids=torch.tensor([b["input_ids"]])).logits[0]
    n = len(a["input_ids"])
    assert not torch.allclose(before[:n], after[:n])  # A itself did change
    torch.testing.assert_close(after[n:], before[n:], rtol=0, atol=1e-6)
    torch.testing.assert_close(before[n:], alone, rtol=1e-5, atol=1e-5)  # B as if alone: positions from 0


def _flash_attn_gpu() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


@pytest.mark.skipif(not _flash_attn_gpu(), reason="flash_attention_2 needs a CUDA GPU and the flash_attn package")
def test_flash_attention_varlen_keeps_packed_samples_apart(tiny_world, examples):
    """On a GPU: packed rows through flash_attention_2's varlen kernel (bf16) give each sample the
    token losses sdpa gives the padded batch, within bf16's precision."""
    ex, pad = examples
    flash = plain_base(tiny_world.model_dir, dtype=torch.bfloat16, attn_implementation="flash_attention_2").cuda()
    ref = plain_base(tiny_world.model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    padded = {k: v.cuda() for k, v in collate(ex, pad).items()}
    packed, rows = build_batch(ex, pad, True, MAX_LEN, flash=True)
    packed = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in packed.items()}
    with torch.no_grad():
        lp = ref(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits.float().cpu()
        lk = flash(**model_inputs(packed)).logits.float().cpu()
    mine = per_sample_packed(lk, rows)
    for i, e in enumerate(ex):
        n = len(e["input_ids"])
        want = token_losses(lp[i, :n], padded["labels"][i, :n].cpu())
        torch.testing.assert_close(mine[id(e)], want, rtol=5e-2, atol=5e-2)


def test_rows_hold_one_key_and_fit_max_length(examples):
    ex, pad = examples
    key = {id(e): i % 2 for i, e in enumerate(ex)}  # e.g. the gate: vector on / off
    rows = pack_rows(ex, MAX_LEN, lambda e: key[id(e)])
    assert sorted(id(e) for row in rows for e in row) == sorted(id(e) for e in ex)
    for row in rows:
        assert len({key[id(e)] for e in row}) == 1
        assert sum(len(e["input_ids"]) for e in row) <= MAX_LEN
    batch = collate_packed(rows, pad)
    assert batch["input_ids"].shape[1] <= MAX_LEN and batch["attention_mask"] is None
    for r, row in enumerate(rows):  # every sample's positions restart at 0
        at = 0
        for e in row:
            assert batch["position_ids"][r, at:at + len(e["input_ids"])].tolist() == list(range(len(e["input_ids"])))
            assert batch["labels"][r, at] == IGNORE_INDEX  # nothing predicts it from the sample before
            at += len(e["input_ids"])


# ---------------------------------------------------------------------------------------------
# through `dist-secvec finetune`


def finetune_args(tiny_world, random_vector, out: Path, *extra: str) -> list[str]:
    return ["finetune", f"model.path={tiny_world.model_dir}", f"data.train={tiny_world.data['finetune_mixed']}",
            f"data.max_length={MAX_LEN}", f"output_dir={out}", "adapter.type=none", "optim.lr=1e-3",
            "optim.schedule=constant", "optim.micro_batch_size=8", "optim.max_steps=4", "data.max_samples=64",
            f"security_vector.path={random_vector}", "security_vector.gate_threshold=0.001", "monitor.rule=none",
            "logging.progress=false", "logging.log_every=1", "seed=0", *extra]


def train_log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def test_finetune_with_packing_trains_as_the_unpacked_run(tiny_world, random_vector, tmp_path, cli_main):
    rc, io = cli_main(*finetune_args(tiny_world, random_vector, tmp_path / "padded"))
    assert rc == 0, io.err
    rc, io = cli_main(*finetune_args(tiny_world, random_vector, tmp_path / "packed", "data.packing=true"))
    assert rc == 0, io.err
    padded, packed = train_log(tmp_path / "padded"), train_log(tmp_path / "packed")
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in padded], rel=1e-5)
    assert [r["tokens"] for r in packed] == [r["tokens"] for r in padded]
    info = json.loads((tmp_path / "packed" / "final" / "dist_secvec_run.json").read_text())
    gate = info["security_vector_gate"]
    assert gate["rows_vector_on"] > 0 and gate["rows_vector_off"] > 0  # both kinds of row were packed


def test_packing_is_refused_where_nothing_packs(tiny_world, tmp_path, cli_main):
    rc, io = cli_main("eval", f"model.path={tiny_world.model_dir}", f"output_dir={tmp_path / 'e'}",
                     f"eval.benign_tasks={tiny_world.data['finetune_mixed']}", "data.packing=true")
    assert rc == 2
    assert "config key 'data.packing'" in io.err and len(io.err.strip().splitlines()) == 1


def test_stage2_packs_rows_alike_for_the_gate(tiny_world, random_vector, tmp_path):
    """The batches the finetune test trains on: packed (fewer rows than samples), and every row's
    samples on the same side of the gate."""
    from dist_secvec.config import load_config
    from dist_secvec.stage2 import setup_stage2

    args = finetune_args(tiny_world, random_vector, tmp_path / "run", "data.packing=true")[1:]
    job = setup_stage2(load_config(None, args))
    packed_rows = samples = 0
    micro = job.batches()
    for _ in range(4):
        examples = next(micro)
        batch, rows = job.build_batch(examples)
        assert sorted(map(id, (e for row in rows for e in row))) == sorted(map(id, examples))
        assert all(len({job.gate[id(e)] for e in row}) == 1 for row in rows)
        packed_rows, samples = packed_rows + len(rows), samples + len(examples)
    assert packed_rows < samples
    assert 0 < sum(job.gate.values()) < len(job.gate)
