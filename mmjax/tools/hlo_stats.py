"""What a compiled step does besides arithmetic: its collectives and its custom calls.

Read from the optimised HLO text (`compiled.as_text()`), which every backend gives, so the
same figures come from a TPU topology compile and from simulated CPU devices. Counts are
static: an instruction inside a loop body (the layer scan) is counted once, as it is written,
not once per iteration.
"""

from __future__ import annotations

import math
import re
from collections import Counter

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
    "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
# `%name = SHAPE op(` where SHAPE is an array shape or a tuple of them.
_INSTRUCTION = re.compile(r"=\s*(\([^=]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+([a-z-]+)\(")
_ARRAY = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def _array_bytes(shape: str) -> int:
    arrays = _ARRAY.findall(shape)
    if not arrays:
        return 0
    # An async start returns (operands..., result...): the last array is the result.
    dtype, dims = arrays[-1]
    size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    return size * _DTYPE_BYTES.get(dtype, 4)


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {'count', 'bytes'}} for the five collective kinds; an async pair
    (`all-gather-start` / `-done`) counts once, with the bytes of its result."""
    out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.search(line)
        if not match:
            continue
        shape, op = match.groups()
        kind = op.removesuffix("-start")
        if kind in out and not op.endswith("-done"):
            out[kind]["count"] += 1
            out[kind]["bytes"] += _array_bytes(shape)
    return out


def custom_calls(hlo_text: str) -> dict[str, int]:
    """Custom-call instructions by target (e.g. `tpu_custom_call`: a Pallas kernel)."""
    targets: Counter[str] = Counter()
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.search(line)
        if match and match.group(2) == "custom-call":
            target = _TARGET.search(line)
            targets[target.group(1) if target else "?"] += 1
    return dict(sorted(targets.items()))


# Custom-call targets that are accelerator kernels (Pallas/Mosaic on TPU, cuDNN and Triton on
# GPU), as opposed to the compiler's own bookkeeping calls (AllocateBuffer, ...).
_KERNEL_TARGETS = ("tpu_custom_call", "mosaic_gpu", "triton_kernel_call", "__cudnn$", "__gpu$")


def kernels(calls: dict[str, int]) -> dict[str, int]:
    """The accelerator kernels among `custom_calls(...)`."""
    return {t: n for t, n in calls.items() if t.startswith(_KERNEL_TARGETS)}
