"""The search API (`retrieval serve`): every query kind agrees with the in-process Searcher, bad input gets a
one-line JSON error with a 4xx status, concurrent requests answer like serial ones."""

from __future__ import annotations

import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.cli import main as cli_main
from retrieval.rundir import RunDir
from retrieval.search import COSINE_SIMILARITY
from retrieval.serving import ServeLimits, create_app, image_hit, text_hit

SAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "data" / "coco-mini" / "images"
LIMITS = ServeLimits(max_body_bytes=400_000, max_pixels=1_000_000, max_k=20, max_query_chars=200)
QUERIES = ["a red bus on the street", "a pizza on a table", "bus - red + yellow", "a man riding a skateboard",
           "dog - grass + snow", "people at a table with cake"]


@pytest.fixture(scope="module")
def client(searcher) -> TestClient:
    return TestClient(create_app(searcher, LIMITS))


@pytest.fixture(scope="module")
def photo() -> bytes:
    return next(iter(sorted(SAMPLE_IMAGES.glob("*.jpg")))).read_bytes()


def upload(client: TestClient, path: str, data: bytes, name: str = "photo.jpg", **fields):
    return client.post(path, files={"image": (name, data, "image/jpeg")}, data={k: str(v) for k, v in fields.items()})


def refused(response, status: int) -> str:
    """The error text of a one-line JSON refusal with ``status``."""
    assert response.status_code == status, response.text
    assert "\n" not in response.text
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in body["error"]
    return body["error"]


def test_health_and_info_state_the_index(client, searcher):
    health = client.get("/health").json()
    assert health == {"status": "ok", "images": len(searcher.images), "captions": len(searcher.captions),
                      "words": len(searcher.words)}
    info = client.get("/info").json()
    assert info["index"]["stamp"] == searcher.images.stamp
    assert info["index"]["images"]["count"] == len(searcher.images)
    assert info["index"]["images"]["kind"] == searcher.images.kind == "flat"
    assert info["model"]["distance"] == searcher.distance.name
    assert info["similarity"]["images"] == COSINE_SIMILARITY  # the demo's embeddings have unit length
    assert info["limits"]["max_k"] == LIMITS.max_k


@pytest.mark.parametrize("query", QUERIES)
def test_text_query_equals_the_in_process_search(client, searcher, query):
    answer = client.post("/search/text", json={"query": query, "k": 7})
    assert answer.status_code == 200, answer.text
    expected = [image_hit(hit) for hit in searcher.text_to_image(query, 7)]
    assert answer.json() == {"query": query, "k": 7, "images": expected}  # same keys, order and scores (exactly)


def test_arithmetic_gives_its_terms_and_the_in_process_images(client, searcher):
    answer = client.post("/search/arithmetic", json={"query": "bus − red + yellow"}).json()
    assert answer["terms"] == [{"sign": "+", "text": "bus"}, {"sign": "-", "text": "red"},
                               {"sign": "+", "text": "yellow"}]
    assert answer["k"] == 5
    assert answer["images"] == [image_hit(hit) for hit in searcher.text_to_image("bus − red + yellow", 5)]


def test_image_to_text_equals_the_in_process_search(client, searcher, photo):
    answer = upload(client, "/search/image-to-text", photo, k=4)
    assert answer.status_code == 200, answer.text
    found = searcher.image_to_text(Image.open(io.BytesIO(photo)), 4)
    assert answer.json() == {"k": 4, "captions": [text_hit(hit) for hit in found.captions],
                             "words": [text_hit(hit) for hit in found.words]}
    assert len(found.captions) == 4 and len(found.words) == 4


def test_image_to_image_and_image_moved_by_words_equal_the_in_process_search(client, searcher, photo):
    image = Image.open(io.BytesIO(photo))
    same = upload(client, "/search/image-to-image", photo, k=6).json()
    assert same == {"k": 6, "images": [image_hit(hit) for hit in searcher.image_to_image(image, 6)]}
    moved = upload(client, "/search/image-to-image", photo, k=6, text="+ snow - grass").json()
    assert moved == {"k": 6, "text": "+ snow - grass",
                     "images": [image_hit(hit) for hit in searcher.image_plus_text(image, "+ snow - grass", 6)]}


def test_thumbnails_are_served_by_key(client, searcher):
    hit = searcher.text_to_image("a red bus", 1)[0]
    response = client.get(f"/thumbnail/{hit.key}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == hit.thumbnail and response.content[:2] == b"\xff\xd8"
    assert refused(client.get("/thumbnail/no-such-image"), 404) == "no thumbnail for 'no-such-image'"
    assert "characters long" in refused(client.get("/thumbnail/" + "x" * 5000), 400)


def test_similarity_is_the_cosine_of_query_and_item(searcher):
    """Brute force: the cosine of the query vector and each stored image vector, whatever the query's length."""
    stored = searcher.images._index.reconstruct_n(0, len(searcher.images))  # a flat index keeps the vectors
    assert np.allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-4)
    for vector in (searcher.text_vector("a red bus"), 3.0 * searcher.text_vector("a red bus")):
        hits = searcher.images_near(vector, 5)
        keys = [item["key"] for item in searcher.images.metadata_for(np.arange(len(searcher.images)))]
        cosines = stored @ vector / np.linalg.norm(vector)
        for hit in hits:
            assert hit.similarity == pytest.approx(float(cosines[keys.index(hit.key)]), abs=1e-4)
        assert [hit.similarity for hit in hits] == sorted((hit.similarity for hit in hits), reverse=True)


