"""Ablation sweeps: run the named variants of a sweep config one after another, then compare.

  python -m mmjax.tools.sweep --config configs/ablations/losses.py:size=tiny --workdir ROOT \
      [--only a,b] [--print] [--config.KEY=VALUE ...]

A sweep config is a normal config file (its `get_config(arg)` is the base, so `mmjax.train`
accepts it as `--config`) that also defines `get_sweep()`: an ordered mapping
{variant name: {dotted config key: value}} of config deltas. Each variant trains in
ROOT/<variant> through `python -m mmjax.train --config SPEC --workdir ROOT/<variant>
--config.KEY=VALUE ...` (the common overrides first, then the variant's own, which win on the
keys they set). A finished variant (checkpoint at total_steps and its final eval logged) is
skipped; an interrupted one resumes from its latest checkpoint. A failing variant is reported
and the sweep goes on (exit code 1 at the end). `--print` only prints the commands, one per
line, for a cluster. At the end ROOT/summary.md has one row per variant: final eval metrics,
parameter count and mean step time; ROOT/{loss,learning_rate,eval}.png are the plots of
`python -m mmjax.tools.report`.

Exit codes: 0 all variants finished, 1 some failed, 2 bad config or arguments (nothing
ran), 130 stopped by SIGINT or SIGTERM (the running variant checkpoints; rerun to resume).
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from mmjax.models.coca import CoCa
from mmjax.models.config import ModelConfig
from mmjax.runtime import cli, paths
from mmjax.runtime.checkpoint import Checkpointer
from mmjax.runtime.config import ConfigError, load_config, load_module, split_config_flags
from mmjax.runtime.host_memory import tune_host_memory
from mmjax.runtime.metric_writer import METRICS_FILE, read_metrics
from mmjax.runtime.run_record import read_records
from mmjax.tools.report import eval_keys, write_report
from mmjax.training.state import dummy_batch

SUMMARY_FILE = "summary.md"
# Variant names become directory names next to summary.md and the plots: no dots or slashes.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def override_text(value: Any) -> str:
    """A delta value as the VALUE of --config.KEY=VALUE (what config_loading parses back)."""
    return value if isinstance(value, str) else repr(value)


def load_sweep(spec: str) -> dict[str, dict[str, Any]]:
    """The checked {variant: {key: value}} of the sweep file in `spec` ('path.py[:arg]')."""
    path = spec.partition(":")[0]
    module = load_module(path)
    if not callable(getattr(module, "get_sweep", None)):
        raise ConfigError(f"--config file {path!r} has no get_sweep() function: not a sweep")
    sweep = module.get_sweep()
    if not isinstance(sweep, Mapping) or not sweep:
        raise ConfigError(f"get_sweep() of {path!r} must return a non-empty mapping of variants")
    checked = {}
    for name, deltas in sweep.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(
                f"variant name {name!r} is not a safe directory name (letters, digits, _ and -)"
            )
        if name == Path(SUMMARY_FILE).stem:
            raise ConfigError(f"variant name {name!r} is reserved")
        if not isinstance(deltas, Mapping):
            raise ConfigError(f"variant {name!r}: deltas must be a mapping, not {deltas!r}")
        for key in deltas:
            if not isinstance(key, str) or not _KEY.fullmatch(key):
                raise ConfigError(f"variant {name!r}: {key!r} is not a dotted config key")
        checked[name] = dict(deltas)
    return checked


def variant_overrides(deltas: Mapping[str, Any], common: Sequence[str] = ()) -> list[str]:
    """'KEY=VALUE' overrides of one variant: the common ones, then the variant's (last wins)."""
    return [*common, *(f"{key}={override_text(value)}" for key, value in deltas.items())]


def train_command(spec: str, workdir: Path, overrides: Sequence[str], python: str) -> list[str]:
    return [
        python,
        "-m",
        "mmjax.train",
        "--config",
        spec,
        "--workdir",
        str(workdir),
        *(f"--config.{item}" for item in overrides),
    ]


def final_eval_step(workdir: Path) -> int | None:
    """The step of the last metrics record holding eval/ metrics, or None."""

    try:
        records = read_metrics(workdir)
    except (FileNotFoundError, ValueError):
        return None
    steps = [r["step"] for r in records if any(k.startswith("eval/") for k in r)]
    return max(steps, default=None)


