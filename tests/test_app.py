"""The Streamlit app's logic under streamlit.testing (no browser), its settings and the `retrieval app` job."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest

from app.settings import AppSettings, default_checkpoint, find_checkpoints, load_settings
from app.views import literal
from pipelines.app import streamlit_command
from pipelines.cli import main as cli_main
from retrieval.checkpoint import file_fingerprint, load_checkpoint
from retrieval.data import list_shards
from retrieval.indexing import build_index
from retrieval.rundir import IndexDir, RunDir

APP_FILE = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
SAMPLE_PHOTO = sorted((Path(__file__).resolve().parents[1] / "data" / "coco-mini" / "images").glob("*.jpg"))[0]
TIMEOUT = 60  # the first run loads the checkpoint and 400k word vectors
INJECTION = "[click](http://example.invalid) ![x](http://example.invalid/x.png) **bold**"
MARKDOWN = MarkdownIt("commonmark").enable(["table", "strikethrough"])  # CommonMark + GFM tables, like st.markdown
MARKDOWN_ELEMENTS = ("markdown", "caption", "error", "warning", "info", "success", "title", "header", "subheader")


@pytest.fixture(scope="module")
def app_index(trained_run, sample_shards, tmp_path_factory) -> Path:
    """An index of the held-out photos built with the trained run's best checkpoint."""
    model = load_checkpoint(trained_run.best_checkpoint)
    return build_index(model, list_shards(sample_shards, "val"), tmp_path_factory.mktemp("app") / "index")


@pytest.fixture
def app(trained_run, app_index, monkeypatch) -> AppTest:
    """The app, pointed at the test run and index through its environment variables, after one run."""
    monkeypatch.setenv("RETRIEVAL_RUN", str(trained_run.run_dir))
    monkeypatch.setenv("RETRIEVAL_INDEX", str(app_index))
    monkeypatch.setenv("RETRIEVAL_CHECKPOINT", str(trained_run.best_checkpoint))
    test = AppTest.from_file(str(APP_FILE), default_timeout=TIMEOUT)
    test.run()
    assert not test.exception and not test.error
    return test


def query(app: AppTest, text: str) -> AppTest:
    app.text_input(key="query").input(text).run()
    assert not app.exception
    return app


def test_text_query_shows_images_with_captions_and_scores(app):
    query(app, "a red bus on the street")
    k = app.slider(key="k").value
    assert k == 10 and len(app.image) == k
    assert all(image.value and image.value[0] for image in app.image)  # each has a served URL
    scores = [float(m.value.split("`")[1]) for m in app.markdown
              if m.value.startswith("**") and "similarity" in m.value]
    assert len(scores) == k and scores == sorted(scores, reverse=True)
    assert all(-1.0 <= score <= 1.0 for score in scores)  # cosine similarities, not negative distances
    assert any("a red bus on the street" in caption.value for caption in app.caption)
    assert not app.error


def test_word_arithmetic_query_is_answered(app):
    query(app, "bus - red + yellow")
    assert len(app.image) == app.slider(key="k").value and not app.error


def test_query_without_known_words_shows_one_line_error(app):
    query(app, "qzxv blorpt")
    assert len(app.error) == 1
    message = app.error[0].value
    assert "qzxv" in message and "blorpt" in message and "\n" not in message
    assert len(app.image) == 0


def test_k_slider_changes_result_count(app):
    query(app, "a pizza on a table")
    for k in (3, 7):
        app.slider(key="k").set_value(k).run()
        assert len(app.image) == k


def test_example_button_fills_the_query(app):
    app.button(key="example-a man riding a skateboard").click().run()
    assert app.text_input(key="query").value == "a man riding a skateboard"
    assert len(app.image) == app.slider(key="k").value


def test_upload_shows_captions_words_and_similar_photos(app, app_index):
    photo = SAMPLE_PHOTO
    app.slider(key="k").set_value(4).run()
    app.file_uploader(key="upload").set_value((photo.name, photo.read_bytes(), "image/jpeg")).run()
    assert not app.exception and not app.error
    texts = [t.value for t in app.text]
    captions = next(text for text in texts if text.startswith("1. "))
    assert [line.split(".")[0] for line in captions.splitlines()] == ["1", "2", "3", "4"]
    words = texts[texts.index(captions) + 1]
    assert words.count(" · ") == 4 - 1
    assert len(app.image) == 1 + 4  # the upload and its similar photos
    app.text_input(key="shift").input("+ snow - grass").run()
    assert len(app.image) == 1 + 4 + 4 and f"The photo {literal('+ snow - grass')}" in [s.value for s in app.subheader]
    app.text_input(key="shift").input("+ qzxv").run()
    assert len(app.error) == 1 and "qzxv" in app.error[0].value


