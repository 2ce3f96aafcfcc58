"""Read JSON and JSONC with positions, and change one member of an object by splicing text.

Why: `mp-bridge install` edits files people keep by hand (opencode's `opencode.jsonc` has comments
and trailing commas; `~/.claude.json` holds a thousand lines of other state). Loading and dumping the
whole file would drop the comments and reformat everything. So this module parses a document into
nodes that know their byte spans (`parse`), and the edits (`replace_value`, `insert_member`,
`remove_member`) each return ONE splice, `Edit(offset, old, new)`, that touches only the text of the
member concerned: the rest of the file stays byte for byte what it was, and an edit is undone by
putting `old` back where `new` is.

Two dialects: strict JSON (what `JSON.parse` accepts: Claude Code's and pi's files) and JSONC as
opencode reads it (`//` and `/* */` comments, trailing commas in objects and arrays). Strings are
decoded with the `json` module itself, so escapes mean exactly what they mean to a JSON parser.
Stdlib only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

MAX_DEPTH = 256  # two frames a level: well inside Python's recursion limit
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_WS = " \t\r\n"


class JsoncError(ValueError):
    """The text is not a valid document in the dialect asked for; says where, as line:column."""

    def __init__(self, message: str, text: str, pos: int) -> None:
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        super().__init__(f"line {line} column {col}: {message}")
        self.pos = pos
        self.line = line
        self.col = col


@dataclass
class Member:
    """`"key": value` in an object: where its key starts and ends, its value, and the comma after it."""

    key: str
    key_start: int
    key_end: int
    value: Node
    comma: int | None = None  # offset of the "," that follows the value, if any


@dataclass
class Node:
    """A value and its span [start, end) in the text; objects keep their members, arrays their items."""

    kind: str  # "object" | "array" | "string" | "number" | "true" | "false" | "null"
    start: int
    end: int
    members: list[Member] = field(default_factory=list)
    items: list[Node] = field(default_factory=list)
    scalar: Any = None

    def get(self, key: str) -> Member | None:
        """The member named `key` (the last one, as JSON.parse keeps), or None."""
        found = [m for m in self.members if m.key == key]
        return found[-1] if found else None

    def count(self, key: str) -> int:
        return sum(m.key == key for m in self.members)

    def to_python(self) -> Any:
        if self.kind == "object":
            return {m.key: m.value.to_python() for m in self.members}
        if self.kind == "array":
            return [item.to_python() for item in self.items]
        return self.scalar


@dataclass(frozen=True)
class Edit:
    """Replace `old` at `offset` by `new`; `anchor` is where, inside `new`, the member's key (or value) starts."""

    offset: int
    old: str
    new: str
    anchor: int = 0

    def apply(self, text: str) -> str:
        if text[self.offset:self.offset + len(self.old)] != self.old:
            raise ValueError("the text under the edit is not what the edit expects")
        return text[:self.offset] + self.new + text[self.offset + len(self.old):]

    def revert(self, text: str) -> str:
        """The text before `apply`, given the text right after it."""
        return Edit(self.offset, self.new, self.old).apply(text)


@dataclass(frozen=True)
class Style:
    """How the file is written: one indentation step, its line ending, and whether its objects end with a
    comma (JSONC only)."""

    unit: str = "  "
    newline: str = "\n"
    trailing_comma: bool = False


