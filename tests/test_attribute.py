"""EAP / EAP-IG scores against autograd on the independent plain-torch forward, and against real patching."""
import pytest
import torch
from scipy.stats import spearmanr

from conftest import corrupted_copy, padded_batch
from reference_forward import reference_forward, upstream_sources
import summcircuit.attribute
from summcircuit.attribute import GIM, attribute, destination_gradients
from summcircuit.data import summary_logprob
from summcircuit.graph import Graph, run_with_patched_edges


def _dest_keys(spec):
    keys = []
    for l in range(spec.n_layers):
        keys += [("q", l, h) for h in range(spec.n_heads)] + [("k", l, g) for g in range(spec.n_kv_heads)]
        keys += [("v", l, g) for g in range(spec.n_kv_heads)] + [("mlp", l)]
    return keys + [("logits",)]


def _src_keys(spec):
    return [("input",)] + [k for l in range(spec.n_layers)
                           for k in [("head", l, h) for h in range(spec.n_heads)] + [("mlp", l)]]


def reference_dest_grads(lm, batch, gim=None):
    "Autograd gradient of the summed metric w.r.t. each destination's own input, on the plain-torch forward."
    leaves = {}
    def dest_input(key, upstream):
        x = sum(upstream.values())
        leaves[key] = torch.zeros_like(x, requires_grad=True)
        return x + leaves[key]
    kwargs = {} if gim is None else {"gim": gim}
    out = reference_forward(lm.hf, batch.input_ids, batch.attention_mask, dest_input=dest_input, **kwargs)
    summary_logprob(out["logits"], batch).sum().backward()
    lm.hf.zero_grad(set_to_none=True)
    return torch.stack([leaves[k].grad for k in _dest_keys(lm.spec)])


def reference_eap(lm, clean, corr, at="clean"):
    "EAP from the reference: Δz (reference node outputs) · reference gradients at the clean (or corrupted) run, per edge."
    with torch.no_grad():
        zc = reference_forward(lm.hf, clean.input_ids, clean.attention_mask)["node_outputs"]
        zr = reference_forward(lm.hf, corr.input_ids, corr.attention_mask)["node_outputs"]
    grads = reference_dest_grads(lm, clean if at == "clean" else corr)
    srcs, dsts = _src_keys(lm.spec), _dest_keys(lm.spec)
    scores = torch.zeros(len(srcs), len(dsts))
    mask = clean.attention_mask[..., None].float()
    for j, d in enumerate(dsts):
        for u in upstream_sources(d, lm.spec.n_layers, lm.spec.n_heads):
            scores[srcs.index(u), j] = ((zc[u] - zr[u]) * mask * grads[j]).sum() / len(clean)
    return scores


def test_destination_gradients_match_autograd(lm):
    b = padded_batch(lm)
    ours, metric = destination_gradients(lm, b)
    ref = reference_dest_grads(lm, b)
    keep = b.attention_mask.bool()
    torch.testing.assert_close(ours[:, keep], ref[:, keep], atol=1e-5, rtol=1e-4)
    assert ref[:, keep].abs().max() > 1e-3          # gradients are not trivially zero


SCORING = ["summed", "streamed", "partly"]

