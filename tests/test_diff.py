"""Differential analysis and its causal check against direct computations: every statistic from the plain HF
model's `output_attentions` / `output_hidden_states` (plus torch hooks for MLP activations), example by example
without padding; ablations against torch forward hooks; the bootstrap against a plain numpy bootstrap."""

import numpy as np
import pytest
import torch

from test_corrupt import copy_trained
from summcircuit.corrupt import build_pairs, pair_batches
from summcircuit.data import build_prompt, summary_logprob, synthetic_examples
from summcircuit.diff import (DiffResult, bootstrap_share_below_zero, causal_check, check_comparable,
                              differential_analysis, head_mask_of, layer_mask, mean_head_outputs, random_draws,
                              run_with_head_outputs)
from summcircuit.models import load_model


def model_pair(kind):
    if kind == "gpt2-two-seeds": return load_model("tiny-gpt2", device="cpu"), load_model("tiny-gpt2", device="cpu", seed=1)
    return copy_trained("tiny-llama")                        # base vs copy-trained (fine-tuned in test_corrupt)


def direct_statistics(lm_a, lm_b, prompts):
    "Per-example statistics, one unpadded example at a time, from HF outputs and torch hooks, by the definitions."
    L, H = lm_a.spec.n_layers, lm_a.spec.n_heads
    out = {k: torch.zeros(len(prompts), L, H) for k in ("ent_a", "ent_b", "nent_a", "nent_b", "kl")}
    out["cos"] = torch.zeros(len(prompts), L)
    acts = {"a": [[] for _ in range(L)], "b": [[] for _ in range(L)]}
    for n, p in enumerate(prompts):
        ids = torch.tensor([p.input_ids])
        T = ids.shape[1]
        read = {}
        for key, lm in (("a", lm_a), ("b", lm_b)):
            last = []
            hooks = [lm.spec.layer(lm.hf, L - 1).register_forward_hook(
                lambda m, a, o: last.append(o[0] if isinstance(o, tuple) else o))]
            for l in range(L):
                hooks.append(lm.spec.layer(lm.hf, l, lm.spec.mlp_down).register_forward_pre_hook(
                    lambda m, a, l=l, key=key: acts[key][l].append(a[0][0].double())))
            try:
                with torch.no_grad(): o = lm.hf(ids, output_attentions=True, output_hidden_states=True)
            finally:
                for h in hooks: h.remove()
            # output_hidden_states[l + 1] leaves layer l, except the last entry, which HF returns after the final norm
            hidden = [o.hidden_states[l + 1][0] for l in range(L - 1)] + [last[0][0]]
            read[key] = (o.attentions, hidden)
        for l in range(L):
            A, B = read["a"][0][l][0].double(), read["b"][0][l][0].double()       # [H, T, T]
            rows = {k: [] for k in ("ea", "eb", "na", "nb", "kl")}
            for i in range(T):
                a, b = A[:, i, :i + 1], B[:, i, :i + 1]
                ea = -(a * torch.log(a)).nan_to_num().sum(-1)
                eb = -(b * torch.log(b)).nan_to_num().sum(-1)
                rows["ea"].append(ea); rows["eb"].append(eb)
                rows["kl"].append((a * (torch.log(a) - torch.log(b))).nan_to_num().sum(-1))
                if i > 0: rows["na"].append(ea / np.log(i + 1)); rows["nb"].append(eb / np.log(i + 1))
            for key, name in (("ea", "ent_a"), ("eb", "ent_b"), ("na", "nent_a"), ("nb", "nent_b"), ("kl", "kl")):
                out[name][n, l] = torch.stack(rows[key]).mean(0).float()
            ha, hb = read["a"][1][l].double(), read["b"][1][l].double()
            out["cos"][n, l] = ((ha * hb).sum(-1) / (ha.norm(dim=-1) * hb.norm(dim=-1))).mean().float()
    for key in ("a", "b"):
        allt = [torch.cat(acts[key][l]) for l in range(L)]
        out[f"nmean_{key}"] = torch.stack([x.mean(0) for x in allt]).float()
        if key == "a": out["nstd_a"] = torch.stack([x.std(0, correction=0) for x in allt]).float()
    return out


@pytest.fixture(scope="module", params=["gpt2-two-seeds", "llama-base-vs-copy-trained"])
def analysed(request):
    lm_a, lm_b = model_pair(request.param)
    prompts = [build_prompt(e, lm_a.tokenizer) for e in synthetic_examples(5, 3, seed=21)]
    assert len({len(p) for p in prompts}) > 1                   # different lengths: batches carry padding
    res = differential_analysis(lm_a, lm_b, prompts, batch_size=3, progress=False)
    return res, direct_statistics(lm_a, lm_b, prompts), lm_a, lm_b, prompts


