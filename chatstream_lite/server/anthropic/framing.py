"""Anthropic's framings of one reply: a `message` object, or its stream of events.

    framing = MessageStream(request, served, call) if stream else MessageBody(...)
    exchange = Exchange(request, job, framing, ...)      # server/exchange.py drives it

A reply becomes content blocks: a `thinking` block for its thinking section (reasoning.py),
a `text` block, and a `tool_use` block per call (read by the chat completions' tool format
decoders, openai/tool_formats.py). A stream sends `message_start` and a `ping`, then each
block as `content_block_start`, its deltas (`text_delta`, `thinking_delta`,
`input_json_delta`) and `content_block_stop`, then `message_delta` (the `stop_reason`, the
usage) and `message_stop`. As on chat completions, a call goes out once the reply has ended,
since only then is it known to parse. Errors have Anthropic's shape, `{"type": "error",
"error": {"type", "message"}}`, in a body or as an `error` event.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from ...engine import Finished, Piece, Started
from ...errors import ChatStreamError, GenerationFailed
from ..framing import Outcome
from ..openai.framing import ServedModel, dumps
from ..openai.tool_formats import ReplyDecoder, ToolCall
from ..reasoning import ReasoningSplitter
from .protocol import MessagesCall

__all__ = ["MessageBody", "MessageStream", "anthropic_error_response", "stop_reason"]

BlockKind = Literal["thinking", "text"]

# Anthropic's error `type` by status.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_error_response(error: ChatStreamError) -> web.Response:
    """`error` as Anthropic renders one: `{"type": "error", "error": {"type", "message"}}`."""
    return web.json_response(_error_body(error), status=error.status, headers=error.headers())


def _error_body(error: ChatStreamError) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(error.status) or (
        "api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def stop_reason(finished: Finished, stops: tuple[str, ...], called: bool
                ) -> tuple[str, str | None]:
    """Anthropic's `stop_reason` and `stop_sequence` for a reply that ended so."""
    if finished.reason == "length":
        return "max_tokens", None
    if called:
        return "tool_use", None
    if finished.stop_sequence is not None and finished.stop_sequence in stops:
        return "stop_sequence", finished.stop_sequence
    return "end_turn", None


class _Reader:
    """A reply's pieces as block text: its thinking section apart, then the answer, read
    for tool calls when the request may call one."""

    def __init__(self, call: MessagesCall) -> None:
        self.splitter = ReasoningSplitter(opened=call.completion.reasoning_opened)
        plan = call.completion.tools
        self.decoder: ReplyDecoder | None = plan.decoder() if plan is not None else None

    def feed(self, text: str) -> list[tuple[BlockKind, str]]:
        reasoning, content = self.splitter.feed(text)
        return self._shown(reasoning, content)

    def finish(self, cut: bool) -> tuple[list[tuple[BlockKind, str]], list[ToolCall]]:
        reasoning, content = self.splitter.finish()
        shown = self._shown(reasoning, content)
        if self.decoder is None:
            return shown, []
        end = self.decoder.finish(cut)
        if end.content:
            shown.append(("text", end.content))
        # A call cut by max_tokens before its arguments were whole is left out: a client
        # would run the tool with arguments the model did not finish.
        return shown, [c for c in end.calls if _arguments(c) is not None]

    def _shown(self, reasoning: str, content: str) -> list[tuple[BlockKind, str]]:
        if content and self.decoder is not None:
            content = self.decoder.feed(content)
        shown: list[tuple[BlockKind, str]] = []
        if reasoning:
            shown.append(("thinking", reasoning))
        if content:
            shown.append(("text", content))
        return shown


def _arguments(call: ToolCall) -> dict[str, Any] | None:
    try:
        value = json.loads(call.arguments)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": _tool_use_id(call), "name": call.name,
            "input": _arguments(call) or {}}


def _tool_use_id(call: ToolCall) -> str:
    # Anthropic's ids read "toolu_..."; a client sends it back in its tool_result.
    return "toolu_" + call.id.removeprefix("call_")


class _Message:
    """What both framings of one reply share."""

    def __init__(self, request: web.Request, served: ServedModel, call: MessagesCall) -> None:
        self.request = request
        self.model = served.name
        self.call = call
        self.id = f"msg_{uuid.uuid4().hex}"
        self.reader = _Reader(call)

    def message(self, content: list[dict[str, Any]], stop: str | None,
                stop_sequence: str | None, input_tokens: int, output_tokens: int
                ) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": stop, "stop_sequence": stop_sequence,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}


