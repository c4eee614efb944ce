"""The ``spoa`` command line: serve, check, explain."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import fields
from ipaddress import ip_address
from typing import Any, TextIO

from . import DEFAULT_HTTP, __version__
from .demo import commands as demo_commands
from .fallback import fallback_map, map_entries, publish, write_map
from .findings import Finding, Level
from .haproxyapi import MapKeeper, MapStats, RuntimeApi, RuntimeApiError, parse_address
from .haproxycfg import check_haproxy, check_running, format_report
from .httpd import HttpServer
from .metrics import AgentCollector, build_registry
from .policy import CompiledPolicy, Decision, PolicyError, Request, WhoamiSpec, load_policy
from .policy import diff as policy_diff
from .policy.reload import PolicyHolder, ReloadResult
from .policy.show import effective, format_text
from .record import Recorder
from .routing import RouteHandler, static_actions
from .server import Handler, Limits, SpopServer, parse_listen, static_handler
from .shadow import Shadow
from .stats import DecisionStats
from .status import StatusApp
from .synapsecfg import SynapseConfigError, check_synapse, load_synapse, split_synapse_files
from .whoami import WhoamiResolver, WhoamiStats

log = logging.getLogger("spoa")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_limits(serve: argparse.ArgumentParser) -> None:
    """A flag for every field of :class:`Limits`, with its default and help."""
    defaults = Limits()
    for limit in fields(Limits):
        default = getattr(defaults, limit.name)
        seconds = isinstance(default, float)
        serve.add_argument(
            _flag(limit.name),
            type=_positive_float if seconds else int,
            default=default,
            metavar="S" if seconds else "N",
            help=limit.metadata["help"],
        )


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(**{limit.name: getattr(args, limit.name) for limit in fields(Limits)})


def _limits_error(message: str) -> str:
    """A :class:`Limits` error in the flags' names."""
    for limit in fields(Limits):
        message = message.replace(limit.name, _flag(limit.name))
    return message


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """spoa serve: run the agent."""
    serve = commands.add_parser("serve", help="run the agent")
    what = serve.add_mutually_exclusive_group(required=True)
    what.add_argument("--policy", metavar="FILE", help="routing policy (YAML), reloaded live")
    what.add_argument(
        "--static-class",
        metavar="CLASS",
        help="no policy: answer every request with this worker class",
    )
    serve.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="SPOP address: HOST:PORT, [V6]:PORT or unix:PATH; repeatable "
        "(default 127.0.0.1:12345)",
    )
    serve.add_argument(
        "--http",
        default=DEFAULT_HTTP,
        metavar="ADDR",
        help="HTTP endpoint for /metrics, /healthz and the status page: HOST:PORT "
        f"(default {DEFAULT_HTTP}), or 'off'",
    )
    serve.add_argument(
        "--poll-interval",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="seconds between checks of the policy file (default 1); SIGHUP checks at once",
    )
    serve.add_argument(
        "--settle",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds a policy file edited in place must rest before it is tried (default 1); "
        "renames and ConfigMap updates apply at once",
    )
    serve.add_argument(
        "--fallback-map",
        metavar="FILE",
        help="write the fallback's map here for every policy loaded, for the HAProxy that "
        "starts next (haproxy.cfg reads it: SPOA_FALLBACK_MAP)",
    )
    serve.add_argument(
        "--haproxy-socket",
        metavar="ADDR",
        help="HAProxy's runtime API (stats socket, level admin): unix:PATH, /PATH or "
        "HOST:PORT; every policy loaded is pushed into the running HAProxy's fallback "
        "map there (needs --fallback-map: the map's name in haproxy.cfg)",
    )
    serve.add_argument(
        "--record",
        metavar="FILE",
        help="append a sample of the requests decided to FILE, as JSON lines spoa explain "
        "--jsonl and spoa diff --requests read, with every token and signature replaced",
    )
    serve.add_argument(
        "--record-rate",
        type=_positive_float,
        default=10.0,
        metavar="N",
        help="with --record: at most N requests a second (default 10)",
    )
    serve.add_argument(
        "--record-max-bytes",
        type=int,
        default=64 * 1024 * 1024,
        metavar="BYTES",
        help="with --record: FILE is renamed FILE.1 (replacing it) at this size (default 64 MiB)",
    )
    serve.add_argument(
        "--shadow",
        metavar="CANDIDATE",
        help="also decide requests with the policy CANDIDATE (reloaded live), after "
        "answering, and count where it would differ (metrics, status page)",
    )
    serve.add_argument(
        "--shadow-every",
        type=int,
        default=1,
        metavar="N",
        help="with --shadow: decide one request in N with the candidate (default 1: all)",
    )
    _add_limits(serve)
    serve.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop: uvloop when installed (auto), or the standard one",
    )
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def _policy_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """A command whose first argument is a policy file (check, fallback, explain)."""
    command = commands.add_parser(name, help=help_text, description=description)
    command.add_argument("policy", metavar="POLICY")
    return command


