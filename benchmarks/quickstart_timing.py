"""Where a sweep's wall time went, from what its MLflow runs recorded.

    python benchmarks/quickstart_timing.py --tracking-uri sqlite:///mlruns.db --experiment quickstart

For the experiment's latest sweep run: the sweep's wall time, then per trial (from run
start/end times and metric timestamps) set-up until θ0's evaluation was logged (placement
group, rollout actor and learner start, model load, θ0's greedy test accuracy and its
held-out sample pairs), the steps (sum of `step_time_s`), the time between steps that
`step_time_s` does not cover (MLflow logging, Ray Train reports), the final evaluation and
clean-up; and the overlap analysis run. Times are medians over trials, with the sum.
"""

from __future__ import annotations

import argparse
import statistics

from mlflow.tracking import MlflowClient

from rlsparsity.contracts.mlflow_layout import (
    KIND_ANALYSIS,
    KIND_SWEEP,
    KIND_TAG,
    KIND_TRIAL,
    PARENT_TAG,
)


def _times(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, int, float]]:
    return sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))


def trial_phases(client: MlflowClient, run) -> dict[str, float]:
    rid, start, end = run.info.run_id, run.info.start_time, run.info.end_time
    before = _times(client, rid, "test_accuracy_before")[0][1]
    steps = _times(client, rid, "step_time_s")
    after = _times(client, rid, "test_accuracy_after")[0][1]
    first_step_end, last_step_end = steps[0][1], steps[-1][1]
    compute = sum(v for _, _, v in steps)
    return {
        "set-up + θ0 eval": (before - start) / 1e3,
        "steps (step_time_s)": compute,
        "between steps": (last_step_end - before) / 1e3 - compute,
        "final eval": (after - last_step_end) / 1e3,
        "clean-up": (end - after) / 1e3,
        "trial total": (end - start) / 1e3,
        "_first_step_end": first_step_end,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri", default="sqlite:///mlruns.db")
    ap.add_argument("--experiment", default="quickstart")
    args = ap.parse_args()
    client = MlflowClient(tracking_uri=args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    (sweep,) = client.search_runs([exp.experiment_id], f"tags.`{KIND_TAG}` = '{KIND_SWEEP}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    children = client.search_runs([exp.experiment_id], f"tags.`{PARENT_TAG}` = '{sweep.info.run_id}'")
    trials = [r for r in children if r.data.tags.get(KIND_TAG) == KIND_TRIAL]
    analyses = [r for r in children if r.data.tags.get(KIND_TAG) == KIND_ANALYSIS]
    phases = [trial_phases(client, r) for r in trials]
    first_trial = min(r.info.start_time for r in trials)
    last_trial = max(r.info.end_time for r in trials)
    print(f"sweep {args.experiment} ({sweep.info.run_id}): {len(trials)} trials")
    print(f"  sweep wall time            {(sweep.info.end_time - sweep.info.start_time) / 1e3:8.1f} s")
    print(f"  sweep start → first trial  {(first_trial - sweep.info.start_time) / 1e3:8.1f} s  (Ray start, Tune)")
    print(f"  first trial → last trial   {(last_trial - first_trial) / 1e3:8.1f} s")
    for a in analyses:
        print(f"  overlap analysis run       {(a.info.end_time - a.info.start_time) / 1e3:8.1f} s")
    print("  per trial                    median       sum")
    for key in phases[0]:
        if key.startswith("_"):
            continue
        vals = [p[key] for p in phases]
        print(f"    {key:24s} {statistics.median(vals):8.1f} s {sum(vals):8.1f} s")


if __name__ == "__main__":
    main()
