"""``airlock audit``: run real requests carrying canaries through a traced stack and report where they went."""


class AuditError(Exception):
    """The audit could not run (exit 2): no verdict either way."""
