"""`spoold api`: the OpenAI Files and Batches API (and the model list) over the spool, on FastAPI.

The official `openai` SDK works against it unchanged: objects, list pages
and errors are shaped as the OpenAI API returns them (`FileObject`,
`FileDeleted`, `{"error": {message, type, param, code}}` with the status
codes the SDK maps to its exceptions). The server reads and writes the
spool only (batches.py); the daemon stays the one thing that runs jobs. Every key is a
tenant (apikeys.py): another tenant's file is 404, not 403, so ids cannot
be probed. Nothing here logs a key or a line of a file.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from openai.types import FileDeleted, Model
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from .apibatch import ApiBatch
from .apikeys import LOCAL, ApiKeys, Tenant
from .batches import BatchStore, CannotCancel, DropJob, ListedBatch, window_seconds
from .config import Config, retention_seconds
from .jobrecord import check_metadata
from .retention import Sweeper, expires_after_seconds
from .spool import Spool
from .validation import SUPPORTED_URLS
from .webhooks import record_withdrawn
from .filestore import PURPOSES, FileStore, StoredFile, UploadTooLarge
from .multipart import FormError, UploadForm

log = logging.getLogger(__name__)

T = TypeVar("T")

#: OpenAI's page size bounds for `GET /v1/files` and `GET /v1/batches`.
MAX_FILES_PAGE = 10_000
MAX_BATCHES_PAGE = 100


class BatchCreate(BaseModel):
    """The body of `POST /v1/batches`, as the SDK sends it."""

    model_config = ConfigDict(extra="forbid")  # a field spoold does not know is refused, not ignored

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None = None
    output_expires_after: dict[str, Any] | None = None


class ApiError(Exception):
    """An error answered in OpenAI's shape; `status` is the HTTP status the SDK maps to an exception."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        """The error as the body OpenAI sends."""
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


