"""How the fault suite's result reads: a PNG per scenario (matplotlib, Agg canvas, no pyplot state, as
replay/plots.py) and the Markdown table "Faults survived" (README). The JSON stays the source of truth."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(panels: int, title: str, width: float = 5.5) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * panels, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, panels, squeeze=False).ravel())
    fig.suptitle(title, fontsize=12)
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig, axes


def _sigkill(f: dict) -> Figure | None:
    kills = f.get("kills") or []
    if not kills:
        return None
    fig, (ax, ax2) = _figure(2, f"SIGKILL x {len(kills)} under {f.get('rate', 0):g} events/s: lost "
                             f"{f.get('lost', '-')}, learnt twice {f.get('learnt_twice', '-')}, repeated versions "
                             f"{f.get('repeated_versions', '-')}")
    xs = [k["kill"] for k in kills]
    ys = [k.get("seconds_to_training") for k in kills]
    colors = ["tab:orange" if k["phase"] == "starting" else "tab:blue" for k in kills]
    ax.bar(xs, [y if y is not None else 0 for y in ys], color=colors)
    for x, y in zip(xs, ys, strict=True):
        if y is None:
            ax.annotate("never", (x, 0), ha="center", fontsize=7, color="tab:red")
    ax.set_xlabel("kill (blue: while training, orange: while starting)")
    ax.set_ylabel("seconds from SIGKILL to training again")
    ax2.scatter([k["uptime_s"] for k in kills], ys, c=colors)
    ax2.set_xlabel("the killed process's uptime (s)")
    ax2.set_ylabel("seconds to training again")
    return fig


def _outage(f: dict) -> Figure | None:
    if "lines" not in f:
        return None
    fig, (ax, ax2) = _figure(2, f"broker away {f.get('broker_away_s', '-')} s under {f.get('rate', 0):g} events/s: "
                             f"lost {f.get('lost', '-')} of {f.get('events', '-')}")
    levels = f.get("levels", {})
    ax.bar(list(levels), list(levels.values()), color="tab:gray")
    ax.set_ylabel("log lines from the stop to 60 s after the return")
    ax.set_title(f"{f['lines']:,} lines, {f.get('bytes', 0) / 1024:,.0f} KiB", fontsize=10)
    resumed = {k: f.get(f"{k}_resumed_after_s") for k in ("ingest", "training", "publishing")}
    ax2.barh(list(resumed), [v if v is not None else 0 for v in resumed.values()], color="tab:blue")
    ax2.set_xlabel("seconds after the broker answers again")
    return fig


def _malformed(f: dict) -> Figure | None:
    phases = f.get("phases") or {}
    if not phases:
        return None
    letters = f.get("dead_letters") or {}
    fig, (ax, ax2, ax3) = _figure(3, f"{f.get('malformed', 0):,} malformed events of {f.get('kinds', 0)} kinds, "
                                  f"{f.get('adversarial', 0)} adversarial, one user with "
                                  f"{f.get('heavy_user_events', 0):,} events", width=5)
    names = list(phases)
    for i, (key, label) in enumerate((("steps_per_s_steady", "worker (steady 10-90%)"),
                                      ("learner_steps_per_s", "learner thread (1 / mean step)"))):
        ax.bar([j + 0.4 * i for j in range(len(names))], [phases[n].get(key) or 0 for n in names], width=0.4,
               label=label)
    ax.set_xticks([j + 0.2 for j in range(len(names))], names)
    ax.set_ylabel("training steps per second")
    ax.legend(fontsize=8)
    per = letters.get("per_kind", {})
    kinds = sorted(per)
    ax2.barh(kinds, [per[k]["with_reason"] / per[k]["sent"] if per[k]["sent"] else 0 for k in kinds],
             color="tab:green")
    ax2.set_xlabel("share dead-lettered with reason and original bytes")
    ax2.tick_params(axis="y", labelsize=6)
    ax2.set_xlim(0, 1.05)
    series = f.get("rss_series") or []
    ax3.plot([s["t"] for s in series], [s["rss_mb"] for s in series], color="tab:purple")
    ax3.set_xlabel("seconds")
    ax3.set_ylabel("worker RSS (MB)")
    return fig


def _nan(f: dict) -> Figure | None:
    injections = f.get("injections") or {}
    if not injections:
        return None
    fig, (ax,) = _figure(1, f"poisoned batches: {f.get('published_non_finite', '-')} published versions with "
                         "non-finite tensors", width=8)
    keys = (("refused_after_s", "batch refused"), ("training_again_after_s", "training again"),
            ("new_version_served_after_s", "a new version served"))
    names = list(injections)
    for i, (key, label) in enumerate(keys):
        values = [injections[n].get(key) for n in names]
        ax.bar([j + 0.27 * i for j in range(len(names))], [v if v is not None else 0 for v in values], width=0.27,
               label=label)
        for j, v in enumerate(values):
            if v is None:
                ax.annotate("never", (j + 0.27 * i, 0), ha="center", fontsize=8, color="tab:red")
    ax.set_xticks([j + 0.27 for j in range(len(names))], names)
    ax.set_ylabel("seconds after the poisoned event was sent")
    ax.legend(fontsize=8)
    return fig


def _soak(f: dict) -> Figure | None:
    series = f.get("rss_series") or []
    if not series:
        return None
    fig, (ax, ax2) = _figure(2, f"soak: {f.get('minutes', 0):g} min at {f.get('rate', 0):g} events/s")
    ax.plot([s["t"] / 60 for s in series], [s["rss_mb"] for s in series], color="tab:purple")
    ax.set_xlabel("minutes")
    ax.set_ylabel("worker RSS (MB)")
    windows = f.get("windows") or []
    ax2.bar([w["from_s"] / 60 for w in windows], [w["p99_s"] or 0 for w in windows],
            width=[0.8 * (w["to_s"] - w["from_s"]) / 60 for w in windows], align="edge", color="tab:blue")
    ax2.set_xlabel("minutes (window of the events' production)")
    ax2.set_ylabel("p99 freshness (s): produced -> a version that learnt it announced")
    return fig


ROLE_NAMES = {"learn": "the learner", "ingest": "ingest-0", "serve": "serve-0"}
AGAIN = {"learn": ("seconds_to_training", "training again"), "ingest": ("seconds_to_forwarding", "forwarding again"),
         "serve": ("seconds_to_serving", "answering /retrieve with a version")}


def _sigkill_roles(f: dict) -> Figure | None:
    roles = [r for r in ROLE_NAMES if (f.get(r) or {}).get("kills")]
    if not roles:
        return None
    fig, axes = _figure(len(roles), f"SIGKILL of each role x {f.get('kills_planned', '-')} under "
                        f"{f.get('rate', 0):g} events/s", width=4.5)
    for ax, role in zip(axes, roles, strict=True):
        r = f[role]
        key, what = AGAIN[role]
        kills = r["kills"]
        ys = [k.get(key) for k in kills]
        ax.bar([k["kill"] for k in kills], [y if y is not None else 0 for y in ys],
               color=["tab:orange" if k["phase"] == "starting" else "tab:blue" for k in kills])
        for k, y in zip(kills, ys, strict=True):
            if y is None:
                ax.annotate("never", (k["kill"], 0), ha="center", fontsize=7, color="tab:red")
        verdict = "passed" if r.get("passed") else "FAILED" if "passed" in r else ""
        lost = "" if role == "serve" else f", lost {r.get('lost', '-')}"
        ax.set_title(f"{ROLE_NAMES[role]}: {verdict}{lost}", fontsize=10)
        ax.set_xlabel("kill (orange: while starting)")
        ax.set_ylabel(f"seconds from the SIGKILL to {what}", fontsize=8)
    return fig


PLOTS: dict[str, Callable[[dict], Figure | None]] = {"sigkill": _sigkill, "sigkill_roles": _sigkill_roles,
                                                     "outage": _outage,
                                                     "malformed": _malformed, "nan": _nan, "soak": _soak}


def plot(name: str, figures: dict, path: Path) -> bool:
    """Draw scenario `name`'s figure to `path`; False when it has nothing to draw."""
    draw = PLOTS.get(name)
    fig = draw(figures) if draw is not None else None
    if fig is None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _rows_sigkill(f: dict) -> list[tuple[str, Any]]:
    s = f.get("seconds_to_training") or {}
    return [
        ("kills (while starting / training)", f"{len(f.get('kills', []))} "
         f"({sum(k['phase'] == 'starting' for k in f.get('kills', []))} / "
         f"{sum(k['phase'] == 'training' for k in f.get('kills', []))})"),
        ("events lost (of acknowledged)", f"{_fmt(f.get('lost'))} of {_fmt(f.get('events_acknowledged'))}"),
        ("events learnt twice", f.get("learnt_twice")),
        ("repeated versions / out of order / announced not stored",
         f"{_fmt(f.get('repeated_versions'))} / {_fmt(f.get('versions_out_of_order'))} / "
         f"{_fmt(f.get('announced_not_stored'))} (of {_fmt(f.get('versions_announced'))} announced)"),
        ("seconds until training again: median / max (never)",
         f"{_fmt(s.get('median'))} / {_fmt(s.get('max'))} ({_fmt(s.get('never'))})"),
        ("crashes (exits nobody asked for)", len(f.get("crashes", []))),
    ]


