"""Index auto on the CPU that serves: a model keeps every candidate index, and a CPU of another kind
than the fitting one times them again once, records its choice and serves the faster."""

from __future__ import annotations

import json
import logging
import shutil

import faiss
import numpy as np
import pytest

from calibration.artifact import sha256
from calibration.memory_bank import served_bank
from calibration.model import Model
from engines.banks import TIMED_KINDS, MemoryBank
from engines.compiled import cpu_identity
from engines.errors import ArtifactError

FOREIGN = "Some Other CPU: avx2 fma"
INDEX_TYPES = {"ivf": faiss.IndexIVFFlat, "hnsw": faiss.IndexHNSWSQ}


def _fitted_elsewhere(fitted_model, tmp_path):
    """A copy of the model as if fitted on a CPU of another kind; its manifest."""
    model = tmp_path / "model"
    shutil.copytree(fitted_model, model, ignore=shutil.ignore_patterns("engines"))
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["memory_bank"]["index_candidates"]["timed_on"] = FOREIGN
    (model / "manifest.json").write_text(json.dumps(manifest))
    return model, Model(model).manifest


def _no_timing(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the candidates were timed again")

    monkeypatch.setattr("calibration.memory_bank.time_searches", refuse)


def test_an_auto_fit_keeps_every_candidate_and_the_patches_it_timed(fitted_model, tmp_path):
    section = Model(fitted_model).manifest["memory_bank"]
    candidates = section["index_candidates"]
    assert candidates["timed_on"] == cpu_identity()
    assert set(candidates["banks"]) == set(TIMED_KINDS) == set(section["index_timing"])
    assert candidates["banks"][section["bank"]["index"]] == "bank.faiss"
    for kind, name in candidates["banks"].items():
        assert isinstance(faiss.read_index(str(fitted_model / name)), INDEX_TYPES[kind])
    queries = np.load(fitted_model / candidates["queries"])
    assert queries.dtype == np.float16 and queries.shape[1] == section["feature_dim"] and len(queries) >= 256
    rival = next(name for name in candidates["banks"].values() if name != "bank.faiss")
    model = tmp_path / "model"
    shutil.copytree(fitted_model, model)
    with open(model / rival, "r+b") as f:  # every candidate is hashed like the bank file
        f.seek(200)
        f.write(b"\0" * 8)
    with pytest.raises(ArtifactError, match=f"{rival} was altered"):
        Model(model)


def test_the_fitting_cpu_serves_its_choice_without_timing(fitted_model, monkeypatch):
    _no_timing(monkeypatch)
    manifest = Model(fitted_model).manifest
    bank = served_bank(fitted_model, manifest)
    assert bank.config.index == manifest["memory_bank"]["bank"]["index"]
    assert not list(fitted_model.glob("engines/index-*.json"))


@pytest.mark.parametrize("slow", TIMED_KINDS)
def test_a_cpu_of_another_kind_times_the_candidates_once_and_serves_the_faster(
        slow, fitted_model, tmp_path, monkeypatch, caplog, slow_index):
    model, manifest = _fitted_elsewhere(fitted_model, tmp_path)
    section = manifest["memory_bank"]
    slow_index(slow)
    fast = next(kind for kind in TIMED_KINDS if kind != slow)
    with caplog.at_level(logging.WARNING, "lineguard.bank"):
        bank = served_bank(model, manifest)
    assert bank.config.index == fast and isinstance(bank.index, INDEX_TYPES[fast])
    if fast == "ivf":  # the probes fit tuned, whichever kind it kept
        assert bank.config.nprobe == section["index_timing"]["ivf"]["nprobe"]
    (path,) = model.glob("engines/index-*.json")
    record = json.loads(path.read_text())
    assert (record["cpu"], record["fitted_on"], record["index"]) == (cpu_identity(), FOREIGN, fast)
    assert record["ms_per_1024"][slow] > record["ms_per_1024"][fast] > 0
    assert record["banks"] == {name: sha256(model / name) for name in section["index_candidates"]["banks"].values()}
    assert f"serving {fast}, recorded in {path}" in caplog.text

    queries = np.load(model / section["index_candidates"]["queries"]).astype(np.float32)
    alone = MemoryBank.load(model / section["index_candidates"]["banks"][fast], bank.config)
    np.testing.assert_array_equal(bank.search(queries, 1)[1], alone.search(queries, 1)[1])

    _no_timing(monkeypatch)  # the record serves the next start
    assert served_bank(model, manifest).config == bank.config


def test_workers_starting_together_time_the_candidates_once(fitted_model, tmp_path, monkeypatch, slow_index):
    """Two workers of one run starting at once: one times the candidates (the other is not timing beside
    it and skewing the figures), the other waits and serves the choice it recorded."""
    import threading

    from engines.banks import time_searches

    model, manifest = _fitted_elsewhere(fitted_model, tmp_path)
    slow_index("hnsw")
    timings = []

    def counted(*args, **kwargs):
        timings.append(threading.current_thread().name)
        return time_searches(*args, **kwargs)

    monkeypatch.setattr("calibration.memory_bank.time_searches", counted)
    served = {}
    workers = [threading.Thread(target=lambda n=n: served.update({n: served_bank(model, manifest).config.index}),
                                name=f"worker{n}") for n in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert len(timings) == 1 and served == {0: "ivf", 1: "ivf"}


def test_a_stale_or_unreadable_record_is_timed_again(fitted_model, tmp_path, slow_index):
    model, manifest = _fitted_elsewhere(fitted_model, tmp_path)
    slow_index("hnsw")
    served_bank(model, manifest)
    (path,) = model.glob("engines/index-*.json")
    path.write_text("{not json")
    assert served_bank(model, manifest).config.index == "ivf"
    assert json.loads(path.read_text())["index"] == "ivf"

    record = json.loads(path.read_text())  # the bank files of another fit: the record is not theirs
    record["index"] = "hnsw"
    record["banks"] = {name: "0" * 64 for name in record["banks"]}
    path.write_text(json.dumps(record))
    assert served_bank(model, manifest).config.index == "ivf"
    assert json.loads(path.read_text())["banks"] == {
        name: sha256(model / name) for name in manifest["memory_bank"]["index_candidates"]["banks"].values()}


def test_a_model_folder_that_cannot_be_written_is_still_served(fitted_model, tmp_path, caplog, slow_index):
    model, manifest = _fitted_elsewhere(fitted_model, tmp_path)
    (model / "engines").write_text("a file where the engines folder would be")
    slow_index("ivf")
    with caplog.at_level(logging.WARNING, "lineguard.bank"):
        assert served_bank(model, manifest).config.index == "hnsw"
    assert "serving hnsw, not recorded" in caplog.text and "timed at every start" in caplog.text


def test_a_model_without_candidates_serves_its_one_bank(fitted_model, tmp_path, monkeypatch):
    """A fit with an explicit index (or before the candidates were kept) has bank.faiss alone."""
    model, manifest = _fitted_elsewhere(fitted_model, tmp_path)
    _no_timing(monkeypatch)
    section = manifest["memory_bank"]
    del section["index_candidates"]
    assert served_bank(model, manifest).config.index == section["bank"]["index"]


def test_the_detector_of_a_model_fitted_elsewhere_scores_with_the_bank_served(fitted_model, tmp_path, slow_index):
    from engines.runtimes import Deployment

    model, manifest = _fitted_elsewhere(fitted_model, tmp_path)
    slow = manifest["memory_bank"]["bank"]["index"]  # the fitting CPU's choice is the slower one here
    slow_index(slow)
    size = manifest["input"]
    with Model(model).detector(Deployment(threads=1)) as detector:
        assert detector.bank.config.index != slow
        maps = detector.maps(np.full((2, size["height"], size["width"], 3), 128, np.uint8))
    assert maps.shape[0] == 2 and np.isfinite(maps).all()
