"""The CoT pipeline's statistics table: per problem type and data type, what survived each step.

Every record in scope is one :class:`Row`: its problem type, data type, and the step that dropped
it with the reason (both ``None`` when it was kept). Counts are derived from the drops only, so
they add up by construction: ``in = kept + every drop``, ``generated = in - step-1 drops``,
``passed step 2 = generated - step-2 drops``, ``kept = passed step 2 - step-3 drops``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from p2r.data.records import DATA_TYPES, PROBLEM_TYPES

STEPS = ("generation", "verification", "sufficiency")
# Failures of a service rather than of the sample: not written as finished, retried on the next run.
RETRIED_REASONS = frozenset({"teacher error", "judge error"})


@dataclass(frozen=True)
class Row:
    """One record's fate: kept (``dropped_at`` None) or dropped at a step for a reason."""

    problem_type: str
    data_type: str
    dropped_at: str | None = None
    reason: str | None = None


@dataclass
class GroupCounts:
    """Counts of one group of records (all, one problem type, or one data type)."""

    n_in: int = 0
    dropped: Counter[tuple[str, str]] = field(default_factory=Counter)  # (step, reason) -> records

    def surviving(self, step: str) -> int:
        """Records still in after ``step``."""
        upto = STEPS[: STEPS.index(step) + 1]
        return self.n_in - sum(n for (at, _), n in self.dropped.items() if at in upto)

    @property
    def generated(self) -> int:
        return self.surviving("generation")

    @property
    def passed_step2(self) -> int:
        return self.surviving("verification")

    @property
    def kept(self) -> int:
        return self.surviving("sufficiency")

    def to_dict(self) -> dict[str, Any]:
        dropped: dict[str, dict[str, int]] = {}
        for (step, reason), n in sorted(self.dropped.items(), key=lambda kv: (STEPS.index(kv[0][0]), kv[0][1])):
            dropped.setdefault(step, {})[reason] = n
        return {"in": self.n_in, "generated": self.generated, "passed_step2": self.passed_step2,
                "kept": self.kept, "dropped": dropped}


@dataclass
class Summary:
    """The table's groups: all records, each problem type, each data type (in the schema's order)."""

    all: GroupCounts
    problem_type: dict[str, GroupCounts]
    data_type: dict[str, GroupCounts]

    def groups(self) -> list[tuple[str, GroupCounts]]:
        return [("all", self.all), *self.problem_type.items(), *self.data_type.items()]

    def to_dict(self) -> dict[str, Any]:
        return {"all": self.all.to_dict(),
                "problem_type": {k: v.to_dict() for k, v in self.problem_type.items()},
                "data_type": {k: v.to_dict() for k, v in self.data_type.items()}}


def summarize(rows: Iterable[Row]) -> Summary:
    """Count rows per group; groups appear in the schema's order, only when they have records."""
    total = GroupCounts()
    by_problem: dict[str, GroupCounts] = {}
    by_data: dict[str, GroupCounts] = {}
    for row in rows:
        for counts in (total, by_problem.setdefault(row.problem_type, GroupCounts()),
                       by_data.setdefault(row.data_type, GroupCounts())):
            counts.n_in += 1
            if row.dropped_at is not None:
                counts.dropped[(row.dropped_at, row.reason or "unknown")] += 1

    def ordered(groups: dict[str, GroupCounts], order: tuple[str, ...]) -> dict[str, GroupCounts]:
        return {k: groups[k] for k in sorted(groups, key=lambda k: (order.index(k) if k in order else len(order), k))}

    return Summary(total, ordered(by_problem, PROBLEM_TYPES), ordered(by_data, DATA_TYPES))


def format_table(summary: Summary) -> str:
    """The paper-style table: survivors after each step per group, then drops by step and reason."""
    groups = summary.groups()
    label_width = max(len(label) for label, _ in groups) + 2
    head = f"{'':<{label_width}}{'in':>8}{'generated':>11}{'passed step 2':>15}{'kept (passed step 3)':>22}{'kept %':>8}"
    lines = [head]
    for index, (label, counts) in enumerate(groups):
        name = label if index == 0 else "  " + label
        share = 100 * counts.kept / counts.n_in if counts.n_in else 0.0
        lines.append(f"{name:<{label_width}}{counts.n_in:>8}{counts.generated:>11}{counts.passed_step2:>15}"
                     f"{counts.kept:>22}{share:>8.1f}")
    drops = sorted(summary.all.dropped, key=lambda k: (STEPS.index(k[0]), k[1]))
    if not drops:
        return "\n".join(lines)
    names = [f"{STEPS.index(step) + 1} {step}: {reason}{' *' if reason in RETRIED_REASONS else ''}" for step, reason in drops]
    reason_width = max(len(n) for n in names) + 2
    widths = [max(len(label), 5) + 2 for label, _ in groups]
    lines += ["", f"{'dropped at step: reason':<{reason_width}}" + "".join(f"{label:>{w}}" for (label, _), w in zip(groups, widths))]
    for name, key in zip(names, drops):
        lines.append(f"{name:<{reason_width}}" + "".join(f"{counts.dropped[key]:>{w}}" for (_, counts), w in zip(groups, widths)))
    if any(reason in RETRIED_REASONS for _, reason in drops):
        lines.append("* not written to the output: retried when the same command runs again")
    return "\n".join(lines)
