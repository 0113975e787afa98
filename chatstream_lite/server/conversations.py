"""Conversations: each session's history — loaded, locked, saved, and settled after a turn.

    conversations = Conversations(store, system_prompt="Be brief.",
                                  template=lambda: info.chat_template)
    session, session_id = await conversations.lock(request)   # SessionBusy (409) if in flight
    history = conversations.load(session)
    ...
    await conversations.save_streamed(request, response, session, history)
    await conversations.release(session_id)

A session holds one request at a time (the lock, cross-replica with Redis), and its history
is read once the lock is held. What the session keeps after a turn is decided in one place,
`settle`; a turn the client has received is the store's to keep (`SessionStore.store_turn`),
even while the store is away.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import aiohttp_session
from aiohttp import web
from aiohttp_session import Session, get_session

from ..engine import ChatTemplate
from ..errors import BadRequest, SessionBusy
from ..prompt import ChatPrompt
from ..sessions import SessionStore, ensure_identity
from ..status import StreamStatus
from .exchange import Exchange

__all__ = ["HISTORY_FIELD", "PROMPT_KEY", "Conversations"]

log = logging.getLogger(__name__)

PROMPT_KEY = "chatstream_lite.chat_prompt"   # request key: the session's ChatPrompt
HISTORY_FIELD = "chat"                       # session field holding ChatPrompt.to_dict()


class Conversations:
    def __init__(self, store: SessionStore, *, system_prompt: str | None,
                 template: Callable[[], ChatTemplate | None]) -> None:
        self.store = store
        self.system_prompt = system_prompt
        self._template = template

    # -- the lock ---------------------------------------------------------------------------
    async def lock(self, request: web.Request) -> tuple[Session, str]:
        """The request's session and its id, with its lock held; `SessionBusy` when a
        request holds it.

        The session is read again once the lock is held: the replica that held it may
        have written its turn between our first read and our lock (a turn kept through a
        Redis outage is written the moment Redis returns, just before its lock is freed),
        and no reply may be built on a history without it.
        """
        session = await get_session(request)
        session_id = ensure_identity(session)
        if not await self.store.locks.acquire(session_id):
            raise SessionBusy("This session already has a request in flight.")
        if session.new:
            return session, session_id
        try:
            current = await self.store.storage.load_session(request)
        except BaseException:
            await self.release(session_id)
            raise
        if current.identity != session_id:   # expired in between: keep what was read
            return session, session_id
        request[aiohttp_session.SESSION_KEY] = current
        return current, session_id

    async def release(self, session_id: str) -> None:
        await self.store.locks.release(session_id)

    # -- history ----------------------------------------------------------------------------
    def new(self) -> ChatPrompt:
        return ChatPrompt(self._template(), system=self.system_prompt)

    def load(self, session: Session) -> ChatPrompt:
        """The stored history; one that cannot be read is logged and started afresh (a
        stored history must never make a session unusable)."""
        prompt = self.new()
        stored = session.get(HISTORY_FIELD)
        if not stored:
            return prompt
        try:
            loaded = ChatPrompt.from_dict(stored, prompt.template)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            log.warning("a stored history could not be read (%s); the session starts afresh",
                        error)
            return prompt
        loaded.set_system(self.system_prompt)  # the server's setting wins over the stored one
        return loaded

    async def save(self, request: web.Request, response: web.StreamResponse, session: Session,
                   prompt: ChatPrompt) -> None:
        session[HISTORY_FIELD] = prompt.to_dict()
        await self.store.storage.save_session(request, response, session)

    async def save_streamed(self, request: web.Request, response: web.StreamResponse,
                            session: Session, prompt: ChatPrompt) -> None:
        """Store the turn just streamed. Never raises: the client has its reply, so a store
        that is away keeps the turn and writes it later (`SessionStore.store_turn`)."""
        session[HISTORY_FIELD] = prompt.to_dict()
        await self.store.store_turn(request, response, session)

    def get_chat_prompt(self, request: web.Request) -> ChatPrompt:
        """The `ChatPrompt` of this request's session, e.g. inside the completion callback."""
        prompt = request.get(PROMPT_KEY)
        if prompt is not None:
            return prompt  # type: ignore[no-any-return]
        session = request.get(aiohttp_session.SESSION_KEY)
        if session is None:
            raise LookupError("No session loaded for this request yet; call this from the "
                              "callback, or after `await aiohttp_session.get_session(request)`.")
        return self.load(session)

    # -- one turn ---------------------------------------------------------------------------
    @staticmethod
    def next_turn(history: ChatPrompt, user_input: str, regenerate: bool) -> ChatPrompt:
        """The conversation the model must answer: history + user message, or for a
        regenerate, the history without its last reply."""
        if regenerate:
            if history.last_reply() is None:
                raise BadRequest("Nothing to regenerate: this session has no reply yet.")
            return history.without_last_reply()
        turn = history.copy()
        turn.add_requester_msg(user_input)
        return turn

    @staticmethod
    def settle(history: ChatPrompt, turn: ChatPrompt, exchange: Exchange,
               prefix: str = "") -> ChatPrompt:
        """What the session keeps: the finished turn (a partial reply after a stop counts),
        or the history unchanged when nothing reached the user or generation failed.
        Dropped oldest turns leave the stored history too, so that `create_prompt()` is
        what the model saw. `prefix`: what the client saw before the model's text."""
        if exchange.status not in (StreamStatus.SUCCESS,
                                   StreamStatus.CLIENT_DISCONNECTED_WHILE_STREAMING):
            return history
        turn.add_responder_msg(prefix + exchange.reply)
        turn.drop_oldest_turns(exchange.dropped_messages)
        return turn
