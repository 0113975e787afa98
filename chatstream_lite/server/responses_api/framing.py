"""The Responses API's framings of one reply: a `response` object, or its stream of events.

    framing = ResponseStream(request, turn) if stream else ResponseBody(request, turn)
    exchange = Exchange(request, job, framing, ...)      # server/exchange.py drives it

Shapes are openai-python's `openai/types/responses/`: a `reasoning` item first when the reply
opens a thinking section (server/reasoning.py), a `message` output item holding one
`output_text` part, a `function_call` item per call (read by openai/tools.py's reader, as
chat completions reads them), `usage` with `input_tokens`/`output_tokens`. Streamed:
`response.created`, `response.in_progress`, then per item `response.output_item.added`,
(`response.reasoning_text.delta`..., `response.reasoning_text.done` |
`response.content_part.added`, `response.output_text.delta`..., `response.output_text.done`,
`response.content_part.done` | `response.function_call_arguments.delta`/`.done`),
`response.output_item.done`, and last `response.completed` (`response.incomplete` when
`max_output_tokens` cut the reply), each with its `sequence_number`. A call goes out once the
reply has ended, since only then is it known to parse.

A response with `store` is written to the response store before the client sees its end
(the last event, or the body), so its `id` continues the conversation at once, on any replica.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from ...engine import Finished, Piece, Started
from ...errors import ChatStreamError, GenerationFailed
from ...sessions import ResponseStore, StoredResponse
from ..framing import Outcome
from ..openai.framing import ServedModel, dumps
from ..openai.protocol import CompletionRequest
from ..openai.tool_formats import ReplyDecoder, ToolCall
from ..reasoning import ReasoningSplitter
from ..responses import openai_error_response
from .protocol import ResponsesCall, new_id

__all__ = ["ResponseBody", "ResponseStream", "Turn", "usage"]


@dataclass
class Turn:
    """One `/v1/responses` request on its way: what it asked, what it continues, and where
    it is stored."""

    call: ResponsesCall
    completion: CompletionRequest
    served: ServedModel
    conversation: list[dict[str, Any]]          # the stored items it continues
    store: ResponseStore | None                 # None: store false
    owner: str
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def response(self, status: str, output: list[dict[str, Any]],
                 finished: Finished | None = None) -> dict[str, Any]:
        """The `response` object as openai-python's `Response` reads it."""
        request = self.call.request
        params = self.completion.params
        text_format = request.text.format if request.text and request.text.format else None
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
            else None,
            "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "model": self.served.name, "output": output,
            "parallel_tool_calls": bool(request.parallel_tool_calls),
            "previous_response_id": request.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": self.store is not None,
            "temperature": params.temperature, "top_p": params.top_p,
            "text": {"format": text_format.model_dump(by_alias=True, exclude_none=True)
                     if text_format else {"type": "text"}},
            "tool_choice": _tool_choice(request.tool_choice),
            "tools": [{"strict": True, "parameters": None, "description": None, **tool}
                      for tool in request.tools or ()],
            "truncation": "disabled", "metadata": request.metadata or {}, "user": None,
            "usage": usage(finished.prompt_tokens, finished.completion_tokens)
            if finished is not None else None,
        }

    async def keep(self, response: dict[str, Any]) -> None:
        """Store the response (with `store`): its items, and the conversation up to its end."""
        if self.store is None:
            return
        record = {"response": response, "input_items": self.call.items,
                  "conversation": [*self.conversation, *self.call.items,
                                   *response["output"]]}
        await self.store.put(StoredResponse(self.id, self.owner, record))


def _tool_choice(choice: Any) -> Any:
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else {"type": "function", "name": choice.name}


def usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def _message(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [_text_part(text)] if status == "completed" else []}


def _reasoning(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "status": status, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}] if status == "completed"
            else []}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _function_call(call: ToolCall, item_id: str, arguments: str | None = None
                   ) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.name,
            "arguments": call.arguments if arguments is None else arguments,
            "status": "completed" if arguments is None else "in_progress"}


def _whole(call: ToolCall) -> bool:
    """A call cut by max_output_tokens before its arguments were whole is left out: a client
    would run the tool with arguments the model did not finish."""
    try:
        return isinstance(json.loads(call.arguments), dict)
    except ValueError:
        return False


