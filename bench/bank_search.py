"""Bank search speed and exactness: faiss flat vs the torch GEMM flat search vs IVF / HNSW.

Fits a model on a real dataset, embeds its test images, then times each search on the
same queries (one image = all its patches) and compares with the exact result.

    python -m bench.bank_search --dataset mpdd/metal_plate
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

from bench.accuracy import DATA, ROOT
from calibration.artifact import machine_info
from calibration.dataset import evaluation_samples
from calibration.fit import FitConfig, extract, fit
from calibration.model import Deployment, InspectionModel
from engines.banks import BankConfig, MemoryBank


def timed(fn, queries: np.ndarray, per_image: int, repeats: int = 2) -> tuple[float, np.ndarray]:
    fn(queries[:per_image])  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dist = fn(queries)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / (len(queries) / per_image), dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="mpdd/metal_plate")
    parser.add_argument("--images", type=int, default=24, help="test images used as queries")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    data = DATA / args.dataset
    with tempfile.TemporaryDirectory() as tmp:
        deployment = Deployment(threads=args.threads)
        fit(data, Path(tmp) / "m", FitConfig(deployment=deployment))
        model = InspectionModel(Path(tmp) / "m", deployment)
        paths = [s.path for s in evaluation_samples(data)][: args.images]
        with model.engine:
            feats = extract(model.engine, paths, model.input_size, 8, None)
    n, h, w, d = feats.shape
    queries = feats.reshape(-1, d)
    vectors = model.bank._matrix.numpy()
    exact = MemoryBank.build(vectors)
    rows = []

    def record(name: str, fn, ref=None):
        ms, dist = timed(fn, queries, h * w)
        row = {"search": name, "ms_per_image": round(ms, 2)}
        if ref is not None:
            rel = (dist - ref) / np.maximum(ref, 1e-6)
            row.update(mean_rel_score_error=float(rel.mean()), max_rel_score_error=float(rel.max()),
                       exact_fraction=float(np.mean(rel < 1e-4)))
        rows.append(row)
        print(row, flush=True)
        return dist

    ref = record("flat (torch GEMM)", lambda q: exact.search(q)[0][:, 0])
    flat_faiss = faiss.IndexFlatL2(d)
    flat_faiss.add(vectors)
    record("flat (faiss IndexFlatL2)", lambda q: np.sqrt(np.maximum(flat_faiss.search(q, 1)[0][:, 0], 0)), ref)
    for nprobe in (4, 8, 16):
        bank = MemoryBank.build(vectors, BankConfig(index="ivf", nprobe=nprobe))
        record(f"ivf nlist={bank.index.nlist} nprobe={nprobe}", lambda q, b=bank: b.search(q)[0][:, 0], ref)
    for ef in (16, 32, 64):
        bank = MemoryBank.build(vectors, BankConfig(index="hnsw", ef_search=ef))
        record(f"hnsw M=32 ef_search={ef}", lambda q, b=bank: b.search(q)[0][:, 0], ref)
    result = {"dataset": args.dataset, "bank_size": len(vectors), "dim": d, "query_images": n,
              "patches_per_image": h * w, "threads": args.threads, "rows": rows, "machine": machine_info()}
    out = ROOT / "bench" / "results" / f"bank_search-{args.dataset.split('/')[-1]}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
