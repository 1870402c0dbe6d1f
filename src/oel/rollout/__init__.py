"""Batched lockstep play and the generation backends behind one interface.

    from oel.rollout import EpisodeSpec, TransformersBackend, play
    episodes = play([EpisodeSpec("frozenlake", 7)], factory, TransformersBackend(loaded), sampling,
                    round_id="r1", policy="base", knowledge=None, batch_size=16, seed=0)
"""

from oel.rollout.backend import Backend, BackendError, Generation, derive_seed
from oel.rollout.engine import EpisodeSpec, SessionFactory, play, transcript_step
from oel.rollout.fake import FakeBackend
from oel.rollout.transformers_backend import TransformersBackend
from oel.rollout.vllm_backend import VLLMBackend

__all__ = ["Backend", "BackendError", "EpisodeSpec", "FakeBackend", "Generation", "SessionFactory",
           "TransformersBackend", "VLLMBackend", "derive_seed", "play", "transcript_step"]
