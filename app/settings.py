"""Where the app finds its runs, index and checkpoint, and how large an upload it decodes.

Precedence: ``streamlit run app/streamlit_app.py -- --run R --index I --checkpoint C --runs-root D
--max-upload-pixels N`` beats the environment variables ``RETRIEVAL_RUN``, ``RETRIEVAL_INDEX``,
``RETRIEVAL_CHECKPOINT``, ``RETRIEVAL_RUNS_ROOT``, ``RETRIEVAL_MAX_UPLOAD_PIXELS`` and ``RETRIEVAL_API``, which beat the
defaults (``runs/demo``, ``<run>/index``, the checkpoint that built that index, the folder holding
the run, 40 megapixels).

The app opens runs only under the runs root: it lists the runs found there, and a run, index or
checkpoint that resolves outside it (through ``..`` or a link) is refused.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from retrieval.checkpoint import file_fingerprint
from retrieval.client import check_api_url
from retrieval.imagefile import check_pixel_limit
from retrieval.rundir import BEST_CHECKPOINT, LAST_CHECKPOINT, IndexDir, RunDir, RunsRoot

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN = Path("runs/demo")
ENV_RUN, ENV_INDEX, ENV_CHECKPOINT = "RETRIEVAL_RUN", "RETRIEVAL_INDEX", "RETRIEVAL_CHECKPOINT"
ENV_RUNS_ROOT, ENV_MAX_UPLOAD_PIXELS = "RETRIEVAL_RUNS_ROOT", "RETRIEVAL_MAX_UPLOAD_PIXELS"
ENV_API = "RETRIEVAL_API"
DEFAULT_MAX_UPLOAD_PIXELS = 40_000_000
CHECKPOINT_PREFERENCE = (BEST_CHECKPOINT, LAST_CHECKPOINT)


@dataclass(frozen=True)
class AppSettings:
    """The starting choice of the sidebar; ``index``/``checkpoint`` None mean "work it out", ``runs_root``
    None the folder holding ``run``."""

    run: Path
    index: Path | None = None
    checkpoint: str | None = None
    runs_root: Path | None = None
    max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS
    api: str | None = None  # a running `retrieval serve` to send the queries to, instead of opening the index

    @property
    def root(self) -> RunsRoot:
        """The folder the app opens runs from."""
        return RunsRoot(self.runs_root) if self.runs_root is not None else RunsRoot.holding(self.run)


def parser() -> argparse.ArgumentParser:
    """Options accepted after ``--`` by ``streamlit run app/streamlit_app.py``."""
    options = argparse.ArgumentParser(prog="streamlit_app.py", allow_abbrev=False,
                                      description="retrieval search app")
    options.add_argument("--run", type=Path, help=f"run directory (default: {DEFAULT_RUN})")
    options.add_argument("--index", type=Path, help="index directory (default: <run>/index)")
    options.add_argument("--checkpoint", help="checkpoint name in <run>/checkpoints or a .pt file")
    options.add_argument("--runs-root", type=Path,
                         help="folder of runs: the app opens nothing outside it (default: the folder holding --run)")
    options.add_argument("--max-upload-pixels",
                         help=f"largest upload decoded, width × height (default: {DEFAULT_MAX_UPLOAD_PIXELS:,})")
    options.add_argument("--api", help="URL of a running `retrieval serve`: queries go there instead of to an "
                                       "index opened in this process")
    return options


def load_settings(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> AppSettings:
    """Settings from command-line options, then environment variables, then defaults; a bad pixel cap is a
    one-line ``ConfigError``."""
    environ = os.environ if environ is None else environ
    args, _ = parser().parse_known_args(list(argv))
    run = args.run or _path(environ.get(ENV_RUN)) or default_run()
    index = args.index or _path(environ.get(ENV_INDEX))
    checkpoint = args.checkpoint or environ.get(ENV_CHECKPOINT) or None
    runs_root = args.runs_root or _path(environ.get(ENV_RUNS_ROOT))
    if args.max_upload_pixels is not None:
        max_pixels = check_pixel_limit(args.max_upload_pixels, "--max-upload-pixels")
    elif environ.get(ENV_MAX_UPLOAD_PIXELS):
        max_pixels = check_pixel_limit(environ[ENV_MAX_UPLOAD_PIXELS], ENV_MAX_UPLOAD_PIXELS)
    else:
        max_pixels = DEFAULT_MAX_UPLOAD_PIXELS
    api = args.api or environ.get(ENV_API) or None
    return AppSettings(Path(run), Path(index) if index else None, checkpoint, runs_root, max_pixels,
                       check_api_url(api, "--api" if args.api else ENV_API) if api else None)


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def default_run() -> Path:
    """``runs/demo`` in the working directory, else in the project checkout."""
    if DEFAULT_RUN.is_dir() or not (PROJECT_ROOT / DEFAULT_RUN).is_dir():
        return DEFAULT_RUN
    return PROJECT_ROOT / DEFAULT_RUN


def find_indexes(run: Path) -> list[Path]:
    """Index directories of a run: ``<run>/index`` first, then any other sub-directory holding one."""
    return [index.path for index in RunDir(run).indexes()]


def find_checkpoints(run: Path) -> list[str]:
    """Checkpoint file names of a run, best.pt and last.pt first."""
    names = RunDir(run).checkpoint_names()
    return sorted(names, key=lambda name: (CHECKPOINT_PREFERENCE + (name,)).index(name))


def checkpoint_file(run: Path, checkpoint: str) -> Path:
    """A bare name is a file of ``<run>/checkpoints``; anything with a directory part is a path."""
    path = Path(checkpoint)
    return path if len(path.parts) > 1 else RunDir(run).checkpoint(checkpoint)


def matching_checkpoint(run: Path, index: Path, names: Sequence[str]) -> str | None:
    """The checkpoint among ``names`` that built ``index`` (the demo indexes with last.pt), if any."""
    wanted = IndexDir(index).model_fingerprint()
    if wanted is None:
        return None
    for name in names:
        if file_fingerprint(RunDir(run).checkpoint(name)) == wanted:
            return name
    return None


def default_checkpoint(run: Path, index: Path, names: Sequence[str]) -> str | None:
    """The checkpoint that built the index, else best.pt, else last.pt, else the first one."""
    if not names:
        return None
    return matching_checkpoint(run, index, names) or names[0]
