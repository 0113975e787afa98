"""The scheduler, KV slots, text assembly and queue wait, without a model: fake outputs in,
the step plan and the events out (as vLLM tests its scheduler)."""

from __future__ import annotations

import asyncio

import pytest

from chatstream_lite.engine import (
    EngineStats,
    Event,
    Failed,
    Finished,
    Job,
    Piece,
    Prompt,
    SamplingParams,
    Started,
)
from chatstream_lite.engine.kv_slots import KVSlots
from chatstream_lite.engine.queue_wait import QueueWait
from chatstream_lite.engine.scheduler import (
    DecodeChunk,
    DecodeTokens,
    Sampled,
    SampleTokens,
    Scheduler,
)
from chatstream_lite.engine.text import TextAssembler

pytestmark = pytest.mark.timeout(30)


class FakeMemory:
    def __init__(self) -> None:
        self.forgotten: list[tuple[int, int]] = []
        self.copied: list[tuple[int, int, int]] = []

    def forget(self, seq_id: int, start: int = 0) -> None:
        self.forgotten.append((seq_id, start))

    def copy(self, src_seq_id: int, dst_seq_id: int, cells: int) -> None:
        self.copied.append((src_seq_id, dst_seq_id, cells))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _job(prompt: list[int], *, key: str | None = None, max_new_tokens: int = 8,
         stops: tuple[str, ...] = ()) -> Job:
    job = Job([], SamplingParams(max_new_tokens=max_new_tokens), cache_key=key)
    job.prompt = Prompt(prompt, 0, stops)
    return job


def _scheduler(slots: int = 4, n_batch: int = 8, exact: bool = False, **kwargs: object
               ) -> tuple[Scheduler, list[tuple[Job, Event]], FakeMemory]:
    events: list[tuple[Job, Event]] = []
    memory = FakeMemory()
    kwargs.setdefault("clock", Clock())
    scheduler = Scheduler(KVSlots(memory, slots, exact=exact), n_batch=n_batch,
                          emit=lambda job, event: events.append((job, event)),
                          stats=EngineStats(), **kwargs)  # type: ignore[arg-type]
    return scheduler, events, memory


def _read_all_prompts(scheduler: Scheduler) -> None:
    while chunks := scheduler.plan_prompts():
        for chunk in chunks:
            scheduler.chunk_read(chunk)


def _of(events: list[tuple[Job, Event]], job: Job) -> list[Event]:
    return [event for owner, event in events if owner is job]


def test_a_long_prompt_is_read_in_chunks_of_n_batch_and_shares_steps_with_others() -> None:
    scheduler, _, _ = _scheduler(n_batch=8)
    long, short = _job(list(range(20))), _job([1, 2, 3])
    scheduler.admit(long)
    scheduler.admit(short)
    first = scheduler.plan_prompts()
    # The oldest job's chunk first; the next job's chunk does not fit in the same step.
    assert [(c.start, c.end) for c in first] == [(0, 8)]
    for chunk in first:
        scheduler.chunk_read(chunk)
    second = scheduler.plan_prompts()
    assert [(c.start, c.end) for c in second] == [(8, 16)]
    for chunk in second:
        scheduler.chunk_read(chunk)
    third = scheduler.plan_prompts()
    assert [(c.start, c.end, c.last) for c in third] == [(16, 20, True), (0, 3, True)]


def test_generation_members_are_in_sequence_id_order() -> None:
    scheduler, _, _ = _scheduler(slots=4)
    jobs = [_job([i, 100 + i]) for i in range(4)]
    seqs = [scheduler.admit(job) for job in jobs]
    _read_all_prompts(scheduler)
    for seq in reversed(seqs):
        assert seq is not None
        scheduler.take(seq, 7, b"x", False)
    members = scheduler.plan_generation()
    assert [s.slot.seq_id for s in members] == sorted(s.slot.seq_id for s in members)


