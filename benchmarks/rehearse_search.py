"""Scale rehearsal of search: 20 000 scenes → a model → encoded under torchrun → index → search API → queries.

Every stage is the documented command, run as a user runs it:

1. ``retrieval prepare``: Fashion-MNIST scenes (2×2 grids of clothing items, captioned with their names)
   into webdataset shards;
2. ``retrieval train``: a short run of the frozen EfficientNet-Lite0 + linear projection (the demo's model)
   on them, so the index is searched with a trained model;
3. ``torchrun --nproc_per_node 2 -m pipelines.cli embed --split all``: both processes encode their share of
   the shards into embedding shards (npy + parquet + thumbnail tars);
4. ``retrieval index --embeddings``: the index built from those shards (``index.kind: auto``, recall
   measured against exact search and recorded in the stamp);
5. ``retrieval serve``: the search API, queried by concurrent clients with text, word arithmetic,
   image→text and image→image requests; every answer is checked, then the service is stopped.

Prints and saves what each stage took (seconds, images per second, peak memory of the stage's processes).

    python -m benchmarks.rehearse_search                 # 20 000 scenes, 2 processes
    python -m benchmarks.rehearse_search --scenes 2000   # a quick look

Needs the Fashion-MNIST files (Debian's ``dataset-fashion-mnist``, or ``FASHION_MNIST_DIR``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from retrieval.config import load_config, save_config
from retrieval.data import iter_samples, list_shards
from retrieval.io import write_json

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pipelines.cli"]
TEXT_QUERIES = ["a sneaker, a bag, a shirt and a dress", "a trouser and a coat", "an ankle boot", "a sandal",
                "a pullover, a t-shirt and a sneaker", "a dress and a bag"]
ARITHMETIC_QUERIES = ["sneaker - shirt + bag", "coat + trouser - dress", "sandal + boot"]


def rehearsal_config(workdir: Path, args: argparse.Namespace) -> Path:
    """The scenes config pointed at the work folder: shards, a short projection-only training run."""
    config = load_config(PROJECT_ROOT / "configs" / "fashion_mnist_scenes.yaml", [
        f"data.shard_dir={workdir / 'shards'}", "data.shard_size=1000",
        f"data.source_options={{scene_count: {args.scenes}}}",
        f"train.run_dir={workdir / 'run'}", f"train.epochs={args.epochs}", f"train.eval_every={args.epochs}",
        f"train.feature_cache_dir={workdir / 'feature_cache'}", "index.kind=auto",
    ])
    path = workdir / "rehearsal.yaml"
    save_config(config, path)
    return path


def peak_rss_mb() -> float:
    """The largest resident set of any finished child process so far (MB; Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)


