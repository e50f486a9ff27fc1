"""Faults a demanding user meets (issue 12): each test reproduces a failure of the code before the fix and checks
the message and that nothing finished was deleted or changed (the run folder hashed before and after).

The pipeline tests use the stand-in stage notebooks of `tests/test_pipeline.py` (seconds per run, no model)."""
import hashlib, math, os, re, subprocess, sys, time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import test_pipeline as tp  # noqa: E402

from summcircuit.core import load_json, save_json
from summcircuit.cli import main
from summcircuit.core import project_root
from summcircuit.pipeline import STAGES, load_config, stage_named, stage_parameters, write_stage_notebook

ROOT = project_root(Path(__file__).parent)
BOOKKEEPING = {"pipeline.json", "config.json", ".lock"}

FINETUNE = (tp.COMMON + "max_steps = 4\ncheckpoint_every = 2\nlearning_rate = 1e-4\nfail = False\n",
            tp.PRELUDE + """log('finetune', max_steps=max_steps, learning_rate=learning_rate, lr_type=type(learning_rate).__name__)
assert not fail, 'fine-tuning was asked to fail'
cks = []
for step in range(0, max_steps + 1, checkpoint_every):
    path = model if step == 0 else f'checkpoint-{step}'
    if step:
        d = folder / 'finetune' / path; d.mkdir(parents=True, exist_ok=True)
        (d / 'config.json').write_text('{}'); (d / 'model.safetensors').write_bytes(bytes(range(256)) * 64)
    cks.append({'step': step, 'path': path, 'val_loss': 5.0 - step / 10})
write('finetune/checkpoints.json', cks)""")


@pytest.fixture
def project(tmp_path, monkeypatch):
    "The stand-in repository of test_pipeline, its fine-tuning stand-in with a learning rate, a failure switch and real bytes."
    (tmp_path / "settings.ini").write_text("[DEFAULT]\n")
    for name, (params, body) in {**tp.FAKES, "stages/finetune.ipynb": FINETUNE}.items():
        write_stage_notebook(tmp_path / "nbs" / name, params, body, title=name)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "fake.yaml").write_text(tp.CONFIG)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "executions.log"))
    monkeypatch.delenv("SUMMCIRCUIT_RUNS", raising=False)
    return tmp_path


def folder_hash(folder: Path, skip=BOOKKEEPING) -> dict[str, str]:
    "Content hash of every file of a folder (bookkeeping of the pipeline itself left out)."
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip and ".stale" not in p.parts
            and not p.name.endswith(".failed.ipynb")}


def run(*args: str) -> int: return tp.run(*args)


# 1. `summcircuit report RUN --out FOLDER` -------------------------------------------------------------------------------

def fake_run(folder: Path) -> Path:
    "A finished-looking run folder: its record, an executed notebook, a 'checkpoint'."
    import nbformat
    (folder / "finetune" / "checkpoint-2").mkdir(parents=True)
    (folder / "finetune" / "checkpoint-2" / "model.safetensors").write_bytes(os.urandom(4096))
    save_json(folder / "finetune" / ".done.json", {"key": "k"})
    nb = nbformat.v4.new_notebook(); nb.cells = [nbformat.v4.new_markdown_cell("# Fine-tuning\n> stand-in")]
    nbformat.write(nb, str(folder / "finetune.ipynb"))
    save_json(folder / "pipeline.json", {"config": {"name": "r", "model": "tiny-llama", "dataset": "synthetic"},
              "jobs": [{"stage": "finetune", "job": "finetune", "title": "Fine-tuning", "status": "ran",
                        "executed": "finetune.ipynb"}]})
    return folder


