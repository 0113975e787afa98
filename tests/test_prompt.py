"""ChatPrompt and the model's own chat template (read from the GGUF metadata)."""

from __future__ import annotations

import llama_cpp
import pytest

from chatstream_lite import ChatPrompt
from chatstream_lite.errors import PromptTooLong
from chatstream_lite.prompt import ChatTemplate, fit_to_context

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def template(model_path: str) -> ChatTemplate:
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=256, vocab_only=True, verbose=False)
    try:
        eos = llm._model.token_get_text(llm.token_eos())
        bos = llm._model.token_get_text(llm.token_bos())
        return ChatTemplate(llm.metadata["tokenizer.chat_template"], bos_token=bos, eos_token=eos)
    finally:
        llm.close()


def test_create_prompt_uses_the_gguf_template(template: ChatTemplate) -> None:
    prompt = ChatPrompt(template, system="Be brief.")
    prompt.add_requester_msg("Hi")
    assert prompt.create_prompt() == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    prompt.add_responder_msg("Hello!")
    assert prompt.create_prompt().endswith("<|im_start|>assistant\nHello!<|im_end|>\n")


def test_round_trip_through_a_dict(template: ChatTemplate) -> None:
    prompt = ChatPrompt(template, system="S")
    prompt.add_requester_msg("こんにちは")
    prompt.add_responder_msg("はい 🎉")
    again = ChatPrompt.from_dict(prompt.to_dict(), template)
    assert again.get_contents() == prompt.get_contents()
    assert again.create_prompt() == prompt.create_prompt()


def test_clear_history_keeps_the_system_prompt(template: ChatTemplate) -> None:
    prompt = ChatPrompt(template, system="S")
    prompt.add_requester_msg("a")
    prompt.add_responder_msg("b")
    prompt.clear_history()
    assert prompt.get_contents() == [{"role": "system", "content": "S"}]


def test_fit_drops_whole_oldest_turns_and_refuses_what_cannot_fit() -> None:
    def count(messages: list) -> list[int]:
        return [0] * sum(len(m["content"]) for m in messages)

    messages = [{"role": "system", "content": "ss"},
                {"role": "user", "content": "aaaa"}, {"role": "assistant", "content": "bbbb"},
                {"role": "user", "content": "cccc"}]
    tokens, dropped = fit_to_context(messages, count, 14)
    assert dropped == 0 and len(tokens) == 14
    tokens, dropped = fit_to_context(messages, count, 13)
    assert dropped == 2 and len(tokens) == 6
    with pytest.raises(PromptTooLong):
        fit_to_context(messages, count, 5)
