"""mp-ssh-bridge: the client side of the single-writer MemPalace broker.

Kept empty on purpose: `mp-shim` imports `mp_ssh_bridge.shim` on every agent
session start, and anything imported here would be paid by every one of them.
"""

__version__ = "0.1.0"
