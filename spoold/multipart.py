"""A `multipart/form-data` upload read as it arrives, its file part streamed to the caller.

Starlette's form parser spools file parts to a temporary file (under
/tmp, which is often a small tmpfs, or RAM under systemd's PrivateTmp)
before the handler sees them; a 2 GiB batch file would land there first.
Here python-multipart's streaming parser (the one Starlette uses) feeds
the `file` part straight to the caller, chunk by chunk, and keeps only
the small text fields (`purpose`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

#: Text fields beside the file: how many, and how long each may be.
MAX_FIELDS = 16
MAX_FIELD_BYTES = 1024


class FormError(Exception):
    """The request body is not the form an upload must be; the message says what to send."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UploadForm:
    """One upload request: `file_chunks()` yields the file part's bytes; `fields` and `filename` fill in."""

    def __init__(self, request: Request) -> None:
        kind, params = parse_options_header(request.headers.get("content-type", ""))
        if kind != b"multipart/form-data" or not params.get(b"boundary"):
            raise FormError("Send the upload as multipart/form-data with the fields 'file' and 'purpose'.")
        self.request = request
        #: the small text fields, as text
        self.fields: dict[str, str] = {}
        #: the client's name for the file part; None until (unless) one is seen
        self.filename: str | None = None
        #: whether the file part reached its closing boundary (a body cut short never does)
        self.file_complete = False
        try:
            self._parser = MultipartParser(params[b"boundary"], {
                "on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end})
        except Exception as e:  # the parser refuses the boundary itself (over 256 bytes, say)
            raise FormError(f"The multipart body is malformed: {e}.") from None
        self._pending: list[bytes] = []
        self._header: list[bytes] = [b"", b""]
        self._disposition = b""
        self._name = ""
        self._value = bytearray()
        self._in_file = False

    async def file_chunks(self) -> AsyncIterator[bytes]:
        """The `file` part's bytes as they arrive; the text fields are read on the way."""
        try:
            async for chunk in self.request.stream():
                self._feed(chunk)
                if self._pending:
                    data, self._pending = b"".join(self._pending), []
                    yield data
        except ClientDisconnect:
            raise FormError("The client went away before the upload was complete.") from None
        self._parser.finalize()

    def _feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except FormError:
            raise
        except Exception as e:  # the parser's own errors: a malformed body
            raise FormError(f"The multipart body is malformed: {e}.") from None

    # -- the parser's callbacks -------------------------------------------

    def _part_begin(self) -> None:
        self._disposition, self._name, self._value, self._in_file = b"", "", bytearray(), False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header[0] += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._header[1] += data[start:end]

    def _header_end(self) -> None:
        if self._header[0].lower() == b"content-disposition":
            self._disposition = self._header[1]
        self._header = [b"", b""]

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._disposition)
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in params:
            if self._name != "file" or self.filename is not None:
                raise FormError("Send exactly one file, as the field 'file'.", "file")
            self.filename = params[b"filename"].decode("utf-8", "replace")
            self._in_file = True
        elif len(self.fields) >= MAX_FIELDS:
            raise FormError(f"Too many form fields (at most {MAX_FIELDS}).")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._pending.append(data[start:end])
            return
        self._value += data[start:end]
        if len(self._value) > MAX_FIELD_BYTES:
            raise FormError(f"The form field {self._name[:64]!r} is too long.", self._name[:64] or None)

    def _part_end(self) -> None:
        if self._in_file:
            self.file_complete = True
        elif self._name:
            self.fields[self._name] = self._value.decode("utf-8", "replace")
        self._in_file = False
