"""Model kinds and the model file format.

A model file is one ``.safetensors`` whose metadata entry ``distill_architecture``
holds the architecture as JSON. For an MLP::

    {"kind": "mlp", "input_dim": D, "hidden_dims": [..], "num_classes": C, "activation": "relu"}

with tensors ``layers.{k}.weight`` (out, in) and ``layers.{k}.bias`` (out,) for the
k-th linear layer, the activation between consecutive layers and none after the last.
The file loads with nothing but ``safetensors`` and ``torch``; :func:`export_mlp`
writes one from any torch module whose ``nn.Linear`` layers form that chain.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import safe_json
from .errors import ModelFormatError

__all__ = [
    "ARCHITECTURE_KEY",
    "ACTIVATIONS",
    "MLPArchitecture",
    "MLP",
    "build_model",
    "save_model",
    "load_model",
    "read_architecture",
    "export_mlp",
    "count_parameters",
]

ARCHITECTURE_KEY = "distill_architecture"
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}
MAX_LAYER_WIDTH = 1 << 16
MAX_HIDDEN_LAYERS = 64


@dataclass
class MLPArchitecture:
    """A multilayer perceptron classifier."""

    input_dim: int
    """Number of input features D."""
    hidden_dims: list[int]
    """Widths of the hidden layers, input side first; may be empty (a linear model)."""
    num_classes: int
    """Number of output logits C (>= 2)."""
    activation: str = "relu"
    """Non-linearity between layers; one of ACTIVATIONS."""
    kind: str = field(default="mlp")

    def __post_init__(self) -> None:
        self.hidden_dims = list(self.hidden_dims)
        if self.kind != "mlp":
            raise ModelFormatError(f"architecture kind must be 'mlp', got {self.kind!r}", param="kind")
        for name, value in (("input_dim", self.input_dim), ("num_classes", self.num_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_LAYER_WIDTH:
                raise ModelFormatError(f"{name} must be an integer in [1, {MAX_LAYER_WIDTH}], got {value!r}", param=name)
        if self.num_classes < 2:
            raise ModelFormatError("num_classes must be at least 2", param="num_classes")
        if len(self.hidden_dims) > MAX_HIDDEN_LAYERS:
            raise ModelFormatError(f"at most {MAX_HIDDEN_LAYERS} hidden layers", param="hidden_dims")
        for i, width in enumerate(self.hidden_dims):
            if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= MAX_LAYER_WIDTH:
                raise ModelFormatError(
                    f"hidden_dims[{i}] must be an integer in [1, {MAX_LAYER_WIDTH}], got {width!r}", param=f"hidden_dims[{i}]"
                )
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:  # a list is unhashable
            raise ModelFormatError(
                f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}", param="activation"
            )

    @property
    def layer_dims(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer."""
        widths = [self.input_dim, *self.hidden_dims, self.num_classes]
        return list(zip(widths[:-1], widths[1:]))

    @property
    def num_parameters(self) -> int:
        return sum(i * o + o for i, o in self.layer_dims)

    def to_dict(self) -> dict:
        return {"kind": self.kind, **{k: v for k, v in asdict(self).items() if k != "kind"}}

    @classmethod
    def from_dict(cls, data: dict) -> "MLPArchitecture":
        if not isinstance(data, dict):
            raise ModelFormatError("architecture must be a JSON object", param=ARCHITECTURE_KEY)
        known = {"kind", "input_dim", "hidden_dims", "num_classes", "activation"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelFormatError(f"unknown architecture field(s): {', '.join(unknown)}", param=unknown[0])
        missing = sorted({"input_dim", "hidden_dims", "num_classes"} - set(data))
        if missing:
            raise ModelFormatError(f"architecture is missing {', '.join(missing)}", param=missing[0])
        if not isinstance(data["hidden_dims"], list):
            raise ModelFormatError("hidden_dims must be a list of integers", param="hidden_dims")
        return cls(**data)


class MLP(nn.Module):
    """Linear layers ``layers.0 .. layers.L`` with the activation between them."""

    def __init__(self, architecture: MLPArchitecture):
        super().__init__()
        self.architecture = architecture
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in architecture.layer_dims)
        self.activation = ACTIVATIONS[architecture.activation]()

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, C)
        x = features
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