def test_per_example_statistics_match_hf_outputs(analysed):
    res, ref, *_ = analysed
    close = lambda x, y, tol=2e-4: torch.testing.assert_close(x, y, atol=tol, rtol=0)
    close(res.entropy_a, ref["ent_a"]); close(res.entropy_b, ref["ent_b"])
    close(res.norm_entropy_a, ref["nent_a"]); close(res.norm_entropy_b, ref["nent_b"])
    close(res.kl, ref["kl"]); close(res.cosine, ref["cos"], 1e-5)
    close(res.neuron_mean_a, ref["nmean_a"], 1e-5); close(res.neuron_mean_b, ref["nmean_b"], 1e-5)
    close(res.neuron_std_a, ref["nstd_a"], 1e-5)
    assert res.kl.min() >= 0 and res.kl.max() > 1e-3           # the two checkpoints do differ


def test_derived_statistics_match_definitions(analysed):
    res, ref, *_ = analysed
    L, H = res.n_layers, res.n_heads
    dH = (ref["ent_b"] - ref["ent_a"]).mean(0)
    assert res.share_lower_entropy() == pytest.approx(float((dH < 0).sum()) / (L * H))
    dn = (ref["nent_b"] - ref["nent_a"]).mean(0)
    assert res.share_lower_entropy(normalized=True) == pytest.approx(float((dn < 0).sum()) / (L * H))
    layer_kl = ref["kl"].mean(0).mean(-1)
    torch.testing.assert_close(res.layer_kl, layer_kl, atol=2e-4, rtol=0)
    for k in range(1, L + 1):
        assert res.critical_layers(k) == sorted(range(L), key=lambda l: -layer_kl[l].item())[:k]
    flat = sorted(((l, h) for l in range(L) for h in range(H)), key=lambda lh: dH[lh].item())
    assert res.top_entropy_drop_heads(3) == flat[:3]
    delta = ref["nmean_b"] - ref["nmean_a"]
    changed = delta.abs() > ref["nstd_a"]
    flips = torch.sign(ref["nmean_a"]) * torch.sign(ref["nmean_b"]) < 0
    borderline = ((delta.abs() - ref["nstd_a"]).abs() < 1e-5)     # float ties could go either way
    assert torch.equal(res.neuron_changed[~borderline], changed[~borderline])
    torch.testing.assert_close(res.changed_share, changed.double().mean(-1), atol=borderline.double().mean(-1).max().item() + 1e-9, rtol=0)
    torch.testing.assert_close(res.flip_share, flips.double().mean(-1), atol=1e-9, rtol=0)
    top = res.top_neurons(5)
    ratio = delta.abs() / ref["nstd_a"]
    assert [(t["layer"], t["neuron"]) for t in top][:1] == [divmod(int(ratio.flatten().argmax()), ratio.shape[1])]
    torch.testing.assert_close(res.layer_cosine, ref["cos"].mean(0), atol=1e-5, rtol=0)


def test_batching_does_not_change_results(analysed):
    res, _, lm_a, lm_b, prompts = analysed
    one = differential_analysis(lm_a, lm_b, prompts, batch_size=1, progress=False)
    for name in DiffResult._TENSORS:
        torch.testing.assert_close(getattr(one, name), getattr(res, name), atol=1e-5, rtol=0)


def test_save_load_roundtrip(analysed, tmp_path):
    res = analysed[0]
    back = DiffResult.load(res.save(tmp_path / "d.safetensors"))
    assert back.ids == res.ids and back.n_tokens == res.n_tokens
    for name in DiffResult._TENSORS: assert torch.equal(getattr(back, name), getattr(res, name))


def test_bootstrap_matches_a_plain_numpy_bootstrap():
    rng = np.random.default_rng(0)
    deltas = torch.tensor(rng.normal(0, 1, (40, 60)) + rng.normal(0, 0.15, (1, 60)))
    share, lo, hi = bootstrap_share_below_zero(deltas, n_resamples=4000, seed=1)
    d = deltas.numpy()
    assert share == pytest.approx((d.mean(0) < 0).mean())
    boot = [(d[rng.integers(0, 40, 40)].mean(0) < 0).mean() for _ in range(4000)]
    assert lo == pytest.approx(np.percentile(boot, 2.5), abs=0.025)
    assert hi == pytest.approx(np.percentile(boot, 97.5), abs=0.025)
    assert lo < share < hi