def test_tokens_become_pieces_until_max_new_tokens() -> None:
    scheduler, events, _ = _scheduler()
    job = _job([1, 2], max_new_tokens=3)
    seq = scheduler.admit(job)
    assert seq is not None
    _read_all_prompts(scheduler)
    for token in (10, 11, 12):
        scheduler.take(seq, token, f"t{token} ".encode(), False)
    assert _of(events, job)[0] == Started(2, 0)
    assert [e.text for e in _of(events, job) if isinstance(e, Piece)] == ["t10 ", "t11 ", "t12 "]
    finished = _of(events, job)[-1]
    assert isinstance(finished, Finished) and finished.reason == "length"
    assert finished.completion_tokens == 3
    assert not scheduler.active


def test_end_of_generation_and_stop_strings_end_the_reply_without_showing_the_stop() -> None:
    scheduler, events, _ = _scheduler()
    job = _job([1], stops=("<|im_end|>",))
    seq = scheduler.admit(job)
    assert seq is not None
    _read_all_prompts(scheduler)
    scheduler.take(seq, 5, b"Hello <|im", False)
    scheduler.take(seq, 6, b"_end|> more", False)
    assert "".join(e.text for e in _of(events, job) if isinstance(e, Piece)) == "Hello "
    # The stop string that ended it is named (Anthropic's stop_reason "stop_sequence").
    assert _of(events, job)[-1] == Finished("stop", True, 1, 2, 0.0, 0.0,
                                            stop_sequence="<|im_end|>")


def test_a_character_split_between_tokens_is_never_sent_in_halves() -> None:
    text = TextAssembler([])
    data = "日本🎉".encode()
    pieces = [text.add(data[i:i + 1])[0] for i in range(len(data))]
    assert all(p in ("", "日", "本", "🎉") for p in pieces)
    assert "".join(pieces) + text.flush() == "日本🎉"


def test_a_cancelled_job_leaves_before_the_next_step_and_its_slot_is_free() -> None:
    scheduler, events, _ = _scheduler(slots=1)
    job = _job([1, 2, 3])
    scheduler.admit(job)
    job.cancel()
    scheduler.leave_cancelled()
    assert _of(events, job)[-1].reason == "cancelled"  # type: ignore[union-attr]
    assert not scheduler.active
    assert scheduler.admit(_job([4])) is not None   # the one slot is free again


def test_a_job_cancelled_before_the_engine_took_it_never_gets_a_slot() -> None:
    scheduler, events, _ = _scheduler()
    job = _job([1])
    job.cancel()
    assert scheduler.admit(job) is None
    assert _of(events, job) == [Finished("cancelled", reached_model=False)]
    assert scheduler.stats.jobs_started == 0


def test_max_generation_time_counts_from_the_first_token_not_the_prompt() -> None:
    clock = Clock()
    scheduler, events, _ = _scheduler(max_generation_time=1.0, clock=clock)
    job = _job(list(range(30)), max_new_tokens=100)
    seq = scheduler.admit(job)
    assert seq is not None
    for _ in range(4):            # a slow prompt: 40 s of reading does not count
        clock.now += 10
        for chunk in scheduler.plan_prompts():
            scheduler.chunk_read(chunk)
    scheduler.take(seq, 1, b"a", False)
    clock.now += 0.5
    scheduler.take(seq, 1, b"b", False)
    assert scheduler.active
    clock.now += 0.6
    scheduler.take(seq, 1, b"c", False)
    assert _of(events, job)[-1].reason == "length"  # type: ignore[union-attr]


