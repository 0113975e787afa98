"""The engine layer: admission, input preparation, scheduling, and the engines behind one seam.

    HTTP handler -> Admission.submit() -> prepare (worker) -> queue -> Engine.run(job)
                                                              -> events -> job.events()

Nothing here imports the HTTP layer, and nothing but `engine.llama` imports llama_cpp, so
`MockEngine` and the request path work without it. Modules: `admission` (the bounded queue,
time limits, drain), `prepare` (template, tokens, fitting), `template`, `job`, `events`,
`protocol` (the `Engine` seam), `scheduler` (the step plan), `tools` (function calling's
formats), `kv_slots`, `text`, `faults`, `mock`, and `llama` (the model, runner and thread).
"""

from .admission import Admission
from .events import Event, Failed, Finished, FinishReason, Piece, Started, TokenLogprob
from .faults import Faults
from .job import Job, PlainPrompt, Prompt, PromptInput
from .protocol import Engine, EngineStats, ModelInfo
from .sampling import SamplingParams
from .template import ChatTemplate, Message

__all__ = [
    "Admission",
    "ChatTemplate",
    "Engine",
    "EngineStats",
    "Event",
    "Failed",
    "Faults",
    "FinishReason",
    "Finished",
    "Job",
    "Message",
    "ModelInfo",
    "Piece",
    "PlainPrompt",
    "Prompt",
    "PromptInput",
    "SamplingParams",
    "Started",
    "TokenLogprob",
]
