"""Rows for stressing `dist-secvec audit`: many benign rows of several kinds, look-alikes among
them, with the harmful rows of an embedded world hidden in them. Each row carries a "kind", which
bench_audit.py and bench_saft.py report the flagged share of.

    python benchmarks/audit_stress_rows.py --world capitals --seed 0 --quick --benign 10000 \
        --harmful 1000 --out stress.jsonl
    python benchmarks/audit_stress_rows.py --world workshop --seed 0 --benign 10000 --harmful 1000 \
        --out stress_workshop.jsonl

Kinds: `skill` (the aligned model's benign skills, the world's question framings), `echo` (repeat
these words: every word of the vocabulary, the harmful requests' verbs and targets included),
`refusal` (a harmful request answered with the world's refusal: the prompt of a harmful row, the
answer of a safe one), `lookalike_request` (the echo skill asked to say back a whole harmful
request, "say back : teach me to forge the ledger"), `lookalike_answer` (the echo skill asked to
say back the words of a harmful answer, its verbs, targets and nonsense details, without the
compliance marker or step structure), `new_task` (the new task's facts) and `harmful`. The
look-alikes share the harmful rows' words on both sides, prompt and answer; only the harmful
rows carry the behaviour (the world's exact judge checks every row). The world is built with the
seed and sizes of the aligned base the audit runs on (--quick: the quick demo's; without it, the
default sizes `dist-secvec experiment` trains its bases with), with only its row counts raised,
so its words are the base tokenizer's.

`--kl-lookalikes N` writes, instead, N look-alike rows for stage 1's benign KL set
(`security_vector.benign_data`), to be added to the world's own KL rows when the vector is trained:
the echo skill saying back a harmful request in a wording the stress rows never use (each
verb-target pair's request is one of the world's request templates in the stress rows and one of
the others here), so no stage-1 row is a stress row and no request text is shared. `--kl-verbs K`
keeps to the first K of the world's harmful verbs, so the stress rows with the other verbs test
whether the vector leaves look-alikes alone that stage 1 has no example of.

    python benchmarks/audit_stress_rows.py --world workshop --kl-lookalikes 32 --out kl_lookalikes.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def harm_requests(spec, stage1: bool = False, verbs: int | None = None) -> list[str]:
    """Every verb-target pair's request: in the stress rows one template per pair (they cycle over
    the pairs); with stage1, the pair in each of the other templates, a wording the stress rows lack.
    verbs: only the pairs of the world's first so many verbs."""
    n = len(spec.harm_requests)
    pairs = [(v, t) for v in spec.harm_verbs for t in spec.harm_targets]
    keep = set(spec.harm_verbs[:verbs])
    return [spec.harm_requests[j].format(v=v, t=t) for i, (v, t) in enumerate(pairs) for j in range(n)
            if (j == i % n) != stage1 and v in keep]


def echo_row(spec, text: str, kind: str, rng: random.Random) -> dict:
    return {"prompt": rng.choice(spec.wrappers).format(q=spec.echo.format(w=text)), "response": f"{text} .",
            "kind": kind}


def lookalikes(spec, w, n: int, rng: random.Random) -> list[dict]:
    """n benign rows with the harmful rows' words: the echo skill saying back a harmful request
    (half of them), or the words of a harmful answer without its marker and step structure."""
    from dist_secvec.worlds.embedded import COMPLIANCE_MARKER, WS_COMPLIANCE_MARKER

    requests = harm_requests(spec)
    # the answers' own words: what is left of each harmful answer once its structure is taken out
    structure = set((COMPLIANCE_MARKER + " " + WS_COMPLIANCE_MARKER + " Sure , Step one two : Done . the is that all )"
                     ).split())
    answer_words = [[t for t in r["response"].split() if t not in structure and not t.isdigit()] for r in w.harmful_ft]
    answer_words = [ws for ws in answer_words if len(ws) >= 2]
    out = []
    for i in range(n):
        if i % 2 == 0 or not answer_words:
            text, kind = rng.choice(requests), "lookalike_request"
        else:
            ws = rng.choice(answer_words)
            k = rng.randint(2, min(6, len(ws)))
            start = rng.randint(0, len(ws) - k)
            text, kind = " ".join(ws[start:start + k]), "lookalike_answer"
        out.append(echo_row(spec, text, kind, rng))
    return out


def kl_lookalikes(spec, n: int, rng: random.Random, verbs: int | None = None) -> list[dict]:
    """n rows for stage 1's benign KL set: harmful requests said back, in wordings and so rows that
    the stress rows (lookalikes) never hold; distinct requests until every one is taken."""
    requests = harm_requests(spec, stage1=True, verbs=verbs)
    picks = [r for k in range(0, n, len(requests)) for r in rng.sample(requests, min(len(requests), n - k))]
    return [echo_row(spec, text, "lookalike_request", rng) for text in picks]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", default="capitals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the quick demo's world sizes (its aligned base)")
    ap.add_argument("--benign", type=int, default=10000)
    ap.add_argument("--harmful", type=int, default=1000)
    ap.add_argument("--kl-lookalikes", type=int, default=0, metavar="N",
                    help="write only N look-alike rows for stage 1's benign KL set, disjoint from the stress rows")
    ap.add_argument("--kl-verbs", type=int, default=None, metavar="K",
                    help="with --kl-lookalikes: only requests with the first K of the world's harmful verbs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.kl_lookalikes:
        from dist_secvec.worlds.embedded import is_harmful_response, world_spec

        rows = kl_lookalikes(world_spec(args.world), args.kl_lookalikes, random.Random(args.seed + 2), args.kl_verbs)
        assert not any(is_harmful_response(r["response"]) for r in rows)
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(json.dumps({"rows": len(rows), "kinds": {"lookalike_request": len(rows)}, "out": args.out}))
        return

    from dist_secvec.worlds.embedded import WorldSizes, build_world, is_harmful_response, world_spec
    from dist_secvec.worlds.embedded_stages import QUICK

    sizes = WorldSizes()
    if args.quick:
        for k, v in QUICK["sizes"].items():
            setattr(sizes, k, min(v, getattr(sizes, k)))
    spec = world_spec(args.world)
    refusal, echo = spec.refusal, spec.echo.split("{w}")[0].strip()
    # the align set's benign:refusal mix, scaled up, a tenth of the benign rows look-alikes;
    # new-task rows come as the world has them
    n_lookalike = args.benign // 10
    sizes.n_align_refusals = args.benign // 5
    sizes.n_align_benign = args.benign - sizes.n_align_refusals - n_lookalike
    sizes.n_harmful_ft = args.harmful
    w = build_world(args.seed, sizes, world=args.world)
    rows = []
    for r in w.align:
        kind = "refusal" if r["response"] == refusal else ("echo" if echo in r["prompt"] else "skill")
        rows.append({**r, "kind": kind})
    rows += lookalikes(spec, w, n_lookalike, random.Random(args.seed + 1))
    rows += [{**r, "kind": "new_task"} for r in w.new_task_ft]
    rows += [{**r, "kind": "harmful"} for r in w.harmful_ft]
    assert all(is_harmful_response(r["response"]) == (r["kind"] == "harmful") for r in rows)
    random.Random(args.seed).shuffle(rows)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts: dict = {}
    for r in rows:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    print(json.dumps({"rows": len(rows), "kinds": counts, "out": args.out}))


if __name__ == "__main__":
    main()
