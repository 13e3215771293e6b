"""The colorfulness/PSNR frontier of trained models: each model scored by nanocolor.evaluate on
test folders at several chroma gains (one point per gain), tabled and drawn in one plot.

    python bench/frontier.py --model shipped=nanocolor/weights/colornet.npz --model long=runs/long/model.npz \\
        --data ../shared/data/mixed128/test ../shared/data/scenes150/test --out docs/frontier

writes docs/frontier.json (every score, per subfolder too) and docs/frontier.png (x: colorfulness
ratio, y: PSNR above the gray baseline; a line per model and test folder). A model and folder
already in the JSON are not scored again (--again scores them anyway).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled
from nanocolor.evaluate import evaluate_folder  # noqa: E402
from nanocolor.infer import load_colorizer  # noqa: E402

GAINS = (0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6)
# Where the shipped model should reach: (colorfulness ratio, PSNR above gray in dB) per test folder.
TARGETS = {"mixed128/test": (0.80, 0.8), "scenes150/test": (0.85, 1.3)}


def frontier(ev: dict) -> list[dict]:
    """(gain, PSNR above gray, colorfulness ratio, AuC) for the model's own gain and every other one."""
    rows = [(ev["chroma_gain"], ev["model"])] + [(float(g), s) for g, s in ev["other_gains"].items()]
    return [{"gain": g, "psnr_above_gray": s["psnr"] - ev["gray"]["psnr"], "ratio": s["colorfulness_ratio"],
             "auc": s["auc"]} for g, s in sorted(rows)]


def score(weights: str, data: str, gains: tuple) -> dict:
    """The frontier over `gains`, and per subfolder the scores at the weights' own gain."""
    model, work_size = load_colorizer(weights)
    others = tuple(g for g in gains if g != model.chroma_gain)
    ev = evaluate_folder(model, data, work_size, gallery_photos=0, progress=True, other_gains=others).as_dict()
    return {"photos": ev["photos"], "gray": ev["gray"], "frontier": frontier(ev),
            "per_folder": {name: {"gray_psnr": f["gray"]["psnr"], "model_psnr": f["model"]["psnr"],
                                  "ratio": f["model"]["colorfulness_ratio"]} for name, f in ev["per_folder"].items()}}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folders = sorted({data for per_model in results.values() for data in per_model})
    fig, axes = plt.subplots(1, len(folders), figsize=(6.5 * len(folders), 5), squeeze=False)
    for ax, data in zip(axes[0], folders):
        colors = plt.cm.tab20(range(20))  # the default cycle has 10 colors: an 11th line would repeat one
        for i, (label, per_model) in enumerate(results.items()):
            if data not in per_model:
                continue
            points = per_model[data]["frontier"]
            shipped = label.startswith("shipped")
            ax.plot([p["ratio"] for p in points], [p["psnr_above_gray"] for p in points], "o-", label=label,
                    color="black" if shipped else colors[(2 * i) % 20 + (i // 10) % 2], lw=2.5 if shipped else 1.5,
                    zorder=3 if shipped else 2)
            for p in points[::2]:
                ax.annotate(f"{p['gain']:g}", (p["ratio"], p["psnr_above_gray"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        name = Path(data).parent.name + "/" + Path(data).name
        if name in TARGETS:
            ax.plot(*TARGETS[name], "k*", markersize=12, label="target")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_ylim(bottom=max(ax.get_ylim()[0], -1.5))  # below that, no model is worth a look
        ax.set_xlim(right=min(ax.get_xlim()[1], 1.25))
        ax.set_title(name)
        ax.set_xlabel("colorfulness ratio (model / originals)")
        ax.set_ylabel("PSNR above the gray baseline (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="LABEL=WEIGHTS",
                   help="a model to score, named in the table and plot (repeatable)")
    p.add_argument("--data", nargs="+", required=True, help="test folders")
    p.add_argument("--gains", type=float, nargs="+", default=list(GAINS), help="chroma gains, one point each")
    p.add_argument("--out", default="docs/frontier", help="writes OUT.json and OUT.png")
    p.add_argument("--again", action="store_true", help="score models already in OUT.json again")
    args = p.parse_args(argv)
    out = Path(args.out)
    store = out.with_suffix(".json")
    results = json.loads(store.read_text()) if store.exists() else {}
    for spec in args.model:
        label, _, weights = spec.partition("=")
        for data in args.data:
            if args.again or data not in results.get(label, {}):
                results.setdefault(label, {})[data] = score(weights, data, tuple(args.gains))
                store.write_text(json.dumps(results, indent=1))
    for label, per_model in results.items():
        for data, r in per_model.items():
            best = max(r["frontier"], key=lambda q: q["psnr_above_gray"])
            print(f"{label:>12} {data}: " + "  ".join(f"{q['gain']:g}: {q['psnr_above_gray']:+.2f} dB/{q['ratio']:.2f}"
                                                      for q in r["frontier"]) + f"  (best PSNR at gain {best['gain']:g})")
    plot(results, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