class RequestIds:
    """Every response carries `x-request-id` (`req_` and 32 hex digits, as OpenAI's): the `openai` SDK shows
    it as a result's `_request_id` and an error's `request_id`, and a failed request's log line names it, so
    "request req_... failed" in a user's report finds its traceback in the server's log.

    Plain ASGI middleware (a `BaseHTTPMiddleware` would buffer every download through itself).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = f"req_{secrets.token_hex(16)}"
        scope.setdefault("state", {})["request_id"] = request_id  # request.state.request_id, for the handlers

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


def create_app(config: Config, keys: ApiKeys | None) -> FastAPI:
    """The API over `config`'s spool; `keys` None means one tenant, `local` (loopback only: see `serve`)."""
    app = FastAPI(title="spoold", summary="The OpenAI Files and Batches API over a spoold spool",
                  docs_url=None, redoc_url=None, redirect_slashes=False)
    app.state.keys = keys
    files = FileStore(config.spool.root, config.spool.file_mode,
                      retention=retention_seconds(config.api.file_retention))
    files.ensure_dir()
    batches = BatchStore(Spool(config.spool), files,
                         record_withdrawn(config.spool.root, config.webhooks, config.spool.file_mode))
    upload_limit = min(config.api.max_upload_bytes, config.limits.max_file_bytes)
    app.state.sweeper = Sweeper(files, batches)  # run by `serve` (apiserver.py) every SWEEP_EVERY_SECONDS
    app.add_middleware(RequestIds)
    _add_error_handlers(app)

    def tenant(request: Request) -> Tenant:
        """The caller, from `Authorization: Bearer KEY`; 401 without a key the API knows."""
        if app.state.keys is None:
            return Tenant(LOCAL, admin=True)
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        found = app.state.keys.tenant(presented.strip()) if scheme.lower() == "bearer" else None
        if found is None:
            message = "Incorrect API key provided." if presented else "You didn't provide an API key."
            raise ApiError(401, message, code="invalid_api_key")
        return found

    def owned_file(file_id: str, who: Tenant) -> StoredFile:
        stored = files.get(file_id, who.name)
        if stored is None:
            raise ApiError(404, f"No such File object: {_shown_id(file_id)}", param="id")
        return stored

    @app.post("/v1/files")
    async def create_file(request: Request, who: Tenant = Depends(tenant)) -> dict[str, Any]:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > upload_limit + 64 * 1024:
            raise ApiError(413, f"The file is larger than this server's {upload_limit}-byte limit.",
                           param="file")
        try:
            form = UploadForm(request)
            with files.new(who.name, upload_limit) as upload:
                async for chunk in form.file_chunks():
                    upload.write(chunk)
                if form.filename is None:
                    raise ApiError(400, "Send the file as the multipart field 'file'.", param="file")
                if not form.file_complete:
                    raise ApiError(400, "The upload ended before the end of the file part.", param="file")
                if form.fields.get("purpose") not in PURPOSES:
                    raise ApiError(400, f"'purpose' must be one of {list(PURPOSES)}: spoold serves batches.",
                                   param="purpose")
                stored = await upload.commit(form.filename, form.fields["purpose"], _upload_expiry(form.fields))
        except UploadTooLarge as e:
            raise ApiError(413, f"{str(e).capitalize()}.", param="file") from None
        except FormError as e:
            raise ApiError(400, str(e), param=e.param) from None
        except OSError as e:
            raise _unavailable("store the file", who, e) from None
        log.info("file %s uploaded by %s: %d bytes", stored.id, who.name, stored.bytes)
        return _shown(stored.file_object())

    @app.get("/v1/files")
    async def list_files(purpose: str | None = None, limit: int = MAX_FILES_PAGE, after: str | None = None,
                         order: str = "desc", who: Tenant = Depends(tenant)) -> dict[str, Any]:
        if order not in ("asc", "desc"):
            raise ApiError(400, "'order' must be 'asc' or 'desc'.", param="order")
        if not 1 <= limit <= MAX_FILES_PAGE:
            raise ApiError(400, f"'limit' must be between 1 and {MAX_FILES_PAGE}.", param="limit")
        def page() -> dict[str, Any]:
            found = files.index(who.name, purpose)
            if order == "asc":
                found.reverse()
            listed, more = page_of(found, after, limit, ahead_of(files.gone(after or ""), who.name, order))
            shown = [stored for stored in map(files.now, listed) if stored is not None]
            return list_object([_shown(f.file_object()) for f in shown], more)
        return await asyncio.to_thread(page)

    @app.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str, who: Tenant = Depends(tenant)) -> dict[str, Any]:
        return _shown(owned_file(file_id, who).file_object())

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, who: Tenant = Depends(tenant)) -> FileResponse:
        stored = owned_file(file_id, who)
        return FileResponse(files.content_path(stored), media_type="application/octet-stream",
                            filename=stored.filename or None)

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, who: Tenant = Depends(tenant)) -> dict[str, Any]:
        stored = owned_file(file_id, who)
        await asyncio.to_thread(files.delete, stored)
        log.info("file %s deleted by %s", stored.id, who.name)
        return _shown(FileDeleted(id=stored.id, object="file", deleted=True))

    @app.post("/v1/batches")
    async def create_batch(body: BatchCreate, who: Tenant = Depends(tenant)) -> dict[str, Any]:
        source = files.get(body.input_file_id, who.name)
        if source is None:
            raise ApiError(404, f"No such File object: {_shown_id(body.input_file_id)}", param="input_file_id")
        if source.purpose != "batch":  # a batch's results: OpenAI refuses them as input with a 400 too
            raise ApiError(400, f"File {source.id} has purpose {source.purpose!r}; a batch's input must be a "
                                "file uploaded with purpose 'batch'.", param="input_file_id")
        if body.endpoint not in SUPPORTED_URLS:
            raise ApiError(400, f"'endpoint' must be one of {list(SUPPORTED_URLS)}.", param="endpoint")
        _checked("completion_window", lambda: window_seconds(body.completion_window))
        metadata = _checked("metadata", lambda: check_metadata(body.metadata)) if body.metadata is not None else None
        keep = body.output_expires_after
        if keep is not None:
            keep = _checked("output_expires_after", lambda: expires_after_seconds(keep, "output_expires_after"))
        try:
            batch = await asyncio.to_thread(batches.create, who.name, source, body.endpoint,
                                            body.completion_window, metadata, keep)
        except OSError as e:
            raise _unavailable("queue the batch", who, e) from None
        log.info("batch %s created by %s from %s", batch.id, who.name, source.id)
        return _shown(await asyncio.to_thread(batches.batch_object, batch))

    def owned_batch(batch_id: str, who: Tenant) -> ApiBatch | DropJob:
        """The caller's batch; for an admin also a job dropped through the inbox."""
        batch = batches.get(batch_id, who.name) or (batches.get_drop(batch_id) if who.admin else None)
        if batch is None:
            raise ApiError(404, f"No such Batch object: {_shown_id(batch_id)}", param="batch_id")
        return batch

    @app.get("/v1/batches/{batch_id}")
    async def retrieve_batch(batch_id: str, who: Tenant = Depends(tenant)) -> dict[str, Any]:
        return _shown(await asyncio.to_thread(batches.batch_object, owned_batch(batch_id, who)))

    @app.get("/v1/batches")
    async def list_batches(limit: int = 20, after: str | None = None,
                           who: Tenant = Depends(tenant)) -> dict[str, Any]:
        if not 1 <= limit <= MAX_BATCHES_PAGE:
            raise ApiError(400, f"'limit' must be between 1 and {MAX_BATCHES_PAGE}.", param="limit")

        def page() -> dict[str, Any]:
            visible: list[ListedBatch | DropJob] = [*batches.index(who.name),
                                                    *(batches.drops() if who.admin else [])]
            visible.sort(key=lambda b: (b.created_at, b.id), reverse=True)
            found, more = page_of(visible, after, limit, ahead_of(batches.gone(after or ""), who.name))
            shown = [batches.full(b) if isinstance(b, ListedBatch) else b for b in found]
            return list_object([_shown(batches.batch_object(b)) for b in shown if b is not None], more)
        return await asyncio.to_thread(page)

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, who: Tenant = Depends(tenant)) -> dict[str, Any]:
        batch = owned_batch(batch_id, who)
        try:
            await asyncio.to_thread(batches.cancel, batch)
        except CannotCancel as e:
            raise ApiError(409, str(e), param="batch_id") from None
        log.info("batch %s: cancel asked by %s", batch.id, who.name)
        return _shown(await asyncio.to_thread(batches.batch_object, batch))

    @app.get("/v1/models")
    async def list_models(who: Tenant = Depends(tenant)) -> dict[str, Any]:
        names = dict.fromkeys([config.engine.model, *config.models.aliases, *config.models.aliases.values()])
        return {"object": "list", "data": [_shown(Model(id=name, object="model", created=0, owned_by="spoold"))
                                           for name in names if name]}

    return app


