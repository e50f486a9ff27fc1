"""The library chapters read like fastcore's: every public definition is followed by a cell that shows and tests it,
public functions document their parameters inline (docments), and the chapters keep their small outputs
(`make chapters`) so they read on GitHub. These rules are checked here so that they stay."""
import ast, importlib.util, json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "nbs").glob("[0-9]*.ipynb"))
# Public definitions that cannot be shown cheaply in their chapter, and where they are tested instead.
TESTED_ELSEWHERE = {
    "execute_side_by_side": "each job is a fresh process that imports torch: tests/test_pipeline.py runs two jobs side by side",
}
spec = importlib.util.spec_from_file_location("execute_chapters", ROOT / "scripts" / "execute_chapters.py")
execute_chapters = importlib.util.module_from_spec(spec); spec.loader.exec_module(execute_chapters)


def code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def public_definitions(path: Path):
    "(definition node, its cell's source, the next code cell's source) for every public def/class of the chapter."
    cells = code_cells(path)
    for i, cell in enumerate(cells):
        src = source(cell)
        if not src.startswith("#| export"): continue
        following = source(cells[i + 1]) if i + 1 < len(cells) else ""
        for node in ast.parse(src).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                yield node, src, following


def shows(cell_source: str) -> bool:
    "Whether a cell can be the one that shows and tests a definition: code that runs and is seen (not exported, hidden or the export call)."
    return bool(cell_source.strip()) and not cell_source.startswith(("#| export", "#| hide")) and "nbdev_export(" not in cell_source


def undocumented_parameters(node: ast.FunctionDef, src: str) -> list[str]:
    "Parameters of a function with two or more that lack their own `#` comment on their line."
    args = [a for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            + [node.args.vararg, node.args.kwarg] if a is not None and a.arg not in ("self", "cls")]
    if len(args) < 2: return []
    lines = src.splitlines()
    rows = [a.lineno for a in args]
    return [a.arg for a in args if rows.count(a.lineno) > 1 or "#" not in lines[a.lineno - 1]]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_public_definitions_are_shown_and_tested(path):
    bare = [node.name for node, _, following in public_definitions(path)
            if not shows(following) and node.name not in TESTED_ELSEWHERE]
    assert not bare, (f"{path.name}: {bare} are followed by another export cell; put the cell that shows and tests "
                      f"each right after it")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_public_functions_document_their_parameters(path):
    missing = {}
    for node, src, _ in public_definitions(path):
        functions = [node] if isinstance(node, ast.FunctionDef) else [
            f for f in node.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("_")]
        for f in functions:
            if params := undocumented_parameters(f, src): missing[f.name] = params
    assert not missing, f"{path.name}: parameters without an inline comment (nbdev docments): {missing}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_keeps_small_outputs(path):
    outputs = [o for c in code_cells(path) for o in c.get("outputs", [])]
    assert outputs, f"{path.name} has no outputs: `make chapters CHAPTERS=nbs/{path.name}`, then commit it"
    limit = execute_chapters.MAX_KB * 1024
    for o in outputs:
        assert o["output_type"] != "error", f"{path.name} kept an error output: fix the chapter and rerun it"
        assert execute_chapters.kept(o, limit), f"{path.name} kept noise or an output over {execute_chapters.MAX_KB} KB"


def test_outputs_filter():
    "Warnings, progress bars and widgets go; printed values, tables and small figures stay."
    limit = 1000
    stdout = {"output_type": "stream", "name": "stdout", "text": "0.25\n"}
    stderr = {"output_type": "stream", "name": "stderr", "text": "100%|██████████| 3/3\n"}
    widget = {"output_type": "display_data", "data": {"application/vnd.jupyter.widget-view+json": {}, "text/plain": "x"}}
    table = {"output_type": "execute_result", "data": {"text/html": "<table></table>"}, "metadata": {}}
    big = {"output_type": "display_data", "data": {"image/png": "A" * 2000}, "metadata": {}}
    assert [execute_chapters.kept(o, limit) for o in (stdout, stderr, widget, table, big)] == [True, False, False, True, False]


def test_undocumented_parameters_finds_them():
    "The docments check itself: two parameters on one line, or one without a comment, are reported."
    src = ("def f(a: int,   # the first\n      b: int) -> int: return a + b\n"
           "def g(a, b): return a\n"
           "def h(a: int,   # the first\n      *, b: int = 0,   # the second\n     ) -> int: return a\n")
    f, g, h = ast.parse(src).body
    assert (undocumented_parameters(f, src), undocumented_parameters(g, src), undocumented_parameters(h, src)) == (["b"], ["a", "b"], [])


def test_large_figures_are_shrunk_not_dropped():
    "A figure over the limit is re-encoded (and scaled down) until it fits, keeping its aspect ratio; it stays a PNG."
    import base64, io
    import numpy as np
    from PIL import Image
    noise = (np.random.default_rng(0).random((300, 450, 3)) * 255).astype("uint8")    # incompressible, ~400 KB
    buffer = io.BytesIO(); Image.fromarray(noise).save(buffer, format="PNG")
    figure = {"output_type": "display_data", "data": {"image/png": base64.b64encode(buffer.getvalue()).decode(),
                                                       "text/plain": "<Figure>"}, "metadata": {}}
    limit = 120 * 1024
    assert not execute_chapters.kept(figure, limit)
    small = execute_chapters.shrink_png(figure, limit)
    assert execute_chapters.kept(small, limit)
    image = Image.open(io.BytesIO(base64.b64decode(small["data"]["image/png"])))
    assert image.format == "PNG" and image.width < 450 and abs(image.width / image.height - 1.5) < 0.02
    assert execute_chapters.shrink_png({"output_type": "stream", "name": "stdout", "text": "x"}, limit)["text"] == "x"


def test_shows_refuses_cells_that_show_nothing():
    assert [shows(s) for s in ("test_eq(f(1), 2)", "#| export\ndef g(): pass", "#| hide\nfrom x import y", "",
                               "import nbdev; nbdev.nbdev_export()")] == [True, False, False, False, False]
