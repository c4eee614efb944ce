"""Reading policies: a path (or bytes) in, a compiled policy or a PolicyError out.

This is the one place that reads policy files. It follows ``extends`` to the
base policy: a bundled policy by name (``extends: synapse-workers``), or a
file by path, relative to the file that names it (``extends:
./base.yaml``). Bundled policies are the ``policies/*.yaml`` of this project,
found in the source tree or where the package installed them
(``<prefix>/share/matrix-spoa/policies``), so an operator's own directory of
policies (a ConfigMap mounted over the image's) never hides them.

A policy's version is the first 12 hex digits of the SHA-256 of its file, as
``sha256sum`` prints it; for a policy that extends another, of its file
followed by its base's version, so an update of the base changes the version
of every policy built on it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Final

from .compiled import MEMO_ENTRIES, CompiledPolicy, policy_version
from .errors import LocatedError, PolicyError
from .schema import NAME_PATTERN, BaseError, PolicySpec, parse_policy

#: Where an installed package keeps the bundled policies (see pyproject.toml):
#: under the installation's prefix, which is sys.prefix for a virtual
#: environment or the official Python images, /usr/local for pip as root on
#: Debian's own Python.
INSTALLED_POLICIES: Final = tuple(
    dict.fromkeys(
        Path(prefix) / "share" / "matrix-spoa" / "policies"
        for prefix in (sys.prefix, sys.base_prefix, "/usr/local")
    )
)
SOURCE_POLICIES: Final = Path(__file__).resolve().parents[2] / "policies"
#: A chain of bases longer than this is an error, cycle or not.
MAX_DEPTH: Final = 8

#: Every file read for one load, by path: its bytes, or None if unreadable.
FileSnapshot = dict[str, bytes | None]


def bundled_directories() -> list[Path]:
    """The directories holding bundled policies, first match wins."""
    return [d for d in (SOURCE_POLICIES, *INSTALLED_POLICIES) if d.is_dir()]


def bundled_names() -> list[str]:
    names: set[str] = set()
    for directory in bundled_directories():
        names.update(p.stem for p in directory.glob("*.yaml"))
    return sorted(names)


def bundled_path(name: str) -> Path | None:
    for directory in bundled_directories():
        candidate = directory / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    return None


def _resolve(reference: str, directory: Path) -> Path:
    if "/" in reference or reference.endswith((".yaml", ".yml")):
        target = Path(reference)
        if not target.is_absolute():
            target = directory / target
        if not target.is_file():
            raise BaseError(f"no policy file {str(target)!r}")
        return target
    if not NAME_PATTERN.match(reference):
        raise BaseError(f"{reference!r} is neither a bundled policy name nor a path")
    found = bundled_path(reference)
    if found is None:
        raise BaseError(
            f"unknown bundled policy {reference!r} (bundled: {', '.join(bundled_names())}); "
            f"a file of yours needs a path, such as ./{reference}.yaml"
        )
    return found


def read_file(path: str) -> bytes:
    """A policy file's bytes, or a PolicyError naming it."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise PolicyError(
            [LocatedError(path, 1, "$", f"cannot read: {exc.strerror or exc}")]
        ) from None


def snapshot(paths: list[str]) -> FileSnapshot:
    """The current bytes of each path (None where unreadable)."""
    found: FileSnapshot = {}
    for path in paths:
        try:
            found[path] = read_file(path)
        except PolicyError:
            found[path] = None
    return found


def _spec(
    content: bytes,
    source: str,
    directory: Path,
    chain: tuple[str, ...],
    files: FileSnapshot,
) -> tuple[PolicySpec, str]:
    """Parse one file, its bases first; its spec and version."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = content[: exc.start].count(b"\n") + 1
        raise PolicyError(
            [LocatedError(source, line, "$", "the policy file is not valid UTF-8")]
        ) from None
    base_versions: list[str] = []

    def base(reference: str) -> PolicySpec:
        target = _resolve(reference, directory)
        real = os.path.realpath(target)
        if real in chain:
            names = " -> ".join((*chain[chain.index(real) :], real))
            raise BaseError(f"extends in a cycle: {names}")
        if len(chain) >= MAX_DEPTH:
            raise BaseError(f"more than {MAX_DEPTH} policies extend one another")
        path = str(target)
        try:
            data = read_file(path)
        except PolicyError as exc:
            files[path] = None
            raise BaseError(exc.errors[0].message + f": {path}") from None
        files[path] = data
        spec, version = _spec(data, path, target.parent, (*chain, real), files)
        base_versions.append(version)
        return spec

    spec = parse_policy(text, source, base)
    if base_versions:
        return spec, policy_version(content + b"\n# extends " + base_versions[0].encode())
    return spec, policy_version(content)


def compile_policy(
    content: bytes,
    source: str = "<policy>",
    memo_entries: int = MEMO_ENTRIES,
    files: FileSnapshot | None = None,
) -> CompiledPolicy:
    """Parse, check and compile a policy; raise PolicyError with every problem.

    ``memo_entries`` bounds each memo of the compiled policy; 0 turns them
    off. A base named by a path is looked up relative to ``source``'s
    directory. ``files`` receives every base file read (its own bytes are
    the caller's).
    """
    files = {} if files is None else files
    directory = Path(source).parent if source != "<policy>" else Path.cwd()
    chain = (os.path.realpath(source),) if source != "<policy>" else ()
    spec, version = _spec(content, source, directory, chain, files)
    policy = CompiledPolicy(spec, version, memo_entries)
    return policy


def load_policy(
    path: str,
    files: FileSnapshot | None = None,
    memo_entries: int = MEMO_ENTRIES,
    content: bytes | None = None,
) -> CompiledPolicy:
    """Read and compile a policy file, its bases included.

    ``files`` receives the bytes of every file read (the policy's first), also
    when the policy has errors: what a later reload compares against.
    ``content``, when given, is the policy file's bytes, already read.
    """
    files = {} if files is None else files
    if content is None:
        try:
            content = read_file(path)
        except PolicyError:
            files[path] = None
            raise
    files[path] = content
    return compile_policy(content, path, memo_entries, files)
