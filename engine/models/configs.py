"""Shared pieces of the decoder configs: field validation and reading Hugging Face configs and
checkpoints (special token ids, an untied LM head)."""

from __future__ import annotations

import torch


def check_positive(config: object, names: tuple[str, ...]) -> None:
    """ValueError naming `Config.field` and its value for each of `names` that is below 1."""
    for name in names:
        value = getattr(config, name)
        if value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be ≥ 1, got {value}")


def hf_special_ids(hf) -> dict:
    """eos_token_ids (a tuple), bos_token_id and pad_token_id of a transformers config."""
    eos = getattr(hf, "eos_token_id", None)
    eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    return {
        "eos_token_ids": eos,
        "bos_token_id": getattr(hf, "bos_token_id", None),
        "pad_token_id": getattr(hf, "pad_token_id", None),
    }


def hf_lm_head(sd: dict[str, torch.Tensor], tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """{"lm_head.weight": ...} from an HF state dict, or {} when the head is tied."""
    if tie_embeddings:
        return {}
    if "lm_head.weight" not in sd:
        raise ValueError("checkpoint has no lm_head.weight but tie_word_embeddings is False")
    return {"lm_head.weight": sd["lm_head.weight"]}


__all__ = ["check_positive", "hf_lm_head", "hf_special_ids"]
