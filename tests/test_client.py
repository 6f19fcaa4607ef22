"""The search API's client and the app on top of it: the same answers as the in-process search, one-line errors."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from streamlit.testing.v1 import AppTest

from retrieval.client import SearchClient, ServiceError
from retrieval.serving import create_app

PROJECT_ROOT = Path(__file__).resolve().parents[1]
APP_FILE = PROJECT_ROOT / "app" / "streamlit_app.py"
PHOTO = sorted((PROJECT_ROOT / "data" / "coco-mini" / "images").glob("*.jpg"))[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def api_url(searcher):
    """A real `retrieval serve` app on a loopback port, in a thread, for the module."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(searcher), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(api_url) -> SearchClient:
    return SearchClient(api_url)


def same_images(remote, local) -> None:
    assert [hit.key for hit in remote] == [hit.key for hit in local]
    assert [hit.score for hit in remote] == pytest.approx([hit.score for hit in local], abs=1e-5)
    assert [hit.thumbnail for hit in remote] == [hit.thumbnail for hit in local]
    assert all(hit.thumbnail for hit in remote)


@pytest.mark.slow
@pytest.mark.parametrize("query", ["a red bus on the street", "bus - red + yellow"])
def test_text_queries_over_http_equal_the_in_process_search(client, searcher, query):
    same_images(client.text_to_image(query, 5), searcher.text_to_image(query, 5))


@pytest.mark.slow
def test_image_queries_over_http_equal_the_in_process_search(client, searcher):
    data = PHOTO.read_bytes()
    remote, local = client.image_to_text(data, PHOTO.name, 4), searcher.image_to_text(PHOTO, 4)
    assert [h.text for h in remote.captions] == [h.text for h in local.captions]
    assert [h.text for h in remote.words] == [h.text for h in local.words]
    same_images(client.image_to_image(data, PHOTO.name, 4), searcher.image_to_image(PHOTO, 4))
    same_images(client.image_to_image(data, PHOTO.name, 4, text="+ snow - grass"),
                searcher.image_plus_text(PHOTO, "+ snow - grass", 4))
    assert client.num_images == len(searcher.images) and client.image_similarity == searcher.image_similarity


def test_the_service_refusing_a_query_is_one_line(client):
    with pytest.raises(ServiceError, match=r"/search/text: no known word in query") as error:
        client.text_to_image("qwertyuiop", 3)
    assert "\n" not in str(error.value)


def test_a_service_that_is_not_there_is_one_line():
    with pytest.raises(ServiceError, match="cannot connect .*is `retrieval serve` running there") as error:
        SearchClient(f"http://127.0.0.1:{free_port()}")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://example.invalid", ""])
def test_an_address_that_is_no_http_url_is_refused(url):
    with pytest.raises(ServiceError, match="give the search API's address"):
        SearchClient(url)


@pytest.mark.slow
def test_the_app_searches_through_the_api(api_url, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_API", api_url)
    app = AppTest.from_file(str(APP_FILE), default_timeout=60)
    app.run()
    assert not app.exception and not app.error
    assert api_url in app.sidebar.markdown[-1].value  # the card names the service it searches
    app.slider(key="k").set_value(3).run()
    app.text_input(key="query").input("a red bus on the street").run()
    assert not app.exception and not app.error and len(app.image) == 3
    app.file_uploader(key="upload").set_value((PHOTO.name, PHOTO.read_bytes(), "image/jpeg")).run()
    assert not app.exception and not app.error


@pytest.mark.slow
def test_the_app_says_in_one_line_when_the_api_is_down(monkeypatch):
    monkeypatch.setenv("RETRIEVAL_API", f"http://127.0.0.1:{free_port()}")
    app = AppTest.from_file(str(APP_FILE), default_timeout=60)
    app.run()
    assert not app.exception and len(app.error) == 1 and "cannot connect" in app.error[0].value


def test_the_app_job_passes_the_api_and_refuses_what_the_service_chooses(capsys):
    from pipelines.app import check_paths, parse_args, streamlit_command
    from pipelines.cli import main as cli_main

    args = parse_args(["--api", "http://127.0.0.1:8000", "--port", "8600"])
    check_paths(args)  # no run folder needed
    command = streamlit_command(args)
    assert command[-2:] == ["--api", "http://127.0.0.1:8000"]
    for extra, named in ((["--index", "ix"], "--index"), (["--checkpoint", "last.pt"], "--checkpoint")):
        assert cli_main(["app", "--api", "http://127.0.0.1:8000", *extra]) != 0
        error = capsys.readouterr().err.strip()
        assert named in error and "retrieval serve" in error and "\n" not in error
    assert cli_main(["app", "--api", "127.0.0.1:8000"]) != 0
    assert "give the search API's address" in capsys.readouterr().err
