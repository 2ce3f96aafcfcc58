"""mempalace-broker: the one process that owns a palace.

A small stdio multiplexer: ONE real `mempalace-mcp` child, many clients on a
UNIX socket (and TCP + token when asked). Two engines writing one palace from
different HOMEs silently lose vectors (770 of 2000 with mempalace 3.4.0);
with every session routed through here there is only ever one writer.
"""

from mp_ssh_bridge import __version__  # one version for the whole distribution (pyproject reads it too)

__all__ = ["__version__"]
