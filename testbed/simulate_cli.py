"""The ``scenario`` commands that simulate: predict, published tables, profile, calibrate, simcheck, crossval."""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..scenarios.schema import load_scenario
from .errors import CommandError, require_folders


def _say_left_out(results: list[Path], console: Console) -> None:
    from ..simulator.runs import read_runs, unusable

    for folder, state in unusable(results):
        console.print(f"[yellow]left out[/] {folder}: {escape(state.describe())}")
    alternated = sum(r.distrifusion_alternated for r in read_runs(results))
    if alternated:
        console.print(f"[yellow]left out[/] the DistriFusion cases of {alternated} runs that ran its earlier refresh "
                      "(a synchronous gather every other step), which the simulator does not model")


def calibration(args):
    from ..simulator.costs import Calibration

    return Calibration.load(Path(args.calibration) if args.calibration else None)


def cmd_predict(args: argparse.Namespace, console: Console) -> int:
    from ..runtime.records import UNCOMPRESSED_BASELINE
    from ..simulator.predict import describe_hardware, predict

    scenario = load_scenario(args.scenario)
    calib = calibration(args)
    floor, host = _probe_host(scenario, calib, args, console) if args.probe_host else (0.0, 1.0)
    rows, _ = predict(scenario, calib, args.device, exchange_floor_s=floor, host_factor=host)
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


def _probe_host(scenario, calib, args: argparse.Namespace, console: Console) -> tuple[float, float]:
    """This host as ``scenario run`` measures it: its exchange floor for the scenario's ranks (the host probe) and
    its pace (the scenario's single-process reference generation, timed per seed after one untimed step, against
    the calibration runs'). Returns (floor seconds, host factor)."""
    from ..runtime.models import load_for
    from ..simulator.points import exchange_floor, generation_pace
    from ..simulator.predict import on_gpus
    from .hostprobe import corun_probe
    from .run import timed_references

    if on_gpus(scenario, args.device):
        raise CommandError("--probe-host measures this machine as the emulation host; this scenario is predicted on "
                           "GPUs (drop --probe-host, or pass --device cpu)")
    name = args.device or "cpu"
    profile = calib.devices.get(name)
    if profile is None or not profile.reference_pace:
        raise CommandError(f"the calibration has no {name} profile with a reference pace to compare this host with "
                           f"(its profiles: {', '.join(calib.devices)}; recalibrate from runs with reference timings)")
    model = load_for(scenario.model)
    with console.status(f"timing the single-process reference ({len(scenario.seeds)} seeds)"):
        seconds = [s for _, (_, s) in timed_references(model, scenario)]
    host = generation_pace(scenario, seconds, profile) / profile.reference_pace
    with console.status(f"probing this host with {scenario.world_size} ranks"):
        probe = corun_probe(model, scenario)
    floor = exchange_floor(probe)
    if floor is None:
        raise CommandError("the host probe measured no exchange: " + probe.get("exchange_error", "one rank"))
    console.print(f"host pace: the reference generation took {min(seconds):.2f}-{max(seconds):.2f} s, {host:.2f}x "
                  "the calibration host's time; compute is scaled by it")
    console.print(f"host probe: an exchange beside {scenario.world_size} computing ranks adds {floor * 1e3:.2f} ms "
                  "over loopback; every exchange is priced at no less")
    return floor, host


def cmd_calibrate(args: argparse.Namespace, console: Console) -> int:
    from ..simulator.calibrate import async_into, calibrate, local_step_into, rtt_into

    require_folders(args.results)
    try:
        if args.local_step_into:
            require_folders([args.local_step_into])
            local_step_into([Path(p) for p in args.results], Path(args.local_step_into), log=console.print)
        elif args.async_into:
            require_folders([args.async_into])
            async_into([Path(p) for p in args.results], Path(args.async_into), log=console.print)
        elif args.rtt_into:
            require_folders([args.rtt_into])
            rtt_into([Path(p) for p in args.results], Path(args.rtt_into), log=console.print)
        else:
            calibrate([Path(p) for p in args.results], Path(args.out), log=console.print)
    except ValueError as e:
        raise CommandError(str(e)) from None
    return 0


def cmd_simcheck(args: argparse.Namespace, console: Console) -> int:
    from ..simulator.predict import mape, validate

    require_folders(args.results)
    _say_left_out([Path(p) for p in args.results], console)
    cases = validate([Path(p) for p in args.results], calibration(args), args.device)
    if not cases:
        raise CommandError("no complete measured emulated runs in those folders")
    t = Table(title="simulator vs measured (held-out runs: not used for calibration)")
    for col in ("results", "links", "method", "ranks", "runs", "measured s", "spread", "host", "co-run",
                "exchange", "predicted s", "error"):
        t.add_column(col, justify="left" if col in ("results", "method", "links") else "right")
    for c in cases:
        t.add_row(Path(c.results).parent.name + "/" + Path(c.results).name, c.links, c.method, str(c.world),
                  str(c.repeats), f"{c.measured_s:.2f}", f"{c.spread:.0%}" if c.repeats > 1 else "-",
                  f"{c.host_factor:.2f}x", f"{c.corun:.2f}x" if c.corun else "-",
                  f"{c.exchange_floor_s * 1e3:.1f} ms" if c.exchange_floor_s is not None else "-",
                  f"{c.predicted_s:.2f}", f"{c.error:+.1%}")
    console.print(t)
    console.print(f"MAPE over {len(cases)} cases: {mape(cases):.1%} (measured: median over each case's seeds; "
                  "spread: (max - min) / median)")
    console.print("host: the run's single-process reference generation (timed before the distributed runs, no "
                  "links) against the calibration runs', relative to the model; the predicted compute is scaled "
                  "by it. co-run: the run's host probe, a rank's slowdown with every rank computing at once (-: not "
                  "probed); recorded for the model, which still prices compute by ranks / cores. exchange: what the "
                  "probe measured one exchange to add beside computing ranks over loopback; the model prices each "
                  "exchange at no less")
    return 0


def cmd_published(args: argparse.Namespace, console: Console) -> int:
    import numpy as np

    from ..simulator.published import disagreements, published_sets

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
    for d in disagreements(sets):
        console.print(f"{d.set} publishes {d.rows} rows of {d.rerun_of}'s configuration anew: latency "
                      f"{', '.join(f'{x:+.0%}' for x in d.latency)} (max {d.latency_max:.0%}), speedup "
                      f"{', '.join(f'{x:+.0%}' for x in d.speedup)} (max {d.speedup_max:.0%}) against it "
                      "(no prediction is within a tolerance of both where they differ by more than about twice it)")
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

    require_folders(args.results)
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