# --------------------------------------------------------------------------- parsing
class _Parser:
    def __init__(self, text: str, jsonc: bool) -> None:
        self.text = text
        self.jsonc = jsonc
        self.pos = 0

    def fail(self, message: str, pos: int | None = None) -> JsoncError:
        return JsoncError(message, self.text, self.pos if pos is None else pos)

    def skip(self) -> None:
        """Whitespace, and in JSONC comments."""
        text, n = self.text, len(self.text)
        while self.pos < n:
            c = text[self.pos]
            if c in _WS:
                self.pos += 1
            elif c == "/" and text.startswith("//", self.pos):
                if not self.jsonc:
                    raise self.fail("comments are not allowed in JSON")
                self.pos = comment_end(text, self.pos)
            elif c == "/" and text.startswith("/*", self.pos):
                if not self.jsonc:
                    raise self.fail("comments are not allowed in JSON")
                end = text.find("*/", self.pos + 2)
                if end < 0:
                    raise self.fail("unterminated /* comment")
                self.pos = end + 2
            else:
                return

    def document(self) -> Node:
        if self.text.startswith("\ufeff"):
            self.pos = 1
        self.skip()
        if self.pos >= len(self.text):
            raise self.fail("the document is empty")
        node = self.value(0)
        self.skip()
        if self.pos < len(self.text):
            raise self.fail("unexpected text after the document")
        return node

    def value(self, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise self.fail("nested too deeply")
        text, start = self.text, self.pos
        c = text[start] if start < len(text) else ""
        if c == "{":
            return self.object(depth)
        if c == "[":
            return self.array(depth)
        if c == '"':
            s, end = self.string()
            return Node("string", start, end, scalar=s)
        for word, val in (("true", True), ("false", False), ("null", None)):
            if text.startswith(word, start):
                self.pos = start + len(word)
                return Node(word, start, self.pos, scalar=val)
        m = _NUMBER.match(text, start)
        if m and m.end() > start:
            try:
                number = json.loads(m.group())
            except ValueError:  # an integer past Python's int_max_str_digits (4300 digits)
                raise self.fail(f"a number too long to read ({m.end() - start} characters)") from None
            self.pos = m.end()
            return Node("number", start, m.end(), scalar=number)
        raise self.fail("end of text where a value should be" if not c else f"unexpected {c!r} where a value should be")

    def string(self) -> tuple[str, int]:
        text, start = self.text, self.pos
        i = start + 1
        n = len(text)
        while i < n:
            c = text[i]
            if c == '"':
                break
            if c == "\\":
                i += 2
                continue
            if c < " ":
                raise self.fail("a control character inside a string", i)
            i += 1
        else:
            raise self.fail("unterminated string", start)
        end = i + 1
        try:
            decoded = json.loads(text[start:end])
        except json.JSONDecodeError as exc:
            raise self.fail(f"bad string: {exc.msg}", start + exc.pos) from None
        self.pos = end
        return decoded, end

    def object(self, depth: int) -> Node:
        node = Node("object", self.pos, self.pos)
        self.pos += 1
        self.skip()
        while True:
            if self.pos < len(self.text) and self.text[self.pos] == "}":
                if node.members and node.members[-1].comma is not None and not self.jsonc:
                    raise self.fail("a trailing comma is not allowed in JSON", node.members[-1].comma)
                self.pos += 1
                node.end = self.pos
                return node
            if node.members and node.members[-1].comma is None:
                raise self.fail("expected ',' or '}' after a member")
            if self.pos >= len(self.text) or self.text[self.pos] != '"':
                raise self.fail("expected a string key" if node.members or self.pos < len(self.text)
                                else "unterminated object")
            key_start = self.pos
            key, key_end = self.string()
            self.skip()
            if self.pos >= len(self.text) or self.text[self.pos] != ":":
                raise self.fail("expected ':' after a key")
            self.pos += 1
            self.skip()
            member = Member(key, key_start, key_end, self.value(depth + 1))
            node.members.append(member)
            self.skip()
            if self.pos < len(self.text) and self.text[self.pos] == ",":
                member.comma = self.pos
                self.pos += 1
                self.skip()
            elif self.pos >= len(self.text):
                raise self.fail("unterminated object")

    def array(self, depth: int) -> Node:
        node = Node("array", self.pos, self.pos)
        self.pos += 1
        self.skip()
        comma: int | None = None
        while True:
            if self.pos < len(self.text) and self.text[self.pos] == "]":
                if comma is not None and not self.jsonc:
                    raise self.fail("a trailing comma is not allowed in JSON", comma)
                self.pos += 1
                node.end = self.pos
                return node
            if node.items and comma is None:
                raise self.fail("expected ',' or ']' after an item")
            if self.pos >= len(self.text):
                raise self.fail("unterminated array")
            node.items.append(self.value(depth + 1))
            self.skip()
            comma = None
            if self.pos < len(self.text) and self.text[self.pos] == ",":
                comma = self.pos
                self.pos += 1
                self.skip()
            elif self.pos >= len(self.text):
                raise self.fail("unterminated array")


def parse(text: str, jsonc: bool = True) -> Node:
    """The document's root node; JsoncError if it is not valid (strict JSON when `jsonc` is false)."""
    return _Parser(text, jsonc).document()


def loads(text: str, jsonc: bool = True) -> Any:
    """The document as Python values (as `json.loads`, comments and trailing commas allowed when `jsonc`)."""
    return parse(text, jsonc).to_python()


def canonical(value: Any) -> str:
    """One spelling per JSON value, to compare values (`True == 1` in Python, not in JSON)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------- layout
def comment_end(text: str, pos: int, stop: int | None = None) -> int:
    """Where the `//` comment at `pos` ends: at its line break, before the "\r" of a "\r\n" (so nothing is
    ever put between the two), or at `stop` / the end of the text."""
    limit = len(text) if stop is None else stop
    end = text.find("\n", pos, limit)
    if end < 0:
        return limit
    return end - 1 if end > pos and text[end - 1] == "\r" else end


def line_start(text: str, pos: int) -> int:
    return text.rfind("\n", 0, pos) + 1


def indentation_before(text: str, pos: int) -> str | None:
    """The whitespace from the start of `pos`'s line to `pos`, or None when something else precedes it."""
    prefix = text[line_start(text, pos):pos]
    return prefix if prefix.strip(" \t") == "" else None


def line_indentation(text: str, pos: int) -> str:
    """The leading whitespace of the line that holds `pos`."""
    start = line_start(text, pos)
    end = start
    while end < len(text) and text[end] in " \t":
        end += 1
    return text[start:end]


def after_same_line_trivia(text: str, pos: int) -> int:
    """`pos` moved over spaces and comments that start on its line (a comment trailing a member belongs
    to it); stops at a line break or at anything else."""
    n = len(text)
    while pos < n:
        c = text[pos]
        if c in " \t":
            pos += 1
        elif text.startswith("//", pos):
            return comment_end(text, pos)
        elif text.startswith("/*", pos):
            end = text.find("*/", pos + 2)
            if end < 0:
                return n
            pos = end + 2
        else:
            return pos
    return pos


def _objects(node: Node) -> list[Node]:
    if node.kind == "object":
        return [node, *(o for m in node.members for o in _objects(m.value))]
    return [o for item in node.items for o in _objects(item)]


def style_of(text: str, root: Node) -> Style:
    """The file's indentation step (from the root object's first member on a line of its own; two spaces
    when there is none), its line ending, and whether most of its multi-line objects end with a comma."""
    newline = "\r\n" if "\r\n" in text else "\n"
    ends = [o.members[-1].comma is not None for o in _objects(root)
            if o.members and "\n" in text[o.members[-1].value.end:o.end]]
    trailing = sum(ends) * 2 > len(ends)
    unit = "  "
    if root.kind == "object" and root.members:
        indent = indentation_before(text, root.members[0].key_start)
        if indent and "\n" in text[root.start:root.members[0].key_start]:
            base = line_indentation(text, root.start)
            if indent.startswith(base) and len(indent) > len(base):
                unit = indent[len(base):]
    return Style(unit, newline, trailing)


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, (dict, list))


