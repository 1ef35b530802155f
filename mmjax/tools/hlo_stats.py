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
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def _instruction(line: str) -> tuple[str, str] | None:
    """`%name = SHAPE op(...)` -> (SHAPE, op), else None. SHAPE is an array shape or a tuple
    of them, whose TPU layouts hold parentheses of their own ({1,0:T(8,128)})."""
    _, sep, rhs = line.partition(" = ")
    if not sep:
        return None
    rhs = rhs.lstrip()
    if rhs.startswith("("):
        end = _closing_paren(rhs)
        shape, rest = rhs[: end + 1], rhs[end + 1 :]
    else:
        shape, _, rest = rhs.partition(" ")
    op = re.match(r"\s*([a-z][a-z0-9-]*)\(", rest)
    return (shape, op.group(1)) if op else None


def _closing_paren(text: str) -> int:
    depth = 0
    for i, char in enumerate(text):
        depth += char == "("
        depth -= char == ")"
        if depth == 0:
            return i
    return len(text) - 1


def _split_top_level(shape: str) -> list[str]:
    """'(a, (b, c), d)' -> ['a', '(b, c)', 'd']."""
    inner, parts, depth, start = shape[1:-1], [], 0, 0
    for i, char in enumerate(inner):
        depth += char in "({["
        depth -= char in ")}]"
        if char == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    parts.append(inner[start:])
    return [p.strip() for p in parts if p.strip()]


def _array_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += size * _DTYPE_BYTES.get(dtype, 4)
    return total


def _result_bytes(shape: str, op: str) -> int:
    """Bytes an op produces: every array of a combined (tuple) collective; of an async
    start's (operands, results) tuple, the results."""
    if op.endswith("-start") and shape.startswith("("):
        parts = _split_top_level(shape)
        return _array_bytes(" ".join(parts[len(parts) // 2 :]))
    return _array_bytes(shape)


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {'count', 'bytes'}} for the five collective kinds; an async pair
    (`all-gather-start` / `-done`) counts once, with the bytes of its result."""
    out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    for line in hlo_text.splitlines():
        parsed = _instruction(line)
        if parsed is None:
            continue
        shape, op = parsed
        kind = op.removesuffix("-start")
        if kind in out and not op.endswith("-done"):
            out[kind]["count"] += 1
            out[kind]["bytes"] += _result_bytes(shape, op)
    return out


def custom_calls(hlo_text: str) -> dict[str, int]:
    """Custom-call instructions by target (e.g. `tpu_custom_call`: a Pallas kernel)."""
    targets: Counter[str] = Counter()
    for line in hlo_text.splitlines():
        parsed = _instruction(line)
        if parsed and parsed[1] == "custom-call":
            target = _TARGET.search(line)
            targets[target.group(1) if target else "?"] += 1
    return dict(sorted(targets.items()))


# Custom-call targets that are accelerator kernels (Pallas/Mosaic on TPU, cuDNN and Triton on
# GPU), as opposed to the compiler's own bookkeeping calls (AllocateBuffer, ...).
_KERNEL_TARGETS = ("tpu_custom_call", "mosaic_gpu", "triton_kernel_call", "__cudnn$", "__gpu$")


def kernels(calls: dict[str, int]) -> dict[str, int]:
    """The accelerator kernels among `custom_calls(...)`."""
    return {t: n for t, n in calls.items() if t.startswith(_KERNEL_TARGETS)}
