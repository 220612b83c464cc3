"""`dist-secvec audit`: which training rows does the security vector already explain?

The vector was trained (stage 1) so that with it on the model gives the harmful answers, while a
KL term keeps it from changing anything else. So on a row of the behaviour it learned, the answer
loss with the vector on is far below the loss with it off; on benign rows the two are equal. Per
row (strength.score_rows, the same scoring stage 2's gate uses):

    loss_off, loss_on   mean per-token loss of the row's answer, vector off / on
    score               loss_off - loss_on (nats per answer token): what the vector explains
    explained           1 - loss_on / loss_off: the same, as a share of the row's loss

A row is flagged when score >= the threshold and the vector explains a large enough share of it
(audit.min_explained, by default half the share it explains of its own held-out rows: the gate's
rule). The share keeps a vector from flagging rows whose loss is high for another reason (the
rows of another behaviour, under several vectors), where any change of the model removes a few
nats. The default threshold needs no labels: stage 1 records in secvec.json (`audit`) the scores
of its own harmful rows and benign rows (`reference_record`), and `resolve_threshold` places the
threshold between them. Outputs go to
output_dir/audit/ (audit.jsonl, summary.json, summary.md, scores.png), written atomically.

Stage 2 (`data.audit: report | drop | downweight`) uses the same scores, computed once before the
first step (`stage2_audit`). Both keep the scores in the score cache, files.cache_root()/
audit-scores/, by a key of the tokenized rows, the vector(s), the base and the numerics
(`score_key`): a rerun, another output_dir, the command after stage 2 or the reverse reads them
back instead of scoring again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional

from dist_secvec import runtime
from dist_secvec.config import Config
from dist_secvec.errors import ConfigError, DataError, UserError

log = logging.getLogger(__name__)

AUDIT_DIR = "audit"  # under output_dir, for the command and for stage 2 alike
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
SCORE_DEFINITION = "loss_off - loss_on: mean answer loss per token with the vector off minus with it on (nats)"
# the stage-1 quantiles the default threshold lies between: nearly every benign row below,
# nearly every held-out harmful row above
BENIGN_Q, HARMFUL_Q = "q99", "q05"


# ---------------------------------------------------------------------------------------------
# scores and their distribution


def score(loss_off: float, loss_on: float) -> float:
    return loss_off - loss_on


def quantiles(values: list[float]) -> dict:
    """{"n", "mean", "q00", "q01", ..., "q100"}: linear interpolation between order statistics."""
    v = sorted(values)
    out: dict = {"n": len(v)}
    if not v:
        return out
    out["mean"] = sum(v) / len(v)
    for q in QUANTILES:
        pos = q * (len(v) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out[f"q{round(100 * q):02d}"] = v[lo] + (v[hi] - v[lo]) * (pos - lo)
    return out


def reference_record(model, sets: dict, pad_id: int, device, batch_size: int, vector_off) -> dict:
    """Stage 1's record for secvec.json: the score quantiles of each named set of its own rows
    (harmful_heldout, harmful_train, benign_heldout, benign_kl; empty sets left out)."""
    from dist_secvec.strength import score_rows

    rec: dict = {"score": SCORE_DEFINITION}
    for name, examples in sets.items():
        if examples:
            # every rank of stage 1 scores every row itself (the same forwards in step under ZeRO-3)
            off, on = score_rows(model, examples, pad_id, device, batch_size, vector_off, collective=False)
            rec[name] = quantiles([score(f, a) for f, a in zip(off, on)])
    t = threshold_from_record(rec)
    if t is not None:
        rec["threshold"], rec["rule"] = t
    return rec


def threshold_from_record(rec: dict) -> Optional[tuple[float, str]]:
    """(threshold, rule) from stage 1's recorded distributions, or None when they lack a side."""
    harm_name = "harmful_heldout" if "harmful_heldout" in rec else "harmful_train"
    ben_name = "benign_heldout" if "benign_heldout" in rec else "benign_kl"
    harm, ben = rec.get(harm_name), rec.get(ben_name)
    if not (isinstance(harm, dict) and isinstance(ben, dict) and HARMFUL_Q in harm and BENIGN_Q in ben):
        return None
    lo, hi = ben[BENIGN_Q], harm[HARMFUL_Q]
    if lo < hi:
        return (lo + hi) / 2, (f"halfway between the 99th percentile of stage 1's {ben_name} rows ({lo:.3g}) and "
                               f"the 5th percentile of its {harm_name} rows ({hi:.3g})")
    mid = (ben["q50"] + harm["q50"]) / 2
    return mid, (f"stage 1's {ben_name} and {harm_name} scores overlap (99th percentile {lo:.3g} >= 5th percentile "
                 f"{hi:.3g}): halfway between their medians; the vector separates them poorly")


