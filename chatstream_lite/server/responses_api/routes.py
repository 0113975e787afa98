"""OpenAI's Responses API: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`,
`GET /v1/responses/{id}/input_items`.

    ResponsesAPI(chat_stream).add_routes(app)    # create_app() does this; the session store's
                                                 # response store keeps `store: true` replies
    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused-or-your-key")
    first = client.responses.create(model="any", input="Hi", max_output_tokens=32)
    client.responses.create(model="any", input="And then?", previous_response_id=first.id)

The server keeps the conversation (OpenAI's `store`, true by default): a response is written
to the session store's response store (memory, or Redis shared by every replica) before the
client sees its end, so `previous_response_id` continues it on any replica. A stored
response is reachable only by its owner: with `--api-key`, requests carrying that key (its
digest is stored with the response, so a response made under another key, or before a key
was set, is not found); without a key, anyone who holds its id (256 random bits). Everything
else is every endpoint's: the API key, the body limits, the one bounded queue, the disconnect
detection, the metrics (endpoint "responses").
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from aiohttp import hdrs, web

from ...errors import BadRequest, ChatStreamError
from ...sessions import MemoryResponseStore, ResponseStore, StoredResponse
from ..chat_request import parse_off_loop, read_body
from ..handler import Accepted, serve_exchange
from ..openai.routes import HasRuntime, OpenAIAPI
from ..responses import openai_error_response
from ..runtime import Runtime
from .framing import ResponseBody, ResponseStream, Turn
from .protocol import RESPONSE_ID, parse_responses_request, responses_names

__all__ = ["ENDPOINT", "ResponseNotFound", "ResponsesAPI", "owner_of"]

ENDPOINT = "responses"               # this endpoint's name in metrics and logs
MAX_LIST = 100                       # input_items' `limit`, as OpenAI's
# A credential is stored only as this digest (salted, slow): a leaked store gives no key.
_OWNER_SALT = b"chatstream_lite /v1/responses owner"
_OWNER_ROUNDS = 10_000


class ResponseNotFound(ChatStreamError):
    status = 404
    code = "not_found"


class ResponsesAPI:
    """The Responses API's routes over one runtime and one response store."""

    def __init__(self, runtime: Runtime | HasRuntime,
                 responses: ResponseStore | None = None) -> None:
        self.runtime = runtime if isinstance(runtime, Runtime) else runtime.runtime
        if responses is None:
            store = getattr(runtime, "session_store", None)     # a ChatStream's
            responses = getattr(store, "responses", None) or MemoryResponseStore()
        self.responses: ResponseStore = responses
        self._openai = OpenAIAPI(self.runtime)      # the served model's name
        self._owners: dict[str, str] = {}

    def add_routes(self, app: web.Application, prefix: str = "/v1") -> None:
        app.router.add_post(f"{prefix}/responses", self.handle_create)
        app.router.add_get(f"{prefix}/responses/{{response_id}}", self.handle_get)
        app.router.add_delete(f"{prefix}/responses/{{response_id}}", self.handle_delete)
        app.router.add_get(f"{prefix}/responses/{{response_id}}/input_items",
                           self.handle_input_items)

    def owner(self, request: web.Request) -> str:
        """Who a stored response belongs to: a digest of the key that passed the check
        (`api_key.check` ran first), "" on a server without one."""
        if not self.runtime.api_key.protects(request.path):
            return ""
        given = request.headers.get(hdrs.AUTHORIZATION, "")
        # Anthropic's header is taken too where the key check takes it.
        key = given[len("Bearer "):] if given.startswith("Bearer ") else \
            request.headers.get("x-api-key", "")
        if key not in self._owners:
            self._owners = {key: owner_of(key)}      # one key at a time: keep the last
        return self._owners[key]

    async def handle_create(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/responses`: a reply to `input`, after the stored conversation it
        continues (`previous_response_id`), streamed or whole; stored unless `store: false`."""
        runtime = self.runtime

        async def admit() -> Accepted:
            runtime.api_key.check(request)
            limits = runtime.config.limits
            body = await read_body(request, limits.max_body_size, limits.body_timeout)
            call = await parse_off_loop(parse_responses_request, body, limits.max_messages)
            model = runtime.require_model()
            owner = self.owner(request)
            conversation: list[dict[str, Any]] = []
            previous = call.request.previous_response_id
            if previous is not None:
                stored = await self.responses.get(previous, owner)
                if stored is None:
                    raise BadRequest(f"Previous response with id {previous!r} not found.",
                                     param="previous_response_id")
                conversation = list(stored.record.get("conversation", []))
            # In a worker thread: tools and text.format build grammars.
            completion = await asyncio.to_thread(
                call.request.completion, [*conversation, *call.items], runtime.defaults,
                runtime.config.generation.system_prompt, model)
            turn = Turn(call, completion, self._openai.served_model(), conversation,
                        None if call.request.store is False else self.responses, owner)
            try:
                job = runtime.submit(completion.messages, completion.params, drop_oldest=False)
            except BadRequest as error:      # the stored turns and `input` over the limits
                raise type(error)(responses_names(error.message), param=responses_names(
                    error.param) if error.param is not None else None) from None
            framing = ResponseStream if completion.stream else ResponseBody
            return Accepted(job, framing(request, turn))

        return await serve_exchange(runtime, ENDPOINT, request, admit, openai_error_response)

    async def _stored(self, request: web.Request) -> StoredResponse:
        self.runtime.api_key.check(request)
        response_id = request.match_info["response_id"]
        stored = await self.responses.get(response_id, self.owner(request)) \
            if RESPONSE_ID.fullmatch(response_id) else None
        if stored is None:
            # The same answer for an id that never was, expired, or is another owner's.
            raise ResponseNotFound(f"No response with id {response_id[:80]!r} found.",
                                   param="response_id")
        return stored

    async def handle_get(self, request: web.Request) -> web.Response:
        """`GET /v1/responses/{id}`: the stored response."""
        try:
            stored = await self._stored(request)
        except ChatStreamError as error:
            self.runtime.request_rejected(f"{ENDPOINT}_get", error)
            return openai_error_response(error)
        return web.json_response(stored.record["response"])

    async def handle_delete(self, request: web.Request) -> web.Response:
        """`DELETE /v1/responses/{id}`: forget a stored response (a conversation that went
        on from it keeps its own copy of the turns)."""
        try:
            stored = await self._stored(request)
            await self.responses.delete(stored.response_id, stored.owner)
        except ChatStreamError as error:
            self.runtime.request_rejected(f"{ENDPOINT}_delete", error)
            return openai_error_response(error)
        return web.json_response({"id": stored.response_id, "object": "response.deleted",
                                  "deleted": True})

    async def handle_input_items(self, request: web.Request) -> web.Response:
        """`GET /v1/responses/{id}/input_items`: the items that request sent (`limit` 1-100,
        `order` desc by default, `after`/`before` an item id), as OpenAI pages them."""
        try:
            stored = await self._stored(request)
            items: list[dict[str, Any]] = list(stored.record.get("input_items", []))
            limit, order = _list_query(request)
            if order == "desc":
                items.reverse()
            items = _page_from(items, request.query.get("after"), "after")
            items = _page_from(items, request.query.get("before"), "before")
        except ChatStreamError as error:
            self.runtime.request_rejected(f"{ENDPOINT}_input_items", error)
            return openai_error_response(error)
        page = items[:limit]
        return web.json_response({
            "object": "list", "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit})


def _page_from(items: list[dict[str, Any]], mark: str | None, name: str
               ) -> list[dict[str, Any]]:
    """The items after (or before) the one whose id is `mark`, in the listing's order."""
    if mark is None:
        return items
    ids = [item.get("id") for item in items]
    if mark not in ids:
        raise BadRequest(f"'{name}' is not an item of this response.", param=name)
    at = ids.index(mark)
    return items[at + 1:] if name == "after" else items[:at]


def _list_query(request: web.Request) -> tuple[int, str]:
    limit_text = request.query.get("limit", "20")
    if not (limit_text.isascii() and limit_text.isdigit() and
            1 <= int(limit_text[:4]) <= MAX_LIST and len(limit_text) <= 3):
        raise BadRequest(f"'limit' must be an integer from 1 to {MAX_LIST}.", param="limit")
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("'order' must be asc or desc.", param="order")
    return int(limit_text), order


def owner_of(key: str) -> str:
    """The digest a stored response keeps of the key it was made with."""
    return hashlib.pbkdf2_hmac("sha256", key.encode("utf-8", "surrogateescape"), _OWNER_SALT,
                               _OWNER_ROUNDS).hex()
