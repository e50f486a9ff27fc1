"""Clean/corrupted pairs: positions align, only salient-sentence tokens differ, copy positions and the
counterfactual corruption follow their definitions, and the task metric falls on corrupted inputs for a model
that has learned to copy (a tiny Llama trained to copy, here in the test)."""
import functools
import inspect
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from summcircuit.corrupt import (CORRUPTIONS, CorruptedPair, build_pairs, check_pair, copy_positions,
                                 counterfactual_map, donor_tokens, filler_token_id, load_pairs, make_pair, pair_batch,
                                 pair_batches, pair_metrics, rouge2_recall, save_pairs, select_salient)
from summcircuit.data import (ROLES, SEPARATOR, Prompt, SummaryExample, build_prompt, collate, load_aclsum,
                              summary_logprob, synthetic_examples)
from summcircuit.models import byte_tokenizer, load_model


@functools.lru_cache(maxsize=None)
def copy_trained(name: str = "tiny-llama", steps: int = 60, seed: int = 0):
    """(base, trained): a tiny model and the same model trained with plain AdamW to copy the salient sentence of
    synthetic documents (loss on summary tokens). Cached: test_diff.py uses the pair as base vs fine-tuned."""
    base = load_model(name, device="cpu")
    trained = load_model(name, device="cpu")          # same seed, same initial weights, its own nnsight wrapper
    torch.manual_seed(seed)
    hf = trained.hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=5e-3, weight_decay=0.0)
    tok = trained.tokenizer
    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # a tiny model gains nothing from threads, and on a shared CPU they spin (10x slower)
    try:
        for step in range(steps):
            b = collate([build_prompt(e, tok) for e in synthetic_examples(8, 3, seed=1000 + step)], tok.pad_token_id)
            loss = -summary_logprob(hf(b.input_ids, attention_mask=b.attention_mask).logits, b).mean()
            opt.zero_grad(); loss.backward(); opt.step()
    finally: torch.set_num_threads(threads)
    hf.eval()
    return base, trained


def _documents(kind: str):
    if kind == "synthetic": return synthetic_examples(10, 4, seed=5)
    return load_aclsum("val", "outcome", n=6)


def _check_pairs_independently(pairs, examples, tok, filler_id):
    "Decode each sentence span; non-salient sentences and the summary must read exactly as the source text."
    by_id = {e.id: e for e in examples}
    for pr in pairs:
        ex, c, k = by_id[pr.clean.example_id], pr.clean.input_ids, pr.corrupted.input_ids
        assert len(c) == len(k) and pr.clean.sentence_spans == pr.corrupted.sentence_spans
        assert c[pr.clean.summary_start:] == k[pr.corrupted.summary_start:]                  # identical summary tokens
        assert tok.decode(k[pr.corrupted.summary_start:-1]) == " " + ex.summary
        for i, (s, e) in enumerate(pr.clean.sentence_spans):
            text = ex.source_sentences[i] if i == 0 else " " + ex.source_sentences[i]
            assert tok.decode(c[s:e]) == text
            if i in pr.salient:
                assert c[s:e] != k[s:e]
                if pr.variant == "mask": assert k[s:e] == [filler_id] * (e - s)
            else:
                assert k[s:e] == c[s:e] and tok.decode(k[s:e]) == text
        differ = [t for t, (a, b) in enumerate(zip(c, k)) if a != b]
        assert set(differ) <= set(pr.corrupted_positions)


@pytest.mark.parametrize("kind", ["synthetic", "aclsum"])
@pytest.mark.parametrize("variant", ["mask", "swap"])
def test_pairs_align_and_only_salient_sentences_differ(kind, variant):
    tok = byte_tokenizer()
    examples = _documents(kind)
    pairs = build_pairs(examples, tok, variant, max_source_tokens=4000, progress=False)   # bytes: keep most sentences
    assert len(pairs) == len(examples)
    _check_pairs_independently(pairs, examples, tok, ord("_"))
    clean, corr = pair_batch(pairs, tok.pad_token_id)
    assert clean.input_ids.shape == corr.input_ids.shape
    assert torch.equal(clean.attention_mask, corr.attention_mask) and torch.equal(clean.target_mask, corr.target_mask)
    assert torch.equal(clean.input_ids[~clean.attention_mask.bool()], corr.input_ids[~corr.attention_mask.bool()])
    # batching in twos keeps every pair aligned too
    for c, k in pair_batches(pairs, tok.pad_token_id, 2):
        assert c.input_ids.shape == k.input_ids.shape and torch.equal(c.attention_mask, k.attention_mask)


