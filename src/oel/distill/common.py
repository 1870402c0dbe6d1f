"""What the training run (oel.distill.trainer) and the trainer class (oel.distill.sdft) both use: the step hook's
type, the prefix of the per-step metrics in the trainer's log history, and TRL imported lazily. Its own module so
that neither imports the other (the trainer module builds the class lazily; the class needs these names)."""

from __future__ import annotations

from collections.abc import Callable

StepHook = Callable[[int, dict[str, float]], None]
HISTORY_PREFIX = "oel/"  # the trainer's per-step metrics in state.log_history, which checkpoints carry


def trl():
    """Import TRL lazily: its experimental package warns on import and pulls heavy modules."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trl.experimental.*")
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer
    return SDFTConfig, SDFTTrainer
