"""One log-log PNG per series case: median time against the series axis, one line per implementation."""
from __future__ import annotations

import pathlib


def write(results: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    paths = []
    for case in results["cases"]:
        if len({p["x"] for p in case["points"]}) < 2 or not all(isinstance(p["x"], (int, float))
                                                                for p in case["points"]):
            continue  # a series of sizes only (the route cases' points are dtypes)
        series, missing = {}, {}
        multi = len({p.get("threads") for p in case["points"]}) > 1
        for point in case["points"]:
            for e in point["impls"]:
                name = f"{e['name']}, {point['threads']} thread(s)" if multi else e["name"]
                if e["status"] == "ok":
                    series.setdefault(name, []).append((point["x"], e["median_s"]))
                else:
                    missing.setdefault(name, []).append(str(point["x"]))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 5))
        for name, pts in series.items():
            gaps = f" (not run at {', '.join(missing[name])})" if name in missing else ""
            ax.plot(*zip(*pts), marker="o", label=name + gaps)
        x0, y0 = min(pt for pts in series.values() for pt in pts)
        xs = sorted({p["x"] for p in case["points"]})
        for power, style in ((1, ":"), (2, "--")):  # guides: how linear and quadratic costs grow
            ax.plot(xs, [y0 * (x / x0) ** power for x in xs], style, color="grey", linewidth=0.8,
                    label=f"∝ {case['axis']}" + ("²" if power == 2 else ""))
        fixed = " ".join(f"{k}={v}" for k, v in case["points"][0]["sizes"].items() if k != case["axis"])
        ax.set(xscale="log", yscale="log", xlabel=case["axis"] + (" (tokens)" if case["axis"] in ("T", "ctx") else ""), ylabel="median time per call (s)",
               title=f"{case['name']}: {case['pattern']}\n{fixed}, {results['machine']['cpu']}")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        path = out_dir / f"{case['name']}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
