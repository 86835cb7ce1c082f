"""The fault suite: the worker under the faults a deployment meets, each reported as figures (issue 15, item 5).

    python -m benchmarks.fault_suite --out runs/faults.json                                # all, about 3 h
    python -m benchmarks.fault_suite --only sigkill,outage --out runs/faults.json
    python -m benchmarks.fault_suite --soak-minutes 5 --out runs/faults-check.json        # a short soak
    python -m benchmarks.fault_suite --quick --out runs/faults-quick.json                 # small counts, ~10 min
    python -m benchmarks.fault_suite --quick --only sigkill_roles --out runs/faults-roles-quick.json   # ~2.5 min

Scenarios (benchmarks/faults/, one module each; their docstrings say exactly what is done and counted):
  sigkill    SIGKILL of the worker at --kills random moments under load: events lost, events learnt twice,
             repeated versions, seconds until training again
  sigkill_roles  the same per role of a scale-out deployment (2 ingest, 1 learn, 2 serve): the learner, an ingest
             replica and a serve replica each SIGKILLed --kills times and restarted; for serve, seconds until
             /retrieve answers again and the errors a client of the other replica sees
  outage     the broker stopped for --outage-seconds mid-stream: lost events, seconds to resume, log lines written
  malformed  --malformed malformed events of 16+ kinds and 100 adversarial-but-valid ones, one user with
             --heavy-user-events events: crashes, share dead-lettered with reason and original bytes, training
             steps/s before and after (issue 15's bound: within 20%), RSS
  nan        a poisoned batch (NaN gradients under a finite loss; a NaN loss): published versions with
             non-finite tensors (must be 0), and how training recovers
  disk_full  the store's disk (a tmpfs) full during a publish, for rocksdb:// and file://: the previous latest
             still served, the alarm metric set; and what happens once space is back
  soak       --soak-minutes (default 60) at --soak-rate events/s: RSS at start and end, p99 freshness per 5 min

Everything runs on loopback against a broker of the suite's own (deploy/kafka/broker.sh, plaintext, free ports
unless --broker-port or SPARC_FAULTS_BROKER_PORT, a state dir in the suite's temp dir), started first and stopped
last. Each scenario runs in a process (and session) of its own with a time bound; it writes its figures as it goes,
so a scenario that fails or overruns is reported with what it measured and the error, and the suite goes on. The
JSON is rewritten after every scenario; beside it go a PNG per scenario (<out stem>-<scenario>.png) and a Markdown
table (<out stem>.md, the README's "Faults survived"). The whole run is bounded by --max-minutes: a scenario that
would not fit is skipped, with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, fields
from pathlib import Path

from benchmarks.common import write_json
from benchmarks.faults.context import QUICK, ROLES, Context, Options
from benchmarks.harness import ROOT, PrivateBroker
from sparc_stream.cli.allocator import tune_allocator

# name -> (module, its time bound in minutes for the given options)
SCENARIOS = {
    "sigkill": ("benchmarks.faults.sigkill", lambda o: 10 + 1.0 * o.kills),
    "sigkill_roles": ("benchmarks.faults.sigkill_roles", lambda o: 20 + 1.0 * o.kills * len(o.roles.split(","))),
    "outage": ("benchmarks.faults.outage", lambda o: 8 + 2 * o.outage_s / 60),
    "malformed": ("benchmarks.faults.malformed", lambda o: 15 + o.heavy_user_events / 10_000),
    "nan": ("benchmarks.faults.poison", lambda o: 10),
    "disk_full": ("benchmarks.faults.disk_full", lambda o: 14),
    "soak": ("benchmarks.faults.soak", lambda o: o.soak_minutes + 10),
}
GRACE_S = 60  # past its bound, a scenario's process group is killed
# Left out of --quick unless named with --only: five processes started, 2 x 3 kills and restarts, and a learner to
# wait for took 152 s on a quiet machine and 758 s on a loaded one (88 s once with one torch thread per role), too
# much for every `make test` (tests/test_fault_roles.py checks its parts there)
NOT_QUICK = ("sigkill_roles",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fault_suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="the JSON result (required)")
    p.add_argument("--only", help=f"comma-separated, of {', '.join(SCENARIOS)} (default: all; under --quick all "
                   f"but {', '.join(NOT_QUICK)})")
    p.add_argument("--max-minutes", type=float, default=240.0, help="bound on the whole run (default 240)")
    p.add_argument("--seed", type=int, default=Options.seed, help="kill moments, streams (default 0)")
    p.add_argument("--rate", type=float, default=Options.rate,
                   help=f"feedback events/s of the load under faults (default {Options.rate:g})")
    p.add_argument("--kills", type=int, default=Options.kills, help=f"SIGKILLs (default {Options.kills})")
    p.add_argument("--kill-window-seconds", dest="kill_window_s", type=float, default=Options.kill_window_s,
                   help="a kill lands U(0.5, this) s after the process works, U(0.5, 2/3 of it) after its start "
                   f"(default {Options.kill_window_s:g})")
    p.add_argument("--roles", default=Options.roles,
                   help=f"the roles sigkill_roles kills, in order (default {Options.roles})")
    p.add_argument("--outage-seconds", dest="outage_s", type=float, default=Options.outage_s,
                   help=f"how long the broker is away (default {Options.outage_s:g})")
    p.add_argument("--outage-watch-seconds", dest="outage_watch_s", type=float, default=Options.outage_watch_s,
                   help=f"how long the worker is watched after the broker is back (default {Options.outage_watch_s:g})")
    p.add_argument("--malformed", type=int, default=Options.malformed,
                   help=f"malformed events (default {Options.malformed})")
    p.add_argument("--heavy-user-events", type=int, default=Options.heavy_user_events,
                   help=f"events of the one heavy user (default {Options.heavy_user_events})")
    p.add_argument("--phase-events", type=int, default=Options.phase_events,
                   help=f"events of each workload the malformed scenario times (default {Options.phase_events})")
    p.add_argument("--soak-minutes", type=float, default=Options.soak_minutes,
                   help=f"length of the soak (default {Options.soak_minutes:g})")
    p.add_argument("--soak-rate", type=float, default=Options.soak_rate,
                   help=f"feedback events/s of the soak (default {Options.soak_rate:g})")
    port = os.environ.get("SPARC_FAULTS_BROKER_PORT")
    p.add_argument("--broker-port", type=int, default=int(port) if port else None,
                   help="the private broker's port (and +1 for its controller); default: SPARC_FAULTS_BROKER_PORT, "
                   "else free ports")
    p.add_argument("--quick", action="store_true", help="small counts everywhere (the suite's own test): "
                   + ", ".join(f"{k}={v:g}" for k, v in QUICK.items()) + "; flags given still win")
    p.add_argument("--workdir", type=Path, help="where scenarios keep their files (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    # a scenario's own process (the suite starts it)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-seconds", type=float, help=argparse.SUPPRESS)
    p.add_argument("--broker-state", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--broker-controller-port", type=int, help=argparse.SUPPRESS)
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    if args.only is None:
        args.only = ",".join(s for s in SCENARIOS if not (args.quick and s in NOT_QUICK))
    args.scenarios = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown or not args.scenarios:
        p.error(f"--only takes {', '.join(SCENARIOS)} (got {args.only!r})")
    if not args.roles or set(args.roles.split(",")) - set(ROLES):
        p.error(f"--roles takes {','.join(ROLES)} (got {args.roles!r})")
    if not args.child and args.out is None:
        p.error("--out is required")
    return args


def options_of(args: argparse.Namespace) -> Options:
    return Options(**{f.name: getattr(args, f.name) for f in fields(Options)})


def option_flags(o: Options) -> list[str]:
    """The command-line flags that give a scenario's process the same options."""
    names = {"outage_s": "--outage-seconds", "outage_watch_s": "--outage-watch-seconds",
             "kill_window_s": "--kill-window-seconds"}
    out = []
    for f in fields(Options):
        out += [names.get(f.name, "--" + f.name.replace("_", "-")), str(getattr(o, f.name))]
    return out


