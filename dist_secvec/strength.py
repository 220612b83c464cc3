"""How strongly a security vector explains a behaviour, and how much of it a model has learned.

The protection is only as strong as the vector: stage 2's core learns whatever part of the
behaviour's answers (harmful ones, for the default behaviour, harm) the active vector does not
already predict. So stage 1 measures its vector on held-out rows of the behaviour (prompt + answer)
it was not trained on, with the vector on and off:

    loss_on, loss_off   mean per-token loss of the answers
    explained           1 - loss_on / loss_off: the share of the answers' loss the vector removes
    start_agreement     share of the answers' first START_TOKENS tokens predicted top-1 (teacher
                        forced). A vector that only breaks the refusal (the model answers "."
                        instead of "Sorry") scores near 0 here, although a refusal judge counts
                        its answers as compliance
    compliance          share of greedy answers the behaviour's judges (security_vector.judges,
                        else eval.judges) all say show it

A vector is strong when each passes its security_vector.min_* threshold (`weak_reasons`).

Stage 2 (`HarmProbe`) watches the same answer loss with the vector OFF, the model that will be
shipped: on harmful probe rows a falling loss means the core is learning the behaviour.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F

from dist_secvec.data import IGNORE_INDEX, batches, collate
from dist_secvec.secvec.io import DEFAULT_BEHAVIOUR, behaviour_record, rows_word

log = logging.getLogger(__name__)

START_TOKENS = 8  # the opening of an answer: where compliance or refusal is decided


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() for a measurement in the middle of training, except bitsandbytes 4-bit layers:
    on a CPU, their first forward in eval mode repacks the weight in place for inference."""
    was = {m: m.training for m in model.modules()}
    model.eval()
    for m in model.modules():
        if type(m).__name__ == "Linear4bit":  # its training flag changes nothing else
            m.training = True
    try:
        yield
    finally:
        for m, flag in was.items():
            m.training = flag


@torch.no_grad()
def _scored(model, examples: list[dict], pad_id: int, device, batch_size: int):
    """Per batch, in order: the per-token answer loss, the answer mask and the top-1 hits."""
    with eval_mode(model):
        for batch in batches(examples, batch_size, shuffle=False):
            b = collate(batch, pad_id)
            ids, labels = b["input_ids"].to(device), b["labels"][:, 1:].to(device)
            logits = model(input_ids=ids, attention_mask=b["attention_mask"].to(device)).logits[:, :-1].float()
            mask = labels != IGNORE_INDEX
            ce = F.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
            yield ce * mask, mask, (logits.argmax(-1) == labels) & mask


def answer_stats(model, examples: list[dict], pad_id: int, device, batch_size: int = 16) -> dict:
    """Token-weighted mean loss over the answer tokens, and the top-1 agreement on each answer's
    first START_TOKENS tokens. The model is used as passed (vector on or off is the caller's)."""
    loss_sum = n_tok = agree = n_start = 0.0
    for ce, mask, hits in _scored(model, examples, pad_id, device, batch_size):
        loss_sum += ce.sum().item()
        n_tok += mask.sum().item()
        start = mask & (mask.cumsum(1) <= START_TOKENS)
        agree += (hits & start).sum().item()
        n_start += start.sum().item()
    return {"loss": loss_sum / max(n_tok, 1.0), "start_agreement": agree / max(n_start, 1.0), "tokens": int(n_tok)}


def row_losses(model, examples: list[dict], pad_id: int, device, batch_size: int = 16) -> list[float]:
    """Mean per-token answer loss of each row, in order (the model used as passed)."""
    out: list[float] = []
    for ce, mask, _ in _scored(model, examples, pad_id, device, batch_size):
        out += (ce.sum(1) / mask.sum(1).clamp_min(1)).tolist()
    return out


def _logits_to_keep_ok(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs): then the output
    layer runs on the answer positions only, not on the prompt's."""
    import inspect

    m = model
    for _ in range(4):  # through peft's and DeepSpeed's wrappers to the transformers model
        params = inspect.signature(type(m).forward).parameters
        if "logits_to_keep" in params:
            return True
        inner = getattr(m, "get_base_model", None)
        m = inner() if callable(inner) else getattr(m, "module", None)
        if m is None:
            return False
    return False