def _rows_sigkill_roles(f: dict) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for role, who in ROLE_NAMES.items():
        r = f.get(role) or {}
        if not r:
            continue
        kills = r.get("kills", [])
        key, what = AGAIN[role]
        s = r.get(key) or {}
        rows.append((f"{who}: kills (while starting / working)",
                     f"{len(kills)} ({sum(k['phase'] == 'starting' for k in kills)} / "
                     f"{sum(k['phase'] != 'starting' for k in kills)})"))
        if role != "serve":
            rows += [
                (f"{who}: events lost (of those sent in its phase) / learnt twice",
                 f"{_fmt(r.get('lost'))} of {_fmt(r.get('events'))} / {_fmt(r.get('learnt_twice'))}"),
                (f"{who}: repeated versions / out of order / announced not stored",
                 f"{_fmt(r.get('repeated_versions'))} / {_fmt(r.get('versions_out_of_order'))} / "
                 f"{_fmt(r.get('announced_not_stored'))} (of {_fmt(r.get('versions_announced'))} announced)"),
            ]
        rows.append((f"{who}: seconds until {what}: median / max (never)",
                     f"{_fmt(s.get('median'))} / {_fmt(s.get('max'))} ({_fmt(s.get('never'))})"))
        if role == "ingest":
            t = r.get("takeover") or {}
            rows.append((f"{who}: ingest-1 took its partitions over (samples holding > 2 of 4, of all)",
                         f"{_fmt(t.get('samples_holding_more_than_its_share'))} of {_fmt(t.get('samples'))}"))
        if role == "serve":
            o = r.get("other_replica") or {}
            rows.append((f"{who}: a client polling serve-1 meanwhile: requests / not 200",
                         f"{_fmt(o.get('requests'))} / {_fmt(o.get('errors'))}"))
        rows.append((f"{who}: crashes / other roles exited; passed its rule (sigkill_roles.RULES)",
                     f"{len(r.get('crashes', []))} / {len(r.get('others_exited') or {})}; {_fmt(r.get('passed'))}"))
    o = f.get("overall") or {}
    if o:
        rows.append(("whole stream: events lost (of acknowledged) / learnt twice / repeated versions",
                     f"{_fmt(o.get('lost'))} of {_fmt(o.get('events_acknowledged'))} / {_fmt(o.get('learnt_twice'))} "
                     f"/ {_fmt(o.get('repeated_versions'))} (of {_fmt(o.get('versions_announced'))})"))
    return rows


