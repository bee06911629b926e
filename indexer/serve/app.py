"""The HTTP API and page of `indexer serve`, over search.py's Collection (no second query path)."""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from indexer.errors import IndexerError, InputError
from indexer.jsontext import json_text
from indexer.serve.batcher import Batcher
from indexer.serve.metrics import Metrics
from indexer.serve.registry import Loaded, Registry

log = logging.getLogger(__name__)
MAX_K = 100  # results a search may ask for; beyond: 422
THUMB_SIZES = (64, 128, 256, 512)


@dataclass(frozen=True)
class ServeConfig:
    """What `indexer serve` was asked: limits and access."""

    token: str | None = None
    max_upload_bytes: int = 20 << 20
    cors_origins: tuple[str, ...] = ()
    batch_window: float = 0.003  # seconds uploads wait to be embedded together (0: alone)
    search_timeout: float = 30.0  # seconds a search may take (an upload's decoding included)


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(registry: Registry, cfg: ServeConfig, metrics: Metrics | None = None) -> Starlette:
    """The ASGI application: JSON API, metrics and the page."""
    metrics = metrics or Metrics(registry)
    api = Api(registry, cfg, metrics)
    routes = [
        Route("/healthz", api.healthz),
        Route("/readyz", api.readyz),
        Route("/metrics", api.metrics_text),
        Route("/", api.page),
        Route("/api/collections", api.collections),
        Route("/api/collections/{name}/search", api.search, methods=["POST"]),
        Route("/api/collections/{name}/items/{item_id}", api.item),
        Route("/api/collections/{name}/items/{item_id}/thumbnail", api.thumbnail),
    ]
    middleware = []
    if cfg.cors_origins:
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins),
                                     allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization"]))  # fmt: skip
    return Starlette(routes=routes, middleware=middleware)