def render(value: Any, style: Style, indent: str = "", inline: bool = False) -> str:
    """`value` as JSON text laid out like the file: objects one member a line at `indent` + one step,
    lists of plain values on one line; `inline` puts everything on one line."""
    if inline:
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    inner = indent + style.unit
    nl = style.newline
    if isinstance(value, dict):
        if not value:
            return "{}"
        parts = [f"{inner}{json.dumps(str(k), ensure_ascii=False)}: {render(v, style, inner)}" for k, v in value.items()]
        return "{" + nl + ("," + nl).join(parts) + ("," if style.trailing_comma else "") + nl + indent + "}"
    if isinstance(value, list):
        if all(_is_scalar(v) for v in value):
            return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
        return "[" + nl + ("," + nl).join(inner + render(v, style, inner) for v in value) + nl + indent + "]"
    return json.dumps(value, ensure_ascii=False)


# --------------------------------------------------------------------------- edits
def find(root: Node, path: list[str]) -> Node | None:
    """The node at `path` (object keys) or None when a step is missing or not an object."""
    node: Node | None = root
    for key in path:
        if node is None or node.kind != "object":
            return None
        member = node.get(key)
        node = member.value if member else None
    return node


def replace_value(text: str, member: Member, value: Any, style: Style) -> Edit:
    """Put `value` in place of `member`'s value, laid out at the member's own indentation."""
    indent = indentation_before(text, member.key_start)
    rendered = render(value, style, indent or "", inline=indent is None)
    start, end = member.value.start, member.value.end
    return Edit(start, text[start:end], rendered, anchor=0)


