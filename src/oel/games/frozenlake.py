"""FrozenLake on TextArena's FrozenLakeEnv: the paper's 3x3 lake, 2 holes, start top-left, goal
bottom-right, a safe path guaranteed by the env's own generator (see grid.py for the rules of play)."""

from __future__ import annotations

from typing import Any

from oel.config import FrozenLakeParams
from oel.games.grid import DELTAS, DIRECTIONS, GridSession, bfs_path

LEGEND = ("Grid symbols: ' ' = frozen surface (safe to walk on), 'H' = hole (falling in loses the game), "
          "'G' = goal (reaching it wins the game), 'P' = your current position, 'P/G' = you are on the goal. "
          "Moving off the grid is an invalid move.")


class FrozenLakeSession(GridSession):
    name = "frozenlake"

    def __init__(self, params: FrozenLakeParams):
        super().__init__(params)
        self.params: FrozenLakeParams = params

    def _make_env(self) -> Any:
        from textarena.envs.FrozenLake.env import FrozenLakeEnv

        # randomize_start_goal=False: the reference's override (start (0,0), goal (n-1,n-1)).
        return FrozenLakeEnv(size=self.params.size, num_holes=self.params.num_holes, randomize_start_goal=False)

    def _legend(self) -> str:
        return LEGEND

    def _board(self) -> tuple[list[list[str]], tuple[int, int]]:
        game = self._env.state.game_state
        return game["grid"], tuple(game["player_pos"])

    def _moves(self, pos: tuple[int, int]) -> list[tuple[str, tuple[int, int]]]:
        size = self.params.size
        out = []
        for action in DIRECTIONS:
            r, c = pos[0] + DELTAS[action][0], pos[1] + DELTAS[action][1]
            if 0 <= r < size and 0 <= c < size:
                out.append((action, (r, c)))
        return out

    def legal_actions(self) -> list[str]:
        return [action for action, _ in self._moves(self._board()[1])]

    def solution(self) -> list[str] | None:
        grid, start = self._board()
        return bfs_path(start, lambda pos: [(a, p) for a, p in self._moves(pos) if grid[p[0]][p[1]] != "H"],
                        lambda pos: grid[pos[0]][pos[1]] == "G")
