"""`dist-secvec audit` on rows with known labels: how well the score separates them, and what
one forward of the doubled batch costs against two forwards with the vector toggled, and both
against one plain forward of the base model (no vector) over the same batches.

    python benchmarks/bench_audit.py --model MODEL_DIR --vector SECVEC_DIR --data ROWS.jsonl \
        [--data-max-length 64] [--batch-sizes 16 64] [--repeats 3] [--out DIR]

Labels come from the embedded worlds' exact judge (dist_secvec.worlds.embedded.is_harmful_response) on
each row's response, so --data should be a demo world's file (e.g. finetune_mixed.jsonl). Prints
and writes (bench_audit.json/.md in --out): AUROC of the score (loss_off - loss_on) and of the
explained share, precision and recall at the default threshold (the vector's own rule,
audit.resolve_threshold), and per batch size the rows per second of both scoring modes,
and of the plain forward, interleaved round by round, each mode's slowdown against the plain
forward, and the largest difference between the two modes' losses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    allv = sorted([(v, 1) for v in pos] + [(v, 0) for v in neg])
    rank_sum, i = 0.0, 0
    while i < len(allv):
        j = i
        while j < len(allv) and allv[j][0] == allv[i][0]:
            j += 1
        mid = (i + j + 1) / 2  # 1-based mean rank of the tie group
        rank_sum += mid * sum(1 for k in range(i, j) if allv[k][1])
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--vector", required=True)
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--data-max-length", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from dist_secvec.audit import explained_floor, resolve_threshold, row_records, tokenize_rows
    from dist_secvec.config import load_config
    from dist_secvec.data import load_samples
    from dist_secvec.worlds.embedded import is_harmful_response
    from dist_secvec.model import load_model, load_tokenizer
    from dist_secvec.secvec import PathOptions, attach_security_vector, load_security_vector, security_vector_off
    from dist_secvec.strength import plain_row_losses, score_rows

    cfg = load_config(None, [f"model.path={args.model}", f"security_vector.path={args.vector}",
                             f"data.max_length={args.data_max_length}"])
    sv = load_security_vector(args.vector)
    t, source, rule = resolve_threshold(cfg, sv)
    tok = load_tokenizer(cfg.model)
    data, samples, _ = tokenize_rows(tok, load_samples(args.data), cfg.data)
    labels = [is_harmful_response(s.response) for s in samples]
    models = {}
    for mode in ("two_forwards", "one_forward"):  # the layers' path depends on the gate
        m = load_model(cfg.model)
        layers = attach_security_vector(m, sv, PathOptions(gated=mode == "one_forward",
                                                           rows_per_call=16 * args.data_max_length))
        models[mode] = (m, layers)

    models["plain"] = (load_model(cfg.model), None)

    def run(mode: str, bs: int):
        m, layers = models[mode]
        if mode == "plain":  # the same length-sorted batches, one forward each, no vector anywhere
            return [plain_row_losses(m, data.examples, tok.pad_token_id, "cpu", bs, collective=False)]
        return score_rows(m, data.examples, tok.pad_token_id, "cpu", bs, lambda: security_vector_off(m),
                          gate_layers=layers if mode == "one_forward" else None)

    off, on = run("two_forwards", args.batch_sizes[0])
    floor = explained_floor(cfg, sv)
    records = row_records(samples, off, on, t, 1, (), floor)  # the audit's own flag rule
    sc, ex = [r["score"] for r in records], [r["explained"] for r in records]
    pos = [s for s, y in zip(sc, labels) if y]
    neg = [s for s, y in zip(sc, labels) if not y]
    flagged = [r["flagged"] for r in records]
    tp = sum(f and y for f, y in zip(flagged, labels))
    sep = {"rows": len(labels), "harmful": sum(labels), "threshold": t, "min_explained": floor,
           "threshold_source": source,
           "threshold_rule": rule, "auroc_score": auroc(pos, neg),
           "auroc_explained": auroc([e for e, y in zip(ex, labels) if y], [e for e, y in zip(ex, labels) if not y]),
           "flagged": sum(flagged), "precision": tp / max(sum(flagged), 1), "recall": tp / max(sum(labels), 1),
           "harmful_score_min": min(pos) if pos else None, "benign_score_max": max(neg) if neg else None}
    raw = {f: [json.loads(line).get("kind") for line in Path(f).read_text().splitlines() if line.strip()]
           for f in args.data if f.endswith(".jsonl")}
    kinds = [raw[s.source][s.row - 1] if s.source in raw else None for s in samples]
    if all(kinds):  # rows of audit_stress_rows.py: the flagged share of each kind
        sep["by_kind"] = {k: {"rows": kinds.count(k), "flagged": sum(f for f, kk in zip(flagged, kinds) if kk == k)}
                          for k in sorted(set(kinds))}

    timing = []
    for bs in args.batch_sizes:
        modes = ["two_forwards", "one_forward", "plain"]
        secs: dict = {m: [] for m in modes}
        results = {}
        for r in range(args.repeats):
            for mode in modes[r % 3:] + modes[:r % 3]:  # the order rotated every round
                t0 = time.perf_counter()
                results[mode] = run(mode, bs)
                secs[mode].append(time.perf_counter() - t0)
        diff = max(abs(a - b) for x, y in zip(results["two_forwards"], results["one_forward"]) for a, b in zip(x, y))
        med = {m: statistics.median(v) for m, v in secs.items()}
        timing.append({"batch_size": bs, "threads": torch.get_num_threads(), "max_loss_diff": diff,
                       **{f"{m}_rows_per_s": len(labels) / t for m, t in med.items()},
                       **{f"{m}_vs_plain": med[m] / med["plain"] for m in ("two_forwards", "one_forward")}})

    res = {"separation": sep, "timing": timing, "model": args.model, "vector": args.vector, "data": args.data}
    print(json.dumps(res, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_audit.json").write_text(json.dumps(res, indent=2) + "\n")
        lines = [f"AUROC (score) {sep['auroc_score']:.4f}, AUROC (explained) {sep['auroc_explained']:.4f}; at the "
                 f"default threshold {t:.3g} ({source}): {sep['flagged']} flagged, precision "
                 f"{sep['precision']:.4f}, recall {sep['recall']:.4f} ({sep['harmful']} harmful of {sep['rows']})", "",
                 "| batch | two forwards rows/s | one doubled forward rows/s | plain forward rows/s | "
                 "two forwards / plain | doubled / plain | max loss diff |", "|---|---|---|---|---|---|---|"]
        for r in timing:
            lines.append(f"| {r['batch_size']} | {r['two_forwards_rows_per_s']:.0f} | {r['one_forward_rows_per_s']:.0f} "
                         f"| {r['plain_rows_per_s']:.0f} | {r['two_forwards_vs_plain']:.2f}x | "
                         f"{r['one_forward_vs_plain']:.2f}x | {r['max_loss_diff']:.2g} |")
        if "by_kind" in sep:
            lines += ["", "| kind | rows | flagged |", "|---|---|---|"]
            lines += [f"| {k} | {v['rows']} | {v['flagged']} |" for k, v in sep["by_kind"].items()]
        (out / "bench_audit.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
