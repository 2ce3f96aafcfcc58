"""One palace, many spellings: whether two paths name one directory, and the one spelling a key is made of.

On a Mac one palace has many names. APFS (and HFS+) ignore case and Unicode normalization
(`~/Work` is `~/work`; an `é` typed in Terminal is NFC, the same name from Finder may be NFD),
and `/var`, `/tmp` and `/etc` are symlinks into `/private`, which some tools resolve and others
do not. Compared as strings, one palace looks like two: a -32067 mismatch for a session that
spells it another way, a refused remote `--ensure`, a FAIL in doctor — and, worst, two state
directories (two brokers, two writers on one chroma.sqlite3) where the spelling picks the broker.

So on one machine the file system decides:
- `same_file(a, b)`: equal strings; else both exist: the same (st_dev, st_ino); one exists and the
  other not: not one palace; neither exists yet: their realpaths, compared case- and
  normalization-insensitively on macOS (`fold`).
- `canonical(path)`: the realpath, and on macOS every existing component spelled as its directory
  lists it. The key of a palace's state directory is made of this (palace.state_dir_for), so every
  spelling of one palace finds one broker, and a spelling that is already canonical keeps the key
  it always had.
Across a VM boundary a path names nothing on this side: only palace.id can tell (handshake.py,
ssh.py). `spelled_alike` is a hint for skipping work there, never a proof.

The platform and the file system calls are parameters, so the macOS branches run on Linux with
substituted inputs. Stdlib only; nothing here touches the disk when the two strings are equal.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs every agent start ~3 ms; annotations only
    from collections.abc import Callable, Iterable

PRIVATE_LINKS = ("/var", "/tmp", "/etc")  # macOS: symlinks to /private/var, /private/tmp, /private/etc


def is_darwin(platform: str | None = None) -> bool:
    return (platform or sys.platform) == "darwin"


def fold(name: str, platform: str | None = None) -> str:
    """How a macOS file system compares names: Unicode-normalized (NFC) and case-folded. Elsewhere unchanged."""
    if not is_darwin(platform):
        return name
    import unicodedata  # ~0.4 ms, and only on macOS when two spellings differ

    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def _identity(path: str, stat: Callable[[str], os.stat_result]) -> tuple[int, int] | bool | None:
    """(st_dev, st_ino); False when nothing is there; None when it cannot be told (no permission)."""
    try:
        st = stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def same_file(a: str, b: str, *, platform: str | None = None, stat: Callable[[str], os.stat_result] = os.stat,
              realpath: Callable[[str], str] = os.path.realpath) -> bool:
    """Whether `a` and `b` name one file or directory on this machine (see the module docstring)."""
    if a == b:
        return True
    ia, ib = _identity(a, stat), _identity(b, stat)
    if isinstance(ia, tuple) and isinstance(ib, tuple):
        return ia == ib
    if isinstance(ia, tuple) or isinstance(ib, tuple):
        if ia is False or ib is False:
            return False  # one is there and the other is not: two names, two things
    real_a, real_b = realpath(a), realpath(b)
    return real_a == real_b or is_darwin(platform) and fold(real_a, platform) == fold(real_b, platform)


def canonical(path: str, *, platform: str | None = None, realpath: Callable[[str], str] = os.path.realpath,
              listdir: Callable[[str], Iterable[str]] = os.listdir) -> str:
    """The one spelling of `path` on this machine: symlinks resolved; on macOS each existing component as
    its directory lists it (a component that does not exist yet, and all below it, stay as given)."""
    real = realpath(path)
    return disk_spelling(real, listdir) if is_darwin(platform) else real


def disk_spelling(path: str, listdir: Callable[[str], Iterable[str]] = os.listdir) -> str:
    """An absolute `path` with each existing component spelled as its directory lists it (macOS's names on disk)."""
    parts = [p for p in path.split("/") if p]
    out = ""
    for i, name in enumerate(parts):
        try:
            names = list(listdir(out or "/"))
        except OSError:
            return "/".join([out, *parts[i:]])
        if name not in names:
            want = fold(name, "darwin")
            match = next((n for n in names if fold(n, "darwin") == want), None)
            if match is None:
                return "/".join([out, *parts[i:]])  # not there yet: the rest as given
            name = match
        out = f"{out}/{name}"
    return out or "/"


def spelled_alike(a: str, b: str) -> bool:
    """Whether two paths seen from ANOTHER machine could be one macOS spelling of the same palace: equal after
    folding case and normalization and dropping the `/private` of `/private/var`, `/private/tmp`, `/private/etc`.
    A hint only (skip a remote round trip); what decides across a VM boundary is palace.id."""
    return a == b or _unprivate(fold(a, "darwin")) == _unprivate(fold(b, "darwin"))


def _unprivate(path: str) -> str:
    for link in PRIVATE_LINKS:
        target = "/private" + link
        if path == target or path.startswith(target + "/"):
            return path[len("/private"):]
    return path
