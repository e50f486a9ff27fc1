"""Metrics (summcircuit.metrics) against hand-written loops over positions, on padded batches of real pairs, and
through the model (run_metric, pair_metrics, pair_metric_table)."""
import pytest
import torch
import torch.nn.functional as F

from summcircuit.corrupt import build_pairs, pair_batch, pair_metric_table, pair_metrics
from summcircuit.data import synthetic_examples
from summcircuit.metrics import (METRICS, NEEDS_CLEAN, READS_COPY, copy_logit_diff, copy_logprob, get_metric, run_metric,
                                 kl_to_clean, needs_clean, reads_copy, summary_logprob)
from summcircuit.models import byte_tokenizer, load_model


def _pairs(variant="counterfactual", n=5, seed=11):
    tok = byte_tokenizer()
    return build_pairs(synthetic_examples(n, 4, seed=seed), tok, variant, progress=False), tok


def _batch_and_logits(seed=0):
    pairs, tok = _pairs()
    clean, corr = pair_batch(pairs, tok.pad_token_id)
    assert len({len(p.clean) for p in pairs}) > 1                      # padded: the prompts differ in length
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*clean.input_ids.shape, len(tok), generator=g) * 3
    return pairs, clean, corr, logits


def _loop(pairs, logits, positions, value):
    "Mean over `positions(pair)` of `value(logp_or_logits_row, pair, t)`, for each pair, by a plain loop."
    return torch.stack([torch.stack([value(b, p, t) for t in positions(p)]).mean() for b, p in enumerate(pairs)])


def test_summary_logprob_by_hand():
    pairs, clean, _, logits = _batch_and_logits()
    ref = _loop(pairs, logits, lambda p: range(p.clean.summary_start, len(p.clean)),
                lambda b, p, t: torch.log_softmax(logits[b, t - 1], -1)[p.clean.input_ids[t]])
    torch.testing.assert_close(summary_logprob(logits, clean), ref, atol=1e-5, rtol=1e-5)


def test_copy_logprob_by_hand():
    pairs, clean, corr, logits = _batch_and_logits(1)
    for batch in (clean, corr):                       # same copy positions and summary tokens on both sides
        ref = _loop(pairs, logits, lambda p: p.clean.copy_positions,
                    lambda b, p, t: torch.log_softmax(logits[b, t - 1], -1)[p.clean.input_ids[t]])
        torch.testing.assert_close(copy_logprob(logits, batch), ref, atol=1e-5, rtol=1e-5)


def test_copy_logit_diff_by_hand():
    pairs, clean, _, logits = _batch_and_logits(2)
    counter = {(b, t): c for b, p in enumerate(pairs) for t, c in zip(p.clean.copy_positions, p.clean.counter_ids)}
    ref = _loop(pairs, logits, lambda p: p.clean.copy_positions,
                lambda b, p, t: logits[b, t - 1, p.clean.input_ids[t]] - logits[b, t - 1, counter[b, t]])
    torch.testing.assert_close(copy_logit_diff(logits, clean), ref, atol=1e-5, rtol=1e-5)


def test_kl_against_kl_div():
    pairs, clean, _, logits = _batch_and_logits(3)
    run = logits + torch.randn_like(logits)
    ref = _loop(pairs, logits, lambda p: range(p.clean.summary_start, len(p.clean)),
                lambda b, p, t: F.kl_div(torch.log_softmax(run[b, t - 1], -1), torch.log_softmax(logits[b, t - 1], -1),
                                         log_target=True, reduction="sum"))
    torch.testing.assert_close(kl_to_clean(run, clean, logits), -ref, atol=1e-5, rtol=1e-5)
    assert (kl_to_clean(run, clean, logits) < 0).all()
    torch.testing.assert_close(kl_to_clean(logits, clean, logits), torch.zeros(len(pairs)), atol=1e-6, rtol=0)
    # padding and positions before the summary do not count: changing them leaves the metric unchanged
    run2 = run.clone()
    run2[~clean.target_mask.roll(-1, dims=1)] = 0.0
    torch.testing.assert_close(kl_to_clean(run2, clean, logits), kl_to_clean(run, clean, logits))


def test_padded_batch_equals_one_by_one():
    pairs, clean, _, logits = _batch_and_logits(4)
    tok = byte_tokenizer()
    clean_logits = logits + 0.5 * torch.randn_like(logits)
    for name, f in METRICS.items():
        together = f(logits, clean, clean_logits)
        for b, p in enumerate(pairs):
            single, _ = pair_batch([p], tok.pad_token_id)
            T = single.input_ids.shape[1]
            alone = f(logits[b:b + 1, :T], single, clean_logits[b:b + 1, :T])
            torch.testing.assert_close(alone[0], together[b], atol=1e-5, rtol=1e-5, msg=name)