def page_of(items: list[T], after: str | None, limit: int,
            ahead: Callable[[T], bool] | None = None) -> tuple[list[T], bool]:
    """The `limit` items after the one whose id is `after`, and whether more follow (OpenAI's cursor pages).

    An `after` that is no longer among them (deleted since the page that
    ended with it: the SDK's walk through every page, a clean-up loop
    deleting what it walks) goes on from where it was: `ahead(item)` says
    whether an item comes before that place (`ahead_of`). Started again
    from the top, the walk would meet every item before it once more. One
    this process never listed (another tenant's, or from before a restart)
    starts from the beginning rather than leaking whether it exists.
    """
    ids = [item.id for item in items]
    if after in ids:
        start = ids.index(after) + 1
    else:
        start = sum(1 for item in items if ahead(item)) if ahead is not None else 0
    return items[start:start + limit], start + limit < len(items)


def ahead_of(gone: StoredFile | ListedBatch | None, tenant: str,
             order: str = "desc") -> Callable[[Any], bool] | None:
    """For `page_of`: whether an item is listed before where `gone` (a listed record since deleted) was,
    in a listing newest first (`order` "desc") or oldest first; None when there is no such record of
    `tenant`'s."""
    if gone is None or gone.owner != tenant:
        return None
    place = (gone.created_at, gone.id)
    if order == "asc":
        return lambda item: (item.created_at, item.id) < place
    return lambda item: (item.created_at, item.id) > place


