"""What data preparation kept, skipped and why: one `DataReport` per split."""

from __future__ import annotations

import dataclasses
from collections import Counter


class DataQualityError(ValueError):
    """Too many rows were invalid; the message names the counts and the threshold to raise."""


@dataclasses.dataclass
class DataReport:
    """Counts by reason. `invalid` rows were malformed (they count against `max_bad_fraction`);
    `dropped` rows were valid but filtered as the handbook did (prompt too long); `truncated`
    counts kept rows that TRL's truncation shortened."""

    rows: int = 0
    kept: int = 0
    invalid: Counter = dataclasses.field(default_factory=Counter)
    dropped: Counter = dataclasses.field(default_factory=Counter)
    truncated: Counter = dataclasses.field(default_factory=Counter)

    @property
    def num_invalid(self) -> int:
        return sum(self.invalid.values())

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def invalid_fraction(self) -> float:
        return self.num_invalid / self.rows if self.rows else 0.0

    def check(self, max_bad_fraction: float, name: str = "data") -> None:
        """Raises `DataQualityError` when more than `max_bad_fraction` of the rows were invalid."""
        if self.invalid_fraction > max_bad_fraction:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.invalid.items()))
            raise DataQualityError(
                f"{name}: {self.num_invalid} of {self.rows} rows invalid "
                f"({self.invalid_fraction:.1%} > max_bad_fraction={max_bad_fraction}): {reasons}. "
                "Fix the data or raise `max_bad_fraction`."
            )

    def summary(self, name: str = "data") -> str:
        lines = [f"{name}: {self.rows} rows -> {self.kept} examples"]
        for title, counts in (("invalid", self.invalid), ("dropped", self.dropped),
                              ("truncated", self.truncated)):
            if counts:
                detail = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
                lines.append(f"  {title}: {sum(counts.values())} ({detail})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "invalid": dict(self.invalid),
                "dropped": dict(self.dropped), "truncated": dict(self.truncated)}
