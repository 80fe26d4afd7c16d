"""Tool calling: the request fields, the call formats of chat templates, and the streaming parser.

The tools go into the chat template (``gateway/chat.py``); the model answers in its template's
format, picked from the template text: Hermes/Qwen ``<tool_call>{json}</tool_call>``, Llama-3 JSON
``{"name": ..., "parameters": ...}`` (after ``<|python_tag|>`` or not), Mistral ``[TOOL_CALLS][...]``
or gpt-oss harmony ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>``.
Markers that are special tokens (:attr:`ToolFormat.special`) are kept in the text of a tool request
by the detokenizer, so that the parser sees them. :class:`ToolStream` turns the generated text into
content and ``tool_calls``: it holds back text that may start a call, streams each call as it is
written (its name once complete, then its arguments in pieces) and parses the whole at the end;
output that does not parse stays text. ``tool_choice`` ``required`` or a named function is enforced
by the structured-output mask: the grammar of exactly one call in the template's format.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer
from transformers import PreTrainedTokenizerBase

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

    @model_serializer(mode="wrap")
    def _no_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}  # a streamed piece of arguments


class ToolCall(BaseModel):
    index: int | None = None  # streamed deltas only
    id: str | None = None  # None: a later delta of a streamed call
    type: Literal["function"] | None = "function"
    function: FunctionCall

    @model_serializer(mode="wrap")
    def _no_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None or k not in ("index", "id", "type")}


def _call(name: str, arguments: Any, index: int | None = None) -> ToolCall:
    return _opening(name, json.dumps(arguments, ensure_ascii=False), index)


def _opening(name: str, arguments: str, index: int | None) -> ToolCall:
    return ToolCall(index=index, id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments))


def _more(index: int, arguments: str) -> ToolCall:
    return ToolCall(index=index, type=None, function=FunctionCall(arguments=arguments))


# ------------------------------------------------------------------------------------ formats
class ToolFormat(ABC):
    """One template family's way of writing tool calls."""

    marker: str  # text that starts the calls
    arguments_key = "arguments"
    special: tuple[str, ...] = ()  # markers that are special tokens in this family's tokenizers

    def scanner(self) -> "CallScanner":
        """Follows the calls in the text from the marker on as it arrives."""
        return JsonCalls((self.arguments_key, "arguments", "parameters"))

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
    special = ("<|python_tag|>",)

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
    special = ("[TOOL_CALLS]",)

    def parse(self, text: str) -> list[tuple[str, Any]] | None:
        calls = _loads(text.removeprefix(self.marker).strip())
        if isinstance(calls, dict):
            calls = [calls]
        parsed = [self._one(c) for c in calls] if isinstance(calls, list) and calls else None
        return parsed if parsed and all(c is not None for c in parsed) else None  # type: ignore[return-value]

    def grammar(self, call: _Schema) -> Grammar:
        return _wrapped("[TOOL_CALLS][", call, "]")


class Harmony(ToolFormat):
    """gpt-oss harmony: ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>``
    (``<|call|>`` ends the turn: the model writes one call)."""

    marker = "<|channel|>commentary to=functions."
    special = ("<|channel|>", "<|constrain|>", "<|message|>", "<|call|>", "<|start|>", "<|end|>")
    _CALL = re.compile(r"<\|channel\|>commentary to=functions\.([^\s<]+)\s*(?:<\|constrain\|>\s*\w*\s*)?"
                       r"<\|message\|>(.*?)(?:<\|call\|>|$)", re.DOTALL)

    def parse(self, text: str) -> list[tuple[str, Any]] | None:
        calls = [(name, _loads(body)) for name, body in self._CALL.findall(text)]
        return calls if calls and all(isinstance(args, dict) for _, args in calls) else None

    def grammar(self, call: _Schema) -> Grammar:
        raise GrammarError("a required or named tool_choice is not supported with the harmony format")

    def scanner(self) -> "CallScanner":
        return HarmonyCalls()


def format_of(template: str) -> ToolFormat | None:
    """The call format a chat template teaches its model (None: the template takes no tools)."""
    if "tools" not in template:
        return None
    if "<|channel|>" in template and "functions." in template:
        return Harmony()
    if "<tool_call>" in template:
        return Hermes()
    if "[TOOL_CALLS]" in template:
        return Mistral()
    if "<|python_tag|>" in template or '"parameters"' in template or "parameters" in template:
        return Llama3Json()
    return None