def _add_check(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """spoa check: a policy, and the HAProxy and Synapse configurations around it."""
    check = _policy_command(commands, "check", "check a policy file")
    check.add_argument(
        "--haproxy",
        metavar="CFG",
        help="also check this HAProxy configuration: a backend for every class, "
        "and the fallback's map (the file its map_reg names) made from this very policy",
    )
    check.add_argument(
        "--fallback-map",
        metavar="FILE",
        help="with --haproxy: the fallback map HAProxy reads, if not the one it names",
    )
    check.add_argument(
        "--haproxy-socket",
        metavar="ADDR",
        help="with --haproxy: also the map the running HAProxy routes by, from its runtime API",
    )
    check.add_argument(
        "--synapse",
        nargs="+",
        metavar=("HOMESERVER_YAML", "WORKER_YAML"),
        help="also check Synapse's configuration (homeserver.yaml, and any more files the "
        "main process reads, then the worker files): a worker for every class, every "
        "stream's requests on its writer, media where the media repository is on",
    )
    check.add_argument(
        "--not-synapse",
        action="append",
        default=[],
        metavar="CLASS",
        help="a class served by something else than Synapse (for example mas); repeatable",
    )
    check.add_argument(
        "--main-serves-media",
        action="store_true",
        help="with --synapse: HAProxy backs up the media workers with the main process "
        "(SYNAPSE_MAIN_SERVES_MEDIA is set), so their class needs no worker",
    )


def _add_fallback(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """spoa fallback: the fallback's map."""
    fallback = _policy_command(
        commands,
        "fallback",
        "write the fallback's map for a policy",
        "Write the map HAProxy routes by when the agent does not answer, made from POLICY "
        "(the agent writes it itself with --fallback-map); it must exist when HAProxy starts.",
    )
    fallback.add_argument(
        "-o", "--output", metavar="FILE", help="write here, atomically (default: standard output)"
    )


def _add_explain(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """spoa explain: how a policy routes requests."""
    explain = _policy_command(
        commands,
        "explain",
        "show how a policy routes a request",
        "Print the decision for one request, or for JSON lines on stdin (--jsonl), as JSON.",
    )
    explain.add_argument("method", metavar="METHOD", nargs="?")
    explain.add_argument(
        "target", metavar="PATH", nargs="?", help="request target: raw path and query"
    )
    explain.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a request header (only Authorization matters); repeatable",
    )
    explain.add_argument("--src", metavar="IP", help="client address")
    explain.add_argument(
        "--jsonl",
        action="store_true",
        help="read requests as JSON lines ({method, path, headers, src}) from stdin",
    )
    explain.add_argument(
        "--no-whoami",
        action="store_true",
        help="with a policy's whoami setting, do not ask the homeserver who opaque tokens are",
    )


def _add_show(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """spoa show: the policy in effect."""
    show = _policy_command(
        commands,
        "show",
        "show the policy in effect, after extends",
        "Print the rules POLICY routes by, in the order they are tried, each with the file and "
        "line it comes from and the patches made to it.",
    )
    show.add_argument("--json", action="store_true", help="as one JSON document")


def _add_diff(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """spoa diff: what a policy edit moves."""
    diff = commands.add_parser(
        "diff",
        help="what a policy edit moves, over a set of requests",
        description="Decide a set of requests with both policies and say which change class, "
        "rule or key. Exit 0 when nothing changes, 1 when something does, 2 on an error.",
    )
    diff.add_argument("old", metavar="OLD")
    diff.add_argument("new", metavar="NEW")
    diff.add_argument(
        "--requests",
        metavar="FILE",
        help="JSON lines as spoa explain --jsonl reads them (a recorded sample: "
        "spoa serve --record); '-' for stdin. Default: --count requests of spoa.traffic",
    )
    diff.add_argument(
        "--count",
        type=int,
        default=10_000,
        metavar="N",
        help="how many requests of spoa.traffic, without --requests (default 10000)",
    )
    diff.add_argument("--json", action="store_true", help="the report as JSON")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spoa", description="SPOE agent that routes Matrix Synapse requests for HAProxy."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_serve,
        _add_check,
        _add_fallback,
        _add_explain,
        _add_show,
        _add_diff,
        demo_commands.add,
    ):
        add(commands)
    return parser


# -- serve -------------------------------------------------------------------------


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("spoa: --loop uvloop, but uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _run(coro: Coroutine[Any, Any, int], loop: str) -> int:
    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        return runner.run(coro)


class _FallbackMap:
    """Keeps the fallback's map in step with each policy the agent loads: the file for
    the HAProxy that starts next, and the running HAProxy through its runtime API."""

    def __init__(self, path: str | None, keeper: MapKeeper | None) -> None:
        self.path = path
        self.keeper = keeper

    def __call__(self, holder: PolicyHolder, result: ReloadResult) -> None:
        if result.outcome == "loaded":
            self.publish(holder.current)

    def publish(self, policy: CompiledPolicy) -> None:
        entries = map_entries(policy)
        if self.path:
            publish(policy, self.path, entries)
        if self.keeper is not None:
            self.keeper.want(entries, policy.version)


async def _serve(args: argparse.Namespace) -> int:
    limits = _limits(args)
    holder: PolicyHolder | None = None
    handler: Handler
    decisions = DecisionStats()
    whoami = WhoamiStats()
    map_stats = MapStats()
    keeper: MapKeeper | None = None
    if args.haproxy_socket:
        if not args.fallback_map:
            log.error("cannot start: --haproxy-socket needs --fallback-map (the map's name)")
            return 2
        try:
            address = parse_address(args.haproxy_socket)
        except ValueError as exc:
            log.error("cannot start: --haproxy-socket %s", exc)
            return 2
        keeper = MapKeeper(RuntimeApi(address), args.fallback_map, map_stats)
    fallback = _FallbackMap(args.fallback_map, keeper)
    if args.policy:
        try:
            holder = PolicyHolder(args.policy, settle=max(0.0, args.settle), on_change=fallback)
        except PolicyError as exc:
            log.error(
                "cannot start: the policy is not usable:\n  %s",
                "\n  ".join(str(e) for e in exc.errors),
            )
            return 1
        fallback.publish(holder.current)
        recorder: Recorder | None = None
        shadow: Shadow | None = None
        try:
            if args.record:
                recorder = Recorder(args.record, args.record_rate, args.record_max_bytes)
        except (OSError, ValueError) as exc:
            log.error("cannot start: --record %s: %s", args.record, exc)
            return 2
        try:
            if args.shadow:
                shadow = Shadow(args.shadow, args.shadow_every, max(0.0, args.settle))
        except ValueError as exc:
            log.error("cannot start: --shadow-every: %s", exc)
            return 2
        handler = RouteHandler(holder, decisions, whoami=whoami, recorder=recorder, shadow=shadow)
    elif args.record or args.shadow:
        log.error("cannot start: --record and --shadow need --policy")
        return 2
    else:
        handler = static_handler(static_actions(args.static_class))
    server = SpopServer(handler, limits)
    route = handler if isinstance(handler, RouteHandler) else None
    registry = build_registry(
        AgentCollector(
            server.stats,
            decisions,
            holder,
            whoami,
            map_stats if keeper is not None else None,
            route=route,
        )
    )
    status = StatusApp(
        server,
        decisions,
        holder,
        registry,
        whoami,
        map_stats if keeper is not None else None,
        shadow=route.shadow if route is not None else None,
        recorder=route.recorder if route is not None else None,
    )
    http: HttpServer | None = None
    try:
        if args.http != "off":
            host, port = parse_listen(args.http)
            if not isinstance(port, int):
                raise ValueError("--http takes HOST:PORT")
            http = await HttpServer(status).start(host, port)
        await server.start(args.listen or ["127.0.0.1:12345"])
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        if http is not None:
            await http.stop()
        return 2
    if http is not None:
        log.info(
            "serving HTTP on %s:%d (/metrics, /healthz, status page)",
            parse_listen(args.http)[0],
            http.port,
        )
    sampler = asyncio.get_running_loop().create_task(status.rates.run())
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = None
    if holder is not None:
        reloading = holder
        loop.add_signal_handler(signal.SIGHUP, lambda: reloading.reload(force=True))
        watcher = loop.create_task(holder.watch(args.poll_interval))
    shadowing = None
    if isinstance(handler, RouteHandler) and handler.shadow is not None:
        candidate = handler.shadow
        shadowing = loop.create_task(candidate.watch(args.poll_interval))
    pusher = loop.create_task(keeper.run()) if keeper is not None else None
    log.info("listening for SPOP on %s", " ".join(server.addresses))
    await stop.wait()
    log.info("stopping: draining %d connections", server.stats.connections_open)
    for task in (watcher, shadowing, pusher):
        if task is not None:
            task.cancel()
    sampler.cancel()
    await server.drain()
    if isinstance(handler, RouteHandler):
        await handler.close()
        if handler.recorder is not None:
            handler.recorder.close()
    if http is not None:
        await http.stop()
    log.info("stopped")
    return 0


# -- check -------------------------------------------------------------------------


def _load_reporting(path: str, err: TextIO, count: bool = False) -> CompiledPolicy | None:
    """The policy at ``path``, or None once every error is printed (and their count)."""
    try:
        return load_policy(path)
    except PolicyError as exc:
        for error in exc.errors:
            print(error, file=err)
        if count:
            total = len(exc.errors)
            print(f"{path}: {total} error{'s' if total != 1 else ''}", file=err)
        return None


def _print_findings(findings: list[Finding], out: TextIO, err: TextIO) -> int:
    """Errors to ``err``, the rest to ``out``; 1 when there is an error."""
    for finding in findings:
        print(finding, file=err if finding.level is Level.ERROR else out)
    return 1 if any(f.level is Level.ERROR for f in findings) else 0


def _check(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    policy = _load_reporting(args.policy, err, count=True)
    if policy is None:
        return 1
    patterns = sum(len(rule.spec.paths) for rule in policy.rules if rule.spec)
    print(
        f"{args.policy}: OK, version {policy.version}: {len(policy.rules)} rules "
        f"({patterns} path patterns), {len(policy.classes)} classes "
        f"({', '.join(policy.classes)}), default {policy.default.worker_class} "
        f"key {policy.default.key.value}, seed {policy.seed}",
        file=out,
    )
    status = 0
    if args.haproxy:
        try:
            with open(args.haproxy, encoding="utf-8") as handle:
                config = handle.read()
        except OSError as exc:
            print(f"{args.haproxy}: cannot read: {exc.strerror or exc}", file=err)
            return 1
        report = check_haproxy(config, policy, args.fallback_map)
        if args.haproxy_socket and report.map_path:
            check_running(policy, _running_map(args.haproxy_socket, report.map_path), report)
        status = max(
            status, _print_findings(format_report(report, args.haproxy, args.policy), out, err)
        )
    if args.synapse:
        try:
            main_files, worker_files = split_synapse_files(args.synapse)
            synapse = load_synapse(main_files, worker_files)
        except SynapseConfigError as exc:
            print(f"error: {exc}", file=err)
            return 1
        findings = check_synapse(
            policy, args.policy, synapse, args.not_synapse, args.main_serves_media
        )
        status = max(status, _print_findings(findings, out, err))
    return status


def _running_map(address: str, path: str) -> list[tuple[str, str]] | str:
    """The fallback map (file ``path``) a running HAProxy routes by, or why it could not
    be read."""

    async def read(api: RuntimeApi) -> list[tuple[str, str]]:
        return await api.show_map(await api.find_map(path))

    try:
        return asyncio.run(read(RuntimeApi(parse_address(address))))
    except (ValueError, RuntimeApiError) as exc:
        return str(exc)


def _fallback(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    policy = _load_reporting(args.policy, err)
    if policy is None:
        return 1
    text = fallback_map(policy)
    if not args.output:
        out.write(text)
        return 0
    try:
        write_map(args.output, text)
    except OSError as exc:
        print(f"{args.output}: cannot write: {exc.strerror or exc}", file=err)
        return 1
    return 0


# -- explain -----------------------------------------------------------------------


def _decision_json(decision: Decision, whoami: str | None = None) -> str:
    answer: dict[str, object] = {
        "class": decision.worker_class,
        "key_kind": decision.key_kind,
        "key_source": decision.key_source,
        "key": decision.key,
        "rule": decision.rule,
        "policy": decision.policy,
    }
    if whoami is not None:
        # The user came from (or was looked for at) the homeserver's whoami.
        answer["whoami"] = whoami
        if whoami == "user" and decision.key_kind == "user":
            answer["key_via"] = "whoami"
    return json.dumps(answer, ensure_ascii=False)


def _request(method: str, target: str, headers: dict[str, str], src: str | None) -> Request:
    path, mark, query = target.partition("?")
    auth = None
    for name, value in headers.items():
        if name.strip().lower() == "authorization":
            auth = value
    address = ip_address(src) if src else None
    return Request(method.upper(), path, query if mark else None, auth, address)


def _one_request(args: argparse.Namespace) -> Request:
    headers: dict[str, str] = {}
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep:
            raise ValueError(f"header {header!r} is not 'Name: value'")
        headers[name] = value.strip()
    return _request(args.method, args.target, headers, args.src)


def _jsonl_requests(source: TextIO) -> list[Request | str]:
    """A request per line, or the error of a line that is not one."""
    items: list[Request | str] = []
    for number, line in enumerate(source, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict):
                raise ValueError("expected a JSON object")
            method, target = item.get("method"), item.get("path")
            headers = item.get("headers") or {}
            src = item.get("src")
            if not isinstance(method, str) or not isinstance(target, str):
                raise ValueError("method and path must be strings")
            if not isinstance(headers, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
            ):
                raise ValueError("headers must be an object of strings")
            if src is not None and not isinstance(src, str):
                raise ValueError("src must be a string")
            items.append(_request(method, target, headers, src))
        except ValueError as exc:
            items.append(f"line {number}: {exc}")
    return items


class _Asked:
    """Users for a first pass: records the tokens a decision would look up."""

    def __init__(self) -> None:
        self.tokens: list[str] = []

    def user_for(self, token: str) -> str | None:
        self.tokens.append(token)
        return None


class _Answers:
    """Users for the second pass: the answers of the lookups, by token."""

    def __init__(self, found: dict[str, tuple[str, str | None]]) -> None:
        self.found = found
        self.asked: str | None = None

    def user_for(self, token: str) -> str | None:
        result, user = self.found.get(token, ("error", None))
        self.asked = result
        return user


def _look_up(spec: WhoamiSpec, tokens: set[str]) -> dict[str, tuple[str, str | None]]:
    """Each token's (result, user), asked of the homeserver max_concurrent at a time."""

    async def run() -> dict[str, tuple[str, str | None]]:
        resolver = WhoamiResolver(spec)
        slots = asyncio.Semaphore(spec.max_concurrent)

        async def one(token: str) -> tuple[str, tuple[str, str | None]]:
            async with slots:
                return token, await resolver.lookup(token)

        try:
            return dict(await asyncio.gather(*(one(t) for t in sorted(tokens))))
        finally:
            await resolver.close()

    return asyncio.run(run())


def _explain_all(
    policy: CompiledPolicy, items: list[Request | str], whoami: bool, out: TextIO
) -> int:
    """Print a decision (or an error) per item; with ``whoami``, look opaque tokens up."""
    answers: _Answers | None = None
    if whoami and policy.whoami is not None:
        asked = _Asked()
        for item in items:
            if isinstance(item, Request):
                policy.decide(item, asked)
        answers = _Answers(_look_up(policy.whoami, set(asked.tokens)) if asked.tokens else {})
    failures = 0
    for item in items:
        if isinstance(item, str):
            failures += 1
            print(json.dumps({"error": item}), file=out)
            continue
        if answers is None:
            print(_decision_json(policy.decide(item)), file=out)
            continue
        answers.asked = None
        decision = policy.decide(item, answers)
        print(_decision_json(decision, answers.asked), file=out)
    return 1 if failures else 0


def _explain(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    policy = _load_reporting(args.policy, err)
    if policy is None:
        return 1
    if args.jsonl:
        if args.method or args.target:
            print("spoa explain: give either METHOD PATH or --jsonl, not both", file=err)
            return 2
        return _explain_all(policy, _jsonl_requests(sys.stdin), not args.no_whoami, out)
    if not args.method or not args.target:
        print("spoa explain: METHOD and PATH are required (or --jsonl)", file=err)
        return 2
    try:
        request = _one_request(args)
    except ValueError as exc:
        print(f"spoa explain: {exc}", file=err)
        return 2
    return _explain_all(policy, [request], not args.no_whoami, out)


def _show(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    policy = _load_reporting(args.policy, err, count=True)
    if policy is None:
        return 1
    if args.json:
        print(json.dumps(effective(policy), indent=2), file=out)
    else:
        out.write(format_text(policy))
    return 0


def _diff_requests(args: argparse.Namespace, err: TextIO) -> tuple[list[Request], str] | None:
    """The requests to diff over and what they are, or None once the error is printed."""
    if args.requests is None:
        from . import traffic  # the demo's traffic: loaded only when used

        if args.count < 1:
            print("spoa diff: --count must be at least 1", file=err)
            return None
        generated = [
            _request(t.method, t.target, t.headers, t.src) for t in traffic.generate(args.count)
        ]
        return generated, "spoa.traffic"
    try:
        if args.requests == "-":
            items = _jsonl_requests(sys.stdin)
        else:
            with open(args.requests, encoding="utf-8") as handle:
                items = _jsonl_requests(handle)
    except OSError as exc:
        print(f"spoa diff: {args.requests}: cannot read: {exc.strerror or exc}", file=err)
        return None
    except UnicodeDecodeError:
        print(f"spoa diff: {args.requests}: not UTF-8 text", file=err)
        return None
    errors = [item for item in items if isinstance(item, str)]
    for error in errors[:10]:
        print(f"spoa diff: {args.requests}: {error}", file=err)
    if errors:
        print(f"spoa diff: {args.requests}: {len(errors)} lines are not requests", file=err)
        return None
    requests = [item for item in items if isinstance(item, Request)]
    if not requests:
        print(f"spoa diff: {args.requests}: no requests", file=err)
        return None
    return requests, args.requests


def _diff(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    old = _load_reporting(args.old, err)
    new = _load_reporting(args.new, err)
    if old is None or new is None:
        return 2
    found = _diff_requests(args, err)
    if found is None:
        return 2
    requests, source = found
    report = policy_diff.diff(old, new, requests)
    if args.json:
        print(json.dumps(report.as_json(), indent=2), file=out)
    else:
        out.write(policy_diff.format_text(report, args.old, args.new, source))
    return 1 if report.changed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        try:
            return _run(_serve(args), args.loop)
        except ValueError as exc:
            parser.error(_limits_error(str(exc)))
    if args.command == "check":
        return _check(args, sys.stdout, sys.stderr)
    if args.command == "fallback":
        return _fallback(args, sys.stdout, sys.stderr)
    if args.command == "explain":
        return _explain(args, sys.stdout, sys.stderr)
    if args.command == "show":
        return _show(args, sys.stdout, sys.stderr)
    if args.command == "diff":
        return _diff(args, sys.stdout, sys.stderr)
    if args.command in demo_commands.NAMES:
        return demo_commands.run(args)
    parser.error(f"unknown command {args.command}")
    return 2
