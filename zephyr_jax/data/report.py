"""What data preparation kept, skipped and why: one `DataReport` per split, and the errors."""

from __future__ import annotations

import dataclasses
from collections import Counter

THRESHOLD_KEY = "max_bad_row_fraction"
"""The training config key that sets how many invalid rows are tolerated."""


class DataError(ValueError):
    """Data that cannot be used as given; the message says what to change."""


class DataQualityError(DataError):
    """Too many rows were invalid; the message names the counts and the threshold key."""


@dataclasses.dataclass
class DataReport:
    """Counts by reason. `invalid` rows were malformed (they count against the threshold);
    `dropped` rows were valid but filtered as the handbook did (prompt too long); `truncated`
    counts kept rows that TRL's truncation shortened."""

    source: str = "data"
    rows: int = 0
    kept: int = 0
    invalid: Counter = dataclasses.field(default_factory=Counter)
    dropped: Counter = dataclasses.field(default_factory=Counter)
    truncated: Counter = dataclasses.field(default_factory=Counter)
    # the first few invalid rows' details per reason ("row 17: chosen has role 'human'"), so an
    # error shows what is wrong, not only how often
    examples: dict = dataclasses.field(default_factory=dict)

    MAX_EXAMPLES = 3

    def add_invalid(self, reason: str, detail: str) -> None:
        self.invalid[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.MAX_EXAMPLES:
            shown.append(detail)

    @property
    def num_invalid(self) -> int:
        return sum(self.invalid.values())

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def invalid_fraction(self) -> float:
        return self.num_invalid / self.rows if self.rows else 0.0

    def check(self, max_bad_fraction: float) -> None:
        """Raises `DataQualityError` when more than `max_bad_fraction` of the rows were invalid."""
        if self.invalid_fraction > max_bad_fraction:
            raise DataQualityError(
                f"{self.source}: {self.num_invalid} of {self.rows} rows are invalid "
                f"({self.invalid_fraction:.1%} > {THRESHOLD_KEY}={max_bad_fraction}): "
                f"{_counts(self.invalid)}; for example {self._examples_text()}. Fix the data "
                f"or raise {THRESHOLD_KEY}.")

    def _examples_text(self) -> str:
        return "; ".join(f"{reason}: " + ", ".join(self.examples.get(reason, []))
                         for reason in sorted(self.invalid))

    def summary(self) -> str:
        """One line: rows in, examples out, and the counts by reason."""
        parts = [f"{self.rows} rows -> {self.kept} examples"]
        for title, counts in (("invalid", self.invalid), ("dropped", self.dropped),
                              ("truncated", self.truncated)):
            if counts:
                parts.append(f"{title} {sum(counts.values())} ({_counts(counts)})")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"source": self.source, "rows": self.rows, "kept": self.kept,
                "invalid": dict(self.invalid), "dropped": dict(self.dropped),
                "truncated": dict(self.truncated)}


def _counts(counts: Counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
