"""Data: caption sources (registered by name in ``SOURCES``), webdataset shard writing and streaming readers."""

from retrieval.data.fashion_mnist import FashionMnistSource  # registers "fashion-mnist"
from retrieval.data.fashion_mnist_scenes import FashionMnistScenesSource  # registers "fashion-mnist-scenes"
from retrieval.data.pipeline import (
    EpochLoader,
    EpochSeed,
    Sample,
    TrainPipeline,
    collate_batch,
    decode_sample,
    iter_samples,
    make_loader,
    make_train_pipeline,
    raise_data_error,
)
from retrieval.data.shards import (
    ShardManifest,
    assign_split,
    hash_split,
    list_shards,
    read_manifest,
    write_shards,
)
from retrieval.data.sources import (
    SOURCES,
    Record,
    SourceOptions,
    check_unique_keys,
    make_key,
    make_source_options,
    open_source,
    records_from_coco,
    records_from_csv,
    records_from_img2dataset,
    records_from_jsonl,
)

__all__ = [
    "EpochLoader",
    "EpochSeed",
    "FashionMnistScenesSource",
    "FashionMnistSource",
    "Record",
    "SOURCES",
    "Sample",
    "ShardManifest",
    "SourceOptions",
    "TrainPipeline",
    "assign_split",
    "check_unique_keys",
    "collate_batch",
    "decode_sample",
    "hash_split",
    "iter_samples",
    "list_shards",
    "make_key",
    "make_loader",
    "make_source_options",
    "make_train_pipeline",
    "open_source",
    "raise_data_error",
    "read_manifest",
    "records_from_coco",
    "records_from_csv",
    "records_from_img2dataset",
    "records_from_jsonl",
    "write_shards",
]