def test_an_injected_fault_fails_only_that_job() -> None:
    scheduler, events, _ = _scheduler()
    scheduler.faults.before_token = lambda index: (_ for _ in ()).throw(RuntimeError("boom"))
    bad, good = _job([1]), _job([2])
    bad_seq, good_seq = scheduler.admit(bad), scheduler.admit(good)
    assert bad_seq is not None and good_seq is not None
    _read_all_prompts(scheduler)
    scheduler.take(bad_seq, 1, b"a", False)
    scheduler.faults.before_token = None
    scheduler.take(good_seq, 1, b"a", False)
    assert isinstance(_of(events, bad)[-1], Failed)
    assert isinstance(_of(events, good)[-1], Piece)


def test_a_session_finds_its_previous_turn_and_the_lru_slot_is_evicted_first() -> None:
    memory = FakeMemory()
    slots = KVSlots(memory, 2)
    a, reused = slots.acquire("a", [1, 2, 3])
    assert reused == 0
    a.tokens[:] = [1, 2, 3, 9]
    slots.release(a)
    b, _ = slots.acquire("b", [5, 6])
    b.tokens[:] = [5, 6]
    slots.release(b)
    again, reused = slots.acquire("a", [1, 2, 3, 9, 4])
    assert again is a and reused == 4
    slots.release(a)
    c, _ = slots.acquire("c", [7])
    assert c is b           # b was used least recently
    assert (b.seq_id, 0) in memory.forgotten


def test_a_new_conversation_borrows_a_long_shared_prefix_from_another_slot() -> None:
    memory = FakeMemory()
    slots = KVSlots(memory, 2)
    prefix = list(range(40))
    first, _ = slots.acquire("a", prefix + [100])
    first.tokens[:] = prefix + [100, 101]
    slots.release(first)
    second, reused = slots.acquire("b", prefix + [200])
    assert second is not first and reused == 40
    # The donor's length goes with the copy: Model.copy picks the cheaper way by it.
    assert memory.copied == [(first.seq_id, second.seq_id, 42)]


async def test_queue_wait_expires_only_jobs_still_waiting() -> None:
    expired: list[str] = []
    wait = QueueWait[str](0.05, expired.append)
    wait.start("slow")
    wait.start("served")
    wait.stop("served")
    await asyncio.sleep(0.1)
    assert expired == ["slow"]


# -- several choices of one prompt (SamplingParams.n) -----------------------------------------
def _choices_job(prompt: list[int], n: int, max_new_tokens: int = 2) -> Job:
    job = Job([], SamplingParams(max_new_tokens=max_new_tokens, n=n))
    job.prompt = Prompt(prompt, 0, ())
    return job


def test_choices_copy_the_read_prompt_and_finish_once_with_every_reason() -> None:
    scheduler, events, memory = _scheduler(slots=3)
    job = _choices_job([5, 6, 7, 8], n=3)
    leader = scheduler.admit(job)
    assert leader is not None
    _read_all_prompts(scheduler)
    forks = scheduler.fork(leader)
    assert [s.choice for s in forks] == [1, 2]
    assert memory.copied == [(leader.slot.seq_id, s.slot.seq_id, 4) for s in forks]
    assert all(s.slot.tokens == [5, 6, 7, 8] and not s.reading for s in forks)
    scheduler.take(leader, 1, b"a", False)
    scheduler.take(forks[0], 1, b"b", True)          # choice 1 ends at once
    scheduler.take(forks[1], 1, b"c", False)
    assert not any(isinstance(e, Finished) for e in _of(events, job))
    scheduler.generated(scheduler.plan_generation())
    scheduler.take(leader, 2, b"d", False)           # its second token: the length cut
    scheduler.take(forks[1], 2, b"e", False)
    ends = [e for e in _of(events, job) if isinstance(e, Finished)]
    assert ends == [Finished("length", True, 4, 4, 0.0, 0.0, ("length", "stop", "length"))]
    pieces = [(e.choice, e.text) for e in _of(events, job) if isinstance(e, Piece)]
    assert pieces == [(0, "a"), (2, "c"), (0, "d"), (2, "e")]
    assert not scheduler.sequences


