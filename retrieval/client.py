"""A client of ``retrieval serve``: the same queries as :class:`retrieval.search.Searcher`, over HTTP.

    client = SearchClient("http://localhost:8000")
    hits = client.text_to_image("a red bus", 5)            # ImageHit list, thumbnails fetched by key

Every failure (the service is down, slow, answers an error or something that is not its JSON) is one
line: :class:`ServiceError`, a ``RetrievalError`` that names the URL.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from retrieval.errors import RetrievalError
from retrieval.search import ImageHit, ImageToText, TextHit

DEFAULT_TIMEOUT = 30.0  # seconds for one request: an image query on a cold CPU service can take a few


class ServiceError(RetrievalError):
    """The search service could not answer (one line)."""


def check_api_url(url: str, where: str = "--api") -> str:
    """``url`` without a trailing slash, or a one-line ConfigError-like ServiceError when it is no http(s) URL."""
    parts = urlsplit(str(url).strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ServiceError(f"{where} {url!r}: give the search API's address, e.g. http://localhost:8000")
    return str(url).strip().rstrip("/")


class SearchClient:
    """Queries one running search API; ``info`` (model, index, similarities) is read once, at start."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT, transport: httpx.BaseTransport | None = None):
        self.url = check_api_url(url)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport)
        self.info = self._call("GET", "/info")
        similarity = self.info.get("similarity", {})
        self.image_similarity = similarity.get("images")
        self.caption_similarity = similarity.get("captions")
        self.num_images = int(self.info.get("index", {}).get("images", {}).get("count", 0))

    def close(self) -> None:
        self._http.close()

    # -- queries -----------------------------------------------------------------------------------
    def text_to_image(self, query: str, k: int = 5) -> list[ImageHit]:
        """Top-k images for a caption-like query or word arithmetic."""
        return self._images(self._call("POST", "/search/text", json={"query": query, "k": k}))

    def image_to_text(self, data: bytes, name: str, k: int = 5) -> ImageToText:
        """Nearest captions and words of an image (its file bytes)."""
        found = self._call("POST", "/search/image-to-text", files={"image": (name, data)}, data={"k": str(k)})
        return ImageToText([_text_hit(hit) for hit in found["captions"]], [_text_hit(hit) for hit in found["words"]])

    def image_to_image(self, data: bytes, name: str, k: int = 5, text: str | None = None) -> list[ImageHit]:
        """Nearest images of an image, moved by words when ``text`` is given (``"+ snow - grass"``)."""
        fields = {"k": str(k), **({"text": text} if text else {})}
        return self._images(self._call("POST", "/search/image-to-image", files={"image": (name, data)},
                                       data=fields))

    def thumbnail(self, key: str) -> bytes | None:
        """The JPEG thumbnail of image ``key``; None when the service has none."""
        try:
            response = self._http.get(f"/thumbnail/{quote(key, safe='')}")
        except httpx.HTTPError as error:
            raise self._unreachable(error) from None
        return response.content if response.status_code == 200 else None

    # -- plumbing ------------------------------------------------------------------------------------
    def _images(self, answer: dict[str, Any]) -> list[ImageHit]:
        return [ImageHit(hit["key"], float(hit["score"]), list(hit.get("captions", [])), self.thumbnail(hit["key"]),
                         hit.get("similarity")) for hit in answer["images"]]

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise self._unreachable(error) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200:
            message = body.get("error") if isinstance(body, dict) else None
            raise ServiceError(f"{self.url}{path}: {message or f'HTTP {response.status_code}'}")
        if not isinstance(body, dict):
            raise ServiceError(f"{self.url}{path}: the answer is not the search API's JSON")
        return body

    def _unreachable(self, error: httpx.HTTPError) -> ServiceError:
        reason = "timed out" if isinstance(error, httpx.TimeoutException) else "cannot connect"
        return ServiceError(f"{self.url}: {reason} ({type(error).__name__}); is `retrieval serve` running there?")


def _text_hit(hit: dict[str, Any]) -> TextHit:
    return TextHit(hit["text"], float(hit["score"]), hit.get("similarity"))
