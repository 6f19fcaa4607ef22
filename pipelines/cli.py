"""``retrieval <job> [options]``: one console script for every job."""

from __future__ import annotations

import importlib
import sys

from retrieval.errors import RetrievalError

JOBS = {
    "prepare": "write webdataset shards from images + captions",
    "train": "train an image encoder against frozen caption vectors",
    "embed": "encode shards into embedding shards (img_emb/*.npy + metadata parquet), under torchrun too",
    "index": "embed a shard set into a faiss index",
    "search": "query an index by text or by image",
    "evaluate": "all retrieval metrics of a checkpoint on held-out shards (JSON + table)",
    "compare": "train loss/text variants over seeds and write a report with plots",
    "demo": "prepare, train, index and search the embedded sample data",
    "app": "open the Streamlit search app on a run's index",
    "serve": "an HTTP JSON search API over a run's index",
}


def usage() -> str:
    rows = "\n".join(f"  {name:<10}{text}" for name, text in JOBS.items())
    return f"usage: retrieval <job> [options]\n\njobs:\n{rows}\n\n`retrieval <job> --help` for a job's options."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    job, rest = argv[0], argv[1:]
    if job not in JOBS:
        print(f"error: unknown job {job!r}; choose one of: {', '.join(JOBS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"pipelines.{job}")
    try:
        return int(module.main(rest) or 0)
    except RetrievalError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