def resolve_threshold(cfg: Config, sv) -> tuple[float, str, str]:
    """(threshold, source, rule): audit.threshold, else stage 1's recorded distributions, else (a
    vector from before they were recorded) half the score of its held-out harmful rows, as stage 2's
    gate places its threshold. A vector that records neither is refused (before any model loads)."""
    if cfg.audit.threshold is not None:
        return cfg.audit.threshold, "audit.threshold", "set in the config (audit.threshold)"
    rec = sv.meta.get("audit")
    found = threshold_from_record(rec) if isinstance(rec, dict) else None
    if found is not None:
        return found[0], "stage-1 distribution", found[1]
    s = sv.meta.get("strength") or {}
    if isinstance(s.get("loss_vector_off"), (int, float)) and isinstance(s.get("loss_vector_on"), (int, float)):
        held = s["loss_vector_off"] - s["loss_vector_on"]
        return 0.5 * held, "fallback: held-out strength", (
            f"fallback for a vector without recorded score distributions (from an older train-sv): half the score "
            f"of its {s.get('n', '?')} held-out harmful rows ({held:.3g}, token mean); retrain it for a threshold "
            "placed between its harmful and benign rows")
    raise ConfigError(f"config key 'audit.threshold': the security vector '{sv.path}' records neither score "
                      "distributions nor its strength (not written by this train-sv), so no default threshold can "
                      "be placed; set audit.threshold (a score in nats per answer token, e.g. 1.0)")


def resolve_thresholds(cfg: Config, sv) -> list[tuple[float, str, str]]:
    """resolve_threshold for each vector of `sv` (several: each its own, from its own record)."""
    from dist_secvec.secvec import vector_parts

    return [resolve_threshold(cfg, part) for part in vector_parts(sv)]


def explained_floor(cfg: Config, sv) -> Optional[float]:
    """The share of a row's loss the vector must explain to flag it: audit.min_explained, else half
    the share it explains of its own held-out rows (secvec.json's strength); None = no such
    condition (a vector without the record, or audit.min_explained=0)."""
    if cfg.audit.min_explained is not None:
        return cfg.audit.min_explained or None
    explained = (sv.meta.get("strength") or {}).get("explained")
    return 0.5 * explained if isinstance(explained, (int, float)) else None


# ---------------------------------------------------------------------------------------------
# rows


def tokenize_rows(tok, samples: list, data_cfg) -> tuple:
    """(TokenizedSet, the samples of its examples, the samples dropped): as data.tokenize_samples,
    keeping which sample each example came from, for the report."""
    from dist_secvec.data import IGNORE_INDEX, TokenizedSet, tokenize_sample

    examples, kept, dropped, n_trunc = [], [], [], 0
    for s in samples:
        ex, truncated = tokenize_sample(tok, s, data_cfg)
        if all(label == IGNORE_INDEX for label in ex["labels"]):
            dropped.append(s)
            continue
        n_trunc += truncated
        examples.append(ex)
        kept.append(s)
    if not examples:
        first = f" (e.g. '{dropped[0].source}' row {dropped[0].row})" if dropped else ""
        raise DataError(f"data: every row was dropped: each prompt alone fills data.max_length="
                        f"{data_cfg.max_length} tokens{first}; raise data.max_length or shorten the prompts")
    names = [f"'{s.source}' row {s.row}" for s in dropped[:3]]
    return TokenizedSet(examples, n_trunc, len(dropped), names), kept, dropped


