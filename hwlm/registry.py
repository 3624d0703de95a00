"""Finding backends (built in, or plugins of the entry-point group ``hwlm.backends``) and
choosing one for ``--device``."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points

from hwlm.backend import INTERFACE_VERSION, Backend, ProbeResult

logger = logging.getLogger(__name__)

# Built-in backends, imported only when asked for so that `import hwlm` loads no device runtime.
BUILTIN_BACKENDS: dict[str, str] = {
    "cuda": "hwlm.backends.cuda:CUDABackend",
    "rocm": "hwlm.backends.rocm:ROCmBackend",
    "cpu": "hwlm.backends.cpu:CPUBackend",
    "triton-interpret": "hwlm.backends.triton_interpret:TritonInterpreterBackend",
}

ENTRY_POINT_GROUP = "hwlm.backends"


@dataclass(frozen=True)
class BackendInfo:
    name: str
    target: str  # "module:Class"
    probe: ProbeResult
    backend_class: type[Backend] | None  # None when it could not be loaded


def known_backends() -> dict[str, str]:
    """Name -> "module:Class" for built-ins and installed plugins (built-ins win on a clash)."""
    found = dict(BUILTIN_BACKENDS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def load_backend_class(name: str, target: str) -> type[Backend]:
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ValueError(f"backend {name!r} ({target}) is not a subclass of hwlm.backend.Backend")
    version = getattr(cls, "interface_version", None)
    if version != INTERFACE_VERSION:
        raise ValueError(
            f"backend {name!r} was written for hwlm backend interface version {version}, "
            f"but this hwlm has version {INTERFACE_VERSION}; upgrade the plugin or hwlm"
        )
    return cls


def describe_backends() -> list[BackendInfo]:
    """Every known backend with its probe result (a load failure becomes 'not available')."""
    infos = []
    for name, target in known_backends().items():
        try:
            cls = load_backend_class(name, target)
            probe = cls.probe()
        except Exception as exc:  # a broken plugin must not break device listing
            infos.append(
                BackendInfo(name, target, ProbeResult(False, 0, f"cannot load: {exc}"), None)
            )
            continue
        infos.append(BackendInfo(name, target, probe, cls))
    return infos


def select_backend(device: str) -> type[Backend]:
    """The backend class for ``device`` ('auto' or a name); a clear ValueError if unusable."""
    if device != "auto":
        targets = known_backends()
        if device not in targets:
            raise ValueError(
                f"unknown device {device!r}; known: {', '.join(sorted(targets))}, auto"
            )
        cls = load_backend_class(device, targets[device])
        probe = cls.probe()
        if not probe.available:
            raise ValueError(f"device {device!r} is not available: {probe.reason}")
        logger.info("using device %s: %s", device, probe.reason)
        return cls
    infos = describe_backends()
    for info in infos:
        state = "available" if info.probe.available else "not available"
        logger.info(
            "device %s: %s (score %d): %s", info.name, state, info.probe.score, info.probe.reason
        )
    usable = [i for i in infos if i.probe.available and i.backend_class is not None]
    if not usable:
        raise ValueError("no usable device found; run `hwlm devices` to see why")
    best = max(usable, key=lambda i: i.probe.score)
    logger.info("--device auto chose %s (highest score %d)", best.name, best.probe.score)
    assert best.backend_class is not None
    return best.backend_class
