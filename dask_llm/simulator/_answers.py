"""Plausible, deterministic answers: prose for text prompts, schema instances for structured output.

Every answer is a function of the request's content and the seed: a
``random.Random`` seeded from a hash of both drives every choice, so the same
request gets the same answer in any process, any order, any run, online or in
a batch (which makes caches and tests reproducible), and different rows get
different answers (a few words of the prompt are echoed back).

Prompts that carry a JSON schema in a code fence get an instance of it: the
format instructions of LangChain's ``PydanticOutputParser`` and
``JsonOutputParser(pydantic_object=...)`` ("The output should be formatted as
a JSON instance that conforms to the JSON schema below." and the schema in a
``` fence) in any message, or, when the answer is JSON anyway (``json_object``
mode, or a prompt that mentions JSON), any fenced JSON object that looks like
a schema (has ``properties``).

Tool calls and JSON answers also take what the last user message names, as a model
would: a tool's arguments are an instance of its parameters' schema whose fields take
the prompt's values where they fit (``name=value``; a number or quoted string next to a
word of the field's name; else the next unused number within the field's bounds or
quoted string; an enum option the prompt mentions), so "What is magic_function(3)?"
calls it with 3; the tool called is the one ``tool_choice`` or else the prompt names; a
JSON answer without a schema, asked for "'setup' and 'punchline' keys", has those keys.
Only answers of prompts that name such values differ from the seed's draw.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from typing import Any

_WORDS = [
    "bright",
    "cherry",
    "plum",
    "oak",
    "vanilla",
    "citrus",
    "mineral",
    "crisp",
    "round",
    "supple",
    "firm",
    "tannic",
    "elegant",
    "balanced",
    "fresh",
    "ripe",
    "savory",
    "spicy",
    "floral",
    "earthy",
    "smoky",
    "structured",
    "lively",
    "juicy",
    "dense",
    "silky",
    "lean",
    "generous",
    "complex",
    "long",
    "finish",
    "acidity",
    "fruit",
    "texture",
    "aroma",
    "palate",
    "body",
    "herbal",
    "toasty",
    "creamy",
    "zesty",
    "velvety",
    "layered",
    "vibrant",
    "polished",
    "rustic",
]

_TOKEN = re.compile(r"[A-Za-z][A-Za-z'-]{3,}")


def prompt_words(text: str, limit: int = 6) -> list[str]:
    """A few distinctive words of the prompt, to make answers differ by row."""
    return list(dict.fromkeys(_TOKEN.findall(text[-600:].lower())))[-limit:]


def _sentence(words: list[str], echo: list[str]) -> str:
    for k, w in enumerate(echo[:3]):
        words[min(len(words) - 1, 1 + 2 * k)] = w
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def sentence(rng: random.Random, echo: list[str], n_words: int) -> str:
    return _sentence(rng.choices(_WORDS, k=max(1, n_words)), echo)


# A word per byte value: prose drawn from hash bytes, without seeding a generator (hot path).
_BYTE_WORDS = [_WORDS[b % len(_WORDS)] for b in range(256)]


def text_answer(digest: bytes, echo: list[str], tokens: int) -> str:
    """Prose of about ``tokens`` tokens (~1.3 a word), its words drawn from ``digest``."""
    n_words = max(3, int(tokens / 1.3))
    stream = hashlib.shake_256(digest).digest(n_words)
    return _sentence([_BYTE_WORDS[b] for b in stream], echo)


class SchemaFaker:
    """A valid instance of a JSON schema (the subset pydantic and OpenAI use)."""

    def __init__(self, root: dict[str, Any], rng: random.Random, echo: list[str]) -> None:
        self.root = root
        self.defs = {**root.get("definitions", {}), **root.get("$defs", {})}
        self.rng = rng
        self.echo = echo

    def make(self, schema: dict[str, Any] | None = None, name: str = "", depth: int = 0) -> Any:
        s = self.root if schema is None else schema
        if depth > 12:
            return None
        if "$ref" in s:
            ref = s["$ref"].rsplit("/", 1)[-1]
            return self.make(self.defs.get(ref, {}), name, depth + 1)
        if "const" in s:
            return s["const"]
        if "enum" in s:
            return self.rng.choice(s["enum"])
        for key in ("anyOf", "oneOf"):
            if key in s:
                options = [o for o in s[key] if o.get("type") != "null"] or s[key]
                return self.make(options[0], name, depth + 1)
        if "allOf" in s:
            merged: dict[str, Any] = {}
            for part in s["allOf"]:
                merged.update(part)
            return self.make(merged, name, depth + 1)
        kind = s.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None:
            kind = "object" if "properties" in s else "string"
        return getattr(self, f"_{kind}", self._string)(s, name, depth)

    def _object(self, s: dict[str, Any], name: str, depth: int) -> dict[str, Any]:
        props = s.get("properties", {})
        return {key: self.make(sub, key, depth + 1) for key, sub in props.items()}

    def _array(self, s: dict[str, Any], name: str, depth: int) -> list[Any]:
        low = int(s.get("minItems", 1))
        high = int(s.get("maxItems", max(low, 3)))
        n = max(low, min(high, 3))
        items = s.get("items", {"type": "string"})
        return [self.make(items, name, depth + 1) for _ in range(n)]

    def _string(self, s: dict[str, Any], name: str, depth: int) -> str:
        fmt = s.get("format")
        if fmt == "date":
            return (
                f"20{self.rng.randint(10, 29)}-0{self.rng.randint(1, 9)}-1{self.rng.randint(0, 9)}"
            )
        if fmt == "date-time":
            return f"2026-0{self.rng.randint(1, 9)}-1{self.rng.randint(0, 9)}T12:00:00Z"
        if fmt == "email":
            return f"{self.rng.choice(_WORDS)}@example.com"
        long_field = any(k in name.lower() for k in ("summary", "description", "text", "note"))
        text = (
            sentence(self.rng, self.echo, self.rng.randint(10, 18))
            if long_field
            else " ".join(self.rng.choice(_WORDS) for _ in range(self.rng.randint(1, 3)))
        )
        low, high = s.get("minLength"), s.get("maxLength")
        if low is not None and len(text) < int(low):
            text = (text + " ") * (int(low) // max(1, len(text)) + 1)
        if high is not None:
            text = text[: int(high)]
        return text

    def _integer(self, s: dict[str, Any], name: str, depth: int) -> int:
        low = s.get("minimum", s.get("exclusiveMinimum", -1) + 1 if "exclusiveMinimum" in s else 0)
        high = s.get(
            "maximum", s.get("exclusiveMaximum", 0) - 1 if "exclusiveMaximum" in s else 100
        )
        low, high = int(low), int(high)
        return self.rng.randint(low, max(low, high))

    def _number(self, s: dict[str, Any], name: str, depth: int) -> float:
        low = float(s.get("minimum", s.get("exclusiveMinimum", 0.0)))
        high = float(s.get("maximum", s.get("exclusiveMaximum", low + 100.0)))
        value = round(self.rng.uniform(low, high), 3)
        if "exclusiveMinimum" in s and value <= low:
            value = low + (high - low) / 2
        if "exclusiveMaximum" in s and value >= high:
            value = low + (high - low) / 2
        return value

    def _boolean(self, s: dict[str, Any], name: str, depth: int) -> bool:
        return self.rng.random() < 0.5

    def _null(self, s: dict[str, Any], name: str, depth: int) -> None:
        return None


def schema_instance(schema: dict[str, Any], rng: random.Random, echo: list[str]) -> Any:
    return SchemaFaker(schema, rng, echo).make()


def violate(instance: Any, schema: dict[str, Any]) -> Any:
    """The same instance, broken: a required field dropped (or a wrong type)."""
    if isinstance(instance, dict) and instance:
        required = schema.get("required") or list(instance)
        broken = dict(instance)
        broken.pop(required[0], None)
        return broken
    return {"unexpected": instance}


def json_object(rng: random.Random, echo: list[str]) -> str:
    return json.dumps(
        {"answer": sentence(rng, echo, 12), "keywords": [rng.choice(_WORDS) for _ in range(3)]}
    )


_MARKER = "conforms to the JSON schema below"
_INSTRUCTIONS = ("STRICT OUTPUT FORMAT:", "The output should be formatted as a JSON instance")
_FENCE = re.compile(r"```(?:json)?[ \t]*\n(.*?)\n[ \t]*```", re.DOTALL)


def message_text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def without_instructions(text: str) -> str:
    """The prompt before any LangChain format instructions (for the words echoed back)."""
    if "JSON" not in text:
        return text
    cuts = [k for k in (text.find(m) for m in _INSTRUCTIONS) if k > 0]
    return text[: min(cuts)] if cuts else text


def instructed_schema(messages: list[Any], *, json_answer: bool) -> dict[str, Any] | None:
    """The JSON schema a prompt asks its answer to follow, if any (latest message first)."""
    for message in reversed(messages):
        text = message_text(message)
        if "```" not in text:
            continue
        start = text.find(_MARKER)
        if start < 0 and not json_answer:
            continue
        for match in _FENCE.finditer(text, max(start, 0)):
            try:
                schema = json.loads(match.group(1))
            except ValueError:
                continue
            if isinstance(schema, dict) and (
                "properties" in schema or (start >= 0 and ("$ref" in schema or "type" in schema))
            ):
                return schema
    return None


# -- values the prompt names ---------------------------------------------------------------
# A model asked "What is the value of magic_function(3)?" calls the tool with 3, and one asked
# to "create a customer named '你好啊集团'" passes that name: tool-call arguments take the values
# the last user message names, where they fit a parameter (its type, bounds, enum), and are
# drawn from the seed elsewhere. The same for the keys a JSON answer is asked to have.
_QUOTED = re.compile(r"""(?<!\w)(?:'([^'\n]+?)'|"([^"\n]+?)"|“([^”\n]+?)”|「([^」\n]+?)」)(?!\w)""")
_NUMBER = re.compile(r"(?<![\w.\-])-?\d+(?:\.\d+)?(?!\w)")
_KEYWORDS = re.compile(r"\b(?:keys?|fields?|properties|attributes)\b", re.IGNORECASE)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_NAME_PARTS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
# What may stand between a parameter's word and its value: "vintage 2019", "price: 18.5",
# "named 'Ana'", "a price of 12".
_BETWEEN = re.compile(r"[\s:=]*(?:(?:is|of|at|to|as|be|was)\s+)?", re.IGNORECASE)


