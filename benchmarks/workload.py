"""What every system is asked to do: the same prompts, conversations and greedy settings.

A `Plan` says how much of it to run (`Plan.full()` for the figures, `Plan.quick()` for a
smoke run); the texts are fixed here so that two runs, or two systems, get identical input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

# Greedy decoding with no repetition penalty: every system must produce the same text, so
# that tokens/s compares the same work. (llama-cpp-python's defaults are 0.8 / 1.1.)
TEMPERATURE = 0.0
REPEAT_PENALTY = 1.0

# Prompts that make a small model talk for a long time, so that a 200-token budget is
# usually used up instead of ending early at an end-of-turn token.
PROMPTS = [
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in great detail how a steam engine works, step by step, for a curious student.",
    "Describe a walk through a busy city market in the morning, with every sight and sound.",
    "Write a long letter from a sailor to his family describing a year at sea.",
    "Give a detailed history of bread making, from ancient times to modern bakeries.",
    "Write a long guide for a beginner who wants to grow vegetables in a small garden.",
    "Tell a long fairy tale about a fox, a crow and a clever young girl in a forest.",
    "Explain in detail how the water cycle works and why it matters for farming.",
]

# A long prompt for the "disconnect during prompt processing" figure: far more tokens than
# one n_batch chunk, so that stopping within one chunk is visible.
LONG_PROMPT_PARAGRAPH = (
    "The archive of the northern harbour holds ledgers of every ship that ever docked there: "
    "its name, its captain, its cargo of timber, salt, wool or iron, the day it arrived, the "
    "day it left and the fees it paid to the harbour master. "
)

# Four users' long system prompts for the multi-turn test: each is different from the
# others from its first words, so no user can reuse another user's cached prefix.
_COMPANIES = ["Northwind Travel", "Bluebell Bakery", "Orion Bicycle Repair", "Maple Street Library"]
_TOPICS = ["train tickets", "sourdough bread", "bicycle brakes", "book loans"]

QUESTIONS = [
    "Hello! What can you help me with?",
    "What are your opening hours?",
    "Can you summarise the first rule for me?",
    "What should I do if I have a complaint?",
    "Which rule is the most important one?",
    "Can you give me an example of a good request?",
    "How do I contact a human?",
    "Thank you. Can you summarise our conversation?",
]


def system_prompt(user: int, rules: int = 12) -> str:
    """A long (about 500-token) system prompt, different for every user number."""
    company, topic = _COMPANIES[user % len(_COMPANIES)], _TOPICS[user % len(_TOPICS)]
    lines = [
        (f"{company} customer assistant, desk {user + 1}. You answer questions about {topic} "
         f"for the customers of {company}. Be short, friendly and precise."),
        "Rules:",
    ]
    for n in range(1, rules + 1):
        lines.append(
            f"{n}. For {topic}, case {user + 1}-{n}: check the customer's reference number, "
            f"quote rule {n} by its number, and never promise more than {n + user} days."
        )
    return "\n".join(lines)


def long_prompt(paragraphs: int) -> str:
    return "Summarise these notes.\n" + "\n".join(
        f"Note {i}: {LONG_PROMPT_PARAGRAPH}" for i in range(paragraphs)
    )


@dataclass(frozen=True)
class Plan:
    """How much of the workload to run; the same plan is given to every system."""

    max_tokens: int = 200                  # reply length of the throughput tests
    single_runs: int = 5                   # one stream at a time: tokens/s, first token
    concurrency: tuple[int, ...] = (1, 4, 8, 16)
    users: int = 4                         # multi-user multi-turn test
    turns: int = 8
    turn_tokens: int = 32                  # reply length of each turn
    system_rules: int = 12                 # size of each user's system prompt
    disconnect_after: int = 8              # tokens a client reads before it closes
    long_prompt_paragraphs: int = 40       # about 2,400 tokens: 5 chunks of n_batch
    request_timeout: float = 300.0         # seconds, for any one request

    @classmethod
    def full(cls) -> Plan:
        return cls()

    @classmethod
    def quick(cls) -> Plan:
        return cls(max_tokens=16, single_runs=2, concurrency=(1, 2), users=2, turns=2,
                   turn_tokens=8, system_rules=3, disconnect_after=2,
                   long_prompt_paragraphs=12, request_timeout=120.0)

    def with_max_tokens(self, max_tokens: int | None) -> Plan:
        return self if max_tokens is None else replace(self, max_tokens=max_tokens)

    @property
    def largest_reply(self) -> int:
        return max(self.max_tokens, self.turn_tokens)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(**{**data, "concurrency": tuple(data["concurrency"])})
