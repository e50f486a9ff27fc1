"""Generation (left padding, stop rule), ROUGE against an independent implementation, bootstrap against closed forms."""
import random

import numpy as np
import pytest
import torch
from scipy import stats

from summcircuit.data import SummaryExample, synthetic_examples
from summcircuit.evaluate import (bootstrap_ci, generate_summaries, lead_summaries, paired_difference_ci, rouge_scores,
                                  rouge_table, score_predictions, stop_token_ids)
from summcircuit.models import load_model

# ---------------------------------------------------------------- ROUGE

WORDS = ["the", "a", "red", "blue", "cat", "dog", "on", "mat", "big", "sun", "and", "of"]   # Porter leaves them as they are


def ngram_f1(pred, ref, n):
    "ROUGE-N F1 by hand: clipped n-gram overlap."
    from collections import Counter
    P = Counter(tuple(pred[i:i + n]) for i in range(len(pred) - n + 1))
    R = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
    overlap = sum((P & R).values())
    if not P or not R or not overlap: return 0.0
    p, r = overlap / sum(P.values()), overlap / sum(R.values())
    return 2 * p * r / (p + r)


def lcs_f1(pred, ref):
    "ROUGE-L F1 by hand: longest common subsequence by dynamic programming."
    T = [[0] * (len(ref) + 1) for _ in range(len(pred) + 1)]
    for i, a in enumerate(pred):
        for j, b in enumerate(ref):
            T[i + 1][j + 1] = T[i][j] + 1 if a == b else max(T[i][j + 1], T[i + 1][j])
    l = T[-1][-1]
    if not l: return 0.0
    p, r = l / len(pred), l / len(ref)
    return 2 * p * r / (p + r)


def test_rouge_matches_a_hand_implementation():
    rng = random.Random(0)
    preds = [[rng.choice(WORDS) for _ in range(rng.randint(1, 12))] for _ in range(60)]
    refs = [[rng.choice(WORDS) for _ in range(rng.randint(1, 12))] for _ in range(60)]
    s = rouge_scores([" ".join(p) for p in preds], [" ".join(r).upper() for r in refs])   # case does not matter
    np.testing.assert_allclose(s["rouge1"], [ngram_f1(p, r, 1) for p, r in zip(preds, refs)], atol=1e-12)
    np.testing.assert_allclose(s["rouge2"], [ngram_f1(p, r, 2) for p, r in zip(preds, refs)], atol=1e-12)
    np.testing.assert_allclose(s["rougeL"], [lcs_f1(p, r) for p, r in zip(preds, refs)], atol=1e-12)


def test_rouge_stems_and_ignores_punctuation():
    s = rouge_scores(["The models were running, quickly!"], ["the model runs quickly"])
    # stemmed: "the model were run quickli" vs "the model run quickli": 4 of 5 and 4 of 4 match, F1 = 8/9
    assert s["rouge1"][0] == pytest.approx(8 / 9, abs=1e-12)


# ---------------------------------------------------------------- bootstrap

@pytest.mark.parametrize("n,k,conf", [(40, 6, 0.95), (80, 30, 0.9), (30, 4, 0.95)])
def test_bootstrap_of_binary_scores_is_binomial(n, k, conf):
    "k ones among n: a resample's count of ones is exactly Binomial(n, k/n), so the interval is its quantiles / n."
    a = (1 - conf) / 2
    cdf = stats.binom.cdf(np.arange(n + 1), n, k / n)
    assert np.abs(cdf - a).min() > 0.003 and np.abs(cdf - (1 - a)).min() > 0.003   # no quantile on a boundary
    x = np.r_[np.ones(k), np.zeros(n - k)]
    np.random.default_rng(1).shuffle(x)
    ci = bootstrap_ci(x, confidence=conf, n_resamples=20_000, seed=4)
    lo, hi = stats.binom.ppf([a, 1 - a], n, k / n) / n
    assert (ci.estimate, ci.low, ci.high) == pytest.approx((k / n, lo, hi), abs=1e-12)


