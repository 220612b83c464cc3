"""data.packing: each training micro-batch's samples packed into rows of up to data.max_length
tokens, several samples to a row, instead of one padded row per sample.

No token attends across samples, through the path transformers itself takes for packed rows: the
position ids restart at 0 for every sample and no 2-D attention mask is passed (with use_cache
off), so sdpa / eager / flex attention build a block-diagonal causal mask from the position ids
(transformers.masking_utils.find_packed_sequence_indices) and flash attention runs its varlen
kernel on the sequence boundaries derived from them (prepare_fa_kwargs_from_position_ids). The
first label of every sample is ignored, so no sample's last token is trained to predict the next
sample's first; the token-mean loss is over exactly the label tokens of the unpacked batch.

What a step trains on is unchanged: the same samples per micro-batch, in the same order of
micro-batches (resume and the ranks' slices are those of the unpacked run), only the padding goes.
Each row holds samples with the same `key` (stage 2: the per-row gate's vector on/off and
data.audit's loss weight), so what acts per row still acts per sample.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Optional

import torch

from dist_secvec.data import IGNORE_INDEX, collate
from dist_secvec.errors import ConfigError

# attention kernels that honour packed position ids: masking_utils' mask functions and flash's varlen path
MASKED = ("eager", "sdpa", "flex_attention")


def is_flash(attn: Optional[str]) -> bool:
    return bool(attn) and "flash" in attn


def check_support(attn: Optional[str]) -> None:
    """The installed transformers keeps packed samples apart for this attention kernel (`attn`: the
    config's model.attn_implementation before the model loads, the model's own after); else a
    one-line ConfigError naming data.packing."""
    if attn not in (None, "auto", *MASKED) and not is_flash(attn):
        raise ConfigError(f"config key 'data.packing': the model runs {attn} attention, which cannot keep packed "
                          "samples apart; set model.attn_implementation=sdpa (or flash_attention_2 on a GPU), or "
                          "data.packing=false")
    if is_flash(attn):
        import transformers.modeling_flash_attention_utils as fa

        ok = hasattr(fa, "prepare_fa_kwargs_from_position_ids")
    else:
        try:
            from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
            ok = True
        except ImportError:
            ok = False
    if not ok:
        import transformers

        raise ConfigError(f"config key 'data.packing': transformers {transformers.__version__} cannot keep packed "
                          f"samples apart with {attn or 'its default'} attention; upgrade transformers (pip install "
                          "-U transformers) or set data.packing=false")


WIDTHS = 16  # row widths tried between the longest sample and max_length


def _first_fit(groups: list[list[dict]], width: int) -> list[list[dict]]:
    """First fit in order of decreasing length (ties in their order) into rows of `width` tokens,
    each group into rows of its own."""
    rows: list[list[dict]] = []
    for members in groups:
        bins: list[list[Any]] = []  # [free tokens, samples]
        for e in sorted(members, key=lambda e: -len(e["input_ids"])):
            n = len(e["input_ids"])
            for b in bins:
                if b[0] >= n:
                    b[0] -= n
                    b[1].append(e)
                    break
            else:
                bins.append([max(width, n) - n, [e]])
        rows += [b[1] for b in bins]
    return rows


def pack_rows(examples: list[dict], max_length: int,
              key: Optional[Callable[[dict], Hashable]] = None) -> list[list[dict]]:
    """The samples placed into rows of at most max_length tokens, separately for each value of
    key(sample): of the row widths from the longest sample up to max_length, the one whose rows
    hold the fewest positions (rows x width: the compute; ties: the narrower). Never more than the
    padded batch, which is the width of the longest sample with one sample per row."""
    groups: dict = {}
    for e in examples:
        groups.setdefault(key(e) if key else None, []).append(e)
    longest = max(len(e["input_ids"]) for e in examples)
    top = max(max_length, longest)
    widths = sorted({longest + (top - longest) * k // WIDTHS for k in range(WIDTHS + 1)})
    best = None
    for w in widths:
        rows = _first_fit(list(groups.values()), w)
        cost = len(rows) * max(sum(len(e["input_ids"]) for e in row) for row in rows)
        if best is None or cost < best[0]:
            best = (cost, rows)
    return best[1]


def collate_packed(rows: list[list[dict]], pad_id: int, flash: bool = False) -> dict:
    """The model inputs of packed rows: input_ids, labels (each sample's first ignored),
    position_ids restarting per sample, no attention mask, no cache; with `flash`, the varlen
    kernel's sequence boundaries too. Row padding (at the end) is a sequence of its own that no
    real token attends to and no label comes from."""
    width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e["input_ids"])
            ids[r, at:at + n] = torch.tensor(e["input_ids"])
            labels[r, at + 1:at + n] = torch.tensor(e["labels"][1:], dtype=torch.long)
            pos[r, at:at + n] = torch.arange(n)
            at += n
        pos[r, at:] = torch.arange(width - at)
    batch: dict = {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": None,
                   "use_cache": False}
    if flash:
        from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(pos)
        batch.update(cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=int(max_q), max_length_k=int(max_k))
    return batch


def build_batch(examples: list[dict], pad_id: int, packing: bool, max_length: int,
                key: Optional[Callable[[dict], Hashable]] = None, flash: bool = False) -> tuple[dict, list[list[dict]]]:
    """One training micro-batch: (model inputs with labels, the samples in each of its rows). Without
    packing, data.collate's padded rows, one sample each."""
    if not packing:
        return collate(examples, pad_id), [[e] for e in examples]
    rows = pack_rows(examples, max_length, key)
    return collate_packed(rows, pad_id, flash), rows


def model_inputs(batch: dict) -> dict:
    """What the model's forward takes from a training batch: all but the labels."""
    return {k: v for k, v in batch.items() if k != "labels"}
