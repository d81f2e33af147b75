"""A header-read timeout for uvicorn's HTTP protocol (slowloris).

uvicorn (0.54, the installed version) has a keep-alive timeout between requests
(``timeout_keep_alive``), but no limit on how long a client may take to send a request's header
block: a connection that sends ``POST / HTTP/1.1\\r\\n`` and then one header byte every few seconds
is held open indefinitely (issue 12: 150 such connections stayed open). ``h11_max_incomplete_event_size``
bounds the header's *size*, not its time, and applies to the h11 implementation only.

So :func:`protocol_class` subclasses the protocol uvicorn would pick itself (httptools when installed,
else h11; ``uvicorn.protocols.http.auto``) and starts a timer when a connection opens, and again when
the first byte of a next request arrives on a kept-alive connection; the timer is cancelled as soon
as uvicorn has parsed the complete header block (it then creates the request's ``cycle``). When it
fires first, the connection gets ``408 Request Timeout`` and is closed. The body is bounded by the
app itself (server.py reads it under ``body_timeout``).
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

_BODY_408 = b'{"error": "request header not received in time"}'
_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"content-length: " + str(len(_BODY_408)).encode() + b"\r\nconnection: close\r\n\r\n" + _BODY_408)


def protocol_class(header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's automatic HTTP protocol class with a ``header_timeout`` (seconds) on each request's
    header block; pass it as ``uvicorn.Config(http=...)``."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    if header_timeout <= 0:
        raise ValueError("header_timeout must be > 0")

    class HeaderTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        timeout_header = float(header_timeout)

        def connection_made(self, transport) -> None:  # type: ignore[override]
            self._header_timer: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            if self._header_timer is None and (before is None or before.response_complete):
                self._arm_header_timer()  # the first bytes of a next request on a kept-alive connection
            super().data_received(data)
            if self.cycle is not before:  # the header block is complete: uvicorn made the request's cycle
                self._disarm_header_timer()

        def connection_lost(self, exc) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(self.timeout_header, self._header_timed_out)

        def _disarm_header_timer(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
                self._header_timer = None

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if self.transport is None or self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete:  # still no complete header block
                log.info("closing a connection from %s: no complete request header in %.1f s",
                         self.client, self.timeout_header)
                self.transport.write(_TIMEOUT_408)
                self.transport.close()

    HeaderTimeoutProtocol.__name__ = HeaderTimeoutProtocol.__qualname__ = f"HeaderTimeout{AutoHTTPProtocol.__name__}"
    return HeaderTimeoutProtocol