def test_incompatible_models_fail():
    with pytest.raises(ValueError, match="differ in shape"):
        check_comparable(load_model("tiny-gpt2", device="cpu"), load_model("tiny-llama", device="cpu"))


# -- the causal check ---------------------------------------------------------------------------------------
def hooked_logits(lm, batch, head_mask, replace):
    "Plain torch: a forward pre-hook on each masked layer's output projection swaps the masked heads' slices."
    s = lm.spec
    hooks = []
    for l in range(s.n_layers):
        if not head_mask[l].any(): continue
        def pre(mod, args, l=l):
            z = args[0].clone().view(*args[0].shape[:-1], s.n_heads, s.d_head)
            for h in range(s.n_heads):
                if head_mask[l, h]: z[..., h, :] = replace(l, h)
            return (z.view(args[0].shape),)
        hooks.append(s.layer(lm.hf, l, s.o_proj).register_forward_pre_hook(pre))
    try:
        with torch.no_grad(): return lm.hf(batch.input_ids, attention_mask=batch.attention_mask).logits
    finally:
        for h in hooks: h.remove()


def hooked_head_outputs(lm, batch):
    "Plain torch: every layer's output-projection input `[L, b, T, H, d_head]`."
    s, got = lm.spec, {}
    hooks = [s.layer(lm.hf, l, s.o_proj).register_forward_pre_hook(lambda m, a, l=l: got.__setitem__(l, a[0]))
             for l in range(s.n_layers)]
    try:
        with torch.no_grad(): lm.hf(batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for h in hooks: h.remove()
    return torch.stack([got[l].view(*got[l].shape[:-1], s.n_heads, s.d_head) for l in range(s.n_layers)])


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_ablations_match_torch_hooks(name):
    lm = load_model(name, device="cpu")
    s = lm.spec
    pairs = build_pairs(synthetic_examples(5, 3, seed=4), lm.tokenizer, progress=False)
    (clean, corr), (clean2, _) = pair_batches(pairs, lm.tokenizer.pad_token_id, 3)
    keep = clean.attention_mask.bool()
    # the mean over real positions and examples of two batches, by hand
    zs = [(hooked_head_outputs(lm, b), b.attention_mask.bool()) for b in (clean, clean2)]
    zbar = torch.cat([z[:, m] for z, m in zs], 1).double().mean(1).float()          # [L, H, d_head]
    torch.testing.assert_close(mean_head_outputs(lm, [clean, clean2]), zbar, atol=1e-5, rtol=0)
    z_corr = hooked_head_outputs(lm, corr)
    for mask in (layer_mask(s.n_layers, s.n_heads, [0, 2]), head_mask_of(s.n_layers, s.n_heads, [(0, 1), (1, 3), (2, 0)])):
        ours = run_with_head_outputs(lm, clean, mask, zbar)
        ref = hooked_logits(lm, clean, mask, lambda l, h: zbar[l, h])
        torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=0)
        ours = run_with_head_outputs(lm, clean, mask, z_corr)
        ref = hooked_logits(lm, clean, mask, lambda l, h: z_corr[l, :, :, h])
        torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=0)
        plain = lm.hf(clean.input_ids, attention_mask=clean.attention_mask).logits
        assert (ours[keep] - plain[keep]).abs().max() > 1e-3        # the intervention does something
    # patching every head of every layer to corrupted leaves only the MLPs and residual reading clean tokens;
    # with the corrupted run's own heads written back, the corrupted run is reproduced
    all_heads = torch.ones(s.n_layers, s.n_heads, dtype=torch.bool)
    torch.testing.assert_close(run_with_head_outputs(lm, corr, all_heads, z_corr)[keep],
                               lm.hf(corr.input_ids, attention_mask=corr.attention_mask).logits[keep], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="head_mask has shape"):
        run_with_head_outputs(lm, clean, torch.ones(2, 2, dtype=torch.bool), zbar)


