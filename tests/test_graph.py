"""The graph's counts, `node_outputs` and `run_with_patched_edges` against independent computations."""
import random

import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from conftest import corrupted_copy, padded_batch
from reference_forward import reference_forward, upstream_sources
from summcircuit.graph import Graph, node_outputs, run_with_patched_edges
from summcircuit.models import arch_spec


def closed_form_edges(L, H, K):
    "Edges = sum over layers of (q,k,v dests) x upstream + MLP x upstream, plus logits x all sources."
    per_layer_upstream = L + (H + 1) * L * (L - 1) // 2        # sum_l (1 + l (H + 1))
    return (H + 2 * K + 1) * per_layer_upstream + L * H + 1 + L * (H + 1)


@pytest.mark.parametrize("L,H,K", [(12, 12, 12), (30, 9, 3), (24, 16, 16), (3, 4, 2), (1, 2, 1), (5, 8, 2)])
def test_edge_count_closed_form(L, H, K):
    cfg = LlamaConfig(num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=K, hidden_size=16 * H)
    g = Graph(arch_spec(cfg))
    assert g.n_edges == closed_form_edges(L, H, K)
    assert g.n_nodes == 1 + L * (H + 1) + 1
    # brute force over the precedence rule, from names
    src_layer = [-1] + [l for l in range(L) for _ in range(H + 1)]
    src_is_mlp = [False] + [i == H for l in range(L) for i in range(H + 1)]
    dst_layer = [l for l in range(L) for _ in range(H + 2 * K + 1)] + [L]
    dst_is_mlp = [i == H + 2 * K for l in range(L) for i in range(H + 2 * K + 1)] + [False]
    brute = torch.tensor([[sl < dl or (sl == dl and dm and not sm) for dl, dm in zip(dst_layer, dst_is_mlp)]
                          for sl, sm in zip(src_layer, src_is_mlp)])
    assert torch.equal(brute, g.edges)


def test_gpt2_small_matches_reference_implementation_size():
    g = Graph(arch_spec(GPT2Config()))
    assert (g.n_nodes, g.n_edges) == (158, 32_491)


def _src_index(g, key):
    return 0 if key == ("input",) else g.head_source(key[1], key[2]) if key[0] == "head" else g.mlp_source(key[1])


def _dst_index(g, key):
    kind = key[0]
    return {"q": lambda: g.q_destination(key[1], key[2]), "k": lambda: g.k_destination(key[1], key[2]),
            "v": lambda: g.v_destination(key[1], key[2]), "mlp": lambda: g.mlp_destination(key[1]),
            "logits": lambda: g.logits_destination}[kind]()


def test_node_outputs_match_reference(lm):
    b = padded_batch(lm)
    g = Graph(lm.spec)
    z = node_outputs(lm, b)
    ref = reference_forward(lm.hf, b.input_ids, b.attention_mask)["node_outputs"]
    keep = b.attention_mask.bool()
    assert len(ref) == g.n_sources
    for key, val in ref.items():
        torch.testing.assert_close(z[_src_index(g, key)][keep], val[keep], atol=1e-5, rtol=0)


def _reference_patched(lm, clean, corrupted, edges):
    "Hand-written patching: the reference forward where listed (src, dst) edges use the corrupted source output."
    corr = reference_forward(lm.hf, corrupted.input_ids, corrupted.attention_mask)["node_outputs"]
    def dest_input(dst, upstream):
        return sum(corr[src] if (src, dst) in edges else val for src, val in upstream.items())
    return reference_forward(lm.hf, clean.input_ids, clean.attention_mask, dest_input=dest_input)["logits"]


def _all_edges(lm):
    s = lm.spec
    dests = ([(kind, l, h) for l in range(s.n_layers) for kind, n in (("q", s.n_heads), ("k", s.n_kv_heads),
              ("v", s.n_kv_heads)) for h in range(n)] + [("mlp", l) for l in range(s.n_layers)] + [("logits",)])
    return [(src, dst) for dst in dests for src in upstream_sources(dst, s.n_layers, s.n_heads)]


