"""Prompt templates as files (play.md, knowledge.md) and the one render path that fills them."""

from oel.prompts.render import (
    PLAY_SLOTS,
    PromptError,
    parse_play,
    play_context,
    render_play,
    sanitize,
)

__all__ = ["PLAY_SLOTS", "PromptError", "parse_play", "play_context", "render_play", "sanitize"]
