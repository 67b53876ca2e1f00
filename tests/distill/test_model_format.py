import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from distill.errors import ModelFormatError
from distill.models import (
    ARCHITECTURE_KEY,
    MLP,
    MLPArchitecture,
    export_mlp,
    load_model,
    read_architecture,
    save_model,
)


def _mlp(input_dim=5, hidden_dims=(7, 6), num_classes=3, activation="relu", seed=0) -> MLP:
    torch.manual_seed(seed)
    return MLP(MLPArchitecture(input_dim=input_dim, hidden_dims=list(hidden_dims), num_classes=num_classes,
                               activation=activation))


def _inputs(n, d, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _forward_from_file_by_hand(path, x: torch.Tensor) -> torch.Tensor:
    """What a consumer with only safetensors + torch does: read the metadata, chain the linears."""
    with safe_open(str(path), framework="pt") as handle:
        arch = json.loads(handle.metadata()["distill_architecture"])
        assert arch["kind"] == "mlp" and arch["activation"] == "relu"
        n_layers = len(arch["hidden_dims"]) + 1
        h = x
        for k in range(n_layers):
            h = F.linear(h, handle.get_tensor(f"layers.{k}.weight"), handle.get_tensor(f"layers.{k}.bias"))
            if k < n_layers - 1:
                h = torch.relu(h)
    return h


class SeedStyle(nn.Module):
    def __init__(self, a=10, b=20, c=2):
        super().__init__()
        self.fc1 = nn.Linear(a, b)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(b, c)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


def _valid_tensors(arch: MLPArchitecture) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in MLP(arch).state_dict().items()}


def _write_raw(path, tensors, architecture=None, metadata=None):
    meta = dict(metadata or {})
    if architecture is not None:
        meta[ARCHITECTURE_KEY] = architecture if isinstance(architecture, str) else json.dumps(architecture)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta or None)
    return path


ARCH = MLPArchitecture(input_dim=5, hidden_dims=[7, 6], num_classes=3)
ARCH_JSON = {"kind": "mlp", "input_dim": 5, "hidden_dims": [7, 6], "num_classes": 3, "activation": "relu"}


# --- round trip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden_dims,activation", [((7, 6), "relu"), ((), "relu"), ((4,), "tanh"), ((8, 8, 8), "gelu")])
def test_save_load_round_trip(tmp_path, hidden_dims, activation):
    model = _mlp(hidden_dims=hidden_dims, activation=activation).eval()
    path = save_model(model, tmp_path / "sub" / "m.safetensors")
    assert path.exists()

    loaded = load_model(path)
    assert isinstance(loaded, MLP) and not loaded.training
    assert loaded.architecture.to_dict() == model.architecture.to_dict()
    x = _inputs(11, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    n_layers = len(hidden_dims) + 1
    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
        metadata = handle.metadata()
    assert names == {f"layers.{k}.{kind}" for k in range(n_layers) for kind in ("weight", "bias")}
    assert json.loads(metadata["distill_architecture"]) == {
        "kind": "mlp", "input_dim": 5, "hidden_dims": list(hidden_dims), "num_classes": 3, "activation": activation,
    }


def test_save_model_keeps_extra_metadata(tmp_path):
    path = save_model(_mlp(), tmp_path / "m.safetensors", extra_metadata={"job": "abc"})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["job"] == "abc"
    assert read_architecture(path).to_dict() == ARCH_JSON


def test_file_loads_with_only_safetensors_and_torch(tmp_path):
    model = _mlp(input_dim=6, hidden_dims=(9, 5), num_classes=4).eval()
    path = save_model(model, tmp_path / "m.safetensors")
    x = _inputs(20, 6)
    with torch.no_grad():
        torch.testing.assert_close(_forward_from_file_by_hand(path, x), model(x))
        torch.testing.assert_close(_forward_from_file_by_hand(path, x), load_model(path)(x))


# --- export_mlp -----------------------------------------------------------------------------------


def test_export_seed_style_module(tmp_path):
    torch.manual_seed(3)
    module = SeedStyle().eval()
    path = tmp_path / "teacher.safetensors"
    arch = export_mlp(module, path)
    assert (arch.input_dim, arch.hidden_dims, arch.num_classes, arch.activation) == (10, [20], 2, "relu")
    x = _inputs(32, 10)
    with torch.no_grad():
        expected = module(x)
        torch.testing.assert_close(load_model(path)(x), expected)
        torch.testing.assert_close(_forward_from_file_by_hand(path, x), expected)


def test_export_rejects_linears_that_do_not_chain(tmp_path):
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(10, 20)
            self.fc2 = nn.Linear(30, 2)

    path = tmp_path / "broken.safetensors"
    with pytest.raises(ModelFormatError) as info:
        export_mlp(Broken(), path)
    assert "20" in info.value.message and "30" in info.value.message
    assert not path.exists()


def test_export_rejects_no_linears_and_missing_bias(tmp_path):
    with pytest.raises(ModelFormatError):
        export_mlp(nn.Sequential(nn.ReLU()), tmp_path / "a.safetensors")
    with pytest.raises(ModelFormatError):
        export_mlp(nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2)), tmp_path / "b.safetensors")


# --- read_architecture errors ---------------------------------------------------------------------