def test_report_never_deletes_a_folder_it_did_not_make(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runf = fake_run(tmp_path / "runs" / "r")
    before = folder_hash(tmp_path / "runs", skip=set())
    assert main(["report", str(runf), "--out", str(runf)]) == 2               # the run itself
    err = capsys.readouterr().err
    assert "holds a run" in err and str(runf) in err and len(err.strip().splitlines()) == 1
    assert main(["report", str(runf), "--out", str(tmp_path / "runs")]) == 2  # a folder holding runs
    assert "holds a run" in capsys.readouterr().err
    mine = tmp_path / "mine"; mine.mkdir(); (mine / "thesis.tex").write_text("years of work")
    assert main(["report", str(runf), "--out", str(mine)]) == 2               # somebody else's folder
    assert "was not made by `summcircuit report`" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert folder_hash(tmp_path / "runs", skip=set()) == before
    # `run` refuses such an --out before computing anything
    assert main(["run", "--config", "smoke", "--runs-root", str(tmp_path / "runs"), "--out", str(mine)]) == 2
    assert not (tmp_path / "runs" / "smoke").exists()


@pytest.mark.timeout(600)
def test_report_renders_beside_the_old_site_and_replaces_it_only_on_success(tmp_path, monkeypatch):
    from summcircuit import report
    monkeypatch.chdir(tmp_path)
    runf = fake_run(tmp_path / "runs" / "r")
    site = tmp_path / "site"
    assert main(["report", str(runf), "--out", str(site), "--renderer", "nbconvert"]) == 0
    assert (site / report.SITE_MARKER).exists() and (site / "index.html").exists()
    old = folder_hash(site, skip=set())
    def broken(folder, out):
        Path(out).mkdir(parents=True); (Path(out) / "index.html").write_text("half")
        raise RuntimeError("the renderer crashed")
    monkeypatch.setattr(report, "render_offline", broken)
    with pytest.raises(RuntimeError, match="crashed"):
        report.render_report([runf], site, renderer="nbconvert")
    assert folder_hash(site, skip=set()) == old                               # the old site is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_proc", "runs", "site"]   # no temporary folder left


# 2. `--set` values validated before anything is cleared; nothing deleted before its replacement succeeded ---------------

@pytest.mark.parametrize("setting, message", [
    ("finetune.max_steps=abc", "finetune.max_steps='abc' is not allowed: finetune.ipynb takes an integer"),
    ("finetune.max_steps=2.5", "finetune.max_steps=2.5 is not allowed"),
    ("diff.n_examples=true", "diff.n_examples=True is not allowed"),
    ("device=gpu", "device='gpu' is not allowed: use auto, cpu, cuda, cuda:N (N a GPU number) or mps"),
    ("seed=abc", "seed='abc' is not allowed"),
    ("checkpoints=[]", "checkpoints=[] is not allowed: use all, ends or a non-empty list"),
    ("finetune.max_steps=0", "finetune.max_steps=0 is not allowed: max_steps is a whole number >= 1"),
    ("finetune.learning_rate=-1e-4", "finetune.learning_rate=-0.0001 is not allowed: learning_rate is a number > 0"),
])
def test_bad_set_values_are_refused_before_anything_is_cleared(project, capsys, setting, message):
    assert run() == 0
    n, before = len(tp.executions(project)), folder_hash(tp.folder_of(project))
    capsys.readouterr()
    assert run("--set", setting) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert len(tp.executions(project)) == n                                   # nothing ran
    assert folder_hash(tp.folder_of(project)) == before                       # nothing cleared or changed


def test_numbers_in_yaml_12_style_are_numbers(project, capsys):
    assert run("--set", "finetune.learning_rate=5e-5") == 0
    assert tp.executions(project)[0]["learning_rate"] == 5e-5 and tp.executions(project)[0]["lr_type"] == "float"
    (project / "configs" / "lr.yaml").write_text(tp.CONFIG.replace("name: fake", "name: lr").replace(
        "{max_steps: 4, checkpoint_every: 2}", "{max_steps: 4, checkpoint_every: 2, learning_rate: 1e-4}"))
    assert load_config("lr").stage_params("finetune")["learning_rate"] == 1e-4
    assert load_config("fake", ["finetune.learning_rate='5e-5'"]).stage_params("finetune")["learning_rate"] == "5e-5"


def test_the_real_notebooks_parameters_are_typed_and_both_configurations_pass():
    for name in ("default", "smoke"):
        cfg = load_config(name, configs_dir=ROOT / "configs")
        for stage in STAGES:
            try: stage_parameters(stage, cfg, ROOT / "nbs")
            except Exception as e:
                assert type(e).__name__ == "StageNotReady", (name, stage.name, e)
    cfg = load_config("smoke", ["finetune.max_steps=abc"], configs_dir=ROOT / "configs")
    with pytest.raises(ValueError, match=r"finetune.max_steps='abc' is not allowed: finetune.ipynb takes an integer or null"):
        stage_parameters(stage_named("finetune"), cfg, ROOT / "nbs")
    for setting, message in (("circuits.corruption=blur", "use one of swap, mask, counterfactual"),
                             ("circuits.method=acdc", "use one of eap, eap-corrupted, eap-ig, eap-ig-activations"),
                             ("circuits.fractions=[0.5,2]", "each in (0, 1]"), ("diff.n_random=0", ">= 1")):
        cfg = load_config("default", [setting], configs_dir=ROOT / "configs")
        with pytest.raises(ValueError, match=re.escape(message)):
            stage_parameters(stage_named(setting.split(".")[0]), cfg, ROOT / "nbs")
    cfg = load_config("smoke", ["finetune.learning_rate=abc"], configs_dir=ROOT / "configs")
    with pytest.raises(ValueError, match=r"takes a number or null"):
        stage_parameters(stage_named("finetune"), cfg, ROOT / "nbs")


def test_a_failing_rerun_with_new_parameters_puts_the_old_results_back(project, capsys):
    assert run() == 0
    before = folder_hash(tp.folder_of(project))
    capsys.readouterr()
    assert run("--set", "finetune.max_steps=2", "--set", "finetune.fail=true") == 1
    out, err = capsys.readouterr()
    assert "moved the old results aside" in out and "cleared" not in out
    failed = tp.folder_of(project) / "finetune.failed.ipynb"
    assert "fine-tuning was asked to fail" in err and str(failed) in err and failed.exists()
    assert folder_hash(tp.folder_of(project)) == before                       # checkpoints and notebook restored
    assert not (tp.folder_of(project) / ".stale").exists()
    assert run("--set", "finetune.max_steps=2") == 0                           # succeeds: the old results go
    assert not (tp.folder_of(project) / "finetune" / "checkpoint-4").exists()
    assert not (tp.folder_of(project) / ".stale").exists() and not failed.exists()


# 3. a diverged fine-tune ---------------------------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_fine_tuning_stops_at_the_first_non_finite_loss_and_keeps_finite_checkpoints(tmp_path):
    import torch
    from summcircuit.data import synthetic_examples
    from summcircuit.finetune import TrainingConfig, TrainingDiverged, finetune, load_checkpoints
    from summcircuit.models import load_model
    cfg = TrainingConfig(max_source_tokens=64, batch_size=2, max_steps=6, checkpoint_every=1, learning_rate=1e30,
                         warmup_steps=0)
    folder = tmp_path / "r" / "finetune"
    with pytest.raises(TrainingDiverged) as info:
        finetune(load_model("tiny-llama", device="cpu"), synthetic_examples(6, seed=1), synthetic_examples(2, seed=2),
                 folder, cfg, progress=False)
    msg = str(info.value)
    assert "Stage finetune stopped at step" in msg and "diverged" in msg and "learning rate 1e+30" in msg
    assert "--set finetune.learning_rate=" in msg and "not marked done" in msg
    cks = load_checkpoints(tmp_path / "r")
    assert cks[-1].step < 6 and all(math.isfinite(c.val_loss) for c in cks)
    for ck in cks[1:]:                                                        # every kept checkpoint is finite
        from safetensors.torch import load_file
        assert all(torch.isfinite(t).all() for t in load_file(str(Path(ck.path) / "model.safetensors")).values())
    assert not (folder / "log_history.json").exists()


# 4. damaged artifacts ------------------------------------------------------------------------------------------------

def test_a_damaged_output_reruns_its_job_and_names_the_file(project, capsys):
    from summcircuit.core import file_fingerprint
    assert run() == 0
    folder = tp.folder_of(project)
    record = load_json(folder / "diff" / ".done.json").get("outputs", {})
    assert record["diff/results.json"] == file_fingerprint(folder / "diff" / "results.json")
    good = (folder / "diff" / "results.json").read_text()
    (folder / "diff" / "results.json").write_text(good[:5])                  # truncated
    ck = folder / "finetune" / "checkpoint-4" / "model.safetensors"
    ck.write_bytes(ck.read_bytes()[:100])
    n = len(tp.executions(project))
    capsys.readouterr()
    assert run() == 0
    out = capsys.readouterr().out
    assert "finetune/checkpoint-4/model.safetensors changed size" in out and "diff/results.json changed size" in out
    assert [e["stage"] for e in tp.executions(project)[n:]] == ["finetune", "diff"]   # same keys: the rest is done
    assert (folder / "diff" / "results.json").read_text() == good and len(ck.read_bytes()) == 256 * 64
    m = len(tp.executions(project))
    assert run() == 0 and len(tp.executions(project)) == m                    # verified again: all done


# 5. one process per run folder ---------------------------------------------------------------------------------------

def test_a_second_run_on_a_locked_folder_says_who_holds_it_and_exits(project, capsys):
    assert run() == 0
    folder = tp.folder_of(project)
    before = folder_hash(folder)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom summcircuit.core import folder_lock\n"
                               f"with folder_lock({str(folder)!r}, 'summcircuit run --config fake'):\n"
                               "    print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert run("--set", "diff.n_examples=5") == 2
        err = capsys.readouterr().err.strip()
        assert f"pid {holder.pid}" in err and "summcircuit run --config fake" in err and len(err.splitlines()) == 1
        assert folder_hash(folder) == before
    finally:
        holder.kill(); holder.wait()                                          # kill -9: the OS releases the lock
    assert run("--set", "diff.n_examples=5") == 0


# 6. smaller ones -----------------------------------------------------------------------------------------------------

def test_the_interrupt_hint_is_the_exact_command(project, capsys, monkeypatch):
    import summcircuit.cli as cli
    def interrupted(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(cli, "run_pipeline", interrupted)
    args = ["run", "--config", "fake", "--name", "n1", "--runs-root", str(project / "elsewhere"), "--set",
            "diff.n_examples=5", "--no-report"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert f"rerun `summcircuit run --config fake --name n1 --runs-root {project / 'elsewhere'} --set diff.n_examples=5 " \
           "--no-report` to resume" in err


def test_a_run_name_must_stay_inside_the_runs_folder(project, capsys):
    for name in ("../x", "a/b", ".hidden", ".."):
        assert run("--name", name) == 2
        err = capsys.readouterr().err.strip()
        assert f"name={name!r} is not allowed" in err and len(err.splitlines()) == 1
    assert not (project / "x").exists() and not (project / "runs").exists()
    assert tp.executions(project) == []


def test_a_malformed_configuration_and_a_read_only_run_folder_give_one_line(project, capsys, monkeypatch):
    (project / "configs" / "broken.yaml").write_text("name: broken\nmodel: [tiny-llama\ndataset: synthetic\n")
    assert main(["run", "--config", "broken", "--no-report"]) == 2
    err = capsys.readouterr().err.strip()
    assert "broken.yaml is not valid YAML (line" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert run() == 0
    folder = tp.folder_of(project)
    before = folder_hash(folder)
    if os.geteuid() == 0:                                                     # root writes anywhere: simulate it
        import summcircuit.pipeline as pl
        def read_only(folder, command=""): raise PermissionError(13, "Permission denied", str(Path(folder) / ".lock"))
        monkeypatch.setattr(pl, "folder_lock", read_only, raising=False)
    else:
        for p in [folder, *folder.rglob("*")]: p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        capsys.readouterr()
        assert run("--set", "diff.n_examples=5") == 2
        err = capsys.readouterr().err.strip()
        assert "Permission denied" in err and "read-only" in err and len(err.splitlines()) == 1
    finally:
        for p in [folder, *folder.rglob("*")]: p.chmod(0o755 if p.is_dir() else 0o644)
    assert folder_hash(folder) == before


def test_verifying_a_finished_run_is_cheap(project):
    "Rerun of a finished run: every job's outputs verified; the time goes into the test log."
    assert run() == 0
    t0 = time.perf_counter()
    from summcircuit.pipeline import plan_stage
    cfg = load_config("fake")
    keys, n = {}, 0
    for stage in STAGES:
        jobs = plan_stage(stage, cfg, tp.folder_of(project), project / "nbs", keys)
        for job in jobs: assert job.is_done(), job.id; n += 1
        from summcircuit.core import content_hash
        keys[stage.name] = content_hash(sorted(j.key for j in jobs))
    print(f"planned and verified {n} jobs in {time.perf_counter() - t0:.2f} s")


# 3 (rest). NaN weights, a non-finite metric, NaN scores --------------------------------------------------------------

@pytest.fixture
def tiny_pairs():
    from summcircuit.corrupt import build_pairs
    from summcircuit.data import synthetic_examples
    from summcircuit.models import load_model
    lm = load_model("tiny-gpt2", device="cpu")
    return lm, build_pairs(synthetic_examples(3, 3, seed=5), lm.tokenizer, max_length=lm.spec.n_ctx, progress=False)


def test_attribution_stops_on_nan_weights_and_a_non_finite_metric(tiny_pairs):
    import torch
    from summcircuit.attribute import attribute
    lm, pairs = tiny_pairs
    def nan_metric(logits, batch, clean_logits): return torch.full((len(batch),), float("nan"))
    with pytest.raises(ValueError, match=r"Stage attribution: the metric is not finite \(NaN/inf\) on documents \['syn-5-"):
        attribute(lm, pairs, method="eap", progress=False, metric=nan_metric)
    lm.hf.lm_head.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"Stage attribution: the model tiny-gpt2 has NaN/inf weights in 1 tensors \(transformer.wte.weight\)"
                                         r".*diverged training.*lower learning rate"):
        attribute(lm, pairs, method="eap-ig", ig_steps=2, progress=False)


def test_circuit_selection_and_circuit_metrics_refuse_nan(tiny_pairs):
    import torch
    from summcircuit.circuits import circuit_metrics, greedy_circuit, patch_batches, top_n_circuit
    from summcircuit.graph import Graph
    lm, pairs = tiny_pairs
    graph = Graph(lm.spec)
    scores = torch.randn(graph.shape)
    scores.view(-1)[graph.edges.flatten().nonzero()[:3, 0]] = float("nan")
    for select in (top_n_circuit, greedy_circuit):
        with pytest.raises(ValueError, match=r"3 edge scores are NaN: the attribution failed \(NaN weights or an empty target\?\)"):
            select(scores, graph, 5)
    lm.hf.lm_head.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"The metric is not finite on 3 pairs: NaN weights or a pair without target tokens"):
        circuit_metrics(lm, patch_batches(lm, pairs), graph.edges, graph)


# 4 (rest). Results come from this run's recorded jobs, never from a folder listing ---------------------------------

CIRCUITS = (tp.COMMON + "checkpoint = None\nstep = 0\nevolution = False\nevolution_steps = None\n",
            tp.PRELUDE + "log('circuits', step=step, evolution=evolution, evolution_steps=evolution_steps)\n"
                         "write(f'circuits/step-{step}/circuit.json', {'step': step, 'nodes': [f'a{step}.h0'], "
                         "'layer_profile': [0.0, 1.0], 'n_edges': 1})")


def test_stale_circuits_of_an_earlier_checkpoints_choice_are_never_read(project):
    from summcircuit.lora import circuit_selection_of_run
    from summcircuit.core import Run
    import summcircuit.circuits  # noqa: F401  (adds Run.circuits)
    write_stage_notebook(project / "nbs" / "stages" / "circuits.ipynb", *CIRCUITS, title="circuits.ipynb")
    assert run() == 0                                                          # checkpoints: all -> steps 0, 2, 4
    folder = tp.folder_of(project)
    save_json(folder / "circuits" / "step-99" / "circuit.json", {"step": 99, "nodes": ["a9.h9"], "layer_profile": [0, 1]})
    save_json(folder / "circuits" / "step-99" / ".done.json", {"key": "of an old run"})
    assert run("--set", "checkpoints=[0, 2]") == 0                             # step-4 (and step-99) now stale
    last = [e for e in tp.executions(project) if e["stage"] == "circuits"][-1]
    assert last["evolution"] and last["evolution_steps"] == [0, 2]             # the stage compares this run's steps only
    run_ = Run.load(folder)
    assert sorted(run_.circuits()) == [0, 2]
    assert circuit_selection_of_run(folder, mode="heads") == [(2, 0)]          # not step-99's or step-4's heads


def test_a_failed_final_diff_is_shown_as_failed_never_replaced(tmp_path):
    from summcircuit.core import Run
    from summcircuit.report import evolution_page, headline_findings, home_page
    folder = fake_run(tmp_path / "runs" / "r")
    share = {"share_heads_lower_entropy": {"raw": {"share": 0.9, "ci_low": 0.8, "ci_high": 0.95}}, "critical_layers": [7]}
    save_json(folder / "diff_checkpoints" / "step-2" / "diff" / "results.json", {"diff": share})
    save_json(folder / "diff_checkpoints" / "step-2" / ".done.json", {"key": "k2"})
    save_json(folder / "diff" / "results.json", {"diff": {**share, "critical_layers": [9]}})   # of an earlier run
    record = load_json(folder / "pipeline.json")
    record["jobs"] += [{"stage": "diff_checkpoints", "job": "diff_checkpoints_step-2", "title": "Diff: step 2",
                        "status": "ran", "step": 2, "key": "k2"},
                       {"stage": "diff", "job": "diff", "title": "Differential analysis", "status": "failed", "step": 4,
                        "reason": "CUDA out of memory"}]
    save_json(folder / "pipeline.json", record)
    run_ = Run.load(folder)
    assert list(run_.diffs()) == [2]
    findings = "\n".join(headline_findings(run_))
    assert "**Differential analysis** (base vs final): failed (CUDA out of memory); no finding is shown in its place" in findings
    assert "Attention entropy" not in findings and "[7]" not in findings and "[9]" not in findings
    assert "failed (CUDA out of memory)" in "\n".join(c.source for c in home_page(run_, {}).cells)
    assert "Differential analysis: failed (CUDA out of memory)" in "\n".join(c.source for c in evolution_page(run_, {}).cells)
    from summcircuit.lora import critical_layers_of_run       # the bake-off never targets a stale analysis's layers
    with pytest.raises(ValueError, match=r"differential analysis of this run failed \(CUDA out of memory\)"):
        critical_layers_of_run(folder)
    record["jobs"][-1].update(status="ran", key="kd"); save_json(folder / "pipeline.json", record)
    save_json(folder / "diff" / ".done.json", {"key": "kd"})
    assert critical_layers_of_run(folder) == [9]


# 7 (rest). Smaller ones ----------------------------------------------------------------------------------------------

def test_a_model_folder_without_tokenizer_files_is_refused(tmp_path):
    from summcircuit.models import load_model, tiny_model
    tiny_model("tiny-gpt2").save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=r"has model weights but no tokenizer files \(none of \('tokenizer.json', "
                                                r"'vocab.json'.*tokenizer.save_pretrained"):
        load_model(str(tmp_path / "m"), device="cpu")