def test_a_failing_choice_fails_its_job_and_frees_every_slot_once() -> None:
    scheduler, events, _ = _scheduler(slots=2)
    job = _choices_job([1, 2], n=2)
    leader = scheduler.admit(job)
    assert leader is not None
    _read_all_prompts(scheduler)
    forks = scheduler.fork(leader)
    scheduler.fail(forks[0], RuntimeError("sampler"))
    scheduler.fail(leader, RuntimeError("again"))    # a batch failure reports each member
    assert not scheduler.sequences
    assert [type(e) for e in _of(events, job)] == [Started, Failed, Failed]  # deliver keeps one
    assert scheduler.slots.acquire(None, [9, 9])[0] is not None   # the slots are free


def test_cancelling_a_job_with_choices_ends_it_once() -> None:
    scheduler, events, _ = _scheduler(slots=2)
    job = _choices_job([1, 2, 3], n=2)
    leader = scheduler.admit(job)
    assert leader is not None
    _read_all_prompts(scheduler)
    scheduler.fork(leader)
    job.cancel()
    scheduler.leave_cancelled()
    assert [e for e in _of(events, job) if isinstance(e, Finished)] == [
        Finished("cancelled", True, 3, 0, 0.0, 0.0, ("cancelled", "cancelled"))]


# -- the deterministic mode: only cells a cold start computes the same way are reused ----------
def _one_turn(scheduler: Scheduler, key: str, prompt: list[int], reply: list[int]) -> int:
    """A whole turn: prompt read, `reply` generated (the last token sampled, not decoded).
    Returns how many prompt tokens were reused."""
    before = scheduler.stats.prompt_tokens_reused
    seq = scheduler.admit(_job(prompt, key=key, max_new_tokens=len(reply)))
    assert seq is not None
    _read_all_prompts(scheduler)
    for token in reply:
        scheduler.take(seq, token, b"x", False)
        if seq in scheduler.sequences:
            scheduler.generated(scheduler.plan_generation())
    assert not scheduler.active
    return scheduler.stats.prompt_tokens_reused - before


@pytest.mark.parametrize("exact", [False, True])
def test_a_next_turn_reuses_the_previous_reply_only_outside_the_exact_mode(exact: bool) -> None:
    scheduler, _, _ = _scheduler(exact=exact, n_batch=64)
    first, reply = list(range(10)), [100, 101, 102, 103]
    assert _one_turn(scheduler, "a", first, reply) == 0
    # The next turn: the first prompt, the reply (its last token was sampled, never decoded),
    # then the new message.
    reused = _one_turn(scheduler, "a", first + reply + [50, 51, 52], [104])
    assert reused == (len(first) if exact else len(first) + len(reply) - 1)


def test_the_exact_mode_leaves_two_prompt_tokens_to_decode() -> None:
    scheduler, _, _ = _scheduler(exact=True, n_batch=64)
    prompt = list(range(12))
    _one_turn(scheduler, "a", prompt, [100])
    assert _one_turn(scheduler, "a", prompt, [100]) == len(prompt) - 2
    plain, _, _ = _scheduler(n_batch=64)
    _one_turn(plain, "a", prompt, [100])
    assert _one_turn(plain, "a", prompt, [100]) == len(prompt) - 1


@pytest.mark.parametrize("length", range(2, 40))
def test_the_exact_mode_never_decodes_a_prompt_token_alone(length: int) -> None:
    scheduler, _, _ = _scheduler(exact=True, n_batch=8)
    scheduler.admit(_job(list(range(length))))
    sizes = []
    while chunks := scheduler.plan_prompts():
        for chunk in chunks:
            sizes.append(chunk.end - chunk.start)
            scheduler.chunk_read(chunk)
    assert sum(sizes) == length and min(sizes) >= 2 and max(sizes) <= 8, sizes


