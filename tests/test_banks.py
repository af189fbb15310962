"""Memory-bank search (engines/banks.py), checked against brute-force numpy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engines.banks import AUTO_QUERIES, INDEX_KINDS, TIMED_KINDS, BankConfig, MemoryBank
from engines.errors import ConfigError

DIST_ATOL = 1e-4
FLAT = BankConfig(index="flat")


def _brute(bank: np.ndarray, queries: np.ndarray, k: int, exclude=None):
    """Exact Euclidean kNN in float64: (distances [P, k], ids [P, k], all sorted distances [P, M'])."""
    ids_all = np.arange(len(bank))
    if exclude is not None:
        ids_all = ids_all[(ids_all < exclude[0]) | (ids_all >= exclude[1])]
    d = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None, ids_all].astype(np.float64)) ** 2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")
    sorted_d = np.take_along_axis(d, order, 1)
    return sorted_d[:, :k], ids_all[order[:, :k]], sorted_d


def _check_against_brute(bank_vectors, queries, dist, ids, k, exclude=None):
    want_d, want_ids, sorted_d = _brute(bank_vectors, queries, k, exclude)
    assert dist.shape == ids.shape == (len(queries), k)
    assert dist.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_allclose(dist, want_d, rtol=0, atol=DIST_ATOL)
    # the returned ids are at the returned distances (holds with ties too)
    actual = np.linalg.norm(queries[:, None, :].astype(np.float64) - bank_vectors[ids].astype(np.float64), axis=2)
    np.testing.assert_allclose(actual, dist, rtol=0, atol=DIST_ATOL)
    # ids equal wherever the first k+1 neighbours are separated by more than the tolerance
    gaps = np.diff(sorted_d[:, :k + 1], axis=1).min(axis=1)
    clear = gaps > 10 * DIST_ATOL
    assert clear.mean() > 0.9  # the data is tie-free enough for this to mean something
    np.testing.assert_array_equal(ids[clear], want_ids[clear])


@pytest.fixture(scope="module")
def flat_data():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((2000, 16)).astype(np.float32)
    queries = rng.standard_normal((300, 16)).astype(np.float32)
    return bank, queries, MemoryBank.build(bank, FLAT)