def test_causal_check_against_direct_recomputation():
    _, lm = copy_trained("tiny-llama")
    s = lm.spec
    pairs = build_pairs(synthetic_examples(6, 3, seed=31), lm.tokenizer, progress=False)
    batches = pair_batches(pairs, lm.tokenizer.pad_token_id, 3)
    layers, heads = [1], [(0, 2), (2, 1)]
    checks = causal_check(lm, batches, layers, heads, n_random=4, seed=3, progress=False)
    assert [(c.target_kind, c.mode) for c in checks] == [("layers", "mean"), ("layers", "corrupted"),
                                                           ("heads", "mean"), ("heads", "corrupted")]
    by = {(c.target_kind, c.mode): c for c in checks}
    # direct recomputation with torch hooks, example by example in batches
    zs = [(hooked_head_outputs(lm, c), c.attention_mask.bool()) for c, _ in batches]
    zbar = torch.cat([z[:, m] for z, m in zs], 1).double().mean(1).float()
    def drop(mask_fn_targets, mode):
        drops = []
        for c, k in batches:
            m_clean = summary_logprob(lm.hf(c.input_ids, attention_mask=c.attention_mask).logits, c)
            zc = hooked_head_outputs(lm, k)
            rep = (lambda l, h: zbar[l, h]) if mode == "mean" else (lambda l, h: zc[l, :, :, h])
            drops.append(m_clean - summary_logprob(hooked_logits(lm, c, mask_fn_targets, rep), c))
        return torch.cat(drops)
    with torch.no_grad():
        for (kind, mode), c in by.items():
            mask = layer_mask(s.n_layers, s.n_heads, layers) if kind == "layers" else head_mask_of(s.n_layers, s.n_heads, heads)
            d = drop(mask, mode)
            torch.testing.assert_close(torch.tensor(c.drops), d.float(), atol=1e-4, rtol=0)
            assert c.drop == pytest.approx(d.mean().item(), abs=1e-4)
            assert len(c.random_drops) == len(c.random_targets) == 4
            rd = c.random_targets[0]
            rmask = layer_mask(s.n_layers, s.n_heads, rd) if kind == "layers" else head_mask_of(s.n_layers, s.n_heads, [tuple(x) for x in rd])
            assert c.random_drops[0] == pytest.approx(drop(rmask, mode).mean().item(), abs=1e-4)
            for t in c.random_targets:                              # random sets: as many, none of the targets
                assert len(t) == len(c.target)
                assert not set(map(lambda x: tuple(x) if isinstance(x, (list, tuple)) else x, t)) & set(
                    map(lambda x: tuple(x) if isinstance(x, (list, tuple)) else x, c.target))
            assert c.p_value == pytest.approx((1 + sum(x >= c.drop for x in c.random_drops)) / 5)
            assert c.percentile == pytest.approx(sum(x < c.drop for x in c.random_drops) / 4)
        m_corr = torch.cat([summary_logprob(lm.hf(k.input_ids, attention_mask=k.attention_mask).logits, k) for _, k in batches])
    assert checks[0].metric_corrupted == pytest.approx(m_corr.mean().item(), abs=1e-4)
    assert checks[0].metric_corrupted < checks[0].metric_clean


def test_random_draws():
    draws = random_draws(list(range(10)), 3, 12, seed=0)
    assert len(draws) == 12 and all(len(set(d)) == 3 and d == sorted(d) for d in draws)
    assert draws == random_draws(list(range(10)), 3, 12, seed=0) and len({tuple(d) for d in draws}) > 1
    with pytest.raises(ValueError, match="Cannot draw"):
        random_draws([1, 2], 3, 1)


def test_causal_check_takes_the_metric():
    "With metric='kl' the clean run scores exactly 0 and the corrupted run minus its KL to the clean run, computed here by hand."
    import torch.nn.functional as F
    _, lm = copy_trained("tiny-llama")
    pairs = build_pairs(synthetic_examples(4, 3, seed=31), lm.tokenizer, progress=False)
    batches = pair_batches(pairs, lm.tokenizer.pad_token_id, 2)
    checks = causal_check(lm, batches, [1], [(0, 2)], n_random=1, seed=3, progress=False, metric="kl")
    kls = []
    with torch.no_grad():
        for c, k in batches:
            lp_clean = lm.hf(c.input_ids, attention_mask=c.attention_mask).logits.log_softmax(-1)
            lp_corr = lm.hf(k.input_ids, attention_mask=k.attention_mask).logits.log_softmax(-1)
            for b in range(len(c.input_ids)):
                at = c.target_mask[b].nonzero().flatten() - 1          # positions that predict a summary token
                kls.append(F.kl_div(lp_corr[b, at], lp_clean[b, at], log_target=True, reduction="none").sum(-1).mean())
    assert abs(checks[0].metric_clean) < 1e-6
    assert checks[0].metric_corrupted == pytest.approx(-torch.stack(kls).mean().item(), rel=1e-4, abs=1e-6)
    assert checks[0].metric_corrupted < -1e-4
