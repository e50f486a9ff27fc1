"""EAP-IG graph JSON and MIB submissions: the published layout (written out here from its rules), round trips."""
import json

import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from summcircuit.graph import Graph
from summcircuit.interop import from_eap_json, load_eap_json, save_eap_json, to_eap_json, write_mib_submission
from summcircuit.models import arch_spec


def published_layout(n_layers, n_heads):
    "Edge and node names as EAP-IG's Graph.from_model builds them (sequential attention and MLP), from its rules."
    residual, edges = ["input"], []
    for l in range(n_layers):
        heads = [f"a{l}.h{h}" for h in range(n_heads)]
        edges += [f"{u}->{h}<{x}>" for u in residual for h in heads for x in "qkv"]
        residual = residual + heads
        edges += [f"{u}->m{l}" for u in residual]
        residual = residual + [f"m{l}"]
    edges += [f"{u}->logits" for u in residual]
    return edges, residual + ["logits"]


SPECS = {
    "gpt2-like": arch_spec(GPT2Config(n_layer=3, n_head=4, n_embd=32, vocab_size=100)),
    "llama-gqa": arch_spec(LlamaConfig(num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, hidden_size=48,
                                       intermediate_size=64, vocab_size=100)),
    "smollm2": arch_spec(LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                                     intermediate_size=1536, vocab_size=100)),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_names_and_sizes_follow_the_published_layout(name):
    spec = SPECS[name]
    g = Graph(spec)
    d = to_eap_json(torch.zeros(g.shape), g)
    edges, nodes = published_layout(spec.n_layers, spec.n_heads)
    assert set(d["edges"]) == set(edges) and len(d["edges"]) == len(edges)
    assert set(d["nodes"]) == set(nodes)
    assert d["cfg"] == {"n_layers": spec.n_layers, "n_heads": spec.n_heads, "parallel_attn_mlp": False, "d_model": spec.d_model}
    assert all(set(e) == {"score", "in_graph"} for e in d["edges"].values())
    if name == "smollm2": assert len(edges) == 123_211            # MIB's ungrouped count for SmolLM2-135M


@pytest.mark.parametrize("name", ["gpt2-like", "llama-gqa"])
def test_round_trip_and_the_ungrouped_scores(name, tmp_path):
    spec = SPECS[name]
    g = Graph(spec)
    torch.manual_seed(1)
    scores = torch.randn(g.shape) * g.edges
    circuit = (torch.rand(g.shape) < 0.2) & g.edges
    path = save_eap_json(tmp_path / "graph.json", scores, g, circuit)
    back_scores, back_circuit = load_eap_json(path, spec)
    torch.testing.assert_close(back_scores, scores, atol=1e-6, rtol=0)
    assert torch.equal(back_circuit, circuit)
    d = json.loads(path.read_text())
    n = spec.n_heads // spec.n_kv_heads
    for h in range(spec.n_heads):        # query head h reads shared key/value head h // n (repeat_kv); its share of the score
        want = scores[g.mlp_source(0), g.k_destination(1, h // n)].item() / n
        assert d["edges"][f"m0->a1.h{h}<k>"]["score"] == pytest.approx(want, abs=1e-6)
        assert d["edges"][f"m0->a1.h{h}<q>"]["score"] == pytest.approx(scores[g.mlp_source(0), g.q_destination(1, h)].item(), abs=1e-6)
    sending = {u for u in range(g.n_sources) if circuit[u].any()}
    names = ["input"] + [x for l in range(spec.n_layers) for x in [f"a{l}.h{h}" for h in range(spec.n_heads)] + [f"m{l}"]]
    assert {k for k, v in d["nodes"].items() if v["in_graph"]} == {names[u] for u in sending} | {"logits"}


def test_bad_imports_say_why():
    g = Graph(SPECS["llama-gqa"])
    d = to_eap_json(torch.zeros(g.shape), g)
    with pytest.raises(ValueError, match="4 layers and 4 heads; this one has 3 and 6"):
        from_eap_json({**d, "cfg": {**d["cfg"], "n_layers": 4, "n_heads": 4}}, SPECS["llama-gqa"])
    with pytest.raises(ValueError, match="not in this model's graph"):
        from_eap_json({**d, "edges": {**d["edges"], "m2->a0.h0<q>": {"score": 1.0, "in_graph": True}}}, SPECS["llama-gqa"])
    with pytest.raises(ValueError, match="keys \\['edges'\\] are missing"):
        from_eap_json({"cfg": d["cfg"], "nodes": d["nodes"]}, SPECS["llama-gqa"])


def test_mib_submission_sizes(tmp_path):
    "Nine circuits, each within its share of MIB's ungrouped edge count, plus the importance scores."
    spec = SPECS["llama-gqa"]
    g = Graph(spec)
    scores = torch.randn(g.shape, generator=torch.Generator().manual_seed(2)) * g.edges
    out = write_mib_submission(tmp_path, "summary", "smollm2", scores, g)
    assert out.name == "summary_smollm2"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 10 and "importances.json" in files
    for share in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5):
        edges = json.loads((out / f"edges_{share * 100:g}pct.json").read_text())["edges"]
        kept = sum(e["in_graph"] for e in edges.values())
        assert kept <= share * len(edges), (share, kept, len(edges))
    big = json.loads((out / "edges_50pct.json").read_text())["edges"]
    assert sum(e["in_graph"] for e in big.values()) > 0.3 * len(big)      # the budget is used, not just respected
    with pytest.raises(ValueError, match="may not contain '_'"):
        write_mib_submission(tmp_path, "my_task", "m", scores, g)


def test_mib_circuits_of_a_planted_path(tmp_path):
    """Scores that plant input -> logits (3) and input -> m0 -> logits (2 each) over noise: each circuit keeps what fits
    of them. MIB's graph of this model has 496 edges (`published_layout`), so 0.1 and 0.2 % allow none, 0.5 % two."""
    spec = SPECS["llama-gqa"]
    g = Graph(spec)
    n_mib = len(published_layout(spec.n_layers, spec.n_heads)[0])
    assert n_mib == 496
    scores = torch.randn(g.shape, generator=torch.Generator().manual_seed(3)) * 0.01 * g.edges
    scores[0, g.logits_destination] = 3.0
    scores[0, g.mlp_destination(0)] = scores[g.mlp_source(0), g.logits_destination] = 2.0
    out = write_mib_submission(tmp_path, "summary", "tiny", scores, g)
    kept = {share: {k for k, e in json.loads((out / f"edges_{share * 100:g}pct.json").read_text())["edges"].items() if e["in_graph"]}
            for share in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)}
    planted = {"input->logits", "input->m0", "m0->logits"}
    assert kept[0.001] == kept[0.002] == set()                  # a budget under one edge keeps none
    assert kept[0.005] == {"input->logits"}                     # two edges allowed: the path of one
    assert kept[0.01] == planted                                # four allowed: both paths, no noise
    for share in (0.02, 0.05, 0.1, 0.2, 0.5):
        assert planted <= kept[share] and len(kept[share]) <= share * n_mib, share
