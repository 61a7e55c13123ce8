"""Placeholder for helper "gpus"' module (issue 17): only the dataclass sizing needs. The lead keeps that
helper's server/gpus.py when merging."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    """One GPU as CUDA will see it."""

    device: str
    name: str
    total_mib: int
    free_mib: int | None
    compute_capability: tuple[int, int] | None