def _rows_outage(f: dict) -> list[tuple[str, Any]]:
    levels = f.get("levels", {})
    return [
        ("broker away (s)", f.get("broker_away_s")),
        ("events lost (of acknowledged) / learnt twice",
         f"{_fmt(f.get('lost'))} of {_fmt(f.get('events'))} / {_fmt(f.get('learnt_twice'))}"),
        ("seconds to resume after the broker is back: ingest / training / a new snapshot served",
         f"{_fmt(f.get('ingest_resumed_after_s'))} / {_fmt(f.get('training_resumed_after_s'))} / "
         f"{_fmt(f.get('publishing_resumed_after_s'))}"),
        ("log lines written, stop to 60 s after (bytes; ERROR / WARNING)",
         f"{_fmt(f.get('lines'))} ({_fmt(f.get('bytes'))} B; {_fmt(levels.get('ERROR', 0))} / "
         f"{_fmt(levels.get('WARNING', 0))})"),
        ("worker alive afterwards", f.get("worker_alive")),
    ]


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _rows_malformed(f: dict) -> list[tuple[str, Any]]:
    letters = f.get("dead_letters") or {}
    p = f.get("phases") or {}
    a, c, h = p.get("before", {}), p.get("after", {}), p.get("hostile", {})
    # (steps/s over the hostile phase: its one user's micro-batches all carry max_len histories)
    share = letters.get("share_dead_lettered")
    return [
        ("malformed events (kinds) / adversarial-but-valid / one user's events",
         f"{_fmt(f.get('malformed'))} ({_fmt(f.get('kinds'))}) / {_fmt(f.get('adversarial'))} / "
         f"{_fmt(f.get('heavy_user_events'))}"),
        ("crashes (worker exited; /livez not 200)", f"{'yes' if f.get('exited') else 0}; "
                                                   f"{_fmt(f.get('livez_not_200'))}"),
        ("share dead-lettered with reason and original bytes (reason as expected)",
         f"{'-' if share is None else f'{100 * share:.2f}%'} ({_fmt(letters.get('reason_as_expected'))} of "
         f"{_fmt(letters.get('sent'))})"),
        ("adversarial-but-valid: dead-lettered / learnt",
         f"{_fmt(f.get('adversarial_dead_lettered'))} / {_fmt(f.get('adversarial_learnt'))}"),
        ("training steps/s before -> after (change): worker, steady",
         f"{_fmt(a.get('steps_per_s_steady'))} -> {_fmt(c.get('steps_per_s_steady'))} "
         f"({_percent(f.get('steps_per_s_change'))})"),
        ("... learner thread (1 / mean step time)",
         f"{_fmt(a.get('learner_steps_per_s'))} -> {_fmt(c.get('learner_steps_per_s'))} "
         f"({_percent(f.get('learner_steps_per_s_change'))})"),
        ("... per CPU-second of the learner thread",
         f"{_fmt(a.get('steps_per_learner_cpu_s'))} -> {_fmt(c.get('steps_per_learner_cpu_s'))} "
         f"({_percent(f.get('cpu_steps_change'))})"),
        ("within 20% (worker / learner / per CPU-s)",
         " / ".join(_fmt(v) for v in (f.get("within_20_percent") or {}).values())),
        ("the same workload twice before the hostile input (control -> before: the noise; same three)",
         f"{_percent(f.get('control_steps_per_s_change'))} / {_percent(f.get('control_learner_steps_per_s_change'))}"
         f" / {_percent(f.get('control_cpu_steps_change'))}"),
        ("... during the hostile phase (the one user's events)",
         f"{_fmt(h.get('steps_per_s_steady'))} / {_fmt(h.get('learner_steps_per_s'))}"),
        ("RSS start / end / peak (MB)", f"{_fmt(f.get('rss_start_mb'))} / {_fmt(f.get('rss_end_mb'))} / "
                                        f"{_fmt(f.get('rss_peak_mb'))}"),
        ("the one user's history (items kept)", f.get("heavy_user_history_length")),
    ]


