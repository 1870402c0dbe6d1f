"""Lockstep play: every running episode's next prompt goes into ONE backend.generate call.

Games step on the CPU between calls; finished episodes drop out and queued ones take their slot
(continuous refill keeps the batch full). Responses are a pure function of (prompt, call seed), so a
run is reproducible for a given seed and batch size; under greedy decoding batching changes nothing
beyond float noise.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from tqdm.auto import tqdm

from oel.config import SamplingParams
from oel.games.base import GameSession, StepResult
from oel.prompts import play_context, render_play
from oel.rollout.backend import Backend, Generation, derive_seed
from oel.schemas import MAX_TEXT, Episode, Message, Turn

log = logging.getLogger(__name__)

Split = Literal["user", "extract", "heldout", "imported"]
SessionFactory = Callable[[str], GameSession]
NO_ACTION = "no valid action"   # what the reference code writes when nothing parses
MAX_TURNS = 500                 # a guard against a game that never ends; games own the real budget


@dataclass(frozen=True)
class EpisodeSpec:
    """One episode to play. `episode_id` defaults to <round>-<split>-<game>-<seed>[-k<store>].

    knowledge / knowledge_store: this episode's own knowledge in context (and the store it came from),
    overriding play()'s; lets one batched call play each game with that game's own stores."""
    game: str
    seed: int
    split: Split = "user"
    episode_id: str | None = None
    knowledge: str | None = None
    knowledge_store: int | None = None


def transcript_step(transcript: str, action: str | None, observation: str) -> str:
    """Append one model call: the bracketed action as the paper's transcript shows it, then the game's
    answer. Earlier reasoning text never enters later prompts (only the parsed action does)."""
    return f"{transcript}\n[Player] [{action or NO_ACTION}]\n{observation}"


@dataclass
class _Running:
    index: int
    spec: EpisodeSpec
    session: GameSession
    transcript: str
    turns: list[Turn] = field(default_factory=list)

    def next_prompt(self, knowledge: str | None) -> tuple[list[Message], dict[str, str]]:
        if self.spec.knowledge is not None:
            knowledge = self.spec.knowledge
        ctx = play_context(self.session.header, self.transcript, self.session.question, knowledge)
        return render_play(ctx), ctx

    def record(self, prompt: list[Message], ctx: dict[str, str], gen: Generation, step: StepResult) -> None:
        self.turns.append(Turn(index=len(self.turns), prompt=prompt, response=gen.text[:MAX_TEXT],
                               action=step.action, valid=step.valid, observation=step.observation[:MAX_TEXT],
                               response_tokens=gen.n_tokens, context=ctx))
        self.transcript = transcript_step(self.transcript, step.action, step.observation)


def play(specs: Sequence[EpisodeSpec], make_session: SessionFactory, backend: Backend,
         sampling: SamplingParams, *, round_id: str, policy: str, knowledge: str | None = None,
         knowledge_store: int | None = None, batch_size: int = 16, seed: int = 0,
         progress: bool = True, max_turns: int = MAX_TURNS) -> list[Episode]:
    """Play every spec to the end; episodes come back in spec order.

    knowledge: text inserted into every prompt (teacher-level play); None = the deployed policy's view.
    knowledge_store: recorded on each Episode (which store `knowledge` came from).
    A spec's own knowledge / knowledge_store override these two for that episode.
    seed: the i-th generate call uses derive_seed(seed, i).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    ids = [_episode_id(s, round_id, _store_of(s, knowledge_store)) for s in specs]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate episode ids: each (game, seed, split) may appear once per play() call")
    own = sum(s.knowledge is not None for s in specs)
    log.info("playing %d episodes (batch %d, knowledge %s)", len(specs), batch_size,
             f"per episode for {own}" if own else "none" if not knowledge else f"store {knowledge_store}")
    queue = deque(enumerate(specs))
    active: list[_Running] = []
    done: dict[int, Episode] = {}
    calls = 0
    with tqdm(total=len(specs), desc="episodes", unit="ep", disable=not progress) as bar:
        while queue or active:
            while queue and len(active) < batch_size:
                active.append(_start(*queue.popleft(), make_session))
            prompts = [r.next_prompt(knowledge) for r in active]
            gens = backend.generate([p for p, _ in prompts], sampling, seed=derive_seed(seed, calls))
            calls += 1
            if len(gens) != len(active):
                raise RuntimeError(f"backend returned {len(gens)} generations for {len(active)} prompts")
            still: list[_Running] = []
            for run, (prompt, ctx), gen in zip(active, prompts, gens, strict=True):
                step = run.session.step(gen.text)
                run.record(prompt, ctx, gen, step)
                if step.done or len(run.turns) >= max_turns:
                    done[run.index] = _finish(run, step, ids[run.index], round_id, policy,
                                              _store_of(run.spec, knowledge_store))
                    bar.update(1)
                else:
                    still.append(run)
            active = still
    log.info("played %d episodes in %d batched calls", len(done), calls)
    return [done[i] for i in range(len(specs))]


def _start(index: int, spec: EpisodeSpec, make_session: SessionFactory) -> _Running:
    session = make_session(spec.game)
    return _Running(index, spec, session, session.reset(spec.seed))


def _finish(run: _Running, last: StepResult, episode_id: str, round_id: str, policy: str,
            store: int | None) -> Episode:
    feedback = last.feedback if last.done and last.feedback else "Failure: the rollout turn limit was reached"
    return Episode(episode_id=episode_id, game=run.spec.game, seed=run.spec.seed, split=run.spec.split,
                   round=round_id, policy=policy, turns=run.turns, success=bool(last.done and last.success),
                   reward=float(last.reward) if last.done else 0.0, feedback=feedback[:MAX_TEXT],
                   knowledge_store=store)


def _store_of(spec: EpisodeSpec, store: int | None) -> int | None:
    return spec.knowledge_store if spec.knowledge is not None else store


def _episode_id(spec: EpisodeSpec, round_id: str, store: int | None) -> str:
    if spec.episode_id:
        return spec.episode_id
    return f"{round_id}-{spec.split}-{spec.game}-{spec.seed}" + ("" if store is None else f"-k{store}")
