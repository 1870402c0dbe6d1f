"""Sokoban on TextArena's SokobanEnv: the paper's 6x6 room (outer walls included) with one box, made by
the env's reverse-play generator (see grid.py for the rules of play)."""

from __future__ import annotations

from typing import Any

from oel.config import SokobanParams
from oel.games.grid import DELTAS, DIRECTIONS, GridSession, bfs_path

# Sokoban-v0's registration; the reference builds the env with ta.make("Sokoban-v0", ...), so its turn
# limit is 30 (the 5-call budget ends games long before it).
MAX_TURNS = 30
WALL, TARGET, BOX_ON_TARGET, BOX = 0, 2, 3, 4

LEGEND = ("Board symbols: '#' = wall, '_' = floor, 'O' = empty target, 'X' = box, '√' = box on a target, "
          "'P' = you, 'S' = you on a target. Push every box onto a target to win: walking into a box pushes "
          "it one cell if the cell behind it is free; boxes cannot be pulled or pushed into walls or other "
          "boxes. Moving into a wall is an invalid move.")

Pos = tuple[int, int]
State = tuple[Pos, frozenset[Pos]]


class SokobanSession(GridSession):
    name = "sokoban"

    def __init__(self, params: SokobanParams):
        super().__init__(params)
        self.params: SokobanParams = params

    def _make_env(self) -> Any:
        from textarena.envs.Sokoban.env import SokobanEnv

        return SokobanEnv(dim_room=tuple(self.params.dim_room), max_turns=MAX_TURNS,
                          num_boxes=self.params.num_boxes)

    def _legend(self) -> str:
        return LEGEND

    def _state(self) -> State:
        room = self._env.room_state
        rows, cols = ((room == BOX) | (room == BOX_ON_TARGET)).nonzero()
        boxes = frozenset((int(r), int(c)) for r, c in zip(rows, cols, strict=True))
        player = self._env.player_position
        return (int(player[0]), int(player[1])), boxes

    def _moves(self, state: State) -> list[tuple[str, State]]:
        """The env's movement rules: walk onto floor/target, push one box onto floor/target."""
        fixed = self._env.room_fixed
        rows, cols = fixed.shape
        (pr, pc), boxes = state
        out = []
        for action in DIRECTIONS:
            dr, dc = DELTAS[action]
            nxt = (pr + dr, pc + dc)
            if not (0 <= nxt[0] < rows and 0 <= nxt[1] < cols) or fixed[nxt] == WALL:
                continue
            if nxt in boxes:
                beyond = (nxt[0] + dr, nxt[1] + dc)
                if (not (0 <= beyond[0] < rows and 0 <= beyond[1] < cols) or fixed[beyond] == WALL
                        or beyond in boxes):
                    continue
                out.append((action, (nxt, (boxes - {nxt}) | {beyond})))
            else:
                out.append((action, (nxt, boxes)))
        return out

    def legal_actions(self) -> list[str]:
        return [action for action, _ in self._moves(self._state())]

    def solution(self) -> list[str] | None:
        fixed = self._env.room_fixed
        return bfs_path(self._state(), self._moves,
                        lambda state: all(fixed[box] == TARGET for box in state[1]))