def test_contract_dtype_and_gradients():
    pairs, clean, _, logits = _batch_and_logits(5)
    other = logits + torch.randn_like(logits)
    for name, f in METRICS.items():
        x = logits.to(torch.bfloat16).float().requires_grad_()
        out = f(x.to(torch.bfloat16), clean, other.to(torch.bfloat16))
        assert out.shape == (len(pairs),) and out.dtype == torch.float32, name
        out.sum().backward()
        assert x.grad.abs().sum() > 0, name
        assert torch.isfinite(out).all(), name


def test_copy_metrics_refuse_examples_without_copy_positions():
    tok = byte_tokenizer()
    pairs = build_pairs(synthetic_examples(24, 4, seed=5), tok, "swap", progress=False)
    missing = [p.clean.example_id for p in pairs if not p.clean.copy_positions]
    assert missing, "this seed should have a document without copy positions"
    clean, _ = pair_batch(pairs, tok.pad_token_id)
    logits = torch.randn(*clean.input_ids.shape, len(tok))
    for name in READS_COPY:
        with pytest.raises(ValueError) as e:
            get_metric(name)(logits, clean)
        msg = str(e.value)
        assert name in msg and repr(missing[0]) in msg and "counterfactual" in msg and "summary_logprob" in msg
    for name in set(METRICS) - READS_COPY:                    # the others work on the same batch
        assert torch.isfinite(get_metric(name)(logits, clean, logits)).all()


def test_names_and_errors():
    assert list(METRICS) == ["summary_logprob", "copy_logprob", "copy_logit_diff", "kl"]
    assert NEEDS_CLEAN == {"kl"} and READS_COPY == {"copy_logprob", "copy_logit_diff"}
    assert get_metric("kl") is kl_to_clean and get_metric(copy_logprob) is copy_logprob
    assert needs_clean("kl") and needs_clean(kl_to_clean) and not needs_clean("summary_logprob")
    assert reads_copy("copy_logit_diff") and not reads_copy(summary_logprob)
    with pytest.raises(ValueError, match="Unknown metric 'rouge'.*'summary_logprob', 'copy_logprob', 'copy_logit_diff', 'kl'"):
        get_metric("rouge")
    pairs, clean, _, logits = _batch_and_logits()
    with pytest.raises(ValueError, match="pass clean_logits"):
        kl_to_clean(logits, clean)
    with pytest.raises(ValueError, match="same batch and vocabulary"):
        kl_to_clean(logits, clean, logits[:1])
    with pytest.raises(ValueError, match="logits_to_keep=logits_window"):     # fewer positions than the summary
        kl_to_clean(logits, clean, logits[:, -2:])


def test_metrics_through_the_model():
    lm = load_model("tiny-llama", device="cpu")
    pairs, _ = _pairs("counterfactual", n=6, seed=13)
    clean, corr = pair_batch(pairs, lm.tokenizer.pad_token_id)
    with torch.no_grad():
        lc = lm.hf(clean.input_ids, attention_mask=clean.attention_mask).logits
        lk = lm.hf(corr.input_ids, attention_mask=corr.attention_mask).logits
    table = pair_metric_table(lm, pairs, list(METRICS), batch_size=4, progress=False)
    for name, f in METRICS.items():
        torch.testing.assert_close(table[name][0], f(lc, clean, lc), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(table[name][1], f(lk, corr, lc), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run_metric(lm, corr, name, lc), f(lk, corr, lc), atol=1e-5, rtol=1e-5)
    mc, mr = pair_metrics(lm, pairs, batch_size=2, progress=False, metric="kl")
    torch.testing.assert_close(mc, torch.zeros(len(pairs)), atol=1e-5, rtol=0)
    assert (mr < 0).all()
    # on swap pairs, a copy metric is NaN exactly where a document has no copy position (the table); pair_metrics refuses
    swap = build_pairs(synthetic_examples(24, 4, seed=5), lm.tokenizer, "swap", progress=False)
    t = pair_metric_table(lm, swap, ["copy_logprob", "summary_logprob"], batch_size=8, progress=False)
    no_copy = torch.tensor([not p.clean.copy_positions for p in swap])
    assert torch.equal(t["copy_logprob"][0].isnan(), no_copy) and no_copy.any()
    assert not t["summary_logprob"][0].isnan().any()
    with pytest.raises(ValueError, match="have none"):
        pair_metrics(lm, swap, metric="copy_logprob", progress=False)
