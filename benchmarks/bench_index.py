"""Benchmark the index kinds on synthetic clustered vectors: build time, QPS, recall@k.

    python -m benchmarks.bench_index [--n 1000000] [--dim 50] [--queries 1000] [--quick]
    python -m benchmarks.bench_index --auto [--sizes 200000,1000000] [--max-memory 4GB]

``--auto``: our ``index.kind: auto`` built from chunks (never all vectors at once) on clustered and
isotropic vectors, each size in a fresh process: build time, peak RSS (getrusage, building and
searching our index), batch and single-query QPS divided by exact search's, recall@10 on fresh
queries; written to ``--out``. At 10M (``--exact-queries`` bounds the slow exact search)::

    nice -n 10 python -m benchmarks.bench_index --auto --sizes 10000000 --nlist 4096 --max-memory 4GB \
        --exact-queries 200 --single 100 --out benchmarks/results/index_10m.json

Every kind is built with its defaults from ``retrieval.index`` in one run; recall is measured
against the exact (flat) results. A sweep of nprobe / efSearch shows the recall-speed curve
behind the defaults. Prints a markdown table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.index import VectorIndex, build_index_from_chunks
from retrieval.io import write_json

KINDS = ("flat", "ivf", "hnsw")
SWEEPS = {"ivf": ("nprobe", (8, 16, 32, 48, 64, 96, 128)),
          "hnsw": ("ef_search", (64, 128, 256, 384, 512, 768, 1024))}
CLUSTERS = 1000
SCALE_RANGE = (0.5, 1.5)


def clustered_vectors(n: int, dim: int, *, seed: int = 0, clusters: int = CLUSTERS) -> np.ndarray:
    """A gaussian mixture: centres ~ N(0, I), each cluster isotropic with std in SCALE_RANGE.

    Harder than well-separated blobs (clusters overlap, neighbours are spread over several
    IVF lists) and easier than uniform noise; queries are further draws of the same mixture.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    scales = rng.uniform(*SCALE_RANGE, size=clusters).astype(np.float32)
    return mixture_draws(n, centres, scales, rng)


