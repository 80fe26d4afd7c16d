"""Tool calling: the request fields, the call formats of chat templates, and the streaming parser.

The tools go into the chat template (``gateway/chat.py``); the model answers in its template's
format, picked from the template text: Hermes/Qwen ``<tool_call>{json}</tool_call>``, Llama-3 JSON
``{"name": ..., "parameters": ...}`` or Mistral ``[TOOL_CALLS][...]``. :class:`ToolStream` turns
the generated text into content and ``tool_calls``: it holds back text that may start a call,
and output that does not parse stays text. ``tool_choice`` ``required`` or a named function is
enforced by the structured-output mask: the grammar of exactly one call in the template's format.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from parallax.broker.errors import GrammarError
from parallax.broker.wire import Grammar

_Schema = dict[str, Any]
_ANY_OBJECT: _Schema = {"type": "object"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ------------------------------------------------------------------------------------ request
class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: _Schema | None = None
    strict: bool | None = None


class ToolDef(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class _Named(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: _Named


class ToolsRequest(_Body):
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def tool_mode(self) -> str:
        """none (no tools in the prompt, no parsing), auto, required, or the name of the forced function.
        Raises :class:`GrammarError` when the choice does not fit the tools."""
        choice = self.tool_choice or ("auto" if self.tools else "none")
        if choice != "none" and not self.tools:
            raise GrammarError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in {t.function.name for t in self.tools or ()}:
                raise GrammarError(f"tool_choice names `{choice.function.name}`, which is not among the tools")
            return choice.function.name
        return choice

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates take them (None when tool_choice is none)."""
        if self.tool_mode() == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


# ----------------------------------------------------------------------------------- response
class FunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    index: int | None = None  # streamed deltas only
    id: str | None = None
    type: Literal["function"] | None = "function"
    function: FunctionCall

    @model_serializer(mode="wrap")
    def _no_index(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if k != "index" or v is not None}


def _call(name: str, arguments: Any, index: int | None = None) -> ToolCall:
    return ToolCall(index=index, id=f"call_{uuid.uuid4().hex[:24]}",
                    function=FunctionCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False)))


# ------------------------------------------------------------------------------------ formats
class ToolFormat(ABC):
    """One template family's way of writing tool calls."""

    marker: str  # text that starts the calls
    arguments_key = "arguments"

    @abstractmethod
    def parse(self, text: str) -> list[tuple[str, Any]] | None:
        """(name, arguments) of each call in ``text`` (from the marker on); None if it does not parse."""

    @abstractmethod
    def grammar(self, call: _Schema) -> Grammar:
        """The grammar of exactly one call whose JSON object follows ``call`` (a JSON schema)."""

    def call_schema(self, tools: list[ToolDef], name: str | None) -> _Schema:
        """One call of ``name`` (any tool when None): name and arguments, per the tool's parameters."""
        options = [{"type": "object", "additionalProperties": False, "required": ["name", self.arguments_key],
                    "properties": {"name": {"const": t.function.name},
                                   self.arguments_key: t.function.parameters or _ANY_OBJECT}}
                   for t in tools if name is None or t.function.name == name]
        return options[0] if len(options) == 1 else {"anyOf": options}

    def _one(self, obj: Any) -> tuple[str, Any] | None:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get(self.arguments_key, obj.get("arguments", obj.get("parameters", {})))
        return (obj["name"], args) if isinstance(args, dict) else None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _wrapped(prefix: str, call: _Schema, suffix: str) -> Grammar:
    """EBNF of ``prefix`` + a JSON object following ``call`` + ``suffix`` (xgrammar writes it)."""
    import xgrammar as xgr

    parts = [xgr.Grammar.from_ebnf(f"root ::= {json.dumps(prefix)}"),
             xgr.Grammar.from_json_schema(json.dumps(call), any_whitespace=False),
             xgr.Grammar.from_ebnf(f"root ::= {json.dumps(suffix)}")]
    return Grammar(kind="ebnf", spec=str(xgr.Grammar.concat(*parts)))


class Hermes(ToolFormat):
    """Hermes / Qwen: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per call."""

    marker = "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> list[tuple[str, Any]] | None:
        calls = [self._one(_loads(block)) for block in self._BLOCK.findall(text)]
        return calls if calls and all(c is not None for c in calls) else None  # type: ignore[return-value]

    def grammar(self, call: _Schema) -> Grammar:
        return _wrapped("<tool_call>\n", call, "\n</tool_call>")


