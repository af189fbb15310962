"""The memory-bank kind (PatchCore-style, and few-shot): a FAISS bank of normal patch embeddings.

Fit: the exported `PatchEmbedding` graph embeds every input of every training frame with the
runtime that will serve it; with a learned ("pca") projection the principal axes of those
embeddings reduce them to `dim` and are baked into the served graph; a greedy k-center coreset
picks the bank; each calibration frame is then scored against the bank without its own patches
(leave one image out). Serve: embed, then
the distance of every patch to its nearest bank vector is the anomaly map.

Few-shot (`shots` K): the bank holds every patch of K normal images and of their augmented views
(flips), no coreset; calibration leaves out an image with all its views (K = 1: the view alone).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from calibration.artifact import replace_json
from calibration.coreset import greedy_coreset
from calibration.kinds import Detector, Kind
from engines.banks import BankConfig, MemoryBank, time_searches
from engines.compiled import cpu_identity
from engines.errors import ConfigError
from engines.head_config import EmbeddingConfig
from engines.runtimes import Deployment

if TYPE_CHECKING:
    from calibration.fit import FitContext, FitOutput
    from engines.heads import PatchEmbedding

AUGMENTS = ("none", "hflip", "flips", "flips+rot90")
QUERIES_FILE = "bank-queries.npy"  # index auto: the patches its candidates were timed on, float16 [Q, d]
log = logging.getLogger("lineguard.bank")


@dataclasses.dataclass(frozen=True)
class BankOptions:
    """coreset_ratio: fraction of training patches kept (1.0 keeps all); coreset_max: bank size bound
    (0: none); coreset_proj_dim: random projection used while picking; max_patches: training patches
    held in memory at most (each image keeps a seeded random share beyond it); shots: 0 fits on
    every training image, K > 0 on K of them (few-shot) with `augment` views of each."""

    embedding: EmbeddingConfig = EmbeddingConfig()
    bank: BankConfig = BankConfig()
    coreset_ratio: float = 0.1
    coreset_max: int = 32768
    coreset_proj_dim: int = 128
    max_patches: int = 2_000_000
    shots: int = 0
    augment: str = "flips"

    def __post_init__(self):
        for name, cls in (("embedding", EmbeddingConfig), ("bank", BankConfig)):
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, cls(**getattr(self, name)))
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ConfigError(f"coreset ratio {self.coreset_ratio} must be in (0, 1], e.g. 0.1")
        if self.coreset_max < 0 or self.max_patches < 1 or self.shots < 0:
            raise ConfigError("coreset max and shots must be >= 0, max patches >= 1")
        if self.augment not in AUGMENTS:
            raise ConfigError(f"unknown augmentation {self.augment!r}; valid: {', '.join(AUGMENTS)}")

    EMBEDDING_FLAGS = ("backbone", "layers", "weighting", "context", "pool_padding", "dim", "projection")
    OWN_FLAGS = ("coreset_ratio", "coreset_max", "shots", "augment")
    BANK_FLAGS = ("index", "nlist", "nprobe", "ef_construction", "ef_search", "rerank", "hnsw_storage")
    FLAGS = (*EMBEDDING_FLAGS, *OWN_FLAGS, *BANK_FLAGS)

    @classmethod
    def from_flags(cls, flags: dict, seed: int = 0) -> "BankOptions":
        """Options from command-line values (FLAGS names), defaults for the rest."""
        emb = {k: flags[k] for k in cls.EMBEDDING_FLAGS if k in flags}
        bank = BankConfig(**{k: flags[k] for k in cls.BANK_FLAGS if k in flags})
        own = {k: flags[k] for k in cls.OWN_FLAGS if k in flags}
        return cls(embedding=dataclasses.replace(EmbeddingConfig(), **emb, seed=seed), bank=bank, **own)


def views(image: np.ndarray, augment: str) -> list[tuple[bool, np.ndarray]]:
    """An image and its augmented views, (turned, uint8 [H, W, 3]) each: flips and 90-degree turns keep a
    product normal; turned says the view is the image turned by 90 degrees (its frame's sides swap)."""
    out = [image]
    if augment in ("hflip", "flips", "flips+rot90"):
        out.append(image[:, ::-1])
    if augment in ("flips", "flips+rot90"):
        out += [image[::-1], image[::-1, ::-1]]
    turned = [np.rot90(v) for v in out] if augment == "flips+rot90" else []
    return [(False, np.ascontiguousarray(v)) for v in out] + [(True, np.ascontiguousarray(v)) for v in turned]


def network(model_dir: Path, manifest: dict) -> "PatchEmbedding":
    import torch

    from engines.heads import PatchEmbedding

    config = EmbeddingConfig(**manifest["memory_bank"]["embedding"])
    module = PatchEmbedding(config, manifest["input"]["height"], manifest["input"]["width"], manifest.get("weights"))
    if config.learned:
        module.set_projection(torch.from_numpy(np.load(Path(model_dir) / "projection.npy")))
    return module


def _files(manifest: dict) -> list[str]:
    section = manifest["memory_bank"]
    learned = EmbeddingConfig(**section["embedding"]).learned
    candidates = section.get("index_candidates")
    banks = [*candidates["banks"].values(), candidates["queries"]] if candidates else ["bank.faiss"]
    return ["model.onnx", *banks] + (["projection.npy"] if learned else [])


def served_bank(model_dir: Path, manifest: dict, device: str = "cpu", precision: str = "fp32") -> MemoryBank:
    """The bank this host searches. An index auto fit keeps each candidate index (`index_candidates`:
    kind -> file, the fitting CPU's choice in bank.faiss) and the patches it timed them on. A CPU of
    another identity (`cpu_identity`: model name and instruction sets) times them again, once: its
    choice is recorded in engines/index-<cpu>.json beside the compiled engines, and read back while
    the CPU and the bank files are the same. A GPU searches any bank exactly by torch: bank.faiss."""
    section = manifest["memory_bank"]
    config = BankConfig(**section["bank"])
    candidates = section.get("index_candidates")
    here = cpu_identity()
    if device != "cpu" or not candidates or candidates["timed_on"] == here:
        return MemoryBank.load(Path(model_dir) / "bank.faiss", config, device, precision)

    def load(kind: str) -> MemoryBank:
        tuned = {"nprobe": section["index_timing"]["ivf"]["nprobe"]} if kind == "ivf" else {}
        return MemoryBank.load(Path(model_dir) / candidates["banks"][kind],
                               dataclasses.replace(config, index=kind, **tuned))

    files = {name: manifest["files"][name] for name in candidates["banks"].values()}
    path = Path(model_dir) / "engines" / f"index-{hashlib.sha256(here.encode()).hexdigest()[:12]}.json"

    def recorded() -> str | None:
        try:
            record = json.loads(path.read_text())
            if record["cpu"] == here and record["banks"] == files and record["index"] in candidates["banks"]:
                return record["index"]
        except (OSError, ValueError, TypeError, KeyError):
            pass  # none yet, or unreadable: time them
        return None

    if kind := recorded():
        return load(kind)
    with _one_at_a_time(path.with_suffix(".lock")):  # workers starting together: one times, the rest read
        if kind := recorded():
            return load(kind)
        banks = {kind: load(kind) for kind in candidates["banks"]}
        speeds = time_searches(banks, np.load(Path(model_dir) / candidates["queries"]))
        kind = min(speeds, key=speeds.get)
        record = {"cpu": here, "fitted_on": candidates["timed_on"], "ms_per_1024": speeds, "index": kind,
                  "banks": files}
        try:
            replace_json(path, record)  # a reader sees no record or a whole one
            saved = f"recorded in {path}"
        except OSError as exc:
            saved = f"not recorded ({exc.strerror}: {path.parent}), so timed at every start"
    log.warning("bank index timed on this CPU (the model was fitted on %s): %s; serving %s, %s", candidates["timed_on"],
                ", ".join(f"{k} {ms:.1f} ms per 1024 queries" for k, ms in speeds.items()), kind, saved)
    return banks[kind]


@contextlib.contextmanager
def _one_at_a_time(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` (made with its folder); where it cannot be made (a
    read-only model folder), go on without one."""
    try:
        lock.parent.mkdir(exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and the lock with it


class MemoryBankDetector(Detector):
    """Embeddings from the engine, nearest-bank-vector distances as the map. On a CUDA deployment
    the flat bank lives on the GPU (fp16 products when the deployment is fp16) and nothing leaves it."""

    def __init__(self, model_dir: Path, manifest: dict, deployment: Deployment):
        bank_device = deployment.device if deployment.runtime != "onnxruntime" else "cpu"
        bank_precision = "fp16" if deployment.precision == "fp16" and bank_device != "cpu" else "fp32"
        self.bank = served_bank(Path(model_dir), manifest, bank_device, bank_precision)
        h, w = manifest["input"]["height"], manifest["input"]["width"]
        super().__init__(deployment.build(model_dir, h, w, lambda: network(model_dir, manifest)))
        import faiss  # the search's libraries keep to the deployment's threads too
        from threadpoolctl import threadpool_limits

        threads = deployment.cpu_threads
        faiss.omp_set_num_threads(threads)
        threadpool_limits(threads, user_api="blas")  # the exact re-ranking (numpy's GEMM)
        if self.bank.torch_search:  # a flat bank's exact search (torch is not loaded otherwise)
            import torch

            torch.set_num_threads(threads)

    def maps(self, inputs: np.ndarray) -> np.ndarray:
        return distance_maps(self.bank, self.engine.infer(inputs))

    def maps_device(self, inputs: np.ndarray):
        import torch

        if not self.bank.torch_search:  # an IVF / HNSW bank on the CPU: FAISS searches it there
            return torch.from_numpy(self.maps(inputs))
        features = self.engine.infer_device(inputs)
        n, h, w, d = features.shape
        dist, _ = self.bank.search_tensor(features.reshape(n * h * w, d), 1)
        return dist.reshape(n, h, w)


def principal_axes(features: np.ndarray, dim: int, seed: int, sample: int = 200_000) -> np.ndarray:
    """float32 [C, dim]: the top `dim` principal axes of features [M, C] (a seeded sample of at most
    `sample` rows), each signed so that its largest component is positive (deterministic)."""
    rng = np.random.default_rng(seed)
    rows = features if len(features) <= sample else features[rng.choice(len(features), sample, replace=False)]
    centred = rows.astype(np.float64) - rows.mean(axis=0, dtype=np.float64)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    axes = vectors[:, ::-1][:, :dim]
    axes *= np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(dim)])
    return np.ascontiguousarray(axes, dtype=np.float32)


def distance_maps(bank: MemoryBank, features: np.ndarray, exclude: tuple[int, int] | None = None) -> np.ndarray:
    """float32 embeddings [N, h, w, d] -> float32 [N, h, w] Euclidean distances to the nearest bank vector.
    An approximate bank's `rerank` highest cells of each map are searched again exactly."""
    n, h, w, d = features.shape
    queries = features.reshape(n * h * w, d)
    dist = bank.search(queries, 1, exclude=exclude)[0][:, 0].reshape(n, h * w)
    k = min(bank.config.rerank, h * w)
    if k and not bank.exact:
        top = np.argpartition(dist, h * w - k, axis=1)[:, h * w - k:]  # [N, k] cells of each map
        rows = (np.arange(n)[:, None] * (h * w) + top).ravel()
        dist[np.arange(n)[:, None], top] = bank.search_exact(queries[rows], exclude)[0][:, 0].reshape(n, k)
    return dist.reshape(n, h, w)


def fit(ctx: "FitContext") -> "FitOutput":
    """Embed, subsample, build the bank and score the calibration frames without their own patches."""
    import torch

    from calibration.fit import FitOutput
    from engines.export import export_onnx
    from engines.heads import PatchEmbedding

    o: BankOptions = ctx.options
    spec = ctx.spec
    start = time.perf_counter()
    # a learned projection needs the full embedding first: extract with every channel, project after
    extractor = PatchEmbedding(dataclasses.replace(o.embedding, dim=0) if o.embedding.learned else o.embedding,
                               spec.height, spec.width, ctx.weights)
    if ctx.maps.stride != extractor.stride:
        raise ConfigError(f"map stride {ctx.maps.stride} differs from the embedding's {extractor.stride}")
    if o.embedding.dim >= extractor.channels:  # as many dims as channels or more: every channel, as --dim 0
        o = dataclasses.replace(o, embedding=dataclasses.replace(o.embedding, dim=0))  # (the served graph
        # would not apply a learned projection of every channel, which the bank's vectors were rotated by)
    scored = ctx.maps.top_k if ctx.maps.image_score == "topk" else 1  # cells the image score reads
    if o.bank.index != "flat" and 0 < o.bank.rerank < scored:
        raise ConfigError(f"--rerank {o.bank.rerank} is below --top-k {scored}: the image score would read "
                          f"approximate distances; give --rerank {scored} or more (0: none)")
    export_onnx(extractor, spec.height, spec.width, ctx.out / "model.onnx", "embeddings")
    engine = ctx.deployment.build(ctx.out, spec.height, spec.width, lambda: extractor)
    rng = np.random.default_rng(ctx.seed)

    # frames: every training image, or K of them and their views; groups: the source image of each frame
    paths = ctx.paths
    if o.shots:
        if o.shots > len(paths):
            raise ConfigError(f"--shots {o.shots} is more than the {len(paths)} training images in the data; "
                              f"use --shots {len(paths)} or fewer")
        paths = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, o.shots).round().astype(int))]
        shot_views = [[(ctx.geometer.layout(layout.frame[::-1]) if turned else layout, view)
                       for turned, view in views(image, o.augment)] for layout, image in ctx.read(paths)]
        groups = [g for g, vs in enumerate(shot_views) for _ in vs]
        source = iter([v for vs in shot_views for v in vs])
    else:
        groups = list(range(len(paths)))
        source = ctx.read(paths)
    n_frames = len(groups)
    n_calib = min(n_frames, ctx.calib_images)
    calib = set(rng.choice(n_frames, size=n_calib, replace=False).tolist())
    budget = max(1, o.max_patches // n_frames)  # patches each frame may keep in memory

    kept, owner, calib_feats, layouts = [], [], {}, []
    with engine:
        for i, (feats, layout) in enumerate(ctx.embed(engine, source)):
            layouts.append(layout)
            if i in calib:
                calib_feats[i] = feats
            patches = feats[ctx.geometer_cells(layout)]  # inside the ROI only
            if len(patches) > budget:
                patches = patches[np.sort(rng.choice(len(patches), budget, replace=False))]
            kept.append(patches)
            owner.append(np.full(len(patches), i, np.int64))
            ctx.progress("embed", i + 1, n_frames)
    t_embed = time.perf_counter() - start
    flat = np.concatenate(kept)
    owner = np.concatenate(owner)
    n_patches = len(flat)
    del kept
    module, project = extractor, None
    if o.embedding.learned:
        axes = principal_axes(flat, o.embedding.dim, ctx.seed)
        flat = flat @ axes
        module = PatchEmbedding(o.embedding, spec.height, spec.width, ctx.weights)
        module.set_projection(torch.from_numpy(axes))
        export_onnx(module, spec.height, spec.width, ctx.out / "model.onnx", "embeddings")
        np.save(ctx.out / "projection.npy", axes)
        project = axes
    keep = len(flat) if o.shots else max(1, int(round(o.coreset_ratio * len(flat))))
    if o.coreset_max and not o.shots:
        keep = min(keep, o.coreset_max)
    t0 = time.perf_counter()
    picks = np.sort(greedy_coreset(flat, keep, o.coreset_proj_dim, ctx.seed)) if keep < len(flat) else np.arange(len(flat))
    t_coreset = time.perf_counter() - t0
    ctx.progress("coreset", 1, 1)
    bank_owner = owner[picks]  # sorted: each frame (and each group) owns a contiguous id range
    groups = np.array(groups)
    group_of_id = groups[bank_owner]

    def left_out(i: int) -> tuple[int, int] | None:
        """The bank ids frame i is scored without: its whole group (the image and its views); K = 1
        few-shot: only the view itself. A contiguous range, as an unseen normal frame has no patches there."""
        ids = np.flatnonzero(bank_owner == i if o.shots == 1 else group_of_id == groups[i])
        exclude = (int(ids[0]), int(ids[-1]) + 1) if len(ids) else None
        if len(ids) and exclude[1] - exclude[0] != len(ids):
            raise AssertionError("bank ids of a frame are not contiguous")  # an invariant of the sorted picks
        if exclude is not None and exclude[1] - exclude[0] >= len(picks):
            raise ConfigError("calibration needs at least two training images (or --shots with views)")
        return exclude

    def embedded(i: int) -> np.ndarray:
        return calib_feats[i] if project is None else calib_feats[i] @ project

    held_out = [(embedded(i), left_out(i)) for i in sorted(calib)[:8]]  # what index auto measures on
    bank = MemoryBank.build(flat[picks], o.bank, held_out)
    del flat, owner, held_out

    canvas_maps, names = [], []
    for k, i in enumerate(sorted(calib)):
        maps = distance_maps(bank, embedded(i), left_out(i))
        del calib_feats[i]
        canvas_maps.append(ctx.geometer.stitch(maps, layouts[i]))
        names.append(paths[groups[i]].name + (f" (view {i - groups.tolist().index(groups[i])})" if o.shots else ""))
        ctx.progress("calibrate", k + 1, n_calib)
    bank.save(ctx.out / "bank.faiss")
    auto = {}
    if bank.rivals:  # index auto: every candidate and what they were timed on, for a CPU of another kind
        banks = {bank.config.index: "bank.faiss"}
        for kind, rival in bank.rivals.items():
            banks[kind] = f"bank-{kind}.faiss"
            rival.save(ctx.out / banks[kind])
        np.save(ctx.out / QUERIES_FILE, bank.timing_queries.astype(np.float16))
        auto = {"index_timing": bank.timing,
                "index_candidates": {"timed_on": cpu_identity(), "banks": banks, "queries": QUERIES_FILE}}
    section = {"embedding": dataclasses.asdict(o.embedding), "bank": dataclasses.asdict(bank.config), **auto,
               "feature_dim": module.dim, "shots": o.shots, "augment": o.augment if o.shots else "none",
               "coreset_ratio": o.coreset_ratio, "coreset_max": o.coreset_max}
    summary = {"frames": n_frames, "patches": n_patches, "bank_size": bank.size, "index": bank.config.index,
               "dim": module.dim,
               "embed_seconds": round(t_embed, 2), "coreset_seconds": round(t_coreset, 2)}
    return FitOutput(section, canvas_maps, names, summary,
                     "training images scored against the bank without their own patches (leave one image out)",
                     dataclasses.asdict(module.encoder.backbone.normalisation))


def stride(options: BankOptions) -> int:
    from engines.backbones import create_backbone

    return create_backbone(options.embedding.backbone, "random").stage(options.embedding.layers[0]).stride


KIND = Kind("memory_bank", _files, BankOptions, fit, network, MemoryBankDetector, stride)
