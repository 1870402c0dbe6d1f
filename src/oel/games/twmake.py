"""TextWorld game files: generated once per (challenge, level, seed) with `tw-make`, cached on disk.

Layout: <cache>/<challenge>/level-<L>/seed-<S>/game.{z8,json,ni}. Generation runs in a temp folder next
to its final place and is renamed into place in one step, under a per-game file lock, so concurrent
processes never see (or trust) a half-written game. tw-make runs with HOME inside the cache (its Inform 7
compiler writes $HOME/Inform/) and PYTHONHASHSEED=0 (tw-cooking's .z8 bytes depend on set order).
The cache holds nothing that cannot be remade from the seed, so a damaged cached game (a disk filled, a
copy cut short) is regenerated with one log line instead of failing the stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from filelock import FileLock

from oel.errors import UserError

log = logging.getLogger(__name__)

GAME_FILE = "game.z8"
GENERATE_TIMEOUT_S = 300


class TextWorldGenerationError(UserError):
    """tw-make is missing or failed for one game."""


def challenge_for_seed(seed: int, challenges: list[str]) -> str:
    """Which challenge an episode seed plays. A hash, not `seed % n`: episode seeds come in arithmetic
    families (the reference strides by 1000), and a modulus would give a whole family one challenge."""
    digest = hashlib.sha256(str(seed).encode()).digest()
    return challenges[int.from_bytes(digest[:8], "big") % len(challenges)]


def challenge_args(challenge: str, level: int, seed: int) -> list[str]:
    """tw-make arguments for one game. Only coin_collector/treasure_hunter have --level; the other two
    map `level` onto their own knobs (documented in params.yaml)."""
    if challenge in ("tw-coin_collector", "tw-treasure_hunter"):
        return [challenge, "--level", str(level)]
    if challenge == "tw-simple":
        rewards = {1: "dense", 2: "balanced"}.get(level, "sparse")
        return [challenge, "--rewards", rewards, "--goal", "detailed"]
    if challenge == "tw-cooking":
        # --recipe-seed defaults to 0 (one recipe for every game); tie it to the seed for variety.
        knobs = {1: ["--recipe", "1", "--take", "1", "--go", "1"],
                 2: ["--recipe", "1", "--take", "1", "--go", "6", "--open"],
                 3: ["--recipe", "2", "--take", "2", "--go", "6", "--open", "--cook", "--cut"]}
        extra = knobs.get(level, ["--recipe", "3", "--take", "3", "--go", "9", "--open", "--cook", "--cut"])
        return [challenge, *extra, "--recipe-seed", str(seed)]
    raise TextWorldGenerationError(f"unknown TextWorld challenge {challenge!r}; use one of tw-coin_collector, "
                                   "tw-treasure_hunter, tw-simple, tw-cooking")


def game_dir(cache: Path, challenge: str, level: int, seed: int) -> Path:
    return Path(cache) / challenge / f"level-{level}" / f"seed-{seed}"


def _tw_make() -> str:
    beside = Path(sys.executable).parent / "tw-make"  # the venv's own, even when PATH lacks the venv
    found = str(beside) if beside.exists() else shutil.which("tw-make")
    if not found:
        raise TextWorldGenerationError("tw-make not found; install textworld==1.7.0 in this environment")
    return found


def story_damage(path: Path) -> str | None:
    """Why a game file would not load, or None. Checked before the Z-machine sees it: frotz calls exit() on
    a bad story file, which would kill the whole stage."""
    try:
        head = Path(path).read_bytes()
    except OSError as err:
        return f"cannot read it ({err.strerror})"
    version = head[0] if head else 0
    scale = {1: 2, 2: 2, 3: 2, 4: 4, 5: 4, 6: 8, 7: 8, 8: 8}.get(version)
    if scale is None or len(head) < 64 or not _header_fits(head, scale):
        return "not a valid Z-machine story file (corrupt or truncated)"
    try:  # tw-make always writes the metadata beside the story; textworld reads it
        if not isinstance(json.loads(Path(path).with_suffix(".json").read_text(encoding="utf-8")), dict):
            return "its metadata game.json is not a JSON object"
    except (OSError, ValueError, UnicodeDecodeError):
        return "its metadata game.json is missing or corrupt"
    return None


def _header_fits(head: bytes, scale: int) -> bool:
    """Declared length and the header's memory pointers all lie inside the file."""
    word = lambda at: int.from_bytes(head[at:at + 2], "big")  # noqa: E731
    declared = word(0x1A) * scale
    pointers = [word(at) for at in (0x04, 0x06, 0x08, 0x0A, 0x0C, 0x0E)]
    return 64 < declared <= len(head) and all(64 <= p < len(head) for p in pointers)


def ensure_game(cache: Path, challenge: str, level: int, seed: int, *, damaged: str | None = None) -> Path:
    """Path of the .z8 for (challenge, level, seed), generating it first if it is not cached or the cached
    one is damaged. `damaged` is the caller's reason to distrust a cached game that passed the checks
    (it failed to load): it is regenerated once."""
    if seed < 0:
        raise TextWorldGenerationError(f"TextWorld seed must be >= 0, got {seed}")
    final = game_dir(cache, challenge, level, seed)
    if damaged is None and (final / GAME_FILE).is_file() and story_damage(final / GAME_FILE) is None:
        return final / GAME_FILE
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / GAME_FILE).is_file():
            why = damaged or story_damage(final / GAME_FILE)
            if why is None:  # another process made (or remade) it while we waited
                return final / GAME_FILE
            log.warning("%s: cached TextWorld game is damaged (%s); regenerating it", final / GAME_FILE, why)
        _generate(Path(cache), challenge, level, seed, final)
    return final / GAME_FILE


def _generate(cache: Path, challenge: str, level: int, seed: int, final: Path) -> None:
    home = cache / "home"
    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-seed-{seed}-", dir=final.parent))
    cmd = [_tw_make(), *challenge_args(challenge, level, seed), "--seed", str(seed),
           "--output", str(tmp / GAME_FILE), "--silent", "-f"]
    env = {**os.environ, "HOME": str(home.resolve()), "PYTHONHASHSEED": "0"}
    log.info("generating TextWorld game %s level %d seed %d", challenge, level, seed)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=GENERATE_TIMEOUT_S,
                              check=False)
        if proc.returncode != 0 or not (tmp / GAME_FILE).is_file():
            last = (proc.stderr or proc.stdout or "no output").strip().splitlines()[-1:] or ["no output"]
            raise TextWorldGenerationError(f"tw-make {challenge} level {level} seed {seed} failed "
                                           f"(exit {proc.returncode}): {last[0]}")
        if final.exists():  # a stale partial or damaged folder (we hold the lock)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except subprocess.TimeoutExpired:
        raise TextWorldGenerationError(f"tw-make {challenge} level {level} seed {seed} took over "
                                       f"{GENERATE_TIMEOUT_S}s") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
