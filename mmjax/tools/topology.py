"""Compiling for a TPU topology on any machine: libtpu's XLA:TPU compiler without a TPU.

`mmjax dryrun --topology v5e:4x4` builds the run on the abstract devices of
`jax.experimental.topologies` (16 "TPU v5 lite" chips there), so the step is lowered and
compiled by the real TPU compiler: its per-chip memory, collectives and kernels are the
ones a pod would run. Needs the `tpu` extra (`pip install 'mmjax[tpu]'`, which pulls libtpu).
A compile that runs out of HBM is a result: `compile_oom` reads the compiler's own figures
from its RESOURCE_EXHAUSTED message.
"""

from __future__ import annotations

import os
import re
from typing import Any

from mmjax.runtime.config import ConfigError

# HBM per chip (GiB) by device kind, from the vendor's data sheets; --hbm-gib overrides.
HBM_GIB = {
    "TPU v4": 32.0,
    "TPU v5 lite": 16.0,  # v5e
    "TPU v5": 95.0,  # v5p
    "TPU v6 lite": 32.0,  # v6e (Trillium)
    "TPU7x": 192.0,  # Ironwood
}
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def topology_devices(name: str, slices: int = 1) -> list[Any]:
    """The devices of TPU topology `name` ('v5e:4x4', 'v5p:4x4x4', ...) times `slices`.

    Call before JAX starts a backend: this process keeps the CPU as its own backend (on a TPU
    VM it must not take the chips a training may hold), and libtpu only compiles."""
    # No GCE metadata server to ask on a machine that is not a TPU VM; and compiling opens no
    # chip, so several dry runs (a test suite's workers) may load libtpu at once.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if slices < 1:
        raise ConfigError(f"--slices={slices} must be >= 1")
    try:
        import jax

        jax.config.update("jax_platforms", "cpu")
    except RuntimeError:
        pass  # A backend is up already (called from Python): keep it.
    try:
        from jax.experimental import topologies

        kwargs = {"num_slices": slices} if slices > 1 else {}
        topology = topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs)
    except ImportError:
        raise ConfigError("--topology needs JAX's topologies module (jax >= 0.4.20)") from None
    except Exception as e:  # noqa: BLE001 - libtpu raises plain RuntimeErrors/XlaRuntimeErrors.
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not _libtpu_installed():
            raise ConfigError(
                f"--topology {name} needs libtpu, which is not installed: pip install 'mmjax[tpu]'"
            ) from None
        raise ConfigError(f"--topology {name}: libtpu refused it: {text}") from None
    return list(topology.devices)


def _libtpu_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def hbm_gib_of(device_kind: str) -> float | None:
    return HBM_GIB.get(device_kind)


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * _UNITS[unit.upper()[:1] if unit else ""])


_SIZE = r"(\d+(?:\.\d+)?)([KMGT]?)"
_TEMPORARIES = re.compile(rf"HLO temporaries \({_SIZE}\)? exceeds available HBM \(?{_SIZE}")
_USED = re.compile(r"Used (\d+(?:\.\d+)?)([KMGT]?) of (\d+(?:\.\d+)?)([KMGT]?) hbm", re.IGNORECASE)


def compile_oom(error: BaseException) -> dict[str, Any] | None:
    """The compiler's figures of a RESOURCE_EXHAUSTED compile error, else None:
    {'message', 'needed_bytes', 'available_bytes', 'temp_bytes' (when it names them)}."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    line = next((ln for ln in text.splitlines() if "RESOURCE_EXHAUSTED" in ln), text)
    out: dict[str, Any] = {"message": line.strip()[:500]}
    if match := _TEMPORARIES.search(text):
        out["temp_bytes"] = _bytes(match[1], match[2])
        out["needed_bytes"] = out["temp_bytes"]
        out["available_bytes"] = _bytes(match[3], match[4])
    elif match := _USED.search(text):
        out["needed_bytes"] = _bytes(match[1], match[2])
        out["available_bytes"] = _bytes(match[3], match[4])
    return out
