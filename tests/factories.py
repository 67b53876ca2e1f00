"""Small, real inputs the tests build themselves: a trained teacher MLP and its data files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from distill.models import export_mlp


def clusters(rows: int, features: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian class clusters: separable enough that a teacher learns them, noisy enough to be soft."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=torch.Generator().manual_seed(1234)) * 2.0
    labels = torch.randint(0, classes, (rows,), generator=generator)
    return centers[labels] + torch.randn(rows, features, generator=generator), labels


def train_teacher(x: torch.Tensor, y: torch.Tensor, hidden: list[int], classes: int, steps: int = 300) -> torch.nn.Module:
    torch.manual_seed(0)
    widths = [x.shape[1], *hidden]
    layers: list[torch.nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(widths[-1], classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def write_csv(path: Path, x: torch.Tensor, y: torch.Tensor | None) -> Path:
    header = [f"x{i}" for i in range(x.shape[1])] + (["label"] if y is not None else [])
    lines = [",".join(header)]
    for i, row in enumerate(x.tolist()):
        cells = [f"{v:.5f}" for v in row] + ([str(int(y[i]))] if y is not None else [])
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Problem:
    teacher: Path
    train_csv: Path  # unlabeled transfer set
    val_csv: Path  # labeled
    features: int
    classes: int
    val_x: torch.Tensor
    val_y: torch.Tensor


def make_problem(folder: Path, features: int = 8, classes: int = 3, rows: int = 600, hidden=(64, 64)) -> Problem:
    folder.mkdir(parents=True, exist_ok=True)
    x, y = clusters(rows, features, classes, seed=1)
    val_x, val_y = clusters(rows // 4, features, classes, seed=2)
    teacher = train_teacher(x, y, list(hidden), classes)
    export_mlp(teacher, folder / "teacher.safetensors")
    return Problem(teacher=folder / "teacher.safetensors", train_csv=write_csv(folder / "train.csv", x, None),
                   val_csv=write_csv(folder / "val.csv", val_x, val_y), features=features, classes=classes,
                   val_x=val_x, val_y=val_y)


# ---- language models ----------------------------------------------------------------------------------------

def train_language_model(model, tokenizer, documents: list[str], steps: int = 300, block: int = 64,
                         batch: int = 16, lr: float = 2e-3):
    """A short next-token training run (eos-separated documents packed into blocks, as the engine
    packs them) so the teacher has structure worth distilling."""
    ids = [t for s in documents for t in tokenizer(s).input_ids + [tokenizer.eos_token_id]]
    blocks = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = blocks[torch.randint(0, len(blocks), (batch,), generator=generator)]
        loss = model(input_ids=rows, labels=rows).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def train_classifier(model, tokenizer, texts: list[str], labels: list[int], steps: int = 80, lr: float = 3e-3):
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    targets = torch.tensor(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(0, len(texts), (16,), generator=generator)
        loss = model(input_ids=encoded.input_ids[rows], attention_mask=encoded.attention_mask[rows],
                     labels=targets[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tar_dir(source: Path, archive: Path, extra: dict[str, bytes] | None = None) -> Path:
    """A .tar.gz of a model directory (under one top folder), with optional extra raw entries."""
    import io
    import tarfile

    with tarfile.open(archive, "w:gz") as tar:
        for file in sorted(source.iterdir()):
            tar.add(file, arcname=f"model/{file.name}")
        for name, content in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return archive


@dataclass
class LanguageProblem:
    folder: Path
    teacher_dir: Path
    teacher_archive: Path
    train_jsonl: Path
    val_jsonl: Path
    prompts_jsonl: Path
    held_out: list[str]


def make_language_problem(folder: Path) -> LanguageProblem:
    from tests.distill.hf_factories import SYNTHETIC_WORDS, make_word_tokenizer, save_model_dir, synthetic_language, tiny_gpt2

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_word_tokenizer(SYNTHETIC_WORDS, with_chat_template=True)
    sentences = synthetic_language(600, seed=0)
    corpus = synthetic_language(1600, seed=3)  # the teacher's own (larger) training text, same format
    documents = [" ".join(corpus[i:i + 4]) for i in range(0, len(corpus), 4)]
    teacher = train_language_model(tiny_gpt2(tokenizer, n_layer=4, n_embd=64, n_head=4), tokenizer, documents)
    teacher_dir = save_model_dir(teacher, tokenizer, folder / "teacher")
    train = [{"text": " ".join(sentences[i:i + 4])} for i in range(0, 400, 4)]
    val = [{"text": " ".join(sentences[i:i + 4])} for i in range(400, 480, 4)]
    prompts = [{"prompt": " ".join(s.split()[:3]), "completion": " ".join(s.split()[3:])} for s in sentences[480:540]]
    held_out = [" ".join(s) for s in zip(*[iter(synthetic_language(40, seed=99))] * 4)]
    return LanguageProblem(folder=folder, teacher_dir=teacher_dir,
                           teacher_archive=tar_dir(teacher_dir, folder / "teacher.tar.gz"),
                           train_jsonl=write_jsonl(folder / "train.jsonl", train),
                           val_jsonl=write_jsonl(folder / "val.jsonl", val),
                           prompts_jsonl=write_jsonl(folder / "prompts.jsonl", prompts), held_out=held_out)
