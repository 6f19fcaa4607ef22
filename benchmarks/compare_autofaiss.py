"""Compare our ``index.kind: auto`` with autofaiss on the same vectors: build time, peak RSS, QPS, recall@10.

    python -m benchmarks.compare_autofaiss --autofaiss-python PYTHON [--n 200000] [--max-memory 4GB]

autofaiss pins numpy < 2, so it runs in its own environment (never a project dependency):
``python3 -m venv AFVENV && AFVENV/bin/pip install autofaiss faiss-cpu``, then pass ``AFVENV/bin/python``.
The vectors (clustered, as ``bench_index --auto``) and fresh queries are saved as .npy; each side
builds and searches in its own process (peak RSS is that process's), recall@10 is against exact
search. autofaiss tunes its search for a query-time target, not a recall target, so its index is
also measured at the smallest nprobe that reaches our ``--min-recall`` on the same queries.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

K = 10


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # Linux: kilobytes


def _timed_search(index, queries: np.ndarray, single: int) -> tuple[np.ndarray, float, float]:
    """(top-k ids, batch QPS, single-query QPS) of a faiss-like ``search(queries, k)``."""
    start = time.perf_counter()
    ids = index.search(queries, K)[1]
    batch = len(queries) / (time.perf_counter() - start)
    start = time.perf_counter()
    for row in range(single):
        index.search(queries[row : row + 1], K)
    return np.asarray(ids), batch, single / (time.perf_counter() - start)


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f[:K]) & set(e[:K])) / K for f, e in zip(found, exact)]))


def run_ours(work: Path, args: argparse.Namespace) -> dict:
    """Our auto over the saved vectors, in this process (built chunk by chunk from the memory-mapped file)."""
    from retrieval.index import NpyChunks, build_index_from_chunks

    faiss.omp_set_num_threads(args.threads)
    queries, exact = np.load(work / "queries.npy"), np.load(work / "exact.npy")
    chunks = NpyChunks([work / "base.npy"])
    start = time.perf_counter()
    index = build_index_from_chunks(chunks, chunks.count, chunks.dim, kind="auto", stamp={},
                                    min_recall=args.min_recall, max_memory=args.max_memory, use_gpu=False)
    build_s = time.perf_counter() - start
    ids, batch, single = _timed_search(index, queries, args.single)
    info = index.build_info
    return {"tool": "ours (auto)", "kind": info["kind"], "params": info["params"], "build_s": round(build_s, 1),
            "peak_rss_mb": round(_peak_rss_mb()), "batch_qps": round(batch, 1), "single_qps": round(single, 1),
            "recall@10": round(_recall(ids, exact), 4), "held_out_recall@10": info["recall@10"]}


def run_autofaiss(work: Path, args: argparse.Namespace) -> dict:
    """autofaiss's build_index over the saved vectors with the same memory budget, in this process."""
    from autofaiss import build_index

    faiss.omp_set_num_threads(args.threads)
    queries, exact = np.load(work / "queries.npy"), np.load(work / "exact.npy")
    base = np.load(work / "base.npy")
    start = time.perf_counter()
    index, infos = build_index(embeddings=base, save_on_disk=False, metric_type="l2",
                               max_index_memory_usage=args.max_memory.removesuffix("B"),
                               current_memory_available=args.memory_available.removesuffix("B"),
                               min_nearest_neighbors_to_retrieve=K, verbose=30)
    build_s = time.perf_counter() - start
    if index is None:
        raise SystemExit(f"autofaiss built no index: {infos}")
    knob = _search_knob(index)  # (name, getter, setter, largest value), None if neither IVF nor HNSW
    params = {knob[0]: knob[1]()} if knob is not None else {}
    ids, batch, single = _timed_search(index, queries, args.single)
    row = {"tool": "autofaiss", "kind": infos.get("index_key", type(index).__name__), "params": params,
           "build_s": round(build_s, 1), "peak_rss_mb": round(_peak_rss_mb()), "batch_qps": round(batch, 1),
           "single_qps": round(single, 1), "recall@10": round(_recall(ids, exact), 4)}
    if knob is None:
        return row
    name, _get, set_value, largest = knob
    value = 1  # the smallest nprobe / efSearch meeting the same recall target (doubling, on the same queries)
    while True:
        set_value(value)
        if _recall(index.search(queries, K)[1], exact) >= args.min_recall or value >= largest:
            break
        value = min(largest, value * 2)
    ids, batch, single = _timed_search(index, queries, args.single)
    row["at_min_recall"] = {"params": {name: value}, "batch_qps": round(batch, 1),
                            "single_qps": round(single, 1), "recall@10": round(_recall(ids, exact), 4)}
    return row


