"""Fault injection: the one seam through which tests make an engine fail on purpose.

    engine.faults.before_token = lambda index: raise_if(index == 3)   # fails that job
    engine.faults.kill_thread(RuntimeError("boom"))                  # the engine dies

Both engines consult their `Faults` at the same points; production code never sets them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Faults"]


@dataclass
class Faults:
    # Called where the engine works (its thread, or the loop for the mock) before each token
    # is emitted, with the token's index in its reply; what it raises fails that job as a
    # model error would.
    before_token: Callable[[int], None] | None = None
    # Raised by the engine's own loop at its next turn, as a bug in the engine would be;
    # the engine stays dead (503 for everything) until the server restarts.
    thread_error: BaseException | None = None
    # Called by the llama.cpp engine on its thread with each fraction llama.cpp reports while
    # it loads the model (inside its progress callback: a test can hold the load there).
    during_load: Callable[[float], None] | None = None
    # Asked by the llama.cpp engine's kernel self-check with the configuration it is about to
    # check (extra buffer types on or off); a signal number makes the check's child kill
    # itself with it where it would decode, as a faulting kernel would.
    kernel_check_signal: Callable[[bool], int | None] | None = None
    wake: Callable[[], None] = field(default=lambda: None, repr=False)  # set by the engine

    def kill_thread(self, error: BaseException) -> None:
        self.thread_error = error
        self.wake()
