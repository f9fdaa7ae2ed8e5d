"""The ``scenario`` command: one entry point, one subcommand per job.

Errors end with a one-line reason and a non-zero exit (2: bad input, 1: the job failed); ``--debug``
shows the traceback instead. ``kill -USR1 PID`` prints every thread's stack (a run that seems stuck).
"""

from __future__ import annotations

import argparse
import faulthandler
import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..netem.lock import EmulationBusy
from ..scenarios.schema import MAX_EMULATED_NODES, ScenarioError, load_scenario
from .errors import CommandError, require_folders
from .launch import RunFailed
from .simulate_cli import (calibration, cmd_calibrate, cmd_crossval, cmd_predict, cmd_profile, cmd_published,
                           cmd_simcheck)

MAX_LOCAL_RANKS = MAX_EMULATED_NODES




def cmd_validate(args: argparse.Namespace, console: Console) -> int:
    for path in args.scenarios:
        s = load_scenario(path)
        if s.model.path is not None:
            from ..runtime.models import check_folder

            try:
                check_folder(s.model, s.conditions)
            except ScenarioError as e:
                raise ScenarioError(f"{path}: {e}") from None
        own = sum(node.link is not None for node in s.nodes)
        links = (f"access link {s.link.describe()} (node to node {s.link.then(s.link).describe()})"
                 if s.topology == "star" else f"link {s.link.describe()}")
        links += f", {own} nodes with their own" if own else ""
        if s.hardware:
            from ..simulator.predict import describe_hardware

            links = f"predicted on {describe_hardware(s, None)}" + (f", {links}" if s.sets_links else "")
        console.print(f"[green]ok[/] {path}: {s.name}, {s.world_size} nodes, {links}, "
                      f"{len(s.methods)} methods ({', '.join(m.name for m in s.methods)}), "
                      f"{s.steps} steps, warmup {s.warmup.mode} x{s.warmup.steps}")
    return 0


def cmd_profiles(args: argparse.Namespace, console: Console) -> int:
    from ..netem.profiles import named_profiles

    table = Table(title="link profiles (netem/profiles.yaml)")
    for col in ("name", "rate", "delay (one-way)", "jitter", "loss"):
        table.add_column(col)
    for name, p in named_profiles().items():
        table.add_row(name, "unlimited" if p.rate_mbit is None else f"{p.rate_mbit:g} Mbit/s",
                      f"{p.delay_ms:g} ms", f"{p.jitter_ms:g} ms", f"{p.loss_pct:g} %")
    console.print(table)
    return 0


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from .run import run_scenario

    scenario = load_scenario(args.scenario)
    output = Path(args.output) if args.output else Path(scenario.output)
    if args.emit:
        import datetime

        from .hosts import host_plan, slurm_script

        if args.emit == "plan" and not scenario.on_hosts:
            raise CommandError("--emit plan is for the hosts form (every node with a `host:` address)")
        results = (output / f"{args.emit}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}").resolve()
        text = host_plan(scenario, results) if args.emit == "plan" else slurm_script(scenario, results, args.backend)
        target = results / ("hosts_plan.sh" if args.emit == "plan" else f"{scenario.name}.sbatch")
        target.write_text(text)
        console.print(text, markup=False, highlight=False, soft_wrap=True)
        console.print(f"written to {target}" + (f" (submit: sbatch {target})" if args.emit == "slurm" else ""))
        return 0
    if scenario.on_hosts:
        from .remote_run import run_on_hosts

        _, rows = run_on_hosts(scenario, output, console, backend=args.backend,
                               accept_link_error=args.accept_link_error, bound=not args.no_bound,
                               ideal=not args.no_ideal)
    else:
        if scenario.world_size > MAX_LOCAL_RANKS:
            raise CommandError(f"{scenario.world_size} nodes do not fit one machine's emulation "
                               f"(at most {MAX_LOCAL_RANKS}); use `scenario predict` for larger clusters")
        _, rows = run_scenario(scenario, output, console, backend=args.backend, shaping=not args.no_shaping,
                               bound=not args.no_bound, force=args.force,
                               accept_link_error=args.accept_link_error, ideal=not args.no_ideal)
    failed = [r for r in rows if r.status != "ok"]
    if failed:
        raise CommandError(f"{len(failed)} of {len(rows)} method runs failed (first: {failed[0].method}: "
                           f"{failed[0].error})")
    return 0