def stage(name: str, command: list[str], log_dir: Path, env: dict | None = None) -> dict:
    """Run one command to its end; its seconds and the peak memory of processes up to it."""
    started = time.perf_counter()
    with open(log_dir / f"{name}.log", "w") as log:
        done = subprocess.run(command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"stage {name} failed (exit {done.returncode}); see {log_dir / f'{name}.log'}")
    print(f"{name}: {seconds:.1f} s", flush=True)
    return {"seconds": round(seconds, 1), "peak_rss_mb_so_far": peak_rss_mb()}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(run: Path, port: int, log: Path) -> tuple[subprocess.Popen, float]:
    """``retrieval serve`` in the background; returns it once /health answers, and the seconds that took."""
    started = time.perf_counter()
    server = subprocess.Popen([*CLI, "serve", "--run", str(run), "--checkpoint", "last.pt", "--port", str(port)],
                              cwd=PROJECT_ROOT,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"retrieval serve exited (code {server.returncode}); see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server, time.perf_counter() - started
        except httpx.HTTPError:
            time.sleep(0.5)
    server.terminate()
    raise SystemExit(f"retrieval serve did not answer within 300 s; see {log}")


def query_images(val_shards: list[str], count: int) -> list[bytes]:
    """PNG bytes of ``count`` held-out scenes, to upload as image queries."""
    from PIL import Image

    found = []
    for sample in iter_samples(val_shards):
        buffer = io.BytesIO()
        Image.fromarray(sample.image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        found.append(buffer.getvalue())
        if len(found) == count:
            break
    return found


def client_load(url: str, clients: int, per_client: int, images: list[bytes], k: int) -> dict:
    """``clients`` threads, each sending ``per_client`` requests in turn (text, arithmetic, image→text,
    image→image); every answer must be a 200 with k hits. Returns latencies per kind and the errors."""
    kinds = ("text", "arithmetic", "image-to-text", "image-to-image")
    latencies: dict[str, list[float]] = {kind: [] for kind in kinds}
    errors: list[str] = []
    lock = threading.Lock()

    def one_client(number: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for i in range(per_client):
                kind = kinds[(number + i) % len(kinds)]
                started = time.perf_counter()
                if kind == "text":
                    response = http.post("/search/text", json={"query": TEXT_QUERIES[i % len(TEXT_QUERIES)], "k": k})
                elif kind == "arithmetic":
                    response = http.post("/search/arithmetic",
                                         json={"query": ARITHMETIC_QUERIES[i % len(ARITHMETIC_QUERIES)], "k": k})
                else:
                    image = images[(number * per_client + i) % len(images)]
                    response = http.post(f"/search/{kind}", files={"image": ("scene.png", image, "image/png")},
                                         data={"k": str(k)})
                elapsed = (time.perf_counter() - started) * 1000
                answer = response.json() if response.status_code == 200 else {}
                field = "captions" if kind == "image-to-text" else "images"
                ok = response.status_code == 200 and len(answer.get(field, [])) == k
                with lock:
                    latencies[kind].append(elapsed)
                    if not ok:
                        errors.append(f"{kind}: HTTP {response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=one_client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    total = sum(len(values) for values in latencies.values())

    def summary(values: list[float]) -> dict:
        return {"requests": len(values), "p50_ms": round(statistics.median(values), 1),
                "p95_ms": round(float(np.percentile(values, 95)), 1)} if values else {"requests": 0}

    return {"clients": clients, "requests": total, "errors": len(errors), "first_errors": errors[:5],
            "seconds": round(wall, 1), "requests_per_second": round(total / wall, 1),
            "all": summary([v for values in latencies.values() for v in values]),
            **{kind: summary(values) for kind, values in latencies.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=20000, help="scenes written and encoded (80%% train)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs of the projection")
    parser.add_argument("--processes", type=int, default=2, help="torchrun --nproc_per_node of the encode")
    parser.add_argument("--clients", type=int, default=8, help="concurrent API clients")
    parser.add_argument("--requests", type=int, default=100, help="requests per client")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=PROJECT_ROOT / "runs" / "rehearsal-search")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "rehearsal_search.json")
    args = parser.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    config = rehearsal_config(args.workdir, args)
    run, logs = args.workdir / "run", args.workdir
    stages = {"prepare": stage("prepare", [*CLI, "prepare", "--config", str(config)], logs),
              "train": stage("train", [*CLI, "train", "--config", str(config)], logs)}
    embed = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}",
             "-m", "pipelines.cli", "embed", "--run-dir", str(run), "--checkpoint", "last.pt", "--split", "all"]
    stages["embed"] = stage("embed", embed, logs)
    summary = json.loads((run / "embeddings" / "embeddings.json").read_text())
    images = int(summary["count"])
    stages["embed"]["images_per_second"] = round(images / stages["embed"]["seconds"], 1)
    stages["index"] = stage("index", [*CLI, "index", "--run", str(run), "--checkpoint", "last.pt",
                                      "--embeddings", str(run / "embeddings")], logs)
    stamp = json.loads((run / "index" / "images" / "stamp.json").read_text())
    port = free_port()
    server, startup = start_service(run, port, logs / "serve.log")
    try:
        uploads = query_images(list_shards(args.workdir / "shards", "val"), 32)
        load = client_load(f"http://127.0.0.1:{port}", args.clients, args.requests, uploads, args.k)
        info = httpx.get(f"http://127.0.0.1:{port}/info", timeout=10).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    stages["serve"] = {"startup_seconds": round(startup, 1), **load}
    result = {
        "scenes": args.scenes, "images_encoded": images, "processes": args.processes,
        "model": "frozen EfficientNet-Lite0 (ImageNet) + linear projection trained "
                 f"{args.epochs} epochs on the train scenes, 96 px",
        "stages": stages,
        "index": {"kind": info["index"]["images"]["kind"], "search_params": info["index"]["images"]["search_params"],
                  "count": info["index"]["images"]["count"], "build": stamp.get("build")},
        "total_seconds": round(sum(s.get("seconds", 0) for s in stages.values() if "startup_seconds" not in s)
                               + startup, 1),
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return 1 if load["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