# ---------------------------------------------------------------------------------------------- a scenario's process
def child(args: argparse.Namespace) -> int:
    """Run one scenario in this process; its figures (and an error, if it raised) go to <child-dir>/figures.json."""
    name = args.child
    broker = PrivateBroker(args.broker_state, args.broker_port, args.broker_controller_port)
    ctx = Context(broker=broker, bootstrap=broker.bootstrap, workdir=args.child_dir,
                  deadline=time.monotonic() + args.child_seconds, options=options_of(args),
                  out=args.child_dir / "figures.json", name=name)
    module = importlib.import_module(SCENARIOS[name][0])
    try:
        module.run(ctx)
    except BaseException as exc:
        ctx.record(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
        print(f"[{name}] failed: {type(exc).__name__}: {exc}", flush=True)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------- the suite
def unmount_below(path: Path) -> list[str]:
    """Unmount every mount point below `path` (a scenario killed at its bound may leave its tmpfs mounted)."""
    try:
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return []
    below = [m for m in mounts if m.startswith(str(path.resolve()) + os.sep)]
    for m in sorted(below, reverse=True):
        subprocess.run(["umount", "-l", m], check=False, capture_output=True)
    return below


def run_scenario(name: str, args: argparse.Namespace, options: Options, broker: PrivateBroker, workdir: Path,
                 seconds: float) -> dict:
    """Run one scenario in its own process and session, killed past `seconds` + GRACE_S; its figures and status."""
    where = workdir / name
    where.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "benchmarks.fault_suite", "--child", name, "--child-dir", str(where),
               "--child-seconds", str(seconds), "--broker-state", str(broker.state_dir), "--broker-port",
               str(broker.port), "--broker-controller-port", str(broker.controller_port), *option_flags(options)]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    status = "ok"
    try:
        code = process.wait(timeout=seconds + GRACE_S)
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        status = f"killed at its bound of {seconds / 60:.0f} min"
    finally:
        if process.poll() is None or status.startswith("killed"):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                time.sleep(5)
            process.wait()
        else:  # the scenario's own children (workers) go with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        left_mounted = unmount_below(where)
    try:
        figures = json.loads((where / "figures.json").read_text())
    except (OSError, ValueError):
        figures = {}
    result = {"status": status if "error" not in figures else "failed", "seconds": round(time.monotonic() - started),
              "bound_minutes": round(seconds / 60, 1), "figures": figures}
    if left_mounted:
        result["unmounted_after"] = left_mounted
    return result


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # as every entry point does (sparc_stream/cli/allocator.py)
    args = parse_args(argv)
    if args.child:
        return child(args)
    from benchmarks.faults.report import plot, table

    # SIGTERM (a timeout, a kill from a shell) ends the run as Ctrl-C does: the running scenario's process group
    # killed, the broker stopped, tmpfs mounts undone
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    options = options_of(args)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sparc-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    broker = PrivateBroker(workdir / "kafka", args.broker_port)
    command = "python -m benchmarks.fault_suite " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "suite": "faults", "command": command, "options": asdict(options),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": os.getloadavg()},
        "broker": {"bootstrap": broker.bootstrap, "state_dir": str(broker.state_dir)},
        "scenarios": {}, "skipped": {},
    }
    deadline = time.monotonic() + args.max_minutes * 60
    try:
        print(f"fault suite: starting a private broker on {broker.bootstrap} (state in {broker.state_dir})",
              flush=True)
        broker.start()
        for i, name in enumerate(args.scenarios, 1):
            bound = SCENARIOS[name][1](options) * 60
            left = deadline - time.monotonic()
            if left < min(bound, 300):
                result["skipped"][name] = f"{left / 60:.0f} min left of --max-minutes, it needs up to {bound / 60:.0f}"
                print(f"== {name}: skipped ({result['skipped'][name]})", flush=True)
                continue
            seconds = min(bound, left)
            print(f"== {name} ({i}/{len(args.scenarios)}), bound {seconds / 60:.0f} min", flush=True)
            outcome = run_scenario(name, args, options, broker, workdir, seconds)
            outcome["loadavg_after"] = os.getloadavg()
            result["scenarios"][name] = outcome
            figure = args.out.with_name(f"{args.out.stem}-{name}.png")
            try:
                if plot(name, outcome["figures"], figure):
                    outcome["figure"] = str(figure)
            except Exception as exc:  # a figure is a convenience; the JSON is the result
                outcome["figure_error"] = f"{type(exc).__name__}: {exc}"
            print(f"== {name}: {outcome['status']} in {outcome['seconds']} s", flush=True)
            if not broker.running():  # a scenario that stopped it (outage) and failed before starting it again
                print("the private broker is down; starting it again (its data kept)", flush=True)
                broker.start()
            write_json(args.out, result)
    finally:
        try:
            broker.stop()
        except RuntimeError as exc:
            print(f"stopping the private broker failed: {exc}", file=sys.stderr)
        unmount_below(workdir)
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result["machine"]["loadavg_after"] = os.getloadavg()
    write_json(args.out, result)
    markdown = table(result)
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)
    return 0 if all(s["status"] == "ok" for s in result["scenarios"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
