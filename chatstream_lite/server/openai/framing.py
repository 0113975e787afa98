"""OpenAI's framings of one completion: a JSON body, or Server-Sent Events chunks.

    framing = EventStream(request, served, completion) if stream else JSONBody(...)
    exchange = Exchange(request, job, framing, ...)      # server/exchange.py drives it

Both give a choice the shape OpenAI's clients parse: a chat message (`/v1/chat/completions`)
or plain text (`/v1/completions`), with its logprobs when asked for, and errors in OpenAI's
error shape. The generic protocol they implement is server/framing.py's `Framing`. A chat
reply's thinking section (server/reasoning.py) goes in `message.reasoning_content` (streamed
as `delta.reasoning_content`), as llama-server and vLLM give it, never in `content`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from ...engine import Finished, FinishReason, Piece, Started, TokenLogprob
from ...errors import ChatStreamError, GenerationFailed
from ..framing import Outcome
from ..reasoning import ReasoningSplitter, split_reasoning
from ..responses import openai_error_response
from .protocol import CompletionRequest
from .tool_formats import ToolCall, read_reply

__all__ = ["EventStream", "JSONBody", "ServedModel", "ToolCallsBody", "ToolCallsStream", "dumps"]


@dataclass(frozen=True)
class ServedModel:
    """The model as OpenAI's responses name it."""

    name: str            # `model` in every response: the served name (alias) or the file's stem
    fingerprint: str     # `system_fingerprint`


