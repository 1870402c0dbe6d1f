"""collect: the round's starting policy plays user-side and extraction seeds with NO knowledge in context.

The two splits sample as the reference does, so they are played as two batched play() calls:
  user     `collect.episodes_per_game` per game with `collect.sampling` (the reference's deployment
           games: temperature 0.7, top_p 1, top_k off) -> the distillation prompts
  extract  `collect.extraction_episodes_per_game` per game with `collect.extraction_sampling` (its
           validate mode: 0.7, top_p 0.8, top_k 20) -> what the extractor learns from; extract gives
           each store its own disjoint block of them when there are enough (see oel.stages.extract)
Each call has its own generation seed derived from (seed, round, split), so a run is reproducible.

A round declared on a deployment log (`rounds.<r>.collect: {source: chatlog, chatlog: PATH}`) plays
nothing: collect reads and validates the log (OpenAI chat JSONL or trajectory rows; every bad record is
one file:line, nothing written) and splits a seeded share of its conversations off as `heldout`.
A round declared on traffic (`{source: traces, experiment: NAME, since: TIME, until: TIME}`) reads the chat
requests the MLflow AI Gateway recorded in that window (oel.traces), chains them into conversations with their
`user_feedback`, and makes the same rows a chat log would; each row lists the trace ids it came from.
Conversations from either source are scrubbed of personal data (collect.scrub, oel.scrub) before anything is
written.

Writes data/<round>/trajectories.jsonl (one Episode per line, user episodes first, then extract;
schema: schemas/trajectory.schema.json). Run: `oel collect --round r1` (or `dvc repro collect@r1`).
`import_file` checks a log and puts it where its round's declaration says, for `dvc repro` to read.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from oel import traces, tracking
from oel.artifacts import ArtifactError, atomic_open, file_sha256, read_jsonl, write_jsonl, write_text
from oel.chatlog import is_chatlog, read_chatlog
from oel.config import Params, load_params
from oel.paths import ProjectPaths, RoundPaths
from oel.prompts import parse_play, render_play
from oel.prompts.render import HOSTILE_KINDS
from oel.rollout import EpisodeSpec, SessionFactory, build_backend, derive_seed, play
from oel.rollout.backend import Backend
from oel.schemas import Episode, Turn
from oel.scrub import scrub_episodes

log = logging.getLogger(__name__)

SCHEMA_FILE = Path("schemas") / "trajectory.schema.json"


SPLITS = ("user", "extract")


def run(params: Params, paths: RoundPaths) -> dict[str, Any]:
    from oel.stages._common import round_policy_spec

    source = params.rounds[paths.round_id].source.source
    if source == "chatlog":
        return collect_log(params, paths)
    if source == "traces":
        return collect_traces(params, paths)
    sharded: dict[str, int] = {}
    if params.collect.shards > 1:  # shards play where orchestration.task_runner says (oel.scaleout)
        start = time.time_ns()
        episodes, sharded = play_sharded(params, paths)
    else:
        backend = build_backend(params, round_policy_spec(params, paths), paths.root)
        start = time.time_ns()
        episodes = [ep for split in SPLITS for ep in play_split(split, params, paths, backend)]
    window = (start, time.time_ns())
    write_jsonl(paths.trajectories, episodes)  # the stage alone writes the round's out, shards or not
    log.info("wrote %d episodes to %s", len(episodes), paths.trajectories)
    tracking.log_episode_traces(params, "collect", episodes, window)  # after the write: it reads the records
    return {**summarize(episodes), "hostile_events": hostile_events(episodes), **sharded}


def play_split(split: str, params: Params, paths: RoundPaths, backend: Backend) -> list[Episode]:
    """One batched play() of a split's episodes with that split's sampling and its own call seed."""
    specs = collect_specs(params, paths.round_id, splits=(split,))
    if not specs:
        return []
    return play(specs, game_factory(params, paths.root), backend, split_sampling(params, split),
                round_id=paths.round_id, policy=params.policy_of(paths.round_id),
                batch_size=params.collect.batch_size, seed=split_seed(params, paths.round_id, split))


def split_sampling(params: Params, split: str):
    return params.collect.sampling if split == "user" else params.collect.extraction_sampling


def split_seed(params: Params, round_id: str, split: str) -> int:
    # The user split keeps the seed collect always used; extract gets its own.
    parts = ("collect", round_id) if split == "user" else ("collect", round_id, split)
    return derive_seed(params.seed, *parts)


def play_sharded(params: Params, paths: RoundPaths) -> tuple[list[Episode], dict[str, int]]:
    """Each split cut into collect.shards shards, run on the task runner, joined back in shard order."""
    from oel.scaleout import Shard, cut, run_shards
    from oel.stages._common import round_policy_spec

    policy_spec, shards = round_policy_spec(params, paths), []
    for split in SPLITS:
        specs = collect_specs(params, paths.round_id, splits=(split,))
        for part, seed in cut(specs, params.collect.shards, split_seed(params, paths.round_id, split)):
            shards.append(Shard(len(shards), tuple(part), split_sampling(params, split), seed, paths.round_id,
                                params.policy_of(paths.round_id), policy_spec))
    results = sorted(run_shards(params, paths.root, shards), key=lambda r: r["index"])
    episodes = [Episode.model_validate(row) for r in results for row in r["episodes"]]
    return episodes, {"shards": len(shards), "shard_processes": len({(r["host"], r["pid"]) for r in results})}


def hostile_events(episodes: list[Episode]) -> dict[str, int]:
    """What sanitize neutralises in the untrusted text of these episodes (model output, game text)."""
    from oel.prompts.render import SLOT_LIMITS, count_hostile

    texts = (text for ep in episodes for turn in ep.turns for text in (turn.response, turn.observation))
    return count_hostile(texts, SLOT_LIMITS["transcript"])


def collect_specs(params: Params, round_id: str, splits: tuple[str, ...] = SPLITS) -> list[EpisodeSpec]:
    """Per split, per enabled game: `episodes_per_game` user seeds / `extraction_episodes_per_game` extract seeds."""
    from oel.seeds import episode_seeds

    counts = {"user": params.collect.episodes_per_game, "extract": params.collect.extraction_episodes_per_game}
    return [EpisodeSpec(game, seed, split)
            for split in splits
            for game in params.games.enabled()
            for seed in episode_seeds(params.seed, game, split, round_id, counts[split])]


def game_factory(params: Params, root: Path) -> SessionFactory:
    from oel.games import make_game

    return lambda name: make_game(name, params.games, root)


def summarize(episodes: list[Episode]) -> dict[str, Any]:
    """{game: {...}, "overall": {...}}: pass rate, response tokens per turn, invalid-action rate, turns."""
    from oel.metrics import by_game

    return by_game(episodes)


# --- rounds on deployment logs -----------------------------------------------------------------------

IMPORT_FORMATS = ("auto", "openai", "oel")


def collect_log(params: Params, paths: RoundPaths) -> dict[str, Any]:
    """A round on a log: its validated episodes (chat logs split into imported/heldout) as the trajectories."""
    file = log_path(params, paths.round_id, paths.root)
    if not file.is_file():
        raise ArtifactError(f"{file}: no such file; rounds.{paths.round_id}.collect.chatlog names it: put the log "
                            f"there (`oel import-trajectories LOG --round {paths.round_id}` checks and copies it)")
    check_log_hash(file, params.rounds[paths.round_id].source.sha256, paths.round_id)
    episodes, hostile = read_log(file, paths.round_id, params)
    episodes, scrubbed = scrub_episodes(episodes, params.collect.scrub)  # before the write: nothing unscrubbed lands
    write_jsonl(paths.trajectories, episodes)
    held = sum(ep.split == "heldout" for ep in episodes)
    log.info("collect %s: %d episodes from %s (%d held out; neutralised: %s)", paths.round_id, len(episodes), file,
             held, ", ".join(f"{k} {v}" for k, v in hostile.items() if v) or "nothing")
    return {"episodes": len(episodes), "heldout": held, "hostile_events": hostile, "scrubbed": scrubbed}


def check_log_hash(file: Path, declared: str | None, round_id: str) -> None:
    """The log must be the one the round declares: DVC sees the declaration, not the file."""
    actual = file_sha256(file)
    if declared is None:
        log.warning("%s: rounds.%s.collect declares no sha256, so DVC cannot see this log change; declare "
                    "sha256: %s (`oel import-trajectories` does)", file, round_id, actual)
    elif actual != declared:
        raise ArtifactError(f"{file}: sha256 {actual}, but rounds.{round_id}.collect.sha256 is {declared}: the log "
                            f"changed since it was declared; put a new log at a new path in a new round, or set "
                            f"sha256: {actual} to learn this round from it (DVC reruns the round)")


def log_path(params: Params, round_id: str, root: Path) -> Path:
    """Where the round's declaration says its log is; one line saying how to declare it when it plays games."""
    params.policy_of(round_id)  # the round must be declared
    source = params.rounds[round_id].source
    if source.source == "traces":
        raise ArtifactError(f"round {round_id} reads the gateway's traces ({source.experiment!r}), not a log file; "
                            f"declare a new round on the log, or let `dvc repro collect@{round_id}` read the traces")
    if source.source != "chatlog":
        raise ArtifactError(
            f"round {round_id} plays games; to learn from a log, declare it in params.yaml as "
            f"rounds: {{{round_id}: {{from: {params.policy_of(round_id)}, collect: {{source: chatlog, "
            f"chatlog: chatlogs/{round_id}.jsonl}}}}}}")
    return Path(root) / str(source.chatlog)


