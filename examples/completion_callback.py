"""The seed's completion callback: when the stream ends, print the session's whole prompt.

    python examples/completion_callback.py
"""

from aiohttp import web

from chatstream_lite import ChatStream

chat_stream = ChatStream()
app = web.Application()
chat_stream.setup(app)


async def stream_api(request: web.Request) -> web.StreamResponse:
    def callback_func(request: web.Request, message: str) -> None:
        # message: success | client_disconnected_while_streaming |
        #          client_disconnected_before_streaming | unknown_error_occurred
        print(f"[{message}]")
        print(chat_stream.get_chat_prompt(request).create_prompt())

    return await chat_stream.handle_chat_stream_request(request, callback=callback_func)


app.router.add_post("/chat_stream", stream_api)

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=8080)
