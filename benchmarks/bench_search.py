"""Latency of text→image queries through the search back end, against bare exact faiss search.

    python -m benchmarks.bench_search [--n 100000] [--rounds 3] [--quick]

One query at a time, as the app sends them: ``Searcher.text_to_image`` (tokenise, look the words
up in the packaged GloVe vectors, search a ``VectorIndex``, attach metadata) over ``--n``
synthetic image embeddings at the word-vector dimension, with a flat and an HNSW index. The
baseline, in the same run and on the same vectors, is a bare ``faiss.IndexFlatL2.search`` of
the already-encoded query. The queries are ~200 real COCO captions of the embedded sample
plus word-arithmetic queries. Prints a markdown table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.checkpoint import LoadedModel
from retrieval.config import load_config
from retrieval.index import VectorIndex
from retrieval.indexing import caption_vocabulary
from retrieval.io import write_json
from retrieval.losses import build_loss
from retrieval.models import create_encoder
from retrieval.rundir import IndexDir
from retrieval.search import Searcher
from retrieval.text import CaptionEncoder, load_word_vectors

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS_FILE = ROOT / "data" / "coco-mini" / "captions.jsonl"
ARITHMETIC = ("bus - red + yellow", "dog - grass + snow", "pizza - cheese + vegetables", "man + skateboard",
              "kitchen - stove + table", "train + station - people", "cat + bed", "street - cars + bicycles",
              "plate + broccoli - meat", "beach + surfboard - people")
CENTRE_WORDS = 1000  # embeddings are drawn around the vectors of this many frequent words
NOISE = 0.35  # std of the gaussian around each centre, relative to a unit centre, spread over the dims


def query_texts(limit: int) -> list[str]:
    """Real captions of the embedded sample (first caption of each image, then the others) + arithmetic."""
    records = [json.loads(line) for line in CAPTIONS_FILE.read_text(encoding="utf-8").splitlines() if line]
    captions = [record["captions"][i] for i in range(5) for record in records if len(record["captions"]) > i]
    return captions[: max(0, limit - len(ARITHMETIC))] + list(ARITHMETIC)


def synthetic_embeddings(vectors: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Unit vectors scattered around frequent-word vectors, so caption queries land among them."""
    rng = np.random.default_rng(seed)
    centres = vectors[100 : 100 + CENTRE_WORDS]  # skip the most frequent (stop) words
    centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    dim = vectors.shape[1]
    points = centres[rng.integers(len(centres), size=n)]
    points = points + rng.standard_normal((n, dim), dtype=np.float32) * (NOISE / np.sqrt(dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def bench_model(caption_encoder: CaptionEncoder) -> LoadedModel:
    """The demo model's text side and loss; the image encoder (random weights) is never used here."""
    config = load_config(ROOT / "configs" / "demo.yaml")
    encoder = create_encoder(dataclasses.replace(config.model, weights="random"), caption_encoder.dim)
    loss = build_loss(config.loss, seed=config.train.seed, embedding_dim=caption_encoder.dim)
    return LoadedModel(config, encoder.eval(), loss, caption_encoder, "bench", "bench", 0, {})


def make_searcher(model: LoadedModel, images: VectorIndex, queries: Sequence[str], index_dir: Path) -> Searcher:
    """A Searcher over ``images``; captions and vocabulary come from the query captions."""
    vectors, known, _ = model.caption_encoder.encode_batch(list(queries))
    captions = VectorIndex.build(vectors[known], [{"caption": q} for q, ok in zip(queries, known) if ok],
                                 kind="flat", metric=images.metric, stamp={"bench": True}, use_gpu=False)
    folder = IndexDir(index_dir)
    captions.save(folder.captions)
    vocabulary = caption_vocabulary(list(queries), vectors[known], model.caption_encoder)
    folder.vocabulary_file.write_text(json.dumps(vocabulary))
    return Searcher(model, images, captions, folder)


def latencies(call: Callable[[Any], Any], inputs: Sequence[Any], rounds: int, warmup: int = 20) -> np.ndarray:
    """Seconds per call, one input at a time, over ``rounds`` passes (after a warm-up)."""
    for item in inputs[:warmup]:
        call(item)
    times = []
    for _ in range(rounds):
        for item in inputs:
            started = time.perf_counter()
            call(item)
            times.append(time.perf_counter() - started)
    return np.asarray(times)


def summary(name: str, kind: str, threads: int, times: np.ndarray, baseline_p50: float | None) -> dict[str, Any]:
    p50, p95 = float(np.percentile(times, 50)), float(np.percentile(times, 95))
    return {"path": name, "index": kind, "threads": threads, "queries": len(times),
            "p50_ms": round(p50 * 1e3, 3), "p95_ms": round(p95 * 1e3, 3),
            "mean_ms": round(float(times.mean()) * 1e3, 3),
            "p50_vs_bare_faiss": round(p50 / baseline_p50, 2) if baseline_p50 else 1.0}


def markdown(rows: list[dict]) -> str:
    lines = ["| path | index | faiss threads | p50 ms | p95 ms | p50 ÷ bare faiss p50 |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {row['path']} | {row['index']} | {row['threads']} | {row['p50_ms']:.3f} | {row['p95_ms']:.3f} "
              f"| {row['p50_vs_bare_faiss']:.2f}× |" for row in rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="indexed image embeddings")
    parser.add_argument("--queries", type=int, default=200, help="query texts (captions + arithmetic)")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the queries")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", default=f"1,{os.cpu_count() or 1}",
                        help="comma-separated faiss OpenMP thread counts to measure (default: 1 and all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: --n 10000 --rounds 1")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/search.json"))
    args = parser.parse_args(argv)
    args.threads = sorted({int(value) for value in str(args.threads).split(",") if value})
    if args.quick:
        args.n, args.rounds = 10_000, 1
    return args


def image_index(base: np.ndarray, kind: str) -> VectorIndex:
    """The synthetic collection in a CPU ``VectorIndex`` of ``kind`` with its default parameters."""
    metadata = [{"key": f"{i:07d}", "captions": [], "thumbnail": None} for i in range(len(base))]
    return VectorIndex.build(base, metadata, kind=kind, metric="l2", stamp={"bench": True}, use_gpu=False)


def recall(searcher: Searcher, exact: Searcher, encoded: list[np.ndarray], k: int) -> float:
    """Share of the exact top-k that ``searcher``'s index also returns, over the real queries."""
    found = [np.intersect1d(searcher.images.search(row, k).ids, exact.images.search(row, k).ids).size
             for row in encoded]
    return float(np.sum(found)) / (k * len(encoded))


def run(args: argparse.Namespace, searchers: dict[str, Searcher], bare: faiss.Index, texts: list[str],
        threads: int) -> list[dict]:
    """Bare faiss first (the baseline), query encoding alone, then each kind bare and through the Searcher."""
    faiss.omp_set_num_threads(threads)
    encoded = [searchers["flat"].text_vector(text)[None, :] for text in texts]
    baseline = latencies(lambda row: bare.search(row, args.k), encoded, args.rounds)
    rows = [summary("bare `faiss.IndexFlatL2.search` (query already encoded)", "flat", threads, baseline, None)]
    p50 = float(np.percentile(baseline, 50))
    rows.append(summary("query encoding only (`Searcher.text_vector`)", "—", threads,
                        latencies(searchers["flat"].text_vector, texts, args.rounds), p50))
    for kind, searcher in searchers.items():
        rows.append(summary("`VectorIndex.search` (query already encoded)", kind, threads,
                            latencies(lambda row, s=searcher: s.images.search(row, args.k), encoded, args.rounds), p50))
        rows.append(summary("`Searcher.text_to_image` (text in, hits out)", kind, threads,
                            latencies(lambda text, s=searcher: s.text_to_image(text, args.k), texts, args.rounds), p50))
        rows[-1][f"recall@{args.k}"] = round(recall(searcher, searchers["flat"], encoded, args.k), 4)
        print(rows[-1], flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    texts = query_texts(args.queries)
    print(f"loading the packaged GloVe vectors; {len(texts)} query texts", flush=True)
    caption_encoder = CaptionEncoder(load_word_vectors("glove-6b-50d", None), weighting="mean", normalize=True)
    model = bench_model(caption_encoder)
    base = synthetic_embeddings(caption_encoder.vectors.vectors, args.n, args.seed)
    print(f"{args.n:,} synthetic image embeddings of dimension {base.shape[1]}", flush=True)
    bare = faiss.IndexFlatL2(base.shape[1])
    bare.add(base)
    with tempfile.TemporaryDirectory() as tmp:
        searchers = {kind: make_searcher(model, image_index(base, kind), texts, Path(tmp) / kind)
                     for kind in ("flat", "hnsw")}
        rows = [row for threads in args.threads for row in run(args, searchers, bare, texts, threads)]
    config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    result = {"config": config, "faiss": faiss.__version__, "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "vectors": "glove-6b-50d (400k words, 50-d)",
              "data": {"generator": "unit vectors around frequent GloVe words", "centres": CENTRE_WORDS,
                       "noise": NOISE}, "rows": rows}
    print(markdown(rows))
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