def _tokens(body: str) -> list:
    """Every block and inline token of ``body`` read as markdown."""
    tokens = []
    for token in MARKDOWN.parse(body):
        tokens += [token, *(token.children or [])]
    return tokens


def assert_shown_as_typed(app: AppTest, *typed: str) -> None:
    """No markdown on the page renders a link, an image or HTML, no bare URL is left for GFM to link,
    and each of ``typed`` is shown verbatim (inside a code span or as plain text)."""
    bodies = [element.value for kind in MARKDOWN_ELEMENTS for element in getattr(app, kind)]
    bodies += [caption for image in app.image for caption in image.captions if caption]
    verbatim = [text.value for text in app.text]
    for body in bodies:
        tokens = _tokens(body)
        assert not [t for t in tokens if t.type in ("link_open", "image", "html_inline", "html_block")], body
        assert not [t for t in tokens if t.type == "text" and ("http" in t.content or "www." in t.content)], body
        verbatim += [t.content for t in tokens if t.type == "code_inline"]
    for text in typed:
        assert any(text in shown for shown in verbatim), text


def test_markdown_in_a_query_is_shown_as_typed(app):
    query(app, INJECTION)
    assert len(app.image) == app.slider(key="k").value and not app.error
    assert_shown_as_typed(app, INJECTION)
    assert any(caption.value.startswith(f"{len(app.image)} images for {literal(INJECTION)}") for caption in app.caption)


def test_markdown_echoed_in_an_error_is_shown_as_typed(app):
    typed = "[qzxv](qzxv) ![blorpt](qzxv.blorpt) **qzxv** <qzxv>"
    query(app, typed)
    assert len(app.error) == 1 and app.error[0].value.startswith("` no known word in query ")
    assert_shown_as_typed(app, typed)


def test_markdown_in_the_words_box_and_the_file_name_is_shown_as_typed(app, app_index):
    photo = SAMPLE_PHOTO
    name = "[x](http://example.invalid) ![y](http://example.invalid/y.png).jpg"
    app.slider(key="k").set_value(3).run()
    app.file_uploader(key="upload").set_value((name, photo.read_bytes(), "image/jpeg")).run()
    words = "+ [snow](http://example.invalid) ![x](http://example.invalid/x.png) **grass**"
    app.text_input(key="shift").input(words).run()
    assert not app.exception and not app.error and len(app.image) == 1 + 3 + 3
    assert_shown_as_typed(app, name, words)
    app.text_input(key="shift").input("+ [qzxv](qzxv)").run()
    assert len(app.error) == 1
    assert_shown_as_typed(app, "[qzxv](qzxv)")


def _hostile_results() -> None:
    """Results whose captions, keys and words hold markdown, drawn by the app's views (an AppTest script)."""
    from app.views import caption_list, image_grid, word_list
    from retrieval.search import ImageHit, TextHit

    caption = "![x](http://example.invalid/x.png) [click](http://example.invalid) **bold**\n# heading"
    key = "[key](http://example.invalid/key) `tick` <b>"
    image_grid([ImageHit(key, 0.5, [caption], None), ImageHit(key, 0.25, [], None)])
    caption_list([TextHit(caption, 0.5), TextHit(key, 0.25)])
    word_list([TextHit("[w](http://example.invalid)", 0.5), TextHit("**w**", 0.25)])


def test_captions_keys_and_words_from_the_index_are_shown_as_typed():
    test = AppTest.from_function(_hostile_results, default_timeout=TIMEOUT)
    test.run()
    assert not test.exception
    caption = "![x](http://example.invalid/x.png) [click](http://example.invalid) **bold** # heading"
    key = "[key](http://example.invalid/key) `tick` <b>"
    assert [text.value for text in test.text] == [
        caption, key, f"1. {caption} — 0.500\n2. {key} — 0.250", "[w](http://example.invalid) 0.50 · **w** 0.25",
    ]
    assert test.caption[0].value == f"(no thumbnail for {literal(key)})"
    assert_shown_as_typed(test, caption, key)


def test_literal_hand_computed():
    assert literal("a *b*") == "` a *b* `"
    assert literal("say `hi` or ``bye``") == "``` say `hi` or ``bye`` ```"
    assert literal("x\r\ny\nz") == "` x y z `"


@settings(deadline=None, max_examples=300)
@given(st.text(alphabet=st.characters(exclude_characters="\x00"), max_size=40)
       | st.text(alphabet="`*_[]()!<>#-+|\\:$ \n\tab", max_size=40))
