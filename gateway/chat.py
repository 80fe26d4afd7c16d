"""Chat messages -> prompt ids through the model's chat template (HF ``apply_chat_template``).

The tools of a request go in as the template's ``tools``; assistant ``tool_calls`` and ``tool``
messages are fed back as templates expect them (arguments as objects, ``tool_call_id`` kept).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from .protocol import ChatMessage


def template_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's chat template(s) as one text ("" when it has none)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return template or ""


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage],
                tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Prompt ids; raises ``jinja2.TemplateError`` when the template cannot render the messages."""
    conversation = [_message(m) for m in messages]
    text = tokenizer.apply_chat_template(conversation, tools=tools, add_generation_prompt=True, tokenize=False)
    # The template already wrote every special token (BOS included) the model expects.
    return list(tokenizer.encode(str(text), add_special_tokens=False))


def _message(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [_fed_back(call) for call in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _fed_back(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call as templates read it: arguments as an object when they are JSON text."""
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except ValueError:
            pass
    return {**call, "type": call.get("type", "function"), "function": function}
