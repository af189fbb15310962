"""Markdown tables of bench/results/*.json, for the README: python -m bench.report"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob(pattern))]


def accuracy_table() -> str:
    rows = ["| dataset | image AUROC | pixel AUROC | pixel AU-PRO | image AP | pixel AP | bank | fit s | images/s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in _load("accuracy-*.json"):
        if r["config"]["bank"]["index"] != "flat" or r.get("serve", {}).get("precision", "fp32") != "fp32":
            continue
        m, f = r["metrics"], r["fit"]
        rows.append(f"| {r['dataset']} | {m['image_auroc']:.3f} | {m['pixel_auroc']:.3f} | {m['pixel_aupro']:.3f} | "
                    f"{m['image_ap']:.3f} | {m['pixel_ap']:.3f} | {f['bank_size']} x {f['dim']} | "
                    f"{f['fit_seconds']:.1f} | {m['images_per_s']:.1f} |")
    return "\n".join(rows)


def int8_table() -> str:
    rows = ["| dataset | engine fp32 ms/image | int8 ms/image | speed-up | image AUROC fp32 -> int8 | "
            "pixel AUROC fp32 -> int8 |", "|---|---|---|---|---|---|"]
    for r in [json.loads(p.read_text()) for p in sorted(RESULTS.glob("int8-*.json")) if not p.stem.endswith("-all")]:
        for row in r["rows"]:
            if (row["method"], row["per_channel"]) == ("minmax", True):
                rows.append(f"| {r['dataset']} | {row['fp32_ms_per_image']:.2f} | {row['int8_ms_per_image']:.2f} | "
                            f"{row['speedup']:.2f}x | {r['fp32']['image_auroc']:.4f} -> {row['int8_image_auroc']:.4f} | "
                            f"{r['fp32']['pixel_auroc']:.4f} -> {row['int8_pixel_auroc']:.4f} |")
    return "\n".join(rows)


def main() -> None:
    print(accuracy_table())
    print()
    print(int8_table())


if __name__ == "__main__":
    main()