def mixture_draws(n: int, centres: np.ndarray, scales: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``n`` float32 draws of the gaussian mixture with these centres and per-cluster std."""
    labels = rng.integers(len(centres), size=n)
    noise = rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    noise *= scales[labels, None]
    noise += centres[labels]
    return noise


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k ids that ``found`` also returns."""
    k = exact.shape[1]
    hits = sum(len(np.intersect1d(f, e, assume_unique=True)) for f, e in zip(found[:, :k], exact))
    return hits / exact.size


def _batch(index: VectorIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    ids = index.search(queries, k).ids
    return ids, len(queries) / (time.perf_counter() - start)


def _single_qps(index: VectorIndex, queries: np.ndarray, k: int) -> float:
    start = time.perf_counter()
    for row in range(len(queries)):
        index.search(queries[row : row + 1], k)
    return len(queries) / (time.perf_counter() - start)


def bench_kind(kind: str, base: np.ndarray, queries: np.ndarray, exact: np.ndarray | None,
               args: argparse.Namespace) -> tuple[dict[str, Any], np.ndarray, VectorIndex]:
    """Build one kind with its defaults and measure it; returns (row, top-k ids, index)."""
    metadata = [{"key": str(i)} for i in range(len(base))]
    start = time.perf_counter()
    index = VectorIndex.build(base, metadata, kind=kind, metric="l2", stamp={"bench": True},
                              use_gpu=False if args.cpu else "auto", seed=args.seed)
    build_s = time.perf_counter() - start
    ids, batch_qps = _batch(index, queries, args.k)
    single_qps = _single_qps(index, queries[: args.single], args.k)
    recall = 1.0 if exact is None else recall_at_k(ids, exact)
    row = {"kind": kind, "params": index.search_params, "on_gpu": index.on_gpu,
           "build_s": round(build_s, 2), "batch_qps": round(batch_qps, 1),
           "single_qps": round(single_qps, 1), f"recall@{args.k}": round(recall, 4)}
    return row, ids, index


def sweep(index: VectorIndex, queries: np.ndarray, exact: np.ndarray, k: int) -> list[dict]:
    """Recall and batch QPS across nprobe (IVF) or efSearch (HNSW) values."""
    if index.kind not in SWEEPS:
        return []
    name, values = SWEEPS[index.kind]
    default = index.search_params[name]
    points = []
    for value in sorted({*values, default}):
        index.set_search_params(**{name: value})
        ids, qps = _batch(index, queries, k)
        points.append({name: value, "batch_qps": round(qps, 1), "default": value == default,
                       f"recall@{k}": round(recall_at_k(ids, exact), 4)})
    index.set_search_params(**{name: default})
    return points


def markdown(rows: list[dict], sweeps: dict[str, list[dict]], k: int) -> str:
    """The results as markdown tables."""
    lines = [f"| kind | params | build s | batch QPS | single-query QPS | recall@{k} |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        params = ", ".join(f"{key}={value}" for key, value in row["params"].items()) or "exact"
        lines.append(f"| {row['kind']} | {params} | {row['build_s']:.1f} | {row['batch_qps']:,.0f}"
                     f" | {row['single_qps']:,.0f} | {row[f'recall@{k}']:.4f} |")
    for kind, points in sweeps.items():
        name = SWEEPS[kind][0]
        lines += ["", f"| {kind} {name} | batch QPS | recall@{k} |", "|---:|---:|---:|"]
        for point in points:
            mark = " (default)" if point["default"] else ""
            lines.append(f"| {point[name]}{mark} | {point['batch_qps']:,.0f}"
                         f" | {point[f'recall@{k}']:.4f} |")
    return "\n".join(lines)


class SyntheticChunks:
    """Re-iterable chunks of clustered or isotropic vectors, each made from its own seed (never all in memory)."""

    def __init__(self, data: str, n: int, dim: int, chunk: int, seed: int) -> None:
        self.data, self.n, self.dim, self.chunk, self.seed = data, n, dim, chunk, seed
        rng = np.random.default_rng(seed)  # one mixture for every chunk and the queries
        self.centres = rng.standard_normal((CLUSTERS, dim), dtype=np.float32)
        self.scales = rng.uniform(*SCALE_RANGE, size=CLUSTERS).astype(np.float32)

    def make(self, rows: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        if self.data == "isotropic":
            return rng.standard_normal((rows, self.dim), dtype=np.float32)
        return mixture_draws(rows, self.centres, self.scales, rng)

    def __iter__(self):
        for number, start in enumerate(range(0, self.n, self.chunk)):
            yield self.make(min(self.chunk, self.n - start), self.seed * 100_003 + number)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def bench_auto_case(data: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One auto build from chunks, measured in this (fresh) process; exact search afterwards for the ratios."""
    faiss.omp_set_num_threads(args.threads)
    chunks = SyntheticChunks(data, n, args.dim, args.chunk, args.seed)
    queries = chunks.make(args.queries, seed=10**9 + args.seed)  # fresh draws, never in the index
    rss_before = _peak_rss_bytes()
    start = time.perf_counter()
    params = {"max_memory": args.max_memory} if args.max_memory else {}
    if args.nlist:
        params["nlist"] = args.nlist
    index = build_index_from_chunks(chunks, n, args.dim, kind="auto", stamp={"bench": True}, seed=args.seed,
                                    use_gpu=False if args.cpu else "auto", **params)
    build_s = time.perf_counter() - start
    ids, batch_qps = _batch(index, queries, args.k)
    single_qps = _single_qps(index, queries[: args.single], args.k)
    peak_rss = _peak_rss_bytes()  # building and searching our index (exact search below is not counted)
    info = index.build_info
    del index
    exact = faiss.IndexFlatL2(args.dim)  # filled chunk by chunk: no second copy of the collection
    for chunk in chunks:
        exact.add(chunk)
    bounded = queries[: args.exact_queries or len(queries)]  # exact search is slow at 10M: a few hundred
    start = time.perf_counter()
    exact_ids = exact.search(bounded, args.k)[1]
    exact_batch = len(bounded) / (time.perf_counter() - start)
    start = time.perf_counter()
    for row in range(min(args.single, len(bounded))):
        exact.search(bounded[row : row + 1], args.k)
    exact_single = min(args.single, len(bounded)) / (time.perf_counter() - start)
    del exact
    return {"data": data, "n": n, "dim": args.dim, "kind": info["kind"], "params": info["params"],
            "held_out_recall@10": info["recall@10"], "min_recall": info["min_recall"],
            "tuning_trials": len(info["trials"]), "candidates": info.get("candidates", []),
            "build_s": round(build_s, 1),
            "peak_rss_mb": round(peak_rss / 1e6), "rss_before_build_mb": round(rss_before / 1e6),
            "estimated_index_mb": round(info["estimated_memory"] / 1e6),
            "max_memory_mb": round(info["max_memory"] / 1e6),
            "batch_qps": round(batch_qps, 1), "single_qps": round(single_qps, 1),
            "exact_batch_qps": round(exact_batch, 1), "exact_single_qps": round(exact_single, 1),
            "batch_speedup": round(batch_qps / exact_batch, 1), "single_speedup": round(single_qps / exact_single, 1),
            f"recall@{args.k}": round(recall_at_k(ids, exact_ids), 4)}


def _run_case(queue: Any, data: str, n: int, args: argparse.Namespace) -> None:
    queue.put(bench_auto_case(data, n, args))


def bench_auto(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (data, size) case in a fresh spawned process, so that its peak RSS is its own."""
    context = multiprocessing.get_context("spawn")
    rows = []
    for n in (int(size) for size in args.sizes.split(",")):
        for data in args.data.split(","):
            print(f"auto over {n:,} x {args.dim} {data} ...", flush=True)
            queue = context.Queue()
            process = context.Process(target=_run_case, args=(queue, data, n, args))
            process.start()
            rows.append(queue.get())
            process.join()
            print(rows[-1], flush=True)
    return rows


def markdown_auto(rows: list[dict], k: int) -> str:
    lines = [f"| data | n | chosen | params | build s | peak RSS MB | batch QPS (÷ exact) | single QPS (÷ exact) "
             f"| recall@{k} (held-out at build) |", "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        params = ", ".join(f"{key}={value}" for key, value in row["params"].items()) or "exact"
        lines.append(f"| {row['data']} | {row['n']:,} | {row['kind']} | {params} | {row['build_s']:.1f} "
                     f"| {row['peak_rss_mb']:,} | {row['batch_qps']:,.0f} ({row['batch_speedup']}×) "
                     f"| {row['single_qps']:,.0f} ({row['single_speedup']}×) "
                     f"| {row[f'recall@{k}']:.4f} ({row['held_out_recall@10']:.4f}) |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="indexed vectors")
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--queries", type=int, default=1000, help="batch queries")
    parser.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="never use a GPU")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false")
    parser.add_argument("--quick", action="store_true", help="smoke run: --n 100000")
    parser.add_argument("--auto", action="store_true", help="benchmark index.kind auto built from chunks")
    parser.add_argument("--sizes", default="200000", help="--auto: comma-separated collection sizes")
    parser.add_argument("--data", default="clustered,isotropic", help="--auto: clustered and/or isotropic")
    parser.add_argument("--chunk", type=int, default=100_000, help="--auto: vectors per chunk")
    parser.add_argument("--max-memory", default=None, help="--auto: index.max_memory (default: half the RAM)")
    parser.add_argument("--nlist", type=int, default=None, help="--auto: index.nlist (default: auto's own)")
    parser.add_argument("--exact-queries", type=int, default=None,
                        help="--auto: queries timed on exact search and used for recall (default: --queries)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/index.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.n = 100_000
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    faiss.omp_set_num_threads(args.threads)  # same thread count for every kind
    if args.auto:
        rows = bench_auto(args)
        config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        result = json.loads(args.out.read_text()) if args.out.is_file() else {}  # beside the per-kind rows
        result["auto"] = {"config": config, "faiss": faiss.__version__, "cpu_count": os.cpu_count(),
                          "machine": platform.machine(), "rows": rows}
        print(markdown_auto(rows, args.k))
        write_json(args.out, result)
        print(f"wrote {args.out}")
        return result
    data = clustered_vectors(args.n + args.queries, args.dim, seed=args.seed)
    base, queries = data[: args.n], data[args.n :]
    kinds = ["flat"] + [kind for kind in args.kinds.split(",") if kind and kind != "flat"]
    rows, sweeps, exact = [], {}, None
    for kind in kinds:
        print(f"building {kind} over {args.n:,} x {args.dim} ...", flush=True)
        row, ids, index = bench_kind(kind, base, queries, exact, args)
        exact = ids if exact is None else exact
        rows.append(row)
        if args.sweep and kind in SWEEPS:
            sweeps[kind] = sweep(index, queries, exact, args.k)
        print(row, flush=True)
        del index
    config = {key: str(value) if isinstance(value, Path) else value
              for key, value in vars(args).items()}
    result = {"config": config, "faiss": faiss.__version__, "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "data": {"generator": "gaussian mixture",
              "clusters": CLUSTERS, "scale_range": SCALE_RANGE}, "rows": rows, "sweeps": sweeps}
    print(markdown(rows, sweeps, args.k))
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