def test_swap_uses_another_documents_sentences():
    tok = byte_tokenizer()
    examples = synthetic_examples(5, 4, seed=9)
    pairs = build_pairs(examples, tok, "swap", progress=False)
    for i, pr in enumerate(pairs):
        donor = examples[(i + 1) % len(examples)]
        donor_text = " " + " ".join(donor.source_sentences)
        for j in pr.salient:
            s, e = pr.clean.sentence_spans[j]
            piece = tok.decode(pr.corrupted.input_ids[s:e]).rstrip("_")
            assert piece and piece in donor_text                    # a contiguous piece of the donor's text


def test_donor_tokens_exact_length():
    tok = byte_tokenizer()
    donor = SummaryExample("d", ["One two.", "Three four five."], "x")
    for n in (1, 5, 9, 26, 40):
        out = donor_tokens(donor, tok, n, 0, ord("_"))
        assert len(out) == n
        full = list(" One two. Three four five.".encode())
        assert out == (full + [ord("_")] * n)[:n]


def test_salience_by_highlights_and_rouge():
    examples = load_aclsum("val", "outcome", n=10)
    tok = byte_tokenizer()
    used_rouge = 0
    for ex in examples:
        p = build_prompt(ex, tok, max_source_tokens=1500)            # byte tokens: cuts some highlights, keeps others
        kept = [i for i in ex.salient if i < p.n_sentences]
        expected = kept if kept else select_salient(ex, p.n_sentences, "rouge_topk", k=2)
        assert select_salient(ex, p.n_sentences) == expected
        if expected: assert make_pair(ex, tok, "mask", max_source_tokens=1500).salient == expected
        else:
            with pytest.raises(ValueError, match="no salient sentence"): make_pair(ex, tok, "mask", max_source_tokens=1500)
        used_rouge += not kept
        # rouge top-k: the k sentences of largest recall, all with recall > 0, and none better left out
        r = rouge2_recall(ex.source_sentences[:p.n_sentences], ex.summary)
        top = select_salient(ex, p.n_sentences, "rouge_topk", k=3)
        assert len(top) <= 3 and all(r[i] > 0 for i in top)
        if top: assert all(r[j] <= min(r[i] for i in top) for j in range(len(r)) if j not in top)
        else: assert not any(r)
        thr = select_salient(ex, p.n_sentences, "rouge_threshold", threshold=0.05)
        assert thr == [i for i, x in enumerate(r) if x >= 0.05]
    assert 0 < used_rouge < len(examples)                           # both branches of 'auto' were exercised


def test_rouge2_recall_against_hand_count():
    # punctuation and case are ignored by ROUGE's tokenizer; recall = shared bigrams / summary bigrams
    summary = "Our method improves BLEU by two points."
    sents = ["The method improves BLEU scores.", "By two points, it wins!", "Unrelated text here."]
    # summary bigrams: our-method method-improves improves-bleu bleu-by by-two two-points (6)
    assert rouge2_recall(sents, summary) == pytest.approx([2 / 6, 2 / 6, 0.0])


def test_misaligned_or_wrong_corruptions_fail():
    tok = byte_tokenizer()
    ex = synthetic_examples(1, 3, seed=1)[0]
    pr = make_pair(ex, tok, "mask")
    bad = list(pr.corrupted.input_ids)
    bad[pr.clean.summary_start] = ord("_")                        # touch a summary token
    with pytest.raises(AssertionError, match="outside the salient"):
        check_pair(pr.clean, replace(pr.corrupted, input_ids=bad), pr.salient)
    with pytest.raises(AssertionError, match="lengths differ"):
        check_pair(pr.clean, replace(pr.corrupted, input_ids=bad[:-1]), pr.salient)
    with pytest.raises(ValueError, match="needs a donor"):
        make_pair(ex, tok, "swap")
    with pytest.raises(ValueError, match="single token"):
        make_pair(ex, tok, "mask", filler="__")
    with pytest.raises(ValueError, match="Unknown corruption"):
        make_pair(ex, tok, "shuffle")
    nothing = SummaryExample("z", ["Alpha beta.", "Gamma delta."], "Epsilon zeta eta.")
    for variant in CORRUPTIONS:
        with pytest.raises(ValueError, match="no salient sentence"):
            make_pair(nothing, tok, variant, donor=ex)
    assert build_pairs([nothing, ex], tok, progress=False)[0].clean.example_id == ex.id     # left out, not fatal