def read_log(file: Path, round_id: str, params: Params, fmt: str = "auto") -> tuple[list[Episode], dict[str, int]]:
    """Every episode of a log, validated, or ArtifactError/ChatLogError naming each bad record as file:line.

    fmt: `openai` (chat-completions JSONL, oel.chatlog), `oel` (trajectory rows), `auto` (sniffed)."""
    file = Path(file)
    if fmt not in IMPORT_FORMATS:
        raise ArtifactError(f"--format {fmt!r}: use one of {', '.join(IMPORT_FORMATS)}")
    if not file.is_file():
        raise ArtifactError(f"{file}: no such file; pass the log file to import")
    sniffed = "openai" if is_chatlog(file) else "oel"
    if fmt not in ("auto", sniffed):
        # collect sniffs the format when DVC runs it, so a forced format it would not pick is refused here.
        raise ArtifactError(f"{file}: --format {fmt}, but its first record reads as {sniffed} "
                            "(a chat log is an object with `messages`; a trajectory row has `turns`)")
    if sniffed == "openai":
        chat = read_chatlog(file, round_id=round_id)
        return split_heldout(chat.episodes, params.collect.import_heldout_fraction, params.seed), chat.hostile
    return trajectory_rows(file, round_id, params), {}


def trajectory_rows(file: Path, round_id: str, params: Params) -> list[Episode]:
    episodes = read_jsonl(file, Episode)  # schema errors: file:line
    if not episodes:
        raise ArtifactError(f"{file}: holds no episodes; nothing to import")
    seen: set[str] = set()
    out = []
    for lineno, ep in zip(_row_lines(file), episodes, strict=True):
        try:
            out.append(_admit(ep, round_id, params, seen))
        except ValueError as err:
            raise ArtifactError(f"{file}:{lineno}: {err}") from None
    return out