def test_load_examples_refuses_n_0_and_an_unknown_split():
    from summcircuit.data import load_examples
    for n in (0, -1):
        with pytest.raises(ValueError, match=r"n must be >= 1 or None"): load_examples("synthetic", "train", n=n)
    with pytest.raises(ValueError, match=r"Synthetic split 'dev' does not exist: use one of \('train', 'val', 'test'\)"):
        load_examples("synthetic", "dev")


def test_a_prompt_longer_than_the_context_is_refused_naming_the_document():
    from summcircuit.data import SummaryExample, build_prompt, collate
    from summcircuit.graph import node_outputs
    from summcircuit.models import load_model
    lm = load_model("tiny-gpt2", device="cpu")
    long = SummaryExample("long-doc", ["Ada found a red kite at home by the lake."] * 40, "Ada found a kite.")
    with pytest.raises(ValueError, match=r"Document 'long-doc': prompt of \d+ tokens .* exceeds the model's context of 1024; lower max_source_tokens"):
        build_prompt(long, lm.tokenizer, max_source_tokens=4000, max_length=lm.spec.n_ctx)
    batch = collate([build_prompt(long, lm.tokenizer, max_source_tokens=4000)], lm.tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=r"Document 'long-doc': prompt of \d+ tokens exceeds the model's context of 1024; "
                                         r"build prompts with build_prompt\(..., max_length=lm.spec.n_ctx\)"):
        node_outputs(lm, batch)


