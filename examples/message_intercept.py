"""The seed's "message intercept": read the body first, then hand it to ChatStream.

    python examples/message_intercept.py
"""

import json
import logging

from aiohttp import web

from chatstream_lite import ChatStream

log = logging.getLogger("intercept")
chat_stream = ChatStream()
app = web.Application()
chat_stream.setup(app)


async def stream_api(request: web.Request) -> web.StreamResponse:
    request_body = await request.read()
    data = json.loads(request_body)
    log.info("user_input:%s regenerate:%s", data.get("user_input"), data.get("regenerate"))
    # Having read the body, pass it on as `request_body`.
    return await chat_stream.handle_chat_stream_request(request, request_body)


app.router.add_post("/chat_stream", stream_api)

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    web.run_app(app, host="127.0.0.1", port=8080)
