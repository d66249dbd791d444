"""A compiled chain on one partition's loop: learnt, proven on the job's rows, then called.

Per chain and partition:

1. **Learn** (``compiled.request.learn``): the request LangChain and the SDK
   build for the chain, with placeholders for the messages' text, captured
   by the transport and not sent.
2. **Prove**, on the partition's first calls: each goes LangChain's way with
   the transport recording what it sent and what came back
   (``transport.pipeline.Capture``); the body the compiled path would have
   sent for the same row is compared with LangChain's, byte for byte (with the
   headers), and the value it would have read from the same answer with
   LangChain's value. Nothing is sent twice. ``PROOFS`` such calls, then:
3. **Call**: the row's body goes straight to the job's transport
   (``JobTransport.exchange``: cache, in flight, budget, throttle, record,
   batch, as any request), and the answer is read straight into the row's
   result (``compiled.answer``). An answer it does not read for sure (an
   error status, a refusal, a value that breaks its schema, a connection
   error) is handed to LangChain with the very same answer or exception
   (``transport.pipeline.Replay``), so the row gets LangChain's own value
   or error, and the retry policy sees LangChain's exception.

Any difference found at step 1 or 2 (or a replay that finds LangChain
building another body) turns the compiled path off for that chain for the
rest of the job in this process, with one line on the ``dask_llm`` logger
naming the difference (``Verdicts``). Same bytes, same cache keys: a job can
move between the paths and keep its cache.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

from dask_llm.chains.columns import RowFailed, normalize
from dask_llm.chains.plan import PlannedChain
from dask_llm.compiled.answer import UNSURE, read, tool_name
from dask_llm.compiled.request import RequestTemplate, learn
from dask_llm.compiled.shape import Shape, shape_of
from dask_llm.transport.pipeline import CAPTURE, REPLAY, Capture, Replay

log = logging.getLogger(__name__)

#: Calls of a chain proven equal on a partition's rows before it takes the compiled path.
PROOFS = 2


def enabled() -> bool:
    """Whether the environment allows the compiled path (``DASK_LLM_COMPILED`` not ``0``)."""
    return os.environ.get("DASK_LLM_COMPILED", "1").strip().lower() not in ("0", "false", "no")


class Verdicts:
    """The chains of one job that fell back to LangChain in this process, and why.

    Owned by the job (``engine.job.Job``); each fallback is logged once.
    """

    __slots__ = ("_lock", "_why")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._why: dict[str, str] = {}

    def fallen(self, chain: str) -> bool:
        return chain in self._why

    def why(self, chain: str) -> str | None:
        return self._why.get(chain)

    def fall_back(self, chain: str, difference: str) -> None:
        with self._lock:
            if chain in self._why:
                return
            self._why[chain] = difference
        log.warning(
            "dask-llm: chain %r takes LangChain's path for the rest of this job: %s",
            chain,
            difference,
        )


def compile_chain(pc: PlannedChain, runnable: Any, verdicts: Verdicts) -> CompiledChain | None:
    """The compiled form of ``runnable`` (the partition's copy of ``pc``'s chain), or None."""
    if verdicts.fallen(pc.name):
        return None
    try:
        shape = shape_of(runnable)
    # Reading the chain's objects must never fail a job: such a chain is LangChain's.
    except Exception as exc:
        shape = f"its objects could not be read ({type(exc).__name__}: {exc})"
    if isinstance(shape, str):
        log.debug("dask-llm: chain %r is not compiled (LangChain's path): %s", pc.name, shape)
        return None
    return CompiledChain(pc, runnable, shape, verdicts)


class CompiledChain:
    """One chain's compiled calls on one partition's loop (see the module docstring)."""

    __slots__ = (
        "_changed",
        "_learning",
        "_proving",
        "_template",
        "_tool",
        "pc",
        "proven",
        "runnable",
        "shape",
        "verdicts",
    )

    def __init__(self, pc: PlannedChain, runnable: Any, shape: Shape, verdicts: Verdicts) -> None:
        self.pc = pc
        self.runnable = runnable
        self.shape = shape
        self.verdicts = verdicts
        self.proven = 0
        self._template: RequestTemplate | None = None
        self._learning: asyncio.Task[RequestTemplate | None] | None = None
        self._tool = tool_name(shape)
        self._proving = 0  # proofs in flight
        self._changed: asyncio.Event | None = None  # set when a proof ends

    async def ainvoke(self, inputs: dict[str, Any], config: Any = None) -> Any:
        """The chain's result for ``inputs``, as LangChain's ``ainvoke`` would return it."""
        while True:
            if self.verdicts.fallen(self.pc.name):
                return await self.runnable.ainvoke(inputs, config)
            if self.proven >= PROOFS and self._template is not None:
                return await self._call(self._template, inputs)
            if self._proving < PROOFS - self.proven:
                break
            # Enough proofs are on the wire: the verdict is one answer away.
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()
        self._proving += 1
        try:
            template = await self._learnt()
            if template is None:
                return await self.runnable.ainvoke(inputs, config)
            return await self._prove(template, inputs, config)
        finally:
            self._proving -= 1
            if self._changed is not None:
                self._changed.set()
                self._changed = None

    # -- learn ----------------------------------------------------------------------------------
    async def _learnt(self) -> RequestTemplate | None:
        if self._template is not None:
            return self._template
        if self._learning is None:
            self._learning = asyncio.ensure_future(self._learn())
        return await asyncio.shield(self._learning)

    async def _learn(self) -> RequestTemplate | None:
        try:
            self._template = await learn(self.shape)
        # Whatever stops the request from being templated sends the chain LangChain's way.
        except Exception as exc:
            self.verdicts.fall_back(
                self.pc.name, f"its request cannot be compiled: {type(exc).__name__}: {exc}"
            )
        return self._template

    # -- prove ----------------------------------------------------------------------------------
    async def _prove(self, template: RequestTemplate, inputs: dict[str, Any], config: Any) -> Any:
        ours: bytes | str
        try:
            ours = template.body(self.shape.format(inputs))
        except (KeyError, IndexError, ValueError) as exc:  # LangChain's prompt says what
            ours = f"the prompt cannot be formatted here ({type(exc).__name__}: {exc})"
        capture = Capture()
        token = CAPTURE.set(capture)
        try:
            result = await self.runnable.ainvoke(inputs, config)
        except Exception:
            if len(capture.requests) == 1:  # no answer to compare, but the bytes sent
                self._judge(self._request_difference(template, ours, capture))
            raise
        finally:
            CAPTURE.reset(token)
        difference = self._request_difference(template, ours, capture)
        if difference is None:
            difference = self._value_difference(capture, result)
            if difference is None:
                self.proven += 1
                if self.proven == PROOFS:
                    log.debug(
                        "dask-llm: chain %r takes the compiled path (%d calls proven equal)",
                        self.pc.name,
                        PROOFS,
                    )
        self._judge(difference)
        return result

    def _judge(self, difference: str | None) -> None:
        if difference:
            self.verdicts.fall_back(self.pc.name, difference)

    def _request_difference(
        self, template: RequestTemplate, ours: bytes | str, capture: Capture
    ) -> str | None:
        if isinstance(ours, str):
            return ours
        if len(capture.requests) != 1:
            return f"LangChain sent {len(capture.requests)} requests for one call"
        sent = capture.requests[0]
        theirs = sent.content
        if theirs != ours:
            return "request bodies differ " + _where(ours, theirs)
        if sorted(template.headers_of(sent)) != sorted(template.headers):
            mine = dict(template.headers)
            other = dict(template.headers_of(sent))
            names = sorted(k for k in {*mine, *other} if mine.get(k) != other.get(k))
            return f"request headers differ: {', '.join(names)}"
        if sent.url != template.url:
            return f"request URLs differ: ours {template.url}, LangChain's {sent.url}"
        return None

    def _value_difference(self, capture: Capture, result: Any) -> str | None:
        """None: the same value; "": undecided (an answer the compiled reader leaves alone)."""
        answer = capture.answers[0]
        if answer.status != 200:
            return ""
        fast = read(self.shape, answer.body, self._tool)
        if fast is UNSURE:
            return ""
        ours, theirs = _normalized(self.pc, fast), _normalized(self.pc, result)
        if ours != theirs:
            return f"parsed values differ: ours {_short(ours)}, LangChain's {_short(theirs)}"
        return None

    # -- call -----------------------------------------------------------------------------------
    async def _call(self, template: RequestTemplate, inputs: dict[str, Any]) -> Any:
        try:
            body = template.body(self.shape.format(inputs))
        except (KeyError, IndexError, ValueError):  # LangChain's prompt raises its own error
            return await self.runnable.ainvoke(inputs)
        try:
            answer = await template.transport.exchange(template.request(body))
        except Exception as exc:
            return await self._replay(inputs, Replay(body, None, exc))
        if answer.status == 200:
            result = read(self.shape, answer.body, self._tool)
            if result is not UNSURE:
                return result
        return await self._replay(inputs, Replay(body, answer))

    async def _replay(self, inputs: dict[str, Any], replay: Replay) -> Any:
        """LangChain's value (or exception) for the answer the compiled call got."""
        token = REPLAY.set(replay)
        try:
            return await self.runnable.ainvoke(inputs)
        finally:
            REPLAY.reset(token)
            if replay.missed:
                self.verdicts.fall_back(
                    self.pc.name, "LangChain built another request body for a row"
                )


def _normalized(pc: PlannedChain, result: Any) -> Any:
    try:
        return normalize(pc, result)
    except RowFailed as failure:
        return ("error", failure.message)


def _where(ours: bytes, theirs: bytes) -> str:
    at = next(
        (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
        min(len(ours), len(theirs)),
    )
    lo, hi = max(0, at - 30), at + 30
    return f"at byte {at}: ours ...{ours[lo:hi]!r}..., LangChain's ...{theirs[lo:hi]!r}..."


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
