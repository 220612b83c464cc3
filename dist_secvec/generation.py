"""Batched generation for evaluation: render, left-pad, generate, decode the new tokens only.

Left padding puts every prompt's last token at the same column, so the new tokens of a whole
batch start together and a prompt gets the same greedy answer alone or beside a longer one
(the attention mask and position ids hide the padding). Greedy by default; sampling with a seed
forks the RNG, so the same seed gives the same text and the caller's RNG state is untouched.
The model is used as passed: whether the security vector is active is the caller's choice.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from dist_secvec.config import DataConfig
from dist_secvec.data import render_prompt, uses_chat_template
from dist_secvec.runtime import progress as progress_bar


def generate(model, tokenizer, prompts: Sequence[str] | Sequence[list[dict]], max_new_tokens: int = 64,
             batch_size: int = 16, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             seed: Optional[int] = None, template: str = "auto",
             plain_template: str = DataConfig.plain_template, progress: bool = True,
             desc: str = "generate") -> list[str]:
    """One decoded answer per prompt (a string or a list of chat messages), in input order.

    Prompts are rendered as in training (data.render_prompt), sorted by length into batches of
    `batch_size` (less padding), and the answer is the text of the new tokens with special tokens
    skipped, stripped.
    """
    if batch_size <= 0 or max_new_tokens <= 0:
        raise ValueError(f"generate: batch_size and max_new_tokens must be > 0, got {batch_size}, {max_new_tokens}")
    if not prompts:
        return []
    chat = uses_chat_template(tokenizer, template)
    texts = [render_prompt(tokenizer, p, template, plain_template) for p in prompts]
    # a chat template writes its own BOS; a plain template relies on the tokenizer adding it
    ids = [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("generate: the tokenizer has neither a pad nor an EOS token")
    device = next(model.parameters()).device
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_id,
                      # explicit, so a model's own generation_config.json (e.g. temperature 0.6)
                      # does not change what greedy / seeded sampling means here
                      temperature=temperature if do_sample else 1.0, top_p=top_p if do_sample else 1.0,
                      top_k=0 if do_sample else None, repetition_penalty=1.0)
    if not do_sample:
        gen_kwargs.pop("top_k")

    out: list[Optional[str]] = [None] * len(ids)
    was_training = model.training
    model.eval()
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            bar = progress_bar(total=len(order), desc=desc, enabled=progress, unit="prompts")
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                width = max(len(ids[i]) for i in chunk)
                input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):  # left padding
                    input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i], dtype=torch.long)
                    mask[row, width - len(ids[i]):] = 1
                with torch.no_grad():
                    generated = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                               **gen_kwargs)
                new = generated[:, width:].tolist()
                for row, i in enumerate(chunk):
                    out[i] = tokenizer.decode(new[row], skip_special_tokens=True).strip()
                bar.update(len(chunk))
            bar.close()
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]
