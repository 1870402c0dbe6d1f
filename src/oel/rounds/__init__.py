"""The round lifecycle: everything that looks across rounds, one layer above the stages.

  plan       which round runs next, declaring it in params.yaml, the per-project iteration lock
  gate       the promotion gate: every headline metric, per game, against the champion (oel.paired's tests)
  lifecycle  the champion chain from the decision files; promote, force, rollback; `oel rounds`
  records    the lifecycle's files, validated at every read
  registry   the decisions mirrored into MLflow's Model and Prompt registries (through oel.tracking)
  report     reports/summary.md: the round tables, cross-round curves, teacher drift

Stages know one round and never import this package (a layering contract in the test suite says so). This
layer reads files and writes its own records; MLflow and the registry aliases are written by the flow and the
CLI through oel.rounds.registry.
"""

from oel.rounds.plan import (
    DEFAULT_LOCK_TIMEOUT,
    IterationBusy,
    RoundError,
    RoundPlan,
    declare_round,
    is_done,
    iteration_lock,
    iteration_lock_path,
    next_round_id,
    plan,
    round_number,
)

__all__ = ["RoundPlan", "RoundError", "IterationBusy", "plan", "declare_round", "iteration_lock",
           "next_round_id", "is_done", "round_number", "iteration_lock_path", "DEFAULT_LOCK_TIMEOUT"]
