"""Execute the library chapters in place so that they keep their outputs (tables, printed values, figures) and read
on GitHub as they read in Jupyter. `make chapters` runs every chapter; `python scripts/execute_chapters.py
nbs/06_graph.ipynb` one. Cells run as `nbdev_test --flags slow` runs them (same shell, same folder); an error stops
that chapter and leaves its file as it was. Noise is not kept: stderr (warnings, progress bars), progress widgets,
and any output still over `--max-kb` after figures are re-encoded with 256 colours (and scaled down if need be)."""
import argparse, base64, io, json, os, sys, time
from pathlib import Path

from PIL import Image

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from nbdev.process import NBProcessor

CHAPTERS = "[0-9]*.ipynb"            # library chapters; nbs/stages/ holds the pipeline's notebooks, run by the pipeline
WIDGET = "application/vnd.jupyter.widget-view+json"
MAX_KB = 120                          # the largest single output a chapter keeps


def skipped(cell) -> bool:
    "The cells `nbdev_test --flags slow` does not run: markdown, `#| eval: false`, `#| notest`, and the export call."
    if cell.cell_type != "code" or "nbdev_export" + "(" in cell.source: return True
    directives = getattr(cell, "directives_", {}) or {}
    return directives.get("eval:", [""])[0].lower() == "false" or "notest" in directives


def shrink_png(output: dict, max_bytes: int) -> dict:
    """A figure over `max_bytes`, re-encoded with 256 colours (matplotlib's plots lose nothing visible) and, if it is
    still too large, scaled down by quarters until it fits (at most three times); other outputs as they are."""
    png = output.get("data", {}).get("image/png")
    if png is None or len(json.dumps(output)) <= max_bytes: return output
    image = Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")
    for _ in range(4):
        buffer = io.BytesIO()
        image.quantize(256).save(buffer, format="PNG", optimize=True)
        data = base64.b64encode(buffer.getvalue()).decode()
        if len(data) <= 0.9 * max_bytes: break
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
    return {**output, "data": {**output["data"], "image/png": data}}


def kept(output: dict, max_bytes: int) -> bool:
    "Whether an output is worth keeping in the source notebook."
    if output.get("output_type") == "stream" and output.get("name") == "stderr": return False
    if WIDGET in output.get("data", {}): return False
    return len(json.dumps(output)) <= max_bytes


def describe(output: dict) -> str:
    "What an output is, in a few words, for the log of what was dropped."
    kinds = output.get("name") or ", ".join(output.get("data", {})) or output.get("output_type")
    return f"{output.get('output_type')} ({kinds}), {len(json.dumps(output)) / 1024:.0f} KB"


def execute_chapter(path: Path, max_bytes: int) -> tuple[int, int]:
    "Run the chapter at `path` and write it back with its small outputs; returns (cells with output, outputs dropped)."
    nb = NBProcessor(path, process=True).nb
    shell = CaptureShell(path)
    cwd = os.getcwd()
    os.chdir(path.parent)
    try: shell.run_all(nb, exc_stop=True, preproc=skipped)
    finally: os.chdir(cwd)
    source = read_nb(path)                  # the file as saved, without the directives nbdev parsed out
    with_output = dropped = 0
    for cell, ran in zip(source.cells, nb.cells):
        if cell.cell_type != "code": continue
        outputs = [shrink_png(o, max_bytes) for o in ran.get("outputs", [])]
        small = [o for o in outputs if kept(o, max_bytes)]
        for o in outputs:
            if not kept(o, max_bytes): print(f"  dropped: {describe(o)}")
        dropped += len(outputs) - len(small)
        cell["outputs"], cell["execution_count"] = small, None
        with_output += bool(small)
    write_nb(source, path)
    return with_output, dropped


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="chapters to execute (default: every nbs/NN_*.ipynb)")
    parser.add_argument("--max-kb", type=int, default=MAX_KB, help="drop any single output larger than this")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    paths = args.notebooks or sorted((root / "nbs").glob(CHAPTERS))
    os.environ.setdefault("IN_TEST", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    failed = []
    for path in paths:
        start = time.time()
        try: n, dropped = execute_chapter(path.resolve(), args.max_kb * 1024)
        except Exception as e:
            failed.append(path); print(f"{path}: FAILED ({type(e).__name__}: {str(e)[:300]}); file left as it was"); continue
        print(f"{path}: {n} cells with output, {dropped} outputs dropped, {time.time() - start:.0f} s", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