@pytest.fixture(scope="module")
def clustered():
    """4000 bank points around 50 Gaussian centres (dim 32), 400 queries from the same mixture."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((50, 32)).astype(np.float32) * 4
    bank = (centres[rng.integers(50, size=4000)] + rng.standard_normal((4000, 32))).astype(np.float32)
    queries = (centres[rng.integers(50, size=400)] + rng.standard_normal((400, 32))).astype(np.float32)
    flat = MemoryBank.build(bank, FLAT)
    return bank, queries, flat


# ----------------------------------------------------------------------------- flat


@pytest.mark.parametrize("k", [1, 3])
def test_flat_search_equals_brute_force(flat_data, k):
    bank, queries, index = flat_data
    assert index.size == 2000 and index.dim == 16
    dist, ids = index.search(queries, k)
    _check_against_brute(bank, queries, dist, ids, k)
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_flat_search_accepts_float64_and_noncontiguous(flat_data):
    bank, queries, index = flat_data
    d1, i1 = index.search(queries[::2], 2)
    d2, i2 = index.search(queries.astype(np.float64)[::2], 2)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_flat_search_exclude(flat_data, k):
    bank, queries, index = flat_data
    lo, hi = 500, 900
    # the realistic use: rows of the excluded range (an image's own patches) plus outside queries
    q = np.concatenate([bank[lo:lo + 100], queries[:100]])
    dist, ids = index.search(q, k, exclude=(lo, hi))
    assert not np.any((ids >= lo) & (ids < hi))
    _check_against_brute(bank, q, dist, ids, k, exclude=(lo, hi))


def test_flat_save_load_round_trip(flat_data, tmp_path):
    bank, queries, index = flat_data
    path = tmp_path / "bank.faiss"
    index.save(path)
    loaded = MemoryBank.load(path, FLAT)
    assert loaded.size == index.size and loaded.dim == index.dim
    for k, exclude in [(1, None), (3, None), (2, (0, 1000))]:
        d0, i0 = index.search(queries, k, exclude=exclude)
        d1, i1 = loaded.search(queries, k, exclude=exclude)
        np.testing.assert_array_equal(i0, i1)
        np.testing.assert_array_equal(d0, d1)


def test_flat_search_self_distance_is_zero(clustered):
    bank, _, flat = clustered
    shifted = bank + np.float32(5.0)  # larger norms, as un-centred CNN features have
    index = MemoryBank.build(shifted, FLAT)
    dist, ids = index.search(shifted[:500], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(500))
    assert dist.max() <= 1e-3, f"self distance up to {dist.max()}"


def test_flat_exclude_never_returns_excluded_ids_even_when_k_exceeds_rest(flat_data):
    bank, queries, _ = flat_data
    index = MemoryBank.build(bank[:10], FLAT)
    dist, ids = index.search(queries[:5], 4, exclude=(0, 8))  # only 2 rows left
    assert not np.any((ids >= 0) & (ids < 8)), ids


# ----------------------------------------------------------------------------- approximate indexes


def _recall_at_1(index: MemoryBank, flat: MemoryBank, queries: np.ndarray, exclude=None) -> float:
    _, approx = index.search(queries, 1, exclude=exclude)
    _, exact = flat.search(queries, 1, exclude=exclude)
    return float((approx[:, 0] == exact[:, 0]).mean())


@pytest.mark.parametrize("kind, storage", [("ivf", "fp32"), ("hnsw", "fp32"), ("hnsw", "fp16")])
def test_approximate_index_recall(kind, storage, clustered):
    bank, queries, flat = clustered
    index = MemoryBank.build(bank, BankConfig(index=kind, hnsw_storage=storage))
    assert index.size == 4000 and index.dim == 32
    assert _recall_at_1(index, flat, queries) >= 0.9
    # approximate distances are true distances to the returned rows (to their fp16 roundings, within
    # fp16's relative precision, 2**-11 per component)
    dist, ids = index.search(queries, 3)
    actual = np.linalg.norm(queries[:, None, :] - bank[ids], axis=2)
    np.testing.assert_allclose(dist, actual, rtol=0 if storage == "fp32" else 2e-3, atol=DIST_ATOL)
    np.testing.assert_allclose(index.vectors(), bank, rtol=0 if storage == "fp32" else 2 ** -10, atol=0)


def test_hnsw_storage_is_the_bank_files_own():
    """fp16 (the default) holds half-precision vectors in the graph; a bank file keeps its storage."""
    import faiss

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 16)).astype(np.float32)
    assert isinstance(MemoryBank.build(vectors, BankConfig(index="hnsw")).index, faiss.IndexHNSWSQ)
    fp32 = MemoryBank.build(vectors, BankConfig(index="hnsw", hnsw_storage="fp32"))
    assert isinstance(fp32.index, faiss.IndexHNSWFlat)
    with pytest.raises(ConfigError, match="unknown hnsw storage 'int4'; valid: fp32, fp16"):
        BankConfig(hnsw_storage="int4")


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_exclude(kind, clustered):
    bank, queries, flat = clustered
    index = MemoryBank.build(bank, BankConfig(index=kind))
    lo, hi = 1000, 1200
    q = np.concatenate([bank[lo:hi], queries[:200]])
    dist, ids = index.search(q, 3, exclude=(lo, hi))
    assert not np.any((ids >= lo) & (ids < hi))
    assert np.all(ids >= 0)
    assert _recall_at_1(index, flat, q, exclude=(lo, hi)) >= 0.9


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_an_exclusion_that_leaves_the_approximate_search_nothing_is_searched_exactly(kind, flat_data):
    """Scoring a training frame without its own patches where those are most of the bank (few-shot, a
    coreset of every patch): the probed IVF lists or the HNSW graph around a query hold nothing else, and
    FAISS answers id -1 with a placeholder distance (1.8e19 after the square root, or inf), which made
    thresholds of 1.8e19 or NaN. Those queries are searched again exactly."""
    bank, _, flat = flat_data
    index = MemoryBank.build(bank, BankConfig(index=kind, nprobe=1, rerank=0))
    queries = bank[:500] + np.float32(0.01)
    exclude = (0, len(bank) - 10)
    rough = index._search_approximate(queries, 1, exclude)[1][:, 0] < 0
    assert rough.any()  # the case: FAISS alone finds nothing for some
    dist, ids = index.search(queries, 1, exclude=exclude)
    want_dist, want_ids = flat.search(queries, 1, exclude=exclude)
    assert np.all(ids >= exclude[1]) and np.all(np.isfinite(dist))
    np.testing.assert_array_equal(ids[rough], want_ids[rough])  # those searched again exactly
    assert np.all(dist >= want_dist * (1 - 2e-3))  # the rest: approximate (fp16 HNSW vectors), never nearer
    every = index.search(queries[:3], 1, exclude=(0, len(bank)))  # nothing left at all: none found
    assert np.all(every[1] == -1) and np.all(np.isinf(every[0]))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_save_load(kind, clustered, tmp_path):
    bank, queries, _ = clustered
    config = BankConfig(index=kind, nprobe=4, ef_search=32)
    index = MemoryBank.build(bank, config)
    index.save(tmp_path / "bank.faiss")
    loaded = MemoryBank.load(tmp_path / "bank.faiss", config)
    d0, i0 = index.search(queries, 2)
    d1, i1 = loaded.search(queries, 2)
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_array_equal(d0, d1)


def test_bank_config_unknown_kind_lists_kinds():
    with pytest.raises(ConfigError) as err:
        BankConfig(index="annoy")
    msg = str(err.value)
    assert "annoy" in msg
    for kind in INDEX_KINDS:
        assert kind in msg
    assert set(INDEX_KINDS) == {"auto", "flat", "ivf", "hnsw"}


@pytest.mark.parametrize("slow", TIMED_KINDS)
def test_auto_keeps_whichever_index_searches_faster(slow, clustered, slow_index):
    """Index auto times each candidate on the queries it is given and keeps the faster: made slower
    by 20 ms a search, a kind loses, and the bank kept is that other kind's, searching as it would."""
    bank, queries, _ = clustered
    search = MemoryBank.search
    slow_index(slow)
    picked = MemoryBank.build(bank, BankConfig(), [(queries, None)])
    fast = next(kind for kind in TIMED_KINDS if kind != slow)
    tuned = {"nprobe": picked.timing["ivf"]["nprobe"]} if fast == "ivf" else {}
    assert picked.config == BankConfig(index=fast, **tuned)
    assert set(picked.timing) == set(TIMED_KINDS)
    assert picked.timing[slow]["ms_per_1024"] > picked.timing[fast]["ms_per_1024"]
    alone = MemoryBank.build(bank, picked.config)
    np.testing.assert_array_equal(search(picked, queries, 2)[1], search(alone, queries, 2)[1])


