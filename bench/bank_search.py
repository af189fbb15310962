"""Bank search speed and exactness: the torch GEMM flat search, faiss flat, IVF and HNSW, on a real bank.

Fits a memory bank on a real dataset (any `lineguard fit` options after --), embeds test images
with its engine, then times each search on the same queries (one image = all its patches) and
compares with the exact result: the fraction of patches that get the exact nearest distance, and
the mean relative error of the distances.

    python -m bench.bank_search --dataset magnetic_tile/tile -- --coreset-max 32768
    python -m bench.bank_search --threads 1 --hnsw 16:32:32 16:128:32 16:128:24 --rounds 3

HNSW rows are M:EF_CONSTRUCTION:EF_SEARCH[:STORAGE] (storage fp32 | fp16, default the bank's);
with --rounds R every row is timed R times, the rows taking turns (this machine's speed drifts),
and the median is recorded with the per-round ratios to the first HNSW row.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from bench.accuracy import DATA, RESULTS
from calibration.artifact import machine_info
from calibration.dataset import evaluation_samples, read_frames
from calibration.model import Model
from engines.banks import BankConfig, MemoryBank
from engines.runtimes import Deployment
from pipeline.cli import main as lineguard


def timed(fn, queries: np.ndarray, per_image: int, repeats: int = 2) -> tuple[float, np.ndarray]:
    fn(queries[:per_image])  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dist = fn(queries)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / (len(queries) / per_image), dist


def rerank_rows(vectors: np.ndarray, queries: np.ndarray, ref: np.ndarray, images: int, per_image: int, rounds: int,
                record) -> None:
    """The exact re-ranking of each image's `BankConfig().rerank` highest cells (their exact distances
    `ref` chosen): `MemoryBank.search_exact` (numpy's GEMM) against the torch GEMM of the flat search,
    taking turns, ms per image."""
    from engines.banks import _exact_search

    k = BankConfig().rerank
    top = np.argpartition(ref.reshape(images, per_image), per_image - k, axis=1)[:, per_image - k:]
    cells = queries[(np.arange(images)[:, None] * per_image + top).ravel()]
    bank = MemoryBank.build(vectors, BankConfig(index="hnsw"))  # any approximate kind: search_exact reads its vectors
    tensors = torch.from_numpy(vectors), torch.from_numpy((vectors * vectors).sum(1))
    ways = {"numpy": lambda q: bank.search_exact(q)[0][:, 0],
            "torch": lambda q: _exact_search(torch.from_numpy(q), *tensors, 1, None)[0][:, 0].numpy()}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(max(rounds, 3)):
        for name, way in ways.items():
            ms, _ = timed(way, cells, len(cells))  # every image's cells in one call, as a batch's are
            times[name].append(ms / images)
    ratio = float(np.median(np.array(times["numpy"]) / np.array(times["torch"])))
    rows_ref = ref.reshape(images, per_image)[np.arange(images)[:, None], top].ravel()
    for name, way in ways.items():
        record(f"re-ranking of {k} cells an image ({name} GEMM)", float(np.median(times[name])), way(cells),
               ref_rows=rows_ref, ms_rounds=[round(t, 3) for t in times[name]], median_ratio_numpy_to_torch=ratio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="magnetic_tile/tile")
    parser.add_argument("--images", type=int, default=24, help="test images used as queries")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hnsw", nargs="+", default=["16:128:16", "16:128:24", "16:128:32", "32:128:32"],
                        help="HNSW rows as M:EF_CONSTRUCTION:EF_SEARCH")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--skip-flat-ivf", action="store_true", help="time the HNSW rows only")
    parser.add_argument("--tag", default="")
    parser.add_argument("fit_args", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    threadpool_limits(args.threads, user_api="blas")
    data = DATA / args.dataset
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "m"
        if lineguard(["fit", str(data), "-o", str(model_dir), "--threads", str(args.threads), *args.fit_args]):
            raise SystemExit("fit failed")
        model = Model(model_dir)
        detector = model.detector(Deployment(threads=args.threads))
        inputs = []
        for layout, image in read_frames([s.path for s in evaluation_samples(data)][: args.images], model.geometer):
            out = np.empty((layout.count,) + model.spec.shape, np.uint8)
            model.geometer.prepare(image, layout, out)
            inputs.extend(out)
        with detector:
            feats = detector.engine.infer(np.stack(inputs))
        vectors = detector.bank.vectors()
    n, h, w, d = feats.shape
    queries = np.ascontiguousarray(feats.reshape(-1, d))
    exact = MemoryBank.build(vectors, BankConfig(index="flat"))
    rows = []

    def record(name: str, ms: float, dist: np.ndarray, ref_rows: np.ndarray | None = None, **extra) -> None:
        """One row: its time and its distances [P] against the exact ones (`ref`, or `ref_rows` for a subset)."""
        exact_dist = ref if ref_rows is None else ref_rows
        rel = (dist - exact_dist) / np.maximum(exact_dist, 1e-6)
        row = {"search": name, "ms_per_image": round(ms, 2), **extra,
               "mean_rel_score_error": float(rel.mean()), "max_rel_score_error": float(rel.max()),
               "exact_fraction": float(np.mean(rel < 1e-4))}
        rows.append(row)
        print(row, flush=True)

    flat_faiss = faiss.IndexFlatL2(d)
    flat_faiss.add(vectors)
    ref = np.sqrt(np.maximum(flat_faiss.search(queries, 1)[0][:, 0], 0))
    if not args.skip_flat_ivf:
        record("flat (torch GEMM)", *timed(lambda q: exact.search(q)[0][:, 0], queries, h * w))
        record("flat (faiss IndexFlatL2)",
               *timed(lambda q: np.sqrt(np.maximum(flat_faiss.search(q, 1)[0][:, 0], 0)), queries, h * w))
        for nprobe in (8, 12, 16, 32):
            bank = MemoryBank.build(vectors, BankConfig(index="ivf", nprobe=nprobe))
            record(f"ivf nlist={bank.index.nlist} nprobe={nprobe} (GEMM per list)",
                   *timed(lambda q, b=bank: b.search(q)[0][:, 0], queries, h * w))
            bank.index.nprobe = nprobe
            record(f"ivf nlist={bank.index.nlist} nprobe={nprobe} (faiss's scan)",
                   *timed(lambda q, b=bank: np.sqrt(np.maximum(b.index.search(q, 1)[0][:, 0], 0)), queries, h * w))
    rerank_rows(vectors, queries, ref, n, h * w, args.rounds, record)
    hnsw = {}
    for spec in args.hnsw:
        m, efc, ef, *storage = spec.split(":")
        config = BankConfig(index="hnsw", hnsw_m=int(m), ef_construction=int(efc), ef_search=int(ef),
                            **({"hnsw_storage": storage[0]} if storage else {}))
        start = time.perf_counter()
        hnsw[f"hnsw M={m} ef_construction={efc} ef_search={ef} storage={config.hnsw_storage}"] = (
            MemoryBank.build(vectors, config), round(time.perf_counter() - start, 2))
    times: dict[str, list[float]] = {name: [] for name in hnsw}
    dists: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, (bank, _) in hnsw.items():
            ms, dists[name] = timed(lambda q, b=bank: b.search(q)[0][:, 0], queries, h * w)
            times[name].append(ms)
    first = next(iter(times), None)
    for name, (_, build) in hnsw.items():
        record(name, float(np.median(times[name])), dists[name], build_seconds=build,
               ms_rounds=[round(t, 2) for t in times[name]],
               median_ratio_to_first=float(np.median(np.array(times[name]) / np.array(times[first]))))
    result = {"dataset": args.dataset, "fit_args": args.fit_args, "bank_size": len(vectors), "dim": d,
              "query_images": args.images, "patches_per_image": h * w, "threads": args.threads, "rounds": args.rounds,
              "rows": rows,
              "machine": machine_info()}
    name = args.dataset.split("/")[-1] + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"bank_search-{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
