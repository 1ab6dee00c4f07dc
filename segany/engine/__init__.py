"""The inference engine: the model definitions of segany.modeling run fast.

Built once from a model and a mode (`exact` / `fast`); see docs/architecture.md. A model family's
speed lives here, in `segany/engine/<family>.py`; its definition in segany.modeling.
"""
from .precision import make_fast
from .sam_engine import MODES, SamEngine, build_engine
from .training import training_twin

__all__ = ["MODES", "SamEngine", "build_engine", "make_fast", "training_twin"]