class _Completion:
    """What every framing of one completion shares: its id, the model, the context check,
    and the shape of a choice: a chat message (`/v1/chat/completions`) or plain text
    (`/v1/completions`, `completion.chat` false), with its logprobs when asked for."""

    def __init__(self, request: web.Request, served: ServedModel,
                 completion: CompletionRequest) -> None:
        self.request = request
        self.model = served.name
        self.fingerprint = served.fingerprint
        self.completion = completion
        self.chat = completion.chat
        self.n = completion.params.n
        self.with_logprobs = completion.params.logprobs is not None
        self.id = f"chatcmpl-{uuid.uuid4().hex}" if self.chat else f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._offsets = [0] * self.n       # text_offset of each choice's next token

    def choice(self, index: int, text: str | None, finish_reason: str | None, *,
               whole: bool = False, first: bool = False,
               logprobs: Sequence[TokenLogprob] = ()) -> dict[str, Any]:
        """A whole reply, or a streamed piece (`first`: the chat role's chunk)."""
        shaped = self._logprobs(index, logprobs) if self.with_logprobs and (
            logprobs or whole) else None
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": shaped,
                    "finish_reason": finish_reason}
        if whole:
            body: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
        elif first:
            body = {"delta": {"role": "assistant", "content": ""}}
        else:
            body = {"delta": {} if text is None else {"content": text}}
        return {"index": index, **body, "logprobs": shaped, "finish_reason": finish_reason}

    def _logprobs(self, index: int, tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
        """OpenAI's two shapes: chat's `content` list, the legacy completions' columns."""
        if self.chat:
            return {"content": [{**_token(t.token, t.logprob), "top_logprobs": [
                _token(alt, lp) for alt, lp in t.top]} for t in tokens], "refusal": None}
        offsets = []
        for t in tokens:
            offsets.append(self._offsets[index])
            self._offsets[index] += len(_text(t.token))
        return {"tokens": [_text(t.token) for t in tokens],
                "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{_text(alt): lp for alt, lp in t.top} for t in tokens],
                "text_offset": offsets}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def error_response(self, error: ChatStreamError) -> web.Response:
        return openai_error_response(error)


def _text(token: bytes) -> str:
    # A token may be part of a UTF-8 character: its text shows U+FFFD there, its `bytes`
    # are exact (as OpenAI's own).
    return token.decode("utf-8", errors="replace")


def _token(token: bytes, logprob: float) -> dict[str, Any]:
    return {"token": _text(token), "logprob": logprob, "bytes": list(token)}


def _finish_reason(reason: FinishReason | str) -> str:
    return "length" if reason == "length" else "stop"


def _finish_reasons(finished: Finished, n: int) -> list[str]:
    reasons = finished.choices or (finished.reason,) * n
    return [_finish_reason(reason) for reason in reasons]


class JSONBody(_Completion):
    """`stream: false`: one `chat.completion` object once the reply is complete."""

    headers_sent = False

    def __init__(self, request: web.Request, served: ServedModel,
                 completion: CompletionRequest) -> None:
        super().__init__(request, served, completion)
        self._texts: list[list[str]] = [[] for _ in range(self.n)]
        self._tokens: list[list[TokenLogprob]] = [[] for _ in range(self.n)]
        self._finished: Finished | None = None

    async def open(self, started: Started) -> None:
        pass

    async def send(self, piece: Piece) -> None:
        self._texts[piece.choice].append(piece.text)
        self._tokens[piece.choice].extend(piece.logprobs)

    async def close(self, finished: Finished) -> None:
        self._finished = finished

    async def abort(self, error: BaseException) -> None:
        pass  # never called: no header goes out before the end

    def response_for(self, exchange: Outcome) -> web.StreamResponse:
        if exchange.error is not None:
            return self.error_response(exchange.error)
        if exchange.status != "success" or self._finished is None:
            return web.Response(status=499)  # the client left: nobody reads this
        reasons = _finish_reasons(self._finished, self.n)
        return web.json_response({
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [self._whole(i, reasons[i]) for i in range(self.n)],
            "usage": self.usage(exchange.usage.prompt_tokens,
                                exchange.usage.completion_tokens),
        }, dumps=dumps)


    def _whole(self, index: int, reason: str) -> dict[str, Any]:
        text = "".join(self._texts[index])
        if not self.chat:
            return self.choice(index, text, reason, whole=True, logprobs=self._tokens[index])
        reasoning, content = split_reasoning(text, opened=self.completion.reasoning_opened)
        choice = self.choice(index, content, reason, whole=True, logprobs=self._tokens[index])
        if reasoning is not None:
            choice["message"]["reasoning_content"] = reasoning
        return choice


class EventStream(_Completion):
    """`stream: true`: `chat.completion.chunk` events, then `data: [DONE]`."""

    response: EventSourceResponse | None = None

    def __init__(self, request: web.Request, served: ServedModel,
                 completion: CompletionRequest) -> None:
        super().__init__(request, served, completion)
        self._splitters = [ReasoningSplitter(opened=completion.reasoning_opened)
                           for _ in range(self.n)] if self.chat else []
        # The logprobs of text a splitter holds back go out with the text that releases it.
        self._held_logprobs: list[list[TokenLogprob]] = [[] for _ in range(self.n)]

    @property
    def headers_sent(self) -> bool:
        return self.response is not None and self.response.prepared

    async def open(self, started: Started) -> None:
        self.response = _event_source_response()
        await self.response.prepare(self.request)
        if self.chat:
            for index in range(self.n):
                await self._chunk(self.choice(index, None, None, first=True))

    async def send(self, piece: Piece) -> None:
        if not self.chat:
            await self._content(piece.choice, piece.text, piece.logprobs)
            return
        reasoning, content = self._splitters[piece.choice].feed(piece.text)
        held = self._held_logprobs[piece.choice]
        held.extend(piece.logprobs)
        if reasoning or content:
            logprobs, held[:] = tuple(held), []
            await self._split(piece.choice, reasoning, content, logprobs)

    async def _split(self, index: int, reasoning: str, content: str,
                     logprobs: Sequence[TokenLogprob]) -> None:
        """A piece's thinking as a `reasoning_content` delta, its answer as `content`; its
        logprobs go with the last of them."""
        if reasoning:
            delta = {"reasoning_content": reasoning}
            await self._chunk({"index": index, "delta": delta, "logprobs": self._logprobs(
                index, logprobs) if self.with_logprobs and logprobs and not content else None,
                "finish_reason": None})
        if content:
            await self._content(index, content, logprobs)

    async def _content(self, index: int, text: str, logprobs: Sequence[TokenLogprob]) -> None:
        await self._chunk(self.choice(index, text, None, logprobs=logprobs))

    async def _end_reasoning(self) -> None:
        """What the splitters held back, at the end of the reply."""
        for index, splitter in enumerate(self._splitters):
            reasoning, content = splitter.finish()
            logprobs, self._held_logprobs[index] = tuple(self._held_logprobs[index]), []
            await self._split(index, reasoning, content, logprobs)

    async def close(self, finished: Finished) -> None:
        await self._end_reasoning()
        for index, reason in enumerate(_finish_reasons(finished, self.n)):
            await self._chunk(self.choice(index, None, reason))
        if self.completion.include_usage:
            usage = self.usage(finished.prompt_tokens, finished.completion_tokens)
            await self._event({**self._head(), "choices": [], "usage": usage})
        await self._event("[DONE]")
        assert self.response is not None
        await self.response.write_eof()

    async def abort(self, error: BaseException) -> None:
        # An error event (the `openai` client raises it as an APIError), then drop the
        # connection: no [DONE], so no client mistakes the reply for a complete one.
        problem = error if isinstance(error, ChatStreamError) else GenerationFailed(
            "The model failed while generating the reply.")
        try:
            await self._event({"error": {"message": problem.message, "type": "server_error",
                                         "param": None, "code": problem.code}})
        except ConnectionError:
            pass
        if self.request.transport is not None:
            self.request.transport.close()

    def response_for(self, exchange: Outcome) -> web.StreamResponse:
        if self.response is not None and self.response.prepared:
            self.response.stop_streaming()   # its keep-alive pings end with the stream
            return self.response
        if exchange.error is not None:
            return self.error_response(exchange.error)
        return web.Response(status=499)  # the client left before the headers

    def _head(self) -> dict[str, Any]:
        return {"id": self.id,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    async def _chunk(self, choice: dict[str, Any]) -> None:
        chunk = {**self._head(), "choices": [choice]}
        if self.completion.include_usage:
            chunk["usage"] = None   # as OpenAI: every chunk but the last has usage null
        await self._event(chunk)

    async def _event(self, data: dict[str, Any] | str) -> None:
        assert self.response is not None
        text = data if isinstance(data, str) else dumps(data)
        try:
            await self.response.send(text)
        except TimeoutError as stalled:  # aiohttp-sse aborted a client that stopped reading
            raise ConnectionError("the client stopped reading") from stalled


def _event_source_response() -> EventSourceResponse:
    # "\n" ends lines as OpenAI's own stream does (aiohttp-sse defaults to "\r\n").
    # aiohttp-sse >= 3.0 refuses non-GET requests unless told; 2.x (Python 3.10) has no flag.
    try:
        return EventSourceResponse(sep="\n", allow_all_methods=True)  # type: ignore[call-arg,unused-ignore]
    except TypeError:
        return EventSourceResponse(sep="\n")


def dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


# -- replies that may call tools -------------------------------------------------------------
def _openai_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


class ToolCallsBody(JSONBody):
    """`stream: false` with tools: the reply read whole, its calls in `message.tool_calls`."""

    def choice(self, index: int, text: str | None, finish_reason: str | None, *,
               whole: bool = False, first: bool = False,
               logprobs: Sequence[TokenLogprob] = ()) -> dict[str, Any]:
        choice = super().choice(index, text, finish_reason, whole=whole, first=first,
                                logprobs=logprobs)
        plan = self.completion.tools
        if not whole or plan is None:
            return choice
        cut = finish_reason == "length"
        reply = read_reply(plan.decoder(), text or "", cut=cut)
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.calls:
            message["content"] = reply.content.strip() or None
            message["tool_calls"] = [_openai_call(c) for c in reply.calls]
            if not cut:                       # a cut call keeps "length", as OpenAI's does
                choice["finish_reason"] = "tool_calls"
        choice["message"] = message
        return choice


class ToolCallsStream(EventStream):
    """`stream: true` with tools: text as it comes, then each call as deltas, then
    `finish_reason: "tool_calls"`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        plan = self.completion.tools
        assert plan is not None
        self.decoder = plan.decoder()
        self.called = False

    async def _content(self, index: int, text: str, logprobs: Sequence[TokenLogprob]) -> None:
        shown = self.decoder.feed(text)   # one choice, no logprobs (protocol.py)
        if shown:
            await super()._content(index, shown, ())

    async def close(self, finished: Finished) -> None:
        await self._end_reasoning()     # the answer after a thinking section is read for calls
        end = self.decoder.finish(cut=finished.reason == "length")
        if end.content:
            await super()._content(0, end.content, ())
        for index, call in enumerate(end.calls):
            head = {"index": index, "id": call.id, "type": "function",
                    "function": {"name": call.name, "arguments": ""}}
            await self._chunk(self._delta({"tool_calls": [head]}))
            await self._chunk(self._delta(
                {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}))
        self.called = bool(end.calls)
        await super().close(finished)

    def choice(self, index: int, text: str | None, finish_reason: str | None, *,
               whole: bool = False, first: bool = False,
               logprobs: Sequence[TokenLogprob] = ()) -> dict[str, Any]:
        choice = super().choice(index, text, finish_reason, whole=whole, first=first,
                                logprobs=logprobs)
        if finish_reason not in (None, "length") and self.called:
            choice["finish_reason"] = "tool_calls"
        return choice

    @staticmethod
    def _delta(delta: dict[str, Any]) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