class _Reply:
    """A reply's thinking (server/reasoning.py) and its text as it is shown, and its calls
    once it has ended."""

    def __init__(self, turn: Turn) -> None:
        plan = turn.completion.tools
        self.decoder: ReplyDecoder | None = plan.decoder() if plan is not None else None
        self.splitter = ReasoningSplitter(opened=turn.completion.reasoning_opened)

    def feed(self, text: str) -> tuple[str, str]:
        """(thinking, shown text) of the next piece; either may be empty."""
        reasoning, content = self.splitter.feed(text)
        return reasoning, self._shown(content)

    def finish(self, cut: bool) -> tuple[str, str, list[ToolCall]]:
        """What was held back: (thinking, shown text, the calls)."""
        reasoning, content = self.splitter.finish()
        shown = self._shown(content)
        if self.decoder is None:
            return reasoning, shown, []
        end = self.decoder.finish(cut)
        return reasoning, shown + end.content, [call for call in end.calls if _whole(call)]

    def _shown(self, content: str) -> str:
        return self.decoder.feed(content) if self.decoder is not None and content else content


def _status(finished: Finished) -> str:
    return "incomplete" if finished.reason == "length" else "completed"


class ResponseBody:
    """`stream: false`: one `response` object once the reply is complete (and stored)."""

    headers_sent = False

    def __init__(self, request: web.Request, turn: Turn) -> None:
        self.request = request
        self.turn = turn
        self.reply = _Reply(turn)
        self.thinking: list[str] = []
        self.texts: list[str] = []
        self.body: dict[str, Any] | None = None

    async def open(self, started: Started) -> None:
        pass

    async def send(self, piece: Piece) -> None:
        reasoning, shown = self.reply.feed(piece.text)
        self.thinking.append(reasoning)
        self.texts.append(shown)

    async def close(self, finished: Finished) -> None:
        thinking, rest, calls = self.reply.finish(cut=finished.reason == "length")
        reasoning = "".join(self.thinking) + thinking
        text = "".join(self.texts) + rest
        output: list[dict[str, Any]] = []
        if reasoning:
            output.append(_reasoning(new_id("rs"), reasoning))
        if text.strip() or not calls:
            output.append(_message(new_id("msg"), text.strip() if calls else text))
        output.extend(_function_call(call, new_id("fc")) for call in calls)
        body = self.turn.response(_status(finished), output, finished)
        await self.turn.keep(body)
        self.body = body

    async def abort(self, error: BaseException) -> None:
        pass  # never called: no header goes out before the end

    def response_for(self, exchange: Outcome) -> web.StreamResponse:
        if exchange.error is not None:
            return openai_error_response(exchange.error)
        if exchange.status != "success" or self.body is None:
            return web.Response(status=499)  # the client left: nobody reads this
        return web.json_response(self.body, dumps=dumps)


