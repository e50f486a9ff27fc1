"""The circuit viewer in headless Chromium, offline: drawn node and edge counts, the slider, the diff view's counts
against compare_circuits. Screenshots go to test-artifacts/."""
import html, re

import pytest
import torch
from transformers import LlamaConfig

from test_report import ARTIFACTS, CHROMIUM, chromium
from summcircuit.circuits import circuit_nodes, compare_circuits, top_n_circuit
from summcircuit.graph import Graph
from summcircuit.models import arch_spec
from summcircuit.viewer import circuit_page, diff_page

OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000"]
SPEC = arch_spec(LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                             intermediate_size=64, vocab_size=100))


def body_data(dom: str) -> dict:
    "The `data-*` attributes the page's script wrote onto <body>."
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    return {k: html.unescape(v) for k, v in re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1))}


def circuits(graph):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(graph.shape, generator=g) * graph.edges
    later = scores + 2.0 * torch.randn(graph.shape, generator=g) * graph.edges
    return scores, top_n_circuit(scores, graph, 150), later, top_n_circuit(later, graph, 150)


@pytest.mark.slow
@pytest.mark.parametrize("schema", ["none", "roles"])
def test_viewer_draws_the_circuit_and_its_slider_filters_edges(tmp_path, schema):
    graph = Graph(SPEC, schema)
    scores, circuit, _, _ = circuits(graph)
    page = tmp_path / "circuit.html"
    page.write_text(circuit_page(circuit, scores, graph, "test circuit"))
    assert not re.search(r'<(script|link|img)[^>]+(src|href)="?https?:', page.read_text())   # nothing fetched
    data = body_data(chromium([*OFFLINE, "--dump-dom", page.as_uri() + "#selftest"]))
    logits = int(graph.stacked(circuit)[:, :, graph.logits_destination].any(1).sum())
    assert int(data["edges"]) == int(circuit.sum())                                   # every circuit edge drawn
    assert int(data["nodes"]) == int(circuit_nodes(circuit, graph).sum()) + logits    # every node instance, + logits
    before, after = map(int, data["selftest"].split("->"))
    assert before == int(circuit.sum()) and 0 < after < before                        # the slider hides edges
    if schema == "roles":
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "viewer-circuit.png"
        chromium([*OFFLINE, "--window-size=1280,900", f"--screenshot={shot}", page.as_uri()])
        assert shot.exists() and shot.stat().st_size > 10_000


@pytest.mark.slow
def test_diff_view_counts_equal_compare_circuits(tmp_path):
    graph = Graph(SPEC, "roles")
    scores, a, later, b = circuits(graph)
    page = tmp_path / "diff.html"
    page.write_text(diff_page(a, b, scores, later, graph, ("step 0", "step 8")))
    data = body_data(chromium([*OFFLINE, "--dump-dom", page.as_uri()]))
    cmp = compare_circuits(a, b, graph)
    kept, added, removed = (int(data[f"edges-{k}"]) for k in ("kept", "added", "removed"))
    assert added + removed == cmp["edges_changed"] and added > 0 and removed > 0
    assert kept / (kept + added + removed) == pytest.approx(cmp["edge_jaccard"])
    persisting, entering, leaving = (int(data[f"nodes-{k}"]) for k in ("persisting", "entering", "leaving"))
    assert persisting / (persisting + entering + leaving) == pytest.approx(cmp["node_jaccard"])
    assert int(data["edges"]) == kept + added + removed                             # the canvas draws the union
    shot = ARTIFACTS / "viewer-diff.png"
    ARTIFACTS.mkdir(exist_ok=True)
    chromium([*OFFLINE, "--window-size=1280,900", f"--screenshot={shot}", page.as_uri()])
    assert shot.exists() and shot.stat().st_size > 10_000


def test_chromium_is_there():
    "make test installs it; without it the browser tests above could not fail."
    import os
    assert os.path.exists(CHROMIUM)
