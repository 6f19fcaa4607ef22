"""Streaming readers: in-order samples, the seeded training pipeline, its stages and the loader."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms.v2 import functional as F

from retrieval.data import (
    Sample,
    iter_samples,
    list_shards,
    make_loader,
    make_train_pipeline,
    records_from_jsonl,
    write_shards,
)
from retrieval.data.pipeline import decode, pick_caption, shuffle_samples, shuffle_shards, to_train_tuple
from retrieval.errors import DataError

N = 8  # image N-1 has no known caption and must be dropped


def TRANSFORM(image: torch.Tensor, seed: int) -> torch.Tensor:  # noqa: N802 - the pipeline's transform
    """uint8 (3, H, W) → float (3, 8, 8) in [0, 1]; the sample seed is not used."""
    return F.to_dtype(F.resize(image, [8, 8], antialias=True), torch.float32, scale=True)


def color(i: int) -> tuple[int, int, int]:
    return (30 * i, 255 - 30 * i, 128)


def caption_list(i: int) -> list[str]:
    return [f"unknown {i}"] if i == N - 1 else [f"w{i} alpha", f"unknown {i}", f"w{i} beta"]


class VectorTable:
    """Picklable caption → vector lookup; captions starting with 'unknown' have no vector."""

    def __call__(self, caption: str) -> np.ndarray | None:
        if caption.startswith("unknown"):
            return None
        word, variant = caption.split()
        return np.array([int(word[1:]), variant == "beta", 0.5], dtype=np.float64)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("pipeline")
    lines = []
    for i in range(N):
        name = f"k{i}.png" if i % 2 else f"k{i}.jpg"
        Image.new("RGB", (10 + i, 9), color(i)).save(root / name)
        lines.append(json.dumps({"image": name, "captions": caption_list(i), "i": i}))
    (root / "c.jsonl").write_text("\n".join(lines) + "\n")
    write_shards(records_from_jsonl(root / "c.jsonl"), root / "shards", shard_size=2, val_fraction=0.0, progress=False)
    return list_shards(root / "shards", "train")


def pipeline(shards: list[str], seed: int = 0, **kw):  # type: ignore[no-untyped-def]
    return make_train_pipeline(shards, transform=TRANSFORM, caption_vector=VectorTable(), shuffle_buffer=4, seed=seed,
                               **kw)


def run(pipe) -> list[tuple[str, tuple]]:  # type: ignore[no-untyped-def]
    return [(key, tuple(vec.tolist())) for _, vec, key in pipe]


def test_iter_samples_in_order(shards: list[str]) -> None:
    samples = list(iter_samples(shards))
    assert [s.key for s in samples] == [f"k{i}" for i in range(N)]
    assert all(s.image.dtype == torch.uint8 and s.image.shape == (3, 9, 10 + i) for i, s in enumerate(samples))
    assert samples[3].captions == caption_list(3) and samples[3].meta == {"i": 3}
    assert tuple(samples[1].image[:, 0, 0].tolist()) == color(1)  # PNG: lossless


def test_pairs_match_caption_vectors_and_images(shards: list[str]) -> None:
    pipe = pipeline(shards)
    seen = []
    for image, vector, key in pipe:
        i = int(key[1:])
        assert vector.dtype == torch.float32
        options = [torch.tensor(v, dtype=torch.float32) for c in caption_list(i) if (v := VectorTable()(c)) is not None]
        assert any(torch.equal(vector, o) for o in options)
        assert image.shape == (3, 8, 8)
        assert torch.allclose(image.mean(dim=(1, 2)), torch.tensor(color(i)) / 255, atol=0.05)
        seen.append(key)
    assert sorted(seen) == [f"k{i}" for i in range(N - 1)]
    assert pipe.counts == {"kept": N - 1, "no_caption": 1}


def test_seeded_order_is_reproducible(shards: list[str]) -> None:
    first = run(pipeline(shards, seed=3))
    assert run(pipeline(shards, seed=3)) == first
    assert run(pipeline(shards, seed=4)) != first
    pipe = pipeline(shards, seed=3)
    pipe.set_epoch(1)
    assert run(pipe) != first
    pipe.set_epoch(0)
    assert run(pipe) == first


def test_loader_batches_and_new_epoch_per_pass(shards: list[str]) -> None:
    loader = make_loader(pipeline(shards, seed=1), batch_size=3)
    epoch0 = list(loader)
    images, vectors, keys = epoch0[0]
    assert images.shape == (3, 3, 8, 8) and vectors.shape == (3, 3) and isinstance(keys, list)
    keys0 = [k for batch in epoch0 for k in batch[2]]
    assert sorted(keys0) == [f"k{i}" for i in range(N - 1)]
    keys1 = [k for batch in loader for k in batch[2]]
    assert sorted(keys1) == sorted(keys0) and keys1 != keys0
    again = [k for batch in make_loader(pipeline(shards, seed=1), batch_size=3) for k in batch[2]]
    assert again == keys0


def test_two_workers_see_each_sample_once(shards: list[str]) -> None:
    keys = [k for batch in make_loader(pipeline(shards, seed=2), batch_size=2, num_workers=2) for k in batch[2]]
    assert sorted(keys) == [f"k{i}" for i in range(N - 1)]
    again = [k for batch in make_loader(pipeline(shards, seed=2), batch_size=2, num_workers=2) for k in batch[2]]
    assert again == keys


def test_resampled_is_endless(shards: list[str]) -> None:
    keys = [key for _, _, key in itertools.islice(pipeline(shards, resampled=True), 20)]
    assert len(keys) == 20 and set(keys) <= {f"k{i}" for i in range(N - 1)}


def test_shuffle_stages_on_lists() -> None:
    items = list(range(20))
    out = list(shuffle_samples(bufsize=5, seed=7)(iter(items)))
    assert sorted(out) == items and out != items
    assert list(shuffle_samples(bufsize=5, seed=7)(iter(items))) == out
    assert list(shuffle_samples(bufsize=1, seed=7)(iter(items))) == items
    shard_dicts = [{"url": f"s{i}"} for i in range(6)]
    order = [d["url"] for d in shuffle_shards(seed=1)(iter(shard_dicts))]
    assert sorted(order) == [f"s{i}" for i in range(6)]
    assert [d["url"] for d in shuffle_shards(seed=1)(iter(shard_dicts))] == order


def test_pick_caption_drops_and_counts() -> None:
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    samples = [Sample(f"k{i}", image, caption_list(i)) for i in (0, N - 1, 1)]
    counts: dict[str, int] = {}
    out = list(pick_caption(VectorTable(), seed=0, counts=counts)(iter(samples)))
    assert [s.key for s, _ in out] == ["k0", "k1"]
    assert counts == {"kept": 2, "no_caption": 1}
    tuples = list(to_train_tuple(TRANSFORM)(iter(out)))
    assert tuples[0][0].shape == (3, 8, 8) and tuples[1][2] == "k1"


def test_decode_errors_name_shard_and_key() -> None:
    good = Image.new("RGB", (4, 4))
    buf = io.BytesIO()
    good.save(buf, "PNG")
    meta = json.dumps({"key": "a", "captions": ["x"], "meta": {}}).encode()
    raw = [
        {"__key__": "a", "__url__": "s-000.tar", "png": buf.getvalue(), "json": meta},
        {"__key__": "b", "__url__": "s-000.tar", "jpg": b"garbage", "json": meta},
    ]
    with pytest.raises(DataError, match=r"s-000\.tar: sample b: image does not decode"):
        list(decode()(iter(raw)))
    kept = list(decode(handler=wds.ignore_and_continue)(iter(raw)))
    assert [s.key for s in kept] == ["a"]


def test_unreadable_shards(tmp_path: Path) -> None:
    bad = tmp_path / "train-000000.tar"
    bad.write_bytes(b"not a tar file at all" * 50)
    with pytest.raises(DataError, match=r"train-000000\.tar") as info:
        list(iter_samples([str(bad)]))
    assert "\n" not in str(info.value)
    truncated = tmp_path / "t-000000.tar"
    with wds.TarWriter(str(truncated), encoder=False) as tar:
        tar.write({"__key__": "a", "jpg": b"x" * 5000, "json": b"{}"})
    truncated.write_bytes(truncated.read_bytes()[:3000])
    with pytest.raises(DataError, match=r"^cannot read shard data: \S*t-000000\.tar: unexpected end of data$"):
        list(iter_samples([str(truncated)]))
    with pytest.raises(DataError, match=r"missing-000000\.tar: No such file"):
        list(iter_samples([str(tmp_path / "missing-000000.tar")]))
    with pytest.raises(DataError, match="no shards"):
        iter_samples([])


def test_worker_errors_stay_one_line(tmp_path: Path, shards: list[str]) -> None:
    bad = tmp_path / "train-000009.tar"
    bad.write_bytes(b"not a tar file at all" * 50)
    loader = make_loader(pipeline([*shards, str(bad)]), batch_size=2, num_workers=2)
    with pytest.raises(DataError, match=r"^cannot read shard data: \S*train-000009\.tar: invalid header$"):
        list(loader)


def shard_keys(shard: str) -> set[str]:
    return {key for key, _ in run(make_train_pipeline([shard], transform=TRANSFORM, caption_vector=VectorTable(),
                                                      shuffle_buffer=0))}


@pytest.mark.parametrize("rank,worker,quota", [(0, 0, 4), (0, 1, 2), (1, 0, 4), (1, 1, 2)])
def test_a_fixed_epoch_gives_each_rank_and_worker_its_quota_from_its_own_shard(shards, monkeypatch, rank, worker,
                                                                                 quota):
    """2 ranks × 2 workers over 4 shards, 3 batches of 2 per rank: workers yield 2 and 1 batches, each from one
    shard of its own (cycled: the shard holding the dropped image has one usable sample, read again and again)."""
    keys_of = {shard: shard_keys(shard) for shard in shards}  # read before ranks and workers are faked
    monkeypatch.setattr(wds.utils, "pytorch_worker_info", lambda group=None: (rank, 2, worker, 2))
    keys = [key for key, _ in run(pipeline(shards, batches_per_rank=3, batch_size=2))]
    assert len(keys) == quota
    owners = [shard for shard in shards if set(keys) <= keys_of[shard]]
    assert len(owners) == 1  # one shard per (rank, worker) ...
    taken = set()
    for other_rank, other_worker in itertools.product(range(2), range(2)):
        monkeypatch.setattr(wds.utils, "pytorch_worker_info", lambda group=None, r=other_rank, w=other_worker:
                            (r, 2, w, 2))
        first = run(pipeline(shards, batches_per_rank=3, batch_size=2))[0][0]
        taken.add(next(shard for shard in shards if first in keys_of[shard]))
    assert len(taken) == 4  # ... and no two of them share one


def test_a_fixed_epoch_through_the_loader_is_exactly_that_many_full_batches(shards):
    loader = make_loader(pipeline(shards, batches_per_rank=5, batch_size=2), batch_size=2, num_workers=2)
    batches = list(loader)
    assert [len(keys) for _, _, keys in batches] == [2] * 5
    assert [len(keys) for _, _, keys in loader] == [2] * 5  # the next epoch too
