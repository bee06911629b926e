"""The HTTP API and page of `indexer serve`, over search.py's Collection (no second query path)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from indexer.collection.layout import weights_kind
from indexer.errors import IndexerError, InputError
from indexer.jsontext import json_text
from indexer.query.filters import MAX_CONDITIONS, parse_where
from indexer.serve.batcher import Batcher
from indexer.serve.budget import BudgetTimeout, PixelBudget, header_pixels
from indexer.serve.listing import DEFAULT_LIMIT, MAX_LIMIT, item_page, text_column
from indexer.serve.metrics import Metrics
from indexer.serve.registry import Loaded, Registry

log = logging.getLogger(__name__)
MAX_K = 100  # results a search may ask for; beyond: 422
MAX_JSON_BYTES = 64 << 10  # a JSON search body (a key, an id, filters); beyond: 413
DISCONNECTED = 499  # a client that left before its answer (nginx's code): not a 5xx
T = TypeVar("T")


@dataclass(frozen=True)
class ServeConfig:
    """What `indexer serve` was asked: limits and access."""

    token: str | None = None
    max_upload_bytes: int = 20 << 20
    cors_origins: tuple[str, ...] = ()
    batch_window: float = 0.003  # seconds uploads wait to be embedded together (0: alone)
    search_timeout: float = 30.0  # seconds a search may take (an upload's decoding included)
    read_timeout: float = 30.0  # seconds a request's body may take to arrive; then 408
    max_decode_pixels: int = 100_000_000  # pixels decoded at once, all requests together
    allowed_hosts: tuple[str, ...] = ()  # Host names answered without a token, besides
    # localhost and IP addresses (a DNS-rebinding page's Host is its own name)
    max_body_bytes: int = 256 << 20  # request bodies held at once, all requests; more: 503
    cpu_slots: int = max(4, 2 * (os.cpu_count() or 1))  # decode, embed, filter, search at once
    metrics_token: str | None = None  # also opens /readyz and /metrics (a probe's, a scraper's)


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
        Route("/api/collections/{name}/items", api.items),
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
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={404: _json_error, 405: _json_error})  # fmt: skip


async def _json_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 (no such route, wrong method) as JSON errors too."""
    status = int(getattr(exc, "status_code", 500))
    return JSONResponse({"error": str(getattr(exc, "detail", "")) or "not found"},
                        status_code=status, headers=getattr(exc, "headers", None))  # fmt: skip