def cmd_regress(args: argparse.Namespace, console: Console) -> int:
    import json

    from .regress import baseline_of, compare, figures, write_baseline
    from .run import run_scenario

    scenario = load_scenario(args.scenario)
    baseline = Path(args.baseline)
    if not args.update and not baseline.is_file():
        raise CommandError(f"no baseline at {baseline}; create it with --update")
    if args.repeats < 1 or (args.repeats > 1 and not args.update):
        raise CommandError("--repeats is a count of at least 1, for --update")
    repeats = []
    for k in range(args.repeats):
        if args.repeats > 1:
            console.print(f"[bold]repeat {k + 1} of {args.repeats}[/]")
        results, rows = run_scenario(scenario, Path(args.output or scenario.output), console, bound=False,
                                     ideal=False)
        failed = [r for r in rows if r.status != "ok"]
        if failed:
            raise CommandError(f"{failed[0].method} failed: {failed[0].error}")
        repeats.append(figures(results))
    if args.update:
        write_baseline(baseline, baseline_of(repeats, scenario.name))
        console.print(f"baseline written: {baseline} (median of {len(repeats)} runs, tolerances from their spread)")
        return 0
    measured = repeats[0]
    checks = compare(measured, json.loads(baseline.read_text()))
    for c in checks:
        console.print(c.line(), markup=False)
    bad = [c for c in checks if not c.ok]
    console.print(f"{len(checks) - len(bad)} of {len(checks)} figures within tolerance")
    if bad:
        raise CommandError(f"{len(bad)} figure(s) regressed against {baseline} (first: {bad[0].method} "
                           f"{bad[0].figure})")
    return 0


def cmd_dashboard(args: argparse.Namespace, console: Console) -> int:
    from ..dashboards.app import create_app

    require_folders(args.results)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] serving on {args.host}: reachable from other machines")
    app = create_app([Path(p) for p in args.results], calibration(args))
    console.print(f"dashboard on http://{args.host}:{args.port}/ (Ctrl-C to stop)")
    app.run(host=args.host, port=args.port, debug=False)
    return 0


