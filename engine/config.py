"""Validation helpers shared by the frozen config dataclasses."""

from __future__ import annotations

from dataclasses import fields
from typing import TypeVar

C = TypeVar("C", bound="FromDict")


def check_positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


class FromDict:
    """Base of a config dataclass: `from_dict`, the inverse of `dataclasses.asdict`."""

    @classmethod
    def from_dict(cls: type[C], data: dict) -> C:
        """The config from its dict form; ValueError naming any field it does not have."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        return cls(**data)