class Llama3Json(ToolFormat):
    """Llama 3.x JSON tool calling: ``{"name": ..., "parameters": {...}}`` (optionally after
    ``<|python_tag|>``), several separated by ``;``."""

    marker = "{"
    arguments_key = "parameters"

    def parse(self, text: str) -> list[tuple[str, Any]] | None:
        text, decoder, calls, at = text.removeprefix("<|python_tag|>").strip(), json.JSONDecoder(), [], 0
        while at < len(text):
            try:
                obj, at = decoder.raw_decode(text, at)
            except ValueError:
                return None
            calls.append(self._one(obj))
            while at < len(text) and text[at] in " \t\n;":
                at += 1
        return calls if calls and all(c is not None for c in calls) else None  # type: ignore[return-value]

    def grammar(self, call: _Schema) -> Grammar:
        return Grammar(kind="json_schema", spec=json.dumps(call))


class Mistral(ToolFormat):
    """Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``."""

    marker = "[TOOL_CALLS]"

    def parse(self, text: str) -> list[tuple[str, Any]] | None:
        calls = _loads(text.removeprefix(self.marker).strip())
        if isinstance(calls, dict):
            calls = [calls]
        parsed = [self._one(c) for c in calls] if isinstance(calls, list) and calls else None
        return parsed if parsed and all(c is not None for c in parsed) else None  # type: ignore[return-value]

    def grammar(self, call: _Schema) -> Grammar:
        return _wrapped("[TOOL_CALLS][", call, "]")


def format_of(template: str) -> ToolFormat | None:
    """The call format a chat template teaches its model (None: the template takes no tools)."""
    if "tools" not in template:
        return None
    if "<tool_call>" in template:
        return Hermes()
    if "[TOOL_CALLS]" in template:
        return Mistral()
    if "<|python_tag|>" in template or '"parameters"' in template or "parameters" in template:
        return Llama3Json()
    return None


def tool_grammar(fmt: ToolFormat, req: ToolsRequest) -> Grammar | None:
    """The mask's grammar for ``required`` (any one tool) or a named function; None for auto/none."""
    mode = req.tool_mode()
    if mode in ("none", "auto"):
        return None
    return fmt.grammar(fmt.call_schema(req.tools or [], None if mode == "required" else mode))


# ---------------------------------------------------------------------------------- streaming
@dataclass
class Parsed:
    content: str
    calls: list[ToolCall]


class ToolStream:
    """Generated text in, content and tool calls out. Text is passed on at once unless it may be the
    start of a call (a prefix of the marker); from the marker on it is held, and parsed at the end."""

    def __init__(self, fmt: ToolFormat, parallel: bool = True) -> None:
        self._fmt, self._parallel = fmt, parallel
        self._held = ""
        self._calling = False
        self._emitted = False  # some content went out: a Llama-3 JSON call must start the output

    def feed(self, text: str) -> str:
        """Content to send now (possibly "")."""
        if self._calling:
            self._held += text
            return ""
        held = self._held + text
        start = self._marker_at(held)
        if start is not None:
            self._calling, self._held = True, held[start:]
            return self._out(held[:start])
        keep = self._partial(held)
        self._held = held[len(held) - keep :] if keep else ""
        return self._out(held[: len(held) - keep])

    def finish(self) -> Parsed:
        """What is left: the calls (with their index), or the held text when it does not parse."""
        held, self._held = self._held, ""
        calls = self._fmt.parse(held) if self._calling else None
        if not calls:
            return Parsed(held, [])
        calls = calls if self._parallel else calls[:1]
        return Parsed("", [_call(name, args, k) for k, (name, args) in enumerate(calls)])

    def _out(self, text: str) -> str:
        self._emitted = self._emitted or bool(text.strip())
        return text

    def _marker_at(self, text: str) -> int | None:
        marker = self._fmt.marker
        if marker == "{":  # Llama-3 JSON: a call is the whole output
            stripped = text.lstrip()
            if self._emitted or not stripped:
                return None
            return len(text) - len(stripped) if stripped.startswith(("{", "<|python_tag|>")) else None
        at = text.find(marker)
        return None if at < 0 else at

    def _partial(self, text: str) -> int:
        """How many trailing characters could still grow into the marker."""
        if self._fmt.marker == "{":  # blanks, or a piece of <|python_tag|>, at the start of the output
            return len(text) if not self._emitted and "<|python_tag|>".startswith(text.strip()) else 0
        marker = self._fmt.marker
        for size in range(min(len(marker) - 1, len(text)), 0, -1):
            if marker.startswith(text[len(text) - size :]):
                return size
        return 0


def parse_all(fmt: ToolFormat, text: str, parallel: bool = True) -> Parsed:
    """A whole output at once (non-streaming)."""
    stream = ToolStream(fmt, parallel)
    content = stream.feed(text)
    rest = stream.finish()
    return Parsed(content + rest.content, rest.calls)
