"""Continuous batching on the engine thread: every running job advances in every step.

    >>> batcher = Batcher(config, stats, emit, n_threads)   # emit(job, event): the outbox
    >>> model = batcher.load()
    >>> batcher.admit(job)        # render, fit, pick its KV slot (prefix reuse); emits Started
    >>> while batcher.active:
    ...     batcher.read_prompts()   # the next chunk of the prompts being read
    ...     batcher.generate()       # one llama_decode: a token for every generating job

A step reads the next `n_batch`-token chunk of the prompts still being read (oldest job
first, up to `n_batch` tokens in all), then decodes, in one `llama_decode`, the token every
generating job sampled last. So a long new prompt is read in chunks between the other
streams' tokens instead of freezing them, and a job cancelled while its prompt is read stops
within one chunk. New jobs join between steps; finished or cancelled ones leave before the
next one.

Each prompt chunk is decoded on its own, in the same chunks as if the job were alone, and
every sequence has a KV stream of its own: measured on CPU, each job's logits are then
bit-identical to running it alone, so greedy replies do not depend on what else runs. (A
prompt chunk batched with other sequences' tokens changes its logits, and so the reply.)
With one job the batches are exactly llama-cpp-python's: the prompt in `n_batch` chunks,
then one token per decode.

Everything here runs on the engine thread; events go out through `emit`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import llama_cpp

from .errors import ChatStreamError
from .job import Event, Failed, Finished, FinishReason, Job, Piece, Started
from .kv_slots import KVSlots, Slot
from .model import Model
from .pieces import TextAssembler
from .prompt import ChatTemplate, Message, fit_to_context
from .sampling import SamplerChain

if TYPE_CHECKING:
    from .engine import EngineConfig, EngineStats

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Sequence:
    """One running job on the thread: its prompt, KV slot, sampler and reply so far."""

    job: Job
    slot: Slot
    prompt: list[int]
    sampler: SamplerChain
    text: TextAssembler
    started: float
    pending: int = -1           # the token sampled last, decoded in the next step
    row: int = -1               # its batch row in this step's generation batch
    generated: int = 0
    prompt_done: float = 0.0

    @property
    def reading(self) -> bool:
        return len(self.slot.tokens) < len(self.prompt)


class Batcher:
    def __init__(self, config: EngineConfig, stats: EngineStats,
                 emit: Callable[[Job, Event], None], n_threads: int) -> None:
        self.config = config
        self.stats = stats
        self.emit = emit
        self.n_threads = n_threads
        # A test hook, called before each token is emitted with its index; whatever it raises
        # fails that job as a model error would (see Engine.fault_hook).
        self.fault_hook: Callable[[int], None] | None = None
        self._model: Model | None = None
        self._slots: KVSlots | None = None
        self.template: ChatTemplate | None = None
        self._sequences: list[_Sequence] = []

    @property
    def active(self) -> bool:
        return bool(self._sequences)

    # -- lifecycle ------------------------------------------------------------------------------
    def load(self) -> Model:
        """Load the model and its context; the chat template is `self.template` afterwards."""
        cfg = self.config
        gpu = llama_cpp.llama_supports_gpu_offload()
        # One sequence per running job; each keeps its cells when its job ends, so an idle
        # session's next turn finds them unless a newer session needed the slot.
        n_seq = cfg.num_of_concurrent_executions
        log.info(
            "loading %s (n_ctx=%d, n_gpu_layers=%d, n_threads=%d, parallel=%d); GPU offload %s",
            cfg.model_path, cfg.n_ctx, cfg.n_gpu_layers, self.n_threads,
            cfg.num_of_concurrent_executions,
            "supported" if gpu else "not supported by this llama-cpp-python build (CPU only)",
        )
        model = Model.load(cfg.model_path, n_ctx=cfg.n_ctx, n_batch=cfg.n_batch, n_seq=n_seq,
                           n_gpu_layers=cfg.n_gpu_layers, n_threads=self.n_threads,
                           verbose=cfg.verbose)
        template_text = model.metadata.get("tokenizer.chat_template")
        if not template_text:
            model.close()
            raise ValueError(f"{cfg.model_path} has no tokenizer.chat_template in its metadata")
        self.template = ChatTemplate(template_text, bos_token=model.token_text(model.bos_token),
                                      eos_token=model.token_text(model.eos_token))
        self._model = model
        self._slots = KVSlots(model, model.n_seq)
        return model

    def close(self) -> None:
        for seq in list(self._sequences):
            self._finish(seq, "cancelled")
        if self._model is not None:
            self._model.close()
            self._model = None

    # -- joining --------------------------------------------------------------------------------
    def admit(self, job: Job) -> None:
        """Start a job: fit its conversation, pick its KV slot, announce it with `Started`."""
        model, slots, template = self._model, self._slots, self.template
        assert model is not None and slots is not None and template is not None
        if job.cancelled:
            self.stats.jobs_skipped += 1
            self.emit(job, Finished("cancelled", reached_model=False))
            return
        params = job.params
        try:
            prompt, dropped = fit_to_context(job.messages, self._encode,
                                             model.n_ctx - params.max_new_tokens)
        except ChatStreamError as error:  # the request's own fault, e.g. PromptTooLong
            self.emit(job, Failed(error))
            return
        except Exception as error:  # noqa: BLE001 - a template error ends this job only
            log.exception("rendering the prompt failed")
            self.emit(job, Failed(error))
            return
        stops = [s for s in (template.eos_token, *params.stop) if s]
        slot, reused = slots.acquire(job.cache_key, prompt)
        self.stats.jobs_started += 1
        self.stats.prompt_tokens += len(prompt)
        self.stats.prompt_tokens_reused += reused
        self.emit(job, Started(len(prompt), dropped))
        self._sequences.append(_Sequence(
            job, slot, prompt, SamplerChain(params, model.n_vocab), TextAssembler(stops),
            started=time.monotonic(),
        ))

    def _encode(self, messages: list[Message]) -> list[int]:
        assert self.template is not None and self._model is not None
        rendered = self.template.render(messages)
        # BOS only when the template did not write it itself, as llama-cpp-python does.
        return self._model.tokenize(rendered.text, add_bos=not rendered.added_special)

    # -- one step -------------------------------------------------------------------------------
    def leave_cancelled(self) -> None:
        for seq in [s for s in self._sequences if s.job.cancelled]:
            self._finish(seq, "cancelled")

    def read_prompts(self) -> None:
        """Decode the next prompt chunk of the jobs still reading, oldest first.

        Each chunk is a `llama_decode` of its own with the boundaries it would have alone
        (`n_batch` tokens from where the reused prefix ends); at least one chunk per step,
        more while they fit in `n_batch` tokens together. A job whose prompt is done samples
        its first token at once.
        """
        model = self._model
        assert model is not None
        budget = model.batch.capacity
        for seq in [s for s in self._sequences if s.reading]:
            start = len(seq.slot.tokens)
            end = min(len(seq.prompt), start + model.batch.capacity)
            if seq.job.cancelled:
                self._finish(seq, "cancelled")
                continue
            if end - start > budget:
                return
            budget -= end - start
            batch = model.batch
            batch.clear()
            for pos in range(start, end):
                # Logits for the chunk's last token, as llama-cpp-python's Llama.eval asks.
                batch.add(seq.prompt[pos], pos, seq.slot.seq_id, pos == end - 1)
            if not self._decode([seq]):
                continue
            seq.slot.tokens.extend(seq.prompt[start:end])
            self.stats.prompt_tokens_evaluated += end - start
            if not seq.reading:
                seq.prompt_done = time.monotonic()
                self._sample(seq, batch.size - 1)

    def generate(self) -> None:
        """One `llama_decode` with the last sampled token of every generating job."""
        model = self._model
        assert model is not None
        # In sequence-id order: with a KV stream per sequence, llama.cpp splits a batch into
        # one forward pass per run of consecutive ids *in batch order* (split_equal with
        # sequential=true), so ids 3,0,1,2 cost two passes and 0,1,2,3 one. Admission order
        # would cost up to one pass per job.
        members = sorted((s for s in self._sequences if s.pending >= 0 and not s.job.cancelled),
                         key=lambda s: s.slot.seq_id)
        if not members:
            return
        batch = model.batch
        batch.clear()
        for seq in members:
            seq.row = batch.add(seq.pending, len(seq.slot.tokens), seq.slot.seq_id, True)
        if not self._decode(members):
            return
        self.stats.generation_steps += 1
        self.stats.generation_passes += forward_passes([s.slot.seq_id for s in members])
        for seq in members:
            seq.slot.tokens.append(seq.pending)
            seq.pending = -1
        for seq in members:
            self._sample(seq, seq.row)

    def _decode(self, members: list[_Sequence]) -> bool:
        assert self._model is not None and self._slots is not None
        status = self._model.decode()
        if status == 0:
            return True
        error = RuntimeError(f"llama_decode failed with status {status}")
        log.error("%s; failing the %d jobs in the batch", error, len(members))
        for seq in members:
            self._slots.clear(seq.slot)  # its cells are in an unknown state now
            self._fail(seq, error)
        return False

    def _sample(self, seq: _Sequence, row: int) -> None:
        assert self._model is not None
        try:
            self._take(seq, seq.sampler.sample(self._model.context, row))
        except Exception as error:  # noqa: BLE001 - fails this job, not the others
            log.exception("generation failed")
            self._fail(seq, error)

    def _take(self, seq: _Sequence, token: int) -> None:
        """One sampled token: end of reply, or a text piece and the next step's input."""
        assert self._model is not None
        job = seq.job
        if job.cancelled:
            self._finish(seq, "cancelled")
            return
        if self._model.is_end_of_generation(token):
            self._finish(seq, "stop")
            return
        if self.fault_hook is not None:
            self.fault_hook(seq.generated)
        seq.generated += 1
        piece, stopped = seq.text.add(self._model.piece(token))
        if piece:
            self.emit(job, Piece(piece))
        if stopped:
            self._finish(seq, "stop")
        elif seq.generated >= job.params.max_new_tokens or self._out_of_time(seq):
            self._finish(seq, "length")
        else:
            seq.pending = token

    def _out_of_time(self, seq: _Sequence) -> bool:
        """Whether the reply has used up `max_generation_time`, checked after every token.

        The clock starts when the prompt has been read (its first token is sampled then):
        prompt reading is bounded by `n_ctx` already, and a long prompt read in chunks
        between other streams' tokens must not use up the reply's time before its first
        token. A reply cut here ends like one cut by `max_new_tokens` ("length").
        """
        limit = self.config.max_generation_time
        return limit is not None and time.monotonic() - seq.prompt_done >= limit

    # -- leaving --------------------------------------------------------------------------------
    def _finish(self, seq: _Sequence, reason: FinishReason) -> None:
        if reason != "cancelled":
            tail = seq.text.flush()
            if tail:
                self.emit(seq.job, Piece(tail))
        now = time.monotonic()
        prompt_done = seq.prompt_done or now
        self.stats.completion_tokens += seq.generated
        self.emit(seq.job, Finished(reason, True, len(seq.prompt), seq.generated,
                                    prompt_done - seq.started, now - prompt_done))
        self._leave(seq)

    def _fail(self, seq: _Sequence, error: BaseException) -> None:
        self.stats.completion_tokens += seq.generated
        self.emit(seq.job, Failed(error))
        self._leave(seq)

    def _leave(self, seq: _Sequence) -> None:
        assert self._slots is not None
        seq.sampler.close()
        self._slots.release(seq.slot)
        self._sequences.remove(seq)

    def fail_everything(self, error: BaseException) -> None:
        """The thread is going down: no job may be left without its last event."""
        for seq in list(self._sequences):
            self._fail(seq, error)


def forward_passes(seq_ids: list[int]) -> int:
    """How many forward passes llama.cpp runs for one token of each of `seq_ids` (in batch
    order) when every sequence has its own KV stream: one per run of consecutive ids."""
    return sum(1 for i, seq_id in enumerate(seq_ids) if i == 0 or seq_id != seq_ids[i - 1] + 1)