class ResponseStream:
    """`stream: true`: the Responses API's events (see the module docstring)."""

    def __init__(self, request: web.Request, turn: Turn) -> None:
        self.request = request
        self.turn = turn
        self.reply = _Reply(turn)
        self.response: EventSourceResponse | None = None
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.message_id: str | None = None       # the message item open now, if any
        self.text: list[str] = []
        self.reasoning_id: str | None = None     # the reasoning item open now, if any
        self.thinking: list[str] = []

    @property
    def headers_sent(self) -> bool:
        return self.response is not None and self.response.prepared

    async def open(self, started: Started) -> None:
        self.response = _event_source_response()
        await self.response.prepare(self.request)
        head = self.turn.response("in_progress", [])
        await self._event("response.created", {"response": head})
        await self._event("response.in_progress", {"response": head})

    async def send(self, piece: Piece) -> None:
        reasoning, shown = self.reply.feed(piece.text)
        if reasoning:
            await self._reasoning_delta(reasoning)
        if shown:
            await self._delta(shown)

    async def close(self, finished: Finished) -> None:
        thinking, rest, calls = self.reply.finish(cut=finished.reason == "length")
        if thinking:
            await self._reasoning_delta(thinking)
        if rest:
            await self._delta(rest)
        if self.message_id is None and not calls:
            await self._delta("")        # an empty reply is still a message
        if self.message_id is not None:
            await self._close_message()
        for call in calls:
            item_id, index = new_id("fc"), len(self.output)
            await self._event("response.output_item.added", {
                "output_index": index, "item": _function_call(call, item_id, "")})
            await self._event("response.function_call_arguments.delta", {
                "item_id": item_id, "output_index": index, "delta": call.arguments})
            await self._event("response.function_call_arguments.done", {
                "item_id": item_id, "output_index": index, "arguments": call.arguments})
            item = _function_call(call, item_id)
            await self._event("response.output_item.done", {"output_index": index, "item": item})
            self.output.append(item)
        status = _status(finished)
        body = self.turn.response(status, self.output, finished)
        await self.turn.keep(body)
        await self._event("response.completed" if status == "completed"
                          else "response.incomplete", {"response": body})
        assert self.response is not None
        await self.response.write_eof()

    async def _reasoning_delta(self, text: str) -> None:
        index = len(self.output)
        if self.reasoning_id is None:
            self.reasoning_id = new_id("rs")
            await self._event("response.output_item.added", {
                "output_index": index, "item": _reasoning(self.reasoning_id, "", "in_progress")})
        self.thinking.append(text)
        await self._event("response.reasoning_text.delta", {
            "item_id": self.reasoning_id, "output_index": index, "content_index": 0,
            "delta": text})

    async def _close_reasoning(self) -> None:
        assert self.reasoning_id is not None
        index, text = len(self.output), "".join(self.thinking)
        await self._event("response.reasoning_text.done", {
            "item_id": self.reasoning_id, "output_index": index, "content_index": 0,
            "text": text})
        item = _reasoning(self.reasoning_id, text)
        await self._event("response.output_item.done", {"output_index": index, "item": item})
        self.output.append(item)
        self.reasoning_id = None

    async def _delta(self, text: str) -> None:
        if self.reasoning_id is not None:        # the thinking has ended: its item closes
            await self._close_reasoning()
        index = len(self.output)
        if self.message_id is None:
            self.message_id = new_id("msg")
            await self._event("response.output_item.added", {
                "output_index": index, "item": _message(self.message_id, "", "in_progress")})
            await self._event("response.content_part.added", {
                "item_id": self.message_id, "output_index": index, "content_index": 0,
                "part": _text_part("")})
        if text:
            self.text.append(text)
            await self._event("response.output_text.delta", {
                "item_id": self.message_id, "output_index": index, "content_index": 0,
                "delta": text, "logprobs": []})

    async def _close_message(self) -> None:
        assert self.message_id is not None
        index, text = len(self.output), "".join(self.text)
        where = {"item_id": self.message_id, "output_index": index, "content_index": 0}
        await self._event("response.output_text.done", {**where, "text": text, "logprobs": []})
        await self._event("response.content_part.done", {**where, "part": _text_part(text)})
        item = _message(self.message_id, text)
        await self._event("response.output_item.done", {"output_index": index, "item": item})
        self.output.append(item)
        self.message_id = None

    async def abort(self, error: BaseException) -> None:
        # An error event (the `openai` client raises it), then drop the connection: no
        # response.completed, so no client mistakes the reply for a whole one.
        problem = error if isinstance(error, ChatStreamError) else GenerationFailed(
            "The model failed while generating the reply.")
        detail = {"code": problem.code, "message": problem.message, "param": problem.param}
        try:
            await self._event("error", {**detail, "error": {**detail, "type": "server_error"}})
        except ConnectionError:
            pass
        if self.request.transport is not None:
            self.request.transport.close()

    def response_for(self, exchange: Outcome) -> web.StreamResponse:
        if self.response is not None and self.response.prepared:
            self.response.stop_streaming()
            return self.response
        if exchange.error is not None:
            return openai_error_response(exchange.error)
        return web.Response(status=499)

    async def _event(self, kind: str, data: dict[str, Any]) -> None:
        assert self.response is not None
        event = {"type": kind, **data, "sequence_number": self.sequence}
        self.sequence += 1
        try:
            await self.response.send(dumps(event), event=kind)
        except TimeoutError as stalled:  # aiohttp-sse aborted a client that stopped reading
            raise ConnectionError("the client stopped reading") from stalled


def _event_source_response() -> EventSourceResponse:
    # As openai/framing.py: "\n" line ends; aiohttp-sse 3 needs to be told POST is fine.
    try:
        return EventSourceResponse(sep="\n", allow_all_methods=True)  # type: ignore[call-arg,unused-ignore]
    except TypeError:
        return EventSourceResponse(sep="\n")
