"""Pages of the broker's name-ordered lists (keys, clients): the page token names the
last entry of the previous page, so a page starts right after it whatever was added or
removed in between, and no reply grows with the registry (issue 12 item 1)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from typing import TypeVar

from edgekms.errors import InvalidArgument

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_TOKEN_MAX = 512


def encode_token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def decode_token(token: str) -> str:
    """The name a page token carries; InvalidArgument("list.page_token_invalid") else."""
    bad = InvalidArgument("list.page_token_invalid", "the page token is not one this broker gave")
    if len(token) > _TOKEN_MAX:
        raise bad
    try:
        name = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    if not name:
        raise bad
    return name


def page_by_name(
    items: Iterable[T], name: Callable[[T], str], page_size: int, page_token: str
) -> tuple[list[T], str]:
    """One page of `items` (already in name order, filtered) and the next page's token
    ("" on the last page)."""
    if page_size > MAX_PAGE_SIZE:
        raise InvalidArgument("list.page_size_invalid", f"page_size may be at most {MAX_PAGE_SIZE}")
    after = decode_token(page_token) if page_token else None
    size = page_size or DEFAULT_PAGE_SIZE
    page: list[T] = []
    for item in items:
        if after is not None and name(item) <= after:
            continue
        if len(page) == size:
            return page, encode_token(name(page[-1]))
        page.append(item)
    return page, ""
