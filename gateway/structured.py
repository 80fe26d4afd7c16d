"""Structured outputs: the request fields that ask for them, and the grammar the last stage enforces.

OpenAI's ``response_format`` (``json_object``, ``json_schema``) and the vLLM extras (``guided_json``,
``guided_regex``, ``guided_choice``, ``guided_grammar`` and the newer ``structured_outputs``) all
become one :class:`~parallax.broker.wire.Grammar` that travels with the request's sampling
parameters; the last stage masks every token it forbids (``stages/grammar.py``). The gateway checks
the grammar with the same library (xgrammar, imported on the first structured request: it takes
seconds) so that a bad schema or regex is a 400 here, not an error of the stage.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from parallax.broker.errors import GrammarError
from parallax.broker.wire import Grammar

_Schema = dict[str, Any]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: _Schema | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError('type "json_schema" needs json_schema.schema')
        return self


class StructuredOutputs(_Body):
    """vLLM's ``structured_outputs`` (one of its fields)."""

    json_: _Schema | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None


class StructuredRequest(_Body):
    """The request fields that constrain the output (at most one of them may be given: :meth:`grammar`)."""

    response_format: ResponseFormat | None = None
    guided_json: _Schema | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    def grammar(self) -> Grammar | None:
        """The grammar the output must follow (not yet checked: :func:`check`); None: free text.
        Raises :class:`GrammarError` when more than one constraint is given."""
        given = [(name, grammar) for name, grammar in self._grammars() if grammar is not None]
        if len(given) > 1:
            names = ", ".join(name for name, _ in given)
            raise GrammarError(f"only one structured-output constraint may be given (got {names})")
        return given[0][1] if given else None

    def _grammars(self) -> list[tuple[str, Grammar | None]]:
        fmt, so = self.response_format, self.structured_outputs or StructuredOutputs()
        from_format = None
        if fmt is not None and fmt.type == "json_object":
            from_format = Grammar(kind="json_object")
        elif fmt is not None and fmt.type == "json_schema":
            from_format = schema_grammar(fmt.json_schema.schema_)
        return [
            ("response_format", from_format),
            ("guided_json", schema_grammar(self.guided_json)),
            ("guided_regex", None if self.guided_regex is None else Grammar(kind="regex", spec=self.guided_regex)),
            ("guided_choice", choice_grammar(self.guided_choice)),
            ("guided_grammar", None if self.guided_grammar is None else Grammar(kind="ebnf", spec=self.guided_grammar)),
            ("structured_outputs", _first(
                schema_grammar(so.json_),
                None if so.regex is None else Grammar(kind="regex", spec=so.regex),
                choice_grammar(so.choice),
                None if so.grammar is None else Grammar(kind="ebnf", spec=so.grammar),
                Grammar(kind="json_object") if so.json_object else None,
            )),
        ]


def _first(*grammars: Grammar | None) -> Grammar | None:
    given = [g for g in grammars if g is not None]
    if len(given) > 1:
        raise GrammarError("structured_outputs takes one of json, regex, choice, grammar, json_object")
    return given[0] if given else None


def schema_grammar(schema: _Schema | str | None) -> Grammar | None:
    if schema is None:
        return None
    return Grammar(kind="json_schema", spec=schema if isinstance(schema, str) else json.dumps(schema))


def choice_grammar(choices: list[str] | None) -> Grammar | None:
    """Exactly one of the strings (an EBNF alternation of JSON-escaped literals)."""
    if choices is None:
        return None
    return Grammar(kind="ebnf", spec="root ::= " + " | ".join(json.dumps(c) for c in choices))


def check(grammar: Grammar) -> Grammar:
    """Parse the grammar with the stage's library (no tokenizer needed); raises :class:`GrammarError`
    with the reason (a schema that is not JSON, an unsupported keyword, a bad regex). Blocking: the
    first call imports xgrammar."""
    import xgrammar as xgr

    try:
        if grammar.kind == "json_schema":
            schema = json.loads(grammar.spec)
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema must be a JSON object")
            xgr.Grammar.from_json_schema(grammar.spec, any_whitespace=False)
        elif grammar.kind == "regex":
            xgr.Grammar.from_regex(grammar.spec)
        elif grammar.kind == "ebnf":
            xgr.Grammar.from_ebnf(grammar.spec)
    except (RuntimeError, ValueError) as exc:
        raise GrammarError(f"invalid {grammar.kind.replace('_', ' ')}: {_reason(exc)}") from None
    return grammar


def _reason(exc: Exception) -> str:
    """xgrammar's message without its ``[time] file.cc:line:`` prefix, on one line."""
    text = " ".join(str(exc).split())
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)[:300]
