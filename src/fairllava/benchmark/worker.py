"""One benchmark step in its own process: ``python -m fairllava.benchmark.worker OUT STEP_ID THREADS``.

Started by the runner for ``--jobs N``; reads the plan from the results folder, so a worker can never run
a step of another plan.
"""
from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from ..errors import FairllavaError
    from .runner import execute_step, load_folder_plan, plan_steps

    out, step_id, threads = Path(argv[0]), argv[1], int(argv[2])
    try:
        plan = load_folder_plan(out)
        steps = {s.id: s for s in plan_steps(plan)}
        if step_id not in steps:
            raise FairllavaError(f"{out}: the plan has no step {step_id!r}")
        execute_step(plan, out, steps[step_id], threads, progress=True)
    except FairllavaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