def cmd_netem(args: argparse.Namespace, console: Console) -> int:
    from ..netem.cluster import check_backend, cleanup_stale

    if args.netem_cmd == "profiles":
        return cmd_profiles(args, console)
    if args.netem_cmd == "cleanup":
        removed = cleanup_stale()
        console.print(f"removed: {', '.join(removed)}" if removed else "nothing to clean up (only resources "
                      "recorded by this project's runs, whose owner process is gone, are ever removed)")
        return 0
    check = check_backend()
    console.print(f"backend: {check.backend or 'none'}")
    console.print(f"why: {check.reason}")
    for d in check.details:
        console.print(f"  {d}")
    return 0 if check.backend else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scenario",
        description="Emulate, simulate and compare residual-compressed parallel DiT inference on slow links.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("run", help="run every method of a scenario (emulated cluster, or its hosts over SSH), write a "
                                   "results folder",
                       description="Build the emulated cluster (network namespaces + shaped links), or log into the "
                                   "hosts of a hosts-form scenario over SSH and shape their NICs; run each method "
                                   "with real xDiT ranks, and write per-step records, a summary table and plots to "
                                   "the scenario's output folder.")
    s.add_argument("scenario", help="scenario YAML file, e.g. scenarios/edge_4node.yaml")
    s.add_argument("--output", help="results folder (default: the scenario's `output`)")
    s.add_argument("--backend", default="auto", choices=["auto", "torch", "numba", "triton"],
                   help="codec backend (auto: Triton on CUDA, Numba on CPU)")
    s.add_argument("--no-shaping", action="store_true", help="run on unshaped loopback even when root")
    s.add_argument("--no-bound", action="store_true",
                   help="skip the same-run bound pass (rate unlimited, delay kept)")
    s.add_argument("--no-ideal", action="store_true",
                   help="skip the same-run ideal pass (no shaping, no added delay)")
    s.add_argument("--force", action="store_true",
                   help="run even if another emulation holds this host (results marked contaminated)")
    s.add_argument("--accept-link-error", action="store_true",
                   help="run even if a probed link misses its profile by more than 10%% (recorded in summary.json)")
    s.add_argument("--emit", choices=["plan", "slurm"],
                   help="write instead of running: plan (the hosts form: what each machine runs) or slurm (an "
                        "sbatch script: srun + torchrun, one task per machine)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("validate", help="check scenario files against the schema",
                       description="Validate scenario YAML files and print a one-line summary of each.")
    s.add_argument("scenarios", nargs="+")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("predict", help="predict a scenario's latency table with the calibrated simulator",
                       description="Run the SimPy model for any node count, link mix and model size and print "
                                   "the same table `scenario run` prints, predicted.")
    s.add_argument("scenario")
    s.add_argument("--calibration", help="calibration folder (default: the shipped one)")
    s.add_argument("--device", default=None,
                   help="a shipped GPU profile (overrides the scenario's hardware.device) or cpu, the emulation "
                        "host's calibrated profile (default: the scenario's hardware, else cpu)")
    s.add_argument("--probe-host", action="store_true",
                   help="emulated scenarios: first measure this machine as `scenario run` does (its pace, from the "
                        "single-process reference generation, and what an exchange costs beside the scenario's "
                        "computing ranks; about 5-15 s), then scale compute by that pace and price every exchange at "
                        "no less, as simcheck does for a run")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("published", help="predict published GPU tables (CompactFusion, xDiT) side by side",
                       description="Predict every published multi-GPU set shipped in simulator/profiles/"
                                   "published.yaml, each anchored only by its own single-device time; print "
                                   "predicted against published latency and speedup, with the source of each set.")
    s.add_argument("sets", nargs="*", help="set names (default: all)")
    s.set_defaults(func=cmd_published)
    s = sub.add_parser("profile", help="measure this machine as a device profile (GEMM, memory, DiT blocks, codec, "
                                       "all-gather between ranks)",
                       description="Measure the machine it runs on (CUDA where present, else the CPU) with random "
                                   "weights, and write <name>.devices.yaml and <name>.links.yaml in the shipped "
                                   "profiles' form.")
    s.add_argument("--name", default="this-host", help="profile name (default: this-host)")
    s.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "simulator" / "profiles"),
                   help="folder to write to (default: simulator/profiles, where predictions find it)")
    s.add_argument("--no-collective", action="store_true", help="skip the all-gather between ranks")
    s.set_defaults(func=cmd_profile)
    s = sub.add_parser("regress", help="run a scenario and compare its figures with a committed baseline",
                       description="Run the scenario (shaped links, no bound pass) and compare bytes on wire, "
                                   "compression ratio, quality, the exchange against the hop model and the latency "
                                   "against the simulator (host-independent figures) with the baseline's "
                                   "tolerances; --update rewrites the baseline instead.")
    s.add_argument("scenario")
    s.add_argument("--baseline", required=True)
    s.add_argument("--update", action="store_true", help="write the measured figures as the new baseline")
    s.add_argument("--repeats", type=int, default=1,
                   help="with --update: runs whose median is the baseline and whose spread sets the tolerances")
    s.add_argument("--output", help="results folder (default: the scenario's `output`)")
    s.set_defaults(func=cmd_regress)

    s = sub.add_parser("simcheck", help="compare simulator predictions with measured runs (per case + MAPE)",
                       description="Predict every measured method run in the results folders (or the runs "
                                   "stored in a calibration folder: in-sample) and print the per-case error and the "
                                   "mean absolute percentage error.")
    s.add_argument("results", nargs="+")
    s.add_argument("--calibration", help="calibration folder (default: the shipped one)")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_simcheck)

    s = sub.add_parser("crossval", help="leave-one-out error of the calibration over results folders",
                       description="Fit the calibration on all results folders but one, predict the one left out, "
                                   "for each folder in turn; print each fold's errors and the MAPE by ranks and "
                                   "method. RESULTS may be results folders or calibration folders (their stored "
                                   "runs; e.g. simulator/data for the shipped one). Codec timings come from a "
                                   "stored calibration (--codec-from).")
    s.add_argument("results", nargs="+")
    s.add_argument("--workers", type=int, default=1, help="folds fitted in parallel (processes)")
    s.add_argument("--codec-from", help="calibration folder whose codec.csv is used (default: the shipped one)")
    s.set_defaults(func=cmd_crossval)

    s = sub.add_parser("calibrate", help="fit the simulator's compute, codec and link models from measured runs",
                       description="Read results folders written by `scenario run` (also link micro-benchmark "
                                   "folders of `python -m compactbed.testbed.linkbench` and earlier calibration "
                                   "folders, whose rows and measured runs are reused) and write calibration data "
                                   "files (CSV/JSON, with the runs it was fitted on in runs.json) for the simulator.")
    s.add_argument("results", nargs="+", help="results, link-benchmark or earlier calibration folders")
    s.add_argument("--out", default="calibration", help="output folder (default: ./calibration)")
    only = s.add_mutually_exclusive_group()
    only.add_argument("--local-step-into", metavar="CALIBRATION",
                      help="fit only the local warmup step of jobs run in processes kept from an earlier job, on "
                           "these results folders and the steps already stored there, into that calibration folder")
    only.add_argument("--async-into", metavar="CALIBRATION",
                      help="fit only DistriFusion's asynchronous transfer factor, on these results folders and the "
                           "runs already stored there, into that calibration folder")
    only.add_argument("--rtt-into", metavar="CALIBRATION",
                      help="fit only the round trips per hop of TCP algorithms other than the calibration's, on the "
                           "whole runs under these folders made under them, into that calibration folder")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("dashboard", help="start the Dash app (what-if explorer and measured results) on localhost",
                       description="Serve the dashboard on 127.0.0.1.")
    s.add_argument("results", nargs="*", help="results folders to browse")
    s.add_argument("--port", type=int, default=8050)
    s.add_argument("--host", default="127.0.0.1", help="address to serve on (default: localhost only)")
    s.add_argument("--calibration", help="simulator calibration folder (default: the shipped one)")
    s.set_defaults(func=cmd_dashboard)

    s = sub.add_parser("netem", help="link emulation: backend check, profiles, cleanup",
                       description="`check`: which shaping backend this kernel supports and why; `profiles`: "
                                   "the named link profiles; `cleanup`: remove leftovers of this project only.")
    s.add_argument("netem_cmd", choices=["check", "profiles", "cleanup"])
    s.set_defaults(func=cmd_netem)
    return p


def _stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` dumps every thread's stack to the process's real stderr (where it has one)."""
    try:
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    except (AttributeError, ValueError, OSError):      # no SIGUSR1 (Windows) or no real stderr (embedded)
        pass


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _stacks_on_sigusr1()
    if argv is None:                                  # the command line, not a caller in this process
        signal.signal(signal.SIGTERM, _interrupt)     # SIGTERM tears down like Ctrl-C
    console = Console(stderr=False, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=False, highlight=False, width=160)
    err = Console(stderr=True, highlight=False)
    try:
        return args.func(args, console)
    except (ScenarioError, CommandError, RunFailed, EmulationBusy, FileNotFoundError, PermissionError) as e:
        if args.debug:
            raise
        text = str(e)
        first, _, rest = text.partition("\n")
        err.print(f"[red]error:[/] {escape(first)}", markup=True, soft_wrap=True)
        if rest:  # schema errors: one line per field
            err.print(rest, markup=False, soft_wrap=True)
        return 2 if isinstance(e, ScenarioError) else 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as e:  # a bug: still one line, traceback on request
        if args.debug:
            raise
        err.print(f"[red]internal error:[/] {escape(f'{type(e).__name__}: {e}')} (rerun with --debug for the traceback)",
                  markup=True, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
