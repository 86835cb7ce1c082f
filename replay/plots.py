"""How a replay report reads: PNG figures (matplotlib, Agg canvas, no pyplot state) and Markdown tables.

Every function takes the report `replay.prequential.replay` returns (the JSON stays the source of truth).
The x axis of every figure is the replay position (feedback events replayed), which every source has; the
freeze point and the source's markers (e.g. the synthetic stream's drift points) are drawn as vertical lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

METRIC_PANELS = ("recall@20", "ndcg@20", "recall@20_first", "coverage@20", "tail_share@20", "new_share@20")
HEALTH_PANELS = ("level1_utilisation", "level1_perplexity", "collision_rate", "code_changed_share",
                 "level1_changed_share", "top_interest_changed_share")
TITLES = {
    "recall@20": "Recall@20",
    "ndcg@20": "NDCG@20",
    "coverage@20": "catalogue coverage of top-20",
    "new_share@20": "top-20 slots given to new items",
    "recall@20_first": "Recall@20 on an item's first interaction",
    "tail_share@20": "top-20 slots given to long-tail items",
    "level1_utilisation": "level-1 codebook utilisation",
    "level1_perplexity": "level-1 code perplexity",
    "collision_rate": "code-tuple collision rate",
    "code_changed_share": "items whose codes changed since the last window",
    "level1_changed_share": "items whose level-1 code (interest) changed",
    "top_interest_changed_share": "users whose top interest changed",
}
COLORS = {"evolving": "tab:blue", "frozen": "tab:orange", "periodic": "tab:green"}
STYLES = ("-", "--", ":", "-.")


def _style(report: dict, name: str) -> dict:
    v = report["variants"][name]
    modes = list(dict.fromkeys(n.partition("/")[2] for n in report["variants"]))
    mode = name.partition("/")[2]
    return {"color": COLORS.get(v["regime"], "tab:gray"), "linestyle": STYLES[modes.index(mode) % len(STYLES)]}


def _figure(report: dict, panels: Sequence[str], names: Sequence[str], title: str, markers) -> Figure:
    columns = (len(panels) + 1) // 2
    fig = Figure(figsize=(4.2 * columns + 1.5, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, columns, squeeze=False).ravel()
    freeze = report.get("freeze_event")
    for ax, key in zip(axes, panels, strict=False):
        for name in names:
            windows = report["variants"][name]["windows"]
            points = [(w["end_event"], w[key]) for w in windows if w.get(key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=name, **_style(report, name))
        if freeze is not None:
            ax.axvline(freeze, color="black", linewidth=1, alpha=0.6)
            ax.annotate("freeze", (freeze, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize=8)
        for at, label in markers:
            ax.axvline(at, color="tab:red", linewidth=0.8, linestyle=":", alpha=0.8)
            ax.annotate(label, (at, 0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                        textcoords="offset points", fontsize=7, color="tab:red")
        ax.set_title(TITLES.get(key, key), fontsize=11)
        ax.set_xlabel("feedback events replayed (window ends)")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=12)
    return fig


def plot_metrics(report: dict, path: str | Path, markers: Sequence[tuple[int, str]] = (),
                 panels: Sequence[str] = METRIC_PANELS) -> Path:
    """Accuracy and beyond-accuracy metrics per window, one line per variant."""
    names = list(report["variants"])
    fig = _figure(report, panels, names, f"{report.get('source', 'replay')}: prequential metrics per window",
                  markers)
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_health(report: dict, path: str | Path, markers: Sequence[tuple[int, str]] = (),
                panels: Sequence[str] = HEALTH_PANELS) -> Path:
    """Codebook health per window, one line per regime (score modes share their regime's model)."""
    names = list({v["regime"]: n for n, v in reversed(report["variants"].items())}.values())[::-1]
    fig = _figure(report, panels, names, f"{report.get('source', 'replay')}: codebook health at window ends",
                  markers)
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_recovery(curves: dict, shifts: Sequence[int], freeze: int | None, results: Sequence[dict], path: str | Path,
                  *, k: int = 20, width: int, fraction: float = 0.9) -> Path:
    """Recall@k over event time around shifts (benchmarks/drift_bench.py): one line per variant from
    curves {variant: (window ends, recall)}, the shifts and the freeze point as vertical lines, and per shift
    (results: replay.prequential.recovery per variant, keyed by variant, plus "shift" and "until") evolving's
    target level (dashed) and the point where it recovered (circle)."""
    fig = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, color=COLORS.get(name, "tab:gray"), label=f"{name} (Recall@{k}, last {width} events)")
    if freeze is not None:
        ax.axvline(freeze, color="black", linewidth=1, alpha=0.7)
        ax.annotate("freeze", (freeze, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8)
    for i, (shift, r) in enumerate(zip(shifts, results, strict=True)):
        ax.axvline(shift, color="tab:red", linestyle=":", linewidth=1)
        ax.annotate(f"shift {i + 1}", (shift, 0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                    textcoords="offset points", fontsize=8, color="tab:red")
        e = r.get("evolving")
        if e is None:
            continue
        if e["target"] is not None:
            ax.hlines(e["target"], shift, r["until"], color=COLORS["evolving"], linestyle="--", linewidth=0.8,
                      alpha=0.6)
        if e["recovered_after"] is not None:
            x = shift + e["recovered_after"]
            y = next(c["recall"] for c in e["curve"] if c["end"] == e["recovered_after"])
            ax.plot([x], [y], marker="o", color=COLORS["evolving"], markersize=7, markerfacecolor="none")
            ax.annotate(f"+{e['recovered_after']}", (x, y), xytext=(4, 6), textcoords="offset points", fontsize=8,
                        color=COLORS["evolving"])
    ax.set_xlabel("feedback events replayed (window end)")
    ax.set_ylabel(f"Recall@{k}")
    ax.set_title(f"Recall@{k} over event time; dashed: evolving's {fraction:.0%} of its pre-shift level, circle: "
                 "back at it", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_churn_tradeoff(points: Sequence[dict], path: str | Path) -> Path:
    """Stable interests against accuracy, reach and adaptation (benchmarks/churn_bench.py), one labelled point per
    model configuration: level-1 churn per window on the replayed dataset against served Recall@20 (left), against
    the new items that reached 10 retrievals (middle) and against the mean events to recover from the synthetic
    shifts (right). Labels alternate above and below their points, so neighbours stay readable."""
    fig = Figure(figsize=(16, 5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    panels = (("served soft search Recall@20 (replay in time order)", lambda p: p["data"]["served_recall@20"]),
              ("new items that reached 10 served retrievals", lambda p: p["data"]["new_items_reached@10"]),
              ("events to recover 90% of pre-shift Recall@20 (mean of 3 shifts)",
               lambda p: p["shift_stream"]["mean_recovery_events"]))
    for i, p in enumerate(sorted(points, key=lambda p: p["data"]["level1_churn"])):
        x = p["data"]["level1_churn"]
        for ax, (_, value) in zip(axes, panels, strict=True):
            ax.plot([x], [value(p)], marker="o", color="tab:blue")
            ax.annotate(p["label"], (x, value(p)), xytext=(4, 4 if i % 2 == 0 else -11), textcoords="offset points",
                        fontsize=8)
    for ax, (label, _) in zip(axes, panels, strict=True):
        ax.set_ylabel(label)
        ax.set_xlabel("items whose level-1 code changed, per window (mean)")
        ax.grid(alpha=0.3)
    fig.suptitle("Interest churn against accuracy, reach and recovery after shifts", fontsize=12)
    fig.savefig(path, dpi=110)
    return Path(path)


# ------------------------------------------------------------------ Markdown
def plot_exploration(report: dict, path: str | Path) -> Path | None:
    """Accuracy against new-item reach, one point per score mode (soft vs hard search, the exploration sweep),
    per regime: where each mode sits on the trade-off. Left panel: overall Recall@20 vs new items that reached
    N top-20 retrievals; right: vs the share of top-20 slots given to new items. None with a single mode."""
    variants = report["variants"]
    if len({n.partition("/")[2] for n in variants}) < 2:
        return None
    first = next(iter(variants.values()))["overall"]
    reach = next(k for k in first if k.startswith("new_items_reached@"))
    fig = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], reach, f"new items that reached {reach.partition('@')[2]} top-20 retrievals"),
                           (axes[1], "new_share@20", "top-20 slots given to new items")):
        for name, v in variants.items():
            o = v["overall"]
            hard = name.partition("/")[2].startswith("hard")
            ax.scatter(o["recall@20"], o[key], color=COLORS.get(v["regime"], "tab:gray"),
                       marker="s" if hard else "o", s=40)
            ax.annotate(name.partition("/")[2] or name, (o["recall@20"], o[key]), xytext=(4, 4),
                        textcoords="offset points", fontsize=8)
        ax.set_xlabel("overall Recall@20")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report.get('source', 'replay')}: accuracy vs new-item reach per score mode "
                 "(squares: hard search)", fontsize=12)
    fig.savefig(path, dpi=110)
    return Path(path)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _date(ts) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def modes_section(report: dict) -> list[str]:
    """Score modes side by side per regime (soft vs hard search, the exploration sweep): accuracy and new-item
    reach over every scored event, relative to the regime's plain soft search. Empty with a single mode."""
    variants = report["variants"]
    if len({n.partition("/")[2] for n in variants}) < 2:
        return []
    first = next(iter(variants.values()))["overall"]
    reach = next(k for k in first if k.startswith("new_items_reached@"))
    keys = ["recall@20", "ndcg@20", "recall@20_first", "coverage@20", "tail_share@20", "new_share@20", reach]
    rows = []
    for regime in dict.fromkeys(v["regime"] for v in variants.values()):
        names = [n for n, v in variants.items() if v["regime"] == regime]
        base = variants[next((n for n in names if n.partition("/")[2] == "soft"), names[0])]["overall"]
        for n in names:
            o = variants[n]["overall"]
            delta = [f"{(o[k] / base[k] - 1) * 100:+.1f}%" if base[k] else "" for k in ("recall@20", "new_share@20")]
            rows.append([n, o["scored"], *(o.get(k) for k in keys), *delta])
    return ["", "## Score modes: soft vs hard search, exploration sweep (every scored event)", "",
            "new_share@20: top-20 slots given to new items; "
            f"{reach}: new items that reached that many top-20 retrievals while new; deltas vs the regime's "
            "plain soft search.", "",
            *_table(["variant", "scored", *keys, "R@20 vs soft", "new_share vs soft"], rows)]