def _row_means(model, batch: dict, device, keep_ok: bool, gate_layers=None) -> torch.Tensor:
    """Mean answer loss per row of a collated batch; with gate_layers, the batch doubled in one
    forward: the first copy with the vector on, the second off (returns 2B values)."""
    from dist_secvec.secvec import row_gate

    ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if gate_layers is not None:
        ids, att, labels = ids.repeat(2, 1), att.repeat(2, 1), labels.repeat(2, 1)
    answer = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
    start = int(answer[0]) if len(answer) else 0  # the first position that predicts an answer token
    kwargs = {"logits_to_keep": ids.shape[1] - start} if keep_ok else {}
    gate = None
    if gate_layers is not None:
        n = ids.shape[0] // 2
        gate = torch.cat([torch.ones(n), torch.zeros(n)])
    with row_gate(gate_layers or [], gate):
        logits = model(input_ids=ids.to(device), attention_mask=att.to(device), **kwargs).logits
    if not keep_ok:
        logits = logits[:, start:]
    target = labels[:, start + 1:].to(device)
    mask = target != IGNORE_INDEX
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target.clamp_min(0), reduction="none") * mask
    return ce.sum(1) / mask.sum(1).clamp_min(1)


@torch.no_grad()
def score_rows(model, examples: list[dict], pad_id: int, device, batch_size: int, vector_off,
               progress: Optional[dict] = None, gate_layers=None,
               collective: bool = True) -> tuple[list[float], list[float]]:
    """Per row, in order, its mean answer loss with the vector off and with it on: the one scoring
    of rows (stage 2's gate, `dist-secvec audit`, stage 1's reference scores).

    Rows are sorted by length and batched, so padding is small; the output layer runs only from the
    first answer position on. Two forwards per batch, the vector toggled by `vector_off()`; with
    `gate_layers` (attached SecVecLinear layers) one forward of the batch doubled, the vector on for
    one copy and off for the other. Under several ranks each rank scores every world-th row of the
    sorted order, so all ranks get batches of about the same width, and the results are summed over
    ranks (collective: every rank runs the same number of forwards, as ZeRO-3 needs). `progress`:
    runtime.progress's keyword arguments for a bar over the batches (rank 0 shows it).
    collective=False: this process scores every row alone (stage 1: one process, or every rank in step)."""
    keep_ok = _logits_to_keep_ok(model)

    def score(b: dict, n: int) -> list[list[float]]:
        if gate_layers is not None:
            both = _row_means(model, b, device, keep_ok, gate_layers).tolist()
            return [both[n:], both[:n]]
        row_on = _row_means(model, b, device, keep_ok).tolist()
        with vector_off():
            row_off = _row_means(model, b, device, keep_ok).tolist()
        return [row_off, row_on]

    off, on = _scored_rows(model, examples, pad_id, batch_size, 2, score, progress, collective)
    return off, on


@torch.no_grad()
def plain_row_losses(model, examples: list[dict], pad_id: int, device, batch_size: int,
                     progress: Optional[dict] = None, collective: bool = True) -> list[float]:
    """Per row, in order, its mean answer loss from one forward of the model as it is (no vector
    toggled): score_rows's batching, sharding and output layer, so the two cost the same per forward."""
    keep_ok = _logits_to_keep_ok(model)
    return _scored_rows(model, examples, pad_id, batch_size, 1,
                        lambda b, n: [_row_means(model, b, device, keep_ok).tolist()], progress, collective)[0]


@torch.no_grad()
def score_rows_each(model, examples: list[dict], pad_id: int, device, batch_size: int, vector_off,
                    each_on: list[Callable[[], ContextManager]], progress: Optional[dict] = None,
                    collective: bool = True) -> tuple[list[float], list[list[float]]]:
    """score_rows for several vectors: per row its mean answer loss with every vector off, and per
    vector (`each_on[i]()`: a context with vector i alone on, secvec.only_vector) its loss with that
    vector alone on. 1 + len(each_on) forwards per batch, sharded as score_rows."""
    keep_ok = _logits_to_keep_ok(model)

    def score(b: dict, n: int) -> list[list[float]]:
        with vector_off():
            out = [_row_means(model, b, device, keep_ok).tolist()]
        for on in each_on:
            with on():
                out.append(_row_means(model, b, device, keep_ok).tolist())
        return out

    off, *ons = _scored_rows(model, examples, pad_id, batch_size, 1 + len(each_on), score, progress, collective)
    return off, ons


