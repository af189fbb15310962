"""Markdown tables of bench/results/*.json: python -m bench.report [--readme README.md] (rewrites its
report blocks, so the README's tables are the recorded results)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
NAMES = {"mvtec_subset/hazelnut": "hazelnut", "mpdd/metal_plate": "metal_plate", "magnetic_tile/tile": "magnetic_tile"}
FILES = {"mvtec_subset/hazelnut": "hazelnut", "mpdd/metal_plate": "metal_plate", "magnetic_tile/tile": "tile"}
# anomalib 2.7 PatchCore with the same Lite0 weights on these machines (shared/PEER.md and the quality
# issue): image AUROC, pixel AUROC, AU-PRO, fit seconds (None: not stated)
PEER = {
    "mvtec_subset/hazelnut": ((1.000, 0.987, 0.925), 36),
    "mpdd/metal_plate": ((1.000, 0.993, 0.951), 125),
    "magnetic_tile/tile": ((0.969, 0.833, 0.716), None),
}
# record-name suffixes of the CPU kinds measured: none for the VNNI host of the earlier records, -avx2
CPU_SUFFIXES = ("", "-avx2", "-xeon")
PEER_TILE_SUBSET = {"full": (0.877, 0.778, 0.705, 573), "crop": (0.853, 0.790, 0.657, None)}


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _triple(m: dict) -> str:
    return f"{m['image_auroc']:.3f} / {m['pixel_auroc']:.3f} / {m['pixel_aupro']:.3f}"


def _lever(lever: str, dataset: str) -> dict | None:
    data = _load("levers.json") or {"rows": []}
    return next((r for r in data["rows"] if r["lever"] == lever and r["dataset"] == dataset), None)


def accuracy_table() -> str:
    """Every model family on every dataset, full frame, with the peer's figures beside them."""
    rows = ["| dataset | model | image AUROC / pixel AUROC / AU-PRO | pixel IoU-max | fit s | eval images/s |",
            "|---|---|---|---|---|---|"]
    for dataset, short in NAMES.items():
        for label, tag in (("memory bank (default)", ""), ("reconstruction", "rec")):
            r = _load(f"accuracy-{FILES[dataset]}{'-' + tag if tag else ''}.json")
            if r is not None:
                m, f = r["metrics"], r["manifest"]["fit"]
                rows.append(f"| {short} | {label} | {_triple(m)} | {m['pixel_iou_max']:.3f} | {f['fit_seconds']:.1f} "
                            f"| {m['images_per_s']:.1f} |")
        for label, lever in (("bank + reconstruction, mean", "ensemble"), ("bank + reconstruction, max", "ensemble-max")):
            r = _lever(lever, dataset)
            if r is not None:
                rows.append(f"| {short} | {label} | {_triple(r)} | | | {r['images_per_s']:.1f} |")
        (peer, fit) = PEER[dataset]
        rows.append(f"| {short} | anomalib 2.7 PatchCore | {peer[0]:.3f} / {peer[1]:.3f} / {peer[2]:.3f} | | "
                    f"{fit if fit else ''} | 3 to 10 |")
    return "\n".join(rows)


def protocol_table() -> str:
    """Full frame (the product's figure) against the peer's centre crop, and the peer's tile subset."""
    rows = ["| dataset | protocol | lineguard memory bank | anomalib 2.7 PatchCore |", "|---|---|---|---|"]
    for dataset, short in NAMES.items():
        for protocol, tag in (("full frame", ""), ("centre crop 224 of 256", "-crop")):
            r = _load(f"accuracy-{FILES[dataset]}{tag}.json")
            peer = _triple_of(PEER[dataset][0]) if tag == "" else ""
            if r is not None:
                rows.append(f"| {short} | {protocol} | {_triple(r['metrics'])} | {peer} |")
    r = _load("accuracy-tile-train-every-4.json")
    if r is not None:
        p = PEER_TILE_SUBSET["full"]
        rows.append(f"| magnetic_tile, fit on every 4th training image (191) | full frame | {_triple(r['metrics'])}, "
                    f"fit {r['manifest']['fit']['fit_seconds']:.1f} s | {p[0]:.3f} / {p[1]:.3f} / {p[2]:.3f}, fit {p[3]} s |")
    return "\n".join(rows)


