"""Batched lockstep play and the generation backends behind one interface (built by build_backend).

    from oel.rollout import EpisodeSpec, build_backend, play
    episodes = play([EpisodeSpec("frozenlake", 7)], factory, build_backend(params, "models/r1"), sampling,
                    round_id="r1", policy="base", knowledge=None, batch_size=16, seed=0)
"""

from oel.rollout.backend import Backend, BackendError, Generation, derive_seed
from oel.rollout.engine import EpisodeSpec, SessionFactory, play, transcript_step
from oel.rollout.factory import build_backend, release
from oel.rollout.fake import FakeBackend
from oel.rollout.transformers_backend import TransformersBackend
from oel.rollout.vllm_backend import VLLMBackend

__all__ = ["Backend", "BackendError", "EpisodeSpec", "FakeBackend", "Generation", "SessionFactory",
           "TransformersBackend", "VLLMBackend", "build_backend", "derive_seed", "play",
           "release", "transcript_step"]