@pytest.mark.parametrize("variant", CORRUPTIONS)
def test_pairs_roundtrip(tmp_path, variant):
    tok = byte_tokenizer()
    pairs = build_pairs(synthetic_examples(4, seed=2), tok, variant, progress=False)
    back = load_pairs(save_pairs(tmp_path / "pairs.json", pairs))
    assert back == pairs and isinstance(back[0], CorruptedPair)
    assert all(b.clean.copy_positions == p.clean.copy_positions and b.corrupted.counter_ids == p.corrupted.counter_ids
               and b.corrupted.salient == p.salient for b, p in zip(back, pairs))
    assert any(b.clean.copy_positions for b in back)
    # a file written before prompts had copy positions loads with none
    old = json.loads((tmp_path / "pairs.json").read_text())
    for d in old:
        for side in ("clean", "corrupted"): del d[side]["copy_positions"], d[side]["counter_ids"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert all(p.clean.copy_positions is None and p.corrupted.counter_ids is None for p in load_pairs(tmp_path / "old.json"))


def test_swap_is_the_default():
    assert CORRUPTIONS[0] == "swap"
    assert inspect.signature(make_pair).parameters["variant"].default == "swap"
    assert inspect.signature(build_pairs).parameters["variant"].default == "swap"
    tok = byte_tokenizer()
    docs = synthetic_examples(3, seed=4)
    assert {p.variant for p in build_pairs(docs, tok, progress=False)} == {"swap"}
    assert make_pair(docs[0], tok, donor=docs[1]).variant == "swap"
    import nbformat
    nb = nbformat.read(str(Path(__file__).parents[1] / "nbs" / "stages" / "corrupt.ipynb"), as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert 'variant = "swap"' in params.source


def _hand_copy_positions(prompt, ids_of_sentences, salient, separator_ids):
    "Copy positions straight from the definition, on token-id lists."
    in_salient = set().union(*(ids_of_sentences[i] for i in salient))
    elsewhere = set().union(set(separator_ids), *(ids_of_sentences[i] for i in range(len(ids_of_sentences)) if i not in salient))
    return [t for t in range(prompt.summary_start, len(prompt) - 1)
            if prompt.input_ids[t] in in_salient and prompt.input_ids[t] not in elsewhere]


def test_copy_positions_by_hand_on_token_ids():
    # sentences [1 2 3 9] [4 2 5], separator [9 8], summary [1 4 7 3 2 9 1 | EOS 0]; salient [0]: 1 and 3 only
    ids = [1, 2, 3, 9, 4, 2, 5, 9, 8, 1, 4, 7, 3, 2, 9, 1, 0]
    p = Prompt("h", ids, [(0, 4), (4, 7)], 9, [0])
    assert copy_positions(p, [0]) == [9, 12, 15]                   # 9 is in the separator; the final 0 never counts
    assert copy_positions(p, [1]) == [10]
    assert copy_positions(p, [0, 1]) == [9, 10, 12, 13, 15]
    assert copy_positions(p, []) == []
    assert copy_positions(Prompt("e", ids[:9] + [1, 3], [(0, 4), (4, 7)], 9), [0]) == [9]   # last token = "EOS"


def test_copy_positions_on_synthetic_documents():
    "Synthetic summaries copy their salient sentence: the copied bytes are those no other sentence (or the separator) has."
    tok = byte_tokenizer()
    n_with = 0
    for ex in synthetic_examples(12, 4, seed=21):
        p = build_prompt(ex, tok)
        (k,) = select_salient(ex, p.n_sentences)
        assert ex.summary == ex.source_sentences[k]
        others = set("".join(" " + s for i, s in enumerate(ex.source_sentences) if i != k)) | set(SEPARATOR)
        only = set(ex.source_sentences[k]) - others
        # the summary is " " + summary + EOS: character j sits at summary_start + 1 + j
        expected = [p.summary_start + 1 + j for j, ch in enumerate(ex.summary) if ch in only]
        assert copy_positions(p, [k]) == expected
        sents = [set(p.input_ids[slice(*sp)]) for sp in p.sentence_spans]
        assert expected == _hand_copy_positions(p, sents, [k], tok(SEPARATOR, add_special_tokens=False)["input_ids"])
        n_with += bool(expected)
    assert n_with >= 8


def test_every_pair_carries_copy_positions_and_roles():
    tok = byte_tokenizer()
    docs = synthetic_examples(8, 4, seed=3)
    for variant in CORRUPTIONS:
        for pr in build_pairs(docs, tok, variant, progress=False):
            for prompt in (pr.clean, pr.corrupted):
                assert prompt.salient == pr.salient
                assert prompt.copy_positions == copy_positions(pr.clean, pr.salient)
                salient_positions = [t for t, r in enumerate(prompt.roles) if r == ROLES.index("salient")]
                assert salient_positions == pr.corrupted_positions         # roles follow the corruption
            assert pr.clean.counter_ids == pr.corrupted.counter_ids
            assert len(pr.clean.counter_ids) == len(pr.clean.copy_positions)
            cb, kb = pair_batch([pr], tok.pad_token_id)
            assert torch.equal(cb.roles, kb.roles) and torch.equal(cb.copy_mask, kb.copy_mask)
            assert cb.copy_mask[0].nonzero().flatten().tolist() == pr.clean.copy_positions
            assert cb.counter_ids[0, pr.clean.copy_positions].tolist() == pr.clean.counter_ids


def _check_counterfactual(pr, tok):
    c, k = pr.clean.input_ids, pr.corrupted.input_ids
    check_pair(pr.clean, pr.corrupted, pr.salient)
    copied = {c[t] for t in pr.clean.copy_positions}
    assert copied
    rep = dict(zip((c[t] for t in pr.clean.copy_positions), pr.clean.counter_ids))
    assert len(rep) == len(copied) and all(a != b for a, b in rep.items())
    inside = set(pr.corrupted_positions)
    for t, (a, b) in enumerate(zip(c, k)):
        if t in inside and a in copied: assert b == rep[a]                # every occurrence, one map
        else: assert b == a                                               # nothing else changes
    assert len(c) == len(k) and c[pr.clean.summary_start:] == k[pr.clean.summary_start:]
    # the replacements come from the document's other sentences, never from a salient sentence or the separator
    salient_ids = {c[t] for t in inside}
    other_ids = {c[t] for i, sp in enumerate(pr.clean.sentence_spans) if i not in pr.salient for t in range(*sp)}
    assert set(rep.values()) <= other_ids - salient_ids


def test_counterfactual_pairs_replace_exactly_the_copied_tokens(capsys):
    tok = byte_tokenizer()
    docs = synthetic_examples(16, 4, seed=8)
    pairs = build_pairs(docs, tok, "counterfactual", progress=False)
    kept = {p.clean.example_id for p in pairs}
    no_copy = [e.id for e in docs if not copy_positions(build_prompt(e, tok), select_salient(e))]
    assert sorted(kept) == sorted(e.id for e in docs if e.id not in no_copy)
    assert len(pairs) >= 12
    if no_copy: assert f"no copy position: {no_copy[:5]}" in capsys.readouterr().out
    for pr in pairs: _check_counterfactual(pr, tok)
    clean, corr = pair_batch(pairs, tok.pad_token_id)
    assert torch.equal(clean.attention_mask, corr.attention_mask) and torch.equal(clean.copy_mask, corr.copy_mask)
    # deterministic, and the same counterfactual tokens on every variant's pairs of a document
    again = build_pairs(docs, tok, "counterfactual", progress=False)
    assert again == pairs
    swap = {p.clean.example_id: p for p in build_pairs(docs, tok, "swap", progress=False)}
    assert all(swap[p.clean.example_id].clean.counter_ids == p.clean.counter_ids for p in pairs)


def test_counterfactual_without_copy_position_or_replacement():
    tok = byte_tokenizer()
    no_copy = SummaryExample("n", ["Ada won.", "Ada won now."], "Ada won.", salient=[0])
    with pytest.raises(ValueError, match="no copy position") as e:
        make_pair(no_copy, tok, "counterfactual")
    assert "no salient sentence" not in str(e.value) and "'swap' or 'mask'" in str(e.value)
    assert make_pair(no_copy, tok, "mask").clean.copy_positions == []           # other variants still pair it
    lone = SummaryExample("l", ["Ada won."], "Ada won.")                       # no other sentence to draw from
    assert set(make_pair(lone, tok, "counterfactual").clean.counter_ids) == {ord("_")}   # last resort: the filler
    donor = SummaryExample("d", ["Zed quit."], "x")
    pr = make_pair(lone, tok, "counterfactual", donor=donor)                   # the donor's tokens come first
    assert set(pr.clean.counter_ids) <= set(b"Zequit_") and set(pr.clean.counter_ids) & set(b"Zequit")
    with pytest.raises(ValueError, match="no counterfactual token"):           # the filler is in the document too
        make_pair(SummaryExample("f", ["Ada_won."], "Ada_won."), tok, "counterfactual")
    assert make_pair(SummaryExample("f", ["Ada_won."], "Ada_won."), tok, "mask").clean.counter_ids is None
    ok = synthetic_examples(2, 3, seed=1)
    assert [p.clean.example_id for p in build_pairs([no_copy] + ok, tok, "counterfactual", progress=False)] == [e.id for e in ok]


def test_counterfactual_map_unit():
    ids = [1, 2, 3, 4, 5, 6, 2, 9, 8, 1, 3, 0]
    p = Prompt("u", ids, [(0, 3), (3, 7)], 9)
    pos = copy_positions(p, [0])
    assert pos == [9, 10]
    rep = counterfactual_map(p, [0], pos)
    assert sorted(rep) == [1, 3] and set(rep.values()) <= {4, 5, 6} and len(set(rep.values())) == 2
    assert counterfactual_map(p, [0], []) == {}


@pytest.mark.parametrize("variant", ["mask", "swap"])
def test_task_metric_lower_on_corrupted_for_a_copier(variant):
    base, copier = copy_trained()
    pairs = build_pairs(synthetic_examples(24, 3, seed=77), copier.tokenizer, variant, progress=False)
    m_clean, m_corr = pair_metrics(copier, pairs, batch_size=8, progress=False)
    # the metric, recomputed by hand for one document: mean log-prob of its summary tokens
    pr = pairs[0]
    ids = torch.tensor([pr.clean.input_ids])
    with torch.no_grad(): logp = torch.log_softmax(copier.hf(ids).logits[0].float(), -1)
    by_hand = torch.stack([logp[t - 1, ids[0, t]] for t in range(pr.clean.summary_start, len(pr.clean))]).mean()
    assert m_clean[0].item() == pytest.approx(by_hand.item(), abs=1e-4)
    assert (m_corr < m_clean).float().mean() >= 0.8
    assert (m_clean - m_corr).mean() > (0.2 if variant == "mask" else 0.02)   # swapped-in sentences share template words
    b_clean, b_corr = pair_metrics(base, pairs, batch_size=8, progress=False)
    assert (m_clean - m_corr).mean() > (b_clean - b_corr).mean() + (0.1 if variant == "mask" else 0.01)  # copying makes the gap


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["mask", "swap"])
def test_smollm2_tokenizer_on_aclsum(variant):
    lm = load_model("smollm2-135m", device="cpu")
    tok = lm.tokenizer
    fid = filler_token_id(tok)
    assert tok.decode([fid]) == "_"
    examples = load_aclsum("test", "outcome", n=8)
    pairs = build_pairs(examples, tok, variant, max_source_tokens=256, max_length=lm.spec.n_ctx, progress=False)
    assert len(pairs) == len(examples)
    by_id = {e.id: e for e in examples}
    for pr in pairs:
        ex, c, k = by_id[pr.clean.example_id], pr.clean.input_ids, pr.corrupted.input_ids
        assert len(c) == len(k) and c[pr.clean.summary_start:] == k[pr.clean.summary_start:]
        assert pr.salient == [i for i in ex.salient if i < pr.clean.n_sentences] or not any(i < pr.clean.n_sentences for i in ex.salient)
        for i, (s, e) in enumerate(pr.clean.sentence_spans):
            if i in pr.salient:
                assert k[s:e] != c[s:e]
                if variant == "mask": assert set(k[s:e]) == {fid}
            else: assert k[s:e] == c[s:e]
    clean, corr = pair_batch(pairs, tok.pad_token_id)
    assert torch.equal(clean.attention_mask, corr.attention_mask)
