"""Reading a benchmark's rows as a quality-speed frontier: each run's point (mean over seeds, with its
interval), the Pareto front per quality measure, the fastest run of each method at AR's quality (the rule
that picks a method's defaults), and the plot of step compression against each measure."""
from __future__ import annotations

import math
from pathlib import Path


QUALITY = {  # measure -> (axis label, how a point's distance from AR's quality is read: 1 higher is better,
    #                                              -1 lower is better, 0 closer to AR is better)
    "target_nll": ("target NLL, nats/token (AR's value is lossless)", 0),
    "fd_world": ("FD-world (lower is better)", -1),
    "alignment": ("alignment (higher is better)", 1),
    "fid": ("FID (lower is better)", -1),
}


def plot(rows: list[dict], path: Path, meta: dict) -> None:
    """Step compression against each quality measure the rows carry, one point per run (mean over
    seeds) with its bootstrap interval (the seeds' range for rows without one), AR's interval as a
    band, runs of one `curve` (a knob sweep) joined, and each panel's Pareto front dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = [k for k in QUALITY if any(k in r and not math.isnan(r[k]) for r in rows)]
    points = _points(rows, measures)
    fig, axes = plt.subplots(1, len(measures), figsize=(5.5 * len(measures), 4.8), squeeze=False)
    for key, ax in zip(measures, axes[0]):
        ar = [p for p in points.values() if p["method"] == "ar"]
        if ar:
            ax.axhspan(min(p[key + "_lo"] for p in ar), max(p[key + "_hi"] for p in ar), color="grey", alpha=0.2,
                       label="AR's interval")
        curves: dict[str, list] = {}
        for label, p in points.items():
            curves.setdefault(p["curve"], []).append((p["step_compression"], label, p))
        for curve, pts in curves.items():
            pts.sort(key=lambda t: t[0])
            ys = [p[key] for _, _, p in pts]
            ax.errorbar([x for x, _, _ in pts], ys, yerr=[[p[key] - p[key + "_lo"] for _, _, p in pts],
                                                          [p[key + "_hi"] - p[key] for _, _, p in pts]],
                        fmt="o-" if len(pts) > 1 else "o", capsize=3, label=curve)
            for x, label, p in pts:
                if label != curve:
                    ax.annotate(label.removeprefix(curve).strip("_ "), (x, p[key]), fontsize=7)
        front = pareto_front(points, key, ar[0][key] if ar else None)
        if len(front) > 1:
            ax.plot([points[lb]["step_compression"] for lb in front], [points[lb][key] for lb in front], "k--", lw=1,
                    label="Pareto front")
        ax.set_xlabel("step compression (tokens / target forwards)")
        ax.set_ylabel(QUALITY[key][0])
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{meta['num_prompts']} held-out world prompts x {len(set(r['seed'] for r in rows))} seeds "
                 f"(points: mean over seeds; bars: 95 % bootstrap intervals), batch {meta['batch_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _points(rows: list[dict], measures: list[str]) -> dict[str, dict]:
    """label -> step compression and each measure, averaged over the run's seeds, with an interval."""
    seeds_of: dict[str, list[dict]] = {}
    for r in rows:
        seeds_of.setdefault(r["label"], []).append(r)
    points = {}
    for label, rs in seeds_of.items():
        pt = {"curve": rs[0].get("curve") or label, "method": rs[0]["method"],
              "step_compression": sum(r["step_compression"] for r in rs) / len(rs)}
        for k in measures:
            vals = [r[k] for r in rs]
            pt[k] = sum(vals) / len(vals)
            with_ci = all(f"{k}_lo" in r for r in rs)
            pt[k + "_lo"] = min(r[f"{k}_lo"] for r in rs) if with_ci else min(vals)
            pt[k + "_hi"] = max(r[f"{k}_hi"] for r in rs) if with_ci else max(vals)
        points[label] = pt
    return points


def at_ar_quality(points: dict[str, dict], measures: list[str]) -> dict[str, str]:
    """method -> the label of its run with the highest step compression whose quality is AR's on every
    measure: target NLL inside AR's interval (either side is a change of distribution), the one-sided
    measures not past the worse end of it (a better FD-world or alignment is no loss). The rule that
    picks a method's defaults from a frontier sweep (issue 20: `method=vvs` takes the fastest such run)."""
    ar = [p for p in points.values() if p["method"] == "ar"]
    if not ar:
        return {}
    band = {k: (min(p[k + "_lo"] for p in ar), max(p[k + "_hi"] for p in ar)) for k in measures}

    def keeps_quality(p):
        for k in measures:
            lo, hi = band[k]
            sense = QUALITY[k][1]
            if (sense == 0 and not lo <= p[k] <= hi) or (sense == 1 and p[k] < lo) or (sense == -1 and p[k] > hi):
                return False
        return True

    best: dict[str, str] = {}
    for label, p in points.items():
        if p["method"] != "ar" and keeps_quality(p):
            if p["method"] not in best or p["step_compression"] > points[best[p["method"]]]["step_compression"]:
                best[p["method"]] = label
    return best


def pareto_front(points: dict[str, dict], key: str, ar_value: float | None) -> list[str]:
    """Labels no other run beats on both step compression and quality `key` (QUALITY's reading; for
    target NLL, the distance from AR's value), sorted by step compression."""
    sense = QUALITY[key][1]

    def badness(p):
        if sense == 0:
            return abs(p[key] - ar_value) if ar_value is not None else 0.0
        return -sense * p[key]

    def beaten(a, b):  # b at least as fast and as good, and better in one
        fa, fb = points[a]["step_compression"], points[b]["step_compression"]
        qa, qb = badness(points[a]), badness(points[b])
        return fb >= fa and qb <= qa and (fb > fa or qb < qa)

    front = [a for a in points if not any(beaten(a, b) for b in points if b != a)]
    return sorted(front, key=lambda lb: points[lb]["step_compression"])


def at_ar_quality_lines(rows: list[dict]) -> list[str]:
    """The fastest run of each method whose quality is AR's on every measure with an interval."""
    measures = [k for k in ("target_nll", "fd_world", "alignment")
                if all(k in r and f"{k}_lo" in r and not math.isnan(r[k]) for r in rows)]
    if not measures:
        return []
    points = _points(rows, measures)
    best = at_ar_quality(points, measures)
    out = ["", f"Fastest run of each method at AR's quality ({', '.join(measures)}: target NLL inside AR's "
           "interval, the others not past its worse end; `at_ar_quality`):"]
    out += [f"- {m}: {lb} ({points[lb]['step_compression']:.2f}x)" for m, lb in
            sorted(best.items(), key=lambda kv: -points[kv[1]]["step_compression"])]
    return out + (["- none"] if not best else [])
