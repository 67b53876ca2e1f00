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


# --- every task's spec runs from the CLI

@pytest.fixture(scope="module")
def text_specs(tmp_path_factory):
    from tests.distill.hf_factories import (SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir,
                                            synthetic_language, tiny_bert_classifier, tiny_gpt2)

    root = tmp_path_factory.mktemp("cli-text")
    tokenizer = make_word_tokenizer(SYNTHETIC_WORDS)
    save_model_dir(tiny_gpt2(tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=32), tokenizer, root / "lm")
    save_model_dir(tiny_bert_classifier(tokenizer, num_labels=2, num_hidden_layers=2, hidden_size=32,
                                        num_attention_heads=2, intermediate_size=64), tokenizer, root / "bert")
    sentences = synthetic_language(30, seed=5)
    (root / "text.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": " ".join(s.split()[:3]),
                                                            "completion": "x"}) + "\n" for s in sentences))
    (root / "labels.jsonl").write_text("".join(json.dumps({"text": s, "label": int(" and " in s)}) + "\n"
                                               for s in sentences))
    hp = {"epochs": 2, "batch_size": 8}
    specs = {
        "causal_lm": {"task": "causal_lm", "teacher": {"path": "lm"}, "training_file": "text.jsonl",
                      "student": {"derive": {"num_layers": 1}}, "teacher_signal": {"top_k": 4}},
        "sequence": {"task": "causal_lm", "method": "sequence", "teacher": "lm", "training_file": "prompts.jsonl",
                     "student": {"derive": {"num_layers": 1}}, "generation": {"max_new_tokens": 4}},
        "text_classification": {"task": "text_classification", "teacher": "bert", "training_file": "labels.jsonl",
                                "student": {"derive": {"layers": [1]}}},
    }
    for name, spec in specs.items():
        (root / f"{name}.json").write_text(json.dumps({**spec, "hyperparameters": hp, "validation_split": 0.25}))
    return root


@pytest.mark.parametrize("name", ["causal_lm", "sequence", "text_classification"])
def test_run_every_text_task_with_checkpoints(text_specs, tmp_path, name):
    out = tmp_path / "out"
    proc = _distill("run", text_specs / f"{name}.json", "--out", out, "--device", "cpu",
                    "--checkpoint-interval", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for epoch in (1, 2):  # every task's epoch record has train_loss and validation_loss
        line = next(line for line in proc.stdout.splitlines() if line.startswith(f"[epoch {epoch}]"))
        assert "train_loss=" in line and "validation_loss=" in line
    assert (out / "final" / "config.json").is_file() and (out / "final" / "README.md").is_file()
    card = (out / "final" / "README.md").read_text()
    assert str(text_specs) not in card  # the card names files, never a server path


def test_negative_checkpoint_interval_is_refused(workspace, tmp_path):
    spec = _write_spec(workspace, "cli_interval.json", epochs=1)
    proc = _distill("run", spec, "--out", tmp_path / "out", "--checkpoint-interval", "-1", cwd=tmp_path)
    assert proc.returncode == 2 and "checkpoint-interval" in proc.stderr
