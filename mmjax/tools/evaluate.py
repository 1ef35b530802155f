"""Evaluate a trained run: every evaluator of its config (mmjax.evals.suite), or some.

  python -m mmjax.evaluate --workdir DIR [--step N] [--only default,zeroshot]
      [--format clip_benchmark]
      [--config.evals.NAME.type=zeroshot --config.evals.NAME.classes=FILE ...]

restores the latest (or the given) checkpoint of DIR, runs the default evaluation
(retrieval + greedy captions on data.eval, keys eval/...) and the named evaluators of
config.evals (keys eval/NAME/...), and writes DIR/eval.json. Evaluators can be added or
changed on the command line. Eval batches are sharded over the mesh like training batches;
padding rows are dropped, so every example counts once on any number of devices or processes.

`--format clip_benchmark` also writes DIR/eval/clip_benchmark/NAME.json for every zero-shot and
retrieval evaluation, in CLIP_benchmark's schema (mmjax.evals.clip_benchmark).
"""

from __future__ import annotations

import json
import sys

import jax

from mmjax import storage
from mmjax.data.stats import DataError
from mmjax.evals import clip_benchmark
from mmjax.evals.suite import EvalSuite
from mmjax.runtime import cli, distributed, log, paths
from mmjax.runtime.checkpoint import CheckpointError, read_params
from mmjax.runtime.config import ConfigError, apply_overrides, from_json_file, split_config_flags
from mmjax.training.setup import build_run, existing_tokenizer


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = split_config_flags(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parser = cli.ArgumentParser(prog="python -m mmjax.evaluate")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument(
        "--only", default="", help="comma-separated evaluators to run ('default' or names)"
    )
    parser.add_argument(
        "--format",
        choices=("mmjax", "clip_benchmark"),
        default="mmjax",
        help="clip_benchmark: also one CLIP_benchmark JSON per zero-shot/retrieval evaluation",
    )
    args = parser.parse_args(rest)
    try:  # Before anything touches the devices.
        distributed.initialize()
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        workdir = paths.run_dir(args.workdir)
    except paths.PathError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = from_json_file(workdir / "config.json")
    try:
        apply_overrides(config, overrides)
        # The training run's mesh, rules and model; only the eval sources are opened. Its
        # config.json already holds the model init_from gave it (that run may be gone).
        run = build_run(config, adopt_init_from_model=False)
        tokenizer = existing_tokenizer(config, workdir, run.model_cfg)
        suite = EvalSuite(config, run.model, run.mesh, run.rules, tokenizer, workdir=workdir)
        # Parameters only: also reads directories without optimizer state
        # (mmjax.interop.open_clip's output).
        step, params = read_params(
            workdir / "checkpoints",
            run.abstract_params,
            args.step,
            warn=log.warning,
        )
    except (ConfigError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # An eval source with no usable sample.
        print(f"error: {e}", file=sys.stderr)
        return 4
    only = [name for name in args.only.split(",") if name] or None
    unknown = sorted(set(only or ()) - {"default", *suite.named})
    if unknown:
        print(
            f"error: --only {unknown}: no such evaluator; this config has "
            f"{['default', *suite.named]}",
            file=sys.stderr,
        )
        return 2
    metrics = suite.run(params, step, everything=True, only=only)
    metrics["step"] = step
    if jax.process_index() == 0:
        storage.write_text(workdir / "eval.json", json.dumps(metrics, indent=2, sort_keys=True))
        for key, value in sorted(metrics.items()):
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
        for ref, hyp in suite.default.last_samples[:5]:
            print(f"  reference: {ref!r}\n  generated: {hyp!r}")
        print(f"wrote {workdir / 'eval.json'}")
        if args.format == "clip_benchmark":
            evaluators = {"default": ("default", config.data.eval)}
            evaluators.update(
                {n: (e.type_name, e.settings["data"]) for n, e in suite.named.items()}
            )
            found = clip_benchmark.records(
                metrics, evaluators, model=workdir.name, pretrained=f"{workdir}@{step}"
            )
            for name, record in found.items():
                path = workdir / "eval" / "clip_benchmark" / f"{name}.json"
                storage.mkdir(path.parent)
                storage.write_text(path, json.dumps(record, indent=2))
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from mmjax.runtime.host_memory import tune_host_memory

    tune_host_memory()
    sys.exit(main())
