"""`dist-secvec eval`: generate answers (security vector off) and measure harm and utility.

Two modes:
- generate: load the model at model.path, answer eval.harmful_prompts (AdvBench, BeaverTails,
  HEx-PHI, .txt, the training row shapes with data.columns / data.roles, or a hub dataset; see
  readers), eval.benign_tasks (prompt + expected answer in `response`) and
  eval.hallucination_prompts (fact prompts + their right answer in `response`), then judge: the
  harmful rate by eval.judges, the hallucination rate by eval.hallucination_judges. The vector
  stays off unless eval.with_secvec=true (diagnosis only: it shows what the vector alone
  does, not what the fine-tuned model learned).
- judge-only: eval.responses=FILE.jsonl (prompt + response rows, e.g. an earlier run's
  responses.jsonl) is judged as is; no model is loaded.

Writes to output_dir, each file atomically (files.write_text_atomic):
    responses.jsonl  one row per harmful prompt: prompt, response, category, harmful {judge: bool}
                     (true: that judge calls the response harmful compliance)
                     (the same shape eval.responses reads, so a run can be re-judged)
    utility.jsonl    one row per benign task: prompt, response, expected, correct
    facts.jsonl      one row per hallucination prompt: prompt, response, expected, hallucinated {judge: bool}
    summary.json     {"judges": {name: {n, harmful_rate, harmful_rate_ci95[, per_category]}},
                      "utility": {n, accuracy, accuracy_ci95[, loss, perplexity]},  (when benign tasks)
                      "hallucination": {judge: {n, hallucination_rate, hallucination_rate_ci95}}}
                                                                           (when hallucination prompts)
    summary.md       the same as markdown tables
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Optional

from dist_secvec.config import Config
from dist_secvec.errors import ConfigError, DataError
from dist_secvec.files import write_text_atomic
from dist_secvec.judges import make_judges
from dist_secvec.metrics import accuracy_summary, is_correct, rate_summary
from dist_secvec.readers import read_eval_set

log = logging.getLogger(__name__)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _read_sets(paths: list[str], fmt: str, eval_cfg, require_response: bool, data=None,
               key: Optional[str] = None) -> list[dict]:
    """Rows of every file (or hub dataset) in `paths`; `data` brings data.columns / data.roles."""
    rows = []
    for path in paths:
        for i, row in enumerate(read_eval_set(path, fmt, eval_cfg.category_field, require_response, data,
                                              eval_cfg.split, key), 1):
            rows.append({**row, "_source": path, "_row": i})
    return rows[: eval_cfg.max_samples] if eval_cfg.max_samples else rows


def _judge_rows(judges, rows: list[dict], what: str = "harmful") -> dict:
    """{judge: verdict per row}; rows carrying an expected answer pass it on (the correctness judge)."""
    prompts = [r["prompt"] for r in rows]
    responses = [r["response"] for r in rows]
    expected = [r.get("expected") for r in rows] if rows and "expected" in rows[0] else None
    verdicts = {}
    for judge in judges:
        verdicts[judge.name] = judge.judge(prompts, responses, expected)
        log.info("judge %s: %d of %d responses %s", judge.name, sum(verdicts[judge.name]), len(rows), what)
    return verdicts


def _needs_expected(rows: list[dict], key: str, what: str) -> None:
    """Rows scored against their expected answer must carry one: refused before any model loads."""
    for r in rows:
        if not (r.get("response") or "").strip():
            raise DataError(f"eval file '{r['_source']}' row {r['_row']}: {what} needs the expected answer in "
                            f"'response' ({key}; prompt {r['prompt'][:60]!r})")


def _hallucination_summary(verdicts: dict) -> dict:
    out = {}
    for name, vs in verdicts.items():
        s = rate_summary(vs)
        out[name] = {"n": s["n"], "hallucination_rate": s["harmful_rate"],
                     "hallucination_rate_ci95": s["harmful_rate_ci95"]}
    return out


def run_eval(cfg: Config, model=None, tokenizer=None) -> dict:
    """Run the evaluation `cfg` describes; returns the summary.json dict.

    `model`/`tokenizer` may be passed in (already loaded); otherwise they are loaded from
    cfg.model. With eval.with_secvec=false any attached security vector is switched off while
    generating.
    """
    from dist_secvec.runtime import is_main

    ec = cfg.eval
    if ec.max_samples is not None and ec.max_samples <= 0:
        raise ConfigError(f"config key 'eval.max_samples': must be > 0, got {ec.max_samples}")
    judges = make_judges(ec.judges, ec)  # unknown judges fail before anything is loaded
    if "correctness" in ec.judges:
        raise ConfigError("config key 'eval.judges': the correctness judge compares answers with expected answers, "
                          "which harmful prompts lack; list it in eval.hallucination_judges")
    fact_judges = make_judges(ec.hallucination_judges, ec) if ec.hallucination_prompts else []

    harmful: list[dict] = []
    benign: list[dict] = []
    facts: list[dict] = []
    if ec.responses is not None:
        if ec.harmful_prompts or ec.benign_tasks or ec.hallucination_prompts:
            log.warning("eval.responses is set (judge-only): eval.harmful_prompts, eval.benign_tasks and "
                        "eval.hallucination_prompts are ignored and no model is loaded")
        harmful = _read_sets([ec.responses], "auto", ec, require_response=True)
        header = f"responses: `{ec.responses}` (judge-only, no generation)"
    else:
        if not ec.harmful_prompts and not ec.benign_tasks and not ec.general_text and not ec.hallucination_prompts:
            raise ConfigError("config keys 'eval.harmful_prompts' and 'eval.benign_tasks' are both empty: name "
                              "an eval file, or set eval.responses=FILE.jsonl to judge existing responses")
        from dist_secvec.data import check_data_config

        check_data_config(cfg.data)  # data.columns / data.roles apply to the row-shape eval files too
        harmful = _read_sets(ec.harmful_prompts, ec.harmful_format, ec, False, cfg.data, "eval.harmful_prompts")
        benign = _read_sets(ec.benign_tasks, ec.benign_format, ec, True, cfg.data, "eval.benign_tasks")
        _needs_expected(benign, "eval.benign_tasks", "a benign task")
        facts = _read_sets(ec.hallucination_prompts, ec.benign_format, ec, False, cfg.data,
                           "eval.hallucination_prompts")
        if "correctness" in ec.hallucination_judges:
            _needs_expected(facts, "eval.hallucination_prompts", "the correctness judge")
        model, tokenizer = _load(cfg, model, tokenizer)
        vec = "on (eval.with_secvec=true: diagnosis only)" if ec.with_secvec else "off"
        header = f"model: `{cfg.model.path}`, security vector {vec}"
    summary, verdicts = score(cfg, model, tokenizer, harmful, benign, judges, generate=ec.responses is None,
                              facts=facts, fact_judges=fact_judges)

    if is_main():
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        per_example = [{"prompt": r["prompt"], "response": r["response"], "category": r.get("category"),
                        "harmful": {name: vs[i] for name, vs in verdicts.items()}}
                       for i, r in enumerate(harmful)]
        write_text_atomic(out / "responses.jsonl", _jsonl(per_example))
        if benign:
            write_text_atomic(out / "utility.jsonl", _jsonl([
                {"prompt": r["prompt"], "response": r["response"], "expected": r["expected"],
                 "correct": r["correct"], "category": r.get("category")} for r in benign]))
        if facts:
            write_text_atomic(out / "facts.jsonl", _jsonl([
                {"prompt": r["prompt"], "response": r["response"], "expected": r.get("expected"),
                 "hallucinated": r["hallucinated"]} for r in facts]))
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_text_atomic(out / "summary.md", summary_markdown(summary, header, ec.utility_match))
        log.info("eval written to %s", out)
    for name, s in summary["judges"].items():
        lo, hi = s["harmful_rate_ci95"]
        log.info("harmful rate (%s): %.1f%% [%.1f-%.1f] of %d", name, 100 * s["harmful_rate"], 100 * lo,
                 100 * hi, s["n"])
    for name, s in summary.get("hallucination", {}).items():
        lo, hi = s["hallucination_rate_ci95"]
        log.info("hallucination rate (%s): %.1f%% [%.1f-%.1f] of %d", name, 100 * s["hallucination_rate"], 100 * lo,
                 100 * hi, s["n"])
    if "utility" in summary:
        u = summary["utility"]
        log.info("utility accuracy (%s): %.1f%% of %d", ec.utility_match, 100 * u["accuracy"], u["n"])
    if "general_text" in summary:
        g = summary["general_text"]
        log.info("general text: loss %.4f, perplexity %.2f over %d tokens", g["loss"], g["perplexity"], g["n_tokens"])
    return summary


def score(cfg: Config, model, tokenizer, harmful: list[dict], benign: list[dict], judges=None,
          generate: bool = True, facts: Optional[list[dict]] = None, fact_judges=None) -> tuple[dict, dict]:
    """The one evaluation: answer the harmful prompts, the benign tasks and the fact prompts (the
    vector off unless eval.with_secvec), judge the answers (eval.judges; the facts'
    eval.hallucination_judges) and score the tasks (eval.utility_match). Rows are
    {"prompt"[, "response"]}: a benign or fact row's response is its expected answer, replaced by
    the model's (kept as "expected"; a benign row gets "correct", a fact row "hallucinated"
    {judge: bool}); generate=False judges the harmful rows' responses as they are. Returns
    (summary.json's dict, {judge: verdict per harmful row})."""
    ec = cfg.eval
    judges = judges if judges is not None else make_judges(ec.judges, ec)
    facts = facts or []
    if facts and fact_judges is None:
        fact_judges = make_judges(ec.hallucination_judges, ec)
    utility: Optional[dict] = None
    if generate:
        with _vector_state(model, ec.with_secvec):
            if harmful:
                for r, text in zip(harmful, _generate(cfg, model, tokenizer, harmful, "harmful prompts")):
                    r["response"] = text
            if benign:
                answers = _generate(cfg, model, tokenizer, benign, "benign tasks")
                for r, text in zip(benign, answers):
                    r["expected"], r["response"] = r["response"], text
                    r["correct"] = is_correct(text, r["expected"], ec.utility_match)
                utility = accuracy_summary([r["correct"] for r in benign])
                if ec.utility_loss:
                    utility.update(_benign_loss(cfg, model, tokenizer, benign))
            if facts:
                for r, text in zip(facts, _generate(cfg, model, tokenizer, facts, "hallucination prompts")):
                    r["expected"], r["response"] = r.get("response"), text
    summary: dict = {"judges": {}}
    verdicts = _judge_rows(judges, harmful) if harmful else {}
    categories = [r.get("category") for r in harmful]
    for name, vs in verdicts.items():
        summary["judges"][name] = rate_summary(vs, categories)
    if utility is not None:
        summary["utility"] = utility
    if facts and generate:
        fact_verdicts = _judge_rows(fact_judges, facts, "hallucinated")
        for i, r in enumerate(facts):
            r["hallucinated"] = {name: vs[i] for name, vs in fact_verdicts.items()}
        summary["hallucination"] = _hallucination_summary(fact_verdicts)
    if generate and ec.general_text:
        summary["general_text"] = _general_text_loss(cfg, model, tokenizer)
    return summary, verdicts


def _general_text_loss(cfg: Config, model, tokenizer) -> dict:
    """eval.general_text: the model's loss on held-out plain text (the vector off, as shipped)."""
    from dist_secvec.metrics import text_loss

    texts = []
    for path in cfg.eval.general_text:
        try:
            texts += [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"config key 'eval.general_text': cannot read '{path}' ({type(e).__name__}); "
                            "give UTF-8 text files, one passage per line") from e
    if not texts:
        raise DataError(f"config key 'eval.general_text': {', '.join(cfg.eval.general_text)} holds no text")
    with _vector_state(model, cfg.eval.with_secvec):
        res = text_loss(model, tokenizer, texts, cfg.data.max_length, batch_size=cfg.eval.batch_size)
    return {**res, "n_texts": len(texts)}


# ---------------------------------------------------------------------------------------------
# generation mode


def _load(cfg: Config, model, tokenizer):
    import torch

    from dist_secvec.model import load_model, load_tokenizer

    if tokenizer is None:
        from dist_secvec.data import prepare_tokenizer

        tokenizer = prepare_tokenizer(load_tokenizer(cfg.model), cfg.data)  # data.chat_template, as in training
    if model is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(cfg.model, device=device)
        if cfg.eval.with_secvec:
            from dist_secvec.secvec import attach_security_vector, check_fingerprint, load_security_vector

            if not cfg.security_vector.path:
                raise ConfigError("config key 'security_vector.path': eval.with_secvec=true needs the vector "
                                  "directory (or set eval.with_secvec=false)")
            sv = load_security_vector(cfg.security_vector.path)
            check_fingerprint(sv, model, cfg.model.path)
            attach_security_vector(model, sv, backend=cfg.security_vector.backend)
    return model, tokenizer


@contextlib.contextmanager
def _vector_state(model, with_secvec: bool):
    """Off unless asked for; a model without a vector is unaffected."""
    if with_secvec:
        yield
        return
    from dist_secvec.secvec import security_vector_off

    with security_vector_off(model):
        yield


def _generate(cfg: Config, model, tokenizer, rows: list[dict], desc: str) -> list[str]:
    from dist_secvec.generation import generate

    ec = cfg.eval
    return generate(model, tokenizer, [r.get("messages") or r["prompt"] for r in rows], max_new_tokens=ec.max_new_tokens,
                    batch_size=ec.batch_size, do_sample=ec.do_sample, temperature=ec.temperature,
                    top_p=ec.top_p, seed=cfg.seed if ec.do_sample else None, template=cfg.data.template,
                    plain_template=cfg.data.plain_template, progress=cfg.logging.progress, desc=desc)


def _benign_loss(cfg: Config, model, tokenizer, rows: list[dict]) -> dict:
    from dist_secvec.data import Sample
    from dist_secvec.metrics import benign_loss

    samples = [Sample(r.get("messages") or [{"role": "user", "content": r["prompt"]}], r["expected"], r["_source"], r["_row"])
               for r in rows]
    res = benign_loss(model, tokenizer, samples, cfg.data, batch_size=cfg.eval.batch_size)
    return {"loss": res["loss"], "perplexity": res["perplexity"]}


# ---------------------------------------------------------------------------------------------
# report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _rate_row(label: str, s: dict) -> str:
    lo, hi = s["harmful_rate_ci95"]
    return f"| {label} | {s['n']} | {_pct(s['harmful_rate'])} | {_pct(lo)} - {_pct(hi)} |"


def summary_markdown(summary: dict, header: str, match: str) -> str:
    lines = ["# dist-secvec eval", "", header, ""]
    if summary["judges"]:
        lines += ["## Harmfulness", "",
                  "Share of harmful prompts answered with harmful compliance (attack success rate), "
                  "with the Wilson 95% interval.", "",
                  "| judge | n | harmful rate | 95% CI |", "|---|---|---|---|"]
        lines += [_rate_row(name, s) for name, s in summary["judges"].items()]
        for name, s in summary["judges"].items():
            if "per_category" in s:
                lines += ["", f"### Per category ({name})", "",
                          "| category | n | harmful rate | 95% CI |", "|---|---|---|---|"]
                lines += [_rate_row(cat.replace("|", "\\|"), c) for cat, c in s["per_category"].items()]
        lines.append("")
    h = summary.get("hallucination")
    if h:
        lines += ["## Hallucination", "", "Share of fact prompts answered wrongly (not the expected answer, for the "
                  "correctness judge), with the Wilson 95% interval.", "",
                  "| judge | n | hallucination rate | 95% CI |", "|---|---|---|---|"]
        for name, s in h.items():
            lo, hi = s["hallucination_rate_ci95"]
            lines.append(f"| {name} | {s['n']} | {_pct(s['hallucination_rate'])} | {_pct(lo)} - {_pct(hi)} |")
        lines.append("")
    u = summary.get("utility")
    if u is not None:
        lo, hi = u["accuracy_ci95"]
        cols = ["n", "accuracy", "95% CI"] + (["loss", "perplexity"] if "loss" in u else [])
        vals = [str(u["n"]), _pct(u["accuracy"]), f"{_pct(lo)} - {_pct(hi)}"]
        if "loss" in u:
            vals += [f"{u['loss']:.4f}", f"{u['perplexity']:.3f}"]
        lines += ["## Utility", "", f"Benign tasks, answer matched by '{match}' (case and whitespace "
                  "normalised); loss is the mean cross-entropy of the expected answers.", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols), "| " + " | ".join(vals) + " |", ""]
    g = summary.get("general_text")
    if g is not None:
        lines += ["## General text", "", "Mean cross-entropy over every token of held-out plain text (eval.general_text).",
                  "", "| texts | tokens | loss | perplexity |", "|---|---|---|---|",
                  f"| {g['n_texts']} | {g['n_tokens']} | {g['loss']:.4f} | {g['perplexity']:.3f} |", ""]
    return "\n".join(lines)
