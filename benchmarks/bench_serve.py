"""The search API on loopback: concurrent clients sending text queries to `retrieval serve`'s app.

    python -m benchmarks.bench_serve [--n 1000000] [--clients 8] [--queries 2000] [--kind ivf] [--quick]

A server subprocess builds a synthetic collection of ``--n`` unit image embeddings at the word-vector
dimension (50, around frequent GloVe words, as ``bench_search``), wraps it in a real ``Searcher``
(the demo's text side with the packaged GloVe vectors; the image encoder is never used) and serves
``retrieval.serving.create_app`` with uvicorn on 127.0.0.1. Then ``--clients`` threads, each with
its own keep-alive connection, send ``--queries`` ``POST /search/text`` requests one after another
(real COCO captions and word arithmetic). The run is bounded: each client stops after its queries
or at ``--max-seconds``, and the server is stopped at the end. Reports p50/p95 latency, QPS and errors;
writes JSON to ``--out`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 1800


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve(args: argparse.Namespace) -> None:
    """The server side (run in a subprocess): build the synthetic index and serve it until killed."""
    import uvicorn

    from benchmarks.bench_search import bench_model, make_searcher, query_texts, synthetic_embeddings
    from retrieval.index import VectorIndex
    from retrieval.serving import ServeLimits, create_app
    from retrieval.text import CaptionEncoder, load_word_vectors

    caption_encoder = CaptionEncoder(load_word_vectors("glove-6b-50d", None), weighting="mean", normalize=True)
    model = bench_model(caption_encoder)
    base = synthetic_embeddings(caption_encoder.vectors.vectors, args.n, args.seed)
    started = time.perf_counter()
    params = {"nlist": args.nlist} if args.kind == "ivf" and args.nlist else {}
    metadata = [{"key": f"{i:07d}", "captions": [], "thumbnail": None} for i in range(len(base))]
    images = VectorIndex.build(base, metadata, kind=args.kind, metric="l2", stamp={"bench": True},
                               use_gpu=False, **params)
    print(f"built a {images.kind} index of {len(images):,} vectors ({images.search_params}) "
          f"in {time.perf_counter() - started:.1f} s", flush=True)
    searcher = make_searcher(model, images, query_texts(200), Path(args.work))
    uvicorn.run(create_app(searcher, ServeLimits()), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


def wait_until_healthy(url: str, server: subprocess.Popen, timeout: float) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            answer = httpx.get(f"{url}/health", timeout=2)
            if answer.status_code == 200:
                return answer.json()
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the server did not answer within {timeout:.0f} s")


def client(url: str, texts: Sequence[str], count: int, k: int, offset: int, deadline: float,
           latencies: list[float], errors: list[str]) -> None:
    """One client: ``count`` queries one after another on one keep-alive connection, until ``deadline``."""
    import httpx

    with httpx.Client(base_url=url, timeout=30) as session:
        for i in range(count):
            if time.monotonic() > deadline:
                errors.append("stopped at --max-seconds")
                return
            text = texts[(offset + i) % len(texts)]
            started = time.perf_counter()
            try:
                answer = session.post("/search/text", json={"query": text, "k": k})
                ok = answer.status_code == 200 and len(answer.json()["images"]) == k
                reason = "" if ok else f"{answer.status_code}: {answer.text[:100]}"
            except httpx.HTTPError as error:
                ok, reason = False, f"{type(error).__name__}: {error}"
            latencies.append(time.perf_counter() - started)
            if not ok:
                errors.append(reason)


def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    from benchmarks.bench_search import query_texts

    texts = query_texts(200)
    warm: list[float] = []
    client(url, texts, 20, args.k, 0, time.monotonic() + 120, warm, [])  # warm-up, not counted
    latencies: list[list[float]] = [[] for _ in range(args.clients)]
    errors: list[list[str]] = [[] for _ in range(args.clients)]
    deadline = time.monotonic() + args.max_seconds
    threads = [threading.Thread(target=client, args=(url, texts, args.queries, args.k, 37 * i, deadline,
                                                     latencies[i], errors[i]))
               for i in range(args.clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    times = np.asarray([t for row in latencies for t in row])
    failed = [e for row in errors for e in row]
    return {"requests": int(times.size), "errors": len(failed), "first_errors": failed[:5],
            "seconds": round(elapsed, 2), "qps": round(times.size / elapsed, 1),
            "p50_ms": round(float(np.percentile(times, 50)) * 1e3, 2),
            "p95_ms": round(float(np.percentile(times, 95)) * 1e3, 2),
            "p99_ms": round(float(np.percentile(times, 99)) * 1e3, 2),
            "max_ms": round(float(times.max()) * 1e3, 2)}


def markdown(result: dict[str, Any]) -> str:
    config, row = result["config"], result["result"]
    return "\n".join([
        "| index | vectors | clients × queries | requests | errors | p50 ms | p95 ms | p99 ms | QPS |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        f"| {result['index']} | {config['n']:,} | {config['clients']} × {config['queries']} | {row['requests']:,} "
        f"| {row['errors']} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} | {row['p99_ms']:.2f} | {row['qps']:.0f} |",
    ])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="indexed image embeddings")
    parser.add_argument("--kind", default="ivf", help="index kind (default: ivf)")
    parser.add_argument("--nlist", type=int, default=1024, help="IVF lists (0: the library's default)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--queries", type=int, default=2000, help="queries per client")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=900, help="every client stops by then")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: --n 20000 --queries 50 --nlist 0")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve.json"))
    parser.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)  # the server subprocess
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.queries, args.nlist = 20_000, 50, 0
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.serve_only:
        serve(args)
        return None
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, "-m", "benchmarks.bench_serve", "--serve-only", "--port", str(port),
                   "--work", work, "--n", str(args.n), "--kind", args.kind, "--nlist", str(args.nlist),
                   "--seed", str(args.seed)]
        server = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            url = f"http://127.0.0.1:{port}"
            health = wait_until_healthy(url, server, START_TIMEOUT_S)
            print(f"server up: {health}; {args.clients} clients × {args.queries} queries", flush=True)
            row = measure(args, url)
            import httpx

            info = httpx.get(f"{url}/info", timeout=10).json()
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    images = info["index"]["images"]
    params = ", ".join(f"{name} {value}" for name, value in images["search_params"].items())
    config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
              if key not in ("serve_only", "port", "work")}
    result = {"config": config, "index": f"{images['kind']} ({params})" if params else images["kind"],
              "result": row, "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "endpoint": "POST /search/text", "server": "uvicorn, one process, endpoints in its thread pool"}
    print(markdown(result))
    from retrieval.io import write_json

    write_json(args.out, result)
    print(f"wrote {args.out}")
    print(json.dumps(row))
    return result


if __name__ == "__main__":
    main()