def is_finished(workdir: Path, total_steps: int) -> bool:
    """Whether the run in `workdir` reached total_steps and logged its final evaluation."""
    if not (workdir / "checkpoints").is_dir():
        return False  # Checkpointer would create the folder; an unstarted run has none.

    checkpointer = Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        latest = checkpointer.latest_step()
    finally:
        checkpointer.close()
    return latest == total_steps and final_eval_step(workdir) == total_steps


def parameter_count(config) -> int:
    """Parameters of the model a config builds (shapes only: nothing is allocated)."""
    import jax

    model = CoCa(ModelConfig.from_mapping(config.model.to_dict()))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_batch(model)))
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes["params"]))


def mean_step_seconds(workdir: Path) -> float | None:
    """Mean `step_seconds` of the logged windows, leaving out the first window of every start
    of the run (it includes warm-up: the first steps' dispatch, data pipeline start)."""

    try:
        records = [r for r in read_metrics(workdir) if "step_seconds" in r]
    except (FileNotFoundError, ValueError):
        return None
    starts = {int(r.get("resumed_from_step") or 0) for r in read_records(workdir)} or {0}
    first_windows = set()
    for start in starts:
        later = [r["step"] for r in records if r["step"] > start]
        if later:
            first_windows.add(min(later))
    values = [r["step_seconds"] for r in records if r["step"] not in first_windows]
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _last(records: list[dict], key: str) -> float | None:
    for record in reversed(records):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _cell(value: float | None, digits: str = ".4g") -> str:
    return "" if value is None else format(value, digits)


def summary_table(root: Path, rows: Sequence[dict[str, Any]]) -> str:
    """Markdown, one row per variant: status, final step and loss, parameters, mean step time
    and the final value of every eval metric any variant logged (report.py's columns)."""

    runs = []
    for row in rows:
        try:
            records = read_metrics(root / row["variant"])
        except (FileNotFoundError, ValueError):
            records = []
        runs.append((row["variant"], records))
    keys = eval_keys(runs)
    header = ["variant", "status", "final step", "final loss", "params", "step s", *keys]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---", ":---"] + ["---:"] * (len(header) - 2)) + "|",
    ]
    for row, (name, records) in zip(rows, runs):
        steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
        cells = [
            name,
            row["status"],
            str(max(steps)) if steps else "",
            _cell(_last(records, "loss")),
            f"{row['params']:,}" if row.get("params") is not None else "",
            _cell(row.get("step_seconds"), ".3f"),
            *(_cell(_last(records, key)) for key in keys),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


class _Stop:
    """SIGINT/SIGTERM during a sweep: passed on to the running training (its own session, so
    a terminal's Ctrl-C reaches it once), which checkpoints and exits; no variant starts after."""

    def __init__(self):
        self.signum: int | None = None
        self.child: subprocess.Popen | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = self.signum or signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # Not the main thread: signals stay as they are.
                pass
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _stream(command: list[str], prefix: str, out: TextIO, stop: _Stop) -> int:
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,  # Universal newlines: tqdm's \r redraws come out as lines.
        bufsize=1,
        start_new_session=True,
    )
    stop.child = proc
    try:
        for line in proc.stdout:
            if line.strip():
                out.write(f"{prefix} {line.rstrip()}\n")
                out.flush()
        return proc.wait()
    finally:
        stop.child = None


