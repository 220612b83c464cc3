"""SAFT's label-free filter and an Antibody-style score against the security vector's audit score,
on the same labelled rows.

    python benchmarks/bench_saft.py --model ALIGNED_BASE --vector SECVEC_DIR \
        --data stress_100.jsonl stress_1000.jsonl stress_5000.jsonl [--data-max-length 64] \
        [--batch-size 64] [--out DIR]

Each --data file is one row set (audit_stress_rows.py's: benign rows of several kinds with harmful
rows hidden), labelled by the embedded worlds' exact judge on each row's response. Per row set,
for both scores, it reports the AUROC, and the flagged rows, precision and recall at the method's
own label-free threshold, and at the best-F1 threshold (chosen with the labels: what no threshold
rule can beat):

- audit: loss_off - loss_on (strength.score_rows, two forwards), flagged at the vector's default
  threshold (audit.resolve_threshold: between the scores stage 1 recorded for its own harmful and
  benign rows);
- SAFT (Choi et al. 2024, its score from HaloScope, Du et al. 2024): each row's embedding f_i, a
  hidden state of the base model (the vector off) over the whole row (prompt and answer), centred
  on the mean of all rows; the top k right singular vectors v_j (singular values s_j) of the
  centred matrix; score (1/k) sum_j s_j <f_i - mean, v_j>^2. Defaults: the last layer, the last
  token, k = 1. HaloScope's released code picks the layer and k on a small labelled set; here
  the threshold is label-free, Otsu's split of the scores (the cut that maximises the
  between-group variance of the two sides), and a sweep over layer x pooling (last token, mean
  over tokens) x k gives every variant's AUROC, the best of which is chosen with the labels;
- Antibody-style (Nguyen et al. 2026, the fine-tuning stage's sample weighting, which contrasts
  the likelihood of a row's answer with that of a refusal): with the vector off, each row's mean
  answer-token loss minus the loss of the refusal (--refusal; default: the answer of the data's
  `refusal` rows, the world's refusal) after the same prompt, i.e. log p(refusal) - log p(answer)
  per token: high where the aligned base would rather refuse. Flagged at Otsu's threshold (the
  paper weights rows continuously; its alignment stage is not reproduced).

Prints and writes (bench_saft.json/.md in --out) one table over the row sets, the flagged rows per
kind, and the sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_audit import auroc  # noqa: E402

KS = (1, 2, 4, 8)
POOLINGS = ("last", "mean")


def otsu(scores: list[float]) -> float:
    """The label-free cut of a 1-D sample into two groups that maximises w0 w1 (m0 - m1)^2,
    halfway between the two order statistics it falls between; flag >= it."""
    import numpy as np

    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if n < 2 or s[0] == s[-1]:
        return float(s[-1]) if n else 0.0
    c = np.cumsum(s)
    i = np.arange(1, n)  # the lower group holds s[:i]
    m0, m1 = c[:-1] / i, (c[-1] - c[:-1]) / (n - i)
    between = (i / n) * (1 - i / n) * (m0 - m1) ** 2
    between[s[1:] == s[:-1]] = -1  # a cut must fall between distinct values
    k = int(np.argmax(between)) + 1
    return float((s[k - 1] + s[k]) / 2)


def at_threshold(scores: list[float], labels: list[bool], t: float) -> dict:
    flagged = [s >= t for s in scores]
    tp = sum(f and y for f, y in zip(flagged, labels))
    return {"threshold": t, "flagged": sum(flagged), "precision": tp / max(sum(flagged), 1),
            "recall": tp / max(sum(labels), 1)}


def best_f1(scores: list[float], labels: list[bool]) -> dict:
    """The threshold with the best F1 over every cut (uses the labels)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    pos = sum(labels)
    best, tp = (-1.0, float("inf")), 0
    for rank, i in enumerate(order, 1):
        tp += labels[i]
        if rank < len(order) and scores[order[rank]] == scores[i]:
            continue  # a cut falls between distinct scores only
        f1 = 2 * tp / (rank + pos)
        if f1 > best[0]:
            best = (f1, scores[i])
    return {**at_threshold(scores, labels, best[1]), "f1": best[0]}