def insert_member(text: str, obj: Node, key: str, value: Any, style: Style) -> Edit:
    """Add `"key": value` as the last member of `obj` (which must not have `key`): one splice after the last
    member (and the comments trailing it on its line), or inside an empty object."""
    if obj.kind != "object":
        raise ValueError("not an object")
    nl = style.newline
    key_text = json.dumps(key, ensure_ascii=False)
    open_indent = line_indentation(text, obj.start)
    if not obj.members:
        inside_start, inside_end = obj.start + 1, obj.end - 1
        inside = text[inside_start:inside_end]
        indent = open_indent + style.unit
        member = f"{key_text}: {render(value, style, indent)}"
        if inside.strip(_WS) == "":
            new = nl + indent + member + nl + open_indent
            return Edit(inside_start, inside, new, anchor=len(nl + indent))
        # Only comments inside: after the last of them, so they keep their place above the member.
        pos = last = inside_start
        while pos < inside_end:
            if text[pos] in _WS:
                pos += 1
            elif text.startswith("//", pos):
                pos = last = comment_end(text, pos, inside_end)
            else:  # "/*": the document parsed, so it is closed inside the object
                pos = last = text.index("*/", pos + 2, inside_end) + 2
        closing = "" if "\n" in text[last:inside_end] else nl + open_indent
        return Edit(last, "", nl + indent + member + closing, anchor=len(nl + indent))
    last_member = obj.members[-1]
    inline = "\n" not in text[obj.start:last_member.key_start]
    own = indentation_before(text, last_member.key_start)
    indent = open_indent + style.unit if own is None else own
    lead = " " if inline else nl + indent
    member = f"{key_text}: {render(value, style, indent, inline=inline)}"
    if last_member.comma is not None:  # JSONC written with trailing commas: ours gets one too
        pos = after_same_line_trivia(text, last_member.comma + 1)
        return Edit(pos, "", lead + member + ",", anchor=len(lead))
    pos = after_same_line_trivia(text, last_member.value.end)
    between = text[last_member.value.end:pos]
    return Edit(last_member.value.end, between, "," + between + lead + member, anchor=len("," + between + lead))


def remove_member(text: str, obj: Node, key: str) -> Edit:
    """Take the member `key` out of `obj`, with its comma, its line and the comments trailing it."""
    members = obj.members
    index = max(i for i, m in enumerate(members) if m.key == key)
    target = members[index]

    def end_of(m: Member) -> int:
        return after_same_line_trivia(text, m.value.end if m.comma is None else m.comma + 1)

    end = end_of(target)
    if len(members) == 1:
        inside_start, inside_end = obj.start + 1, obj.end - 1
        if text[inside_start:target.key_start].strip(_WS) == "" and text[end:inside_end].strip(_WS) == "":
            return Edit(inside_start, text[inside_start:inside_end], "")
        return Edit(target.key_start, text[target.key_start:end], "")
    if index == 0:
        start = after_same_line_trivia(text, obj.start + 1)
        return Edit(start, text[start:end], "")
    before = members[index - 1]
    if target.comma is not None or index < len(members) - 1:
        start = end_of(before)
        return Edit(start, text[start:end], "")
    # The last member, without a trailing comma: the one before it gives up its comma.
    assert before.comma is not None
    start = before.value.end
    trailing = text[before.comma + 1:end_of(before)]  # its own comment stays with it
    return Edit(start, text[start:end], trailing if trailing.strip() else "")
