"""Circuit selection, pruning, faithfulness and evolution against independent computations."""

import pytest
import torch
from transformers import LlamaConfig

from conftest import corrupted_copy, padded_batch
from reference_forward import reference_forward
from summcircuit.circuits import (Baselines, area, baselines, circuit_metric, compare_circuits, faithfulness,
                                  greedy_circuit, patch_batches, prune, top_n_circuit)
from summcircuit.data import summary_logprob
from summcircuit.graph import Graph
from summcircuit.models import arch_spec


@pytest.fixture
def graph():
    return Graph(arch_spec(LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=16)))


def owner_names(graph, d):
    "Names of the nodes that read destination d (by name, independent of destination_owners)."
    name = graph.destination_names[d]
    if name == "logits": return {"logits"}
    if name.startswith("m"): return {name}
    layer, rest = name[1:].split(".", 1)
    idx = int(rest[2:rest.index("<")]) if rest.startswith("kv") else int(rest[1:rest.index("<")])
    if rest.startswith("kv"):
        gs = graph.spec.group_size
        return {f"a{layer}.h{h}" for h in range(idx * gs, (idx + 1) * gs)}
    return {f"a{layer}.h{idx}"}


def prune_by_names(edges, graph):
    "Iterative pruning on a set of (source name, destination index) pairs."
    edges = set(edges)
    while True:
        sends = {u for u, _ in edges}
        receives = {o for _, d in edges for o in owner_names(graph, d)}
        keep = {(u, d) for u, d in edges if (u == "input" or u in receives)
                and ("logits" in owner_names(graph, d) or owner_names(graph, d) & sends)}
        if keep == edges: return edges
        edges = keep


def as_names(mask, graph):
    return {(graph.source_names[u], d) for u, d in mask.nonzero().tolist()}


@pytest.mark.parametrize("seed", range(5))
def test_prune_matches_name_based_pruning(graph, seed):
    g = torch.Generator().manual_seed(seed)
    c = (torch.rand(graph.edges.shape, generator=g) < 0.02) & graph.edges
    assert as_names(prune(c, graph), graph) == prune_by_names(as_names(c, graph), graph)


@pytest.mark.parametrize("seed", range(3))
def test_top_n_selects_largest_then_prunes(graph, seed):
    scores = torch.randn(graph.edges.shape, generator=torch.Generator().manual_seed(seed))
    n = 50
    ranked = sorted(((abs(scores[u, d].item()), u, d) for u, d in graph.edges.nonzero().tolist()), reverse=True)[:n]
    raw = torch.zeros_like(graph.edges)
    for _, u, d in ranked: raw[u, d] = True
    assert torch.equal(top_n_circuit(scores, graph, n), prune(raw, graph))
    signed = top_n_circuit(scores, graph, n, absolute=False)
    assert (scores[signed] > 0).all()                       # the top signed scores of 50 random edges are positive


def test_greedy_edges_reach_the_logits(graph):
    scores = torch.randn(graph.edges.shape, generator=torch.Generator().manual_seed(0))
    c = greedy_circuit(scores, graph, 60)
    edges = as_names(c, graph)
    # breadth-first search backwards from the logits over the circuit's edges
    reach, frontier = {"logits"}, {"logits"}
    while frontier:
        new = {u for u, d in edges if owner_names(graph, d) & frontier} - reach
        reach |= new; frontier = new
    assert all(u in reach for u, _ in edges)
    assert 0 < len(edges) <= 60