def saft_scores(emb, k: int) -> list[float]:
    """(1/k) sum_j s_j <f_i - mean, v_j>^2 over the top k singular directions of the centred rows."""
    import torch

    x = emb.double() - emb.double().mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    proj = x @ vh[:k].T
    return ((proj ** 2) * s[:k]).mean(1).tolist()


def embeddings(model, examples: list[dict], pad_id: int, batch_size: int) -> dict:
    """{(layer, pooling): (rows, hidden) tensor} of every layer's output (1..L): the last token of
    each row, and the mean over its tokens. Rows are batched by length; the order is the input's."""
    import torch

    from dist_secvec.data import collate

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    out: dict = {}
    with torch.no_grad():
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            b = collate([examples[i] for i in idx], pad_id)
            hs = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True,
                       logits_to_keep=1).hidden_states
            att = b["attention_mask"].unsqueeze(-1).float()
            last = b["attention_mask"].sum(1) - 1  # right padded
            for layer in range(1, len(hs)):
                h = hs[layer].float()
                pooled = {"last": h[torch.arange(len(idx)), last], "mean": (h * att).sum(1) / att.sum(1)}
                for p, v in pooled.items():
                    out.setdefault((layer, p), [None] * len(examples))
                    for j, i in enumerate(idx):
                        out[(layer, p)][i] = v[j]
    return {key: torch.stack(v) for key, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--vector", required=True)
    ap.add_argument("--data", nargs="+", required=True, help="one row set per file")
    ap.add_argument("--data-max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--refusal", default=None, help="the refusal the Antibody-style score compares each answer "
                    "with (default: the answer of the data's `refusal` rows)")
    args = ap.parse_args()

    from dist_secvec.audit import resolve_threshold, score, tokenize_rows
    from dist_secvec.config import load_config
    from dist_secvec.data import load_samples
    from dist_secvec.worlds.embedded import is_harmful_response
    from dist_secvec.model import load_model, load_tokenizer
    from dist_secvec.secvec import PathOptions, attach_security_vector, load_security_vector, security_vector_off
    from dist_secvec.strength import eval_mode, row_losses, score_rows

    cfg = load_config(None, [f"model.path={args.model}", f"security_vector.path={args.vector}",
                             f"data.max_length={args.data_max_length}"])
    sv = load_security_vector(args.vector)
    t_audit, source, _ = resolve_threshold(cfg, sv)
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    attach_security_vector(model, sv, PathOptions())

    sets = []
    for path in args.data:
        data, samples, _ = tokenize_rows(tok, load_samples([path]), cfg.data)
        labels = [is_harmful_response(s.response) for s in samples]
        raw = [json.loads(line).get("kind") for line in Path(path).read_text().splitlines() if line.strip()]
        kinds = [raw[s.row - 1] or "?" for s in samples]
        off, on = score_rows(model, data.examples, tok.pad_token_id, "cpu", args.batch_size,
                             lambda: security_vector_off(model), collective=False)
        audit = [score(f, a) for f, a in zip(off, on)]
        refusal = args.refusal or max(
            (s.response for s, k in zip(samples, kinds) if k == "refusal"), key=[s.response for s in samples].count,
            default=None)
        if refusal is None:
            raise SystemExit(f"{path}: no `refusal` rows to take the refusal from; pass --refusal TEXT")
        refusals, _, _ = tokenize_rows(tok, [dataclasses.replace(s, response=refusal, final=None) for s in samples],
                                       cfg.data)
        with security_vector_off(model), eval_mode(model):  # the base model's representations
            emb = embeddings(model, data.examples, tok.pad_token_id, args.batch_size)
            loss_refusal = row_losses(model, refusals.examples, tok.pad_token_id, "cpu", args.batch_size)
        assert len(refusals.examples) == len(off), "a refusal row was cut off: raise --data-max-length"
        antibody = [f - r for f, r in zip(off, loss_refusal)]  # log p(refusal) - log p(answer), per token
        sweep = []
        for (layer, pooling), e in sorted(emb.items()):
            for k in KS:
                sc = saft_scores(e, k)
                sweep.append({"layer": layer, "pooling": pooling, "k": k, "auroc": auroc(
                    [s for s, y in zip(sc, labels) if y], [s for s, y in zip(sc, labels) if not y]), "scores": sc})
        default = next(r for r in sweep if r["layer"] == len(emb) // len(POOLINGS) and r["pooling"] == "last"
                       and r["k"] == 1)
        best = max(sweep, key=lambda r: r["auroc"])
        methods = {"audit": ("audit", audit, t_audit, f"vector's default ({source})"),
                   "saft": (f"SAFT (layer {default['layer']}, {default['pooling']} token, k={default['k']})",
                            default["scores"], otsu(default["scores"]), "Otsu"),
                   "saft_best": (f"SAFT, best AUROC of the sweep (layer {best['layer']}, {best['pooling']}, "
                                 f"k={best['k']}; chosen with labels)", best["scores"], otsu(best["scores"]), "Otsu"),
                   "antibody": ("Antibody-style (refusal vs answer likelihood)", antibody, otsu(antibody), "Otsu")}
        res = {"data": path, "rows": len(labels), "harmful": sum(labels), "methods": {}}
        for key, (name, sc, t, rule) in methods.items():
            flagged = [s >= t for s in sc]
            res["methods"][key] = {
                "name": name,
                "auroc": auroc([s for s, y in zip(sc, labels) if y], [s for s, y in zip(sc, labels) if not y]),
                "own": {**at_threshold(sc, labels, t), "rule": rule}, "best_f1": best_f1(sc, labels),
                "by_kind": {k: sum(f for f, kk in zip(flagged, kinds) if kk == k) for k in sorted(set(kinds))}}
        res["kinds"] = {k: kinds.count(k) for k in sorted(set(kinds))}
        res["sweep"] = [{k: v for k, v in r.items() if k != "scores"} for r in sweep]
        sets.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "sweep"}, indent=1), flush=True)

    lines = ["| rows (harmful) | method | AUROC | own threshold: flagged | precision | recall | "
             "best-F1 threshold (labels): precision | recall |", "|---|---|---|---|---|---|---|---|"]
    for r in sets:
        for m in r["methods"].values():
            o, b = m["own"], m["best_f1"]
            lines.append(f"| {r['rows']:,} ({r['harmful']:,}) | {m['name']} | {m['auroc']:.3f} | {o['flagged']:,} "
                         f"({o['rule'].split(' (')[0]}) | {o['precision']:.3f} | {o['recall']:.3f} | "
                         f"{b['precision']:.3f} | {b['recall']:.3f} |")
    names = list(sets[0]["methods"])
    lines += ["", "Flagged rows per kind at each method's own threshold (" + ", ".join(names) + "):", "",
        "| kind | " + " | ".join(f"{r['harmful']:,} harmful: {n}" for r in sets for n in names) + " |",
        "|---|" + "---|" * (len(sets) * len(names))]
    for kind in sorted({k for r in sets for k in r["kinds"]}):
        cells = [f"{r['methods'][n]['by_kind'].get(kind, 0):,} / {r['kinds'].get(kind, 0):,}" for r in sets
                 for n in names]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", "SAFT AUROC per layer, pooling and k (each row set):", "",
              "| layer | pooling | " + " | ".join(f"k={k}, {r['harmful']:,} harmful" for r in sets for k in KS) + " |",
              "|---|---|" + "---|" * (len(sets) * len(KS))]
    for row in (r for r in sets[0]["sweep"] if r["k"] == KS[0]):
        cells = [f"{s['auroc']:.3f}" for r in sets for s in r["sweep"]
                 if (s["layer"], s["pooling"]) == (row["layer"], row["pooling"])]
        lines.append(f"| {row['layer']} | {row['pooling']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_saft.json").write_text(json.dumps({"model": args.model, "vector": args.vector, "sets": sets},
                                                        indent=1) + "\n")
        (out / "bench_saft.md").write_text(table)


if __name__ == "__main__":
    main()
