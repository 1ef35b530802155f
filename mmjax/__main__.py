"""The `mmjax` command: one verb per tool (`mmjax VERB --help` for each).

  mmjax train --config configs/coca.py:size=tiny --workdir runs/my_run
  python -m mmjax train ...            # the same, without the console script

`python -m mmjax.train` and `python -m mmjax.evaluate` stay as well (the research
convention). An unknown verb is one line and exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# verb -> (module whose main(argv) runs it, one line of help). A verb with sub-verbs maps to
# a dict of them; the sub-verb "" is the default (`mmjax bench ARGS` times the train step).
VERBS: dict[str, tuple[str, str] | dict[str, tuple[str, str]]] = {
    "train": ("mmjax.tools.train", "train (or resume) a run from a config"),
    "evaluate": ("mmjax.tools.evaluate", "run a workdir's evaluators on a checkpoint"),
    "caption": ("mmjax.tools.caption", "caption image files"),
    "classify": ("mmjax.tools.classify", "zero-shot classify image files"),
    "embed": ("mmjax.tools.embed", "image and text embeddings as one .npz"),
    "search": ("mmjax.tools.search", "index a folder of images, query it by text"),
    "sweep": ("mmjax.tools.sweep", "train the variants of an ablation config"),
    "report": ("mmjax.tools.report", "plots and tables comparing runs"),
    "plot": ("mmjax.tools.plot", "a run's training curves as one PNG"),
    "dryrun": ("mmjax.tools.dryrun", "compile the step for a mesh, report memory and FLOPs"),
    "convert": ("mmjax.interop.convert", "import open_clip, Hugging Face or big_vision weights"),
    "export": ("mmjax.interop.export", "export a run's weights for open_clip or Hugging Face"),
    "tokenizer": ("mmjax.tools.tokenizer", "train a tokenizer on a source, or encode a text"),
    "data": {
        "convert": ("mmjax.tools.data", "write a source as ArrayRecord shards"),
        "corpus": ("mmjax.tools.corpus", "write the built-in corpus as image files"),
    },
    "bench": {
        "": ("mmjax.benchmarks.train_step", "time the train step (MFU)"),
        "data": ("mmjax.benchmarks.data", "time the input pipeline"),
        "generate": ("mmjax.benchmarks.generate", "time KV-cached caption generation"),
        "search": ("mmjax.benchmarks.search", "time search indexing and queries"),
        "checkpoint": ("mmjax.benchmarks.checkpoint", "time checkpoint saves and restores"),
        "loss": ("mmjax.benchmarks.loss", "per-device memory of the sharded losses"),
    },
    "distributed": (
        "mmjax.runtime.distributed",
        "print how this process would join a multi-host run",
    ),
}
# Verbs whose steps run on this host's CPU when it has no accelerator (mmjax.runtime.host_memory).
TUNED = {("train", ""), ("evaluate", ""), ("sweep", ""), ("bench", "")}


def usage() -> str:
    lines = ["usage: mmjax VERB [ARGS...]   (mmjax VERB --help for a verb's arguments)", ""]
    for verb, target in VERBS.items():
        if isinstance(target, tuple):
            lines.append(f"  {verb:<22}{target[1]}")
            continue
        for sub, (_, text) in target.items():
            lines.append(f"  {(verb + ' ' + sub).strip():<22}{text}")
    return "\n".join(lines)


def resolve(argv: Sequence[str]) -> tuple[str, str, str, list[str]]:
    """(verb, sub-verb, module, the verb's own arguments); ValueError in one line."""
    if not argv:
        raise ValueError("no verb given; try mmjax --help")
    verb, rest = argv[0], list(argv[1:])
    target = VERBS.get(verb)
    if target is None:
        raise ValueError(f"unknown verb {verb!r}; verbs: {', '.join(VERBS)}")
    if isinstance(target, tuple):
        return verb, "", target[0], rest
    sub = rest[0] if rest and rest[0] in target and rest[0] else ""
    if sub:
        rest = rest[1:]
    elif "" not in target:
        given = f" {rest[0]!r}" if rest else ""
        raise ValueError(f"mmjax {verb}: unknown or missing sub-verb{given}; one of: "
                         f"{', '.join(target)}")  # fmt: skip
    return verb, sub, target[sub][0], rest


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    try:
        verb, sub, module, rest = resolve(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (verb, sub) in TUNED:
        from mmjax.runtime.host_memory import tune_host_memory

        tune_host_memory()  # Before JAX starts; may restart this process once.
    from mmjax.runtime import cli

    cli.invoked_as = f"mmjax {verb} {sub}".strip()
    return importlib.import_module(module).main(rest)


if __name__ == "__main__":
    sys.exit(main())