def test_patching_single_and_random_edges_matches_reference(lm):
    b = padded_batch(lm)
    corr = corrupted_copy(b, 0, 30)
    g = Graph(lm.spec)
    edges = _all_edges(lm)
    assert len(edges) == g.n_edges
    rng = random.Random(0)
    keep = b.attention_mask.bool()
    picks = [[e] for e in rng.sample(edges, 4)] + [[e for e in edges if e[1][0] == "k"][:1]]
    picks.append(rng.sample(edges, len(edges) // 3))                    # a large random set
    for patched in picks:
        mask = g.edges.clone()
        for src, dst in patched: mask[_src_index(g, src), _dst_index(g, dst)] = False
        ours = run_with_patched_edges(lm, b, corr, mask, g)
        ref = _reference_patched(lm, b, corr, set(patched))
        torch.testing.assert_close(ours[keep], ref[keep], atol=1e-4, rtol=0)
    # the large patch really changes the output (the test could fail)
    full = run_with_patched_edges(lm, b, corr, g.edges, g)
    assert (full[keep] - ours[keep]).abs().max() > 1e-3


def test_padded_batch_equals_examples_one_by_one(lm):
    "Padding contributes nothing: patched logits of a padded batch equal each example run alone."
    b = padded_batch(lm)
    corr = corrupted_copy(b, 0, 30)
    g = Graph(lm.spec)
    mask = torch.rand(g.edges.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    batched = run_with_patched_edges(lm, b, corr, mask, g)
    for i in range(len(b)):
        n = int(b.attention_mask[i].sum())
        one = lambda x: type(x)(x.input_ids[i:i + 1, :n], x.attention_mask[i:i + 1, :n], x.target_mask[i:i + 1, :n])
        alone = run_with_patched_edges(lm, one(b), one(corr), mask, g)
        torch.testing.assert_close(batched[i, :n], alone[0], atol=1e-4, rtol=0)


def test_bad_mask_shape(lm):
    b = padded_batch(lm)
    with pytest.raises(ValueError, match="edge_mask has shape"):
        run_with_patched_edges(lm, b, b, torch.ones(3, 3, dtype=torch.bool))


def _role_batches(lm):
    "A padded clean batch with roles, and a corrupted copy that keeps them (positions and roles align)."
    b = padded_batch(lm)
    c = corrupted_copy(b, 0, 30)
    return b, type(c)(c.input_ids, c.attention_mask, c.target_mask, c.ids, b.roles)


def _reference_patched_positional(lm, clean, corrupted, edges, span_ids):
    "Hand-written positional patching: listed (span, src, dst) edges use the corrupted output at that span's positions."
    corr = reference_forward(lm.hf, corrupted.input_ids, corrupted.attention_mask)["node_outputs"]
    def dest_input(dst, upstream):
        total = 0
        for src, val in upstream.items():
            at = torch.zeros_like(span_ids, dtype=torch.bool)
            for s, e_src, e_dst in edges:
                if (e_src, e_dst) == (src, dst): at |= span_ids == s
            total = total + torch.where(at[..., None], corr[src], val)
        return total
    return reference_forward(lm.hf, clean.input_ids, clean.attention_mask, dest_input=dest_input)["logits"]


def test_positional_patching_matches_reference(lm):
    "Positional edges removed one at a time and in a random third, against a forward that patches positions by hand."
    b, corr = _role_batches(lm)
    g = Graph(lm.spec, "roles")
    span_ids = g.span_ids(b)
    edges = [(s, src, dst) for s in range(g.n_spans) for src, dst in _all_edges(lm)]
    assert len(edges) == g.n_edges
    rng = random.Random(1)
    keep = b.attention_mask.bool()
    present = span_ids.unique().tolist()
    singles = [e for e in rng.sample(edges, 60) if e[0] in present][:3]
    singles += [next(e for e in edges if e[2][0] == "k" and e[0] == 0)]      # a k input at the salient span
    for patched in [[e] for e in singles] + [rng.sample(edges, len(edges) // 3)]:
        mask = g.edges.clone()
        for s, src, dst in patched: mask[s, _src_index(g, src), _dst_index(g, dst)] = False
        ours = run_with_patched_edges(lm, b, corr, mask, g)
        ref = _reference_patched_positional(lm, b, corr, patched, span_ids)
        torch.testing.assert_close(ours[keep], ref[keep], atol=1e-4, rtol=0)
    # one span's edges all corrupted equals the span-free patch only at that span: differs from both extremes
    span_free = run_with_patched_edges(lm, b, corr, Graph(lm.spec).edges, Graph(lm.spec))
    assert (span_free[keep] - ours[keep]).abs().max() > 1e-3


def test_positional_all_and_none(lm):
    "All positional edges kept = clean; none = corrupted; the positional graph with one schema span = span-free."
    b, corr = _role_batches(lm)
    keep = b.attention_mask.bool()
    g, free = Graph(lm.spec, "roles"), Graph(lm.spec)
    with torch.no_grad():
        clean = lm.hf(b.input_ids, attention_mask=b.attention_mask).logits
        corrupted = lm.hf(corr.input_ids, attention_mask=corr.attention_mask).logits
    torch.testing.assert_close(run_with_patched_edges(lm, b, corr, g.edges, g)[keep], clean[keep], atol=1e-4, rtol=0)
    torch.testing.assert_close(run_with_patched_edges(lm, b, corr, torch.zeros_like(g.edges), g)[keep], corrupted[keep],
                               atol=1e-4, rtol=0)
    mask = torch.rand(free.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    torch.testing.assert_close(run_with_patched_edges(lm, b, corr, mask.expand(g.n_spans, -1, -1), g)[keep],
                               run_with_patched_edges(lm, b, corr, mask, free)[keep], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="edge_mask has shape"):
        run_with_patched_edges(lm, b, corr, mask, g)


def test_corrupted_run_reused_across_graphs(lm):
    "A corrupted run laid out by the roles spans gives the reference's positional patch, and serves span-free and per-token graphs too."
    from summcircuit.graph import CorruptedRun
    b, corr = _role_batches(lm)
    keep = b.attention_mask.bool()
    g = Graph(lm.spec, "roles")
    run = CorruptedRun.of(lm, b, corr, g)
    edges = [(s, src, dst) for s in range(g.n_spans) for src, dst in _all_edges(lm)]
    patched = random.Random(2).sample(edges, len(edges) // 3)
    mask = g.edges.clone()
    for s, src, dst in patched: mask[s, _src_index(g, src), _dst_index(g, dst)] = False
    ref = _reference_patched_positional(lm, b, corr, patched, g.span_ids(b))
    ours = run_with_patched_edges(lm, b, corr, mask, g, corrupted_run=run)
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-4, rtol=0)
    for other in (Graph(lm.spec), Graph(lm.spec, "tokens", n_positions=b.input_ids.shape[1])):
        m = torch.rand(other.shape, generator=torch.Generator().manual_seed(4)) < 0.5
        torch.testing.assert_close(run_with_patched_edges(lm, b, corr, m, other, corrupted_run=run)[keep],
                                   run_with_patched_edges(lm, b, corr, m, other)[keep], atol=1e-5, rtol=0)


def test_small_circuits_skip_unchanged_nodes(lm):
    """Circuits that leave most nodes unchanged (one path; every edge into one early MLP, the last layer's values or its MLP;
    edges out of unchanged nodes only) give the reference's logits, so nodes skipped as unchanged really are unchanged."""
    b = padded_batch(lm)
    corr = corrupted_copy(b, 0, 30)
    g = Graph(lm.spec)
    keep = b.attention_mask.bool()
    edges = _all_edges(lm)
    L = lm.spec.n_layers
    to_logits = lambda src: (src, ("logits",))
    cases = {"one path": [(("input",), ("v", 0, 0)), to_logits(("head", 0, 0))],      # (queries and keys barely move a random model's attention)
             "into one mlp": [e for e in edges if e[1] == ("mlp", 0)] + [to_logits(("mlp", 0))],
             "into the last layer's values": [e for e in edges if e[1][:2] == ("v", L - 1)] + [to_logits(("head", L - 1, 0))],
             "into the last mlp": [e for e in edges if e[1] == ("mlp", L - 1)] + [to_logits(("mlp", L - 1))]}
    corrupted = _reference_patched(lm, b, corr, set(edges))
    for name, kept in cases.items():
        mask = torch.zeros_like(g.edges)
        for src, dst in kept: mask[_src_index(g, src), _dst_index(g, dst)] = True
        ours = run_with_patched_edges(lm, b, corr, mask, g)
        ref = _reference_patched(lm, b, corr, set(edges) - set(kept))
        torch.testing.assert_close(ours[keep], ref[keep], atol=1e-4, rtol=0, msg=name)
        assert (ours[keep] - corrupted[keep]).abs().max() > 1e-4, name
    # edges only out of nodes that nothing changed: the corrupted run, exactly
    mask = torch.zeros_like(g.edges)
    mask[g.head_source(L - 1, 1), -1] = mask[g.mlp_source(L - 1), -1] = True
    torch.testing.assert_close(run_with_patched_edges(lm, b, corr, mask, g)[keep], corrupted[keep], atol=1e-5, rtol=0)


def test_clean_run_gives_the_same_logits(lm):
    """With the clean run cached (`clean_run`), the layers before the first dropped edge take their clean values:
    every edge but one (early, middle, last layer; span-free and positional) and a random half of the edges give
    the reference's logits, and the prefix is what `clean_prefix` says."""
    from summcircuit.graph import CorruptedRun, clean_prefix
    b, corr = _role_batches(lm)
    keep = b.attention_mask.bool()
    L = lm.spec.n_layers
    edges = _all_edges(lm)
    for g in (Graph(lm.spec), Graph(lm.spec, "roles")):
        clean_run = CorruptedRun.of(lm, b, b, g)
        for dst in (("q", 0, 1), ("mlp", L // 2), ("v", L - 1, 0), ("logits",)):
            mask = g.edges.clone()
            src = next(e[0] for e in edges if e[1] == dst)
            idx = (_src_index(g, src), _dst_index(g, dst))
            if g.positional: mask[(0, *idx)] = False
            else: mask[idx] = False
            attn, mlp = clean_prefix(g, mask)
            layer = L if dst == ("logits",) else dst[1]
            assert attn.tolist() == [l < layer or (l == layer and dst[0] == "mlp") for l in range(L)], dst
            ours = run_with_patched_edges(lm, b, corr, mask, g, clean_run=clean_run)
            plain = run_with_patched_edges(lm, b, corr, mask, g)
            torch.testing.assert_close(ours[keep], plain[keep], atol=1e-5, rtol=0)
            if not g.positional:
                ref = _reference_patched(lm, b, corr, {(src, dst)})
                torch.testing.assert_close(ours[keep], ref[keep], atol=1e-4, rtol=0)
        half = torch.rand(g.shape, generator=torch.Generator().manual_seed(5)) < 0.5
        torch.testing.assert_close(run_with_patched_edges(lm, b, corr, half, g, clean_run=clean_run)[keep],
                                   run_with_patched_edges(lm, b, corr, half, g)[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_device_map_load_patches_and_attributes_alike(name):
    """`load_model(device_map=...)` (accelerate's placement; here every module on the CPU, the one device these
    machines have) gives the node outputs, patched runs and EAP-IG scores of a model loaded on a device."""
    from summcircuit.attribute import attribute
    from summcircuit.models import load_model
    plain = load_model(name, device="cpu")
    layers = "transformer.h" if name == "tiny-gpt2" else "model.layers"
    per_layer = {f"{layers}.{l}": "cpu" for l in range(plain.spec.n_layers)}
    for device_map in ("auto", {"": "cpu"}, per_layer | {"": "cpu"}):
        mapped = load_model(name, device_map=device_map)
        b = padded_batch(plain); corr = corrupted_copy(b, 0, 30)
        keep = b.attention_mask.bool()
        torch.testing.assert_close(node_outputs(mapped, b), node_outputs(plain, b), atol=1e-6, rtol=0)
        g = Graph(plain.spec)
        mask = torch.rand(g.shape, generator=torch.Generator().manual_seed(1)) < 0.3
        torch.testing.assert_close(run_with_patched_edges(mapped, b, corr, mask, g)[keep],
                                   run_with_patched_edges(plain, b, corr, mask, g)[keep], atol=1e-5, rtol=0)
        for stream in (False, True):
            a = attribute(mapped, [(b, corr)], "eap-ig", ig_steps=2, progress=False, stream_scores=stream)
            torch.testing.assert_close(a.scores, attribute(plain, [(b, corr)], "eap-ig", ig_steps=2, progress=False).scores,
                                       atol=1e-5, rtol=1e-4)