class MessageBody(_Message):
    """`stream` false: one `message` object once the reply is complete."""

    headers_sent = False

    def __init__(self, request: web.Request, served: ServedModel, call: MessagesCall) -> None:
        super().__init__(request, served, call)
        self._blocks: list[tuple[BlockKind, str]] = []
        self._calls: list[ToolCall] = []
        self._finished: Finished | None = None

    async def open(self, started: Started) -> None:
        pass

    async def send(self, piece: Piece) -> None:
        self._blocks += self.reader.feed(piece.text)

    async def close(self, finished: Finished) -> None:
        tail, self._calls = self.reader.finish(cut=finished.reason == "length")
        self._blocks += tail
        self._finished = finished

    async def abort(self, error: BaseException) -> None:
        pass  # never called: no header goes out before the end

    def response_for(self, exchange: Outcome) -> web.StreamResponse:
        if exchange.error is not None:
            return anthropic_error_response(exchange.error)
        if exchange.status != "success" or self._finished is None:
            return web.Response(status=499)  # the client left: nobody reads this
        content: list[dict[str, Any]] = []
        for kind in ("thinking", "text"):
            text = "".join(t for k, t in self._blocks if k == kind)
            if kind == "thinking" and text:
                content.append({"type": "thinking", "thinking": text, "signature": ""})
            elif kind == "text" and (text.strip() or not self._calls):
                content.append({"type": "text", "text": text})
        content += [_tool_use(call) for call in self._calls]
        stop, sequence = stop_reason(self._finished, self.call.stop_sequences,
                                     bool(self._calls))
        return web.json_response(self.message(
            content, stop, sequence, exchange.usage.prompt_tokens,
            exchange.usage.completion_tokens), dumps=dumps)


class MessageStream(_Message):
    """`stream` true: Anthropic's events, block by block (see the module docstring)."""

    response: EventSourceResponse | None = None

    def __init__(self, request: web.Request, served: ServedModel, call: MessagesCall) -> None:
        super().__init__(request, served, call)
        self._index = -1                    # the index of the last block started
        self._open: BlockKind | None = None
        self._input_tokens = 0

    @property
    def headers_sent(self) -> bool:
        return self.response is not None and self.response.prepared

    async def open(self, started: Started) -> None:
        self._input_tokens = started.prompt_tokens
        self.response = _event_source_response()
        await self.response.prepare(self.request)
        await self._event("message_start", {"type": "message_start", "message": self.message(
            [], None, None, started.prompt_tokens, 0)})
        await self._event("ping", {"type": "ping"})

    async def send(self, piece: Piece) -> None:
        for kind, text in self.reader.feed(piece.text):
            await self._delta(kind, text)

    async def close(self, finished: Finished) -> None:
        shown, calls = self.reader.finish(cut=finished.reason == "length")
        for kind, text in shown:
            await self._delta(kind, text)
        if self._index < 0 and not calls:
            await self._start({"type": "text", "text": ""}, "text")
        await self._stop_block()
        for call in calls:
            await self._start({**_tool_use(call), "input": {}}, None)
            await self._event("content_block_delta", {
                "type": "content_block_delta", "index": self._index,
                "delta": {"type": "input_json_delta", "partial_json": call.arguments}})
            await self._event("content_block_stop",
                              {"type": "content_block_stop", "index": self._index})
        stop, sequence = stop_reason(finished, self.call.stop_sequences, bool(calls))
        await self._event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": sequence},
            "usage": {"input_tokens": finished.prompt_tokens,
                      "output_tokens": finished.completion_tokens}})
        await self._event("message_stop", {"type": "message_stop"})
        assert self.response is not None
        await self.response.write_eof()

    async def abort(self, error: BaseException) -> None:
        # An `error` event (the `anthropic` client raises it), then drop the connection:
        # no message_stop, so no client mistakes the reply for a complete one.
        problem = error if isinstance(error, ChatStreamError) else GenerationFailed(
            "The model failed while generating the reply.")
        try:
            await self._event("error", _error_body(problem))
        except ConnectionError:
            pass
        if self.request.transport is not None:
            self.request.transport.close()

    def response_for(self, exchange: Outcome) -> web.StreamResponse:
        if self.response is not None and self.response.prepared:
            self.response.stop_streaming()   # its keep-alive pings end with the stream
            return self.response
        if exchange.error is not None:
            return anthropic_error_response(exchange.error)
        return web.Response(status=499)  # the client left before the headers

    async def _delta(self, kind: BlockKind, text: str) -> None:
        if self._open != kind:
            await self._stop_block()
            block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" \
                else {"type": "text", "text": ""}
            await self._start(block, kind)
        delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" \
            else {"type": "text_delta", "text": text}
        await self._event("content_block_delta", {
            "type": "content_block_delta", "index": self._index, "delta": delta})

    async def _start(self, block: dict[str, Any], kind: BlockKind | None) -> None:
        self._index += 1
        self._open = kind
        await self._event("content_block_start", {
            "type": "content_block_start", "index": self._index, "content_block": block})

    async def _stop_block(self) -> None:
        if self._open is not None:
            self._open = None
            await self._event("content_block_stop",
                              {"type": "content_block_stop", "index": self._index})

    async def _event(self, name: str, data: dict[str, Any]) -> None:
        assert self.response is not None
        try:
            await self.response.send(dumps(data), event=name)
        except TimeoutError as stalled:  # aiohttp-sse aborted a client that stopped reading
            raise ConnectionError("the client stopped reading") from stalled


def _event_source_response() -> EventSourceResponse:
    # As openai/framing.py: "\n" line ends; aiohttp-sse >= 3.0 needs telling that a POST may
    # stream, 2.x (Python 3.10) has no such flag.
    try:
        return EventSourceResponse(sep="\n", allow_all_methods=True)  # type: ignore[call-arg,unused-ignore]
    except TypeError:
        return EventSourceResponse(sep="\n")
