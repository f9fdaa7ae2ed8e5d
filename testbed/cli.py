"""The ``scenario`` command: one entry point, one subcommand per job.

Errors end with a one-line reason and a non-zero exit (2: bad input, 1: the job failed); ``--debug``
shows the traceback instead. ``kill -USR1 PID`` prints every thread's stack (a run that seems stuck).
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import signal
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..netem.lock import EmulationBusy
from ..scenarios.schema import MAX_EMULATED_NODES, ScenarioError, load_scenario
from .launch import RunFailed

MAX_LOCAL_RANKS = MAX_EMULATED_NODES


class CommandError(RuntimeError):
    """A job could not be done; the message is the reason shown to the user."""


def _require_folders(paths: list[str]) -> None:
    missing = [p for p in paths if not Path(p).is_dir()]
    if missing:
        raise CommandError(f"no such results folder: {missing[0]}")


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
    if scenario.world_size > MAX_LOCAL_RANKS:
        raise CommandError(f"{scenario.world_size} nodes do not fit one machine's emulation "
                           f"(at most {MAX_LOCAL_RANKS}); use `scenario predict` for larger clusters")
    output = Path(args.output) if args.output else Path(scenario.output)
    if scenario.on_hosts:
        import datetime

        from .hosts import host_plan, write_host_jobs

        results = output / ("hosts-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        write_host_jobs(scenario, results.resolve(), args.backend)
        plan = host_plan(scenario, results.resolve(), scenario.directed_links())
        (results / "hosts_plan.sh").write_text(plan)
        console.print(plan, markup=False, highlight=False, soft_wrap=True)
        console.print(f"plan written to {results / 'hosts_plan.sh'}")
        return 0
    _, rows = run_scenario(scenario, output, console, backend=args.backend, shaping=not args.no_shaping,
                           bound=not args.no_bound, force=args.force, accept_link_error=args.accept_link_error,
                           ideal=not args.no_ideal)
    failed = [r for r in rows if r.status != "ok"]
    if failed:
        raise CommandError(f"{len(failed)} of {len(rows)} method runs failed (first: {failed[0].method}: "
                           f"{failed[0].error})")
    return 0


def _say_left_out(results: list[Path], console: Console) -> None:
    from ..simulator.runs import unusable

    for folder, state in unusable(results):
        console.print(f"[yellow]left out[/] {folder}: {escape(state.describe())}")


def _calibration(args):
    from ..simulator.costs import Calibration

    return Calibration.load(Path(args.calibration) if args.calibration else None)


def cmd_predict(args: argparse.Namespace, console: Console) -> int:
    from ..runtime.records import UNCOMPRESSED_BASELINE
    from ..simulator.predict import describe_hardware, predict

    scenario = load_scenario(args.scenario)
    calib = _calibration(args)
    rows, _ = predict(scenario, calib, args.device)
    t = Table(title=f"{scenario.name}: predicted ({scenario.world_size} ranks, "
                    f"{describe_hardware(scenario, args.device)})")
    for col in ("method", "latency s", f"vs {UNCOMPRESSED_BASELINE}", "vs distrifusion", "bound s", "x bound",
                "compute s", "comm s", "codec s", "MB on wire", "ratio"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        t.add_row(r.method, f"{r.latency_s:.2f}", "-" if r.speedup_vs_uncompressed is None else f"{r.speedup_vs_uncompressed:.2f}x",
                  "-" if r.speedup_vs_distrifusion is None else f"{r.speedup_vs_distrifusion:.2f}x", f"{r.bound_s:.2f}",
                  f"{r.latency_s / r.bound_s:.2f}", f"{r.compute_s:.2f}", f"{r.comm_s:.2f}", f"{r.codec_s:.2f}",
                  f"{r.bytes_on_wire / 1e6:.2f}", f"{r.bytes_uncompressed / max(r.bytes_on_wire, 1):.1f}")
    console.print(t)
    return 0


def cmd_calibrate(args: argparse.Namespace, console: Console) -> int:
    from ..simulator.calibrate import calibrate

    _require_folders(args.results)
    try:
        calibrate([Path(p) for p in args.results], Path(args.out), log=console.print)
    except ValueError as e:
        raise CommandError(str(e)) from None
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


def cmd_simcheck(args: argparse.Namespace, console: Console) -> int:
    from ..simulator.predict import mape, validate

    _require_folders(args.results)
    _say_left_out([Path(p) for p in args.results], console)
    cases = validate([Path(p) for p in args.results], _calibration(args), args.device)
    if not cases:
        raise CommandError("no complete measured emulated runs in those folders")
    t = Table(title="simulator vs measured (held-out runs: not used for calibration)")
    for col in ("results", "links", "method", "ranks", "runs", "measured s", "spread", "host", "predicted s",
                "error"):
        t.add_column(col, justify="left" if col in ("results", "method", "links") else "right")
    for c in cases:
        t.add_row(Path(c.results).parent.name + "/" + Path(c.results).name, c.links, c.method, str(c.world),
                  str(c.repeats), f"{c.measured_s:.2f}", f"{c.spread:.0%}" if c.repeats > 1 else "-",
                  f"{c.host_factor:.2f}x", f"{c.predicted_s:.2f}", f"{c.error:+.1%}")
    console.print(t)
    console.print(f"MAPE over {len(cases)} cases: {mape(cases):.1%} (measured: median over each case's seeds; "
                  "spread: (max - min) / median)")
    console.print("host: the run's single-process reference generation (timed before the distributed runs, no "
                  "links) against the calibration runs', relative to the model; the predicted compute is scaled "
                  "by it")
    return 0


def cmd_published(args: argparse.Namespace, console: Console) -> int:
    import numpy as np

    from ..simulator.published import published_sets

    try:
        sets = published_sets(only=args.sets or None)
    except KeyError as e:
        raise CommandError(e.args[0]) from None
    rows = []
    for s in sets:
        t = Table(title=f"{s.title}: predicted vs published\nsource: {s.source}")
        for col in ("method", "GPUs", "published s", "predicted s", "error", "speedup pub", "speedup pred", "error"):
            t.add_column(col, justify="left" if col == "method" else "right")
        for r in s.rows:
            se = r.speedup_error
            t.add_row(r.label, str(r.nodes), f"{r.published_s:.2f}", f"{r.predicted_s:.2f}", f"{r.error:+.1%}",
                      *(("-", "-", "-") if se is None else
                        (f"{r.published_speedup:.2f}x", f"{r.predicted_speedup:.2f}x", f"{se:+.1%}")))
        console.print(t)
        fastest = "right" if s.published_best == s.predicted_best else "WRONG"
        console.print(f"fastest: published {s.published_best}, predicted {s.predicted_best} ({fastest})"
                      + (f"; not modelled: {', '.join(f'{k} {v:g} s' for k, v in s.not_modelled.items())}"
                         if s.not_modelled else ""))
        rows += s.rows
    speed = [abs(r.speedup_error) for r in rows if r.speedup_error is not None and r.speedup_error != 0]
    console.print(f"{len(sets)} sets, {len(rows)} rows: latency error mean {np.mean([abs(r.error) for r in rows]):.1%}"
                  f" (max {max(abs(r.error) for r in rows):.1%}); speedup error mean {np.mean(speed):.1%} (max "
                  f"{max(speed):.1%}); fastest right in {sum(s.published_best == s.predicted_best for s in sets)} "
                  f"of {len(sets)}")
    return 0


def cmd_profile(args: argparse.Namespace, console: Console) -> int:
    from ..testbed.profile import profile

    t0 = time.monotonic()
    dev, link = profile(args.name, Path(args.out), say=lambda m: console.print(m), collective=not args.no_collective)
    console.print(f"wrote {Path(args.out) / (args.name + '.devices.yaml')}"
                  + (f" and {Path(args.out) / (args.name + '.links.yaml')}" if link else "")
                  + f" in {time.monotonic() - t0:.0f} s; `scenario predict FILE --device {args.name}` uses it")
    return 0


def cmd_crossval(args: argparse.Namespace, console: Console) -> int:
    import numpy as np

    from ..simulator.crossval import fit_without, leave_one_out
    from ..simulator.predict import mape
    from ..simulator.runs import read_runs

    _require_folders(args.results)
    if args.codec_from and not (Path(args.codec_from) / "codec.csv").is_file():
        raise CommandError(f"no codec.csv in {args.codec_from}")
    fit = functools.partial(fit_without, codec_from=Path(args.codec_from)) if args.codec_from else fit_without
    results = [Path(p) for p in args.results]
    _say_left_out(results, console)
    n = len(read_runs(results))
    cases = []
    try:
        for k, (folder, fold) in enumerate(leave_one_out(results, fit, args.workers), 1):
            cases += fold
            errors = " ".join(f"{c.links}/{c.method} {c.error:+.1%}" for c in fold) or "no measured runs"
            console.print(f"[{k}/{n}] {folder}: {errors}")
    except ValueError as e:
        raise CommandError(str(e)) from e
    if not cases:
        raise CommandError("no measured emulated runs in those folders")
    t = Table(title="left out one results folder at a time: error of its cases")
    for col in ("ranks", "method", "cases", "MAPE", "mean error"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for key in sorted({(c.world, c.method) for c in cases}):
        group = [c for c in cases if (c.world, c.method) == key]
        t.add_row(str(key[0]), key[1], str(len(group)), f"{mape(group):.1%}",
                  f"{np.mean([c.error for c in group]):+.1%}")
    console.print(t)
    console.print(f"leave-one-out MAPE over {len(cases)} cases of {n} results folders: {mape(cases):.2%} "
                  f"(mean error {np.mean([c.error for c in cases]):+.2%})")
    return 0


def cmd_dashboard(args: argparse.Namespace, console: Console) -> int:
    from ..dashboards.app import create_app

    _require_folders(args.results)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] serving on {args.host}: reachable from other machines")
    app = create_app([Path(p) for p in args.results], _calibration(args))
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

    s = sub.add_parser("run", help="run every method of a scenario on an emulated cluster, write a results folder",
                       description="Build the emulated cluster (network namespaces + shaped links), run each "
                                   "method with real xDiT ranks, and write per-step records, a summary table "
                                   "and plots to the scenario's output folder.")
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
