"""The pipeline machinery on stand-in stage notebooks: which jobs run, which are skipped, what a changed parameter
reruns, resuming after a failure, and the command's exit status and messages.

The stand-ins have the real stage notebooks' names and parameters, so the real stage table (`STAGES`) is what is
tested: the per-checkpoint expansion, sub-runs, the final-checkpoint parameter, the cache keys. Each stand-in
records its execution in a log file (`$FAKE_LOG`), which is the independent evidence of what ran; none loads a
model, so a run takes seconds. The real notebooks run in `tests/test_report.py` (the smoke run)."""
import json
from pathlib import Path

import nbformat
import pytest

from summcircuit.core import load_json
from summcircuit.cli import main
from summcircuit.pipeline import (STAGES, job_key, load_config, notebook_parameters, write_stage_notebook)

COMMON = "run_name = None\nmodel = 'm'\ndataset = 'd'\naspect = 'outcome'\ndevice = 'cpu'\nseed = 0\n"
PRELUDE = """import json, os
from pathlib import Path
folder = Path(os.environ['SUMMCIRCUIT_RUNS']) / run_name
def log(stage, **kw):
    print('fake progress', stage, flush=True)
    with open(os.environ['FAKE_LOG'], 'a') as f: f.write(json.dumps({'stage': stage, **kw}) + '\\n')
def write(rel, obj):
    p = folder / rel; p.parent.mkdir(parents=True, exist_ok=True); p.write_text(json.dumps(obj))
"""
FAKES = {
    "stages/finetune.ipynb": (COMMON + "max_steps = 4\ncheckpoint_every = 2\n",
        PRELUDE + """log('finetune', max_steps=max_steps)
cks = []
for step in range(0, max_steps + 1, checkpoint_every):
    path = model if step == 0 else f'checkpoint-{step}'
    if step: (folder / 'finetune' / path).mkdir(parents=True, exist_ok=True); (folder / 'finetune' / path / 'config.json').write_text('{}'); (folder / 'finetune' / path / 'model.safetensors').write_text('')
    cks.append({'step': step, 'path': path, 'val_loss': 5.0 - step / 10})
write('finetune/checkpoints.json', cks)"""),
    "stages/evaluate.ipynb": (COMMON + "checkpoints = 'ends'\nn_examples = None\n",
        PRELUDE + "log('evaluate', checkpoints=checkpoints)\nwrite('evaluate/done.json', checkpoints)"),
    "stages/corrupt.ipynb": (COMMON + "checkpoint = None\nn_examples = 8\n",
        PRELUDE + "log('corrupt', checkpoint=checkpoint)\nwrite('corrupt/summary.json', {'checkpoint': checkpoint})"),
    "stages/diff.ipynb": (COMMON + "checkpoint_a = None\ncheckpoint_b = None\nn_examples = 8\n",
        PRELUDE + "log('diff', run_name=run_name, checkpoint_b=checkpoint_b, n_examples=n_examples)\n"
                  "write('diff/results.json', {'checkpoint_b': checkpoint_b})"),
    "stages/circuits.ipynb": (COMMON + "checkpoint = None\nstep = 0\nevolution = False\n",
        PRELUDE + "import time\nstart = time.time(); time.sleep(float(os.environ.get('FAKE_SLEEP', 0)))\n"
                  "log('circuits', checkpoint=checkpoint, step=step, evolution=evolution, start=start, end=time.time(),\n"
                  "    threads=os.environ.get('OMP_NUM_THREADS'))\n"
                  "assert str(step) != os.environ.get('FAKE_FAIL_STEP'), f'asked to fail at step {step}'\n"
                  "write(f'circuits/step-{step}/circuit.json', {'checkpoint': checkpoint, 'step': step})"),
    "stages/peft.ipynb": (COMMON + "fail = False\nseeds = None\n",
        PRELUDE + "log('peft')\nif fail: raise ValueError('the bake-off was asked to fail')\nwrite('peft/done.json', True)"),
}
CONFIG = """name: fake
model: tiny-llama
dataset: synthetic
device: cpu
stages:
  finetune: {max_steps: 4, checkpoint_every: 2}
  diff: &diff {n_examples: 3}
  diff_checkpoints: *diff
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    "A repository with stand-in stage notebooks and a configuration, as the current folder."
    (tmp_path / "settings.ini").write_text("[DEFAULT]\n")
    for name, (params, body) in FAKES.items():
        write_stage_notebook(tmp_path / "nbs" / name, params, body, title=name)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "fake.yaml").write_text(CONFIG)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "executions.log"))
    monkeypatch.delenv("SUMMCIRCUIT_RUNS", raising=False)
    return tmp_path


def executions(project: Path) -> list[dict]:
    "What the stand-ins logged, in order."
    log = project / "executions.log"
    return [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []


def folder_of(project: Path) -> Path: return project / "runs" / "fake"


def run(*args: str) -> int:
    return main(["run", "--config", "fake", "--no-report", "--no-progress", *args])


def test_first_run_executes_every_job_with_the_right_parameters(project, capsys):
    assert run() == 0
    log = executions(project)
    assert [e["stage"] for e in log] == ["finetune", "evaluate", "corrupt", "diff", "diff", "circuits", "circuits",
                                        "circuits", "peft"]
    final = str(project / "runs" / "fake" / "finetune" / "checkpoint-4")
    assert log[2]["checkpoint"] == final                                # corrupt gets the final checkpoint
    assert log[3] == {"stage": "diff", "run_name": "fake", "checkpoint_b": final, "n_examples": 3}
    # base vs the intermediate checkpoint, as a sub-run with its results under diff_checkpoints/step-2/
    assert log[4]["run_name"] == "step-2" and log[4]["checkpoint_b"].endswith("checkpoint-2")
    sub = load_json(project / "runs/fake/diff_checkpoints/step-2/diff/results.json")
    assert sub["checkpoint_b"].endswith("checkpoint-2")
    assert [(Path(e["checkpoint"]).name, e["step"]) for e in log[5:8]] == [("tiny-llama", 0), ("checkpoint-2", 2), ("checkpoint-4", 4)]
    assert load_json(folder_of(project) / "circuits" / "step-2" / "circuit.json")["step"] == 2
    assert [e["evolution"] for e in log[5:8]] == [False, False, True]  # the comparison runs with the last checkpoint
    assert log[1]["checkpoints"] == "ends"                             # a fixed parameter of the stage table
    # every executed notebook and every record of success is in the run folder
    folder = project / "runs" / "fake"
    for nb in ["finetune", "evaluate", "corrupt", "diff", "diff_step-2",
               "circuits_step-0", "circuits_step-4", "peft"]:
        assert (folder / f"{nb}.ipynb").exists(), nb
    for done in ["finetune", "diff", "diff_checkpoints/step-2", "circuits/step-0", "circuits/step-4", "peft"]:
        assert load_json(folder / done / ".done.json")["key"]
    record = load_json(folder / "pipeline.json")
    assert [j["status"] for j in record["jobs"]] == ["ran"] * 9
    out = capsys.readouterr().out
    assert "[1/7] finetune" in out and "[7/7] peft" in out and "9 notebooks executed" in out


def test_rerun_skips_everything_and_a_changed_parameter_reruns_only_its_dependents(project, capsys):
    assert run() == 0
    n = len(executions(project))
    assert run() == 0
    assert len(executions(project)) == n                              # nothing executed again
    assert "0 notebooks executed, 9 already done" in capsys.readouterr().out
    assert run("--set", "diff.n_examples=5") == 0                      # diff (base vs final) and the bake-off read it
    assert [e["stage"] for e in executions(project)[n:]] == ["diff", "peft"]
    assert executions(project)[n]["n_examples"] == 5
    m = len(executions(project))
    assert run("--set", "diff.n_examples=5") == 0
    assert len(executions(project)) == m


def test_a_changed_fine_tuning_reruns_everything_and_clears_stale_checkpoints(project, capsys):
    assert run() == 0
    n = len(executions(project))
    assert run("--set", "finetune.max_steps=2") == 0
    later = [e["stage"] for e in executions(project)[n:]]
    assert later == ["finetune", "evaluate", "corrupt", "diff", "circuits", "circuits", "peft"]   # no step between 0 and 2
    folder = project / "runs" / "fake" / "finetune"
    assert not (folder / "checkpoint-4").exists()                     # results of the old parameters are gone
    assert "parameters changed (max_steps)" in capsys.readouterr().out


def test_a_failure_keeps_earlier_results_names_the_notebook_and_a_rerun_resumes(project, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_STEP", "2")                         # the circuit of step 2 crashes, this time
    assert run() == 1
    err = capsys.readouterr().err
    executed = project / "runs" / "fake" / "circuits_step-2.ipynb"
    assert "Stage 'circuits'" in err and str(executed) in err and "asked to fail at step 2" in err
    assert "Traceback" not in err
    nb = nbformat.read(str(executed), as_version=4)                  # the failed notebook is there, with the error
    assert any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert load_json(project / "runs/fake/diff/results.json")         # earlier stages' results are intact
    assert not (project / "runs/fake/circuits/step-2/.done.json").exists()
    assert not (project / "runs/fake/peft.ipynb").exists()         # nothing after the failure ran
    n = len(executions(project))
    monkeypatch.delenv("FAKE_FAIL_STEP")
    assert run() == 0                                                # the same command resumes where it stopped
    later = executions(project)[n:]
    assert [(e["stage"], Path(e.get("checkpoint") or "").name) for e in later] == \
        [("circuits", "checkpoint-2"), ("circuits", "checkpoint-4"), ("peft", "")]


def test_failure_of_the_last_stage_exits_non_zero(project, capsys):
    assert run("--set", "peft.fail=true") == 1
    err = capsys.readouterr().err
    assert "Stage 'peft'" in err and "the bake-off was asked to fail" in err
    assert str(project / "runs" / "fake" / "peft.ipynb") in err


def test_bad_configurations_are_refused_before_anything_runs(project, capsys):
    assert run("--set", "diff.n_exampels=5") == 2                     # a misspelled parameter
    err = capsys.readouterr().err
    assert "n_exampels" in err and "diff.ipynb has no such parameter" in err
    assert executions(project) == []                                  # nothing ran
    assert main(["run", "--config", "nothing", "--no-report"]) == 2
    assert "pass a configuration name (fake)" in capsys.readouterr().err
    (project / "configs" / "bad.yaml").write_text("name: bad\nmodel: m\ndataset: d\nlearning_rate: 1\n")
    assert main(["run", "--config", "bad", "--no-report"]) == 2
    assert "unknown setting(s) ['learning_rate']" in capsys.readouterr().err


def test_a_stage_whose_notebook_is_not_ready_is_skipped_with_its_dependents(project, capsys):
    nb = nbformat.read(str(project / "nbs" / "stages" / "circuits.ipynb"), as_version=4)
    nb.cells[1].metadata["tags"] = []                                  # a library notebook without parameters
    nbformat.write(nb, str(project / "nbs" / "stages" / "circuits.ipynb"))
    assert run() == 0
    assert [e["stage"] for e in executions(project)] == ["finetune", "evaluate", "corrupt", "diff", "diff"]
    out = capsys.readouterr().out
    assert "circuits: skipped, not ready" in out and "peft: skipped (needs circuits" in out
    assert run("--strict") == 2


def test_keys_depend_on_parameters_upstream_and_notebook_source_but_not_outputs(project):
    nb_path = project / "nbs" / "stages" / "diff.ipynb"
    run_folder = project / "runs" / "fake"
    base = job_key({"n": 1}, {"finetune": "a"}, nb_path, run_folder)
    assert job_key({"n": 1}, {"finetune": "a"}, nb_path, run_folder) == base
    assert job_key({"n": 2}, {"finetune": "a"}, nb_path, run_folder) != base
    assert job_key({"n": 1}, {"finetune": "b"}, nb_path, run_folder) != base
    # the same checkpoint, written relative or absolute under the run folder: one key (runs/ can move)
    assert job_key({"c": str(run_folder / "x")}, {}, nb_path, run_folder) == \
        job_key({"c": str(project / "elsewhere" / "fake" / "x")}, {}, nb_path, project / "elsewhere" / "fake")
    nb = nbformat.read(str(nb_path), as_version=4)
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", name="stdout", text="an output\n")]
    nb.metadata["something"] = 1
    nbformat.write(nb, str(nb_path))
    assert job_key({"n": 1}, {"finetune": "a"}, nb_path, run_folder) == base
    nb.cells[2].source += "\n# an edit"
    nbformat.write(nb, str(nb_path))
    assert job_key({"n": 1}, {"finetune": "a"}, nb_path, run_folder) != base


def test_the_real_stage_notebooks_take_the_parameters_the_configurations_set():
    "Every stage of both configurations exists in nbs/ with a parameters cell declaring what the configuration sets."
    from summcircuit.core import project_root
    root = project_root(Path(__file__).parent)
    for name in ("default", "smoke"):
        cfg = load_config(name, configs_dir=root / "configs")
        for stage in STAGES:
            declared = notebook_parameters(root / "nbs" / stage.notebook)
            if declared is None: continue                             # not a stage notebook yet: skipped by the pipeline
            assert "run_name" in declared, stage.notebook
            wanted = set(cfg.stage_params(stage.name)) | set(stage.fixed)
            assert wanted <= set(declared), (name, stage.name, wanted - set(declared))
            if stage.checkpoint_param: assert stage.checkpoint_param in declared, (stage.name, stage.checkpoint_param)


def test_keys_follow_the_library_modules_a_notebook_uses_transitively(tmp_path):
    "An edit to the code of a module the notebook imports, directly or through another module, changes the key; others and documentation do not."
    from summcircuit.pipeline import library_modules
    pkg = tmp_path / "pkg"; pkg.mkdir()
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f(): return 1\n")
    (pkg / "c.py").write_text("def g(): return 2\n")
    source = "from summcircuit.a import f\nf()"
    assert list(library_modules(source, pkg)) == ["a", "b"]
    before = library_modules(source, pkg)
    (pkg / "c.py").write_text("def g(): return 3\n")
    assert library_modules(source, pkg) == before
    (pkg / "b.py").write_text("def f(): return 4\n")
    assert library_modules(source, pkg) != before
    after = library_modules(source, pkg)
    (pkg / "b.py").write_text('"B."\ndef f():  # four\n    "Four."\n    return 4\n')
    assert library_modules(source, pkg) == after          # documenting the code (docstrings, comments) keeps the key


def test_live_progress_shows_what_the_notebooks_print(project, capfd):
    "--progress live (the default) streams each stage notebook's output to the terminal; --no-progress does not."
    assert main(["run", "--config", "fake", "--no-report", "--progress", "live"]) == 0
    seen = capfd.readouterr()
    assert "fake progress finetune" in seen.out + seen.err and "fake progress peft" in seen.out + seen.err
    assert main(["run", "--config", "fake", "--no-report", "--no-progress", "--set", "finetune.max_steps=6"]) == 0
    assert "fake progress" not in "".join(capfd.readouterr())


def test_jobs_run_a_stage_side_by_side_and_the_last_after(project, monkeypatch):
    """`--jobs 2`: the circuits of steps 0 and 2 overlap in time, each with half the CPU threads, and step 4 (which
    reads them) starts after both ended; a failure in one of them fails the run and keeps the other's result."""
    import os
    monkeypatch.setenv("FAKE_SLEEP", "3")
    assert run("--jobs", "2") == 0
    c = {e["step"]: e for e in executions(project) if e["stage"] == "circuits"}
    assert c[0]["start"] < c[2]["end"] and c[2]["start"] < c[0]["end"], c          # side by side
    assert c[4]["start"] >= max(c[0]["end"], c[2]["end"]), c                       # the evolution job waited
    assert c[0]["threads"] == c[2]["threads"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert load_json(folder_of(project) / "pipeline.json")["jobs"][-1]["status"] == "ran"
    # a failing side-by-side job: the run fails, names it, and the other job's result is kept and not rerun
    import shutil
    shutil.rmtree(folder_of(project) / "circuits")
    monkeypatch.setenv("FAKE_SLEEP", "0"); monkeypatch.setenv("FAKE_FAIL_STEP", "2")
    assert run("--jobs", "2") == 1
    assert (folder_of(project) / "circuits" / "step-0" / ".done.json").exists()
    monkeypatch.delenv("FAKE_FAIL_STEP")
    n = len(executions(project))
    assert run("--jobs", "2") == 0
    assert sorted(e["step"] for e in executions(project)[n:] if e["stage"] == "circuits") == [2, 4]
    assert run("--jobs", "0") == 2                                                  # refused with a message