@pytest.mark.parametrize("body, status, words", [
    ({"query": "", "k": 5}, 400, "empty"),
    ({"query": "   "}, 400, "empty"),
    ({"query": "a red bus", "k": 10_000}, 400, "k must be from 1 to 20"),
    ({"query": "a red bus", "k": 0}, 400, "k must be"),
    ({"query": "a red bus", "k": "many"}, 400, "k must be"),
    ({"query": "qzxv blorpt"}, 400, "qzxv"),
    ({"query": "dog +"}, 400, "missing term"),
    ({"query": "+ - cat"}, 400, "missing term"),
    ({"query": "x" * 201}, 400, "limit is 200"),
    ({"query": 5}, 400, "must be a string"),
    ({"k": 5}, 400, "missing field 'query'"),
    ({"query": "bus", "kk": 5}, 400, "unknown field 'kk'"),
    (["a red bus"], 400, "JSON object"),
])
def test_bad_text_requests_get_one_line_json_errors(client, body, status, words):
    for path in ("/search/text", "/search/arithmetic"):
        assert words in refused(client.post(path, json=body), status)


def test_bad_bodies_and_paths_get_one_line_json_errors(client, photo):
    assert "not valid JSON" in refused(client.post("/search/text", content=b"{nope",
                                                   headers={"content-type": "application/json"}), 400)
    assert "JSON body" in refused(client.post("/search/text", content=b"a red bus"), 415)
    assert "multipart" in refused(client.post("/search/image-to-text", json={"query": "x"}), 415)
    assert "missing file field 'image'" in refused(client.post("/search/image-to-text",
                                                               files={"image": (None, b"text, not a file")}), 400)
    assert "unknown field 'other'" in refused(client.post("/search/image-to-text", files={"other": ("a", b"b")}), 400)
    assert "no endpoint" in refused(client.get("/search/nothing"), 404)
    assert "not allowed" in refused(client.get("/search/text"), 405)
    assert "over 400,000 bytes" in refused(client.post("/search/text", content=b"x" * 500_000,
                                                       headers={"content-type": "application/json"}), 413)


def test_bad_uploads_get_one_line_json_errors(client, photo):
    assert "cannot read image notes.txt" in refused(upload(client, "/search/image-to-text", b"just some text",
                                                           name="notes.txt"), 400)
    assert "is empty" in refused(upload(client, "/search/image-to-image", b""), 400)
    assert "over 400,000 bytes" in refused(upload(client, "/search/image-to-image", b"\0" * 500_000), 413)
    big = io.BytesIO()
    Image.new("RGB", (1100, 1000), "white").save(big, format="PNG")  # a small file that decodes to 1.1 megapixels
    assert len(big.getvalue()) < LIMITS.max_body_bytes
    assert "exceeds the limit of 1,000,000 pixels" in refused(upload(client, "/search/image-to-text",
                                                                     big.getvalue(), name="big.png"), 413)
    assert "k must be" in refused(upload(client, "/search/image-to-text", photo, k=21), 400)
    assert "qzxv" in refused(upload(client, "/search/image-to-image", photo, text="+ qzxv"), 400)
    assert "unknown field 'extra'" in refused(upload(client, "/search/image-to-text", photo, extra="1"), 400)


def test_concurrent_requests_answer_like_serial_ones(client, photo):
    requests = [("text", query) for query in QUERIES] * 4 + [("image", None)] * 8
    serial_text = {query: client.post("/search/text", json={"query": query, "k": 9}).json() for query in QUERIES}
    serial_image = upload(client, "/search/image-to-text", photo, k=9).json()
    threads_before = faiss.omp_get_max_threads()

    def ask(request):
        kind, query = request
        if kind == "text":
            return client.post("/search/text", json={"query": query, "k": 9}).json()
        return upload(client, "/search/image-to-text", photo, k=9).json()

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, requests))
    for (kind, query), answer in zip(requests, answers):
        assert answer == (serial_text[query] if kind == "text" else serial_image)
    assert faiss.omp_get_max_threads() == threads_before  # a search's one-thread setting stays in its own thread


def test_serve_refuses_a_run_without_an_index_in_one_line(trained_run, tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    shutil.copytree(RunDir(trained_run.run_dir).checkpoints, run.checkpoints)
    assert cli_main(["serve", "--run", str(run.path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no index in" in error and "retrieval index" in error


@pytest.mark.parametrize("args, words", [
    (["--port", "0"], "--port 0"),
    (["--max-k", "0"], "max_k must be a positive"),
    (["--max-upload-pixels", "lots"], "--max-upload-pixels"),
])
def test_serve_refuses_bad_settings_in_one_line(trained_run, capsys, args, words):
    assert cli_main(["serve", "--run", str(trained_run.run_dir), *args]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and words in error


def test_limits_are_checked():
    with pytest.raises(Exception, match="max_body_bytes must be a positive"):
        ServeLimits(max_body_bytes=0)
    assert json.loads(json.dumps(ServeLimits().__dict__))["max_k"] == 100
