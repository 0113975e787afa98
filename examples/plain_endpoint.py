"""The seed's first snippet in aiohttp: a /chat_stream endpoint, nothing else.

    python examples/plain_endpoint.py            # then:
    curl -N -c jar -b jar -H 'Content-Type: application/json' \
         -d '{"user_input": "Hello!"}' http://127.0.0.1:8080/chat_stream
"""

from aiohttp import web

from chatstream_lite import ChatStream

chat_stream = ChatStream()  # the embedded default model; ChatStream(model_path="...gguf") for yours
app = web.Application()
chat_stream.setup(app)  # sessions + engine start/stop on the app's lifecycle


async def stream_api(request: web.Request) -> web.StreamResponse:
    return await chat_stream.handle_chat_stream_request(request)


app.router.add_post("/chat_stream", stream_api)

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=8080)