def _triple_of(t: tuple) -> str:
    return f"{t[0]:.3f} / {t[1]:.3f} / {t[2]:.3f}"


def levers_table(prefix: str = "", file: str = "levers.json") -> str:
    data = _load(file)
    if data is None:
        return ""
    rows = [r for r in data["rows"] if r["lever"].startswith(prefix) or (prefix and r["lever"] == "reconstruction")]
    levers = list(dict.fromkeys(r["lever"] for r in rows))
    out = ["| lever | " + " | ".join(NAMES.values()) + " |", "|---|" + "---|" * len(NAMES)]
    for lever in levers:
        cells = []
        for d in NAMES:
            r = next((x for x in rows if x["lever"] == lever and x["dataset"] == d), None)
            cells.append("" if r is None else _triple(r) + (f", fit {r['fit_seconds']:.0f} s" if r.get("fit_seconds") else ""))
        out.append(f"| {lever} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# the steps from the previous default (photometric-none) to today's, then levers measured on the way
DEFAULT_STEPS = ("photometric-none", "photometric-only", "border-2", "border-2-min", "border-bank-32k",
                 "photometric-bank-32k", "photometric-pool-include", "photometric-input-320",
                 "photometric-stages-2-4-5", "rec-photometric-none", "rec-photometric-frame")


def tagged_table(tags: tuple[str, ...] = DEFAULT_STEPS) -> str:
    """The default record and one row per tag of the accuracy-<dataset>-<tag>.json records that exist."""
    out = ["| record | " + " | ".join(NAMES.values()) + " |", "|---|" + "---|" * len(NAMES)]
    for tag in ("", *tags):
        records = [_load(f"accuracy-{FILES[d]}{'-' + tag if tag else ''}.json") for d in NAMES]
        if any(records):
            cells = ["" if r is None else f"{_triple(r['metrics'])}, fit {r['manifest']['fit']['fit_seconds']:.0f} s"
                     for r in records]
            out.append(f"| {tag or 'default'} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def fewshot_table() -> str:
    data = _load("fewshot.json")
    if data is None:
        return ""
    out = ["| dataset | K = 1 | K = 2 | K = 4 | K = 8 |", "|---|---|---|---|---|"]
    for d, short in NAMES.items():
        cells = {r["shots"]: _triple(r) for r in data["rows"] if r["dataset"] == d}
        out.append(f"| {short} | " + " | ".join(cells.get(k, "") for k in (1, 2, 4, 8)) + " |")
    return "\n".join(out)


def multiclass_table() -> str:
    data = _load("multiclass-reconstruction.json")
    if data is None:
        return ""
    keys = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro",
            "pixel_iou_max")
    out = ["| category | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, m in [*data["categories"].items(), ("mean", data["mean"])]:
        out.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
    return "\n".join(out) + f"\n\nOne model fitted on all three in {data['fit_seconds']:.0f} s."


def _cpu(machine: dict) -> str:
    """A record's CPU by kind: the model name and whether int8 has VNNI there."""
    features = machine["cpu_features"]
    return f"{machine['cpu'].replace('(R)', '')}, " + ("AVX-512 VNNI" if "avx512_vnni" in features else
                                    "AVX-VNNI" if "avx_vnni" in features else "AVX2 only")


def e2e_table() -> str:
    out = ["| dataset (files) | CPU | model / engine | images/s (median of the rounds) | "
           "ratio to the first row (per round, median) | seconds from command to exit |", "|---|---|---|---|---|---|"]
    for d, short in NAMES.items():
        for r in (_load(f"e2e-{FILES[d]}{suffix}.json") for suffix in CPU_SUFFIXES):
            if r is None:
                continue
            first = next(iter(r["median_fps"]))
            for key, fps in r["median_fps"].items():
                ratio = r["median_ratio"].get(f"{key} / {first}")
                wall = r.get("median_wall_s", {}).get(key)  # records before it was measured have none
                out.append(f"| {short} ({r['test_files']}) | {_cpu(r['machine'])} | {key} | {fps:.1f} | "
                           f"{'' if ratio is None else f'{ratio:.2f}'} | {'' if wall is None else f'{wall:.1f}'} |")
            out += [f"| {short} ({r['test_files']}) | {_cpu(r['machine'])} | {name}/int8 | refused by export "
                    f"(validation) | | |" for name in r.get("int8_refused", {})]
    return "\n".join(out)


def bench_table() -> str:
    out = ["| CPU | engine | bare compute frames/s | whole pipeline frames/s | efficiency | latency p50 / p99 ms |",
           "|---|---|---|---|---|---|"]
    for suffix in CPU_SUFFIXES:
        for precision in ("fp32", "int8"):
            r = _load(f"pipeline-{precision}{suffix}.json")
            if r is not None:
                lat = r["pipeline"]["latency_ms"]
                out.append(f"| {_cpu(r['machine'])} | {precision} | {r['compute']['fps']:.1f} | {r['pipeline']['fps']:.1f} | "
                           f"{r['efficiency']:.2f} | {lat['p50']:.0f} / {lat['p99']:.0f} |")
    return "\n".join(out)


def int8_table() -> str:
    out = ["| dataset | CPU | engine fp32 ms / image | int8 ms / image | speed-up (median of pairs) | "
           "image AUROC fp32 -> int8 | pixel AUROC fp32 -> int8 | AU-PRO fp32 -> int8 |", "|---|---|---|---|---|---|---|---|"]
    for d, short in NAMES.items():
        for r in (_load(f"int8-{FILES[d]}{suffix}.json") for suffix in CPU_SUFFIXES):
            out += _int8_rows(short, r) if r is not None else []

    isa = _load("int8-isa-hazelnut.json")
    if isa is not None:
        out.append("")
        out.append("| hazelnut, one int8 engine | CPU features | export validation | pixel AUROC fp32 -> int8 | "
                   "AU-PRO fp32 -> int8 |")
        out.append("|---|---|---|---|---|")
        for name, run in isa["runs"].items():
            v = run["validation"]
            verdict = "passes" if v["passed"] else "refuses: " + "; ".join(v["failures"])
            out.append(f"| {name} | {', '.join(run.get('cpu_features', v['cpu_features']))} | {verdict} | {run['fp32']['pixel_auroc']:.4f} -> "
                       f"{run['int8']['pixel_auroc']:.4f} | {run['fp32']['pixel_aupro']:.4f} -> "
                       f"{run['int8']['pixel_aupro']:.4f} |")
    return "\n".join(out)


def _int8_rows(short: str, r: dict) -> list[str]:
    """One bench.int8 record's rows, its CPU named by kind."""
    cpu, f, out = _cpu(r["machine"]), r["fp32"], []
    for row in r["rows"]:
        if not row.get("validated"):
            out.append(f"| {short} | {cpu} | refused: {row.get('refused')} | | | | | |")
            continue
        out.append(f"| {short} | {cpu} | {row['fp32_ms_per_image']:.2f} | {row['int8_ms_per_image']:.2f} | "
                   f"{row['median_pair_speedup']:.2f}x | {f['image_auroc']:.4f} -> {row['int8_image_auroc']:.4f} | "
                   f"{f['pixel_auroc']:.4f} -> {row['int8_pixel_auroc']:.4f} | "
                   f"{f['pixel_aupro']:.4f} -> {row['int8_pixel_aupro']:.4f} |")
    return out


def reliability_lines() -> str:
    out = []
    c = _load("curve.json")
    if c is not None:
        runs = c["runs"]
        plain = ", ".join(f"{r['fps']:.1f}" for r in runs["plain"])
        curve = ", ".join(f"{r['fps']:.1f}" for r in runs["curve"])
        out.append(f"- CURVE (`bench.curve`, {c['frames']} frames over tcp, standalone stages, alternating rounds): "
                   f"plain {plain} frames/s, CURVE {curve}; median per-round ratio CURVE / plain "
                   f"{c['median_ratio']:.2f}.")
    for path in sorted(RESULTS.glob("soak-*min.json"), key=lambda p: -float(p.stem[5:-3])):  # longest first
        s = json.loads(path.read_text())
        mem = ", ".join(f"{name} {m['first_window_mb']:.0f} -> {m['last_window_mb']:.0f} MB ({m['change']:+.1%})"
                        for name, m in s["memory"].items())
        out.append(f"- Soak (`bench.soak --minutes {s['minutes']:g} --kill-every {s['kill_every_s']:g}`, commit "
                   f"{s.get('commit', '?')[:7]}; it streamed for {s['elapsed_s'] / 60:.0f} minutes, the frame count being "
                   f"the rate of a probe run times the minutes): {s['frames_in']} frames in, {s['results']} results, {s['lost']} lost, "
                   f"{s['errors']} errors, {s['duplicates_dropped']} duplicates dropped, {len(s['kills'])} workers "
                   f"killed and {len(s['restarts'])} restarts, {s['logged_unique']} unique seqs logged of "
                   f"{s['logged']} lines; mean RSS of the first -> the last "
                   f"{next(iter(s['memory'].values()))['window_s'] / 60:.0f} minutes after the first minute: {mem}.")
    for path in sorted(RESULTS.glob("eval-memory-*.json")):
        e = json.loads(path.read_text())
        runs = "; ".join(
            f"{name} (code {e['codes'].get(name + '=', '?')}): peak {r[0]['peak_rss_gb']:.1f} GB, {r[0]['wall_s']:.0f} s, "
            f"pixel AUROC {r[0]['metrics']['pixel_auroc']:.6f}, AU-PRO {r[0]['metrics']['pixel_aupro']:.6f}"
            for name, r in e["runs"].items())
        out.append(f"- Eval's memory on large frames (`bench.eval_memory --dataset {e['dataset']} --enlarge {e['enlarge']}`, "
                   f"`{path.name}`): {e['test_images']} test frames, {e['test_pixels'] / 1e6:.0f} million pixels; {runs}.")
    return "\n".join(out)


TABLES = {"accuracy": accuracy_table, "protocols": protocol_table, "levers": levers_table,
          "reconstruction-levers": lambda: levers_table("rec-"),
          "levers-rerank": lambda: levers_table(file="levers-rerank.json"), "default-steps": tagged_table,
          "few-shot": fewshot_table,
          "multi-class": multiclass_table, "end-to-end": e2e_table, "bench": bench_table, "int8": int8_table,
          "reliability": reliability_lines}


def fill(markdown: str) -> str:
    """Every block between <!-- report:NAME --> and <!-- /report --> replaced by that table, now."""
    out, rest = [], markdown
    while "<!-- report:" in rest:
        head, rest = rest.split("<!-- report:", 1)
        name, rest = rest.split(" -->", 1)
        _, rest = rest.split("<!-- /report -->", 1)
        out += [head, f"<!-- report:{name} -->\n{TABLES[name]()}\n<!-- /report -->"]
    return "".join(out + [rest])


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readme", type=Path, default=None, help="rewrite this file's report blocks in place")
    args = parser.parse_args()
    if args.readme:
        args.readme.write_text(fill(args.readme.read_text()))
        return
    for name, table in TABLES.items():
        print(f"<!-- report:{name} -->\n{table()}\n<!-- /report -->\n")


if __name__ == "__main__":
    main()
