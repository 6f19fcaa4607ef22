"""``retrieval app``: open the Streamlit search app on a run's index (``runs/demo`` by default)."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from pipelines.common import PROJECT_ROOT
from retrieval.client import check_api_url
from retrieval.errors import ConfigError, DataError
from retrieval.imagefile import check_pixel_limit
from retrieval.rundir import IndexDir, RunDir, RunsRoot

APP_FILE = PROJECT_ROOT / "app" / "streamlit_app.py"
DEFAULT_PORT = 8501


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="retrieval app", description=__doc__)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    parser.add_argument("--index", type=Path, help="index directory (default: <run>/index)")
    parser.add_argument("--checkpoint", help="checkpoint name in <run>/checkpoints (default: the one that built "
                                             "the index, else best.pt, else last.pt)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--address", default="localhost", help="address to listen on (default: localhost)")
    parser.add_argument("--runs-root", type=Path, help="folder of runs the app may open; it opens nothing outside "
                                                       "it (default: the folder holding --run)")
    parser.add_argument("--max-upload-pixels", help="largest upload the app decodes, width × height "
                                                    "(default: 40000000)")
    parser.add_argument("--api", help="URL of a running `retrieval serve`: the app sends its queries there and "
                                      "opens no run or index itself")
    return parser.parse_args(argv)


def check_paths(args: argparse.Namespace) -> None:
    """Refuse (one line) a port out of range, a missing run, index or checkpoint, one outside ``--runs-root``
    or a bad pixel cap before starting the server."""
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: a port is a number from 1 to 65535")
    if args.api is not None:
        given = [f"--{name.replace('_', '-')}" for name in ("index", "checkpoint", "runs_root")
                 if getattr(args, name) is not None]
        if given:
            raise ConfigError(f"{given[0]}: with --api the service chooses its index and checkpoint; "
                              "give them to `retrieval serve` instead")
        check_api_url(args.api)
        if args.max_upload_pixels is not None:
            check_pixel_limit(args.max_upload_pixels, "--max-upload-pixels")
        return
    if not args.run.is_dir():
        raise DataError(f"run directory {args.run} does not exist; run `retrieval demo` first "
                        "(or pass --run DIR)")
    if args.max_upload_pixels is not None:
        check_pixel_limit(args.max_upload_pixels, "--max-upload-pixels")
    run = RunDir(args.run)
    index = IndexDir(args.index) if args.index else run.index
    if args.runs_root is not None and not args.runs_root.is_dir():
        raise DataError(f"runs root {args.runs_root} does not exist (--runs-root)")
    root = RunsRoot(args.runs_root) if args.runs_root is not None else RunsRoot.holding(args.run)
    opened = [("run", run.path), ("index", index.path)]
    if args.checkpoint:
        opened.append(("checkpoint", run.checkpoint(args.checkpoint)))
    for what, path in opened:
        if root.inside(path) is None:
            raise DataError(f"{what} {path} lies outside the runs root {root}; the app opens nothing outside it "
                            "(pass --runs-root DIR)")
    if not index.exists():
        raise DataError(f"no index in {index}; run `retrieval demo` or `retrieval index --run {args.run}` first")
    if args.checkpoint and not run.checkpoint(args.checkpoint).is_file():
        raise DataError(f"checkpoint {run.checkpoint(args.checkpoint)} does not exist")


def streamlit_command(args: argparse.Namespace) -> list[str]:
    """The ``streamlit run`` command line for these options (the app reads those after ``--``)."""
    command = [sys.executable, "-m", "streamlit", "run", str(APP_FILE),
               "--server.headless", "true", "--server.port", str(args.port),
               "--server.address", args.address, "--browser.gatherUsageStats", "false",
               "--client.toolbarMode", "minimal",  # no deploy button or developer menu
               "--", "--run", str(args.run)]
    if args.index:
        command += ["--index", str(args.index)]
    if args.checkpoint:
        command += ["--checkpoint", args.checkpoint]
    if args.runs_root:
        command += ["--runs-root", str(args.runs_root)]
    if args.max_upload_pixels is not None:
        command += ["--max-upload-pixels", str(args.max_upload_pixels)]
    if args.api:
        command += ["--api", args.api]
    return command


def stop_server(server: subprocess.Popen) -> None:
    """Terminate the server, then kill it if it lingers."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def serve(command: list[str]) -> int:
    """Run the server until it exits; SIGTERM and Ctrl-C stop it too (it never outlives this process)."""
    server = subprocess.Popen(command)
    previous = signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    try:
        return server.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_server(server)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_paths(args)
    searched = f"the search API {args.api}" if args.api else args.run
    print(f"opening the app on {searched} at http://{args.address}:{args.port} (Ctrl-C stops it)", flush=True)
    return serve(streamlit_command(args))
