"""The HTTP layer: aiohttp handlers, framings, sessions' conversations, health and metrics.

    HTTP -> handler.serve_exchange -> Runtime.submit (engine.Admission) -> Exchange -> Framing

`chat_stream` (ChatStream's API), `openai_api` (`/v1`), `runtime` (what endpoints share),
`conversations` (session histories), `framing` (wire formats), `exchange` (one request's
relay), `handler` (the shared skeleton), `disconnects`, `health`, `metrics`, `responses`.
"""
