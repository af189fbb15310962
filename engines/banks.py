"""Memory banks of normal patch embeddings, searched by nearest neighbour in FAISS.

A bank holds M float32 vectors of size d. `nearest` returns, per query, the Euclidean
distance to its nearest bank vector (and which one). Index kinds:

- ``flat``: exact search. Stored as a FAISS flat index, searched by one torch GEMM per block of
  queries (``|q|^2 - 2 q.b + |b|^2``, then the k smallest, whose distances are recomputed
  directly so near neighbours lose no precision); bench/bank_search.py times it against
  faiss-cpu's flat search (slower than faiss for whole images in its latest record);
- ``ivf``: inverted lists over k-means cells (by default one per 256 vectors), the ``nprobe``
  nearest lists searched per query by one GEMM per list over the queries that probe it
  (`GemmLists`): on magnetic_tile's 32768-vector bank, 128 lists with 8 to 32 probes find the exact
  nearest vector for 97.9 % to 99.99 % of patches in 0.40x to 0.66x the time of faiss's own IVF
  scan of the same lists (bench/results/bank_search-tile-ivf-gemm-avx2.json, one thread); it is
  not faster than the default HNSW there, nor end to end (e2e-tile-ivf-avx2.json);
- ``hnsw``: a navigable small-world graph of ``hnsw_m`` links per vector, built with ``ef_construction``
  candidates per insertion and searched with ``ef_search`` per query. The defaults (M 16, 64, 16) find
  the exact nearest vector for 97.9 % of magnetic_tile's patches in 0.54x the time of the earlier
  (32, 32), at 99.5 % (bench/results/bank_search-tile-hnsw-*.json); each map's highest cells are
  then searched again exactly (``rerank``), so image scores and map peaks do not depend on the misses.
  ``hnsw_storage`` fp16 keeps the graph's vectors in half precision (faiss IndexHNSWSQ): half the
  memory the search walks, so it is faster at the same exactness (bench/results/bank_search-*.json);
- ``auto`` (the default): ``hnsw`` and ``ivf`` both built when the bank is fitted, IVF given the
  fewest probes that are as exact as HNSW on real queries, both timed there and the faster kept
  (`MemoryBank.fastest`): which wins depends on the CPU's vector units and the bank's size, so a
  model keeps both and a CPU of another kind that serves it times them again (`time_searches`).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engines.errors import ConfigError

if TYPE_CHECKING:
    import torch

INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
TIMED_KINDS = ("hnsw", "ivf")  # what `auto` builds, times and picks from
AUTO_QUERIES = 8192  # the patches `auto` measures exactness on at most (8 frames of 32 x 32 cells); it times half
LIST_SIZE = 256  # an ivf bank's vectors per list by default: one probe is a GEMM of 256 columns
BANK_PRECISIONS = ("fp32", "fp16")
HNSW_STORAGES = ("fp32", "fp16")


@dataclasses.dataclass(frozen=True)
class BankConfig:
    """index: one of INDEX_KINDS (auto: the faster of TIMED_KINDS on this CPU at equal exactness, IVF's
    nprobe tuned, see `MemoryBank.fastest`; a built bank's config names the kind it holds and its
    probes); nlist / nprobe for ivf (nlist 0: M / LIST_SIZE); hnsw_m / ef_construction /
    hnsw_storage (used by build only: a bank file holds its own) / ef_search for hnsw; rerank (ivf and
    hnsw): per map, the cells of highest approximate distance searched again exactly (the image score
    and the map peaks are exact; an approximate search only ever overstates a distance)."""

    index: str = "auto"
    nlist: int = 0
    nprobe: int = 8
    hnsw_m: int = 16
    ef_construction: int = 64
    ef_search: int = 16
    rerank: int = 16
    hnsw_storage: str = "fp16"

    def __post_init__(self):
        if self.index not in INDEX_KINDS:
            raise ConfigError(f"unknown index {self.index!r}; valid kinds: {', '.join(INDEX_KINDS)}")
        if self.hnsw_storage not in HNSW_STORAGES:
            raise ConfigError(f"unknown hnsw storage {self.hnsw_storage!r}; valid: {', '.join(HNSW_STORAGES)}")
        if min(self.nprobe, self.hnsw_m, self.ef_construction, self.ef_search) < 1 or min(self.rerank, self.nlist) < 0:
            raise ConfigError(f"bank search settings must be >= 1 (rerank and nlist >= 0): {self}")


def _faiss():
    import faiss  # imported where used

    return faiss


class MemoryBank:
    """A FAISS index over normal patch embeddings."""

    def __init__(self, index, config: BankConfig, device: str = "cpu", precision: str = "fp32"):
        """device: "cpu", or "cuda[:N]": every bank is then searched exactly by torch on that GPU (its
        vectors copied there; no faiss-gpu needed, and exact search is what a GPU does fast).

        precision of the torch search's distance products: fp32, or fp16 (vectors stored in half,
        for GPUs). Whatever picks the nearest neighbour, its distance is recomputed in fp32.
        """
        if precision not in BANK_PRECISIONS:
            raise ConfigError(f"bank precision {precision!r}; valid: {', '.join(BANK_PRECISIONS)}")
        if config.index == "auto":
            raise ConfigError("a bank holds one index kind: auto is resolved when the bank is built (MemoryBank.build)")
        self.precision = precision
        self.index = index
        self.config = config
        self.device = device
        self._apply_search_params()
        self._matrix = None  # torch search: the bank as a tensor [M, d] and its squared norms [M]
        self._lists = None  # an ivf bank on the CPU: its lists, searched by GEMM
        self.timing: dict[str, dict] = {}  # index auto: each timed kind's speed and exactness (`fastest`)
        self.rivals: dict[str, MemoryBank] = {}  # index auto: the other kinds' banks of the same vectors
        self.timing_queries: np.ndarray | None = None  # index auto: float32 [Q, d], what they were timed on
        if config.index == "flat" or device != "cpu":
            import torch

            matrix = torch.from_numpy(self.vectors()).to(device)
            self._matrix = matrix.half() if precision == "fp16" else matrix
            self._norms = (matrix * matrix).sum(1)
        elif config.index == "ivf":
            self._lists = GemmLists(index, self._held)

    @classmethod
    def build(cls, vectors: np.ndarray, config: BankConfig = BankConfig(),
              held_out: list[tuple[np.ndarray, tuple[int, int] | None]] | None = None) -> "MemoryBank":
        """vectors: float32 [M, d], kept in this order (bank id i is row i). held_out: what index auto
        measures its candidates on (`fastest`)."""
        if config.index == "auto":
            return cls.fastest(vectors, config, held_out)
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        m, d = vectors.shape
        if config.index == "flat":
            index = faiss.IndexFlatL2(d)
        elif config.index == "ivf":
            most = max(1, m // 39)  # faiss wants >= 39 training points per list
            if config.nlist > most:
                raise ConfigError(f"--nlist {config.nlist} is more lists than a bank of {m} vectors can train "
                                  f"(39 vectors a list); give --nlist {most} or fewer, or 0 (one per {LIST_SIZE})")
            nlist = config.nlist or min(most, max(1, round(m / LIST_SIZE)))
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
            index.train(vectors)
        else:
            index = (faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_fp16, config.hnsw_m) if config.hnsw_storage == "fp16"
                     else faiss.IndexHNSWFlat(d, config.hnsw_m))
            index.hnsw.efConstruction = config.ef_construction
            index.train(vectors)  # fp16 needs no statistics and flat none; faiss asks for the call
        index.add(vectors)
        return cls(index, config)

    @classmethod
    def fastest(cls, vectors: np.ndarray, config: BankConfig,
                held_out: list[tuple[np.ndarray, tuple[int, int] | None]] | None, rounds: int = 3) -> "MemoryBank":
        """Index auto: an HNSW and an IVF bank of `vectors`, compared at equal exactness on real frames,
        the faster returned. held_out: per frame, its embeddings float32 [..., d] and the bank id range
        it is searched without (a fit's calibration frames without their own patches, as unseen
        normal frames; None: none).

        The HNSW bank is searched as configured; the IVF bank gets the fewest probes that find the
        exact nearest vector for as many of the frames' patches (at most AUTO_QUERIES, evenly taken)
        as HNSW does (probes are nested, so the share only grows with them: a bisection). Both are
        then timed on every other of those patches (`time_searches`). `timing` keeps, per kind, ms per
        1024 queries and the exact share (and IVF's probes); `rivals` the bank of the other kind and
        `timing_queries` the patches timed, so that a CPU that serves the model can time them again
        (calibration.memory_bank). Which is faster depends on the CPU and the bank: an IVF bank's
        GEMMs win where the cores do two 512-bit FMAs a cycle (an Intel Xeon: 0.59x HNSW's time on
        magnetic_tile, bench/results/accuracy-tile.json), HNSW's graph walk where they do 256-bit
        ones (an AVX2-only EPYC: IVF at 1.27x, bank_search-tile-ivf-gemm-avx2.json)."""
        if not held_out:
            raise ConfigError("index auto measures its candidate indexes on real frames; none were given")
        rows = [f.reshape(-1, f.shape[-1]) for f, _ in held_out]
        step = -(-sum(map(len, rows)) // AUTO_QUERIES)  # every step-th patch: a tiled fit's frames are large
        frames = [(np.ascontiguousarray(r[::step], np.float32), exclude) for r, (_, exclude) in zip(rows, held_out)]
        queries = np.concatenate([q for q, _ in frames])
        banks = {kind: cls.build(vectors, dataclasses.replace(config, index=kind)) for kind in TIMED_KINDS}
        ivf = banks["ivf"]
        nearest = [ivf.search_exact(q, exclude)[0][:, 0] for q, exclude in frames]  # ivf holds the fp32 vectors

        def exact_share(bank: MemoryBank) -> float:
            exact = 0
            for (q, exclude), near in zip(frames, nearest):
                found = np.linalg.norm(q - ivf._held[bank.search(q, 1, exclude)[1][:, 0]], axis=1)
                exact += int(np.sum(found <= near * (1 + 1e-5) + 1e-6))
            return exact / len(queries)

        target = exact_share(banks["hnsw"])
        low, high = 1, len(ivf._lists.lists)
        while low < high:  # the fewest probes whose exact share reaches HNSW's
            ivf.config = dataclasses.replace(ivf.config, nprobe=(low + high) // 2)
            if exact_share(ivf) >= target:
                high = ivf.config.nprobe
            else:
                low = ivf.config.nprobe + 1
        ivf.config = dataclasses.replace(ivf.config, nprobe=low)
        ivf._apply_search_params()
        shares = {"hnsw": target, "ivf": exact_share(ivf)}
        timed = queries[::2]
        speeds = time_searches(banks, timed, rounds)
        timing = {kind: {"ms_per_1024": ms, "exact_share": round(shares[kind], 4)} for kind, ms in speeds.items()}
        timing["ivf"]["nprobe"] = ivf.config.nprobe
        kept = min(speeds, key=speeds.get)
        bank = banks[kept]
        bank.timing = timing
        bank.rivals = {kind: other for kind, other in banks.items() if kind != kept}
        bank.timing_queries = timed
        return bank

    def _apply_search_params(self) -> None:
        if self.config.index == "ivf":
            self.index.nprobe = self.config.nprobe
        elif self.config.index == "hnsw":
            self.index.hnsw.efSearch = self.config.ef_search

    @property
    def torch_search(self) -> bool:
        """Whether torch searches this bank exactly (flat banks; any bank on a GPU): `search_tensor` works."""
        return self._matrix is not None

    @property
    def exact(self) -> bool:
        """Whether `search` is exact already (flat banks, and every bank torch searches)."""
        return self.config.index == "flat" or self.torch_search

    def search_exact(self, queries: np.ndarray, exclude: tuple[int, int] | None = None, block: int = 256):
        """queries float32 [P, d] -> the exact nearest (distances float32 [P, 1], ids int64 [P, 1]) by brute
        force over the bank's vectors, whatever the index (a few queries: the re-ranked cells).

        One numpy (OpenBLAS) GEMM per block of queries (`_augmented`), the smallest, its distance
        recomputed directly: 0.33x the time of the flat search's torch GEMM (MKL) on an AMD
        EPYC (bench/results/bank_search-tile-rerank-avx2.json), and faiss's own brute force skips BLAS below its
        distance_compute_blas_threshold (128,000 queries in faiss-cpu 1.15). Its threads are
        numpy's BLAS pool, which a detector limits to its deployment's (threadpoolctl)."""
        if self.exact:
            return self.search(queries, 1, exclude)
        vectors, augmented = self._held, self._augmented_held
        queries = np.ascontiguousarray(queries, np.float32)
        qa = _with_ones(queries)
        ids = np.empty((len(queries), 1), np.int64)
        for start in range(0, len(queries), block):
            d2 = qa[start:start + block] @ augmented  # [b, M]: |b|^2 - 2 q.b
            if exclude is not None:
                d2[:, exclude[0]:exclude[1]] = np.inf
            ids[start:start + block, 0] = d2.argmin(axis=1)
        dist = np.linalg.norm(queries - vectors[ids[:, 0]], axis=1).astype(np.float32)[:, None]
        if exclude is not None and exclude[1] - exclude[0] >= self.size:  # nothing left, as FAISS answers
            dist[:], ids[:] = np.inf, -1
        return dist, ids

    @functools.cached_property
    def _held(self) -> np.ndarray:
        """The bank's vectors float32 [M, d] in id order, read once (the CPU's exact and GEMM searches)."""
        return self.vectors()

    @functools.cached_property
    def _augmented_held(self) -> np.ndarray:
        """`_augmented` of `_held`: [d + 1, M], for `search_exact`."""
        return _augmented(self._held)

    def vectors(self) -> np.ndarray:
        """A copy of the bank's vectors, float32 [M, d] in id order, whatever index holds them."""
        if self.config.index == "flat":
            flat = _faiss().rev_swig_ptr(self.index.get_xb(), self.size * self.dim)
            return np.array(flat, np.float32).reshape(self.size, self.dim)
        if self.config.index == "ivf":
            self.index.make_direct_map()
        return np.ascontiguousarray(self.index.reconstruct_n(0, self.size), np.float32)

    @property
    def size(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.d

    def search(self, queries: np.ndarray, k: int = 1, exclude: tuple[int, int] | None = None):
        """queries float32 [P, d] -> (distances float32 [P, k] Euclidean, ids int64 [P, k]).

        exclude: a half-open id range [lo, hi) left out of the search (used to score a
        training image against the bank without its own patches). An approximate search that finds no
        neighbour outside it (every probed IVF list excluded, an HNSW graph cut off) is searched again
        exactly (k 1), so calibration never takes a missing neighbour for a distance.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self._matrix is not None:
            return self._search_exact(queries, k, exclude)
        dist, ids = self._search_approximate(queries, k, exclude)
        lost = np.flatnonzero(ids[:, 0] < 0)
        if k == 1 and len(lost):
            dist[lost], ids[lost] = self.search_exact(queries[lost], exclude)
        return dist, ids

    def _search_approximate(self, queries: np.ndarray, k: int, exclude: tuple[int, int] | None):
        if self._lists is not None:
            return self._lists.search(queries, k, self.config.nprobe, exclude)
        faiss = _faiss()
        params = None
        if exclude is not None:
            selector = faiss.IDSelectorNot(faiss.IDSelectorRange(int(exclude[0]), int(exclude[1])))
            if self.config.index == "ivf":
                params = faiss.SearchParametersIVF(sel=selector, nprobe=self.config.nprobe)
            elif self.config.index == "hnsw":
                params = faiss.SearchParametersHNSW(sel=selector, efSearch=self.config.ef_search)
            else:
                params = faiss.SearchParameters(sel=selector)
        dist, ids = self.index.search(queries, k, params=params)
        np.maximum(dist, 0, out=dist)
        np.sqrt(dist, out=dist)
        dist[ids < 0] = np.inf  # none found: FAISS's placeholder distance is no distance
        return dist, ids

    def _search_exact(self, queries: np.ndarray, k: int, exclude: tuple[int, int] | None):
        import torch

        dist, ids = self.search_tensor(torch.from_numpy(queries), k, exclude)
        return dist.cpu().numpy(), ids.cpu().numpy()

    def search_tensor(self, queries: "torch.Tensor", k: int = 1, exclude: tuple[int, int] | None = None,
                      block: int = 512):
        """Flat banks only: float32 tensor [P, d] (any device) -> (distances float32 [P, k], ids int64 [P, k])
        as tensors on the bank's device; the GPU path keeps everything there."""
        if self._matrix is None:
            raise ConfigError(f"search_tensor needs a flat bank (or an HNSW bank on a GPU); this one is "
                              f"{self.config.index} on {self.device}")
        return _exact_search(queries, self._matrix, self._norms, k, exclude, block)

    def save(self, path: str | Path) -> None:
        _faiss().write_index(self.index, str(path))

    @classmethod
    def load(cls, path: str | Path, config: BankConfig, device: str = "cpu", precision: str = "fp32") -> "MemoryBank":
        return cls(_faiss().read_index(str(path)), config, device, precision)


def time_searches(banks: dict[str, MemoryBank], queries: np.ndarray, rounds: int = 3) -> dict[str, float]:
    """kind -> ms per 1024 queries: each bank's search of queries float32 [Q, d] for its nearest vector,
    on one thread (faiss's and BLAS's), as `run` deploys each worker; one warm-up search each (the IVF
    lists' vectors, the graph's pages), then `rounds` taking turns, medians. What index auto compares,
    where a model is fitted and again on a CPU of another kind that serves it."""
    import time

    from threadpoolctl import threadpool_limits

    faiss = _faiss()
    queries = np.ascontiguousarray(queries, np.float32)
    seconds: dict[str, list[float]] = {kind: [] for kind in banks}
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        with threadpool_limits(1, user_api="blas"):
            for bank in banks.values():
                bank.search(queries[:256], 1)
            for _ in range(rounds):
                for kind, bank in banks.items():
                    start = time.perf_counter()
                    bank.search(queries, 1)
                    seconds[kind].append(time.perf_counter() - start)
    finally:
        faiss.omp_set_num_threads(threads)
    return {kind: round(1000 * float(np.median(s)) * 1024 / len(queries), 3) for kind, s in seconds.items()}


def _exact_search(queries: torch.Tensor, matrix: torch.Tensor, norms: torch.Tensor, k: int,
                  exclude: tuple[int, int] | None, block: int = 512):
    """Exact kNN by one GEMM per block of queries: queries float32 [P, d] (any device), matrix [M, d]
    (float32 or float16) and its float32 squared norms [M] on one device -> (distances float32 [P, k],
    ids int64 [P, k]) there; ids -1 (and distance inf) where fewer than k rows lie outside `exclude`."""
    import torch

    q = queries.to(matrix.device, torch.float32)
    dist = torch.empty((len(q), k), dtype=torch.float32, device=q.device)
    ids = torch.empty((len(q), k), dtype=torch.int64, device=q.device)
    with torch.inference_mode():
        for start in range(0, len(q), block):
            qb = q[start:start + block]
            if matrix.dtype == torch.float16:
                d2 = torch.addmm(norms[None, :].half(), qb.half(), matrix.T, alpha=-2.0).float()
            else:
                d2 = torch.addmm(norms[None, :], qb, matrix.T, alpha=-2.0)
            if exclude is not None:
                d2[:, exclude[0]:exclude[1]] = float("inf")
            if k == 1:
                best, idx = d2.min(dim=1, keepdim=True)
            else:
                best, idx = torch.topk(d2, k, dim=1, largest=False)
            # the expansion loses precision for near neighbours: recompute the chosen distances directly
            exact = (qb[:, None, :] - matrix[idx].float()).norm(dim=2)
            exact[torch.isinf(best)] = float("inf")
            exact, order = exact.sort(dim=1)
            idx = idx.gather(1, order)
            idx[torch.isinf(exact)] = -1  # fewer than k rows left outside `exclude`, as FAISS does
            dist[start:start + len(qb)] = exact
            ids[start:start + len(qb)] = idx
    return dist, ids


class GemmLists:
    """An IVF index's inverted lists, searched on the CPU by matrix products: the queries that probe a
    list meet all its vectors in one GEMM (numpy's BLAS), `[q, 1] @ [-2 v; |v|^2]` = `|v|^2 - 2 q.v`, so
    a probe costs what the arithmetic costs. Exact within the probed lists, as faiss's own IVF search
    is; faiss scans each query's lists one vector at a time."""

    def __init__(self, index, vectors: np.ndarray):
        """index: a faiss IVF index; vectors: its vectors float32 [M, d] in id order (held, not copied)."""
        faiss = _faiss()
        ivf = faiss.extract_index_ivf(index)
        lists = ivf.invlists
        self.centroids = _augmented(ivf.quantizer.reconstruct_n(0, ivf.nlist))  # [d + 1, nlist]
        self.vectors = vectors  # the chosen distances are recomputed from them
        self.lists = []  # per list: (ids int64 [n], augmented vectors float32 [d + 1, n])
        for l in range(ivf.nlist):
            n = lists.list_size(l)
            ids = faiss.rev_swig_ptr(lists.get_ids(l), n).astype(np.int64) if n else np.empty(0, np.int64)
            self.lists.append((ids, _augmented(vectors[ids])))

    def search(self, queries: np.ndarray, k: int, nprobe: int, exclude: tuple[int, int] | None):
        """queries float32 [P, d] -> (distances float32 [P, k], ids int64 [P, k]) over each query's `nprobe`
        nearest lists; ids -1 (distance inf) where fewer than k vectors are found.

        The (query, probe) pairs are sorted by list and gathered once, so each list multiplies one
        contiguous block of queries and writes one contiguous block of results."""
        p = len(queries)
        nlist = len(self.lists)
        nprobe = min(nprobe, nlist)
        qa = _with_ones(queries)
        probes = np.argpartition(qa @ self.centroids, nprobe - 1, axis=1)[:, :nprobe].ravel()  # [P * nprobe]
        order = np.argsort(probes.astype(np.int16 if nlist < 2 ** 15 else np.int64), kind="stable")  # by list
        bounds = np.concatenate([[0], np.cumsum(np.bincount(probes, minlength=nlist))])
        pairs = qa[order // nprobe]  # [P * nprobe, d + 1]: each probe's query, grouped by list
        near_d = np.full((p * nprobe, k), np.inf, np.float32)  # |v|^2 - 2 q.v of each probe's k nearest
        near_i = np.full((p * nprobe, k), -1, np.int64)
        for l, (ids, vectors) in enumerate(self.lists):
            a, b = bounds[l], bounds[l + 1]
            if a == b or not len(ids):
                continue
            d2 = pairs[a:b] @ vectors  # [probes of l, n]
            if exclude is not None:
                d2[:, (ids >= exclude[0]) & (ids < exclude[1])] = np.inf
            kk = min(k, len(ids))
            near = d2.argmin(axis=1)[:, None] if kk == 1 else np.argpartition(d2, kk - 1, axis=1)[:, :kk]
            near_d[a:b, :kk] = np.take_along_axis(d2, near, axis=1)
            near_i[a:b, :kk] = ids[near]
        near_i[np.isinf(near_d)] = -1
        found_d, found_i = np.empty_like(near_d), np.empty_like(near_i)
        found_d[order], found_i[order] = near_d, near_i  # back to query order
        found_d, found_i = found_d.reshape(p, nprobe * k), found_i.reshape(p, nprobe * k)
        best = found_d.argmin(axis=1)[:, None] if k == 1 else np.argsort(found_d, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(found_i, best, axis=1)
        # the expansion loses precision for near neighbours: recompute the chosen distances directly
        dist = np.linalg.norm(queries[:, None, :] - self.vectors[ids], axis=2).astype(np.float32)
        dist[ids < 0] = np.inf
        order = np.argsort(dist, axis=1, kind="stable")
        return np.take_along_axis(dist, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _with_ones(queries: np.ndarray) -> np.ndarray:
    """float32 [P, d] -> [P, d + 1]: each query with a 1 appended, to multiply with `_augmented` vectors."""
    out = np.empty((len(queries), queries.shape[1] + 1), np.float32)
    out[:, :-1], out[:, -1] = queries, 1
    return out


def _augmented(vectors: np.ndarray) -> np.ndarray:
    """float32 [n, d] -> [d + 1, n]: -2 v above |v|^2, so that [q, 1] @ it = |v|^2 - 2 q.v."""
    out = np.empty((vectors.shape[1] + 1, len(vectors)), np.float32)
    out[:-1] = -2 * vectors.T
    out[-1] = np.einsum("ij,ij->i", vectors, vectors)
    return out
