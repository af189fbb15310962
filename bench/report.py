"""Markdown tables of bench/results/*.json, for the README: python -m bench.report"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
NAMES = {"mvtec_subset/hazelnut": "hazelnut", "mpdd/metal_plate": "metal_plate", "magnetic_tile/tile": "magnetic_tile"}


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def accuracy_table(tags: dict[str, str]) -> str:
    """tags: row label -> result-file tag ("" for the defaults)."""
    rows = ["| dataset | model | image AUROC | pixel AUROC | AU-PRO | pixel IoU-max | fit s | eval images/s |",
            "|---|---|---|---|---|---|---|---|"]
    for dataset, short in NAMES.items():
        for label, tag in tags.items():
            r = _load(f"accuracy-{dataset.split('/')[-1]}{'-' + tag if tag else ''}.json")
            if r is None:
                continue
            m, f = r["metrics"], r["manifest"]["fit"]
            rows.append(f"| {short} | {label} | {m['image_auroc']:.3f} | {m['pixel_auroc']:.3f} | {m['pixel_aupro']:.3f} "
                        f"| {m['pixel_iou_max']:.3f} | {f['fit_seconds']:.1f} | {m['images_per_s']:.1f} |")
    return "\n".join(rows)


def levers_table() -> str:
    data = _load("levers.json")
    if data is None:
        return ""
    rows = data["rows"]
    levers = list(dict.fromkeys(r["lever"] for r in rows))
    head = "| lever | " + " | ".join(NAMES[d] for d in NAMES) + " |"
    out = [head, "|---|" + "---|" * len(NAMES)]
    for lever in levers:
        cells = []
        for d in NAMES:
            r = next((x for x in rows if x["lever"] == lever and x["dataset"] == d), None)
            cells.append("" if r is None else f"{r['image_auroc']:.3f} / {r['pixel_auroc']:.3f} / {r['pixel_aupro']:.3f}")
        out.append(f"| {lever} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def fewshot_table() -> str:
    data = _load("fewshot.json")
    if data is None:
        return ""
    out = ["| dataset | K = 1 | K = 2 | K = 4 | K = 8 |", "|---|---|---|---|---|"]
    for d, short in NAMES.items():
        cells = {r["shots"]: f"{r['image_auroc']:.3f} / {r['pixel_auroc']:.3f} / {r['pixel_aupro']:.3f}"
                 for r in data["rows"] if r["dataset"] == d}
        out.append(f"| {short} | " + " | ".join(cells.get(k, "") for k in (1, 2, 4, 8)) + " |")
    return "\n".join(out)


def main() -> None:
    print(accuracy_table({"memory bank (defaults)": "", "reconstruction": "rec", "bank + reconstruction (fused)":
                          "ensemble", "memory bank, centre crop 224/256": "crop"}))
    print()
    print(levers_table())
    print()
    print(fewshot_table())


if __name__ == "__main__":
    main()
