"""Human-readable rendering of evaluation reports (the JSON stays the source of truth)."""

from __future__ import annotations

COLUMNS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")


def results_table(report: dict) -> str:
    """A fixed-width table: one row per model, raw and masked test metrics, coverage, tail share, interests per
    list (when the run has a SPARC model to measure them: "-" otherwise), training time and epochs."""
    head = (
        f"{'model':<12}" + "".join(f"{c:>11}" for c in COLUMNS)
        + f"{'R@10 mask':>11}{'N@10 mask':>11}{'cold R@10':>11}{'cov@20':>8}{'tail@20':>8}{'intr@20':>8}"
        + f"{'train s':>9}{'epochs':>8}"
    )
    lines = [head, "-" * len(head)]
    for name, r in report["results"].items():
        lines.append(
            f"{name:<12}" + "".join(f"{r['test'][c]:>11.4f}" for c in COLUMNS)
            + f"{r['test_masked']['recall@10']:>11.4f}{r['test_masked']['ndcg@10']:>11.4f}"
            + f"{r['cold_test']['recall@10']:>11.4f}{r['coverage@20']:>8.3f}{r['tail_share@20']:>8.3f}"
            + (f"{r['interests@20']:>8.2f}" if "interests@20" in r else f"{'-':>8}")
            + f"{r['train_seconds']:>9.0f}{r['epochs']:>8}"
        )
    sparc = report["results"].get("sparc", {})
    if sparc.get("exploit") is not None:
        lines.append(f"sparc: exploration slots after the first {sparc['exploit']} (lift {sparc['lift']:g}); "
                     "--no-exploration ranks without them")
    return "\n".join(lines)
