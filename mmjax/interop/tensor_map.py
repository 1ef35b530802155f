"""One tensor mapping, both directions: rules that build mmjax parameters from another
library's named tensors, run forwards to import and backwards to export.

A rule reads one or more source tensors (checked by name and shape), rearranges them
(transposes, reshapes, slices, stacks: never arithmetic) and writes one mmjax parameter,
optionally one layer of a scanned stack. Because a rule only moves elements, applying it to
numbered elements tells where each element went, so the export is the same rule run
backwards (`from_params`) and the two directions cannot disagree. Each source library
(open_clip, transformers' SigLIP, ...) only lists its rules with `Rules`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np


class ConversionError(ValueError):
    """The checkpoint or config does not match what mmjax can reproduce (one line)."""


@dataclasses.dataclass
class Rule:
    sources: tuple[str, ...]  # Source tensor names.
    shapes: tuple[tuple[int, ...], ...]  # Their expected shapes.
    target: tuple[str, ...]  # mmjax parameter path.
    fn: Callable[..., np.ndarray]
    layer: int | None = None  # Stacked along a leading axis (scanned layers).


def _same(x):
    return x


def _transposed(x):
    return x.T


def attention_layouts(heads: int, width: int) -> dict[str, Callable]:
    """Torch-layout attention weights -> mmjax's fused projection kernels."""
    hk = (heads, width // heads)

    def qkv(w):  # [3D, Din] rows [Wq; Wk; Wv] -> [Din, 3, H, K]
        return w.reshape(3, *hk, w.shape[1]).transpose(3, 0, 1, 2)

    def separate(*ws):  # [D, Din] each -> [Din, n, H, K]
        return np.stack([w.reshape(*hk, w.shape[1]).transpose(2, 0, 1) for w in ws], axis=1)

    return dict(
        qkv=qkv,
        qkv_bias=lambda b: b.reshape(3, *hk),
        separate_bias=lambda *bs: np.stack([b.reshape(hk) for b in bs]),
        out=lambda w: w.T.reshape(*hk, w.shape[0]),
        separate=separate,
    )


class Rules(list):
    """A list of Rule with builders for the common torch layouts (weights [out, in])."""

    def add(self, sources, shapes, target: str, fn: Callable = _same, layer: int | None = None):
        if isinstance(sources, str):
            sources, shapes = (sources,), (shapes,)
        self.append(Rule(tuple(sources), tuple(shapes), tuple(target.split("/")), fn, layer))

    def norm(self, src: str, width: int, target: str, layer: int | None = None):
        self.add(f"{src}.weight", (width,), f"{target}/scale", layer=layer)
        self.add(f"{src}.bias", (width,), f"{target}/bias", layer=layer)

    def linear(self, src: str, din: int, dout: int, target: str, layer=None, bias=True):
        self.add(f"{src}.weight", (dout, din), f"{target}/kernel", _transposed, layer)
        if bias:
            self.add(f"{src}.bias", (dout,), f"{target}/bias", layer=layer)

    def self_attention(self, src: str, width: int, heads: int, target: str, layer=None):
        """torch.nn.MultiheadAttention (in_proj fused) as mmjax's self-attention."""
        a = attention_layouts(heads, width)
        shape = (3 * width, width)
        self.add(f"{src}.in_proj_weight", shape, f"{target}/qkv_kernel", a["qkv"], layer)
        self.add(f"{src}.in_proj_bias", (3 * width,), f"{target}/qkv_bias", a["qkv_bias"], layer)
        self.add(f"{src}.out_proj.weight", (width, width), f"{target}/out_kernel", a["out"], layer)
        self.add(f"{src}.out_proj.bias", (width,), f"{target}/out_bias", layer=layer)

    def separate_self_attention(
        self, src: str, width: int, heads: int, target: str, layer=None, out: str = "out_proj"
    ):
        """q_proj / k_proj / v_proj / out_proj Linears (transformers) as self-attention."""
        a = attention_layouts(heads, width)
        names = [f"{src}.{p}_proj.weight" for p in "qkv"]
        self.add(names, [(width, width)] * 3, f"{target}/qkv_kernel", a["separate"], layer)
        biases = [f"{src}.{p}_proj.bias" for p in "qkv"]
        self.add(biases, [(width,)] * 3, f"{target}/qkv_bias", a["separate_bias"], layer)
        self.add(f"{src}.{out}.weight", (width, width), f"{target}/out_kernel", a["out"], layer)
        self.add(f"{src}.{out}.bias", (width,), f"{target}/out_bias", layer=layer)

    def cross_attention(
        self, src: str, width: int, context: int, heads: int, target: str, layer=None
    ):
        """torch.nn.MultiheadAttention as mmjax's cross-attention (query, fused kv)."""
        a = attention_layouts(heads, width)
        w, b = f"{src}.in_proj_weight", f"{src}.in_proj_bias"
        if context == width:  # torch fuses the three projections then.
            shape = (3 * width, width)
            self.add(w, shape, f"{target}/query_kernel", lambda x: a["separate"](x[:width]), layer)
            self.add(w, shape, f"{target}/kv_kernel",
                     lambda x: a["separate"](*x[width:].reshape(2, width, -1)), layer)  # fmt: skip
        else:
            self.add(f"{src}.q_proj_weight", (width, width), f"{target}/query_kernel",
                     a["separate"])  # fmt: skip
            self.add(
                (f"{src}.k_proj_weight", f"{src}.v_proj_weight"),
                ((width, context), (width, context)),
                f"{target}/kv_kernel",
                a["separate"],
            )
        hk = (heads, width // heads)
        self.add(b, (3 * width,), f"{target}/query_bias",
                 lambda x: x[:width].reshape(1, *hk), layer)  # fmt: skip
        self.add(b, (3 * width,), f"{target}/kv_bias", lambda x: x[width:].reshape(2, *hk), layer)
        self.add(f"{src}.out_proj.weight", (width, width), f"{target}/out_kernel", a["out"], layer)
        self.add(f"{src}.out_proj.bias", (width,), f"{target}/out_bias", layer=layer)

    def expected(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for rule in self:
            out.update(zip(rule.sources, rule.shapes, strict=True))
        return out


def check_state(
    state: Mapping[str, Any], rules: Rules, ignored: Iterable[str] = (), what: str = "checkpoint"
) -> None:
    """ConversionError listing missing and unexpected tensors, or the first wrong shape."""
    expected = rules.expected()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected) - set(ignored))
    if missing or extra:
        parts = [f"missing tensors {missing}" if missing else "",
                 f"unexpected tensors {extra}" if extra else ""]  # fmt: skip
        raise ConversionError(
            f"{what} does not match the config: " + "; ".join(p for p in parts if p)
        )
    for name, shape in expected.items():
        found = tuple(np.shape(state[name]))
        if found != tuple(shape):
            raise ConversionError(f"tensor {name}: expected shape {tuple(shape)}, found {found}")


def to_params(
    state: Mapping[str, Any], rules: Rules, progress: bool = False
) -> dict[tuple[str, ...], np.ndarray]:
    """Source tensors -> {mmjax parameter path: float32 array} (layers stacked); check_state
    first."""
    from tqdm import tqdm

    stacks: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for rule in tqdm(rules, desc="convert", unit="tensor", disable=not progress):
        value = np.asarray(rule.fn(*(np.asarray(state[s], np.float32) for s in rule.sources)))
        if rule.layer is None:
            flat[rule.target] = value.astype(np.float32)
        else:
            stacks.setdefault(rule.target, {})[rule.layer] = value.astype(np.float32)
    for target, layers in stacks.items():
        flat[target] = np.stack([layers[i] for i in sorted(layers)])
    return flat


def nest(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict[str, Any]:
    """{path: array} -> the nested parameter dict."""
    params: dict[str, Any] = {}
    for path, value in flat.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return params


def _source_positions(rule: Rule) -> np.ndarray:
    """For each element of the rule's target, the position of its source element among the
    rule's sources laid end to end."""
    offsets = np.cumsum([0, *(int(np.prod(shape)) for shape in rule.shapes)])
    numbered = [
        np.arange(offsets[i], offsets[i + 1], dtype=np.float64).reshape(shape)
        for i, shape in enumerate(rule.shapes)
    ]
    return np.asarray(rule.fn(*numbered)).astype(np.int64)


def from_params(params: Mapping[str, Any], rules: Rules, library: str) -> dict[str, np.ndarray]:
    """to_params in reverse: mmjax params (scanned layout) -> source tensors.

    A rule without sources is a parameter the other library has no tensor for; the params
    must then hold the value the import writes (rule.fn()), else the export is refused by
    name."""
    flat: dict[str, np.ndarray] = {}
    covered: dict[str, np.ndarray] = {}
    for rule in rules:
        value = params
        for key in rule.target:
            value = value[key]
        value = np.asarray(value, np.float32)
        if rule.layer is not None:
            value = value[rule.layer]
        name = "/".join(rule.target)
        if not rule.sources:
            if not np.array_equal(value, rule.fn()):
                raise ConversionError(
                    f"parameter {name} is not zero; {library}'s model has no such tensor"
                )
            continue
        positions = _source_positions(rule)
        offsets = np.cumsum([0, *(int(np.prod(shape)) for shape in rule.shapes)])
        for i, (source, shape) in enumerate(zip(rule.sources, rule.shapes, strict=True)):
            size = int(np.prod(shape))
            out = flat.setdefault(source, np.zeros(size, np.float32))
            seen = covered.setdefault(source, np.zeros(size, bool))
            mine = (positions >= offsets[i]) & (positions < offsets[i + 1])
            out[positions[mine] - offsets[i]] = value[mine]
            seen[positions[mine] - offsets[i]] = True
    for source, seen in covered.items():
        if not seen.all():  # The import rules leave part of a tensor unread: a mapping bug.
            raise ConversionError(f"export leaves part of {library} tensor {source} unset")
    shapes = rules.expected()
    return {source: flat[source].reshape(shapes[source]) for source in flat}
