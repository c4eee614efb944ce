"""Synapse's worker configuration, read and checked against a routing policy.

A deployment is a homeserver.yaml (the main process: its listeners,
``instance_map``, ``stream_writers``, ``enable_media_repo``) and one file per
worker (``worker_name``, ``worker_listeners``). A worker's routing class is
its name up to the last ``-`` (``synchrotron-2`` serves class
``synchrotron``), as in ``deploy/synapse/``.

:func:`check_synapse` asks the policy where sample requests go and reports,
each with the file and line to fix: a class no worker serves, a stream whose
requests reach a process that does not write it, media sent to a process
with the media repository off, a writer with no way to be reached.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .findings import Finding, Level
from .policy import CompiledPolicy, Request

MAIN = "main"
#: The class haproxy.cfg backs up with main when SYNAPSE_MAIN_SERVES_MEDIA is set.
MEDIA_CLASS = "media_repository"

#: One request per stream, as Synapse's workers.md routes it to the writer.
STREAM_SAMPLES: dict[str, Request] = {
    "typing": Request("PUT", "/_matrix/client/v3/rooms/!r:x/typing/@u:x"),
    "to_device": Request("PUT", "/_matrix/client/v3/sendToDevice/m.room.encrypted/t1"),
    "account_data": Request("PUT", "/_matrix/client/v3/user/@u:x/account_data/m.direct"),
    "receipts": Request("POST", "/_matrix/client/v3/rooms/!r:x/receipt/m.read/$e"),
    "presence": Request("PUT", "/_matrix/client/v3/presence/@u:x/status"),
    "push_rules": Request("PUT", "/_matrix/client/v3/pushrules/global/override/r1"),
    "device_lists": Request("POST", "/_matrix/client/v3/keys/upload"),
    "thread_subscriptions": Request(
        "PUT", "/_matrix/client/unstable/io.element.msc4306/rooms/!r:x/thread/$e/subscription"
    ),
    "quarantined_media_changes": Request("POST", "/_synapse/admin/v1/media/quarantine/x/abc"),
}

#: Requests only a process with the media repository on can answer.
MEDIA_SAMPLES: Sequence[Request] = (
    Request("GET", "/_matrix/client/v1/media/download/x/abc"),
    Request("GET", "/_matrix/media/v3/download/x/abc"),
    Request("POST", "/_matrix/media/v3/upload"),
    Request("GET", "/_matrix/federation/v1/media/download/abc"),
    STREAM_SAMPLES["quarantined_media_changes"],
)


class SynapseConfigError(Exception):
    """A Synapse file cannot be read or is not what Synapse would accept."""


@dataclass(frozen=True)
class Listener:
    port: int | None
    resources: frozenset[str]
    line: int


@dataclass(frozen=True)
class Process:
    """The main process or one worker, as its configuration file says."""

    name: str
    source: str
    line: int
    listeners: tuple[Listener, ...]
    media: bool

    @property
    def worker_class(self) -> str:
        return MAIN if self.name == MAIN else self.name.rsplit("-", 1)[0]

    def serves(self, *resources: str) -> bool:
        """Whether an HTTP listener of this process serves any of ``resources``."""
        return any(listener.resources.intersection(resources) for listener in self.listeners)

    @property
    def serves_media(self) -> bool:
        """The media repository on, and reachable: main serves it through its client resource."""
        return self.media and (self.name == MAIN or self.serves("media"))

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class SynapseDeployment:
    main: Process
    workers: list[Process]
    #: stream -> (writer names, line in homeserver.yaml, or 0 when unset).
    stream_writers: dict[str, tuple[list[str], int]] = field(default_factory=dict)
    #: instance name -> line in homeserver.yaml.
    instance_map: dict[str, int] = field(default_factory=dict)
    #: The file each top-level setting of the main process came from (several
    #: files are read in order, each overriding the settings it gives).
    sources: dict[str, str] = field(default_factory=dict)

    def source_of(self, setting: str) -> str:
        return self.sources.get(setting, self.main.source)

    @property
    def processes(self) -> list[Process]:
        return [self.main, *self.workers]

    def of_class(self, worker_class: str) -> list[Process]:
        return [p for p in self.processes if p.worker_class == worker_class]

    def writers(self, stream: str) -> tuple[list[str], int]:
        return self.stream_writers.get(stream, ([MAIN], 0))


# -- reading ---------------------------------------------------------------------------


def _compose(path: str) -> MappingNode:
    try:
        with open(path, encoding="utf-8") as handle:
            node = yaml.compose(handle, Loader=yaml.SafeLoader)
    except OSError as exc:
        raise SynapseConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SynapseConfigError(f"{path}: not YAML: {exc}") from None
    if node is None:
        return MappingNode("tag:yaml.org,2002:map", [])
    if not isinstance(node, MappingNode):
        raise SynapseConfigError(f"{path}:{node.start_mark.line + 1}: expected a mapping")
    return node


def _entries(node: Node) -> dict[str, Node]:
    if not isinstance(node, MappingNode):
        return {}
    return {str(k.value): v for k, v in node.value if isinstance(k, ScalarNode)}


def _value(node: Node | None) -> object:
    if node is None:
        return None
    return yaml.SafeLoader("").construct_document(node)


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _listeners(node: Node | None, path: str) -> tuple[Listener, ...]:
    if node is None:
        return ()
    if not isinstance(node, SequenceNode):
        raise SynapseConfigError(f"{path}:{_line(node)}: listeners must be a list")
    found = []
    for item in node.value:
        fields = _entries(item)
        if _value(fields.get("type")) not in ("http", None):
            continue
        names: set[str] = set()
        resources = _value(fields.get("resources")) or []
        for resource in resources if isinstance(resources, list) else []:
            if isinstance(resource, dict):
                names.update(str(n) for n in resource.get("names") or [])
        port = _value(fields.get("port"))
        found.append(
            Listener(port if isinstance(port, int) else None, frozenset(names), _line(item))
        )
    return tuple(found)


def _media_on(fields: dict[str, Node], default: bool) -> bool:
    value = _value(fields.get("enable_media_repo"))
    return default if value is None else bool(value)


def load_synapse(homeserver: str | Sequence[str], worker_files: Iterable[str]) -> SynapseDeployment:
    """Read a homeserver.yaml (or the main process's files, in the order Synapse reads
    them) and worker files into one :class:`SynapseDeployment`."""
    files = [homeserver] if isinstance(homeserver, str) else list(homeserver)
    top: dict[str, Node] = {}
    sources: dict[str, str] = {}
    for path in files:
        entries = _entries(_compose(path))
        top.update(entries)
        sources.update(dict.fromkeys(entries, path))
    listeners_from = sources.get("listeners", files[0])
    main_media = _media_on(top, True)
    main = Process(MAIN, files[0], 1, _listeners(top.get("listeners"), listeners_from), main_media)
    deployment = SynapseDeployment(main, [], sources=sources)
    writers = top.get("stream_writers")
    for stream, node in _entries(writers).items() if writers is not None else ():
        value = _value(node)
        names = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        deployment.stream_writers[stream] = (names, _line(node))
    instances = top.get("instance_map")
    for instance, node in _entries(instances).items() if instances is not None else ():
        deployment.instance_map[instance] = _line(node)
    seen: dict[str, str] = {}
    for path in worker_files:
        fields = _entries(_compose(path))
        name_node = fields.get("worker_name")
        name = _value(name_node)
        if name_node is None or not isinstance(name, str) or not name:
            raise SynapseConfigError(f"{path}: no worker_name")
        if name in seen or name == MAIN:
            raise SynapseConfigError(
                f"{path}:{_line(name_node)}: worker {name!r} again (first in {seen.get(name, '')})"
            )
        seen[name] = path
        listeners = _listeners(fields.get("worker_listeners"), path)
        # A worker inherits enable_media_repo from homeserver.yaml unless it sets its own.
        media = _media_on(fields, main_media)
        deployment.workers.append(Process(name, path, _line(name_node), listeners, media))
    return deployment


def split_synapse_files(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """The main process's files (the first, and those after it up to the first with a
    ``worker_name``), then the worker files."""
    main = [paths[0]]
    for path in paths[1:]:
        if "worker_name" in _entries(_compose(path)):
            break
        main.append(path)
    return main, list(paths[len(main) :])


# -- checking --------------------------------------------------------------------------


def _describe(request: Request) -> str:
    return f"{request.method} {request.path}"


def check_synapse(
    policy: CompiledPolicy,
    policy_path: str,
    deployment: SynapseDeployment,
    not_synapse: Iterable[str] = (),
    main_serves_media: bool = False,
) -> list[Finding]:
    """Every mismatch between where ``policy`` sends requests and what Synapse runs.

    ``main_serves_media`` says HAProxy backs up the media workers' class with the
    main process (haproxy.cfg's SYNAPSE_MAIN_SERVES_MEDIA): that class with no
    worker is then served by main, if main has the media repository on.
    """
    findings: list[Finding] = []
    outside = set(not_synapse)
    media_source = deployment.source_of("enable_media_repo")

    def error(text: str) -> None:
        findings.append(Finding(Level.ERROR, text))

    # Every class has a process to serve it.
    for worker_class in policy.classes:
        if worker_class in outside:
            findings.append(
                Finding(Level.NOTE, f"class {worker_class!r} is served outside Synapse")
            )
            continue
        processes = deployment.of_class(worker_class)
        if not processes and main_serves_media and worker_class == MEDIA_CLASS:
            if deployment.main.serves_media:
                findings.append(
                    Finding(
                        Level.NOTE,
                        f"class {worker_class!r} has no worker: the main process serves its "
                        "media (SYNAPSE_MAIN_SERVES_MEDIA)",
                    )
                )
            else:
                error(
                    f"{media_source}: class {worker_class!r} has no worker and goes to the "
                    "main process (SYNAPSE_MAIN_SERVES_MEDIA), which has enable_media_repo off"
                )
        elif not processes:
            error(
                f"class {worker_class!r} of {policy_path} has no Synapse worker: no worker file "
                f"names a worker {worker_class}-N; its requests would fail (or reach main)"
            )
        for process in processes:
            if not process.serves("client", "federation", "media"):
                error(
                    f"{process.where}: {process.name} serves class {worker_class!r} but has no "
                    "HTTP listener with the client, federation or media resource"
                )
    # Each stream's requests reach only its writers, and the writers can be reached.
    for stream, sample in STREAM_SAMPLES.items():
        worker_class = policy.decide(sample).worker_class
        if worker_class in outside:
            continue
        writers, line = deployment.writers(stream)
        source = deployment.source_of("stream_writers")
        where = f"{source}:{line}" if line else source
        setting = f"stream_writers.{stream} is {writers}" if line else f"main writes {stream}"
        for process in deployment.of_class(worker_class):
            if process.name not in writers:
                error(
                    f"{where}: {setting}, but {policy_path} sends {stream} requests "
                    f"({_describe(sample)}) to class {worker_class!r}, which {process.name} "
                    f"({process.where}) serves: it would refuse them as not the {stream} writer"
                )
        for writer in writers:
            if writer == MAIN:
                continue
            if writer not in deployment.instance_map:
                error(f"{where}: {stream} writer {writer!r} is not in instance_map")
            found = next((p for p in deployment.workers if p.name == writer), None)
            if found is None:
                error(f"{where}: {stream} writer {writer!r} has no worker file")
            elif not found.serves("replication"):
                error(f"{found.where}: {writer} writes {stream} but has no replication listener")
    # Media goes where the media repository is on.
    if not any(p.serves_media for p in deployment.processes):
        error(
            f"the media repository is on in no process: enable_media_repo is false in "
            f"{media_source} and no worker serves the media resource with it on"
        )
    for sample in MEDIA_SAMPLES:
        worker_class = policy.decide(sample).worker_class
        if worker_class in outside:
            continue
        for process in deployment.of_class(worker_class):
            if not process.serves_media:
                state = "has the media repository off" if not process.media else "no media listener"
                error(
                    f"{process.where}: {policy_path} sends {_describe(sample)} to class "
                    f"{worker_class!r}, but {process.name} {state}"
                )
    if all(f.level != Level.ERROR for f in findings):
        findings.append(
            Finding(
                Level.OK,
                f"Synapse's {len(deployment.processes)} processes serve every class of "
                f"{policy_path}; every stream's requests reach its writer; media reaches the "
                "media repository",
            )
        )
    return list(dict.fromkeys(findings))  # one line per problem, in order