def run_sweep(
    spec: str,
    root: str | Path,
    *,
    only: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    print_only: bool = False,
    out: TextIO | None = None,
    python: str = sys.executable,
) -> dict[str, str]:
    """Runs (or, with print_only, prints the commands of) the sweep `spec` into `root`.

    `only`: the variants to run now (summary.md still lists all). Returns {variant: status}
    of those, status one of 'finished', 'skipped (finished)', 'failed: ...',
    'interrupted' or, with print_only, 'printed'. Config mistakes raise ConfigError (nothing has
    run then): every variant's config is loaded and validated before the first one starts.
    """
    root, out = Path(root), out or sys.stdout
    sweep = load_sweep(spec)
    if only:
        unknown = [name for name in only if name not in sweep]
        if unknown:
            raise ConfigError(f"--only: unknown variant {unknown[0]!r}; variants: {list(sweep)}")
    try:
        load_config(spec, overrides)
    except ConfigError as e:
        raise ConfigError(f"common overrides: {e}") from None
    configs, plans = {}, {}
    for name, deltas in sweep.items():
        plans[name] = variant_overrides(deltas, overrides)
        try:
            configs[name] = load_config(spec, plans[name])
        except ConfigError as e:
            raise ConfigError(f"variant {name!r}: {e}") from None

    # summary.md covers every variant; --only picks the ones to run (or print) now.
    selected = [name for name in sweep if not only or name in only]
    if print_only:
        for name in selected:
            out.write(shlex.join(train_command(spec, root / name, plans[name], "python")) + "\n")
        return {name: "printed" for name in selected}

    statuses: dict[str, str] = {}
    with _Stop() as stop:
        for name in selected:
            workdir, total = root / name, configs[name].total_steps
            if stop.signum is not None:
                statuses[name] = "interrupted"  # Not started: the sweep was stopped.
                continue
            if is_finished(workdir, total):
                statuses[name] = "skipped (finished)"
            else:
                out.write(
                    f"[{name}] {shlex.join(train_command(spec, workdir, plans[name], 'python'))}\n"
                )
                out.flush()
                code = _stream(
                    train_command(spec, workdir, plans[name], python), f"[{name}]", out, stop
                )
                if is_finished(workdir, total):
                    statuses[name] = "finished"
                elif stop.signum is not None:
                    statuses[name] = "interrupted"
                elif code != 0:
                    statuses[name] = f"failed: exit code {code}"
                else:
                    statuses[name] = "failed: exited 0 without a final eval at total_steps"
            out.write(f"[{name}] {statuses[name]}\n")
            out.flush()
    if stop.signum is not None:
        out.write(
            f"sweep stopped by {signal.Signals(stop.signum).name}; rerun the same command to "
            "resume\n"
        )
        return statuses
    write_summary(root, sweep, configs, statuses, out)
    return statuses


def _earlier_status(workdir: Path, config) -> str:
    """The status of a variant this invocation did not select (--only)."""
    if is_finished(workdir, config.total_steps):
        return "finished"
    return "incomplete" if workdir.is_dir() else "not run"


def write_summary(root: Path, sweep, configs, statuses: Mapping[str, str], out: TextIO) -> None:

    rows = []
    for name in sweep:
        rows.append(
            dict(
                variant=name,
                status=statuses.get(name) or _earlier_status(root / name, configs[name]),
                params=parameter_count(configs[name]),
                step_seconds=mean_step_seconds(root / name),
            )
        )
    with_metrics = [name for name in sweep if (root / name / METRICS_FILE).is_file()]
    if with_metrics:
        try:
            # The report's own summary.md is replaced below by the sweep's, which adds columns.
            write_report([root / name for name in with_metrics], root, names=with_metrics)
        except ValueError as e:  # A variant that failed before logging anything.
            out.write(f"plots not written: {e}\n")
    root.mkdir(parents=True, exist_ok=True)
    table = summary_table(root, rows)
    (root / SUMMARY_FILE).write_text(table)
    out.write(table)
    out.write(f"wrote {root / SUMMARY_FILE}" + (" and the plots\n" if with_metrics else "\n"))


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    rest, overrides = split_config_flags(argv)
    parser = cli.ArgumentParser(
        prog="python -m mmjax.tools.sweep", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", required=True, help="configs/ablations/FILE.py[:ARG]")
    parser.add_argument("--workdir", required=True, help="ROOT: one folder per variant in it")
    parser.add_argument("--only", default=None, help="comma-separated variants to run")
    parser.add_argument("--print", action="store_true", help="print the commands and exit")
    return parser.parse_args(rest), overrides


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, overrides = parse_args(argv)
        only = [n for n in args.only.split(",") if n] if args.only is not None else None
        paths.workdir(args.workdir)  # A file there: one line, before anything runs.
        if not args.print:
            import jax

            # This process only reads checkpoints and shapes: leave the accelerator to training.
            jax.config.update("jax_platforms", "cpu")
        statuses = run_sweep(
            args.config, args.workdir, only=only, overrides=overrides, print_only=args.print
        )
    except (ConfigError, paths.PathError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if any(status == "interrupted" for status in statuses.values()):
        return 130
    failed = [name for name, status in statuses.items() if status.startswith("failed")]
    if failed:
        print(f"error: variants failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    tune_host_memory()
    sys.exit(main())
