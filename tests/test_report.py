"""The smoke run end to end, and its report checked in a headless browser.

`summcircuit run --config smoke` executes the real stage notebooks on a tiny model; its rerun must execute
nothing. The site rendered from it is opened page by page in headless Chromium (Debian's `chromium`, which
`make test` installs): every page loads with its title, every image has a non-zero size, every link between
pages resolves, and every figure file of the run is on the site. A screenshot of the home page is kept in
test-artifacts/report-home.png."""
import json, re, shutil, subprocess, tempfile, time
from pathlib import Path

import nbformat
import pytest

from summcircuit.core import load_json
from summcircuit.cli import main
from summcircuit.core import project_root
from summcircuit.pipeline import STAGES, notebook_parameters
from summcircuit.core import Run
from summcircuit.report import render_report, run_figures
from summcircuit.site import front_matter, site_pages

ROOT = project_root(Path(__file__).parent)
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic", "--hide-scrollbars"]
PROBE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images].map(i => ({alt: i.alt, w: i.naturalWidth, h: i.naturalHeight,
    shown: i.getBoundingClientRect().width, folded: !!i.closest('details:not([open])')}));
  const p = document.createElement('pre'); p.id = 'test-probe';
  p.textContent = JSON.stringify({title: document.title, images: images, h1: (document.querySelector('h1') || {}).textContent});
  document.body.appendChild(p);
});
</script>"""


def ready_stages() -> list[str]:
    "Stages whose notebook is a stage notebook (a parameters cell with run_name): the smoke run must run them all."
    out = []
    for s in STAGES:
        params = notebook_parameters(ROOT / "nbs" / s.notebook) if (ROOT / "nbs" / s.notebook).exists() else None
        if params and "run_name" in params: out.append(s.name)
    return out


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    "The smoke configuration run once through the command line (minutes), then run again (must be a no-op)."
    runs = tmp_path_factory.mktemp("runs")
    t0 = time.time()
    status = main(["run", "--config", "smoke", "--runs-root", str(runs), "--no-report", "--no-progress"])
    first = time.time() - t0
    assert status == 0, f"the smoke run failed: see {runs / 'smoke'}"
    t0 = time.time()
    status_again = main(["run", "--config", "smoke", "--runs-root", str(runs), "--no-report", "--no-progress"])
    return {"folder": runs / "smoke", "first_s": first, "again_s": time.time() - t0, "status_again": status_again}


@pytest.mark.slow
@pytest.mark.timeout(2400)                                  # the smoke run: minutes on two busy cores
def test_smoke_run_executes_every_ready_stage_and_the_rerun_nothing(smoke_run):
    record = load_json(smoke_run["folder"] / "pipeline.json")
    ran_stages = {j["stage"] for j in record["jobs"] if j["status"] in ("ran", "cached")}
    assert set(ready_stages()) <= ran_stages, set(ready_stages()) - ran_stages
    assert smoke_run["status_again"] == 0
    assert all(j["status"] == "cached" for j in record["jobs"] if j["stage"] in ready_stages())
    assert smoke_run["again_s"] < 60, smoke_run["again_s"]            # a rerun only checks keys
    cks = load_json(smoke_run["folder"] / "finetune" / "checkpoints.json")
    assert [c["step"] for c in cks] == [0, 2, 4]
    circuits = [j for j in record["jobs"] if j["stage"] == "circuits"]
    if "circuits" in ready_stages():                                   # one circuit job per checkpoint
        assert sorted(j["step"] for j in circuits) == [0, 2, 4]
    for j in record["jobs"]:                                           # every executed notebook is in the run folder
        if j["status"] != "skipped": assert (smoke_run["folder"] / j["executed"]).exists()
    print(f"smoke run: {smoke_run['first_s']:.0f} s, rerun {smoke_run['again_s']:.1f} s")


def _numbers(obj, path=""):
    "Every number in a JSON value, keyed by where it is."
    if isinstance(obj, dict): return {k: v for key, val in obj.items() for k, v in _numbers(val, f"{path}/{key}").items()}
    if isinstance(obj, list): return {k: v for i, val in enumerate(obj) for k, v in _numbers(val, f"{path}/{i}").items()}
    return {path: obj} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else {}


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_jobs_side_by_side_give_the_same_results(smoke_run, tmp_path):
    """The circuits jobs rerun with `--jobs 2` (steps 0 and 2 side by side, each with one CPU thread, then step 4,
    which reads them) write the numbers the one-at-a-time run wrote, up to float rounding."""
    runs = tmp_path / "runs"
    shutil.copytree(smoke_run["folder"], runs / "smoke")
    shutil.rmtree(runs / "smoke" / "circuits")
    assert main(["run", "--config", "smoke", "--runs-root", str(runs), "--no-report", "--no-progress", "--jobs", "2"]) == 0
    record = load_json(runs / "smoke" / "pipeline.json")
    assert {j["stage"] for j in record["jobs"] if j["status"] == "ran"} == {"circuits"}
    started = {s: load_json(runs / "smoke" / "circuits" / f"step-{s}" / ".started.json")["started"] for s in (0, 2, 4)}
    finished = {s: load_json(runs / "smoke" / "circuits" / f"step-{s}" / ".done.json")["finished"] for s in (0, 2, 4)}
    assert started[2] <= finished[0] and started[0] <= finished[2], (started, finished)     # they overlapped
    assert started[4] >= max(finished[0], finished[2])                                      # the last waited
    files = sorted(p.relative_to(smoke_run["folder"]) for p in (smoke_run["folder"] / "circuits").rglob("*.json")
                   if not p.name.startswith("."))
    assert files, "the smoke run wrote no circuit results"
    for rel in files:
        ours, theirs = _numbers(json.loads((runs / "smoke" / rel).read_text())), _numbers(json.loads((smoke_run["folder"] / rel).read_text()))
        assert ours.keys() == theirs.keys(), rel
        for k in ours:
            if isinstance(theirs[k], float) and theirs[k] != theirs[k]: assert ours[k] != ours[k], (rel, k); continue   # NaN
            assert abs(ours[k] - theirs[k]) <= 1e-4 + 1e-3 * abs(theirs[k]), (rel, k, ours[k], theirs[k])


def chromium(args: list[str], timeout: int = 120) -> str:
    assert Path(CHROMIUM).exists(), "headless Chromium is missing: `apt-get install chromium` (make test installs it)"
    with tempfile.TemporaryDirectory() as profile:
        res = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                             timeout=timeout)
    return res.stdout


@pytest.fixture(scope="module")
def site(smoke_run, tmp_path_factory):
    "The report of the smoke run (and a comparison with a copy of it under another name), rendered offline."
    base = tmp_path_factory.mktemp("report")
    other = base / "runs" / "smoke-copy"
    shutil.copytree(smoke_run["folder"], other)
    rec = load_json(other / "pipeline.json"); rec["config"]["name"] = "smoke-copy"
    (other / "pipeline.json").write_text(json.dumps(rec))
    out = render_report([smoke_run["folder"], other], base / "_site", renderer="nbconvert", root=ROOT, proc=base / "_proc")
    return {"out": out, "proc": base / "_proc", "run": Run.load(smoke_run["folder"])}


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_site_has_every_page_of_quarto_yml_and_every_figure(site):
    pages = [str(p.with_suffix(".html")) for p in site_pages(site["proc"])]
    for page in ["index.html", "evolution.html", "bakeoff.html", "figures.html", "compare.html", "api/00_core.html",
                 "stages/finetune.html", "stages/diff.html"]:
        assert page in pages and (site["out"] / page).exists(), page
    for job in site["run"].executed_jobs():
        assert (site["out"] / "stages" / f"{job['job']}.html").exists(), job["job"]
    figures_html = (site["out"] / "figures.html").read_text()
    figs = run_figures(site["run"])
    assert len(figs) >= 4                                             # loss curve, rouge, diff figures, ...
    for f in figs: assert f'alt="{f.relative_to(site["run"].folder)}"' in figures_html, f
    compare = (site["out"] / "compare.html").read_text()
    assert "smoke-copy" in compare and ">smoke<" in compare
    for html_file in site["out"].rglob("*.html"):                      # offline: nothing loaded from the network
        head = html_file.read_text()
        assert not re.search(r'<(script|link|img|iframe)[^>]+(src|href)="(https?:)?//', head), html_file


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_every_page_loads_in_headless_chromium_with_title_images_and_links(site, tmp_path):
    probe_site = tmp_path / "site"
    shutil.copytree(site["out"], probe_site)
    checked = 0
    for rel in site_pages(site["proc"]):
        page = probe_site / rel.with_suffix(".html")
        doc = page.read_text()
        page.write_text(doc.replace("</body>", PROBE + "</body>"))
        dom = chromium(["--virtual-time-budget=10000", "--dump-dom", page.as_uri()])
        m = re.search(r'<pre id="test-probe">(.*?)</pre>', dom, re.S)
        assert m, f"{rel}: the page did not finish loading in Chromium"
        probe = json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
        title = str(front_matter(nbformat.read(str(site["proc"] / rel), as_version=4))["title"])
        assert probe["title"] == f"{title} – summcircuit results", (rel, probe["title"])
        assert probe["h1"] and probe["h1"].strip() == title, (rel, probe["h1"])
        for img in probe["images"]:
            assert img["w"] > 0 and img["h"] > 0, (rel, img)             # the image decoded
            if not img["folded"]: assert img["shown"] > 0, (rel, img)    # and takes space on the page
        for href in re.findall(r'<a[^>]+href="([^"#]+)(?:#[^"]*)?"', doc):
            if re.match(r"^[a-z]+:", href): continue
            target = (page.parent / href).resolve()
            assert target.exists(), f"{rel}: link {href} leads nowhere"
        checked += 1
    assert checked >= 10
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report-home.png"
    shot.unlink(missing_ok=True)
    chromium(["--window-size=1280,900", f"--screenshot={shot}", (site["out"] / "index.html").as_uri()])
    assert shot.exists() and shot.stat().st_size > 10_000, "no screenshot of the home page"


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_home_page_reports_the_numbers_of_the_run(site):
    home = (site["out"] / "index.html").read_text()
    cks = load_json(site["run"].path("finetune", "checkpoints.json"))
    assert f"{cks[0]['val_loss']:.3f}" in home and f"{cks[-1]['val_loss']:.3f}" in home
    diff = site["run"].json("diff", "results.json")
    if diff is not None:
        share = diff["diff"]["share_heads_lower_entropy"]["raw"]
        assert f"{share['share']:.2f} (95% CI {share['ci_low']:.2f}–{share['ci_high']:.2f})" in home
        assert str(diff["diff"]["critical_layers"]) in home


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_circuit_viewers_are_on_the_site_linked_and_draw_the_saved_circuits(site):
    "The circuits stage's viewer pages reach the site, the evolution page links them, and each draws its checkpoint's circuit."
    import html as html_lib
    index = load_json(site["run"].path("circuits", "viewer", "index.json"))
    steps = sorted(site["run"].json("circuits", f"step-{s}", "circuit.json")["step"] for s in index["steps"])
    assert steps == sorted(index["steps"]) and len(steps) >= 2
    evolution = (site["out"] / "evolution.html").read_text()
    for page in index["pages"]:
        assert (site["out"] / "viewer" / page["page"]).exists(), page
        assert f'href="viewer/{page["page"]}"' in evolution, page
    for step in steps:
        dom = chromium(["--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000", "--dump-dom",
                        (site["out"] / "viewer" / f"step-{step}.html").as_uri()])
        body = re.search(r"<body([^>]*)>", dom).group(1)
        data = {k: html_lib.unescape(v) for k, v in re.findall(r'data-([a-z-]+)="([^"]*)"', body)}
        assert int(data["edges"]) == site["run"].json("circuits", f"step-{step}", "circuit.json")["n_edges"], step
