"""Automatic prompt caching, as OpenAI does it: cached prefixes of 1,024 tokens and more.

OpenAI caches the longest prefix of a prompt it has seen recently, for
prompts of at least 1,024 tokens, in steps of 128 tokens (1,024, 1,152,
1,280...), and reports the tokens read from the cache as
``usage.prompt_tokens_details.cached_tokens``; a prefix stays cached for
5 to 10 minutes after its last use. A prefix is the request's tools and
response format, then its messages in order, so a fixed instruction before
the row's text is cached and one after it is not.

Here the prompt is that text, and a token is 4 characters of it (the
heuristic ``count_tokens`` uses): the prefix of ``n`` tokens is the first
``4 n`` characters. Each prefix at a step is kept as a 16-byte hash with the
time of its last use, per model; a request reads the longest one seen
within ``ttl`` seconds and refreshes all of its own. Memory is bounded by
``MAX_PREFIXES`` (the least recently used go first) and by the ttl.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any, Final

#: Shortest prompt OpenAI caches, and the step of the cached prefix, in tokens.
MIN_TOKENS: Final = 1024
STEP_TOKENS: Final = 128
#: Characters per token (``count_tokens``'s heuristic).
CHARS_PER_TOKEN: Final = 4
#: Prefix hashes kept at most.
MAX_PREFIXES: Final = 200_000


def prompt_text(payload: dict[str, Any]) -> str:
    """The prompt in the order OpenAI caches it: tools and response format, then messages."""
    parts = [
        json.dumps(payload[key], sort_keys=True)
        for key in ("tools", "response_format")
        if payload.get(key)
    ]
    for message in payload.get("messages") or []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"{message.get('role')}\n{content if isinstance(content, str) else ''}")
    return "\n".join(parts)


class PromptCache:
    """Prefixes of recent prompts, by model: how many tokens of a new one were cached."""

    __slots__ = ("_seen", "ttl")

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def cached_tokens(
        self, model: str, payload: dict[str, Any], prompt_tokens: int, now: float
    ) -> int:
        """Tokens of this prompt read from the cache (0, or 1,024 + 128 k), and remember it."""
        if self.ttl <= 0 or prompt_tokens < MIN_TOKENS:
            return 0
        text = prompt_text(payload)
        seen = self._seen
        edge = now - self.ttl
        while seen:
            first = next(iter(seen))
            if seen[first] > edge and len(seen) < MAX_PREFIXES:
                break
            del seen[first]
        digest = hashlib.blake2b(model.encode() + b"\0", digest_size=16)
        hit = 0
        done = 0
        tokens = MIN_TOKENS
        while tokens <= prompt_tokens and tokens * CHARS_PER_TOKEN <= len(text):
            end = tokens * CHARS_PER_TOKEN
            digest.update(text[done:end].encode())
            done = end
            key = digest.copy().digest()
            if key in seen:
                hit = tokens
                seen.move_to_end(key)
            seen[key] = now
            tokens += STEP_TOKENS
        return hit

    def clear(self) -> None:
        self._seen.clear()
