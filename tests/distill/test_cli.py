"""The ``distill`` CLI in a real subprocess: ``python -m distill run SPEC --out DIR``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _distill(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models; keeps the child fast on a busy CPU
    return subprocess.run([sys.executable, "-m", "distill", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _write_spec(workspace, name, **hyperparameters) -> Path:
    path = workspace.root / name  # relative file paths in the spec resolve against this folder
    path.write_text(json.dumps(workspace.spec_dict(**hyperparameters)))
    return path


def test_run_writes_final_model(workspace, tmp_path):
    spec = _write_spec(workspace, "cli_ok.json", epochs=2)
    out = tmp_path / "out"
    proc = _distill("run", spec, "--out", out, "--device", "cpu", cwd=tmp_path)  # cwd is not the spec's folder
    assert proc.returncode == 0, proc.stderr
    model = out / "final" / "model.safetensors"
    assert model.is_file()
    assert "[stage] training" in proc.stdout and "[epoch 2]" in proc.stdout
    summary = json.loads(proc.stdout[proc.stdout.index("\n{") + 1:])
    assert Path(summary["model"]) == model
    assert summary["evaluation"]["validation_rows"] == workspace.n_val

    from distill.models import load_model  # the file the CLI wrote is a valid model file
    assert load_model(model).architecture.hidden_dims == [8]


def test_bad_spec_exits_nonzero_naming_the_param(workspace, tmp_path):
    param = "hyperparameters.epochs"
    spec = _write_spec(workspace, "cli_bad.json", epochs=0)
    out = tmp_path / "out"
    proc = _distill("run", spec, "--out", out, "--device", "cpu", cwd=tmp_path)
    assert proc.returncode != 0
    assert param in proc.stderr
    assert "invalid_spec" in proc.stderr
    assert not (out / "final").exists()


# --- the same entry point in-process (a subprocess costs a torch import each) -------------------------


def test_quiet_prints_only_the_summary(workspace, tmp_path, capsys, fast_latency):
    from distill.cli import main

    spec = _write_spec(workspace, "cli_quiet.json", epochs=1)
    assert main(["run", str(spec), "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "[stage]" not in stdout
    assert json.loads(stdout)["evaluation"]["validation_rows"] == workspace.n_val


def test_engine_error_exit_code_and_message(workspace, tmp_path, capsys):
    from distill.cli import main

    data = workspace.spec_dict(epochs=1)
    data["teacher"] = {"path": str(workspace.teacher_path)}
    data["validation_file"] = str(workspace.val_csv)
    data["training_file"] = "no-such-file.csv"  # resolves against tmp_path, where the spec is
    (tmp_path / "spec.json").write_text(json.dumps(data))
    assert main(["run", str(tmp_path / "spec.json"), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error [invalid_dataset]") and "cannot read the dataset file" in err


def test_unreadable_spec_exits_nonzero(tmp_path, capsys):
    from distill.cli import main

    (tmp_path / "broken.json").write_text("{not json")
    assert main(["run", str(tmp_path / "broken.json"), "--out", str(tmp_path / "out")]) == 2
    assert "broken.json" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.json"), "--out", str(tmp_path / "out")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_missing_out_is_a_usage_error(capsys):
    from distill.cli import main

    with pytest.raises(SystemExit) as info:
        main(["run", "spec.json"])
    assert info.value.code == 2 and "--out" in capsys.readouterr().err
