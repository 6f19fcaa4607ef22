"""Temporary (replaced by the logs module)."""

from tqdm.auto import tqdm


def write_line(text: str, enabled: bool = True) -> None:
    if enabled:
        tqdm.write(text)