def import_file(file: Path, round_id: str, params_file: Path, root: Path, fmt: str = "auto") -> tuple[int, Path]:
    """Validate every record of `file`, then copy it to the log its round declares (the input collect reads
    under DVC); on a bad record nothing is written. Returns (episodes, where the log now is)."""
    params = load_params(params_file)
    target = log_path(params, round_id, root)
    file = Path(file)
    episodes, _ = read_log(file, round_id, params, fmt)
    if target.exists() and target.samefile(file):
        return len(episodes), target
    if target.is_file() and ProjectPaths(root).round(round_id).trajectories.exists() and not _same_bytes(file, target):
        # DVC tracks the log's path, not its bytes: rewriting a collected log in place would leave the round's
        # trajectories stale with `dvc status` clean.
        raise ArtifactError(f"{target}: round {round_id} was collected from this log; put a changed log at a new "
                            f"path (rounds.{round_id}.collect.chatlog), so DVC reruns the round from it")
    with file.open("rb") as src, atomic_open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    log.info("checked %d episodes of %s; the log of round %s is %s", len(episodes), file, round_id, target)
    return len(episodes), target


def _same_bytes(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def split_heldout(episodes: list[Episode], fraction: float, seed: int) -> list[Episode]:
    """round(fraction x distinct conversations) of them, chosen by a seeded hash of their content, are
    `heldout`. Identical conversations share a content seed, so a copy can never sit on both sides."""
    from oel.rollout.backend import derive_seed

    seeds = sorted({ep.seed for ep in episodes}, key=lambda s: derive_seed(seed, "import-heldout", s))
    held = set(seeds[:round(fraction * len(seeds))])
    return [ep.model_copy(update={"split": "heldout" if ep.seed in held else "imported"}) for ep in episodes]


def _row_lines(file: Path) -> list[int]:
    # read_jsonl skips blank lines; this maps the k-th row back to its line number for errors.
    with file.open("rb") as fh:
        return [n for n, raw in enumerate(fh, start=1) if raw.strip()]


def _admit(ep: Episode, round_id: str, params: Params, seen: set[str]) -> Episode:
    if ep.split == "heldout":
        raise ValueError("split 'heldout' cannot be imported: held-out seeds must never reach training")
    if ep.game not in params.games.enabled():
        raise ValueError(f"game {ep.game!r} is not enabled in params (enabled: {', '.join(params.games.enabled())})")
    if ep.episode_id in seen:
        raise ValueError(f"episode_id {ep.episode_id!r} appears twice")
    seen.add(ep.episode_id)
    if not ep.turns:
        raise ValueError("episode has no turns")
    turns = [_admit_turn(turn, k) for k, turn in enumerate(ep.turns)]
    return ep.model_copy(update={"round": round_id, "turns": turns})


def _admit_turn(turn: Turn, k: int) -> Turn:
    if turn.index != k:
        raise ValueError(f"turns[{k}].index is {turn.index}; turns must be numbered 0, 1, ... in order")
    ctx = turn.context if turn.context is not None else parse_play(turn.prompt)
    if ctx is None:
        raise ValueError(f"turns[{k}]: no context, and the prompt is not in the play template "
                         "(see docs/trajectories.md)")
    try:
        rendered = render_play(ctx)
    except ValueError as err:
        raise ValueError(f"turns[{k}].context: {err}") from None
    if rendered != turn.prompt:
        # Also refuses prompts holding control tokens: their context renders to the sanitised text.
        raise ValueError(f"turns[{k}]: the prompt is not what its context renders (edited, or holds "
                         "chat control tokens); fix the row or drop its context")
    return turn.model_copy(update={"context": dict(ctx)})


# --- rounds on traffic: the gateway's traces ----------------------------------------------------------

def collect_traces(params: Params, paths: RoundPaths) -> dict[str, Any]:
    """A round on the conversations the gateway recorded in the round's window, scrubbed, as chat episodes."""
    src = params.rounds[paths.round_id].source
    since, until = _ms(src.since), _ms(src.until)
    if until > time.time_ns() // 1_000_000:
        raise ArtifactError(f"rounds.{paths.round_id}.collect.until {src.until.isoformat()} is in the future: "
                            "requests still to come would change what this round read; use a past time")
    with tracking.client(params) as client:
        exchanges, skipped = traces.read_exchanges(client, src.experiment, since, until)
    convs = traces.conversations(exchanges)
    episodes, hostile, skipped["unreadable"] = conversation_episodes(convs, paths.round_id)
    if not episodes:
        window = f"({src.since.isoformat() if src.since else 'the start'}, {src.until.isoformat()}]"
        raise ArtifactError(f"experiment {src.experiment!r} holds no answered chat request that ended in {window} "
                            f"(skipped: {_counts(skipped)}); serve traffic through the gateway, or move until later")
    episodes = split_heldout(episodes, params.collect.import_heldout_fraction, params.seed)
    episodes, scrubbed = scrub_episodes(episodes, params.collect.scrub)  # before the write: nothing unscrubbed lands
    write_jsonl(paths.trajectories, episodes)
    held = sum(ep.split == "heldout" for ep in episodes)
    used = sum(len(ep.trace_ids or ()) for ep in episodes)
    log.info("collect %s: %d conversations from %d traces of %r (%d held out; skipped: %s; scrubbed: %s)",
             paths.round_id, len(episodes), used, src.experiment, held, _counts(skipped), _counts(scrubbed))
    return {"episodes": len(episodes), "heldout": held, "traces": used, "skipped": skipped,
            "hostile_events": hostile, "scrubbed": scrubbed}


def conversation_episodes(convs: list[Any], round_id: str) -> tuple[list[Episode], dict[str, int], int]:
    """Each conversation as the chat-log import makes it (oel.chatlog.record_to_episode), its trace ids kept;
    (episodes, sanitize events, conversations that are not learnable: e.g. image parts, an assistant-only chat)."""
    from pydantic import ValidationError

    from oel.chatlog import record_to_episode

    episodes, hostile, unreadable = [], dict.fromkeys(HOSTILE_KINDS, 0), 0
    for conv in convs:
        # A blank reply earlier in the conversation was skipped as no response; the turns around it still teach.
        messages = [m for m in conv.messages if m.get("role") != "assistant" or not traces.blank(m)]
        record = {"id": conv.trace_ids[0], "messages": messages, "feedback": feedback_value(conv.feedback)}
        try:
            ep, events = record_to_episode(record, conv.trace_ids[0], round_id)
        except (ValueError, ValidationError) as err:
            log.info("conversation %s not learnable: %s", conv.trace_ids[0], str(err).splitlines()[0][:200])
            unreadable += 1
            continue
        episodes.append(ep.model_copy(update={"trace_ids": list(conv.trace_ids)}))
        for kind, n in events.items():
            hostile[kind] += n
    return episodes, hostile, unreadable


def feedback_value(fb: Any) -> Any:
    """A `user_feedback` assessment as a chat log's `feedback` field: a number or true/false is a rating, a text
    is the feedback, an object {rating, text} both; its rationale is the text when the value is not one. None:
    the user's next message is the feedback, as in a log."""
    if fb is None:
        return None
    value, why = fb.value, (fb.rationale or "").strip() or None
    if isinstance(value, bool | int | float):
        return {"rating": value, "text": why} if why else value
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, dict):
        return {**value, "text": why} if why and not {"text", "comment"} & set(value) else value
    return why


def _ms(moment: datetime | None) -> int | None:
    """Milliseconds since the epoch, exactly (what MLflow stores a trace's times in)."""
    if moment is None:
        return None
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none"


# --- schema --------------------------------------------------------------------------------------

def trajectory_schema() -> dict[str, Any]:
    """JSON Schema of one trajectories.jsonl row, generated from the pydantic Episode model."""
    schema = Episode.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://oel.local/schemas/trajectory.schema.json", **schema}


def write_schema(path: Path = SCHEMA_FILE) -> Path:
    """Regenerate schemas/trajectory.schema.json (a test fails when the committed file drifts)."""
    write_text(path, json.dumps(trajectory_schema(), indent=2, ensure_ascii=False) + "\n")
    return path