def test_a_truncated_artifact_error_names_the_file(tmp_path):
    import torch
    from summcircuit.core import load_tensors, save_tensors
    path = save_tensors(tmp_path / "scores.safetensors", {"scores": torch.randn(50, 50)})
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"Artifact {path} is damaged"): load_tensors(path)
    (tmp_path / "results.json").write_text('{"diff": {"critical')
    with pytest.raises(ValueError, match=f"Artifact {tmp_path / 'results.json'} is damaged"): load_json(tmp_path / "results.json")


def test_diff_and_rouge_stop_on_nan_weights_and_an_empty_target(tiny_pairs):
    "The differential analysis, its causal check and ROUGE name their stage on NaN weights; an empty target is named."
    import dataclasses
    from conftest import corrupted_copy, padded_batch
    from summcircuit.data import synthetic_examples
    from summcircuit.diff import causal_check, differential_analysis
    from summcircuit.evaluate import evaluate_rouge
    from summcircuit.models import load_model
    lm, pairs = tiny_pairs
    clean = padded_batch(lm)
    empty = dataclasses.replace(clean, target_mask=clean.target_mask.clone())
    empty.target_mask[1] = False                                   # document 1 has no summary tokens
    with pytest.raises(ValueError, match=r"Stage differential analysis \(causal check\): the metric is not finite .*empty target"):
        causal_check(lm, [(empty, corrupted_copy(empty, 0, 10))], [0], [(0, 0)], n_random=1, progress=False)
    broken = load_model("tiny-gpt2", device="cpu")
    broken.hf.lm_head.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"Stage differential analysis: the model tiny-gpt2 has NaN/inf weights"):
        differential_analysis(lm, broken, [p.clean for p in pairs], progress=False)
    with pytest.raises(ValueError, match=r"Stage differential analysis \(causal check\): the model tiny-gpt2 has NaN/inf weights"):
        causal_check(broken, [(clean, corrupted_copy(clean, 0, 10))], [0], [(0, 0)], n_random=1, progress=False)
    with pytest.raises(ValueError, match=r"Stage ROUGE evaluation: the model tiny-gpt2 has NaN/inf weights"):
        evaluate_rouge(broken, synthetic_examples(2), progress=False)


