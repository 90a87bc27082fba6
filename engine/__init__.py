"""dglm.engine: diffusion-guided controllable generation behind a batched Engine API."""

from dglm.engine.api import GenerationParams, RequestOutput, Sample
from dglm.engine.engine import Engine
from dglm.engine.probes import Control, Probe

__all__ = ["Control", "Engine", "GenerationParams", "Probe", "RequestOutput", "Sample"]