def churn_section(report: dict) -> list[str]:
    """Per regime and window: the share of items whose level-1 code changed, and of users whose top interest
    changed (all users seen at both ends; idle: those without an event in the window); then the means."""
    regimes = {v["regime"]: v for v in report["variants"].values()}
    windows = next(iter(regimes.values()))["windows"]
    keys = ("level1_changed_share", "top_interest_changed_share", "top_interest_changed_share_idle")
    summary = ("level1_churn", "level1_churn_max", "top_interest_churn", "top_interest_churn_idle")
    return ["", "## Churn of interests per window (per regime)", "",
            "level-1: items whose level-1 code changed since the previous window; users: users whose top interest "
            "(argmax of the interest distribution) changed; idle users: those of them without an event in between "
            "(a change is the model's alone).", "",
            *_table(["end event", *(f"{r} {k}" for r in regimes for k in ("level-1", "users", "idle users"))],
                    [[w["end_event"], *(regimes[r]["windows"][i].get(k) for r in regimes for k in keys)]
                     for i, w in enumerate(windows)]),
            "", *_table(["regime", *summary], [[r, *(v["overall"].get(k) for k in summary)]
                                               for r, v in regimes.items()])]


def markdown(report: dict, figures: Sequence[str] = ()) -> str:
    """The report as Markdown: overall and after-freeze tables, per-window Recall@20 and health tables."""
    variants = report["variants"]
    first = next(iter(variants.values()))
    reach = next(k for k in first["overall"] if k.startswith("new_items_reached@"))
    s = report.get("settings", {})
    lines = [
        f"# Prequential replay: {report.get('source', '')}",
        "",
        f"{report['events']} feedback events ({report['cold']} first events of a user, not scored; "
        f"{report['duplicates']} duplicates skipped), {report['items']} items known at the end, "
        f"{report['seconds']:.1f} s. Micro-batch {s.get('batch_size')}, delay {s.get('delay_events')} events / "
        f"{s.get('delay_seconds')} s, scored per batch: {s.get('eval_per_batch') or 'all'}; freeze point at event "
        f"{report['freeze_event']}; periodic retrain every {report['retrain_every']} events "
        f"({report['retrains']} retrains, {s.get('retrain_epochs')} epochs each).",
        "",
        "## Overall (every scored event)",
        "",
    ]
    keys = ["recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "ndcg@50", "recall@20_first",
            "recall@20_rest", "coverage@20", "tail_share@20", "new_share@20", reach]
    lines += ["recall@20_first: on events that are their item's first interaction "
              f"({first['overall']['first_interactions']} of the scored events); recall@20_rest: on the others.", ""]
    lines += _table(["variant", "scored", *keys],
                    [[n, v["overall"]["scored"], *(v["overall"].get(k) for k in keys)] for n, v in variants.items()])
    lines += ["", "## After the freeze point (where the regimes differ)", ""]
    keys = ["recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "ndcg@50"]
    base = variants.get("evolving") or first
    rows = []
    for n, v in variants.items():
        a = v["after_freeze"]
        ref = base["after_freeze"]["recall@20"]
        rows.append([n, a["scored"], *(a[k] for k in keys),
                     f"{(a['recall@20'] / ref - 1) * 100:+.1f}%" if ref else ""])
    lines += _table(["variant", "scored", *keys, "R@20 vs " + next(k for k, v in variants.items() if v is base)],
                    rows)
    lines += modes_section(report)
    lines += ["", "## Recall@20 per window", ""]
    windows = first["windows"]
    lines += _table(["end event", "end time (UTC)", "events", "scored", "new items", *variants],
                    [[w["end_event"], _date(w["end_ts"]), w["events"], w["scored"], w["new_items"],
                      *(v["windows"][i]["recall@20"] for v in variants.values())] for i, w in enumerate(windows)])
    lines += ["", "## Codebook health per window (per regime)", ""]
    regimes = {v["regime"]: v for v in variants.values()}
    keys = ["level1_utilisation", "level1_perplexity", "collision_rate", "code_changed_share"]
    lines += _table(["end event", *(f"{r} {k}" for r in regimes for k in ("util", "perplexity", "collisions",
                                                                          "changed"))],
                    [[w["end_event"], *(regimes[r]["windows"][i].get(k) for r in regimes for k in keys)]
                     for i, w in enumerate(windows)])
    lines += churn_section(report)
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    return "\n".join(lines) + "\n"
