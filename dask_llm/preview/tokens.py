"""Counting prompt tokens without a request, and without the network.

tiktoken's ``o200k_base`` encoding when it is available offline (tiktoken
downloads encodings at first use, which a machine without network cannot; its
cache is checked first and the download never triggered), else the stated
heuristic of 4 characters a token. ``estimate`` counts prompts with it, and
``enrich`` the fixed blocks of a prompt (``preview.caching``): one counter, so
the two never disagree about what is long enough to cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable

_O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"

Counter = Callable[[str], int]


def token_counter() -> tuple[Counter, str]:
    """(count(text) -> int, name): tiktoken's o200k_base if cached locally, else chars / 4."""
    heuristic: tuple[Counter, str] = (
        (lambda text: (len(text) + 3) // 4),
        "heuristic: 4 characters a token",
    )
    try:
        import tiktoken
    except ImportError:
        return heuristic
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get(
        "DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache")
    )
    cached = os.path.join(cache_dir, hashlib.sha1(_O200K_URL.encode()).hexdigest())
    if not cache_dir or not os.path.exists(cached):
        return heuristic  # tiktoken would try to download it: not here
    try:
        enc = tiktoken.get_encoding("o200k_base")
    except Exception:  # a broken cache file: fall back rather than fetch
        return heuristic
    return (lambda text: len(enc.encode(text, disallowed_special=()))), "tiktoken o200k_base"
