"""ChatPrompt and the model's own chat template (read from the GGUF metadata)."""

from __future__ import annotations

import pytest

from chatstream_lite import ChatPrompt
from chatstream_lite.engine import ChatTemplate

from .conftest import smollm2_template

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def template(model_path: str) -> ChatTemplate:
    return smollm2_template(model_path)


def test_create_prompt_uses_the_gguf_template(template: ChatTemplate) -> None:
    prompt = ChatPrompt(template, system="Be brief.")
    prompt.add_requester_msg("Hi")
    assert prompt.create_prompt() == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    prompt.add_responder_msg("Hello!")
    assert prompt.create_prompt().endswith("<|im_start|>assistant\nHello!<|im_end|>\n")


def test_the_template_renders_as_llama_cpp_pythons_formatter(template: ChatTemplate) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    theirs = Jinja2ChatFormatter(template.source, template.eos_token, template.bos_token)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "こんにちは"},
                {"role": "assistant", "content": "はい"}, {"role": "user", "content": "🎉"}]
    assert template.render(messages).text == theirs(messages=messages).prompt  # type: ignore[arg-type]


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
