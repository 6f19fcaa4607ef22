"""``retrieval demo``: prepare → train → index → search on the embedded COCO sample, in minutes on a CPU.

Prints held-out text→image and image→text R@1/5/10 next to the chance level, then a few example
queries on images the model never trained on. Running it again replaces the demo's run in ``train.run_dir``.
"""

from __future__ import annotations

import argparse
import io
import time

from PIL import Image

from pipelines.common import add_config_args, config_from_args
from retrieval.config import Config
from retrieval.console import format_metrics_table, image_query_results, text_query_results
from retrieval.data import list_shards, read_shard_records
from retrieval.data.prepare import locate_data, prepare
from retrieval.embed import caption_pairs
from retrieval.evaluation import chance_report, relevance
from retrieval.indexing import index_run
from retrieval.losses import describe_loss
from retrieval.runtime import resolve_device
from retrieval.search import open_searcher
from retrieval.train import fit

EXAMPLE_QUERIES = ("a pizza on a table", "a man riding a skateboard", "a red bus on the street",
                   "bus - red + yellow")


def chance_levels(config: Config, searcher) -> dict:
    """Chance R@K of the held-out split, with the same relevance as the evaluation."""
    records = read_shard_records(list_shards(config.data, "val"))
    captions = [record["captions"] for record in records]
    _, owner, _ = caption_pairs(captions, searcher.model.caption_encoder.encode_batch)
    caption_labels, image_labels, _ = relevance([record.get("meta", {}) for record in records], owner)
    return chance_report(caption_labels, image_labels, config.train.ks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrieval demo", description=__doc__)
    add_config_args(parser)
    parser.add_argument("--query", action="append", help="extra text query to show (repeatable)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    config = locate_data(config_from_args(args))

    print(f"[1/4] preparing shards from {config.data.path}")
    manifest = prepare(config)
    print(f"      {manifest.counts['train']} train / {manifest.counts['val']} held-out images")
    print(f"[2/4] training {config.model.backbone} + {config.model.projection} projection "
          f"with the loss {describe_loss(config.loss)} for {config.train.epochs} epochs")
    result = fit(config, overwrite=True)  # the demo's own run folder: a second demo replaces the first
    print("[3/4] indexing the held-out images")
    # The held-out split is this sample's only evaluation set, so the demo reports and searches with
    # the final checkpoint rather than the one that scored best on it.
    index_run(result.run_dir, checkpoint="last.pt", split="val", device=resolve_device("auto"))
    searcher = open_searcher(result.run_dir, checkpoint="last.pt")
    chance = chance_levels(config, searcher)

    print("\n[4/4] held-out retrieval (images and captions never seen in training)")
    print("before training:")
    print(format_metrics_table(result.initial_metrics, ks=config.train.ks))
    print(f"after {config.train.epochs} epochs, with the chance level:")
    print(format_metrics_table(result.final_metrics, chance, ks=config.train.ks))
    print()
    for query in EXAMPLE_QUERIES + tuple(args.query or ()):
        print(text_query_results(searcher, query, 3))
    example = searcher.images.metadata_for([0])[0]
    picture = Image.open(io.BytesIO(searcher.thumbnail(example["key"])))
    print(image_query_results(searcher, picture, 3, name=f"the thumbnail of held-out image {example['key']}"))
    print(f"\n(true captions of that image: {example['captions'][0]!r})")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; run directory {result.run_dir}")
    print(f"search it again: retrieval search --run {result.run_dir} --checkpoint last.pt --text \"a dog\"")
    print(f"open the search app on this index: retrieval app --run {result.run_dir}")
    return 0