def _search_knob(index):
    """autofaiss's index's search parameter: nprobe (IVF) or efSearch (HNSW)."""
    try:
        ivf = faiss.extract_index_ivf(index)
        return "nprobe", lambda: int(ivf.nprobe), lambda v: setattr(ivf, "nprobe", v), int(ivf.nlist)
    except RuntimeError:
        pass
    hnsw = faiss.downcast_index(index)
    if hasattr(hnsw, "hnsw"):
        return ("efSearch", lambda: int(hnsw.hnsw.efSearch), lambda v: setattr(hnsw.hnsw, "efSearch", v),
                4096)
    return None


def prepare(work: Path, args: argparse.Namespace) -> None:
    """The vectors (clustered, in chunks), fresh queries of the same mixture and their exact top-k, as .npy."""
    from benchmarks.bench_index import SyntheticChunks

    chunks = SyntheticChunks("clustered", args.n, args.dim, 100_000, args.seed)
    base = np.lib.format.open_memmap(work / "base.npy", mode="w+", dtype=np.float32, shape=(args.n, args.dim))
    exact = faiss.IndexFlatL2(args.dim)
    offset = 0
    for chunk in chunks:
        base[offset : offset + len(chunk)] = chunk
        exact.add(chunk)
        offset += len(chunk)
    base.flush()
    queries = chunks.make(args.queries, seed=10**9 + args.seed)
    np.save(work / "queries.npy", queries)
    np.save(work / "exact.npy", exact.search(queries, K)[1])


def markdown(rows: list[dict]) -> str:
    lines = ["| tool | index | search params | build s | peak RSS MB | batch QPS | single QPS | recall@10 |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        for label, part in ((row["tool"], row), (f"{row['tool']} at min_recall", row.get("at_min_recall"))):
            if part is None:
                continue
            params = ", ".join(f"{k}={v}" for k, v in part["params"].items())
            lines.append(f"| {label} | {row['kind']} | {params} | {row['build_s']} | {row['peak_rss_mb']:,} "
                         f"| {part['batch_qps']:,.0f} | {part['single_qps']:,.0f} | {part['recall@10']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--autofaiss-python", default=sys.executable,
                        help="a python that can import autofaiss (its own environment)")
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    parser.add_argument("--min-recall", type=float, default=0.95)
    parser.add_argument("--max-memory", default="4GB", help="index memory budget for both (a size such as 4GB)")
    parser.add_argument("--memory-available", default="8GB", help="autofaiss's current_memory_available")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/autofaiss.json"))
    parser.add_argument("--side", choices=("ours", "autofaiss"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:  # a child: one side, its row as JSON on the last line
        row = run_ours(args.work, args) if args.side == "ours" else run_autofaiss(args.work, args)
        print(json.dumps(row))
        return
    check = subprocess.run([args.autofaiss_python, "-c", "import autofaiss"], capture_output=True)
    if check.returncode != 0:
        print("autofaiss is not importable by --autofaiss-python; install it in its own environment: "
              "python3 -m venv AFVENV && AFVENV/bin/pip install autofaiss faiss-cpu "
              "(then --autofaiss-python AFVENV/bin/python)")
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="compare-autofaiss-") as folder:
        work = Path(folder)
        prepare(work, args)
        for side, python in (("ours", sys.executable), ("autofaiss", args.autofaiss_python)):
            print(f"building with {side} over {args.n:,} x {args.dim} clustered ...", flush=True)
            command = [python, "-m", "benchmarks.compare_autofaiss", "--side", side, "--work", str(work),
                       *(sys.argv[1:] if argv is None else argv)]
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    config = {key: str(value) for key, value in vars(args).items() if key not in ("side", "work")}
    config.pop("autofaiss_python")
    result = {"config": config, "faiss": faiss.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    temporary.replace(args.out)
    print(markdown(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
