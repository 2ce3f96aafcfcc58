"""The one error type the client side raises for things an agent must be told.

Every failure on the way to the broker — a bad URL, a refused token, an SSH
host that cannot be verified, a broker serving another palace — ends as a
JSON-RPC error to the agent. Keeping one base class with the JSON-RPC code
attached means the code survives every seam (unix, tcp, ssh): a palace
mismatch is -32067 whichever transport found it, never "unreachable".
Stdlib only (the shim's fast path imports it).
"""

from __future__ import annotations

from mp_ssh_bridge.protocol import BROKER_UNREACHABLE, PALACE_MISMATCH


class ShimError(Exception):
    """A failure the agent is told about as a JSON-RPC error with this code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class PalaceMismatch(ShimError):
    """The broker that answered serves another palace: never forward a call to it."""

    def __init__(self, message: str) -> None:
        super().__init__(PALACE_MISMATCH, message)


class EndpointError(ShimError):
    """An endpoint that cannot be used (the message says why and what to set)."""

    def __init__(self, message: str, code: int = BROKER_UNREACHABLE) -> None:
        super().__init__(code, message)


class NoAnswer(ShimError):
    """The endpoint was reached but did not answer as a broker (a timeout, a reset): a transport failure, not its
    refusal — worth another try, unlike an error the broker itself sent."""

    def __init__(self, message: str) -> None:
        super().__init__(BROKER_UNREACHABLE, message)