def test_auto_gives_ivf_the_fewest_probes_that_are_as_exact_as_hnsw(clustered):
    """The probes auto tunes: with them IVF finds the exact nearest vector for at least HNSW's share of
    the held-out frames' patches (counted here by brute force, each frame without its excluded ids),
    with one probe fewer for less."""
    bank, queries, _ = clustered
    config = BankConfig(hnsw_m=4, ef_search=8, nlist=100)  # a rough graph, many lists: work for the tuning
    frames = [(queries[:200].reshape(10, 20, -1), None), (queries[200:], (1000, 3000))]
    timing = MemoryBank.build(bank, config, frames).timing
    nearest = [_brute(bank, q.reshape(-1, q.shape[-1]), 1, exclude)[0][:, 0] for q, exclude in frames]

    def share(kind: str, **changes) -> float:
        built = MemoryBank.build(bank, dataclasses.replace(config, index=kind, **changes))
        exact = 0
        for (q, exclude), near in zip(frames, nearest):
            q = q.reshape(-1, q.shape[-1])
            exact += np.sum(np.linalg.norm(q - bank[built.search(q, 1, exclude)[1][:, 0]], axis=1) <= near + 1e-5)
        return exact / len(queries)

    probes, hnsw = timing["ivf"]["nprobe"], share("hnsw")
    assert timing["hnsw"]["exact_share"] == pytest.approx(hnsw, abs=0.02) and hnsw < 0.9  # graph builds vary a little
    assert 1 < probes < 100
    assert share("ivf", nprobe=probes) >= hnsw > share("ivf", nprobe=probes - 1)


def test_auto_measures_on_at_most_its_share_of_patches(clustered, monkeypatch):
    """Large held-out frames (a tiled fit's) are measured on every step-th patch: 8400 patches, every
    2nd, so the exactness is measured on 4200 (200 a frame) and the timing on every other of them:
    no search auto makes is given more than AUTO_QUERIES queries."""
    bank, queries, _ = clustered
    given, search = [], MemoryBank.search

    def counted(self, q, k=1, exclude=None):
        given.append(len(q))
        return search(self, q, k, exclude)

    monkeypatch.setattr(MemoryBank, "search", counted)
    MemoryBank.build(bank, BankConfig(), [(queries, None), (queries, (0, 100))] * 10 + [(queries, None)])
    assert max(given) == 8400 // 2 // 2 <= AUTO_QUERIES and 200 in given