def test_bakeoff_training_that_diverges_stops_with_the_fix():
    "A bake-off variant whose validation loss goes non-finite stops, naming the stage and the learning rate to lower."
    from summcircuit.data import synthetic_examples
    from summcircuit.lora import BakeoffConfig, train_lora
    from summcircuit.models import load_model
    lm = load_model("tiny-gpt2", device="cpu")
    cfg = BakeoffConfig(max_source_tokens=64, batch_size=2, max_steps=2, eval_every=1, patience=5, learning_rate=1e30)
    with pytest.raises(ValueError, match=r"Stage PEFT bake-off: training diverged \(validation loss .* at step \d+\); "
                                         r"lower the bake-off's learning rate \(the stage's bakeoff_learning_rate; now 1e\+30\)"):
        train_lora(lm, synthetic_examples(4), synthetic_examples(2, seed=1), layers=[0], rank=2, cfg=cfg, progress=False)


def test_report_staging_folder_is_never_wiped(tmp_path):
    "The folder the report stages its pages in (`proc`) is replaced only when an earlier staging made it."
    from summcircuit.report import stage_site
    mine = tmp_path / "notes"; mine.mkdir(); (mine / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"proc .*notes is not empty and was not made by `summcircuit report`"):
        stage_site([], mine)
    assert (mine / "mine.txt").read_text() == "keep me"