def test_faithfulness_against_reference(ref_lm):
    "f of a random circuit equals the ratio computed from the plain-torch forward with the same patching."
    lm = ref_lm
    clean = padded_batch(lm)
    corr = corrupted_copy(clean, 0, 30)
    g = Graph(lm.spec)
    circuit = (torch.rand(g.edges.shape, generator=torch.Generator().manual_seed(3)) < 0.3) & g.edges
    batches = patch_batches(lm, [(clean, corr)])
    base = baselines(lm, batches, g)
    f = faithfulness(circuit_metric(lm, batches, circuit, g), base)

    src_keys = [("input",)] + [k for l in range(lm.spec.n_layers)
                               for k in [("head", l, h) for h in range(lm.spec.n_heads)] + [("mlp", l)]]
    dest_index = {name: i for i, name in enumerate(g.destination_names)}
    def key_to_dest(key):
        if key == ("logits",): return dest_index["logits"]
        if key[0] == "mlp": return dest_index[f"m{key[1]}"]
        tag = f"a{key[1]}.h{key[2]}<q>" if key[0] == "q" else f"a{key[1]}.kv{key[2]}<{key[0]}>"
        return dest_index[tag]
    with torch.no_grad():
        zc = reference_forward(lm.hf, corr.input_ids, corr.attention_mask)["node_outputs"]
        def metric(mask):
            def dest_input(dst, upstream):
                d = key_to_dest(dst)
                return sum(v if mask[src_keys.index(s), d] else zc[s] for s, v in upstream.items())
            logits = reference_forward(lm.hf, clean.input_ids, clean.attention_mask, dest_input=dest_input)["logits"]
            return summary_logprob(logits, clean).mean().item()
        m_full, m_empty, m_c = metric(g.edges), metric(torch.zeros_like(g.edges)), metric(circuit)
    assert base.full == pytest.approx(m_full, abs=1e-4) and base.empty == pytest.approx(m_empty, abs=1e-4)
    assert f == pytest.approx((m_c - m_empty) / (m_full - m_empty), abs=1e-3)
    assert abs(m_full - m_empty) > 1e-3


def test_area_is_a_trapezoid():
    assert area([0, 0.5, 1], [0, 0.5, 1]) == pytest.approx(0.5)
    assert area([0.1, 1.0], [1, 1]) == pytest.approx(0.9)


def test_compare_circuits_against_sets(graph):
    rng = torch.Generator().manual_seed(0)
    scores = torch.randn(graph.edges.shape, generator=rng)
    a = greedy_circuit(scores, graph, 40)
    b = greedy_circuit(scores + 0.7 * torch.randn(graph.edges.shape, generator=rng), graph, 40)
    assert a.any() and b.any() and not torch.equal(a, b)
    ea, eb = as_names(a, graph), as_names(b, graph)
    nodes = lambda es: {u for u, _ in es} | {o for _, d in es for o in owner_names(graph, d)} - {"logits"}
    na, nb = nodes(ea), nodes(eb)
    out = compare_circuits(a, b, graph)
    assert out["edge_jaccard"] == pytest.approx(len(ea & eb) / len(ea | eb))
    assert out["node_jaccard"] == pytest.approx(len(na & nb) / len(na | nb))
    persisting = (na & nb) | {"input", "logits"}
    changed = ea ^ eb
    among = [(u, d) for u, d in changed if u in persisting and owner_names(graph, d) & persisting]
    assert out["edges_changed"] == len(changed)
    assert out["share_changed_among_persisting_nodes"] == pytest.approx(len(among) / len(changed))


def test_faithfulness_refuses_a_corruption_that_changes_nothing():
    with pytest.raises(ValueError, match="undefined"):
        faithfulness(-1.0, Baselines(-2.0, -2.0))


@pytest.mark.slow
def test_circuits_stage_at_one_checkpoint_compares_nothing(tmp_path):
    "The stage's evolution with a single checkpoint that has a circuit: viewers are written, no comparison is attempted."
    import papermill
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "circuits.ipynb"
    papermill.execute_notebook(str(root / "nbs" / "stages" / "circuits.ipynb"), str(out), cwd=str(root / "nbs"),
                               parameters={"evolution": True, "compare_setups": False, "check_robustness": False},
                               kernel_name="python3", language="python", progress_bar=False)
    assert "Only step 0 has a circuit: nothing to compare across checkpoints." in out.read_text()