def test_auto_needs_real_frames_and_a_bank_file_names_its_kind(clustered, tmp_path):
    bank, _, _ = clustered
    with pytest.raises(ConfigError, match="real frames"):
        MemoryBank.build(bank, BankConfig())
    built = MemoryBank.build(bank, BankConfig(index="hnsw"))
    built.save(tmp_path / "bank.faiss")
    with pytest.raises(ConfigError, match="resolved when the bank is built"):
        MemoryBank.load(tmp_path / "bank.faiss", BankConfig(index="auto"))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_search_exact_is_brute_force_whatever_the_index(kind, clustered):
    bank, queries, _ = clustered
    index = MemoryBank.build(bank, BankConfig(index=kind, nprobe=1, ef_search=1))
    assert not index.exact
    for exclude in (None, (1000, 3000)):
        dist, ids = index.search_exact(queries[:50], exclude, block=16)  # several blocks
        _check_against_brute(index.vectors(), queries[:50], dist, ids, 1, exclude)  # the vectors it holds (hnsw: fp16)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_distance_maps_rerank_the_highest_cells_of_each_map_exactly(kind, clustered):
    """A poor approximate search (one probe, one candidate) overstates distances; the `rerank` highest
    cells of every map come back exact, the rest stay as searched, and rerank 0 leaves all as searched."""
    from calibration.memory_bank import distance_maps

    bank, queries, _ = clustered
    features = queries.reshape(4, 10, 10, 32)  # 4 maps of 10 x 10 cells
    rough = MemoryBank.build(bank, BankConfig(index=kind, nlist=100, nprobe=1, ef_search=1, rerank=0))  # small lists
    exact = _brute(rough.vectors(), queries, 1)[0][:, 0].reshape(4, 100)  # over the vectors it holds (hnsw: fp16)
    searched = distance_maps(rough, features).reshape(4, 100)
    assert (searched > exact + 1e-3).mean() > 0.05, "the rough search must miss for this test to mean anything"
    assert (searched >= exact - DIST_ATOL).all()  # approximate search only overstates
    config = BankConfig(index=kind, nlist=100, nprobe=1, ef_search=1, rerank=12)
    reranked = distance_maps(MemoryBank(rough.index, config), features).reshape(4, 100)
    for cells, approx, got in zip(exact, searched, reranked):
        top = np.argsort(approx)[-12:]
        np.testing.assert_allclose(got[top], cells[top], atol=DIST_ATOL)
        rest = np.setdiff1d(np.arange(100), top)
        np.testing.assert_array_equal(got[rest], approx[rest])


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_vectors_come_back_in_id_order_whatever_the_index(kind, clustered):
    bank, queries, _ = clustered
    built = MemoryBank.build(bank, BankConfig(index=kind), [(queries, None)])
    got = built.vectors()
    assert got.dtype == np.float32 and got.flags.c_contiguous
    half = built.config.index == "hnsw" and built.config.hnsw_storage == "fp16"
    np.testing.assert_allclose(got, bank, rtol=2 ** -10 if half else 0, atol=0)


@pytest.mark.parametrize("k, exclude", [(1, None), (3, None), (1, (1000, 3000)), (4, (0, 3990))])
def test_ivf_gemm_search_finds_what_faiss_ivf_finds(clustered, k, exclude):
    """The GEMM over each probed list (GemmLists) against faiss's own IVF scan of the same lists."""
    import faiss

    bank, queries, _ = clustered
    index = MemoryBank.build(bank, BankConfig(index="ivf", nlist=40, nprobe=3))
    dist, ids = index.search(queries, k, exclude)
    params = faiss.SearchParametersIVF(nprobe=3, sel=None if exclude is None else
                                       faiss.IDSelectorNot(faiss.IDSelectorRange(*exclude)))
    want_d, want_i = index.index.search(queries, k, params=params)
    found = want_i >= 0
    np.testing.assert_array_equal(ids >= 0, found)  # (0, 3990) leaves 10 vectors: some queries find fewer than 4
    np.testing.assert_allclose(dist[found], np.sqrt(np.maximum(want_d[found], 0)), rtol=0, atol=DIST_ATOL)
    assert np.isinf(dist[~found]).all()
    assert (ids[found] == want_i[found]).mean() > 0.99  # the same vectors, but for exact ties
    if exclude is not None:
        assert not np.any((ids >= exclude[0]) & (ids < exclude[1]))


def test_more_ivf_lists_than_the_bank_can_train_is_refused_with_the_most_it_can(clustered):
    bank, _, _ = clustered  # 4000 vectors: at most 102 lists of 39
    with pytest.raises(ConfigError, match="--nlist 103 is more lists than a bank of 4000 vectors can train.*"
                                          "--nlist 102 or fewer"):
        MemoryBank.build(bank, BankConfig(index="ivf", nlist=103))
    assert MemoryBank.build(bank, BankConfig(index="ivf", nlist=102)).index.nlist == 102