def special_ids(fmt: ToolFormat, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The ids of the format's markers that are added (special) tokens of ``tokenizer``: the
    detokenizer writes them as text in a tool request's output."""
    added = tokenizer.get_added_vocab()  # text -> id
    return frozenset(added[marker] for marker in fmt.special if marker in added)


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


@dataclass
class Progress:
    """One call as far as it is written: its name once complete, the raw text of its arguments so far."""

    name: str | None = None
    arguments: str = ""


class CallScanner(Protocol):
    calls: list[Progress]

    def feed(self, text: str) -> None:
        """More of the text from the marker on."""


class JsonCalls:
    """Calls written as JSON objects (any text around them: tags, ``[``, ``;``): each top-level object
    is a call; its first-level ``"name"`` string, and the raw text of its arguments object (the first of
    ``keys`` present), character by character as they arrive."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.calls: list[Progress] = []
        self._keys = keys
        self._depth = 0  # brackets open in the current call (0: between calls)
        self._string: list[str] | None = None  # a first-level string being read (a key or a value)
        self._in_string = self._escaped = False
        self._key: str | None = None  # the first-level key whose value comes next
        self._value = False  # after the key's colon
        self._arguments = 0  # depth at which the arguments object closes (0: not in it)

    def feed(self, text: str) -> None:
        for ch in text:
            self._char(ch)

    def _char(self, ch: str) -> None:
        if self._depth == 0:
            if ch == "{":
                self.calls.append(Progress())
                self._depth, self._key, self._value, self._arguments = 1, None, False, 0
            return
        call = self.calls[-1]
        if self._arguments:
            call.arguments += ch
        if self._in_string:
            self._string_char(ch, call)
        elif ch == '"':
            self._in_string = True
            self._string = [] if self._depth == 1 else None
        elif ch in "{[":
            if self._depth == 1 and ch == "{" and self._value and self._key in self._keys and not call.arguments:
                self._arguments, call.arguments = 1, "{"
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            self._arguments = 0 if self._depth <= self._arguments else self._arguments
        elif self._depth == 1 and ch in ":,":
            self._value = ch == ":"
            self._key = self._key if ch == ":" else None

    def _string_char(self, ch: str, call: Progress) -> None:
        if self._escaped:
            self._escaped = False
        elif ch == "\\":
            self._escaped = True
        elif ch == '"':
            self._in_string = False
            if self._string is not None:
                text = _loads('"' + "".join(self._string) + '"')
                if not self._value:
                    self._key = text
                elif self._key == "name" and isinstance(text, str) and call.name is None:
                    call.name = text
                self._string = None
            return
        if self._string is not None:
            self._string.append(ch)


class HarmonyCalls:
    """Harmony calls: the name from the header (``to=functions.NAME``), the arguments from the body
    after ``<|message|>`` up to ``<|call|>`` (a piece of which is held back)."""

    _NAME = re.compile(r"to=functions\.([^\s<]+)[\s<]")
    _END = "<|call|>"

    def __init__(self) -> None:
        self.calls: list[Progress] = []
        self._text = ""

    def feed(self, text: str) -> None:
        self._text += text
        self.calls = []
        for head in self._text.split(Harmony.marker[: Harmony.marker.index(" ")])[1:]:  # one per "<|channel|>"
            if (name := self._NAME.search("<|channel|>" + head)) is None:
                continue
            _, _, body = head.partition("<|message|>")
            body = body.split(self._END)[0] if self._END in body else body[: len(body) - _partial(body, self._END)]
            self.calls.append(Progress(name.group(1), body.strip() if "<|message|>" in head else ""))


def _partial(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could still grow into ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[len(text) - size :]):
            return size
    return 0


class ToolStream:
    """Generated text in, content and tool calls out. Text is passed on at once unless it may be the
    start of a call (a prefix of the marker); from the marker on it is held, each call streamed as it
    is written (:meth:`take_calls`), and the whole parsed at the end (:meth:`finish`)."""

    def __init__(self, fmt: ToolFormat, parallel: bool = True) -> None:
        self._fmt, self._parallel = fmt, parallel
        self._held = ""
        self._calling = False
        self._emitted = False  # some content went out: a Llama-3 JSON call must start the output
        self._scanner = fmt.scanner()
        self._sent: list[Progress] = []  # what take_calls sent of each call
        self.complete = False  # the output parsed into calls (finish)

    def feed(self, text: str) -> str:
        """Content to send now (possibly "")."""
        if self._calling:
            self._held += text
            self._scanner.feed(text)
            return ""
        held = self._held + text
        start = self._marker_at(held)
        if start is not None:
            self._calling, self._held = True, held[start:]
            self._scanner.feed(self._held)
            return self._out(held[:start])
        keep = self._partial(held)
        self._held = held[len(held) - keep :] if keep else ""
        return self._out(held[: len(held) - keep])

    def take_calls(self) -> list[ToolCall]:
        """The deltas of the calls written since the last take: a call's name (with its id) once it is
        complete, then the new text of its arguments."""
        deltas = []
        for index, call in enumerate(self._scanner.calls[: None if self._parallel else 1]):
            if call.name is None:
                break  # calls go out in order
            if index == len(self._sent):
                self._sent.append(Progress(call.name, call.arguments))
                deltas.append(_opening(call.name, call.arguments, index))
            elif len(call.arguments) > len(sent := self._sent[index].arguments):
                self._sent[index].arguments = call.arguments
                deltas.append(_more(index, call.arguments[len(sent) :]))
        return deltas

    def finish(self) -> Parsed:
        """What is left: the calls (with their index) or what is missing of the streamed ones, or the
        held text when it does not parse (nothing of it streamed)."""
        held, self._held = self._held, ""
        pending = self.take_calls() if self._sent else []
        calls = self._fmt.parse(held) if self._calling else None
        if not calls:
            return Parsed("" if self._sent else held, pending)
        self.complete = True
        calls = calls if self._parallel else calls[:1]
        rest = [self._rest(k, name, args) for k, (name, args) in enumerate(calls)]
        return Parsed("", pending + [call for call in rest if call is not None])

    def _rest(self, index: int, name: str, arguments: Any) -> ToolCall | None:
        if index >= len(self._sent):
            return _call(name, arguments, index)
        sent = self._sent[index].arguments
        if _loads(sent) == arguments:
            return None
        if not sent.strip():  # no arguments object was written (the parser's default: {})
            return _more(index, json.dumps(arguments, ensure_ascii=False))
        return None  # streamed as written: the pieces hold what the model wrote

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
        return _partial(text, self._fmt.marker)


def parse_all(fmt: ToolFormat, text: str, parallel: bool = True) -> Parsed:
    """A whole output at once (non-streaming)."""
    stream = ToolStream(fmt, parallel)
    content = stream.feed(text)
    rest = stream.finish()
    return Parsed(content + rest.content, rest.calls)