def test_valid_raw_file_is_accepted(tmp_path):
    path = _write_raw(tmp_path / "ok.safetensors", _valid_tensors(ARCH), ARCH_JSON)
    assert read_architecture(path).to_dict() == ARCH_JSON


def test_missing_metadata_entry(tmp_path):
    path = _write_raw(tmp_path / "m.safetensors", _valid_tensors(ARCH), metadata={"format": "pt"})
    with pytest.raises(ModelFormatError) as info:
        read_architecture(path)
    assert "distill_architecture" in info.value.message
    assert info.value.param == "distill_architecture"
    assert info.value.code == "invalid_model"


def test_no_metadata_at_all(tmp_path):
    path = _write_raw(tmp_path / "m.safetensors", _valid_tensors(ARCH))
    with pytest.raises(ModelFormatError, match="distill_architecture"):
        load_model(path)


def test_wrong_tensor_shape_names_the_tensor(tmp_path):
    tensors = _valid_tensors(ARCH)
    tensors["layers.1.weight"] = torch.zeros(6, 8)  # needs (6, 7)
    path = _write_raw(tmp_path / "m.safetensors", tensors, ARCH_JSON)
    with pytest.raises(ModelFormatError) as info:
        read_architecture(path)
    assert info.value.tensor == "layers.1.weight"
    assert "layers.1.weight" in info.value.message


def test_missing_tensor_names_the_tensor(tmp_path):
    tensors = _valid_tensors(ARCH)
    del tensors["layers.2.bias"]
    path = _write_raw(tmp_path / "m.safetensors", tensors, ARCH_JSON)
    with pytest.raises(ModelFormatError) as info:
        read_architecture(path)
    assert info.value.tensor == "layers.2.bias"


def test_extra_tensor_names_the_tensor(tmp_path):
    tensors = _valid_tensors(ARCH)
    tensors["layers.3.weight"] = torch.zeros(2, 3)
    path = _write_raw(tmp_path / "m.safetensors", tensors, ARCH_JSON)
    with pytest.raises(ModelFormatError) as info:
        read_architecture(path)
    assert info.value.tensor == "layers.3.weight"


def test_seed_state_dict_names_are_not_the_format(tmp_path):
    # A raw state_dict of the seed module (fc1.*, fc2.*) with the right metadata is rejected:
    # the first expected tensor is reported missing.
    arch = {"kind": "mlp", "input_dim": 10, "hidden_dims": [20], "num_classes": 2, "activation": "relu"}
    path = _write_raw(tmp_path / "m.safetensors", dict(SeedStyle().state_dict()), arch)
    with pytest.raises(ModelFormatError) as info:
        read_architecture(path)
    assert info.value.tensor == "layers.0.weight"


def test_invalid_architecture_json(tmp_path):
    path = _write_raw(tmp_path / "m.safetensors", _valid_tensors(ARCH), "{not json")
    with pytest.raises(ModelFormatError) as info:
        read_architecture(path)
    assert info.value.param == "distill_architecture"
    assert "JSON" in info.value.message


@pytest.mark.parametrize("raw, fragment", [
    ("[" * 100_000 + "]" * 100_000, "nested deeper than 64 levels"),
    ('{"input_dim": ' + "1" * 5000 + "}", "more than 4300 digits"),
])
def test_hostile_architecture_json(tmp_path, raw, fragment):
    path = _write_raw(tmp_path / "m.safetensors", _valid_tensors(ARCH), raw)
    with pytest.raises(ModelFormatError) as info:
        read_architecture(path)
    assert info.value.param == "distill_architecture" and fragment in info.value.message


@pytest.mark.parametrize("bad,param", [
    ({**ARCH_JSON, "kind": "cnn"}, "kind"),
    ({**ARCH_JSON, "activation": "swish"}, "activation"),
    ({**ARCH_JSON, "activation": ["relu"]}, "activation"),  # unhashable: once a TypeError
    ({**ARCH_JSON, "num_classes": 1}, "num_classes"),
    ({**ARCH_JSON, "hidden_dims": [7, -6]}, "hidden_dims[1]"),
    ({**ARCH_JSON, "dropout": 0.1}, "dropout"),
    ({k: v for k, v in ARCH_JSON.items() if k != "input_dim"}, "input_dim"),
])
def test_invalid_architecture_fields(tmp_path, bad, param):
    path = _write_raw(tmp_path / "m.safetensors", _valid_tensors(ARCH), bad)
    with pytest.raises(ModelFormatError) as info:
        read_architecture(path)
    assert info.value.param == param


@pytest.mark.parametrize("content", [b"", b"this is not a safetensors file", b"\x00" * 64, bytes(range(256)) * 4])
def test_non_safetensors_bytes(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFormatError):
        read_architecture(path)
    with pytest.raises(ModelFormatError):
        load_model(path)


def test_missing_file_is_a_model_format_error(tmp_path):
    with pytest.raises(ModelFormatError):
        load_model(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_refused_by_load_model(tmp_path, value):
    model = _mlp()
    with torch.no_grad():
        model.layers[1].weight[2, 3] = value
    path = save_model(model, tmp_path / "m.safetensors")
    read_architecture(path)  # the header is fine; only loading looks at values
    with pytest.raises(ModelFormatError) as info:
        load_model(path)
    assert info.value.tensor == "layers.1.weight"
