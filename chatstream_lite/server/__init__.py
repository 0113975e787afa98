"""The HTTP layer: aiohttp handlers, framings, sessions' conversations, health and metrics.

    HTTP -> handler.serve_exchange -> Runtime.submit (engine.Admission) -> Exchange -> Framing

`chat_stream` (ChatStream's API), `openai/` (OpenAI's wire format: `/v1`), `anthropic/`
(Anthropic's Messages API: `/v1/messages`), `reasoning` (a reply's thinking apart), `runtime` (what
endpoints share: config, engine, admission, health, metrics, API key), `app` (the standalone
application), `conversations` (session histories), `chat_request` and `request_model`
(bodies read and validated), `framing` (the framing protocol, text/plain), `exchange` (one
request's relay), `handler` (the shared skeleton), `auth`, `cors`, `connections` (with
`aiohttp_internals`), `disconnects`, `health`, `metrics`, `responses`.
"""

__all__: list[str] = []
