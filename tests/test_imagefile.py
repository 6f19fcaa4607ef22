"""User images: decompression bombs and images over the pixel cap are one-line errors naming the file, before
any pixel is decoded; `retrieval search --image` reports them in one line."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from pipelines.cli import main as cli_main
from retrieval.checkpoint import load_checkpoint
from retrieval.data import list_shards
from retrieval.errors import ConfigError, QueryError
from retrieval.imagefile import check_pixel_limit, open_image, pixel_limit
from retrieval.indexing import build_index


def png(width: int, height: int, mode: str = "1") -> bytes:
    """A blank PNG: a few kilobytes that decode to width × height pixels."""
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """48 KB of PNG that decodes to 20000 × 20000 pixels (1.2 GB as RGB): over twice PIL's limit."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(png(20_000, 20_000))
    assert path.stat().st_size < 100_000 and 20_000 * 20_000 > 2 * pixel_limit()
    return path


def refused(call, *needles: str) -> str:
    with pytest.raises(QueryError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and all(needle in message for needle in needles), message
    return message


def test_decompression_bomb_file_is_one_line_error_naming_it(bomb):
    refused(lambda: open_image(bomb), str(bomb), f"{pixel_limit():,} pixels")


def test_decompression_bomb_upload_is_named_by_its_file_name_not_an_object(bomb):
    message = refused(lambda: open_image(io.BytesIO(bomb.read_bytes()), name="holiday.png"), "holiday.png")
    assert "BytesIO" not in message and "0x" not in message


def test_image_over_pils_warning_limit_is_refused_too(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 120 × 120 = 14 400: PIL only warns below 20 000
    file = tmp_path / "big.png"
    file.write_bytes(png(120, 120))
    refused(lambda: open_image(file), str(file), "10,000 pixels")


def test_cap_is_checked_from_the_header_with_the_size(tmp_path):
    file = tmp_path / "photo.png"
    file.write_bytes(png(300, 200, "RGB"))
    refused(lambda: open_image(file, max_pixels=50_000), str(file), "300×200 = 60,000 pixels", "50,000")
    image = open_image(file, max_pixels=60_000)  # at the cap: accepted and fully decoded
    assert image.size == (300, 200) and image.getpixel((0, 0)) == (0, 0, 0)


def test_unreadable_image_is_one_line_error(tmp_path):
    file = tmp_path / "broken.jpg"
    file.write_bytes(png(50, 50, "RGB")[:60])
    refused(lambda: open_image(file), "cannot read image", str(file))
    refused(lambda: open_image(io.BytesIO(b"not an image"), name="notes.txt"), "notes.txt")


def test_pixel_cap_setting_is_range_checked():
    assert check_pixel_limit("40_000_000", "--max-upload-pixels") == 40_000_000
    for bad in ("0", "-5", "many", str(pixel_limit() + 1)):
        with pytest.raises(ConfigError, match="--max-upload-pixels") as error:
            check_pixel_limit(bad, "--max-upload-pixels")
        assert "\n" not in str(error.value)


@pytest.mark.slow
def test_search_image_bomb_is_one_line_error(bomb, trained_run, sample_shards, tmp_path, capsys):
    model = load_checkpoint(trained_run.best_checkpoint)
    index = build_index(model, list_shards(sample_shards, "val"), tmp_path / "index")
    capsys.readouterr()
    code = cli_main(["search", "--run", str(trained_run.run_dir), "--index", str(index), "--image", str(bomb)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(bomb) in err and "Traceback" not in err
