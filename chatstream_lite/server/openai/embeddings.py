"""`POST /v1/embeddings`: OpenAI's embeddings over the served model (mean pooling, L2-normalized).

    client.embeddings.create(model="any", input=["first text", "second text"])
    # {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [...]}, ...],
    #  "model": "...", "usage": {"prompt_tokens": 9, "total_tokens": 9}}

`input` is a string, a list of strings, a list of token ids, or a list of such lists;
`encoding_format` `float` or `base64` (little-endian float32, what the `openai` client asks for
when numpy is installed); `dimensions` only at the model's own width. Texts are tokenized in
a worker thread (as data: control-token text stays characters). The request takes one place
of the runtime's bounded queue, and the engine reads it between generation steps
(engine/embeddings.py); a client that leaves stops it before its next batch.
"""

from __future__ import annotations

import base64
import struct
from typing import Literal

from aiohttp import web
from pydantic import Field

from ...engine import ModelInfo
from ...errors import BadRequest, ChatStreamError, ContextLengthExceeded, GenerationFailed
from ...status import StreamStatus
from ..chat_request import parse_json_object, parse_off_loop, read_body
from ..request_model import RequestModel, validate
from ..responses import openai_error_response
from ..runtime import Runtime

__all__ = ["ENDPOINT", "MAX_INPUTS", "EmbeddingsRequest", "handle_embeddings",
           "parse_embeddings_request"]

ENDPOINT = "embeddings"          # this endpoint's name in metrics and logs
MAX_INPUTS = 2048                # OpenAI's limit of inputs per request
IGNORED = {"model", "user"}


class EmbeddingsRequest(RequestModel):
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)


def parse_embeddings_request(body: bytes, model: ModelInfo, max_chars: int
                             ) -> tuple[EmbeddingsRequest, list[list[int]]]:
    """The request and its inputs as token ids, each checked: non-empty, ids within the
    vocabulary, at most the engine's `max_embedding_tokens`; at most `MAX_INPUTS` inputs and
    `max_chars` characters of text in all. Runs in a worker thread (it tokenizes)."""
    data = parse_json_object(body)
    for name, value in data.items():
        if name not in EmbeddingsRequest.model_fields and name not in IGNORED and \
                value is not None:
            raise BadRequest(f"Unsupported parameter: '{name}'.", param=name)
    raw = data.get("input")
    if isinstance(raw, list) and not 1 <= len(raw) <= MAX_INPUTS:
        raise BadRequest(f"'input' must hold 1 to {MAX_INPUTS} inputs.", param="input")
    request = validate(EmbeddingsRequest, {k: v for k, v in data.items() if k not in IGNORED})
    if request.dimensions is not None and request.dimensions != model.n_embd:
        raise BadRequest(f"'dimensions' is not supported: this model's embeddings have "
                         f"{model.n_embd} dimensions.", param="dimensions")
    value = request.input
    texts: list[str] | None = None
    if isinstance(value, str):
        texts = [value]
    elif value and all(isinstance(v, str) for v in value):
        texts = [v for v in value if isinstance(v, str)]
    if texts is not None:
        if sum(len(text) for text in texts) > max_chars:
            raise BadRequest(f"'input' is too long: at most {max_chars} characters in all "
                             "(max_input_chars).", param="input")
        if not all(texts):
            raise BadRequest("'input' must not hold an empty string.", param="input")
        bos = [model.tokenizer.tokenize(model.chat_template.bos_token, special=True)
               ] if model.add_bos else []
        inputs = [[*(bos[0] if bos else []), *model.tokenizer.tokenize(text, special=False)]
                  for text in texts]
    elif value and all(isinstance(v, int) for v in value):
        inputs = [[v for v in value if isinstance(v, int)]]
    else:
        inputs = [v for v in value if isinstance(v, list)]
    top = model.n_vocab - 1
    several = isinstance(value, list) and not all(isinstance(v, int) for v in value)
    for index, tokens in enumerate(inputs):
        where = f"input[{index}]" if several else "input"
        if not tokens:
            raise BadRequest(f"'{where}' must not be empty.", param=where)
        if model.n_vocab and not all(0 <= token <= top for token in tokens):
            raise BadRequest(f"'{where}' holds a token id outside 0 to {top}.", param=where)
        if len(tokens) > model.max_embedding_tokens:
            raise ContextLengthExceeded(
                f"'{where}' is {len(tokens)} tokens long; this server embeds at most "
                f"{model.max_embedding_tokens} tokens per input.", param=where)
    return request, inputs


async def handle_embeddings(runtime: Runtime, request: web.Request, model_name: str
                            ) -> web.Response:
    """`POST /v1/embeddings` (see the module docstring)."""
    try:
        runtime.api_key.check(request)
        limits = runtime.config.limits
        body = await read_body(request, limits.max_body_size, limits.body_timeout)
        info = runtime.require_model()
        if info.n_embd <= 0:
            raise BadRequest("This engine has no embeddings.", param="input")
        parsed, inputs = await parse_off_loop(parse_embeddings_request, body, info,
                                              limits.max_input_chars, always=True)
        job, vectors = runtime.admission.submit_embeddings(inputs)
    except ChatStreamError as error:
        runtime.request_rejected(ENDPOINT, error)
        return openai_error_response(error)
    watch = runtime.disconnects.watch(request.transport, job.cancel)
    try:
        embeddings = await vectors
    except ConnectionAbortedError:
        embeddings = None
    except Exception as error:  # noqa: BLE001 - the engine failed the batch (or died)
        runtime.metrics.requests.labels(ENDPOINT, str(StreamStatus.UNKNOWN_ERROR_OCCURRED)
                                        ).inc()
        failure = error if isinstance(error, ChatStreamError) else GenerationFailed(
            "The model failed to compute the embeddings.")
        return openai_error_response(failure)
    finally:
        watch.cancel()
    if embeddings is None or job.cancelled:
        runtime.metrics.requests.labels(
            ENDPOINT, str(StreamStatus.CLIENT_DISCONNECTED_BEFORE_STREAMING)).inc()
        return web.Response(status=499)        # the client left: nobody reads this
    runtime.metrics.requests.labels(ENDPOINT, str(StreamStatus.SUCCESS)).inc()
    tokens = sum(len(tokens) for tokens in inputs)
    as_base64 = parsed.encoding_format == "base64"
    return web.json_response({
        "object": "list", "model": model_name,
        "data": [{"object": "embedding", "index": index,
                  "embedding": _base64(vector) if as_base64 else vector}
                 for index, vector in enumerate(embeddings)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")

