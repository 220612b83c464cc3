"""Step time of a LoRA fine-tuning step with the security vector folded, attached, or absent.

A LoRA on a frozen 16/32-bit base folds s * B @ A into the base weights once (stage 2's default
there), so the vector should cost nothing per step; attached (SecVecLinear, or the combined
vector+LoRA kernel where the LoRA sits on the same layer) it costs its FLOP share. This builds a
random Llama (no download), puts a rank-r LoRA on every projection and a rank-8 vector on every
projection, and times full training steps (forward, backward, AdamW) of each variant, interleaved
round by round so load on a shared machine hits all of them alike.

    python benchmarks/bench_fold.py --hidden 512 --layers 4 --tokens 1024 --steps 20 --out /tmp/bench_fold
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved, md_table, write_outputs  # noqa: E402

VARIANTS = ("no_vector", "folded", "attached")


def build(model_dir: Path, hidden: int, layers: int, vocab: int, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                      num_key_value_heads=max(hidden // 64, 1), max_position_embeddings=4096)
    LlamaForCausalLM(cfg).save_pretrained(str(model_dir), safe_serialization=True)


def make_vector(model_dir: Path, out: Path, rank: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    m = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)),
                       LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    m.save_pretrained(str(out), safe_serialization=True)


def variant(name: str, model_dir: Path, vector_dir: Path, lora_rank: int, device: str, dtype: str):
    from dist_secvec.config import AdapterConfig, ModelConfig
    from dist_secvec.model import add_trainable_adapter, load_model
    from dist_secvec.secvec import attach_security_vector, fold_security_vector, load_security_vector

    model = add_trainable_adapter(load_model(ModelConfig(path=str(model_dir), dtype=dtype)).to(device),
                                  AdapterConfig(type="lora", rank=lora_rank, alpha=2 * lora_rank))
    if name != "no_vector":
        sv = load_security_vector(str(vector_dir))
        (fold_security_vector if name == "folded" else attach_security_vector)(model, sv)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def step(model, opt, ids) -> float:
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per step (batch 1)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--vector-rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="model weights (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--out", type=Path, default=Path("bench_fold_out"))
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, vector_dir = Path(tmp) / "model", Path(tmp) / "vector"
        build(model_dir, args.hidden, args.layers, args.vocab, seed=0)
        make_vector(model_dir, vector_dir, args.vector_rank)
        jobs = {v: variant(v, model_dir, vector_dir, args.lora_rank, args.device, args.dtype) for v in VARIANTS}
        ids = torch.randint(0, args.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(args.device)
        # interleaved: drifting load hits every variant alike
        times = interleaved({v: (lambda j=jobs[v]: step(*j, ids)) for v in VARIANTS}, args.warmup, args.steps)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    rows = [{"variant": v, "step_ms_median": round(1000 * med[v], 1),
             "step_ms_p25_p75": [round(1000 * q, 1) for q in statistics.quantiles(times[v], n=4)[0:3:2]],
             "ratio_vs_no_vector": round(med[v] / med["no_vector"], 3)} for v in VARIANTS]
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    title = (f"LoRA r={args.lora_rank} on a {args.hidden}-hidden {args.layers}-layer Llama, {args.tokens} tokens/step, "
             f"vector r={args.vector_rank} on every projection, {args.dtype} on {args.device}"
             + ("" if args.device.startswith("cuda") else f" ({torch.get_num_threads()} threads)"))
    table = md_table(["variant", "step ms (median)", "p25-p75", "vs no vector"],
                     [[r["variant"], str(r["step_ms_median"]), f"{r['step_ms_p25_p75'][0]}-{r['step_ms_p25_p75'][1]}",
                       f"{r['ratio_vs_no_vector']:.3f}x"] for r in rows])
    write_outputs(args.out, "bench_fold", {"setup": setup, "rows": rows}, f"{title}\n\n{table}")


if __name__ == "__main__":
    main()