class Api:
    """The endpoints; each request reads the collection's loaded version once."""

    def __init__(self, registry: Registry, cfg: ServeConfig, metrics: Metrics) -> None:
        self.registry, self.cfg, self.metrics = registry, cfg, metrics
        self.batcher = Batcher(cfg.batch_window, metrics.observe_batch)
        self.thumbs = Thumbnails()

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(self, request: Request) -> Response:
        versions = {c.name: c.version for c in self.registry.all()}
        return JSONResponse(versions, status_code=200 if self.registry.ready() else 503)

    async def metrics_text(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def page(self, request: Request) -> Response:
        html = resources.files("indexer.serve").joinpath("page.html").read_text("utf-8")
        return HTMLResponse(html)

    async def collections(self, request: Request) -> Response:
        return await self._answer(request, "collections", self._collections)

    async def search(self, request: Request) -> Response:
        return await self._answer(request, "search", self._search)

    async def item(self, request: Request) -> Response:
        return await self._answer(request, "item", self._item)

    async def thumbnail(self, request: Request) -> Response:
        return await self._answer(request, "thumbnail", self._thumbnail)

    async def _answer(self, request: Request, endpoint: str, handler: Any) -> Response:
        started = time.perf_counter()
        try:
            self._authorize(request)
            response: Response = await handler(request)
        except HTTPError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            response = JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)
        except InputError as exc:
            response = JSONResponse({"error": str(exc)}, status_code=422)
        except (IndexerError, OSError) as exc:  # a collection that cannot answer (damaged,
            log.error("%s: %s", endpoint, exc)  # deleted): not the client's fault
            response = JSONResponse({"error": f"the collection cannot answer: {exc}"},
                                    status_code=503)  # fmt: skip
        except Exception as exc:  # a bug: still JSON, logged with its traceback, counted
            log.exception("%s failed", endpoint)
            response = JSONResponse({"error": f"internal error ({type(exc).__name__})"},
                                    status_code=500)  # fmt: skip
        self.metrics.observe(endpoint, response.status_code, time.perf_counter() - started)
        return response

    def _authorize(self, request: Request) -> None:
        if self.cfg.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        same = hmac.compare_digest(given.strip().encode(), self.cfg.token.encode())
        if scheme.lower() != "bearer" or not same:
            raise HTTPError(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")

    def _loaded(self, request: Request) -> Loaded:
        name = request.path_params["name"]
        try:
            return self.registry.get(name)
        except KeyError:
            raise HTTPError(404, f"no collection named {name!r}") from None

    async def _collections(self, request: Request) -> Response:
        return JSONResponse([c.describe() for c in self.registry.all()])

    async def _search(self, request: Request) -> Response:
        loaded = self._loaded(request)
        body = await self._body(request)
        query = await self._query(request, body)
        k = _int_param(query.get("k", 10), "k", 1, MAX_K)
        threshold = _float_param(query.get("threshold"))
        where = query.get("where") or None
        if isinstance(where, str):
            where = [where]
        if where is not None and not (
            isinstance(where, list) and all(isinstance(w, str) for w in where)
        ):
            raise HTTPError(422, "where must be a condition (a string) or a list of them")
        work = run_in_threadpool(self._run_search, loaded, query, k, threshold, where)
        try:
            results = await asyncio.wait_for(work, self.cfg.search_timeout)
        except TimeoutError:  # the thread ends by itself (decoding is bounded by the pixel limit)
            raise HTTPError(422, f"the search took over {self.cfg.search_timeout:g} s (an image "
                            "too slow to decode?): send a smaller image") from None  # fmt: skip
        hits = [h.to_dict() for h in results[0].hits]
        name = query.get("filename") or "upload" if "image" in query else results[0].name
        doc = {"collection": loaded.name, "version": loaded.version, "query": name,
               "results": hits}  # fmt: skip
        return Response(_json(doc), media_type="application/json")

    def _run_search(self, loaded: Loaded, query: dict[str, Any], k: int,
                    threshold: float | None, where: list[str] | None) -> list[Any]:  # fmt: skip
        c = loaded.collection
        if isinstance(query.get("image"), bytes):  # an upload (multipart only): decoded here,
            with self.batcher.request():
                vectors = self.batcher.embed(c, c.pixels_of([query["image"]]))
            return c.query_vectors(vectors, ["upload"], k, threshold, where)
        key = query.get("key")
        if key is None and "id" in query:
            row = c.row_of(_int_param(query["id"], "id", 0, 2**63 - 1))
            if row is None:
                raise HTTPError(404, f"collection {loaded.name} has no item with id {query['id']}")
            key = row["key"]
        if not isinstance(key, str):
            raise HTTPError(
                422, 'search needs a multipart field \'image\', or JSON {"key"} or {"id"}'
            )
        try:
            return c.query(ids=[key], k=k, threshold=threshold, where=where)
        except InputError as exc:
            if "holds no item" in str(exc):
                raise HTTPError(404, str(exc)) from exc
            raise

    async def _body(self, request: Request) -> bytes:
        """The request body, refused past the upload limit (413), whether or not the client
        said its length."""
        limit = self.cfg.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, f"the upload is over the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"the upload is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _query(self, request: Request, body: bytes) -> dict[str, Any]:
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            request._body = body  # parsed from the bytes already read (and bounded)
            try:
                form = await request.form(max_files=1, max_fields=8, max_part_size=len(body) + 1)
            except Exception as exc:  # Starlette's multipart refusals, as JSON 400s
                raise HTTPError(400, f"the multipart body cannot be read: {exc}") from None
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise HTTPError(422, "the multipart body has no file field 'image'")
            data = await upload.read()
            if not data:
                raise HTTPError(422, "the uploaded image is empty")
            fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            where = form.getlist("where")
            return {**fields, "image": data, "filename": upload.filename,
                    "where": [w for w in where if isinstance(w, str)]}  # fmt: skip
        try:
            doc = json.loads(body or b"{}")
        except (ValueError, RecursionError):
            raise HTTPError(400, "the body is neither JSON nor a multipart upload") from None
        if not isinstance(doc, dict):
            raise HTTPError(422, 'the JSON body must be an object: {"key": ...} or {"id": ...}')
        if "image" in doc:  # never a path or URL from the client: images come as uploads
            raise HTTPError(422, 'send an image as a multipart upload (field "image"), not in JSON')
        return doc

    async def _item(self, request: Request) -> Response:
        loaded = self._loaded(request)
        item_id = _int_param(request.path_params["item_id"], "id", 0, 2**63 - 1)
        row = await run_in_threadpool(loaded.collection.row_of, item_id)
        if row is None:
            raise HTTPError(404, f"collection {loaded.name} has no item with id {item_id}")
        return Response(_json(row), media_type="application/json")

    async def _thumbnail(self, request: Request) -> Response:
        loaded = self._loaded(request)
        item_id = _int_param(request.path_params["item_id"], "id", 0, 2**63 - 1)
        size = _int_param(request.query_params.get("size", 256), "size", 16, 1024)
        data = await run_in_threadpool(self.thumbs.get, loaded, item_id, size)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=3600"})  # fmt: skip


class Thumbnails:
    """JPEG thumbnails of stored items, read where the build read them, cached per version."""

    def __init__(self, capacity: int = 2048) -> None:
        self._cache: dict[tuple[str, str, int, int], bytes] = {}
        self._capacity = capacity
        self._readers: dict[tuple[str, str], Any] = {}

    def get(self, loaded: Loaded, item_id: int, size: int) -> bytes:
        key = (loaded.name, loaded.version, item_id, size)
        if key in self._cache:
            return self._cache[key]
        row = loaded.collection.row_of(item_id)
        if row is None:
            raise HTTPError(404, f"collection {loaded.name} has no item with id {item_id}")
        data = self._reader(loaded).read(row["key"])
        if data is None:
            raise HTTPError(404, f"item {item_id} can no longer be read from its source")
        from PIL import Image

        from indexer.images import decode_image

        max_pixels = int(loaded.collection.manifest["decode"]["max_pixels"])
        try:
            image = decode_image(data, max_pixels=max_pixels).image.convert("RGB")
        except Exception as exc:  # a source file changed into something undecodable
            raise HTTPError(404, f"item {item_id} cannot be decoded now: {exc}") from exc
        image.thumbnail((size, size), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        if len(self._cache) >= self._capacity:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = out.getvalue()
        return self._cache[key]

    def _reader(self, loaded: Loaded) -> Any:
        from indexer.items import ItemReader

        key = (loaded.name, loaded.version)
        if key not in self._readers:
            self._readers = {k: v for k, v in self._readers.items() if k[0] != loaded.name}
            self._readers[key] = ItemReader(loaded.collection.manifest)
        return self._readers[key]


def _int_param(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = int(value)
        if isinstance(value, float | bool) or str(number) != str(value).strip():
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise HTTPError(422, f"{name} must be a whole number, not {_short(value)}") from None
    if not low <= number <= high:
        raise HTTPError(422, f"{name} must be between {low} and {high}, not {number}")
    return number


def _float_param(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise HTTPError(422, f"threshold must be a number, not {_short(value)}") from None
    if not math.isfinite(number):
        raise HTTPError(422, f"threshold must be a finite number, not {_short(value)}")
    return number


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json(doc: Any) -> bytes:
    return json_text(doc).encode("utf-8")