def _upload_expiry(fields: dict[str, str]) -> int | None:
    """An upload's `expires_after` (form fields `expires_after[anchor]`, `expires_after[seconds]`, as the
    SDK sends them) in seconds; None when not asked."""
    asked = {key[len("expires_after["):-1]: value for key, value in fields.items()
             if key.startswith("expires_after[") and key.endswith("]")}
    if not asked:
        return None
    seconds = asked.get("seconds", "")
    asked["seconds"] = int(seconds) if seconds.isascii() and seconds.isdigit() else seconds
    return _checked("expires_after", lambda: expires_after_seconds(asked, "expires_after"))


def _checked(param: str, check: Callable[[], T]) -> T:
    """`check()`, whose ValueError becomes a 400 naming `param`."""
    try:
        return check()
    except ValueError as e:
        raise ApiError(400, f"{str(e)[0].upper()}{str(e)[1:]}.", param=param) from None


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """A list page as OpenAI sends it: `data`, `first_id`, `last_id`, `has_more`."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def _unavailable(doing: str, who: Tenant, error: OSError) -> ApiError:
    """A full or failing spool disk: nothing was kept, and the client may try again (503)."""
    log.error("could not %s for %s: %s", doing, who.name, error.strerror or error)
    return ApiError(503, f"The server could not {doing} ({error.strerror or 'I/O error'}); try again later.",
                    kind="server_error")


def _shown(obj: BaseModel) -> dict[str, Any]:
    """An `openai` type as the JSON the API answers (every field, nulls too, as OpenAI sends them)."""
    return obj.model_dump(mode="json")


def _shown_id(value: str) -> str:
    """An id from a request as it may be echoed back: short, printable (it is the client's own)."""
    shown = "".join(c if c.isprintable() else "?" for c in value[:64])
    return repr(shown + ("..." if len(value) > 64 else ""))


def _invalid_request(first: dict[str, Any]) -> tuple[str, str | None]:
    """(message, param) for FastAPI's first complaint about a request, worded as OpenAI words them: a body
    that is not JSON says so (pydantic's location there is a character offset, not a parameter)."""
    loc, kind = tuple(first.get("loc", ())), first.get("type")
    if kind == "json_invalid":
        return f"The request body is not valid JSON ({(first.get('ctx') or {}).get('error', 'parse error')} at " \
               f"character {loc[-1] if len(loc) > 1 else 0}); send the parameters as a JSON object.", None
    if loc == ("body",):  # none, or not an object
        return "The request body must be a JSON object of the parameters.", None
    param = str(loc[-1]) if loc else None
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", param
    return f"Invalid value for '{param}': {first.get('msg', 'invalid')}.", param


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape; never a bare 500 with a traceback."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _invalid_request(error.errors()[0] if error.errors() else {})
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return ApiError(error.status_code, str(error.detail)).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        # Answered from outside RequestIds (Starlette's outermost layer), so the id goes on here as well.
        request_id = getattr(request.state, "request_id", "")
        log.error("%s %s failed (request %s): %s", request.method, request.url.path, request_id,
                  type(error).__name__, exc_info=True)
        response = ApiError(500, f"The server had an error while processing your request; its log has the details "
                                 f"under request {request_id}.", kind="server_error").response()
        response.headers["x-request-id"] = request_id
        return response