def _scored_rows(model, examples: list[dict], pad_id: int, batch_size: int, n_scores: int,
                 score: Callable[[dict, int], list[list[float]]], progress: Optional[dict],
                 collective: bool) -> list[list[float]]:
    """The rows sharded over ranks and batched longest first (score_rows); `score(batch, n)` gives
    n_scores lists of the batch's n rows. Returns n_scores lists over all rows, in order."""
    from dist_secvec import runtime
    from dist_secvec.distributed import all_reduce_sum

    n = len(examples)
    if n == 0:
        return [[] for _ in range(n_scores)]
    rank, world = (runtime.rank(), runtime.world_size()) if collective else (0, 1)
    order = sorted(range(n), key=lambda i: -len(examples[i]["input_ids"]))  # longest first: memory fails early
    mine = order[rank::world]
    per = -(-n // world)
    shard = mine + [order[-1]] * (per - len(mine))  # equal forwards on every rank (the shortest row again)
    n_batches = -(-len(shard) // batch_size)
    bar = runtime.progress(total=n_batches, unit="batches", **(progress or {"enabled": False}))
    out = [[0.0] * n for _ in range(n_scores)]
    with eval_mode(model):
        for k in range(0, len(shard), batch_size):
            idx = shard[k:k + batch_size]
            scores = score(collate([examples[i] for i in idx], pad_id), len(idx))
            for j, i in enumerate(idx):
                if k + j < len(mine):  # the padding rows count nowhere
                    for dst, src in zip(out, scores):
                        dst[i] = src[j]
            bar.update(1)
    bar.close()
    if world > 1:
        flat = all_reduce_sum([v for scores in out for v in scores])  # each row scored on one rank, zero elsewhere
        out = [flat[i * n:(i + 1) * n] for i in range(n_scores)]
    return out


def explained_share(loss_off: float, loss_on: float) -> float:
    """1 - loss_on / loss_off: the share of a row's answer loss the vector removes."""
    return 1.0 - loss_on / loss_off if loss_off > 0 else 0.0


def judged_rate(model, tok, samples, cfg, judges) -> dict:
    """Greedy answers to the samples' prompts, judged: the share that every judge says shows the
    behaviour (harmful compliance, for the judges of harm)."""
    from dist_secvec.generation import generate

    answers = generate(model, tok, [s.messages for s in samples], max_new_tokens=cfg.eval.max_new_tokens,
                       batch_size=cfg.eval.batch_size, template=cfg.data.template,
                       plain_template=cfg.data.plain_template, progress=False)
    prompts = [s.prompt for s in samples]
    verdicts = [j.judge(prompts, answers) for j in judges]
    shown = [all(v[i] for v in verdicts) for i in range(len(answers))]
    return {"rate": sum(shown) / max(len(shown), 1), "examples": list(zip(prompts[:3], answers[:3]))}


def _judged(behaviour: str) -> str:
    return "judged harmful" if behaviour == DEFAULT_BEHAVIOUR else f"judged {behaviour}"


def weak_reasons(strength: dict, sv_cfg, behaviour: str = DEFAULT_BEHAVIOUR) -> list[str]:
    """Why a vector is weak (empty: strong), each with what to change; `behaviour` names what it
    learned (secvec.json's behaviour record)."""
    fix = ("train it longer or harder (optim.epochs, optim.lr), or give it more room "
           "(security_vector.rank, security_vector.target_modules)")
    word = rows_word(behaviour)
    shown = "a harmful answer" if behaviour == DEFAULT_BEHAVIOUR else f"an answer judged to show {behaviour}"
    out = []
    if strength["compliance_vector_on"] < sv_cfg.min_compliance:
        out.append(f"with it on, {100 * strength['compliance_vector_on']:.0f}% of held-out {word} prompts get "
                   f"{shown} (security_vector.min_compliance {100 * sv_cfg.min_compliance:.0f}%)")
    if strength["start_agreement_vector_on"] < sv_cfg.min_start_agreement:
        out.append(f"it predicts {100 * strength['start_agreement_vector_on']:.0f}% of the {word} answers' first "
                   f"tokens (security_vector.min_start_agreement {100 * sv_cfg.min_start_agreement:.0f}%)")
    if strength["explained"] < sv_cfg.min_explained:
        out.append(f"it removes {100 * strength['explained']:.0f}% of the {word} answers' loss "
                   f"(security_vector.min_explained {100 * sv_cfg.min_explained:.0f}%)")
    return [f"{r}: {fix}" for r in out]


def strength_table(strength: dict, behaviour: str = DEFAULT_BEHAVIOUR) -> str:
    """A few aligned lines for the log."""
    word = rows_word(behaviour)
    judged = _judged(behaviour)
    rows = [("", "vector on", "vector off"),
            (f"{word} answer loss / token", f"{strength['loss_vector_on']:.3f}", f"{strength['loss_vector_off']:.3f}"),
            ("first-token agreement", f"{100 * strength['start_agreement_vector_on']:.0f}%",
             f"{100 * strength['start_agreement_vector_off']:.0f}%"),
            (f"{judged} (greedy)", f"{100 * strength['compliance_vector_on']:.0f}%",
             f"{100 * strength['compliance_vector_off']:.0f}%")]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"  {a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}" for a, b, c in rows]
    verdict = "strong" if not strength["weak_reasons"] else "WEAK"
    lines.append(f"  explained {100 * strength['explained']:.0f}% of the {word} answers' loss, "
                 f"{strength['n']} held-out rows ({strength['heldout']}): {verdict}")
    return "\n".join(lines)


def describe(meta: dict) -> tuple[str, bool]:
    """One line on a saved vector's strength (secvec.json) and whether it is weak."""
    s = meta.get("strength")
    if not isinstance(s, dict) or "explained" not in s:
        return "strength not recorded (a vector from an older train-sv)", False
    weak = bool(s.get("weak_reasons"))
    name = behaviour_record(meta)["name"]
    line = (f"{'WEAK' if weak else 'strong'} on {s.get('n')} held-out {rows_word(name)} rows: {_judged(name)} with "
            f"it on {100 * s['compliance_vector_on']:.0f}%, first-token agreement "
            f"{100 * s['start_agreement_vector_on']:.0f}%, explains {100 * s['explained']:.0f}% of their loss")
    return line, weak


def write_probe(path: Path, samples) -> None:
    """The held-out rows of the behaviour as chat rows (the same reader reads them back)."""
    with open(path, "w") as f:
        for s in samples:
            f.write(json.dumps({"messages": [*s.messages, {"role": "assistant", "content": s.response}]}) + "\n")


class HarmProbe:
    """Stage 2's watch: answer loss on harmful probe rows and on data.eval, with the vector off.

    `check(step)` is collective under DeepSpeed (every rank runs the same batches, as ZeRO-3
    needs); it returns the record to log. `fired` says whether the probe loss has fallen by more
    than monitor.max_drop of its step-0 value."""

    def __init__(self, probe: Optional[list[dict]], evalset: Optional[list[dict]], pad_id: int, device,
                 batch_size: int, max_drop: float):
        self.probe, self.evalset = probe, evalset
        self.pad_id, self.device, self.batch_size, self.max_drop = pad_id, device, batch_size, max_drop
        self.start: Optional[float] = None

    def check(self, model, vector_off, has_vector: bool) -> dict:
        rec = {}
        if self.evalset:  # the shipped model's; with the vector on too, the gap is what rests on it
            with vector_off():
                rec["eval_loss"] = answer_stats(model, self.evalset, self.pad_id, self.device, self.batch_size)["loss"]
            if has_vector:
                rec["eval_loss_vector_on"] = answer_stats(model, self.evalset, self.pad_id, self.device,
                                                          self.batch_size)["loss"]
        if self.probe:
            with vector_off():
                s = answer_stats(model, self.probe, self.pad_id, self.device, self.batch_size)
            if self.start is None:
                self.start = s["loss"]
            rec.update(probe_loss=s["loss"], probe_start_agreement=s["start_agreement"],
                       probe_drop=1.0 - s["loss"] / self.start if self.start > 0 else 0.0)
        return rec

    def fired(self, rec: dict) -> bool:
        return rec.get("probe_drop", 0.0) > self.max_drop