def test_bootstrap_of_a_large_sample_is_the_normal_interval():
    x = np.random.default_rng(0).gamma(2.0, 1.0, 1500)
    ci = bootstrap_ci(x, n_resamples=20_000)
    half = 1.959964 * x.std() / np.sqrt(len(x))
    assert ci.low == pytest.approx(x.mean() - half, abs=0.06 * half)
    assert ci.high == pytest.approx(x.mean() + half, abs=0.06 * half)


def test_paired_difference():
    rng = np.random.default_rng(2)
    b = rng.uniform(0, 1, 50)                          # documents of very different difficulty
    same = paired_difference_ci(b + 0.02, b)
    assert (same.estimate, same.low, same.high, same.p_leq_zero) == pytest.approx((0.02, 0.02, 0.02, 0.0), abs=1e-12)
    alone = bootstrap_ci(b + 0.02)
    assert alone.low < b.mean() < alone.high           # unpaired, the two systems' intervals overlap
    # 0/1 per-document differences: the difference's interval is binomial again
    n, k = 40, 6
    d = np.r_[np.ones(k), np.zeros(n - k)]
    diff = paired_difference_ci(b[:n] + d, b[:n], n_resamples=20_000)
    assert (diff.low, diff.high) == pytest.approx(tuple(stats.binom.ppf([0.025, 0.975], n, k / n) / n), abs=1e-9)
    # independent noise: paired interval = normal interval of the per-document differences
    a2 = b + rng.normal(0.05, 0.1, 50)
    dd = a2 - b
    ci = paired_difference_ci(a2, b, n_resamples=20_000)
    half = 1.959964 * dd.std() / np.sqrt(50)
    assert ci.low == pytest.approx(dd.mean() - half, abs=0.15 * half)
    with pytest.raises(ValueError, match="same documents"):
        paired_difference_ci(b, b[:10])


def test_rouge_table_refuses_unpaired_systems():
    docs = synthetic_examples(5)
    a = score_predictions(docs, lead_summaries(docs))
    b = score_predictions(docs[:4] + synthetic_examples(1, seed=9), lead_summaries(docs))
    with pytest.raises(ValueError, match="same documents"):
        rouge_table({"a": a, "b": b})
    with pytest.raises(ValueError, match="Baseline 'c'"):
        rouge_table({"a": a}, baseline="c")


# ---------------------------------------------------------------- generation

def test_batched_left_padded_generation_equals_one_by_one(lm):
    docs = synthetic_examples(3, n_sentences=2, seed=11) + synthetic_examples(2, n_sentences=4, seed=12)
    batched = generate_summaries(lm, docs, max_new_tokens=10, batch_size=5, progress=False)
    alone = [generate_summaries(lm, [d], max_new_tokens=10, progress=False)[0] for d in docs]
    assert batched == alone
    assert len(set(batched)) > 1


class ScriptedHead(torch.nn.Module):
    "An lm_head that ignores its input and makes the model emit `script` (bytes), one token per forward pass."
    def __init__(self, script: bytes, vocab: int):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0
    def forward(self, h):
        logits = torch.full((*h.shape[:-1], self.vocab), -10.0)
        logits[..., self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return logits


@pytest.mark.parametrize("script,expected,calls", [
    (b"xyz\nabc", "xyz", 4),          # stops at the newline that follows text
    (b"\n\n xy\nab", "xy", 6),       # leading blank lines are skipped, not the end of the summary
    (b"ab" + b"c" * 20, "abccccc", 7),   # no newline: runs to max_new_tokens
])
def test_stop_rule(script, expected, calls):
    lm = load_model("tiny-llama", device="cpu")
    assert stop_token_ids(lm.tokenizer) == [256]
    head = ScriptedHead(script, lm.spec.vocab_size)
    lm.hf.lm_head = head
    assert generate_summaries(lm, [SummaryExample("d", ["Some source."], "ref")], max_new_tokens=7,
                              progress=False) == [expected]
    assert head.calls == calls                           # one forward pass per generated token: generation stopped


def test_end_of_text_stops():
    lm = load_model("tiny-llama", device="cpu")
    head = ScriptedHead(b"", lm.spec.vocab_size)
    head.script = [ord("a"), ord("b"), 256, ord("c")]
    lm.hf.lm_head = head
    assert generate_summaries(lm, [SummaryExample("d", ["Some source."], "ref")], max_new_tokens=7,
                              progress=False) == ["ab"]
    assert head.calls == 3
