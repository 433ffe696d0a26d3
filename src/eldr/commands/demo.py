"""`eldr demo`: `eldr simulate` on the trace and partition shipped in the package."""

from __future__ import annotations

import argparse
from typing import Any

from eldr.commands.simulate import add_sim_arguments, check_plot_path, experiment_of, simulate_and_report

DEFAULT_PLOT = "eldr-demo.png"


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="simulate every policy on the shipped OLMoE-derived trace and write a plot",
        description=(
            "Run the decode-pool simulator on the small trace shipped with eldr (real OLMoE-1B-7B "
            "routing on four text domains; see `eldr trace info` and docs/simulator.md) with the "
            "shipped partition, print the per-policy table and write a plot. No ../shared data needed."
        ),
    )
    add_sim_arguments(p, default_rate=60.0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help=f"plot to write (default {DEFAULT_PLOT} when matplotlib is installed: pip install 'eldr[plot]')",
    )
    p.add_argument("--no-plot", action="store_true", help="do not write a plot")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eldr import data
    from eldr.partition import Partition
    from eldr.sim.plot import has_matplotlib, pyplot
    from eldr.trace.format import Trace

    note = None
    if args.no_plot:
        args.plot = None
    elif args.plot is not None:
        pyplot()  # asked for by name: fail fast, before simulating, when matplotlib is missing
    elif has_matplotlib():
        args.plot = DEFAULT_PLOT
    elif not args.json:
        note = (
            f"no plot written: matplotlib is not installed (pip install 'eldr[plot]' to get {DEFAULT_PLOT})"
        )
    if args.plot is not None:
        check_plot_path(args.plot)
    experiment_of(args)  # settings checked before the trace is read
    trace = Trace.load(data.demo_trace_path())
    if args.partition is None and args.kmeans == "balanced" and args.calibration is None:
        shipped = data.demo_partition_path()
        if Partition.load(shipped).num_workers == args.workers:
            args.partition = str(shipped)
    code = simulate_and_report(args, trace, "demo trace")
    if note is not None:
        print(note)
    return code
