"""The one registry: which backends exist, which ops (selection methods and public primitives) exist, and dispatch.

Backends (``BACKENDS``): name, the device types they run on, their priority for ``backend="auto"`` and the module
that implements them. Ops (``OPS``, declared by ``mob_kernels/methods``): schema, argument preparation (the checks),
composition over backend primitives (the reference when run on the reference backend), fake implementation and, for
selection methods, the budget rule. Dispatch resolves (op, backend) once per call: a backend's fused implementation of
the op when it has one, else the op's composition over that backend's primitives.

Every op is registered as ``torch.ops.mob.<name>`` with implementations for CPU and CUDA tensors and a fake
implementation (meta tensors, FakeTensors under ``torch.compile``/``make_fx``). The public front doors call these ops,
so eager, compiled and traced calls take one path.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .backends import Backend
from .errors import BackendUnavailableError

# --------------------------------------------------------------------------------------------------------- backends


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    name: str
    devices: tuple[str, ...]  # device types it runs on
    auto_priority: int  # higher wins among the available backends for backend="auto"
    module: str  # module defining BACKEND (an object satisfying the Backend protocol) or UNAVAILABLE_REASON
    interpreted_devices: tuple[str, ...] = ()  # device types it runs on only under TRITON_INTERPRET=1


BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec("reference", ("cpu", "cuda"), 0, "mob_kernels.backends.reference"),
    BackendSpec("cpu", ("cpu",), 20, "mob_kernels.backends.cpu"),
    BackendSpec("triton", ("cuda",), 20, "mob_kernels.backends.triton", interpreted_devices=("cpu",)),
    BackendSpec("cuda", ("cuda",), 10, "mob_kernels.backends.cuda"),
)
BACKEND_NAMES = tuple(b.name for b in BACKENDS)
_SPECS = {b.name: b for b in BACKENDS}
_loaded: dict[str, Backend | str] = {}  # name -> backend object, or why it is unavailable


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load(name: str) -> Backend | str:
    if name not in _loaded:
        try:
            mod = importlib.import_module(_SPECS[name].module)
        except ImportError as e:
            _loaded[name] = f"import failed: {e}"
        else:
            backend: Backend | None = getattr(mod, "BACKEND", None)
            _loaded[name] = backend if backend is not None else str(getattr(mod, "UNAVAILABLE_REASON", "not available"))
    got = _loaded[name]
    # A backend may become unavailable later (the CUDA one reads the extension's build flag on every call).
    reason = None if isinstance(got, str) else getattr(got, "unavailable_reason", None)
    return str(reason) if reason else got


def _runs_on(spec: BackendSpec, device_type: str) -> bool:
    return device_type in spec.devices or (device_type in spec.interpreted_devices and _interpreting())


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on tensors of ``device`` in this process, in registry order."""
    dtype = torch.device(device).type
    return [b.name for b in BACKENDS if _runs_on(b, dtype) and not isinstance(_load(b.name), str)]


def resolve_backend(backend: str, device: str | torch.device) -> str:
    """The backend that ``backend`` ("auto" or a name) means for tensors on ``device``; raises if it cannot run.

    ``"auto"`` honours the ``MOB_BACKEND`` environment variable, then takes the available backend with the highest
    priority for the device. A named backend that cannot run raises ``BackendUnavailableError`` saying why: never a
    silent fallback."""
    device = torch.device(device)
    if backend == "auto":
        backend = os.environ.get("MOB_BACKEND", "").strip() or "auto"
    if backend == "auto":
        ready = [b for b in BACKENDS if _runs_on(b, device.type) and not isinstance(_load(b.name), str)]
        return max(ready, key=lambda b: b.auto_priority).name if ready else "reference"
    if backend not in _SPECS:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got backend={backend!r}")
    spec = _SPECS[backend]
    if not _runs_on(spec, device.type):
        hint = ""
        if device.type in spec.interpreted_devices:
            hint = " (set TRITON_INTERPRET=1 before importing triton to run it on CPU tensors)"
        raise BackendUnavailableError(f"backend={backend!r} cannot run on {device.type} tensors{hint}")
    got = _load(backend)
    if isinstance(got, str):
        raise BackendUnavailableError(f"backend={backend!r} is unavailable: {got}")
    return backend