def row_records(samples: list, off: list, on: list, threshold: float, prompt_chars: int,
                dropped: list = (), min_explained: Optional[float] = None) -> list[dict]:
    """audit.jsonl's records: the scored rows, then those that could not be scored. A row is
    flagged when its score reaches `threshold` and its explained share `min_explained` (if set)."""
    from dist_secvec.strength import explained_share

    out = []
    for s, f, a in zip(samples, off, on):
        sc, ex = score(f, a), explained_share(f, a)
        out.append({"source": s.source, "row": s.row, "prompt": s.prompt[:prompt_chars], "loss_off": f,
                    "loss_on": a, "score": sc, "explained": ex,
                    "flagged": sc >= threshold and (min_explained is None or ex >= min_explained)})
    for s in dropped:
        out.append({"source": s.source, "row": s.row, "prompt": s.prompt[:prompt_chars], "loss_off": None,
                    "loss_on": None, "score": None, "explained": None, "flagged": False,
                    "note": "not scored: the prompt alone fills data.max_length"})
    return out


def summarize(records: list[dict], threshold: float, source: str, rule: str, sv, extra: dict) -> dict:
    scored = [r for r in records if r["score"] is not None]
    flagged = [r for r in scored if r["flagged"]]
    scores = [r["score"] for r in scored]
    return {"rows": len(records), "scored": len(scored), "not_scored": len(records) - len(scored),
            "flagged": len(flagged), "flagged_share": len(flagged) / max(len(scored), 1),
            "threshold": threshold, "threshold_source": source, "threshold_rule": rule, "score": SCORE_DEFINITION,
            "scores": quantiles(scores), "scores_flagged": quantiles([r["score"] for r in flagged]),
            "scores_unflagged": quantiles([r["score"] for r in scored if not r["flagged"]]),
            "explained": quantiles([r["explained"] for r in scored]),
            "security_vector": sv.path, "stage1_reference": sv.meta.get("audit"), **extra}


def summary_markdown(summary: dict) -> str:
    def q(d: dict) -> str:
        return " | ".join(f"{d[k]:.3g}" if k in d else "-" for k in ("q05", "q25", "q50", "q75", "q95"))

    lines = ["# Audit", "",
             f"{summary['flagged']} of {summary['scored']} scored rows flagged "
             f"({100 * summary['flagged_share']:.1f}%); {summary['not_scored']} rows not scored.", "",
             f"Threshold: score >= {summary['threshold']:.4g} ({summary['threshold_source']}: "
             f"{summary['threshold_rule']})" + (f" and explained share >= {summary['min_explained']:.3g} "
                                                "(audit.min_explained)" if summary.get("min_explained") else "")
             + ".", "",
             f"Score: {summary['score']}." + (" Read from the score cache (these rows, vector and base were scored "
                                               "before)." if summary.get("cached") else ""), "",
             "| rows | n | q05 | q25 | q50 | q75 | q95 |", "|---|---|---|---|---|---|---|"]
    for name, key in (("all scored", "scores"), ("flagged", "scores_flagged"), ("not flagged", "scores_unflagged")):
        lines.append(f"| {name} | {summary[key]['n']} | {q(summary[key])} |")
    ref = summary.get("stage1_reference") or {}
    for name in ("harmful_heldout", "harmful_train", "benign_heldout", "benign_kl"):
        if isinstance(ref.get(name), dict):
            lines.append(f"| stage 1: {name} | {ref[name]['n']} | {q(ref[name])} |")
    lines += ["", f"Security vector: `{summary['security_vector']}`; data: "
              + ", ".join(f"`{d}`" for d in summary.get("data", [])), ""]
    return "\n".join(lines)


