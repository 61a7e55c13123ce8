"""Who is asking (authentication) and what they may use (authorization)."""

from .access import ModelAccess
from .chain import Authentication, build_authentication
from .principal import ANONYMOUS, Principal
from .standing import Standing

__all__ = ["ANONYMOUS", "Authentication", "ModelAccess", "Principal", "Standing", "build_authentication"]
