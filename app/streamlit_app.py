"""The search app: text→image (word arithmetic allowed), image→text and image→image, on a built index.

    retrieval app                                   # runs/demo, after `retrieval demo`
    streamlit run app/streamlit_app.py -- --run runs/demo [--index DIR] [--checkpoint last.pt]

The run, index and checkpoint can also come from RETRIEVAL_RUN, RETRIEVAL_INDEX and
RETRIEVAL_CHECKPOINT (see app/settings.py) and be changed in the sidebar, among the runs under the
runs root (--runs-root, default: the folder holding the run); nothing outside it is opened.
Uploads are decoded only up to --max-upload-pixels (default 40 megapixels).

With --api URL (or RETRIEVAL_API) the app opens no index: every query goes to that running
`retrieval serve` (retrieval/client.py), and the sidebar shows the model and index it serves.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `streamlit run` without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st
from PIL import Image

from app.settings import AppSettings, checkpoint_file, default_checkpoint, find_checkpoints, find_indexes, load_settings
from app.views import (
    caption_list,
    image_grid,
    literal,
    model_card,
    service_card,
    show_error,
    similarity_note,
    word_list,
)
from retrieval.client import SearchClient
from retrieval.errors import RetrievalError
from retrieval.imagefile import open_image
from retrieval.rundir import IndexDir, RunDir, RunsRoot
from retrieval.search import ImageHit, ImageToText, Searcher

EXAMPLES = ("a red bus on the street", "a pizza on a table", "a man riding a skateboard", "bus - red + yellow")
UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "gif"]
WARM_UP_QUERY = "a photo of a street"
WARM_UP_IMAGE_SIZE = (64, 64)
MAX_K = 50
DEFAULT_K = 10


def script_argv() -> list[str]:
    """Options after ``--`` of ``streamlit run`` (none when run otherwise, e.g. under AppTest)."""
    if sys.argv and Path(sys.argv[0]).resolve() == Path(__file__).resolve():
        return sys.argv[1:]
    return []


def _version(*paths: Path) -> tuple[float, ...]:
    """Modification times: a rebuilt index or checkpoint is loaded afresh."""
    return tuple(path.stat().st_mtime if path.exists() else 0.0 for path in paths)


@st.cache_resource(show_spinner="Loading the model and the index…", max_entries=4)
def load_searcher(checkpoint: str, index: str, version: tuple[float, ...]) -> Searcher:
    """One Searcher per (checkpoint, index, file versions), shared by every session."""
    searcher = Searcher.open(checkpoint, index)
    try:  # the first queries of a process pay for page faults in the word vectors and the image encoder's
        searcher.text_to_image(WARM_UP_QUERY, 1)  # first pass (seconds on CPU): pay them here, once
        searcher.image_to_image(Image.new("RGB", WARM_UP_IMAGE_SIZE, "gray"), 1)
    except RetrievalError:
        pass
    return searcher


@st.cache_resource(show_spinner="Connecting to the search API…", max_entries=4)
def connect(url: str) -> SearchClient:
    """One client per API URL, shared by every session (its /info is read once)."""
    return SearchClient(url)


Backend = Searcher | SearchClient  # in-process search, or the same queries sent to `retrieval serve`


def collection_size(backend: Backend) -> int:
    return backend.num_images if isinstance(backend, SearchClient) else len(backend.images)


@st.cache_data(show_spinner=False, max_entries=32)
def describe_image(_searcher: Searcher, searcher_id: str, data: bytes, k: int) -> tuple[ImageToText, list[ImageHit]]:
    """image→text and image→image for an upload (one encoder pass), cached per (searcher, upload, k)."""
    vector = _searcher.image_vector(Image.open(io.BytesIO(data)))
    return _searcher.texts_near(vector, k), _searcher.images_near(vector, k)


@st.cache_data(show_spinner=False, max_entries=32)
def move_image(_searcher: Searcher, searcher_id: str, data: bytes, shift: str, k: int) -> list[ImageHit]:
    """The upload moved by words (``"+ snow - grass"``), cached like :func:`describe_image`."""
    return _searcher.image_plus_text(Image.open(io.BytesIO(data)), shift, k)


@st.cache_data(show_spinner=False, max_entries=16)
def checkpoint_for(run: str, index: str, names: tuple[str, ...], version: tuple[float, ...]) -> str | None:
    """:func:`default_checkpoint`, cached: it hashes checkpoint files (tens of MB each)."""
    return default_checkpoint(Path(run), Path(index), names)


@st.cache_data(ttl=10, show_spinner=False)
def runs_under(root: str) -> list[str]:
    """The runs under the runs root, looked up at most every 10 s (every widget change reruns the script)."""
    return [str(run.path) for run in RunsRoot(root).runs()]


def choose_run(settings: AppSettings) -> tuple[RunDir | None, bool]:
    """The run chosen from those under the runs root, and whether it is the one the app was started on."""
    root = settings.root
    start = root.inside(settings.run)
    if start is None:
        st.error(f"run {literal(str(settings.run))} lies outside the runs root {literal(str(root))}; "
                 "the app opens runs only under it "
                 "(start it with --runs-root DIR)")
        return None, False
    runs = {root.label(RunDir(run)): RunDir(run) for run in runs_under(str(root))}
    start_label = root.label(RunDir(start))
    if start.is_dir() and start_label not in runs:
        runs = {start_label: RunDir(start), **runs}
    if not runs:
        st.error(f"no run with a checkpoint and an index under {literal(str(root))}; run `retrieval demo` "
                 f"(or `retrieval index --run {literal(str(settings.run))}`) first")
        return None, False
    labels = list(runs)
    label = st.sidebar.selectbox("Run", labels, index=labels.index(start_label) if start_label in runs else 0,
                                 key="run", help=f"runs written by `retrieval train` under {literal(str(root))}")
    return runs[label], label == start_label


def api_sidebar(settings: AppSettings) -> tuple[SearchClient | None, str, int]:
    """The search API in use, k and the card of the model it serves."""
    bar = st.sidebar
    bar.title("retrieval")
    try:
        client = connect(settings.api)
    except RetrievalError as error:
        show_error(str(error))
        return None, "", DEFAULT_K
    size = client.num_images
    k = bar.slider("Results (k)", 1, max(1, min(MAX_K, size)), max(1, min(DEFAULT_K, size)), key="k")
    bar.subheader("Model")
    bar.markdown(service_card(client.url, client.info))
    return client, client.url, k


def sidebar(settings: AppSettings) -> tuple[Searcher | None, str, int]:
    """Run / index / checkpoint choice, k and the model card; returns (searcher, its id, k)."""
    bar = st.sidebar
    bar.title("retrieval")
    chosen_run, started_on = choose_run(settings)
    if chosen_run is None:
        return None, "", DEFAULT_K
    run, root = chosen_run.path, settings.root
    indexes = [str(path) for path in find_indexes(run) if root.inside(path)]  # a link may lead outside
    if started_on and settings.index is not None and str(settings.index) not in indexes:
        indexes.insert(0, str(settings.index))
    if not indexes:
        st.error(f"no index in {literal(str(run))}; run `retrieval demo` "
                 f"(or {literal(f'retrieval index --run {run}')}) first")
        return None, "", DEFAULT_K
    index = IndexDir(bar.selectbox("Index", indexes))
    if root.inside(index.path) is None:
        st.error(f"index {literal(str(index))} lies outside the runs root {literal(str(root))}; "
                 "the app opens nothing outside it")
        return None, "", DEFAULT_K
    names = [name for name in find_checkpoints(run) if root.inside(RunDir(run).checkpoint(name))]
    files = [RunDir(run).checkpoint(name) for name in names] + [index.stamp_file]
    chosen = (settings.checkpoint if started_on else None) or checkpoint_for(str(run), str(index), tuple(names),
                                                                             _version(*files))
    if chosen is not None and chosen not in names:
        names.insert(0, chosen)
    if not names:
        st.error(f"no checkpoint in {literal(str(RunDir(run).checkpoints))}; train a model with `retrieval train`")
        return None, "", DEFAULT_K
    checkpoint = bar.selectbox("Checkpoint", names, index=names.index(chosen),
                               help="the index is searched with the checkpoint that built it")
    path = checkpoint_file(run, checkpoint)
    if root.inside(path) is None:
        st.error(f"checkpoint {literal(str(path))} lies outside the runs root {literal(str(root))}; "
                 "the app opens nothing outside it")
        return None, "", DEFAULT_K
    try:
        searcher = load_searcher(str(path), str(index), _version(path, index.stamp_file))
    except RetrievalError as error:
        show_error(str(error))
        return None, "", DEFAULT_K
    k = bar.slider("Results (k)", 1, max(1, min(MAX_K, len(searcher.images))),
                   min(DEFAULT_K, len(searcher.images)), key="k")
    bar.subheader("Model")
    bar.markdown(model_card(searcher, checkpoint))
    return searcher, f"{literal(str(path))}|{literal(str(index))}|{_version(path, index.stamp_file)}", k


def _ms(milliseconds: float) -> str:
    return f"{milliseconds:.1f} ms" if milliseconds < 10 else f"{milliseconds:.0f} ms"


def _use_example(text: str) -> None:
    st.session_state["query"] = text


def text_search(searcher: Backend, k: int) -> None:
    """A text box; results as a thumbnail grid, errors as one line."""
    query = st.text_input("Describe a photo", key="query",
                          placeholder='a red bus on the street — or arithmetic such as "bus - red + yellow"')
    examples = st.columns(len(EXAMPLES))
    for column, example in zip(examples, EXAMPLES):
        column.button(example, on_click=_use_example, args=(example,), key=f"example-{example}")
    if not query or not query.strip():
        st.caption("Type a description and press Enter. `a - b + c` adds and subtracts word vectors.")
        return
    started = time.perf_counter()
    try:
        hits = searcher.text_to_image(query, k)
    except RetrievalError as error:
        show_error(str(error))
        return
    elapsed_ms = (time.perf_counter() - started) * 1000
    st.caption(f"{len(hits)} images for {literal(query)} · searched in {_ms(elapsed_ms)} · "
               f"{similarity_note(searcher.image_similarity)}")
    image_grid(hits)


def image_search(searcher: Backend, searcher_id: str, k: int, max_pixels: int) -> None:
    """An upload (at most ``max_pixels`` decoded): nearest captions and words, nearest images, and the image
    moved by words."""
    limit = f"Photos up to {max_pixels / 1e6:.3g} megapixels ({max_pixels:,} pixels) are decoded; larger are refused."
    upload = st.file_uploader("Upload a photo", type=UPLOAD_TYPES, key="upload", help=limit)
    shift = st.text_input("Add or remove words (optional)", key="shift", placeholder="+ snow - grass",
                          help="moves the photo's embedding by word vectors, e.g. `+ snow - grass`")
    if upload is None:
        st.caption(f"Upload a photo to see the captions and words nearest to it, and similar photos. {limit}")
        return
    data = upload.getvalue()
    try:
        image = open_image(io.BytesIO(data), name=upload.name, max_pixels=max_pixels)
    except RetrievalError as error:
        show_error(str(error))
        return
    started = time.perf_counter()
    try:
        if isinstance(searcher, SearchClient):
            described, similar = searcher.image_to_text(data, upload.name, k), searcher.image_to_image(
                data, upload.name, k)
        else:
            described, similar = describe_image(searcher, searcher_id, data, k)
    except RetrievalError as error:
        show_error(str(error))
        return
    elapsed_ms = (time.perf_counter() - started) * 1000
    photo, text = st.columns([1, 2])
    photo.image(image, caption=literal(upload.name))
    with text:
        st.markdown("**Nearest captions**")
        caption_list(described.captions)
        st.markdown("**Nearest words**")
        word_list(described.words)
        st.caption(f"answered in {_ms(elapsed_ms)} · captions: {similarity_note(searcher.caption_similarity)} "
                   "Words: cosine after centring on the mean caption.")
    st.subheader("Similar photos")
    image_grid(similar)
    if shift and shift.strip():
        st.subheader(f"The photo {literal(shift.strip())}")
        try:
            image_grid(searcher.image_to_image(data, upload.name, k, text=shift)
                       if isinstance(searcher, SearchClient) else move_image(searcher, searcher_id, data, shift, k))
        except RetrievalError as error:
            show_error(str(error))


def main() -> None:
    st.set_page_config(page_title="retrieval — image and text search", page_icon="🔎", layout="wide")
    try:
        settings = load_settings(script_argv())
    except RetrievalError as error:
        show_error(str(error))
        return
    searcher, searcher_id, k = api_sidebar(settings) if settings.api else sidebar(settings)
    if searcher is None:
        return
    st.caption(f"Search {collection_size(searcher):,} photos by a description (word arithmetic allowed) "
               "or by a photo of your own.")
    by_text, by_image = st.tabs(["Text → images", "Image → text and images"])
    with by_text:
        text_search(searcher, k)
    with by_image:
        image_search(searcher, searcher_id, k, settings.max_upload_pixels)


main()
