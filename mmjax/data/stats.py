"""Counts of skipped samples and truncated captions, per source and reason.

Every example the pipeline yields carries a small count array [num_sources,
len(COUNTERS)] (the bad samples it skipped on its way, the one it used, and
whether its caption was cut), and batches sum them. The trainer adds up the
batches it consumed, so the counts are exact for the steps trained, survive a
resume through the checkpoint metadata, and do not depend on read-ahead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmjax.data.records import REASONS

COUNTERS = (*REASONS, "used", "truncated_caption")
COLUMN = {name: i for i, name in enumerate(COUNTERS)}
_SKIP_COLUMNS = slice(0, len(REASONS))


class DataError(RuntimeError):
    """The data cannot be trained on (too many bad samples); the message says why."""


def empty_counts(num_sources: int) -> np.ndarray:
    return np.zeros((num_sources, len(COUNTERS)), np.int64)


class DataStats:
    """Running totals of the counters for the sources of one pipeline."""

    def __init__(self, source_names: Sequence[str]):
        self.source_names = list(source_names)
        self.counts = empty_counts(len(self.source_names))

    def add(self, counts: np.ndarray) -> None:
        self.counts += np.asarray(counts, np.int64)

    def metrics(self, counts: np.ndarray | None = None) -> dict[str, float]:
        """{'data/skipped_<reason>': n, 'data/truncated_captions': n, ...}, summed over sources."""
        totals = (self.counts if counts is None else counts).sum(axis=0)
        out = {f"data/skipped_{reason}": float(totals[COLUMN[reason]]) for reason in REASONS}
        out["data/skipped"] = float(totals[_SKIP_COLUMNS].sum())
        out["data/truncated_captions"] = float(totals[COLUMN["truncated_caption"]])
        out["data/used"] = float(totals[COLUMN["used"]])
        return out

    def over_limit(self, max_skip_fraction: float) -> list[tuple[str, int, int, str]]:
        """(source, skipped, seen, commonest reason) of each source that skipped more than
        `max_skip_fraction` of the samples read from it."""
        out = []
        for name, row in zip(self.source_names, self.counts, strict=True):
            skipped = int(row[_SKIP_COLUMNS].sum())
            seen = skipped + int(row[COLUMN["used"]])
            if seen and skipped > max_skip_fraction * seen:
                out.append((name, skipped, seen, REASONS[int(np.argmax(row[_SKIP_COLUMNS]))]))
        return out

    def check(self, max_skip_fraction: float, min_samples: int) -> list[str]:
        """Raises DataError when a source skipped more than `max_skip_fraction` of its
        samples, once it has been read `min_samples` times (judged per source, so a healthy
        large source cannot hide a broken small one in a mixture). Below that count the
        same finding is returned as warnings (one line per source) instead."""
        warnings = []
        for name, skipped, seen, commonest in self.over_limit(max_skip_fraction):
            finding = (
                f"source {name}: {skipped} of {seen} samples read were bad "
                f"({skipped / seen:.1%} > data.max_skip_fraction={max_skip_fraction}); "
                f"commonest reason: {commonest} "
                f"({int(self.counts[self.source_names.index(name), COLUMN[commonest]])} samples)"
            )
            if seen >= max(min_samples, 1):
                raise DataError(finding)
            warnings.append(
                f"{finding}; the run goes on only because fewer than "
                f"data.min_samples_for_skip_check={min_samples} were read"
            )
        return warnings

    def summary(self, counts: np.ndarray | None = None) -> str:
        """Multi-line table: per source, samples used, skipped by reason, truncated captions."""
        counts = self.counts if counts is None else counts
        lines = []
        for name, row in zip(self.source_names, counts, strict=True):
            skipped = {r: int(row[COLUMN[r]]) for r in REASONS if row[COLUMN[r]]}
            detail = ", ".join(f"{r}={n}" for r, n in skipped.items()) or "none"
            lines.append(
                f"{name}: used {int(row[COLUMN['used']])}, skipped {sum(skipped.values())} "
                f"({detail}), truncated captions {int(row[COLUMN['truncated_caption']])}"
            )
        return "\n".join(lines)

    def to_json(self, counts: np.ndarray | None = None) -> dict:
        counts = self.counts if counts is None else counts
        return {
            "sources": self.source_names,
            "counters": list(COUNTERS),
            "counts": np.asarray(counts).tolist(),
        }

    def load_json(self, saved: dict) -> None:
        """Restores totals saved by to_json (same sources; counters are matched by name, so
        counts saved before a counter was added restore with that counter at zero)."""
        counters = list(saved.get("counters") or ())
        if saved.get("sources") != self.source_names or not set(counters) <= set(COUNTERS):
            raise ValueError(
                f"checkpointed data counts are for sources {saved.get('sources')}, "
                f"this run reads {self.source_names}"
            )
        values = np.asarray(saved["counts"], np.int64).reshape(len(self.source_names), -1)
        counts = empty_counts(len(self.source_names))
        counts[:, [COLUMN[name] for name in counters]] = values
        self.counts = counts