def test_a_borrowed_prefix_in_the_exact_mode_stops_where_the_donor_generated() -> None:
    memory = FakeMemory()
    slots = KVSlots(memory, 2, exact=True)
    donor, _ = slots.acquire("a", list(range(40)))
    donor.tokens.extend(range(40))
    slots.prompt_read(donor, 0, 40)
    donor.tokens.extend([900, 901])               # generated: decoded one at a time
    slots.release(donor)
    other, reused = slots.acquire("b", [*range(40), 900, 901, 7, 8])
    assert other is not donor and reused == 40 and other.exact == 40
    assert memory.copied == [(donor.seq_id, other.seq_id, 42)]


# -- the order of a step: plan() / update() with fake outputs ---------------------------------
def _sampled(token: int, text: str = "x") -> Sampled:
    return Sampled(token, text.encode(), False)


def test_each_prompts_first_token_is_sampled_before_the_next_decode() -> None:
    """llama.cpp keeps the logits of the last decode only: a prompt's first token must be
    sampled before the step's next chunk is decoded (sampling after both aborted the
    process: 'invalid logits id')."""
    scheduler, _, _ = _scheduler(n_batch=8)
    one, two = _job([1, 2]), _job([3, 4])
    seq_one, seq_two = scheduler.admit(one), scheduler.admit(two)
    order = []
    plan = scheduler.plan()
    while plan is not None:
        if isinstance(plan, DecodeChunk):
            order.append(f"decode {plan.chunk.seq is seq_one and 'one' or 'two'}")
            plan = scheduler.update(plan, [1])
        elif isinstance(plan, SampleTokens):
            order.append("sample " + ",".join(s is seq_one and "one" or "two"
                                              for s, _ in plan.rows))
            plan = scheduler.update(plan, [_sampled(5)] * len(plan.rows))
        else:
            order.append("generate")
            plan = None
    assert seq_two is not None
    assert order == ["decode one", "sample one", "decode two", "sample two", "generate"]


def test_a_step_reads_prompts_then_samples_first_tokens_then_decodes_every_stream() -> None:
    scheduler, events, _ = _scheduler(n_batch=8)
    old, new = _job([1, 2], max_new_tokens=8), _job([3, 4, 5])
    old_seq = scheduler.admit(old)
    assert old_seq is not None
    _read_all_prompts(scheduler)
    scheduler.take(old_seq, 7, b"a", False)        # `old` generates: a token to decode
    new_seq = scheduler.admit(new)
    plan = scheduler.plan()
    assert isinstance(plan, DecodeChunk) and plan.chunk.seq is new_seq
    plan = scheduler.update(plan, [2])              # the chunk's last row is 2
    assert isinstance(plan, SampleTokens) and plan.first and plan.rows == [(new_seq, 2)]
    plan = scheduler.update(plan, [_sampled(9, "b")])
    # The first token went out before the step decodes anything else...
    assert _of(events, new)[-1] == Piece("b")
    # ...and is decoded with the other stream's token, in one batch, in sequence-id order.
    assert isinstance(plan, DecodeTokens) and plan.members == sorted(
        [old_seq, new_seq], key=lambda s: s.slot.seq_id)
    plan = scheduler.update(plan, [0, 1])
    assert isinstance(plan, SampleTokens) and not plan.first
    assert scheduler.update(plan, [_sampled(1), _sampled(2)]) is None   # the step ends


def test_a_prompt_in_the_middle_of_reading_samples_nothing() -> None:
    scheduler, _, _ = _scheduler(n_batch=4)
    scheduler.admit(_job(list(range(10))))
    plan = scheduler.plan()
    assert isinstance(plan, DecodeChunk) and not plan.chunk.last
    assert scheduler.update(plan, [3]) is None      # nothing generates yet: the step ends