def build_model(architecture: MLPArchitecture) -> MLP:
    return MLP(architecture)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: MLP, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` in the model file format; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in model.state_dict().items()}
    metadata = {**(extra_metadata or {}), ARCHITECTURE_KEY: json.dumps(model.architecture.to_dict())}
    save_file(tensors, str(path), metadata=metadata)
    return path


def _expected_shapes(architecture: MLPArchitecture) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for k, (fan_in, fan_out) in enumerate(architecture.layer_dims):
        shapes[f"layers.{k}.weight"] = (fan_out, fan_in)
        shapes[f"layers.{k}.bias"] = (fan_out,)
    return shapes


def read_architecture(path: str | Path) -> MLPArchitecture:
    """Read and check a model file's header without loading its weights.

    Raises ModelFormatError naming the tensor or field at fault.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFormatError(f"not a readable safetensors file: {exc}") from exc
    if ARCHITECTURE_KEY not in metadata:
        raise ModelFormatError(
            f"the safetensors metadata has no '{ARCHITECTURE_KEY}' entry; write the file with "
            "distill.models.export_mlp() or add the architecture JSON to its metadata",
            param=ARCHITECTURE_KEY,
        )
    try:
        raw = safe_json.loads(metadata[ARCHITECTURE_KEY])
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"'{ARCHITECTURE_KEY}' is not valid JSON: {exc}", param=ARCHITECTURE_KEY) from exc
    except safe_json.JSONLimitError as exc:
        raise ModelFormatError(f"'{ARCHITECTURE_KEY}': {exc}", param=ARCHITECTURE_KEY) from None
    architecture = MLPArchitecture.from_dict(raw)
    expected = _expected_shapes(architecture)
    for name, shape in expected.items():
        if name not in shapes:
            raise ModelFormatError(f"tensor '{name}' is missing", tensor=name)
        if shapes[name] != shape:
            raise ModelFormatError(
                f"tensor '{name}' has shape {list(shapes[name])}, the architecture needs {list(shape)}", tensor=name
            )
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise ModelFormatError(f"unexpected tensor '{extra[0]}' for this architecture", tensor=extra[0])
    return architecture


def load_model(path: str | Path, device: str | torch.device = "cpu") -> MLP:
    """Load a model file (checked first) as an MLP in eval mode on ``device``."""
    architecture = read_architecture(path)
    model = MLP(architecture)
    with safe_open(str(path), framework="pt") as handle:
        state = {name: handle.get_tensor(name).to(torch.float32) for name in handle.keys()}
    if not all(torch.isfinite(t).all() for t in state.values()):
        bad = next(name for name, t in state.items() if not torch.isfinite(t).all())
        raise ModelFormatError(f"tensor '{bad}' contains NaN or infinite values", tensor=bad)
    model.load_state_dict(state)
    return model.to(device).eval()


def export_mlp(module: nn.Module, path: str | Path, activation: str = "relu") -> MLPArchitecture:
    """Write any torch MLP classifier in the model file format.

    ``module``'s ``nn.Linear`` layers, in registration order, must chain (each one's
    ``out_features`` is the next one's ``in_features``), with ``activation`` between
    them — e.g. the seed's ``fc1 -> relu -> fc2`` teacher. Returns the architecture.
    """
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelFormatError("the module has no nn.Linear layers")
    for k, (a, b) in enumerate(zip(linears[:-1], linears[1:])):
        if a.out_features != b.in_features:
            raise ModelFormatError(
                f"linear layer {k} outputs {a.out_features} features but layer {k + 1} takes {b.in_features}"
            )
    if any(layer.bias is None for layer in linears):
        raise ModelFormatError("every nn.Linear layer needs a bias")
    architecture = MLPArchitecture(
        input_dim=linears[0].in_features,
        hidden_dims=[layer.out_features for layer in linears[:-1]],
        num_classes=linears[-1].out_features,
        activation=activation,
    )
    mlp = MLP(architecture)
    with torch.no_grad():
        for target, source in zip(mlp.layers, linears):
            target.weight.copy_(source.weight)
            target.bias.copy_(source.bias)
    save_model(mlp, path)
    return architecture