def test_literal_is_one_code_span_holding_the_text(text):
    tokens = _tokens(literal(text))
    assert [t.type for t in tokens] == ["paragraph_open", "inline", "code_inline", "paragraph_close"]
    shown = " ".join(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    if shown.strip(" "):
        assert tokens[2].content == shown
    else:  # only spaces: CommonMark keeps the padding, still nothing but spaces
        assert not tokens[2].content.strip(" ")


def test_sidebar_describes_model_and_index(app):
    card = "\n".join(m.value for m in app.sidebar.markdown)
    assert "efficientnet-lite0" in card and "glove-6b-50d" in card and "triplet" in card
    assert "25 images" in card


def test_missing_run_shows_error_instead_of_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_RUN", str(tmp_path / "nowhere"))
    monkeypatch.delenv("RETRIEVAL_INDEX", raising=False)
    test = AppTest.from_file(str(APP_FILE), default_timeout=TIMEOUT)
    test.run()
    assert not test.exception
    assert len(test.error) == 1 and "retrieval demo" in test.error[0].value


# -- settings ------------------------------------------------------------------------------------

def test_settings_command_line_beats_environment_beats_defaults():
    environ = {"RETRIEVAL_RUN": "runs/a", "RETRIEVAL_CHECKPOINT": "last.pt"}
    assert load_settings([], {}).run.as_posix().endswith("runs/demo")
    assert load_settings([], environ) == AppSettings(Path("runs/a"), None, "last.pt")
    assert load_settings(["--run", "runs/b", "--index", "ix"], environ) == AppSettings(Path("runs/b"), Path("ix"),
                                                                                      "last.pt")


def test_default_checkpoint_is_the_one_that_built_the_index(trained_run, tmp_path):
    run, index = RunDir(tmp_path / "run"), IndexDir(tmp_path / "index")
    shutil.copytree(RunDir(trained_run.run_dir).checkpoints, run.checkpoints)
    assert find_checkpoints(run.path)[:2] == ["best.pt", "last.pt"]
    index.stamp_file.parent.mkdir(parents=True)
    index.stamp_file.write_text(json.dumps({"stamp": {"model": file_fingerprint(run.checkpoint("last.pt"))}}))
    names = find_checkpoints(run.path)
    if file_fingerprint(run.checkpoint("best.pt")) != file_fingerprint(run.checkpoint("last.pt")):
        assert default_checkpoint(run.path, index.path, names) == "last.pt"
    index.stamp_file.write_text("{}")  # unreadable stamp: fall back to best.pt
    assert default_checkpoint(run.path, index.path, names) == "best.pt"


# -- the `retrieval app` job ---------------------------------------------------------------------

def test_app_job_refuses_a_missing_run_in_one_line(tmp_path, capsys):
    assert cli_main(["app", "--run", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err.strip()
    assert "retrieval demo" in error and "\n" not in error


def test_app_job_passes_run_index_and_checkpoint_to_streamlit(tmp_path):
    from pipelines.app import parse_args

    args = parse_args(["--run", str(tmp_path), "--index", str(tmp_path / "ix"), "--checkpoint", "last.pt",
                       "--port", "8600"])
    command = streamlit_command(args)
    assert command[1:4] == ["-m", "streamlit", "run"] and Path(command[4]) == APP_FILE
    assert command[command.index("--server.port") + 1] == "8600"
    assert command[command.index("--server.headless") + 1] == "true"
    assert command[command.index("--client.toolbarMode") + 1] == "minimal"  # no deploy button
    assert command[command.index("--") + 1:] == ["--run", str(tmp_path), "--index", str(tmp_path / "ix"),
                                                  "--checkpoint", "last.pt"]


def test_model_card_states_the_loss_with_every_setting_in_effect(trained_run, app_index):
    from app.views import model_card
    from retrieval.search import Searcher

    card = model_card(Searcher.open(trained_run.best_checkpoint, app_index), "best.pt")
    # demo.yaml's loss; the far threshold is unset (only far-hardest and far-semihard take one)
    assert ("- **loss**: triplet (margin=0.4, squared=False, negatives=farthest, far_quantile=None, "
            "far_distance=None, anchors=image, hinge=sampled)\n") in card
    assert ", l2, 25 images" in card  # the index compares by the loss's distance


def test_thumbnails_are_shown_as_tiles_of_one_size(tmp_path):
    from PIL import Image

    from app.views import TILE_PIXELS, tile

    sizes = set()
    for name, size in (("wide.jpg", (320, 120)), ("tall.jpg", (90, 300)), ("small.png", (40, 40))):
        Image.new("RGB", size, "red").save(tmp_path / name)
        sizes.add(tile((tmp_path / name).read_bytes()).size)
    assert sizes == {(TILE_PIXELS, TILE_PIXELS)}