def plot_scores(path: Path, records: list[dict], threshold: float, ref: Optional[dict]) -> None:
    """A histogram of the scores, the threshold marked (and stage 1's reference medians)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = [r["score"] for r in records if r["score"] is not None]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    lo, hi = min(scores + [threshold, 0.0]), max(scores + [threshold])
    bins = [lo + (hi - lo) * i / 60 for i in range(61)] if hi > lo else 10
    ax.hist([s for s in scores if s < threshold], bins=bins, color="#4c78a8", label="not flagged")
    ax.hist([s for s in scores if s >= threshold], bins=bins, color="#d62728", label="flagged")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    ref = ref or {}
    for names, color in ((("benign_heldout", "benign_kl"), "#2ca02c"), (("harmful_heldout", "harmful_train"), "#ff7f0e")):
        name = next((n for n in names if isinstance(ref.get(n), dict) and "q50" in ref[n]), None)
        if name:
            ax.axvline(ref[name]["q50"], color=color, linestyle=":", label=f"stage 1 {name} median")
    ax.set_xlabel("score: loss off - loss on (nats / answer token)")
    ax.set_ylabel("rows")
    ax.set_yscale("symlog", linthresh=1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: Path, records: list[dict], summary: dict,
                 reports: Optional[list[tuple[str, list, dict]]] = None) -> Path:
    """output_dir/audit/ as one atomic directory: a reader sees the old report or the whole new one.
    Several vectors (`reports`: name, records, summary of each): a histogram and a summary
    section per vector (scores_<name>.png)."""
    from dist_secvec.files import atomic_dir

    final = Path(out_dir) / AUDIT_DIR
    several = reports is not None and len(reports) > 1
    with atomic_dir(final) as tmp:
        (tmp / "audit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        for name, recs, s in (reports if several else [("", records, summary)]):
            plot_scores(tmp / (f"scores_{name}.png" if several else "scores.png"), recs, s["threshold"],
                        s.get("stage1_reference"))
        if several:
            md = [f"# Audit against {len(reports)} vectors", "",
                  f"{summary['flagged']} of {summary['scored']} scored rows flagged by at least one vector, "
                  f"{summary['flagged_by_several']} by several: "
                  + ", ".join(f"{n} {c}" for n, c in summary["flagged_by"].items()) + ".", ""]
            md += [summary_markdown(s).replace("# Audit", f"## {name}", 1) for name, _, s in reports]
            (tmp / "summary.md").write_text("\n".join(md))
        else:
            (tmp / "summary.md").write_text(summary_markdown(summary))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return final


# ---------------------------------------------------------------------------------------------
# the score cache: one scoring of the same rows for every output_dir, the command and stage 2

SCORES_DIR = "audit-scores"  # under files.cache_root(), one JSON file per key
SCORES_VERSION = 1  # raise when strength.score_rows changes what a row's loss is
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _model_files(model_cfg) -> list:
    """(name, bytes, mtime) of the base's weight files and config: a base rewritten in place is
    another key (a copy elsewhere is too, and only scores again)."""
    from dist_secvec.secvec.fingerprint import resolve_model_dir

    d = resolve_model_dir(model_cfg.path) if model_cfg.path else None
    if d is None:
        return [model_cfg.path, model_cfg.gguf_file]
    out = []
    for f in sorted(Path(d).iterdir()):
        if f.is_file() and (f.name == "config.json" or f.name.endswith(WEIGHT_SUFFIXES)):
            st = f.stat()
            out.append([f.name, st.st_size, st.st_mtime_ns])
    return out


def score_key(examples: list[dict], sv, model_cfg) -> tuple[str, dict]:
    """(key, what it covers): the rows as tokenized, each vector's weights and adapter config, its
    recorded base fingerprint, the base's files and the numerics that change a loss (model.dtype,
    quantization). audit.batch_size and audit.one_forward are left out: they change the losses by
    float rounding only, so `dist-secvec audit` and stage 2 share one scoring."""
    from dist_secvec.files import sha256_file
    from dist_secvec.secvec import ADAPTER_CONFIG, ADAPTER_WEIGHTS, vector_parts

    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e["input_ids"], e["labels"]]).encode())
        h.update(b"\n")
    parts = vector_parts(sv)
    numerics = {"dtype": model_cfg.dtype, "quantization": model_cfg.quantization}
    if model_cfg.quantization != "none":
        numerics.update(compute_dtype=model_cfg.compute_dtype, quant_storage=model_cfg.quant_storage,
                        double_quant=model_cfg.double_quant)
    fields = {"version": SCORES_VERSION, "rows": len(examples), "data": h.hexdigest(),
              "vectors": [[sha256_file(Path(p.path) / ADAPTER_WEIGHTS), sha256_file(Path(p.path) / ADAPTER_CONFIG)]
                          for p in parts],
              "base_fingerprint": [p.meta.get("base_fingerprint") for p in parts],
              "model_files": _model_files(model_cfg), "numerics": numerics}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32], fields


def scores_path(key: str) -> Path:
    from dist_secvec.files import cache_root

    return cache_root() / SCORES_DIR / f"{key}.json"


def cached_scores(key: str, n: int) -> Optional[tuple[list, list]]:
    """(loss_off, loss_on) of the n rows from the score cache, else None (missing or damaged)."""
    try:
        rec = json.loads(scores_path(key).read_text(encoding="utf-8"))
        off, on = rec["loss_off"], rec["loss_on"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if rec.get("key") != key or not (isinstance(off, list) and isinstance(on, list) and len(off) == len(on) == n):
        return None
    return off, on


def store_scores(key: str, fields: dict, off: list, on: list) -> Optional[Path]:
    """Written atomically (a reader sees no entry or the whole one); a cache that cannot be
    written costs a warning and a scoring next time, never the run."""
    from dist_secvec.files import write_text_atomic

    path = scores_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"key": key, "covers": fields, "loss_off": off, "loss_on": on}) + "\n")
    except OSError as e:
        log.warning("audit: the score cache %s could not be written (%s); the rows will be scored again next time",
                    path, e)
        return None
    return path


def scores_once(key: str, fields: dict, n: int, score_fn: Callable[[], tuple[list, list]],
                what: str) -> tuple[list, list, bool]:
    """(loss_off, loss_on, read from the cache): this key's cached scores, else score_fn()'s
    (collective: every rank takes the same branch), which rank 0 then stores."""
    from dist_secvec.distributed import all_reduce_sum

    cached = cached_scores(key, n)
    hit = all_reduce_sum([0.0 if cached is None else 1.0])[0] == runtime.world_size()
    if hit:
        log.info("%s: scores of the %d rows read from the score cache %s, not scored", what, n, scores_path(key))
        return cached[0], cached[1], True
    off, on = score_fn()
    if runtime.is_main():
        path = store_scores(key, fields, off, on)
        if path is not None:
            log.info("%s: scores of the %d rows kept in the score cache %s", what, n, path)
    return off, on, False


# ---------------------------------------------------------------------------------------------
# stage 2: data.audit


def stage2_audit(cfg: Config, sv, samples: list, dropped: list, examples: list,
                 score_fn: Callable[[], tuple[list, list[list]]], thresholds: list[tuple[float, str, str]]) -> tuple:
    """data.audit in stage 2: (scores (loss_off, [loss_on per vector]), flagged per example, info).
    Every rank calls it (score_fn is collective); rank 0 writes the report into output_dir/audit.
    Each vector's scores come from the score cache when these rows were scored against it before
    (scores_once); with several vectors a row is flagged when any vector flags it."""
    from dist_secvec.secvec import vector_parts

    parts = vector_parts(sv)
    ons, reports, hits = [], [], []
    for i, (part, (t, source, rule), name) in enumerate(zip(parts, thresholds, behaviour_names(parts))):
        key, fields = score_key(examples, part, cfg.model)
        off, on, hit = scores_once(key, fields, len(examples), lambda: (score_fn()[0], score_fn()[1][i]), "data.audit")
        ons.append(on)
        hits.append(hit)
        floor = explained_floor(cfg, part)
        records = row_records(samples, off, on, t, cfg.audit.prompt_chars, dropped, floor)
        reports.append((name, records, summarize(records, t, source, rule, part, {
            "min_explained": floor, "data": list(cfg.data.train), "mode": cfg.data.audit, "cache_key": key,
            "cached": hit})))
    records, summary = reports[0][1], reports[0][2]
    if len(reports) > 1:
        records, summary = merge_reports(reports, {"data": list(cfg.data.train), "mode": cfg.data.audit})
    flagged = [r["flagged"] for r in records[:len(examples)]]
    t, source, _ = thresholds[0]
    info = {"mode": cfg.data.audit, "threshold": t if len(parts) == 1 else [th[0] for th in thresholds],
            "threshold_source": source, "rows": len(examples), "flagged": int(sum(flagged)), "cached": all(hits)}
    if len(parts) > 1:
        info["flagged_by"] = summary["flagged_by"]
    if cfg.data.audit == "downweight":
        info["weight"] = cfg.audit.weight
    if runtime.is_main():
        info["report"] = str(write_report(Path(cfg.output_dir), records, summary, reports))
    what = {"report": "reported only", "drop": "left out of training",
            "downweight": f"their loss weighted {cfg.audit.weight:g}"}[cfg.data.audit]
    log.info("data.audit=%s: %d of %d rows flagged (%s): %s", cfg.data.audit, info["flagged"], len(examples),
             ", ".join(f"{name}: score >= {th[0]:.3g}, {th[1]}" for (name, _, _), th in zip(reports, thresholds)),
             what)
    if cfg.data.audit == "drop" and info["flagged"] == len(examples):
        raise UserError(f"data.audit=drop: every one of the {len(examples)} rows of data.train is flagged; nothing "
                        f"is left to train on. Check the data, or set audit.threshold "
                        f"(see {Path(cfg.output_dir) / AUDIT_DIR / 'summary.md'})")
    return (off, ons), flagged, info


# ---------------------------------------------------------------------------------------------
# the command


def run_audit(cfg: Config) -> dict:
    """`dist-secvec audit`: every rank scores its share of data.train (data parallel under a
    launcher), rank 0 writes output_dir/audit/. Rows scored before (by this command or stage 2,
    for any output_dir) are read from the score cache and the model is not loaded. Several
    vectors: each row scored against each vector alone, each with its own threshold, and the
    report says which behaviours a row looks like. Returns the summary (on rank 0; {} elsewhere)."""
    from dist_secvec.data import load_samples
    from dist_secvec.distributed import barrier, init_distributed
    from dist_secvec.model import load_tokenizer
    from dist_secvec.secvec import load_security_vector, vector_parts

    t0 = time.time()
    # everything that can be refused is, before the model loads
    rows = load_samples(cfg.data.train, cfg.data, cfg.data.split, cfg.data.max_samples)
    sv = load_security_vector(cfg.security_vector.path)
    parts, thresholds = vector_parts(sv), resolve_thresholds(cfg, sv)
    if runtime.world_size() > 1:
        init_distributed(cfg)
    tok = load_tokenizer(cfg.model)
    data, samples, dropped = tokenize_rows(tok, rows, cfg.data)
    log.info(data.report("audit data"))
    scorer = _Scorer(cfg, tok, data.examples)
    reports = []  # per vector: (name, records, summary)
    for part, (t, source, rule), name in zip(parts, thresholds, behaviour_names(parts)):
        key, fields = score_key(data.examples, part, cfg.model)
        off, on, hit = scores_once(key, fields, len(data.examples), lambda: scorer.score(part), "audit")
        if runtime.is_main():
            floor = explained_floor(cfg, part)
            records = row_records(samples, off, on, t, cfg.audit.prompt_chars, dropped, floor)
            reports.append((name, records, summarize(records, t, source, rule, part, {
                "min_explained": floor, "data": list(cfg.data.train), "model": cfg.model.path, "cache_key": key,
                "cached": hit})))
    summary: dict = {}
    if runtime.is_main():
        extra = {"ranks": runtime.world_size(), "seconds": round(time.time() - t0, 1)}
        records, summary = reports[0][1], {**reports[0][2], **extra}
        if len(reports) > 1:
            records, summary = merge_reports(reports, extra)
        final = write_report(Path(cfg.output_dir), records, summary, reports)
        for name, _, s in reports:
            log.info("audit: %d of %d rows flagged%s (score >= %.3g; %s); report in %s", s["flagged"], s["scored"],
                     f" as {name}" if len(reports) > 1 else "", s["threshold"], s["threshold_source"], final)
    barrier()
    return summary


def behaviour_names(parts: list) -> list[str]:
    """Each vector's behaviour name (secvec.json), numbered where two vectors share one."""
    names = [p.behaviour["name"] for p in parts]
    return [f"{n}_{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def merge_reports(reports: list[tuple[str, list, dict]], extra: dict) -> tuple[list[dict], dict]:
    """Several vectors: one record per row with each vector's losses, score, explained share and
    flag, flagged when any vector flags it, and `behaviours`, the vectors that do; the summary
    holds each vector's own summary under `vectors`."""
    keys = ("loss_off", "loss_on", "score", "explained", "flagged")
    records = []
    for rows in zip(*(recs for _, recs, _ in reports)):
        base = {k: v for k, v in rows[0].items() if k not in keys}
        per = {name: {k: r[k] for k in keys} for (name, _, _), r in zip(reports, rows)}
        flagged = [name for name, v in per.items() if v["flagged"]]
        records.append({**base, "vectors": per, "flagged": bool(flagged), "behaviours": flagged})
    scored = sum(1 for r in records if all(v["score"] is not None for v in r["vectors"].values()))
    n = sum(r["flagged"] for r in records)
    summary = {"rows": len(records), "scored": scored, "not_scored": len(records) - scored, "flagged": n,
               "flagged_share": n / max(scored, 1), "flagged_by": {name: s["flagged"] for name, _, s in reports},
               "flagged_by_several": sum(len(r["behaviours"]) > 1 for r in records), "score": SCORE_DEFINITION,
               "vectors": {name: s for name, _, s in reports}, **extra}
    return records, summary


class _Scorer:
    """The command's scoring: the base loaded (once, on first use) and checked against each
    vector, the vector attached for its scoring and taken out again."""

    def __init__(self, cfg: Config, tok, examples: list[dict]):
        self.cfg, self.tok, self.examples, self.model, self.device = cfg, tok, examples, None, None

    def score(self, sv) -> tuple[list, list]:
        from dist_secvec.model import load_model
        from dist_secvec.secvec import (PathOptions, attach_security_vector, check_fingerprint,
                                        detach_security_vector, security_vector_off)
        from dist_secvec.strength import score_rows
        from dist_secvec.training import pick_device

        cfg = self.cfg
        if self.model is None:
            self.device = pick_device()
            self.model = load_model(cfg.model, self.device)
        check_fingerprint(sv, self.model, cfg.model.path)
        v = cfg.security_vector
        layers = attach_security_vector(self.model, sv, PathOptions(
            backend=v.backend, fused_lora=False, weight_delta=v.weight_delta, gated=cfg.audit.one_forward,
            rows_per_call=cfg.audit.batch_size * cfg.data.max_length))
        try:
            return score_rows(self.model, self.examples, self.tok.pad_token_id, self.device, cfg.audit.batch_size,
                              lambda: security_vector_off(self.model),
                              progress={"desc": f"audit: {sv.behaviour['name']}", "enabled": cfg.logging.progress},
                              gate_layers=layers if cfg.audit.one_forward else None)
        finally:
            detach_security_vector(self.model)
