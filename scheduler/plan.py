"""A step plan and its execution on the runners.

`Scheduler.schedule` (scheduler/scheduler.py) returns a StepPlan; the engine (scheduler/engine.py) runs
it with these functions in a worker thread, where they touch nothing but the runners
(workers.runner.ModelRunner: `execute`, or `launch` + `finish_reads` + `collect` when the step overlaps
the host's work).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.request import Request
from workers.batch import Segment


@dataclass
class StepPlan:
    """One step: the segments to run with their block tables (tables[i] belongs to items[i]),
    requests whose decoders are done, requests that failed to start."""

    items: list[tuple[Request, Segment]] = field(default_factory=list)
    tables: list[list[int]] = field(default_factory=list)
    done: list[Request] = field(default_factory=list)
    failed: list[tuple[Request, str | Exception]] = field(default_factory=list)  # an exception: its decoder's

    @property
    def packed_tokens(self) -> int:
        return sum(len(seg.token_ids) for _, seg in self.items)


def execute_plan(runners: dict, plan: StepPlan, only: list[int] | None = None) -> list:
    """Run the plan (or the items at indices `only`): one execute (one packed forward) per runner.
    Results aligned with plan.items (None for items not run). Called in a worker thread; touches
    nothing but the runners."""
    out: list = [None] * len(plan.items)
    groups: dict[str, list[int]] = {}
    for i in range(len(plan.items)) if only is None else only:
        groups.setdefault(plan.items[i][0].runner_key, []).append(i)
    for key, idxs in groups.items():
        results = runners[key].execute([plan.items[i][1] for i in idxs], [plan.tables[i] for i in idxs])
        for i, result in zip(idxs, results):
            out[i] = result
    return out


def launch_plan(runners: dict, plan: StepPlan) -> list[tuple[str, list[int], object]]:
    """Launch the plan without waiting for it: one `launch` per runner (workers.runner.ModelRunner.launch).
    Returns what collect_plan needs. Called in a worker thread; touches nothing but the runners."""
    groups: dict[str, list[int]] = {}
    for i, (req, _) in enumerate(plan.items):
        groups.setdefault(req.runner_key, []).append(i)
    return [(key, idxs, runners[key].launch([plan.items[i][1] for i in idxs], [plan.tables[i] for i in idxs]))
            for key, idxs in groups.items()]


def collect_plan(runners: dict, plan: StepPlan, launched: list[tuple[str, list[int], object]]) -> list:
    """The results of a launched plan (launch_plan), aligned with plan.items; waits for the device."""
    out: list = [None] * len(plan.items)
    for key, idxs, step in launched:
        for i, result in zip(idxs, runners[key].collect(step)):
            out[i] = result
    return out


def finish_plan(runners: dict, plan: StepPlan, launched: list[tuple[str, list[int], object]],
                bitmasks: list) -> None:
    """Finish a launched plan's deferred reads (workers.runner.ModelRunner.finish_reads): `bitmasks`
    aligned with plan.items (a Segment.deferred_mask segment's grammar bitmask, or None). Runners whose
    part of the plan deferred nothing are skipped. Called in a worker thread; touches nothing but the
    runners."""
    for key, idxs, step in launched:
        if any(plan.items[i][1].deferred_mask for i in idxs):
            runners[key].finish_reads(step, [bitmasks[i] for i in idxs])


def execute_isolated(runners: dict, plan: StepPlan) -> list:
    """After a failed step: run every item alone, so a fault one request causes ends only that request.
    Returns, aligned with plan.items, each item's result or the exception its own forward raised.
    Re-running is safe: the items' block tables are unchanged, and a rerun writes the same K/V into
    the same slots."""
    out: list = []
    for i in range(len(plan.items)):
        try:
            out.append(execute_plan(runners, plan, only=[i])[i])
        except Exception as exc:  # noqa: BLE001 - the culprit's own error, reported to it alone
            out.append(exc)
    return out