def _rows_nan(f: dict) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("published versions with non-finite tensors (must be 0) / of announced",
         f"{_fmt(f.get('published_non_finite'))} / {_fmt(f.get('versions_announced'))}"),
        ("stored versions with non-finite tensors (refused by the gate, never served)",
         f.get("stored_refused_non_finite")),
    ]
    for kind, i in (f.get("injections") or {}).items():
        rows.append((f"{kind}: batch refused / training again / new version served (s after the poison)",
                     f"{_fmt(i.get('refused_after_s'))} / {_fmt(i.get('training_again_after_s'))} / "
                     f"{_fmt(i.get('new_version_served_after_s'))}; recovered: {_fmt(i.get('recovered'))}"))
    rows.append(("events lost (of acknowledged) / the poisoned batches' events dead-lettered (train_error)",
                 f"{_fmt(f.get('events_lost'))} (of {_fmt(f.get('events'))}) / "
                 f"{_fmt(f.get('dead_lettered_train_error'))}"))
    return rows


def _rows_disk_full(f: dict) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for kind in ("rocksdb", "file"):
        s = f.get(kind) or {}
        if not s:
            continue
        if "skipped" in s:
            rows.append((f"{kind}://", f"skipped: {s['skipped']}"))
            continue
        warm, ver = s.get("warm_start") or {}, s.get("verify") or {}
        rows += [
            (f"{kind}://: version served before / while full (previous latest still served)",
             f"v{_fmt(s.get('served_before'))} / {s.get('served_while_full')} "
             f"({_fmt(s.get('previous_latest_still_served'))})"),
            (f"{kind}://: alarm sparc_publish_failing set (samples at 1) / failed publishes / first after (s)",
             f"{_fmt(s.get('alarm_set'))} ({s.get('alarm_samples')}) / {_fmt(s.get('failed_publishes_while_full'))}"
             f" / {_fmt(s.get('failed_after_s'))}"),
            (f"{kind}://: /retrieve statuses while full; training went on",
             f"{s.get('retrieve_while_full')}; {_fmt(s.get('training_while_full'))}"),
            (f"{kind}://: space back -> a new version served, alarm 0 (s)", s.get("recovered_after_s")),
            (f"{kind}://: restart: warm start from / versions that verify",
             f"v{_fmt(warm.get('version'))} / {_fmt(ver.get('verify'))} of {_fmt(ver.get('versions'))}"),
        ]
    return rows


