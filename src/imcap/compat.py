"""Differences between transformers releases, handled in one place."""

from __future__ import annotations

import functools
import inspect

from torch import nn


@functools.cache
def _cache_keyword_of(forward) -> str:
    # transformers 5.24 renamed the decoders' `past_key_values` to `cache` (the old name warns on every
    # call); the releases before it know only the old name
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_keyword(decoder: nn.Module) -> str:
    """The name under which `decoder`'s forward takes its KV cache."""
    return _cache_keyword_of(type(decoder).forward)
