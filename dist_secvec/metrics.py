"""The numbers `eval` reports: harmful rates with Wilson intervals, utility accuracy, benign loss.

Harmful rate = k / n, the share of harmful prompts whose response a judge calls harmful
compliance (the attack success rate). Its 95% interval is the Wilson score interval
    centre = (p + z^2 / 2n) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)
which, unlike the normal approximation, stays inside [0, 1] and is not empty at k = 0 or k = n
(the interesting cases here: 0% harmful with a security vector).
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Optional, Sequence

UNCATEGORIZED = "(none)"
MATCHERS = ("exact", "contains", "choice")


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; n = 0 gives the vacuous (0.0, 1.0)."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at k = 0 or k = n the exact bound is 0 or 1; floating point lands a hair inside it
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def categories_of(value) -> list[str]:
    """A row's categories: a string, a list of strings (multi-label, e.g. BeaverTails), or none."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def rate_summary(verdicts: Sequence[bool], categories: Optional[Sequence] = None) -> dict:
    """{"n", "harmful_rate", "harmful_rate_ci95"[, "per_category"]} for one judge's verdicts.

    `per_category` appears when any row has a category; a multi-label row counts in each of its
    categories, a row without one under "(none)". n = 0 gives rate 0.0 and the vacuous interval.
    """
    n, k = len(verdicts), sum(bool(v) for v in verdicts)
    out = {"n": n, "harmful_rate": k / n if n else 0.0, "harmful_rate_ci95": list(wilson_interval(k, n))}
    if categories is not None and any(categories_of(c) for c in categories):
        if len(categories) != n:
            raise ValueError(f"rate_summary: {n} verdicts but {len(categories)} categories")
        groups: dict[str, list[bool]] = {}
        for v, c in zip(verdicts, categories):
            for name in categories_of(c) or [UNCATEGORIZED]:
                groups.setdefault(name, []).append(bool(v))
        out["per_category"] = {name: rate_summary(vs) for name, vs in sorted(groups.items())}
    return out


# ---------------------------------------------------------------------------------------------
# utility: does the response give the expected answer


def normalize(text: str) -> str:
    """Lower case, runs of whitespace collapsed to one space, ends stripped."""
    return " ".join(text.lower().split())


# "the answer is (B)", "Answer: B" anywhere; else a letter standing alone at the start: "B", "(B) ...", "B. ..."
_ANSWER_IS = re.compile(r"(?i:answer)\s*(?:(?i:is)\s*)?[:\-]?\s*\(?([A-J])\)?(?![A-Za-z])")
_LEADING = re.compile(r"^\s*\(?([A-J])(?:\)|(?=[.:,\s])|$)")


def choice_letter(text: str) -> Optional[str]:
    """The multiple-choice letter (A-J, upper case) a text answers with, or None."""
    m = _ANSWER_IS.search(text) or _LEADING.match(text)
    return m.group(1) if m else None


def is_correct(response: str, expected: str, match: str = "exact") -> bool:
    """exact: equal after normalisation; contains: expected occurs in the response;
    choice: the same multiple-choice letter (exact match when `expected` has no letter)."""
    if match == "exact":
        return normalize(response) == normalize(expected)
    if match == "contains":
        want = normalize(expected)
        return bool(want) and want in normalize(response)
    if match == "choice":
        want = choice_letter(expected)
        if want is None:
            return normalize(response) == normalize(expected)
        return choice_letter(response) == want
    raise ValueError(f"is_correct: unknown match rule '{match}' (allowed: {', '.join(MATCHERS)})")


def accuracy_summary(correct: Sequence[bool]) -> dict:
    n, k = len(correct), sum(bool(c) for c in correct)
    return {"n": n, "accuracy": k / n if n else 0.0, "accuracy_ci95": list(wilson_interval(k, n))}


# ---------------------------------------------------------------------------------------------
# loss of the expected answers


def mean_loss(model, batches: Iterable[dict]) -> dict:
    """Token-weighted mean cross-entropy over every label != -100, and its perplexity exp(loss).

    Each batch is a `data.collate` output (input_ids, attention_mask, labels). The mean is over
    tokens of the whole set, not a mean of per-batch means, so batch size does not change it.
    """
    import torch
    import torch.nn.functional as F

    from dist_secvec.data import IGNORE_INDEX

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                logits = logits[:, :-1].float()
                labels = batch["labels"][:, 1:]
                total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                         ignore_index=IGNORE_INDEX, reduction="sum").item()
                count += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("mean_loss: no label tokens (every label is -100)")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "n_tokens": count}


def benign_loss(model, tokenizer, samples, data_cfg, batch_size: int = 8) -> dict:
    """Mean loss / perplexity of the responses of `samples` (data.Sample), the prompt masked."""
    import dataclasses

    from dist_secvec.data import batches, collate, tokenize_samples

    cfg = dataclasses.replace(data_cfg, train_on="last_assistant")  # the expected answer only
    examples = tokenize_samples(tokenizer, samples, cfg).examples
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return mean_loss(model, (collate(b, pad) for b in batches(examples, batch_size, shuffle=False)))


def text_loss(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 8) -> dict:
    """Mean loss / perplexity over every token of plain texts (no template, nothing masked), each
    cut to `max_length` tokens."""
    from dist_secvec.data import batches, collate

    examples = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) > 1:
            examples.append({"input_ids": ids, "labels": list(ids)})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return mean_loss(model, (collate(b, pad) for b in batches(examples, batch_size, shuffle=False)))