class PromptValues:
    """The quoted strings and numbers of a prompt, each with its offset."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.quoted = [
            (m.start(), m.end(), next(g for g in m.groups() if g is not None))
            for m in _QUOTED.finditer(text)
        ]
        inside = {k for a, b, _ in self.quoted for k in range(a, b)}
        self.numbers = [
            (m.start(), m.end(), m.group())
            for m in _NUMBER.finditer(text)
            if m.start() not in inside
        ]

    def named(self, field: str) -> tuple[range, str] | None:
        """The value written after ``field=`` or ``field:`` (quotes removed), and where."""
        value = rf"""\b{re.escape(field)}\s*[=:]\s*(?:'([^'\n]*)'|"([^"\n]*)"|([^\s,;)'"]+))"""
        match = re.search(value, self.text)
        if match is None:
            return None
        return range(match.start(), match.end()), next(g for g in match.groups() if g is not None)

    def near(self, field: str, values: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
        """Those of ``values`` right after a word of ``field``'s name ("bottles 12", "named
        'Ana'") or right before one ("12 bottles")."""
        parts = [w.lower() for w in _NAME_PARTS.findall(field) if len(w) >= 3]
        if not parts:
            return []
        words = re.compile(rf"\b(?:{'|'.join(map(re.escape, parts))})\w*", re.IGNORECASE)
        found = []
        for m in words.finditer(self.text):
            for value in values:
                start, end, _ = value
                after = start >= m.end() and _BETWEEN.fullmatch(self.text, m.end(), start)
                before = end <= m.start() and not self.text[end : m.start()].strip()
                if after or before:
                    found.append(value)
        return found

    def json_keys(self) -> list[str]:
        """Keys a prompt asks a JSON answer for: "as a JSON with 'setup' and 'punchline' keys"."""
        if not _KEYWORDS.search(self.text):
            return []
        return list(dict.fromkeys(q for _, _, q in self.quoted if _IDENTIFIER.fullmatch(q)))


def _resolved(schema: dict[str, Any], defs: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """``schema`` with a ``$ref`` followed, the first non-null ``anyOf``/``oneOf`` taken."""
    while depth < 12:
        depth += 1
        if "$ref" in schema:
            schema = defs.get(schema["$ref"].rsplit("/", 1)[-1], {})
            continue
        options = schema.get("anyOf") or schema.get("oneOf")
        if options:
            schema = next((o for o in options if o.get("type") != "null"), options[0])
            continue
        break
    return schema


def _in_bounds(value: float, s: dict[str, Any]) -> bool:
    return not (
        ("minimum" in s and value < s["minimum"])
        or ("maximum" in s and value > s["maximum"])
        or ("exclusiveMinimum" in s and value <= s["exclusiveMinimum"])
        or ("exclusiveMaximum" in s and value >= s["exclusiveMaximum"])
    )


def _fit(raw: str, s: dict[str, Any]) -> tuple[bool, Any]:
    """``raw`` as a value of the (resolved) field schema ``s``, or ``(False, None)``."""
    kind = s.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if "enum" in s:
        for option in s["enum"]:
            if str(option).lower() == raw.lower():
                return True, option
        return False, None
    if kind in ("integer", "number"):
        try:
            number: float = int(raw) if kind == "integer" else float(raw)
        except ValueError:
            return False, None
        if kind == "number" and number == int(number) and "." not in raw:
            number = int(number)
        return _in_bounds(number, s), number
    if kind == "boolean":
        lowered = raw.lower()
        return lowered in ("true", "false"), lowered == "true"
    plain = kind is None and not {"properties", "items"} & s.keys()
    if (kind == "string" or plain) and "format" not in s:
        fits = len(raw) >= int(s.get("minLength", 0)) and len(raw) <= int(
            s.get("maxLength", len(raw))
        )
        return fits, raw
    return False, None


def fill_from_prompt(instance: Any, schema: dict[str, Any], text: str) -> Any:
    """``instance`` (of ``schema``) with the values ``text`` names in the fields they fit.

    A field written out (``a=3``, ``city: Paris``) takes its value; else a value next to a
    word of the field's name ("12 bottles", "vintage 2019", "named 'Ana'"); else, in the
    order of the fields, a numeric field takes the first unused number of the text that fits
    its bounds and a string field the first unused quoted string; an enum field takes an
    option the text mentions. Fields nothing fits keep what the seed drew. Only top-level
    fields of an object are filled.
    """
    if not isinstance(instance, dict) or not text:
        return instance
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    props = _resolved(schema, defs).get("properties") or {}
    values = PromptValues(text)
    filled = dict(instance)
    fields = {name: _resolved(sub, defs) for name, sub in props.items()}
    used: set[int] = set()

    def take(name: str, candidates: list[tuple[int, int, str]]) -> bool:
        for start, _, raw in candidates:
            if start in used:
                continue
            ok, value = _fit(raw, fields[name])
            if ok:
                filled[name] = value
                used.add(start)
                return True
        return False

    def pool(s: dict[str, Any]) -> list[tuple[int, int, str]]:
        return values.numbers if s.get("type") in ("integer", "number") else values.quoted

    pending = []
    for name, s in fields.items():
        named = values.named(name)
        ok, value = _fit(named[1], s) if named is not None else (False, None)
        if ok and named is not None:
            filled[name] = value
            used.update(named[0])
        elif "enum" in s:
            words = set(re.findall(r"[\w-]+", text.lower()))
            options = [o for o in s["enum"] if str(o).lower() in words]
            if options:
                filled[name] = options[0]
        elif not take(name, values.near(name, pool(s))):
            pending.append(name)
    for name in pending:
        take(name, pool(fields[name]))
    return filled


def tool_call(
    tools: dict[str, dict[str, Any]],
    wanted: str | None,
    text: str,
    rng: random.Random,
    echo: list[str],
) -> tuple[str, dict[str, Any], Any]:
    """A call of one of ``tools`` (name -> parameters' JSON schema): its name, the schema and
    the arguments.

    The tool is ``wanted`` (what ``tool_choice`` names), else one whose name ``text`` has,
    else the first; its arguments an instance of its schema with the values ``text`` names
    (``fill_from_prompt``). Provider-neutral: OpenAI's and Anthropic's tool shapes map to it.
    """
    name = next(iter(tools), "tool")
    if wanted in tools:
        name = wanted
    else:
        name = next((t for t in tools if re.search(rf"\b{re.escape(t)}\b", text)), name)
    schema = tools.get(name) or {}
    return name, schema, fill_from_prompt(schema_instance(schema, rng, echo), schema, text)


def last_user_text(messages: list[Any]) -> str:
    """The text of the last user message (what a model answers), without format instructions."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return without_instructions(message_text(message))
    return ""


def keyed_json(keys: list[str], rng: random.Random, echo: list[str]) -> str:
    """A JSON object with exactly ``keys``, each a short text."""
    schema = {"type": "object", "properties": {k: {"type": "string"} for k in keys}}
    return json.dumps(schema_instance(schema, rng, echo))
