"""Round ids (r1, r2, ...): their order and the next one. Pure; the lowest module of the lifecycle."""

from __future__ import annotations

from oel.config import ROUND_ID
from oel.errors import UserError


class RoundError(UserError, ValueError):
    """A round that cannot be run or declared; the message names the cause and the fix."""


def round_number(round_id: str) -> int:
    if not ROUND_ID.match(round_id):
        raise RoundError(f"round id {round_id!r} must look like r1, r2, ...")
    return int(round_id[1:])


def next_round_id(declared: list[str]) -> str:
    return f"r{max((round_number(r) for r in declared), default=0) + 1}"
