"""Train (or resume) a run from a config: `mmjax train`.

  mmjax train --config configs/coca.py:size=tiny --workdir DIR [--config.KEY=VALUE ...]

Running the same command on an existing workdir resumes from its latest readable
checkpoint. Exit codes: 2 a bad config, path or refused run; 3 the loss diverged;
4 the data had too many bad samples (or a source none usable).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from mmjax.data.stats import DataError
from mmjax.evals.suite import EvalSuite
from mmjax.runtime import cli, distributed, log, paths, run_record
from mmjax.runtime.checkpoint import CheckpointError
from mmjax.runtime.config import ConfigError, load_config, split_config_flags
from mmjax.training.trainer import Trainer, TrainingDiverged


def run_evaluators(trainer: Trainer) -> EvalSuite:
    """The evaluators of the trainer's config, on its model, mesh and tokenizer."""
    return EvalSuite(
        trainer.config,
        trainer.model,
        trainer.mesh,
        trainer.rules,
        trainer.tokenizer,
        workdir=trainer.workdir,
    )


def make_trainer(config, workdir, **kwargs) -> Trainer:
    """A Trainer that evaluates as `mmjax train` does (config.eval and config.evals)."""
    return Trainer(config, workdir, evaluator=run_evaluators, **kwargs)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    rest, overrides = split_config_flags(argv)
    parser = cli.ArgumentParser(prog="python -m mmjax.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/FILE.py[:ARG]")
    parser.add_argument("--workdir", required=True, help="where checkpoints and metrics go")
    return parser.parse_args(rest), overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, overrides = parse_args(argv)
        workdir = paths.workdir(args.workdir)
        distributed.initialize()  # Before anything touches the devices.
        config = load_config(args.config, overrides)
        trainer = make_trainer(config, workdir)
    except (ConfigError, paths.PathError, FileNotFoundError, distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # A source with no usable sample.
        print(f"error: {e}", file=sys.stderr)
        return 4
    try:
        trainer.fit()
    except (run_record.RunRefused, CheckpointError) as e:  # Workdir in use, config changed,
        print(f"error: {e}", file=sys.stderr)  # or no checkpoint that restores.
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    finally:
        trainer.close()
    if trainer.is_chief and trainer.preempted_at is not None:
        saved = trainer.checkpointer.directory / str(trainer.preempted_at)
        log.info(
            f"preempted at step {trainer.preempted_at}"
            + (f", checkpoint saved in {saved}" if saved.is_dir() else "")
            + f"; to resume, rerun the same command: {cli.invoked_as or 'python -m mmjax.train'} "
            + shlex.join(argv)
        )
    elif trainer.is_chief:
        log.info(
            f"done: metrics in {workdir / 'metrics.jsonl'}, checkpoints in "
            f"{workdir / 'checkpoints'}, TensorBoard logs in "
            f"{workdir / 'tensorboard'}"
        )
        for warning in trainer.data_warnings():
            log.warning(warning)
    return 0


if __name__ == "__main__":
    from mmjax.runtime.host_memory import tune_host_memory

    tune_host_memory()
    sys.exit(main())