def scoring_mode(mode: str, lm, batch, monkeypatch) -> bool | None:
    """`attribute`'s `stream_scores` for `mode`: the summed gradient tensor scored once, every pass scored as the
    pull-back makes it, or (automatic, with the budget set to half the destinations) the last half summed."""
    if mode != "partly": return mode == "streamed"
    per_destination = batch.input_ids.numel() * lm.spec.d_model * 4
    monkeypatch.setattr(summcircuit.attribute, "STREAM_ABOVE_BYTES", 0)
    monkeypatch.setattr(summcircuit.attribute, "STREAM_BUFFER_BYTES", Graph(lm.spec).n_destinations // 2 * per_destination)
    return None


@pytest.mark.parametrize("mode", SCORING)
def test_eap_matches_reference(lm, mode, monkeypatch):
    """EAP takes its gradient at the clean run (Syed et al.; the reference implementation); 'eap-corrupted' at the
    corrupted. Scores made as the pull-back goes, from the whole gradient tensor, or partly each way alike."""
    clean = padded_batch(lm)
    stream = scoring_mode(mode, lm, clean, monkeypatch)
    corr = corrupted_copy(clean, 0, 30)
    ours = attribute(lm, [(clean, corr)], "eap", progress=False, stream_scores=stream)
    ref = reference_eap(lm, clean, corr)
    torch.testing.assert_close(ours.scores, ref, atol=1e-5, rtol=1e-4)
    assert ref.abs().max() > 1e-3
    at_corr = attribute(lm, [(clean, corr)], "eap-corrupted", progress=False, stream_scores=stream)
    ref_corr = reference_eap(lm, clean, corr, at="corrupted")
    torch.testing.assert_close(at_corr.scores, ref_corr, atol=1e-5, rtol=1e-4)
    assert (ref - ref_corr).abs().max() > 1e-3          # the two linearizations differ


def test_eap_ig_completeness_error_shrinks_with_steps(ref_lm):
    lm = ref_lm
    clean = padded_batch(lm)
    corr = corrupted_copy(clean, 0, 30)
    gaps = []
    for steps in (4, 16, 64):     # the left Riemann sum's error falls like 1/steps
        att = attribute(lm, [(clean, corr)], "eap-ig", ig_steps=steps, progress=False)
        gaps.append(abs(att.scores[0].sum().item() - (att.metric_clean - att.metric_corrupted)))
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 0.3 * gaps[0], gaps


def test_padded_batch_scores_equal_one_by_one(ref_lm):
    lm = ref_lm
    clean = padded_batch(lm)
    corr = corrupted_copy(clean, 0, 30)
    together = attribute(lm, [(clean, corr)], "eap-ig", ig_steps=3, progress=False)
    singles = []
    for i in range(len(clean)):
        n = int(clean.attention_mask[i].sum())
        one = lambda x: type(x)(x.input_ids[i:i + 1, :n], x.attention_mask[i:i + 1, :n], x.target_mask[i:i + 1, :n])
        singles.append((one(clean), one(corr)))
    apart = attribute(lm, singles, "eap-ig", ig_steps=3, progress=False)
    torch.testing.assert_close(together.scores, apart.scores, atol=1e-5, rtol=1e-4)
    assert together.n_examples == apart.n_examples == len(clean)


@pytest.mark.parametrize("spans", ["none", "roles"])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_top_edges_agree_with_single_edge_patching(name, spans):
    "Sign and rank of EAP-IG scores vs the true effect of patching each top edge (positional: at its span) alone."
    from summcircuit.models import load_model
    lm = load_model(name, device="cpu")
    clean = padded_batch(lm, n=2)
    c = corrupted_copy(clean, 0, 40)
    corr = type(c)(c.input_ids, c.attention_mask, c.target_mask, c.ids, clean.roles)
    att = attribute(lm, [(clean, corr)], "eap-ig", ig_steps=10, progress=False, spans=spans)
    g = att.graph
    assert att.scores.shape == ((4,) if spans == "roles" else ()) + (g.n_sources, g.n_destinations)
    est, true = [], []
    base = summary_logprob(run_with_patched_edges(lm, clean, corr, g.edges, g), clean).mean()
    for i in att.scores.abs().flatten().topk(20).indices:
        idx = tuple(int(x) for x in torch.unravel_index(i, att.scores.shape))
        mask = g.edges.clone(); mask[idx] = False           # this edge alone gets the corrupted value
        m = summary_logprob(run_with_patched_edges(lm, clean, corr, mask, g), clean).mean()
        true.append((base - m).item())                      # effect of the edge = clean - patched
        est.append(att.scores[idx].item())
    rho = spearmanr(est, true).statistic
    sign_agree = sum((a > 0) == (b > 0) for a, b in zip(est, true)) / len(est)
    print(f"{name}, spans {spans}: Spearman {rho:.3f}, sign agreement {sign_agree:.2f}")
    assert rho > 0.6 and sign_agree >= 0.8


def test_bad_inputs():
    from summcircuit.models import load_model
    lm = load_model("tiny-gpt2", device="cpu")
    b = padded_batch(lm)
    with pytest.raises(ValueError, match="Unknown method"):
        attribute(lm, [(b, b)], "acdc")
    with pytest.raises(ValueError, match="No clean/corrupted pairs"):
        attribute(lm, [], "eap")
    with pytest.raises(ValueError, match="must align"):
        attribute(lm, [(b, padded_batch(lm, n=2))], "eap", progress=False)


GIM_CASES = {"norm_freeze": GIM(norm_freeze=True), "temperature": GIM(softmax_temperature=2.0),
             "qkv_scale": GIM(qkv_scale=True), "all": GIM.full()}


@pytest.mark.parametrize("case", list(GIM_CASES))
def test_gim_gradients_match_reference(ref_lm, case):
    "Each GIM switch alone (and all together) gives the reference's autograd gradients with that change."
    lm, gim = ref_lm, GIM_CASES[case]
    b = padded_batch(lm)
    ours = destination_gradients(lm, b, gim)[0]
    ref = reference_dest_grads(lm, b, gim=dict(norm_freeze=gim.norm_freeze, softmax_temperature=gim.softmax_temperature,
                                               qkv_scale=gim.qkv_scale))
    plain = reference_dest_grads(lm, b)
    keep = b.attention_mask.bool()
    torch.testing.assert_close(ours[:, keep], ref[:, keep], atol=1e-5, rtol=1e-4)
    assert (ref[:, keep] - plain[:, keep]).abs().max() > 1e-4      # the switch really changes gradients


def test_qkv_scale_alone_scales_last_layer_exactly():
    "GPT-2 (no gated MLP): at the last layer q, k get 0.25x, v 0.5x the plain gradient; MLP and logits unchanged."
    from conftest import MODELS
    lm = MODELS["ref-gpt2"]()
    b = padded_batch(lm)
    g = Graph(lm.spec)
    plain = destination_gradients(lm, b)[0]
    scaled = destination_gradients(lm, b, GIM(qkv_scale=True))[0]
    L, H = lm.spec.n_layers - 1, lm.spec.n_heads
    for h in range(H):
        torch.testing.assert_close(scaled[g.q_destination(L, h)], 0.25 * plain[g.q_destination(L, h)])
        torch.testing.assert_close(scaled[g.k_destination(L, h)], 0.25 * plain[g.k_destination(L, h)])
        torch.testing.assert_close(scaled[g.v_destination(L, h)], 0.5 * plain[g.v_destination(L, h)])
    torch.testing.assert_close(scaled[g.mlp_destination(L)], plain[g.mlp_destination(L)])
    torch.testing.assert_close(scaled[-1], plain[-1])


def test_gim_forward_is_bit_identical(ref_lm):
    from summcircuit.attribute import logits_with_gim
    b = padded_batch(ref_lm)
    with torch.no_grad():
        plain = ref_lm.hf(b.input_ids, attention_mask=b.attention_mask).logits
    for gim in GIM_CASES.values():
        assert torch.equal(logits_with_gim(ref_lm, b, gim), plain)


def test_gim_temperature_needs_eager_attention():
    from summcircuit.models import load_model
    lm = load_model("tiny-llama", device="cpu")
    lm.hf.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match='attn_implementation="eager"'):
        destination_gradients(lm, padded_batch(lm), GIM(softmax_temperature=2.0))


