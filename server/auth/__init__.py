"""Who is asking (authentication) and what they may use (authorization)."""

from .access import ModelAccess, RuleCoverage
from .chain import Authentication, build_authentication
from .principal import ANONYMOUS, Principal
from .standing import Standing

__all__ = [
    "ANONYMOUS", "Authentication", "ModelAccess", "Principal", "RuleCoverage", "Standing", "build_authentication",
]
