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
