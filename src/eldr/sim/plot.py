"""Plots of simulated runs (matplotlib, the `plot` extra; imported only when a plot is asked for)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from eldr.errors import ConfigError
from eldr.sim.engine import RunResult
from eldr.sim.report import PolicyMetrics


def has_matplotlib() -> bool:
    """Whether the `plot` extra is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive backend, or a one-line error naming the extra."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError("plots need matplotlib: pip install 'eldr[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_policies(
    metrics: Mapping[str, PolicyMetrics], runs: Mapping[str, RunResult], path: str | Path, title: str
) -> None:
    """Three panels: TPOT p50/p99 per policy, distinct experts per step, experts vs batch size."""
    plt = pyplot()
    names = list(metrics)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = np.arange(len(names))
    axes[0].bar(x - 0.2, [metrics[n].tpot_p50_ms for n in names], 0.4, label="p50")
    axes[0].bar(x + 0.2, [metrics[n].tpot_p99_ms for n in names], 0.4, label="p99")
    axes[0].set_xticks(x, names)
    axes[0].set_ylabel("TPOT (ms)")
    axes[0].legend()
    axes[1].bar(x, [metrics[n].distinct_experts_per_step for n in names], color="tab:green")
    axes[1].set_xticks(x, names)
    axes[1].set_ylabel("distinct experts per step (sum over recorded layers)")
    for name in names:
        run = runs[name]
        seen = np.flatnonzero(run.steps_by_batch >= 20)  # batch sizes with enough steps to average
        if seen.size:
            per_step = run.distinct_by_batch[seen].sum(axis=1) / run.steps_by_batch[seen]
            axes[2].plot(seen, per_step, label=name, lw=1.2)
    axes[2].set_xlabel("batch size (requests)")
    axes[2].set_ylabel("distinct experts per step")
    axes[2].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
