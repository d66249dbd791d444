"""The request of a compiled chain for one row: the SDK's own request, with the row's messages.

The parts of a request that do not depend on the row (the model's fields,
what ``.bind`` and ``with_structured_output`` added, the response format's
schema as the SDK renders it, the headers, the timeout) are learnt once per
chain and event loop, from LangChain and the SDK themselves: the chain's
model step is called with a placeholder for each message's text, and the
transport records the request it would send and sends nothing
(``transport.pipeline.Capture``). The body is then split around its
``messages``: a row's body is the bytes before, the row's messages encoded
as the SDK encodes JSON (``json.dumps(ensure_ascii=False, separators=(",",
":"), allow_nan=False)``), and the bytes after. Only the messages' text is
ours; the rest is byte for byte what LangChain and the SDK built, and the
proof on the job's first rows (``compiled.caller``) checks the whole.
"""

from __future__ import annotations

import json
from typing import Any

from dask_llm.compiled.shape import Shape
from dask_llm.transport.pipeline import CAPTURE, Capture, JobTransport

#: The SDK's JSON encoding (``openai._utils._json.openapi_dumps`` for plain data).
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_HOLE = "\ue000dask-llm-messages\ue000"
_DROP_HEADERS = frozenset({"content-length"})


def _placeholder(i: int) -> str:
    return f"\ue000dask-llm-{i}\ue000"


class RequestTemplate:
    """A chain's request with a hole for the row's messages; ``build(inputs)`` fills it."""

    __slots__ = (
        "_after",
        "_before",
        "_headers",
        "_messages",
        "extensions",
        "headers",
        "request_type",
        "transport",
        "url",
    )

    def __init__(self, shape: Shape, captured: Any, transport: JobTransport) -> None:
        body = json.loads(captured.content)
        sent = body.get("messages")
        if not isinstance(sent, list) or len(sent) != len(shape.messages):
            raise ValueError("the request's messages are not the prompt's, one for one")
        messages: list[tuple[dict[str, Any], bool]] = []
        for i, (message, (_, template, fields)) in enumerate(
            zip(sent, shape.messages, strict=True)
        ):
            expected = _placeholder(i) if fields else template
            if not isinstance(message, dict) or message.get("content") != expected:
                raise ValueError(f"message {i} of the request is not its text alone")
            messages.append((message, fields))
        if body.get("stream"):
            raise ValueError("the request streams")
        if _ENCODE(body).encode() != captured.content:
            raise ValueError("the SDK encodes this body otherwise")
        text = _ENCODE({**body, "messages": _HOLE})
        if text.count(_HOLE) != 1 or text.count("\ue000") != 2:
            raise ValueError("a message's text appears outside its message")
        before, after = text.split(f'"{_HOLE}"')
        self._before = before.encode()
        self._after = after.encode()
        self._messages = messages
        self.headers = [
            (k, v) for k, v in captured.headers.multi_items() if k.lower() not in _DROP_HEADERS
        ]
        # Built once: a request copies a headers object's list instead of normalizing
        # each header again (a quarter of the cost of building the request).
        self._headers = type(captured.headers)(self.headers)
        self.extensions = dict(captured.extensions)
        self.url = captured.url
        self.request_type = type(captured)
        self.transport = transport

    def body(self, texts: list[str]) -> bytes:
        """The request body for a row whose messages read ``texts``."""
        messages = []
        for (message, _), text in zip(self._messages, texts, strict=True):
            filled = dict(message)
            filled["content"] = text
            messages.append(filled)
        return self._before + _ENCODE(messages).encode() + self._after

    def request(self, body: bytes) -> Any:
        """The HTTP request (the SDK's own request type, headers and timeout) for ``body``."""
        return self.request_type(
            "POST", self.url, headers=self._headers, content=body, extensions=self.extensions
        )

    def headers_of(self, request: Any) -> list[tuple[str, str]]:
        """``request``'s headers as this template keeps them (to compare with LangChain's)."""
        return [(k, v) for k, v in request.headers.multi_items() if k.lower() not in _DROP_HEADERS]


async def learn(shape: Shape) -> RequestTemplate:
    """Ask LangChain for the chain's request with placeholder texts, without sending it.

    Raises ``ValueError`` naming why the request cannot be templated.
    """
    messages = [
        cls(content=_placeholder(i) if fields else template)
        for i, (cls, template, fields) in enumerate(shape.messages)
    ]
    capture = Capture(abort=True)
    token = CAPTURE.set(capture)
    try:
        await shape.model_step.ainvoke(messages)
    except Exception as exc:
        if not capture.requests:
            raise ValueError(f"LangChain sent no request ({type(exc).__name__}: {exc})") from exc
    finally:
        CAPTURE.reset(token)
    if len(capture.requests) != 1:
        raise ValueError(f"LangChain built {len(capture.requests)} requests for one call")
    captured = capture.requests[0]
    if captured.method != "POST" or not captured.url.path.endswith("/chat/completions"):
        raise ValueError(f"LangChain calls {captured.method} {captured.url.path}")
    transport = _transport_of(shape)
    if transport is None:
        raise ValueError("the model's requests do not pass the job's transport")
    return RequestTemplate(shape, captured, transport)


def _transport_of(shape: Shape) -> JobTransport | None:
    client = shape.model.root_async_client
    http = getattr(client, "_client", None)
    transport = getattr(http, "_transport", None)
    return transport if isinstance(transport, JobTransport) else None