def get_backend(name: str) -> Backend:
    """The backend object for a name ``resolve_backend`` returned."""
    got = _load(name)
    if isinstance(got, str):
        raise BackendUnavailableError(f"backend={name!r} is unavailable: {got}")
    return got


# -------------------------------------------------------------------------------------------------------------- ops


@dataclasses.dataclass
class Prepared:
    """An op call after its checks: batched inputs for ``compose``/fused implementations, and how to finish."""

    inputs: dict[str, Any]  # keyword arguments of compose (after the backend) and of a fused implementation
    device: torch.device
    backend: str
    unbatched: bool


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One public op. ``prepare(*args, data=..., **kwargs)`` checks the op's arguments exactly as the schema names
    them (``data=False`` under fake tensors: no check may read values) and returns a ``Prepared``. ``compose(backend,
    **inputs)`` computes the batched result from backend primitives. ``fake(**inputs)`` returns empty batched outputs.
    ``budget(k)`` (selection methods only) maps a keep budget per image to the method's budget arguments."""

    name: str
    schema: str
    prepare: Callable[..., Prepared]
    compose: Callable[..., Any]
    fake: Callable[..., Any]
    budget: Callable[[int], Mapping[str, int]] | None = None
    doc: str = ""

    @property
    def is_method(self) -> bool:
        return self.budget is not None


OPS: dict[str, OpSpec] = {}
_LIB = torch.library.Library("mob", "DEF")


def _unbatch(out: Any) -> Any:
    if isinstance(out, tuple):
        return tuple(o[0] for o in out)
    return out[0]


def run(spec: OpSpec, call: Prepared) -> Any:
    """Dispatch a prepared call: the backend's fused implementation of the op, else the op's composition."""
    backend = get_backend(call.backend)
    fused = getattr(backend, spec.name, None)
    out = fused(**call.inputs) if fused is not None else spec.compose(backend, **call.inputs)
    out = _unbatch(out) if call.unbatched else out
    # Outputs are fresh contiguous tensors, as the fake implementations promise (a slice would alias a workspace).
    return tuple(o.contiguous() for o in out) if isinstance(out, tuple) else out.contiguous()


def register(spec: OpSpec) -> OpSpec:
    """Declare an op: define ``torch.ops.mob.<name>`` with CPU, CUDA and fake implementations."""
    if spec.name in OPS:
        raise ValueError(f"op {spec.name!r} is registered twice")
    OPS[spec.name] = spec
    _LIB.define(f"{spec.name}{spec.schema}")

    def impl(*args, **kwargs):
        return run(spec, spec.prepare(*args, **kwargs))

    def fake(*args, **kwargs):
        call = spec.prepare(*args, data=False, **kwargs)
        out = spec.fake(**call.inputs)
        return _unbatch(out) if call.unbatched else out

    for key in ("CPU", "CUDA"):
        _LIB.impl(spec.name, impl, key)
    torch.library.register_fake(f"mob::{spec.name}", fake, lib=_LIB)
    return spec


def method_names() -> list[str]:
    """The selection methods (ops with a budget rule), in registration order."""
    return [name for name, spec in OPS.items() if spec.is_method]


def budget_arguments(method: str, k: int) -> dict[str, int]:
    """What a keep budget of ``k`` tokens per image means for ``method`` (e.g. MoB's prompt share ``k_p``)."""
    spec = OPS.get(method)
    if spec is None or spec.budget is None:
        raise ValueError(f"method must be one of {method_names()}, got method={method!r}")
    return dict(spec.budget(k))


def prepared(inputs: dict[str, Any], vis: Tensor, backend: str, unbatched: bool, data: bool) -> Prepared:
    """The ``Prepared`` for a call whose features are ``vis``; resolves the backend only where data will be read."""
    if backend != "auto" and backend not in _SPECS:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got backend={backend!r}")
    name = resolve_backend(backend, vis.device) if data else backend
    return Prepared(inputs=inputs, device=vis.device, backend=name, unbatched=unbatched)