def reference_ig_activations(lm, clean, corr, steps):
    """EAP-IG-activations by hand (Hanna et al. 2024, right Riemann sum): for each node group (the input, each layer's
    heads together, each MLP) and α = k/steps, k = 1..steps, the group's outputs become the constant
    α·clean + (1-α)·corrupted in every destination's input; the destination gradients of all these runs are averaged."""
    with torch.no_grad():
        zc = reference_forward(lm.hf, clean.input_ids, clean.attention_mask)["node_outputs"]
        zr = reference_forward(lm.hf, corr.input_ids, corr.attention_mask)["node_outputs"]
    spec = lm.spec
    groups = [[("input",)]] + [g for l in range(spec.n_layers)
                               for g in ([("head", l, h) for h in range(spec.n_heads)], [("mlp", l)])]
    dsts, srcs = _dest_keys(spec), _src_keys(spec)
    total = {d: 0 for d in dsts}
    for group in groups:
        for k in range(1, steps + 1):
            a, leaves = k / steps, {}
            def dest_input(key, upstream):
                x = sum((a * zc[u] + (1 - a) * zr[u]).detach() if u in group else v for u, v in upstream.items())
                leaves[key] = torch.zeros_like(x, requires_grad=True)
                return x + leaves[key]
            out = reference_forward(lm.hf, clean.input_ids, clean.attention_mask, dest_input=dest_input)
            summary_logprob(out["logits"], clean).sum().backward()
            lm.hf.zero_grad(set_to_none=True)
            for d in dsts:
                g = leaves[d].grad
                total[d] = total[d] + (0 if g is None else g)
    n_runs = len(groups) * steps
    scores = torch.zeros(len(srcs), len(dsts))
    mask = clean.attention_mask[..., None].float()
    for j, d in enumerate(dsts):
        for u in upstream_sources(d, spec.n_layers, spec.n_heads):
            scores[srcs.index(u), j] = ((zc[u] - zr[u]) * mask * total[d] / n_runs).sum() / len(clean)
    return scores


@pytest.mark.parametrize("mode", SCORING)
def test_eap_ig_activations_matches_reference(lm, mode, monkeypatch):
    "EAP-IG-activations against the hand-written definition on the plain-torch forward, and unlike EAP-IG."
    clean = padded_batch(lm)
    stream = scoring_mode(mode, lm, clean, monkeypatch)
    corr = corrupted_copy(clean, 0, 30)
    ours = attribute(lm, [(clean, corr)], "eap-ig-activations", ig_steps=2, ig_rule="right", progress=False,
                     stream_scores=stream)
    ref = reference_ig_activations(lm, clean, corr, 2)
    torch.testing.assert_close(ours.scores, ref, atol=1e-5, rtol=1e-4)
    assert ref.abs().max() > 1e-3
    ig = attribute(lm, [(clean, corr)], "eap-ig", ig_steps=2, ig_rule="right", progress=False)
    assert (ig.scores - ours.scores).abs().max() > 1e-4          # a different estimate, not EAP-IG renamed