class Api:
    """The endpoints; each request reads the collection's loaded version once."""

    def __init__(self, registry: Registry, cfg: ServeConfig, metrics: Metrics) -> None:
        self.registry, self.cfg, self.metrics = registry, cfg, metrics
        self.batcher = Batcher(cfg.batch_window, metrics.observe_batch)
        self.budget = PixelBudget(cfg.max_decode_pixels)
        self.thumbs = Thumbnails(self.budget)
        self._slots: anyio.CapacityLimiter | None = None  # made in the event loop
        self._held_bytes = 0  # bodies being read or answered (max_body_bytes)
        self._texts: dict[tuple[str, str], str | None] = {}  # (name, identity): text column

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(self, request: Request) -> Response:
        return await self._answer(request, "readyz", self._readyz, probe=True)

    async def metrics_text(self, request: Request) -> Response:
        return await self._answer(request, "metrics", self._metrics, probe=True)

    async def _readyz(self, request: Request) -> Response:
        versions = {c.name: c.version for c in self.registry.all()}
        return JSONResponse(versions, status_code=200 if self.registry.ready() else 503)

    async def _metrics(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def page(self, request: Request) -> Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        html = resources.files("indexer.serve").joinpath("page.html").read_text("utf-8")
        return HTMLResponse(html)

    async def collections(self, request: Request) -> Response:
        return await self._answer(request, "collections", self._collections)

    async def search(self, request: Request) -> Response:
        return await self._answer(request, "search", self._search)

    async def items(self, request: Request) -> Response:
        return await self._answer(request, "items", self._items)

    async def item(self, request: Request) -> Response:
        return await self._answer(request, "item", self._item)

    async def thumbnail(self, request: Request) -> Response:
        return await self._answer(request, "thumbnail", self._thumbnail)

    async def _answer(
        self, request: Request, endpoint: str, handler: Any, probe: bool = False
    ) -> Response:
        started = time.perf_counter()
        try:
            self._authorize(request, probe)
            response: Response = await handler(request)
        except HTTPError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            if exc.status == 503:
                headers = {"Retry-After": "1"}
            response = JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)
        except BudgetTimeout as exc:  # busy with other large images: the client may retry
            response = JSONResponse({"error": str(exc)}, status_code=503,
                                    headers={"Retry-After": "1"})  # fmt: skip
        except ClientDisconnect:  # the client's choice, not a fault: one line, counted apart
            log.info("%s: the client disconnected before its answer", endpoint)
            response = Response(status_code=DISCONNECTED)
        except InputError as exc:
            response = JSONResponse({"error": self._public(str(exc))}, status_code=422)
        except (IndexerError, OSError) as exc:  # a collection that cannot answer (damaged,
            log.error("%s: %s", endpoint, exc)  # deleted): not the client's fault
            message = f"the collection cannot answer: {self._public(str(exc))}"
            response = JSONResponse({"error": message}, status_code=503)
        except Exception as exc:  # a bug: still JSON, logged with its traceback, counted
            log.exception("%s failed", endpoint)
            response = JSONResponse({"error": f"internal error ({type(exc).__name__})"},
                                    status_code=500)  # fmt: skip
        finally:
            self._held_bytes -= getattr(request.state, "held_bytes", 0)
        self.metrics.observe(endpoint, response.status_code, time.perf_counter() - started)
        return response

    def _authorize(self, request: Request, probe: bool = False) -> None:
        """A tokenless service answers its own host names only (DNS rebinding); with a
        token, every request needs it (a probe's: the token or --metrics-token)."""
        if self.cfg.token is None:
            if not host_allowed(request.headers.get("host"), self.cfg.allowed_hosts):
                raise HTTPError(403, _HOST_REFUSED)
            return
        tokens = [self.cfg.token]
        if probe and self.cfg.metrics_token is not None:
            tokens.append(self.cfg.metrics_token)
        if not any([_bearer_is(request, t) for t in tokens]):  # a list: both compared
            raise HTTPError(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")

    def _public(self, message: str) -> str:
        """An error for a client: a collection's folder named by the collection's name (the
        log keeps the path; a client never learns where collections live on disk)."""
        shown = {}
        for name, root in self.registry.roots.items():
            for path in {str(root.absolute()), str(root.resolve()), str(root)}:
                if "/" in path:  # a bare relative name ('photos.idx') reveals nothing
                    shown[path] = f"collection {name!r}"
        for path in sorted(shown, key=len, reverse=True):  # /a/photos2 before /a/photos
            message = message.replace(path, shown[path])
        return message

    def _refusal(self, request: Request) -> Response | None:
        """The answer to a request whose Host a tokenless service does not serve, else None."""
        if self.cfg.token is None and not host_allowed(request.headers.get("host"),
                                                       self.cfg.allowed_hosts):  # fmt: skip
            return JSONResponse({"error": _HOST_REFUSED}, status_code=403)
        return None

    async def _offload(self, work: Callable[..., T], *args: Any) -> T:
        """CPU work (decode, embed, filter, search, thumbnails) in a thread, at most
        cpu_slots at once; past --search-timeout the request is answered and its slot freed
        (the thread finishes alone: its decoding holds the pixel budget until then)."""
        if self._slots is None:
            self._slots = anyio.CapacityLimiter(self.cfg.cpu_slots)
        try:
            with anyio.fail_after(self.cfg.search_timeout):
                return await anyio.to_thread.run_sync(work, *args, abandon_on_cancel=True,
                                                      limiter=self._slots)  # fmt: skip
        except TimeoutError:
            raise HTTPError(503, f"the request took over {self.cfg.search_timeout:g} s (a busy "
                            "server, or an image too slow to decode): try again, or send a "
                            "smaller image") from None  # fmt: skip

    def _loaded(self, request: Request) -> Loaded:
        name = request.path_params["name"]
        try:
            return self.registry.get(name)
        except KeyError:
            raise HTTPError(404, f"no collection named {name!r}") from None

    async def _collections(self, request: Request) -> Response:
        return JSONResponse([self._describe(c) for c in self.registry.all()])

    def _describe(self, loaded: Loaded) -> dict[str, Any]:
        """A collection as listed: the registry's description, and what a page shows with it
        (the weights' kind, the text column under pictures, a version being loaded)."""
        return {
            **loaded.describe(),
            "weights": weights_kind(loaded.collection.manifest),
            "text_column": self._text_column(loaded),
            "loading": self.registry.pending(loaded.name),
        }

    def _text_column(self, loaded: Loaded) -> str | None:
        """The version's text column, read from a Parquet footer once per version."""
        key = (loaded.name, loaded.identity)
        if key not in self._texts:
            try:
                column = text_column(loaded.collection)
            except (OSError, ValueError):  # deleted or damaged: still listed (searches 503)
                return None
            self._texts = {k: v for k, v in self._texts.items() if k[0] != loaded.name}
            self._texts[key] = column
        return self._texts[key]

    async def _items(self, request: Request) -> Response:
        loaded = self._loaded(request)
        params = request.query_params
        offset = _int_param(params.get("offset", 0), "offset", 0, 2**63 - 1)
        limit = _int_param(params.get("limit", DEFAULT_LIMIT), "limit", 1, MAX_LIMIT)
        where = params.getlist("where") or None
        parse_where(where)  # a bad or long filter: 422 on the loop (linear, bounded)
        total, rows = await self._offload(item_page, loaded.collection, offset, limit, where)
        doc = {"collection": loaded.name, "version": loaded.version, "total": total,
               "offset": offset, "limit": limit, "items": rows}  # fmt: skip
        return Response(_json(doc), media_type="application/json")

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
        parse_where(where)  # a bad or long filter: 422 on the loop (linear, bounded), no thread
        deadline = time.monotonic() + self.cfg.search_timeout
        results = await self._offload(self._run_search, loaded, query, k, threshold, where,
                                      deadline)  # fmt: skip
        hits = [h.to_dict() for h in results[0].hits]
        name = query.get("filename") or "upload" if "image" in query else results[0].name
        doc = {"collection": loaded.name, "version": loaded.version, "query": name,
               "results": hits}  # fmt: skip
        return Response(_json(doc), media_type="application/json")

    def _run_search(self, loaded: Loaded, query: dict[str, Any], k: int,
                    threshold: float | None, where: list[str] | None,
                    deadline: float) -> list[Any]:  # fmt: skip
        c = loaded.collection
        if isinstance(query.get("image"), bytes):  # an upload (multipart only): decoded here,
            data = query["image"]
            with self.batcher.request():
                with self.budget.reserve(header_pixels(data), deadline):
                    pixels = c.pixels_of([data])
                vectors = self.batcher.embed(c, pixels)
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
            if "holds no item" in str(exc):  # its message names the folder: not a client's
                raise HTTPError(404, f"no item with key {_short(key)} in collection "
                                f"{loaded.name!r}") from exc  # fmt: skip
            raise

    async def _body(self, request: Request) -> bytes:
        """The request body, refused past its limit (413: an upload's, or a JSON search's),
        whether or not the client said its length, and past --read-timeout (408)."""
        kind = _media_type(request)
        if kind not in ("multipart/form-data", "application/json"):
            raise HTTPError(415, "send JSON (Content-Type: application/json) or an upload "
                            "(multipart/form-data)")  # fmt: skip
        limit = self.cfg.max_upload_bytes if kind == "multipart/form-data" else MAX_JSON_BYTES
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, f"the body is over the limit of {limit} bytes")
        chunks, size = [], 0
        request.state.held_bytes = 0  # given back when the request is answered (_answer)
        try:
            async with _time_limit(self.cfg.read_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise HTTPError(413, f"the body is over the limit of {limit} bytes")
                    self._hold(request, len(chunk))
                    chunks.append(chunk)
        except TimeoutError:
            raise HTTPError(408, f"the body took over {self.cfg.read_timeout:g} s to arrive: "
                            "send it at once") from None  # fmt: skip
        return b"".join(chunks)

    def _hold(self, request: Request, size: int) -> None:
        """Count a body's bytes against max_body_bytes: slow or waiting requests cannot hold
        more memory than that, all together (503 past it)."""
        if self._held_bytes + size > self.cfg.max_body_bytes:
            raise HTTPError(503, "the server holds too many request bodies: try again shortly")
        self._held_bytes += size
        request.state.held_bytes += size

    async def _query(self, request: Request, body: bytes) -> dict[str, Any]:
        if _media_type(request) == "multipart/form-data":  # parsed off the event loop
            return await self._offload(_form_fields, request.scope, body)
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
        row = await self._offload(loaded.collection.row_of, item_id)
        if row is None:
            raise HTTPError(404, f"collection {loaded.name} has no item with id {item_id}")
        return Response(_json(row), media_type="application/json")

    async def _thumbnail(self, request: Request) -> Response:
        loaded = self._loaded(request)
        item_id = _int_param(request.path_params["item_id"], "id", 0, 2**63 - 1)
        size = _int_param(request.query_params.get("size", 256), "size", 16, 1024)
        # private (a shared cache never keeps an authorised picture); revalidated by its
        # version's identity, so a rebuilt collection's pictures replace the old at once
        tag = f'"{loaded.identity}-{item_id}-{size}"'
        headers = {"Cache-Control": "private, no-cache", "ETag": tag}
        if request.headers.get("if-none-match") == tag:
            return Response(status_code=304, headers=headers)
        deadline = time.monotonic() + self.cfg.search_timeout
        data = await self._offload(self.thumbs.get, loaded, item_id, size, deadline)
        return Response(data, media_type="image/jpeg", headers=headers)


class Thumbnails:
    """JPEG thumbnails of stored items, read where the build read them, cached per version
    (its identity: a collection built again from scratch has a v000001 of its own)."""

    def __init__(self, budget: PixelBudget, capacity_bytes: int = 64 << 20) -> None:
        self._cache: dict[tuple[str, str, int, int], bytes] = {}
        self._capacity = capacity_bytes  # JPEG bytes kept, all thumbnails together
        self._bytes = 0
        self._readers: dict[tuple[str, str], Any] = {}
        self._budget = budget

    def get(self, loaded: Loaded, item_id: int, size: int, deadline: float) -> bytes:
        key = (loaded.name, loaded.identity, item_id, size)
        if key in self._cache:
            return self._cache[key]
        row = loaded.collection.row_of(item_id)
        if row is None:
            raise HTTPError(404, f"collection {loaded.name} has no item with id {item_id}")
        data = self._reader(loaded).read(row["key"])
        if data is None:
            raise HTTPError(404, f"item {item_id} can no longer be read from its source")
        if row.get("content_hash") and hashlib.sha256(data).hexdigest() != row["content_hash"]:
            raise HTTPError(404, f"item {item_id} changed in its source since it was indexed: "
                            "build the collection again to show it")  # fmt: skip
        from PIL import Image

        from indexer.decode.images import decode_image

        max_pixels = int(loaded.collection.manifest["decode"]["max_pixels"])
        with self._budget.reserve(header_pixels(data), deadline):
            try:
                image = decode_image(data, max_pixels=max_pixels).image.convert("RGB")
            except Exception as exc:  # a source file changed into something undecodable
                raise HTTPError(404, f"item {item_id} cannot be decoded now: {exc}") from exc
            image.thumbnail((size, size), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        jpeg = out.getvalue()
        while self._cache and self._bytes + len(jpeg) > self._capacity:
            self._bytes -= len(self._cache.pop(next(iter(self._cache))))  # the oldest first
        self._cache[key] = jpeg
        self._bytes += len(jpeg)
        return jpeg

    def _reader(self, loaded: Loaded) -> Any:
        from indexer.query.stored_items import ItemReader

        key = (loaded.name, loaded.identity)
        if key not in self._readers:
            self._readers = {k: v for k, v in self._readers.items() if k[0] != loaded.name}
            collection = loaded.collection
            self._readers[key] = ItemReader(collection.manifest, collection.storage_options)
        return self._readers[key]


_HOST_REFUSED = (
    "this service answers only requests for localhost or its IP address: start "
    "it with --allowed-host NAME (or --token) to serve that name"
)


def host_allowed(host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a tokenless service answers a request for this Host: localhost, an IP
    address (no rebinding: a page's Host is its own name), or a name given with
    --allowed-host. No Host at all (HTTP/1.0) is no browser's."""
    if host is None:
        return True
    name, port = _host_and_port(host.strip().lower())
    if name is None or not (port == "" or port.isdigit()):
        return False
    name = name.rstrip(".")
    if name == "localhost" or name in {h.lower().rstrip(".") for h in allowed}:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _host_and_port(host: str) -> tuple[str | None, str]:
    """'name:port' or '[v6]:port' split; None for anything else ('a:b:c', 'x@y', '[::1]z')."""
    if host.startswith("["):
        inside, close, rest = host[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            return None, ""
        return inside, rest[1:]
    name, _, port = host.partition(":")
    if ":" in port or any(ch in name for ch in "@/#?\\ "):
        return None, ""
    return name, port


def _time_limit(seconds: float) -> Any:
    """TimeoutError past `seconds`: asyncio's own (Python 3.11; a third of the cost of
    anyio's scope, which a flood of small requests pays on the event loop), else anyio's."""
    if sys.version_info >= (3, 11):
        return asyncio.timeout(seconds)
    return anyio.fail_after(seconds)


def _form_fields(scope: dict[str, Any], body: bytes) -> dict[str, Any]:
    """A multipart search's fields and image, parsed in a worker thread (its own event loop:
    a 20 MB body is ~0.1 s of parsing, which the server's loop must not wait for)."""

    async def parse() -> dict[str, Any]:
        request = Request({**scope, "type": "http"})
        request._body = body  # parsed from the bytes already read (and bounded)
        try:
            form = await request.form(max_files=1, max_fields=8 + MAX_CONDITIONS,
                                      max_part_size=len(body) + 1)  # fmt: skip
        except Exception as exc:  # Starlette's multipart refusals, as JSON 400s
            raise HTTPError(400, f"the multipart body cannot be read: {exc}") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPError(422, "the multipart body has no file field 'image'")
        data = await upload.read()
        await form.close()
        if not data:
            raise HTTPError(422, "the uploaded image is empty")
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        where = [w for w in form.getlist("where") if isinstance(w, str)]
        return {**fields, "image": data, "filename": upload.filename, "where": where}

    return asyncio.run(parse())


def _bearer_is(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
    # headers arrive as latin-1 text: back to the bytes the client sent (UTF-8 for a token
    # like 'pässwörd'), compared with the token's UTF-8 bytes
    same = hmac.compare_digest(given.strip().encode("latin-1"), token.encode("utf-8"))
    return scheme.lower() == "bearer" and same


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


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
