"""Wilson intervals, rate summaries, utility matchers and the token-weighted benign loss."""

import math

import pytest
import torch

from dist_secvec.metrics import (accuracy_summary, choice_letter, is_correct, mean_loss, rate_summary,
                                 wilson_interval)

# Hand-checked from the closed formula (z = 1.96); 0/10 and 5/10 are the textbook values.
WILSON = [
    ((0, 10), (0.0, 0.2775)),
    ((5, 10), (0.2366, 0.7634)),
    ((81, 100), (0.7222, 0.8749)),
    ((10, 10), (0.7225, 1.0)),
    ((3, 4), (0.3006, 0.9544)),
    ((1, 3), (0.0615, 0.7923)),
]


@pytest.mark.parametrize("kn,want", WILSON)
def test_wilson_interval_known_values(kn, want):
    lo, hi = wilson_interval(*kn)
    assert lo == pytest.approx(want[0], abs=1e-4) and hi == pytest.approx(want[1], abs=1e-4)


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(81, 100, z=2.5758)  # 99%: wider than the 95% interval
    assert lo == pytest.approx(0.6910, abs=1e-4) and hi == pytest.approx(0.8904, abs=1e-4)
    lo0, hi0 = wilson_interval(0, 10)
    assert lo0 == 0.0 and lo0 >= 0 and hi0 <= 1
    for bad in ((-1, 10), (11, 10), (1, -1)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_rate_summary_overall_and_per_category():
    verdicts = [True, False, True, True, False]
    cats = ["a", "a", ["a", "b"], None, "b"]
    s = rate_summary(verdicts, cats)
    assert s["n"] == 5 and s["harmful_rate"] == pytest.approx(0.6)
    assert s["harmful_rate_ci95"] == pytest.approx(list(wilson_interval(3, 5)))
    per = s["per_category"]
    assert set(per) == {"a", "b", "(none)"}
    assert per["a"]["n"] == 3 and per["a"]["harmful_rate"] == pytest.approx(2 / 3)  # the multi-label row counts
    assert per["b"]["n"] == 2 and per["b"]["harmful_rate"] == pytest.approx(0.5)
    assert per["(none)"] == {"n": 1, "harmful_rate": 1.0, "harmful_rate_ci95": list(wilson_interval(1, 1))}
    assert "per_category" not in rate_summary(verdicts, [None] * 5)
    assert "per_category" not in rate_summary(verdicts)
    assert rate_summary([]) == {"n": 0, "harmful_rate": 0.0, "harmful_rate_ci95": [0.0, 1.0]}


def test_accuracy_summary():
    s = accuracy_summary([True, True, False, True])
    assert s == {"n": 4, "accuracy": 0.75, "accuracy_ci95": list(wilson_interval(3, 4))}


@pytest.mark.parametrize("response,expected,match,want", [
    ("  Paris \n", "paris", "exact", True),
    ("Paris   is nice", "paris is  NICE", "exact", True),
    ("Paris is the capital", "Paris", "exact", False),
    ("Paris is the capital", "paris", "contains", True),
    ("The capital is\nPARIS.", "capital is paris", "contains", True),
    ("Lyon", "Paris", "contains", False),
    ("anything", "   ", "contains", False),  # an empty expected answer matches nothing
    ("B", "(B) Paris", "choice", True),
    ("(C) because ...", "C", "choice", True),
    ("The answer is D.", "D", "choice", True),
    ("Answer: A", "a", "exact", False),
    ("Answer: A", "A.", "choice", True),
    ("B. Lyon", "A", "choice", False),
    ("I do not know", "A", "choice", False),
    ("Paris", "Paris", "choice", True),  # expected without a letter: exact match
])
def test_utility_matchers(response, expected, match, want):
    assert is_correct(response, expected, match) is want


def test_choice_letter_ignores_words_that_start_with_a_letter():
    assert choice_letter("All of them") is None
    assert choice_letter("the answer is Definitely wrong") is None
    assert choice_letter("answer is (E)") == "E"


def test_unknown_match_rule():
    with pytest.raises(ValueError, match="exact, contains, choice"):
        is_correct("a", "a", "fuzzy")


# ---------------------------------------------------------------------------------------------
# loss


def tiny_lm(seed=0, vocab=40):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def test_mean_loss_is_token_weighted_and_batch_size_free():
    from dist_secvec.data import collate

    model = tiny_lm()
    examples = [
        {"input_ids": [5, 6, 7, 8, 9, 10, 11], "labels": [-100, -100, -100, 8, 9, 10, 11]},  # 4 answer tokens
        {"input_ids": [12, 13, 14], "labels": [-100, -100, 14]},                          # 1 answer token
    ]
    per, counts = [], []
    for ex in examples:  # HF's own loss on one unpadded example is the mean over its tokens
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]]))
        per.append(out.loss.item())
        counts.append(sum(label != -100 for label in ex["labels"][1:]))
    want = sum(l * c for l, c in zip(per, counts)) / sum(counts)
    together = mean_loss(model, [collate(examples, 0)])
    apart = mean_loss(model, [collate([e], 0) for e in examples])
    assert together["n_tokens"] == apart["n_tokens"] == 5
    assert together["loss"] == pytest.approx(want, rel=1e-5)
    assert apart["loss"] == pytest.approx(want, rel=1e-5)
    assert together["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    # a plain mean of the two per-example means would differ: weighting is by token
    assert abs(want - sum(per) / 2) > 1e-4


def test_mean_loss_restores_training_mode_and_needs_labels():
    from dist_secvec.data import collate

    model = tiny_lm().train()
    mean_loss(model, [collate([{"input_ids": [3, 4], "labels": [-100, 4]}], 0)])
    assert model.training
    with pytest.raises(ValueError, match="no label"):
        mean_loss(model, [collate([{"input_ids": [3, 4], "labels": [-100, -100]}], 0)])