def test_a_jobs_other_choices_fork_after_its_prompt_and_sample_from_the_same_row() -> None:
    scheduler, _, memory = _scheduler(slots=3)
    job = Job([], SamplingParams(max_new_tokens=4, n=3))
    job.prompt = Prompt([1, 2, 3], 0)
    first = scheduler.admit(job)
    plan = scheduler.plan()
    assert isinstance(plan, DecodeChunk)
    plan = scheduler.update(plan, [2])
    assert isinstance(plan, SampleTokens)
    seqs = [seq for seq, _ in plan.rows]
    assert seqs[0] is first and [row for _, row in plan.rows] == [2, 2, 2]
    assert [s.choice for s in seqs] == [0, 1, 2]
    assert len(memory.copied) == 2        # the prompt's cells, copied once per other choice


def test_a_cancelled_job_leaves_before_the_step_is_planned() -> None:
    scheduler, events, _ = _scheduler()
    job = _job([1, 2, 3])
    scheduler.admit(job)
    job.cancel()
    assert scheduler.plan() is None
    assert isinstance(_of(events, job)[-1], Finished)


def test_a_failed_decode_fails_its_jobs_and_clears_their_cells_only() -> None:
    scheduler, events, memory = _scheduler(n_batch=8)
    bad, good = _job([1, 2, 3]), _job([4, 5])
    bad_seq, good_seq = scheduler.admit(bad), scheduler.admit(good)
    assert bad_seq is not None and good_seq is not None
    plan = scheduler.plan()
    assert isinstance(plan, DecodeChunk) and plan.chunk.seq is bad_seq
    plan = scheduler.update(plan, [RuntimeError("llama_decode failed with status -1")])
    assert isinstance(_of(events, bad)[-1], Failed)
    assert (bad_seq.slot.seq_id, 0) in memory.forgotten
    assert isinstance(plan, DecodeChunk) and plan.chunk.seq is good_seq
    plan = scheduler.update(plan, [1])
    assert isinstance(plan, SampleTokens) and plan.rows == [(good_seq, 1)]


def test_a_failed_sample_fails_that_job_only() -> None:
    scheduler, events, _ = _scheduler(n_batch=8)
    bad, good = _job([1, 2]), _job([3, 4])
    scheduler.admit(bad)
    scheduler.admit(good)
    plan = scheduler.plan()
    assert isinstance(plan, DecodeChunk)
    plan = scheduler.update(plan, [1])
    assert isinstance(plan, SampleTokens)
    plan = scheduler.update(plan, [ValueError("no token allowed")])     # bad's first token
    assert isinstance(_of(events, bad)[-1], Failed)
    assert isinstance(plan, DecodeChunk)
    plan = scheduler.update(plan, [1])
    assert isinstance(plan, SampleTokens)
    plan = scheduler.update(plan, [_sampled(5, "ok")])
    assert _of(events, good)[-1] == Piece("ok")
    assert isinstance(plan, DecodeTokens) and len(plan.members) == 1


def test_generation_members_follow_sequence_ids_not_admission_order() -> None:
    """A slot freed earlier is taken by a later job: admission order is then not id order,
    and llama.cpp would split the batch into a forward pass per run of adjacent ids."""
    scheduler, _, _ = _scheduler(slots=2)
    first, second = _job([1, 2], max_new_tokens=1), _job([3, 4], max_new_tokens=8)
    seq_a, seq_b = scheduler.admit(first), scheduler.admit(second)
    assert seq_a is not None and seq_b is not None
    _read_all_prompts(scheduler)
    scheduler.take(seq_a, 5, b"a", False)          # its one token: `first` ends, slot 0 frees
    scheduler.take(seq_b, 5, b"b", False)
    seq_c = scheduler.admit(_job([6, 7], max_new_tokens=8))
    assert seq_c is not None and seq_c.slot.seq_id < seq_b.slot.seq_id
    _read_all_prompts(scheduler)
    scheduler.take(seq_c, 5, b"c", False)
    plan = scheduler._generation()
    assert isinstance(plan, DecodeTokens) and plan.members == [seq_c, seq_b]
