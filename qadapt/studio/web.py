"""What a studio route sees and answers: the request, the route table's entries, and the errors a
client gets as a status and a one-line message."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class HttpError(Exception):
    """A request the studio refuses: its status (4xx) and a message for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]] = field(default_factory=dict)
    body: dict = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # the route pattern's named parts

    def arg(self, name: str, default: str | None = None) -> str | None:
        """A query argument's last value, or `default`."""
        values = self.query.get(name)
        return values[-1] if values else default

    def field(self, name: str, kind: type | tuple[type, ...] = str, default: Any = ...) -> Any:
        """A JSON body field of type `kind`; a 400 naming it when it is missing or of another type."""
        if name not in self.body:
            if default is ...:
                raise HttpError(400, f"the request needs {name!r}")
            return default
        value, kinds = self.body[name], kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            wanted = " or ".join(k.__name__ for k in kinds)
            raise HttpError(400, f"{name!r} must be a {wanted}, got {type(value).__name__}")
        return value


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str  # a regular expression over the whole path; its named groups become Request.params
    handler: Callable[..., Any]  # handler(studio, request) -> a JSON-able answer

    def match(self, method: str, path: str) -> dict[str, str] | None:
        found = re.fullmatch(self.pattern, path) if method == self.method else None
        return found.groupdict() if found else None


def inside(root: Path, relative: str, what: str = "path") -> Path:
    """`root/relative`, resolved; a 403 when it leads outside `root` (.., an absolute path, a link out)."""
    if not relative or "\x00" in relative:
        raise HttpError(400, f"an empty or malformed {what}")
    root = root.resolve()
    path = (root / relative).resolve()
    if path != root and not path.is_relative_to(root):
        raise HttpError(403, f"{what} {relative!r} is outside {root}")
    return path