def _rows_soak(f: dict) -> list[tuple[str, Any]]:
    p99 = ", ".join(_fmt(x) for x in f.get("p99_freshness_s") or [])
    return [
        ("minutes at events/s (achieved)", f"{_fmt(f.get('minutes'))} at {_fmt(f.get('rate'))} "
                                           f"({_fmt(f.get('achieved_rate'))})"),
        ("RSS start / end / peak (MB)", f"{_fmt(f.get('rss_start_mb'))} / {_fmt(f.get('rss_end_mb'))} / "
                                        f"{_fmt(f.get('rss_peak_mb'))}"),
        (f"p99 freshness per {_fmt((f.get('window_s') or 0) / 60)} min (s)", p99 or "-"),
        ("events produced / not covered by a version", f"{_fmt(f.get('events_produced'))} / "
         f"{_fmt(sum(w.get('not_covered') or 0 for w in f.get('windows') or []))}"),
        ("versions announced; worker alive to the end", f"{_fmt(f.get('versions_announced'))}; "
                                                         f"{_fmt(f.get('worker_alive'))}"),
    ]


ROWS: dict[str, tuple[str, Callable[[dict], list[tuple[str, Any]]]]] = {
    "sigkill": ("SIGKILL of the worker under load", _rows_sigkill),
    "sigkill_roles": ("SIGKILL of each role under load", _rows_sigkill_roles),
    "outage": ("broker stopped mid-stream", _rows_outage),
    "malformed": ("malformed and adversarial events", _rows_malformed),
    "nan": ("NaN in the learner (poisoned batches)", _rows_nan),
    "disk_full": ("the store's disk full during a publish", _rows_disk_full),
    "soak": ("soak at a steady rate", _rows_soak),
}


def table(result: dict) -> str:
    """The Markdown table "Faults survived": a row per figure, with the scenario's command."""
    lines = ["| fault | figure | value | command |", "|---|---|---|---|"]
    base = "python -m benchmarks.fault_suite --out runs/faults.json"
    for name, outcome in result["scenarios"].items():
        title, rows = ROWS.get(name, (name, lambda f: []))
        figures = outcome.get("figures", {})
        command = f"`{base} --only {name}`"
        status = "" if outcome["status"] == "ok" else f" ({outcome['status']})"
        body = rows(figures) if figures else []
        if "error" in figures:
            body.append(("error", figures["error"]))
        for i, (label, value) in enumerate(body or [("(no figures)", None)]):
            lines.append(f"| {title + status if i == 0 else ''} | {label} | {_fmt(value)} | "
                         f"{command if i == 0 else ''} |")
    for name, why in result.get("skipped", {}).items():
        lines.append(f"| {ROWS.get(name, (name,))[0]} | skipped | {why} | |")
    return "\n".join(lines) + "\n"
