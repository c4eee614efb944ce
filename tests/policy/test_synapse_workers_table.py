"""policies/synapse-workers.yaml against every endpoint regex of Synapse's docs/workers.md.

Each row carries the documented regex it exemplifies, a request as a client or a
remote server really sends it (raw path, raw query) and the worker class the
"fully specialised" layout must send it to. Besides routing, the table itself is
checked: every example is an instance of its regex, and every regex of the docs
has at least one example.

Sources: element-hq/synapse docs/workers.md (v1.157.1+, sections
"synapse.app.generic_worker", "Stream writers", "synapse.app.media_repository",
"synapse.app.user_dir") and /work/shared/reference/matrix-routing.md sections 0-1.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import pytest

from spoa.policy import CompiledPolicy, Decision, Request, load_policy

ROOT = Path(__file__).resolve().parents[2]
POLICY_PATH = ROOT / "policies" / "synapse-workers.yaml"

C = "/_matrix/client"
F = "/_matrix/federation"
ADMIN = "/_synapse/admin"
SC = "/_synapse/client"

# Identifiers as they appear in paths: raw, and percent-encoded as most SDKs send them.
ROOM = "!abc:example.org"
ROOM_ENC = "%21abc%3Aexample.org"
USER = "@alice:example.org"
USER_ENC = "%40alice%3Aexample.org"
REMOTE_USER = "@bob:remote.example"
EVENT = "$Woq2vwLy8mNukf7e8oz61GxT5gpMmr_r6DCK4bmNGs0"
EVENT_ENC = "%24Woq2vwLy8mNukf7e8oz61GxT5gpMmr_r6DCK4bmNGs0"
ALIAS_ENC = "%23lounge%3Aexample.org"  # '#' can only travel encoded
SINCE = "since=s72594_4483_1934&timeout=30000"

# -- the documented regexes, verbatim -------------------------------------------------------

SYNC = (
    r"^/_matrix/client/(r0|v3)/sync$",
    r"^/_matrix/client/(api/v1|r0|v3)/events$",
    r"^/_matrix/client/(api/v1|r0|v3)/initialSync$",
    r"^/_matrix/client/(api/v1|r0|v3)/rooms/[^/]+/initialSync$",
)
FEDERATION = (
    r"^/_matrix/federation/v1/version$",
    r"^/_matrix/federation/v1/event/",
    r"^/_matrix/federation/v1/state/",
    r"^/_matrix/federation/v1/state_ids/",
    r"^/_matrix/federation/v1/backfill/",
    r"^/_matrix/federation/v1/get_missing_events/",
    r"^/_matrix/federation/v1/publicRooms",
    r"^/_matrix/federation/v1/query/",
    r"^/_matrix/federation/v1/make_join/",
    r"^/_matrix/federation/v1/make_leave/",
    r"^/_matrix/federation/(v1|v2)/send_join/",
    r"^/_matrix/federation/(v1|v2)/send_leave/",
    r"^/_matrix/federation/v1/make_knock/",
    r"^/_matrix/federation/v1/send_knock/",
    r"^/_matrix/federation/(v1|v2)/invite/",
    r"^/_matrix/federation/v1/event_auth/",
    r"^/_matrix/federation/v1/timestamp_to_event/",
    r"^/_matrix/federation/v1/exchange_third_party_invite/",
    r"^/_matrix/federation/v1/user/devices/",
    r"^/_matrix/key/v2/query",
    r"^/_matrix/federation/v1/hierarchy/",
)
INBOUND_FEDERATION = (r"^/_matrix/federation/v1/send/",)
CLIENT_API = (
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/createRoom$",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/publicRooms$",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/joined_members$",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/context/.*$",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/members$",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/state$",
    r"^/_matrix/client/v1/rooms/.*/hierarchy$",
    r"^/_matrix/client/(v1|unstable)/rooms/.*/relations/",
    r"^/_matrix/client/v1/rooms/.*/threads$",
    r"^/_matrix/client/unstable/im.nheko.summary/summary/.*$",
    r"^/_matrix/client/v1/room_summary/.*$",
    r"^/_matrix/client/(r0|v3|unstable)/account/3pid$",
    r"^/_matrix/client/(r0|v3|unstable)/account/whoami$",
    r"^/_matrix/client/(r0|v3|unstable)/account/deactivate$",
    # (r0|v3)/delete_devices$ and devices(/|$) are listed here too: see DEVICE_LISTS
    r"^/_matrix/client/versions$",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/voip/turnServer$",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/event/",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/joined_rooms$",
    r"^/_matrix/client/v1/rooms/.*/timestamp_to_event$",
    r"^/_matrix/client/(api/v1|r0|v3|unstable/.*)/rooms/.*/aliases",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/search$",
    r"^/_matrix/client/(r0|v3|unstable)/user/.*/filter(/|$)",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/directory/room/.*$",
    r"^/_matrix/client/(r0|v3|unstable)/capabilities$",
    r"^/_matrix/client/(r0|v3|unstable)/notifications$",
)
ADMIN_API = (r"^/_synapse/admin/v1/rooms/[^/]+$",)
ENCRYPTION = (
    r"^/_matrix/client/(r0|v3|unstable)/keys/query$",
    r"^/_matrix/client/(r0|v3|unstable)/keys/changes$",
    r"^/_matrix/client/(r0|v3|unstable)/keys/claim$",
    r"^/_matrix/client/(r0|v3|unstable)/room_keys/",
    # keys/upload, keys/device_signing/upload$, keys/signatures/upload$: see DEVICE_LISTS
)
REGISTRATION = (
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/login$",
    r"^/_matrix/client/(r0|v3|unstable)/register$",
    r"^/_matrix/client/(r0|v3|unstable)/register/available$",
    r"^/_matrix/client/v1/register/m.login.registration_token/validity$",
    r"^/_matrix/client/(r0|v3|unstable)/password_policy$",
)
EVENT_SENDING = (
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/redact",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/send",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/state/",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/(join|invite|leave|ban|unban|kick)$",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/join/",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/knock/",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/profile/",
)
USER_DIRECTORY = (r"^/_matrix/client/(r0|v3|unstable)/user_directory/search$",)
MSC4140 = (r"^/_matrix/client/unstable/org.matrix.msc4140/delayed_events(/.*/restart)?$",)
GET_ONLY_ADMIN = (r"^/_synapse/admin/v2/users/[^/]+$",)
PAGINATION = (r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/messages$",)
SSO = (
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/login/sso/redirect",
    r"^/_synapse/client/pick_idp$",
    r"^/_synapse/client/pick_username",
    r"^/_synapse/client/new_user_consent$",
    r"^/_synapse/client/sso_register$",
    r"^/_synapse/client/oidc/callback$",
    r"^/_synapse/client/saml2/authn_response$",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/login/cas/ticket$",
)
# Stream writers. The GET-only list repeats pushrules/, tags, account_data and presence/.
TYPING = (r"^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/.*/typing",)
TO_DEVICE = (r"^/_matrix/client/(r0|v3|unstable)/sendToDevice/",)
ACCOUNT_DATA = (
    r"^/_matrix/client/(r0|v3|unstable)/.*/tags",
    r"^/_matrix/client/(r0|v3|unstable)/.*/account_data",
)
RECEIPTS = (
    r"^/_matrix/client/(r0|v3|unstable)/rooms/.*/receipt",
    r"^/_matrix/client/(r0|v3|unstable)/rooms/.*/read_markers",
)
PRESENCE = (r"^/_matrix/client/(api/v1|r0|v3|unstable)/presence/",)
PUSH_RULES = (r"^/_matrix/client/(api/v1|r0|v3|unstable)/pushrules/",)
DEVICE_LISTS = (
    r"^/_matrix/client/(r0|v3)/delete_devices$",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/devices(/|$)",
    r"^/_matrix/client/(r0|v3|unstable)/keys/upload",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/keys/device_signing/upload$",
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/keys/signatures/upload$",
)
# synapse.app.media_repository: "all endpoints starting with" three prefixes, plus admin.
MEDIA = (
    r"^/_matrix/media/",
    r"^/_matrix/client/v1/media/",
    r"^/_matrix/federation/v1/media/",
    r"^/_synapse/admin/v1/purge_media_cache$",
    r"^/_synapse/admin/v1/room/.*/media.*$",
    r"^/_synapse/admin/v1/user/.*/media.*$",
    r"^/_synapse/admin/v1/media/.*$",
    r"^/_synapse/admin/v1/quarantine_media/.*$",
    r"^/_synapse/admin/v1/users/.*/media$",
)

DOCUMENTED: tuple[str, ...] = (
    *SYNC,
    *FEDERATION,
    *INBOUND_FEDERATION,
    *CLIENT_API,
    *ADMIN_API,
    *ENCRYPTION,
    *REGISTRATION,
    *EVENT_SENDING,
    *USER_DIRECTORY,
    *MSC4140,
    *GET_ONLY_ADMIN,
    *PAGINATION,
    *SSO,
    *TYPING,
    *TO_DEVICE,
    *ACCOUNT_DATA,
    *RECEIPTS,
    *PRESENCE,
    *PUSH_RULES,
    *DEVICE_LISTS,
    *MEDIA,
)

# -- rows ---------------------------------------------------------------------------------


class Example(NamedTuple):
    method: str
    path: str
    query: str | None = None


class Row(NamedTuple):
    regex: str
    method: str
    path: str
    query: str | None
    expected: str
    xfail: str | None = None

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query is not None else self.path


def documented(
    regex: str, expected: str, *examples: Example, xfail: str | None = None
) -> list[Row]:
    return [Row(regex, e.method, e.path, e.query, expected, xfail) for e in examples]


def get(path: str, query: str | None = None) -> Example:
    return Example("GET", path, query)


def post(path: str, query: str | None = None) -> Example:
    return Example("POST", path, query)


def put(path: str, query: str | None = None) -> Example:
    return Example("PUT", path, query)


def delete(path: str, query: str | None = None) -> Example:
    return Example("DELETE", path, query)


ROWS: list[Row] = [
    # -- generic_worker: Sync requests ----------------------------------------------------
    *documented(
        SYNC[0],
        "synchrotron",
        get(f"{C}/v3/sync", SINCE),
        get(f"{C}/r0/sync", SINCE),
        get(f"{C}/v3/sync", "filter=0&since=s1_2_3&timeout=30000&set_presence=online"),
        get(f"{C}/v3/sync", "since=s1_2_3&full_state=true"),
        get(f"{C}/v3/sync", "since=s1_2_3&access_token=syt_YWxpY2U_abc_def"),
    ),
    *documented(
        SYNC[0],
        "initial_sync",
        get(f"{C}/v3/sync"),
        get(f"{C}/r0/sync"),
        get(f"{C}/v3/sync", "filter=0&timeout=0"),
        get(f"{C}/v3/sync", "since="),
        get(f"{C}/r0/sync", "since&timeout=30000"),
        get(f"{C}/v3/sync", "full_state=true"),
    ),
    *documented(
        SYNC[1],
        "synchrotron",
        get(f"{C}/api/v1/events", "from=s1_2_3&timeout=30000"),
        get(f"{C}/r0/events", "from=s1_2_3"),
        get(f"{C}/v3/events"),
        get(f"{C}/v3/events", "room_id=%21abc%3Aexample.org&from=s1_2_3"),
    ),
    *documented(
        SYNC[2],
        "initial_sync",
        get(f"{C}/api/v1/initialSync", "limit=10"),
        get(f"{C}/r0/initialSync"),
        get(f"{C}/v3/initialSync", "archived=true"),
    ),
    *documented(
        SYNC[3],
        "initial_sync",
        get(f"{C}/api/v1/rooms/{ROOM}/initialSync"),
        get(f"{C}/r0/rooms/{ROOM_ENC}/initialSync"),
        get(f"{C}/v3/rooms/{ROOM}/initialSync"),
        get(f"{C}/v3/rooms/{ROOM_ENC}/initialSync"),
    ),
    # -- generic_worker: Federation requests ----------------------------------------------
    *documented(FEDERATION[0], "federation_reader", get(f"{F}/v1/version")),
    *documented(
        FEDERATION[1],
        "federation_reader",
        get(f"{F}/v1/event/{EVENT_ENC}"),
        get(f"{F}/v1/event/{EVENT}"),
    ),
    *documented(
        FEDERATION[2],
        "federation_reader",
        get(f"{F}/v1/state/{ROOM_ENC}", f"event_id={EVENT_ENC}"),
        get(f"{F}/v1/state/{ROOM}", f"event_id={EVENT}"),
    ),
    *documented(
        FEDERATION[3],
        "federation_reader",
        get(f"{F}/v1/state_ids/{ROOM_ENC}", f"event_id={EVENT_ENC}"),
        get(f"{F}/v1/state_ids/{ROOM}", f"event_id={EVENT}"),
    ),
    *documented(
        FEDERATION[4],
        "federation_reader",
        get(f"{F}/v1/backfill/{ROOM_ENC}", f"v={EVENT_ENC}&limit=100"),
    ),
    *documented(
        FEDERATION[5],
        "federation_reader",
        post(f"{F}/v1/get_missing_events/{ROOM_ENC}"),
        post(f"{F}/v1/get_missing_events/{ROOM}"),
    ),
    *documented(
        FEDERATION[6],
        "federation_reader",
        get(f"{F}/v1/publicRooms", "limit=20&include_all_networks=false"),
        post(f"{F}/v1/publicRooms"),
    ),
    *documented(
        FEDERATION[7],
        "federation_reader",
        get(f"{F}/v1/query/profile", "user_id=%40alice%3Aexample.org&field=displayname"),
        get(f"{F}/v1/query/directory", f"room_alias={ALIAS_ENC}"),
    ),
    *documented(
        FEDERATION[8],
        "federation_reader",
        get(f"{F}/v1/make_join/{ROOM_ENC}/%40bob%3Aremote.example", "ver=10&ver=11"),
        get(f"{F}/v1/make_join/{ROOM}/{REMOTE_USER}", "ver=10"),
    ),
    *documented(
        FEDERATION[9],
        "federation_reader",
        get(f"{F}/v1/make_leave/{ROOM_ENC}/%40bob%3Aremote.example"),
    ),
    *documented(
        FEDERATION[10],
        "federation_reader",
        put(f"{F}/v1/send_join/{ROOM_ENC}/{EVENT_ENC}"),
        put(f"{F}/v2/send_join/{ROOM_ENC}/{EVENT_ENC}", "omit_members=true"),
        put(f"{F}/v2/send_join/{ROOM}/{EVENT}"),
    ),
    *documented(
        FEDERATION[11],
        "federation_reader",
        put(f"{F}/v1/send_leave/{ROOM_ENC}/{EVENT_ENC}"),
        put(f"{F}/v2/send_leave/{ROOM_ENC}/{EVENT_ENC}"),
    ),
    *documented(
        FEDERATION[12],
        "federation_reader",
        get(f"{F}/v1/make_knock/{ROOM_ENC}/%40bob%3Aremote.example", "ver=7"),
    ),
    *documented(
        FEDERATION[13],
        "federation_reader",
        put(f"{F}/v1/send_knock/{ROOM_ENC}/{EVENT_ENC}"),
    ),
    *documented(
        FEDERATION[14],
        "federation_reader",
        put(f"{F}/v1/invite/{ROOM_ENC}/{EVENT_ENC}"),
        put(f"{F}/v2/invite/{ROOM_ENC}/{EVENT_ENC}"),
        put(f"{F}/v2/invite/{ROOM}/{EVENT}"),
    ),
    *documented(
        FEDERATION[15],
        "federation_reader",
        get(f"{F}/v1/event_auth/{ROOM_ENC}/{EVENT_ENC}"),
    ),
    *documented(
        FEDERATION[16],
        "federation_reader",
        get(f"{F}/v1/timestamp_to_event/{ROOM_ENC}", "ts=1700000000000&dir=b"),
    ),
    *documented(
        FEDERATION[17],
        "federation_reader",
        put(f"{F}/v1/exchange_third_party_invite/{ROOM_ENC}"),
    ),
    *documented(
        FEDERATION[18],
        "federation_reader",
        get(f"{F}/v1/user/devices/{USER_ENC}"),
        get(f"{F}/v1/user/devices/{USER}"),
    ),
    *documented(
        FEDERATION[19],
        "federation_reader",
        post("/_matrix/key/v2/query"),
        get("/_matrix/key/v2/query/remote.example", "minimum_valid_until_ts=1700000000000"),
    ),
    *documented(
        FEDERATION[20],
        "federation_reader",
        get(f"{F}/v1/hierarchy/{ROOM_ENC}", "suggested_only=false"),
        get(f"{F}/v1/hierarchy/{ROOM}"),
    ),
    # -- generic_worker: Inbound federation transaction request ---------------------------
    *documented(
        INBOUND_FEDERATION[0],
        "federation_inbound",
        put(f"{F}/v1/send/1700000000000"),
        put(f"{F}/v1/send/m1700000000000.0"),
        put(f"{F}/v1/send/txn%2F1"),
    ),
    # -- generic_worker: Client API requests ----------------------------------------------
    # Beyond the docs: createRoom goes to event creators, keyed by user (ess-helm#1467).
    *documented(
        CLIENT_API[0],
        "event_creator",
        post(f"{C}/api/v1/createRoom"),
        post(f"{C}/r0/createRoom"),
        post(f"{C}/v3/createRoom"),
        post(f"{C}/unstable/createRoom"),
    ),
    *documented(
        CLIENT_API[1],
        "client_reader",
        get(f"{C}/api/v1/publicRooms"),
        get(f"{C}/r0/publicRooms", "limit=20"),
        get(f"{C}/v3/publicRooms", "server=remote.example&limit=20&since=next_batch"),
        post(f"{C}/v3/publicRooms", "server=remote.example"),
        get(f"{C}/unstable/publicRooms"),
    ),
    *documented(
        CLIENT_API[2],
        "client_reader",
        get(f"{C}/api/v1/rooms/{ROOM}/joined_members"),
        get(f"{C}/r0/rooms/{ROOM_ENC}/joined_members"),
        get(f"{C}/v3/rooms/{ROOM}/joined_members"),
        get(f"{C}/v3/rooms/{ROOM_ENC}/joined_members"),
        get(f"{C}/unstable/rooms/{ROOM_ENC}/joined_members"),
    ),
    *documented(
        CLIENT_API[3],
        "client_reader",
        get(f"{C}/api/v1/rooms/{ROOM}/context/{EVENT}", "limit=10"),
        get(f"{C}/r0/rooms/{ROOM_ENC}/context/{EVENT_ENC}"),
        get(f"{C}/v3/rooms/{ROOM}/context/{EVENT}", "limit=10&filter=%7B%7D"),
        get(f"{C}/v3/rooms/{ROOM_ENC}/context/{EVENT_ENC}", "limit=10"),
        get(f"{C}/unstable/rooms/{ROOM_ENC}/context/{EVENT_ENC}"),
    ),
    *documented(
        CLIENT_API[4],
        "client_reader",
        get(f"{C}/api/v1/rooms/{ROOM}/members"),
        get(f"{C}/r0/rooms/{ROOM_ENC}/members", "membership=join"),
        get(f"{C}/v3/rooms/{ROOM}/members", "at=s1_2_3&not_membership=leave"),
        get(f"{C}/v3/rooms/{ROOM_ENC}/members"),
        get(f"{C}/unstable/rooms/{ROOM_ENC}/members"),
    ),
    *documented(
        CLIENT_API[5],
        "client_reader",
        get(f"{C}/api/v1/rooms/{ROOM}/state"),
        get(f"{C}/r0/rooms/{ROOM_ENC}/state"),
        get(f"{C}/v3/rooms/{ROOM}/state"),
        get(f"{C}/v3/rooms/{ROOM_ENC}/state"),
        get(f"{C}/unstable/rooms/{ROOM_ENC}/state"),
    ),
    *documented(
        CLIENT_API[6],
        "client_reader",
        get(f"{C}/v1/rooms/{ROOM}/hierarchy", "max_depth=1&suggested_only=false"),
        get(f"{C}/v1/rooms/{ROOM_ENC}/hierarchy", "from=token&limit=50"),
    ),
    *documented(
        CLIENT_API[7],
        "client_reader",
        get(f"{C}/v1/rooms/{ROOM}/relations/{EVENT}"),
        get(f"{C}/v1/rooms/{ROOM_ENC}/relations/{EVENT_ENC}/m.thread", "limit=20"),
        get(f"{C}/v1/rooms/{ROOM_ENC}/relations/{EVENT_ENC}/m.annotation/m.reaction"),
        get(f"{C}/unstable/rooms/{ROOM_ENC}/relations/{EVENT_ENC}", "dir=b&recurse=true"),
    ),
    *documented(
        CLIENT_API[8],
        "client_reader",
        get(f"{C}/v1/rooms/{ROOM}/threads", "include=all&limit=20"),
        get(f"{C}/v1/rooms/{ROOM_ENC}/threads"),
    ),
    *documented(
        CLIENT_API[9],
        "client_reader",
        get(f"{C}/unstable/im.nheko.summary/summary/{ALIAS_ENC}"),
        get(f"{C}/unstable/im.nheko.summary/summary/{ROOM_ENC}", "via=example.org"),
        get(f"{C}/unstable/im.nheko.summary/summary/{ROOM}"),
    ),
    *documented(
        CLIENT_API[10],
        "client_reader",
        get(f"{C}/v1/room_summary/{ALIAS_ENC}"),
        get(f"{C}/v1/room_summary/{ROOM_ENC}", "via=example.org&via=remote.example"),
        get(f"{C}/v1/room_summary/{ROOM}"),
    ),
    *documented(
        CLIENT_API[11],
        "client_reader",
        get(f"{C}/r0/account/3pid"),
        get(f"{C}/v3/account/3pid"),
        get(f"{C}/unstable/account/3pid"),
    ),
    *documented(
        CLIENT_API[12],
        "client_reader",
        get(f"{C}/r0/account/whoami"),
        get(f"{C}/v3/account/whoami"),
        get(f"{C}/unstable/account/whoami"),
    ),
    *documented(
        CLIENT_API[13],
        "client_reader",
        post(f"{C}/r0/account/deactivate"),
        post(f"{C}/v3/account/deactivate"),
        post(f"{C}/unstable/account/deactivate"),
    ),
    *documented(CLIENT_API[14], "client_reader", get(f"{C}/versions")),
    *documented(
        CLIENT_API[15],
        "client_reader",
        get(f"{C}/api/v1/voip/turnServer"),
        get(f"{C}/r0/voip/turnServer"),
        get(f"{C}/v3/voip/turnServer"),
        get(f"{C}/unstable/voip/turnServer"),
    ),
    *documented(
        CLIENT_API[16],
        "client_reader",
        get(f"{C}/api/v1/rooms/{ROOM}/event/{EVENT}"),
        get(f"{C}/r0/rooms/{ROOM_ENC}/event/{EVENT_ENC}"),
        get(f"{C}/v3/rooms/{ROOM}/event/{EVENT}"),
        get(f"{C}/v3/rooms/{ROOM_ENC}/event/{EVENT_ENC}"),
        get(f"{C}/unstable/rooms/{ROOM_ENC}/event/{EVENT_ENC}"),
    ),
    *documented(
        CLIENT_API[17],
        "client_reader",
        get(f"{C}/api/v1/joined_rooms"),
        get(f"{C}/r0/joined_rooms"),
        get(f"{C}/v3/joined_rooms"),
        get(f"{C}/unstable/joined_rooms"),
    ),
    *documented(
        CLIENT_API[18],
        "client_reader",
        get(f"{C}/v1/rooms/{ROOM}/timestamp_to_event", "ts=1700000000000&dir=f"),
        get(f"{C}/v1/rooms/{ROOM_ENC}/timestamp_to_event", "ts=1700000000000&dir=b"),
    ),
    *documented(
        CLIENT_API[19],
        "client_reader",
        get(f"{C}/api/v1/rooms/{ROOM}/aliases"),
        get(f"{C}/r0/rooms/{ROOM_ENC}/aliases"),
        get(f"{C}/v3/rooms/{ROOM}/aliases"),
        get(f"{C}/v3/rooms/{ROOM_ENC}/aliases"),
        get(f"{C}/unstable/org.matrix.msc2432/rooms/{ROOM}/aliases"),
        get(f"{C}/unstable/org.matrix.msc2432/rooms/{ROOM_ENC}/aliases"),
    ),
    *documented(
        CLIENT_API[20],
        "client_reader",
        post(f"{C}/api/v1/search"),
        post(f"{C}/r0/search"),
        post(f"{C}/v3/search", "next_batch=abc"),
        post(f"{C}/unstable/search"),
    ),
    *documented(
        CLIENT_API[21],
        "client_reader",
        post(f"{C}/r0/user/{USER}/filter"),
        post(f"{C}/v3/user/{USER_ENC}/filter"),
        get(f"{C}/v3/user/{USER_ENC}/filter/1"),
        get(f"{C}/v3/user/{USER}/filter/1"),
        get(f"{C}/unstable/user/{USER_ENC}/filter/12"),
    ),
    *documented(
        CLIENT_API[22],
        "client_reader",
        get(f"{C}/api/v1/directory/room/{ALIAS_ENC}"),
        get(f"{C}/r0/directory/room/{ALIAS_ENC}"),
        get(f"{C}/v3/directory/room/{ALIAS_ENC}"),
        put(f"{C}/v3/directory/room/{ALIAS_ENC}"),
        delete(f"{C}/v3/directory/room/{ALIAS_ENC}"),
        get(f"{C}/unstable/directory/room/{ALIAS_ENC}"),
    ),
    *documented(
        CLIENT_API[23],
        "client_reader",
        get(f"{C}/r0/capabilities"),
        get(f"{C}/v3/capabilities"),
        get(f"{C}/unstable/capabilities"),
    ),
    *documented(
        CLIENT_API[24],
        "client_reader",
        get(f"{C}/r0/notifications", "limit=20"),
        get(f"{C}/v3/notifications", "from=token&only=highlight"),
        get(f"{C}/unstable/notifications"),
    ),
    # -- generic_worker: Admin API requests -------------------------------------------------
    *documented(
        ADMIN_API[0],
        "client_reader",
        get(f"{ADMIN}/v1/rooms/{ROOM}"),
        get(f"{ADMIN}/v1/rooms/{ROOM_ENC}"),
        delete(f"{ADMIN}/v1/rooms/{ROOM_ENC}"),
    ),
    # -- generic_worker: Encryption requests ------------------------------------------------
    *documented(
        ENCRYPTION[0],
        "client_reader",
        post(f"{C}/r0/keys/query"),
        post(f"{C}/v3/keys/query"),
        post(f"{C}/unstable/keys/query"),
    ),
    *documented(
        ENCRYPTION[1],
        "client_reader",
        get(f"{C}/r0/keys/changes", "from=s1&to=s2"),
        get(f"{C}/v3/keys/changes", "from=s72594_4483_1934&to=s75689_5632_2435"),
        get(f"{C}/unstable/keys/changes", "from=s1&to=s2"),
    ),
    *documented(
        ENCRYPTION[2],
        "client_reader",
        post(f"{C}/r0/keys/claim"),
        post(f"{C}/v3/keys/claim"),
        post(f"{C}/unstable/keys/claim"),
    ),
    *documented(
        ENCRYPTION[3],
        "client_reader",
        get(f"{C}/r0/room_keys/version"),
        get(f"{C}/v3/room_keys/version"),
        post(f"{C}/v3/room_keys/version"),
        put(f"{C}/v3/room_keys/version/1"),
        delete(f"{C}/v3/room_keys/version/1"),
        put(f"{C}/v3/room_keys/keys", "version=1"),
        get(f"{C}/v3/room_keys/keys/{ROOM}", "version=1"),
        put(f"{C}/v3/room_keys/keys/{ROOM_ENC}/sessionid", "version=1"),
        get(f"{C}/unstable/room_keys/keys", "version=1"),
    ),
    # -- generic_worker: Registration/login requests ----------------------------------------
    *documented(
        REGISTRATION[0],
        "client_reader",
        get(f"{C}/api/v1/login"),
        post(f"{C}/r0/login"),
        get(f"{C}/v3/login"),
        post(f"{C}/v3/login"),
        post(f"{C}/unstable/login"),
    ),
    *documented(
        REGISTRATION[1],
        "client_reader",
        post(f"{C}/r0/register"),
        post(f"{C}/v3/register", "kind=user"),
        post(f"{C}/v3/register", "kind=guest"),
        post(f"{C}/unstable/register"),
    ),
    *documented(
        REGISTRATION[2],
        "client_reader",
        get(f"{C}/r0/register/available", "username=alice"),
        get(f"{C}/v3/register/available", "username=alice"),
        get(f"{C}/unstable/register/available", "username=alice"),
    ),
    *documented(
        REGISTRATION[3],
        "client_reader",
        get(f"{C}/v1/register/m.login.registration_token/validity", "token=fBVFdqVE"),
    ),
    *documented(
        REGISTRATION[4],
        "client_reader",
        get(f"{C}/r0/password_policy"),
        get(f"{C}/v3/password_policy"),
        get(f"{C}/unstable/password_policy"),
    ),
    # -- generic_worker: Event sending requests ---------------------------------------------
    *documented(
        EVENT_SENDING[0],
        "event_creator",
        put(f"{C}/api/v1/rooms/{ROOM}/redact/{EVENT}/txn1"),
        post(f"{C}/r0/rooms/{ROOM_ENC}/redact/{EVENT_ENC}"),
        put(f"{C}/v3/rooms/{ROOM}/redact/{EVENT}/txn1"),
        put(f"{C}/v3/rooms/{ROOM_ENC}/redact/{EVENT_ENC}/m1700000000000.0"),
        put(f"{C}/unstable/rooms/{ROOM_ENC}/redact/{EVENT_ENC}/txn1"),
    ),
    *documented(
        EVENT_SENDING[1],
        "event_creator",
        post(f"{C}/api/v1/rooms/{ROOM}/send/m.room.message"),
        put(f"{C}/api/v1/rooms/{ROOM_ENC}/send/m.room.message/txn1"),
        put(f"{C}/r0/rooms/{ROOM_ENC}/send/m.room.message/txn1"),
        put(f"{C}/v3/rooms/{ROOM}/send/m.room.message/txn1"),
        put(f"{C}/v3/rooms/{ROOM_ENC}/send/m.room.message/m1700000000000.0"),
        put(f"{C}/v3/rooms/{ROOM_ENC}/send/m.reaction/txn2"),
        put(f"{C}/v3/rooms/{ROOM_ENC}/send/m.room.encrypted/txn3"),
        put(
            f"{C}/v3/rooms/{ROOM_ENC}/send/m.room.message/txn4",
            "org.matrix.msc4140.delay=60000",
        ),
        put(f"{C}/unstable/rooms/{ROOM_ENC}/send/m.room.message/txn1"),
    ),
    *documented(
        EVENT_SENDING[2],
        "event_creator",
        put(f"{C}/api/v1/rooms/{ROOM}/state/m.room.name"),
        put(f"{C}/r0/rooms/{ROOM_ENC}/state/m.room.topic/"),
        put(f"{C}/v3/rooms/{ROOM}/state/m.room.name/"),
        put(f"{C}/v3/rooms/{ROOM_ENC}/state/m.room.power_levels/"),
        put(f"{C}/v3/rooms/{ROOM_ENC}/state/m.room.member/{USER_ENC}"),
        put(f"{C}/v3/rooms/{ROOM}/state/m.room.member/{USER}"),
        get(f"{C}/v3/rooms/{ROOM_ENC}/state/m.room.name/"),
        get(f"{C}/v3/rooms/{ROOM_ENC}/state/m.room.create/", "format=event"),
        put(f"{C}/unstable/rooms/{ROOM_ENC}/state/m.room.name/"),
    ),
    *documented(
        EVENT_SENDING[3],
        "event_creator",
        post(f"{C}/api/v1/rooms/{ROOM}/join"),
        post(f"{C}/r0/rooms/{ROOM_ENC}/join"),
        post(f"{C}/v3/rooms/{ROOM}/join"),
        post(f"{C}/v3/rooms/{ROOM_ENC}/join"),
        post(f"{C}/v3/rooms/{ROOM_ENC}/invite"),
        post(f"{C}/v3/rooms/{ROOM_ENC}/leave"),
        post(f"{C}/v3/rooms/{ROOM_ENC}/ban"),
        post(f"{C}/v3/rooms/{ROOM_ENC}/unban"),
        post(f"{C}/v3/rooms/{ROOM_ENC}/kick"),
        post(f"{C}/unstable/rooms/{ROOM_ENC}/leave"),
    ),
    *documented(
        EVENT_SENDING[4],
        "event_creator",
        post(f"{C}/api/v1/join/{ROOM}"),
        post(f"{C}/r0/join/{ALIAS_ENC}"),
        post(f"{C}/v3/join/{ROOM}", "server_name=example.org"),
        post(f"{C}/v3/join/{ROOM_ENC}", "via=example.org&server_name=example.org"),
        post(f"{C}/v3/join/{ALIAS_ENC}"),
        post(f"{C}/unstable/join/{ALIAS_ENC}"),
    ),
    *documented(
        EVENT_SENDING[5],
        "event_creator",
        post(f"{C}/api/v1/knock/{ROOM}"),
        post(f"{C}/r0/knock/{ROOM_ENC}"),
        post(f"{C}/v3/knock/{ROOM_ENC}", "via=example.org"),
        post(f"{C}/v3/knock/{ALIAS_ENC}"),
        post(f"{C}/unstable/knock/{ROOM}"),
    ),
    *documented(
        EVENT_SENDING[6],
        "event_creator",
        get(f"{C}/api/v1/profile/{USER}"),
        get(f"{C}/r0/profile/{USER_ENC}/displayname"),
        get(f"{C}/v3/profile/{USER}"),
        put(f"{C}/v3/profile/{USER_ENC}/displayname"),
        put(f"{C}/v3/profile/{USER_ENC}/avatar_url"),
        get(f"{C}/unstable/profile/{USER_ENC}/avatar_url"),
    ),
    # -- generic_worker: User directory search requests ------------------------------------
    *documented(
        USER_DIRECTORY[0],
        "user_dir",
        post(f"{C}/r0/user_directory/search"),
        post(f"{C}/v3/user_directory/search"),
        post(f"{C}/unstable/user_directory/search"),
    ),
    # -- generic_worker: Unstable MSC4140 support -------------------------------------------
    *documented(
        MSC4140[0],
        "client_reader",
        get(f"{C}/unstable/org.matrix.msc4140/delayed_events"),
        get(f"{C}/unstable/org.matrix.msc4140/delayed_events", "from=token"),
        post(f"{C}/unstable/org.matrix.msc4140/delayed_events/syd_AbCdEfGhIj/restart"),
    ),
    # -- generic_worker: GET-only list (the admin API; the others are stream writers) ------
    *documented(
        GET_ONLY_ADMIN[0],
        "client_reader",
        get(f"{ADMIN}/v2/users/{USER}"),
        get(f"{ADMIN}/v2/users/{USER_ENC}"),
    ),
    *documented(
        GET_ONLY_ADMIN[0],
        "main",
        put(f"{ADMIN}/v2/users/{USER}"),
        put(f"{ADMIN}/v2/users/{USER_ENC}"),
    ),
    # -- generic_worker: pagination ---------------------------------------------------------
    *documented(
        PAGINATION[0],
        "client_reader",
        get(f"{C}/api/v1/rooms/{ROOM}/messages", "from=t1-2_3&dir=b&limit=20"),
        get(f"{C}/r0/rooms/{ROOM_ENC}/messages", "dir=b"),
        get(f"{C}/v3/rooms/{ROOM}/messages", "dir=b&limit=30"),
        get(f"{C}/v3/rooms/{ROOM_ENC}/messages", "from=t47-4_0&dir=f&filter=%7B%7D"),
        get(f"{C}/unstable/rooms/{ROOM_ENC}/messages", "dir=b"),
    ),
    # -- generic_worker: SSO (a single process: main) --------------------------------------
    *documented(
        SSO[0],
        "main",
        get(f"{C}/api/v1/login/sso/redirect", "redirectUrl=https%3A%2F%2Fapp.example%2F"),
        get(f"{C}/r0/login/sso/redirect", "redirectUrl=https%3A%2F%2Fapp.example%2F"),
        get(f"{C}/v3/login/sso/redirect", "redirectUrl=https%3A%2F%2Fapp.example%2F"),
        get(f"{C}/v3/login/sso/redirect/oidc-github", "redirectUrl=https%3A%2F%2Fapp.example%2F"),
        get(f"{C}/unstable/login/sso/redirect", "redirectUrl=https%3A%2F%2Fapp.example%2F"),
    ),
    *documented(
        SSO[1],
        "main",
        get(f"{SC}/pick_idp", "redirectUrl=https%3A%2F%2Fapp.example%2F"),
        get(f"{SC}/pick_idp", "idp=oidc-github&redirectUrl=https%3A%2F%2Fapp.example%2F"),
    ),
    *documented(
        SSO[2],
        "main",
        get(f"{SC}/pick_username/account"),
        post(f"{SC}/pick_username/submit"),
        get(f"{SC}/pick_username/check", "username=alice"),
    ),
    *documented(SSO[3], "main", get(f"{SC}/new_user_consent"), post(f"{SC}/new_user_consent")),
    *documented(SSO[4], "main", get(f"{SC}/sso_register")),
    *documented(
        SSO[5],
        "main",
        get(f"{SC}/oidc/callback", "code=abc&state=xyz"),
        post(f"{SC}/oidc/callback"),
    ),
    *documented(SSO[6], "main", post(f"{SC}/saml2/authn_response")),
    *documented(
        SSO[7],
        "main",
        get(f"{C}/api/v1/login/cas/ticket", "redirectUrl=https%3A%2F%2Fapp.example%2F&ticket=ST-1"),
        get(f"{C}/r0/login/cas/ticket", "redirectUrl=https%3A%2F%2Fapp.example%2F&ticket=ST-1"),
        get(f"{C}/v3/login/cas/ticket", "redirectUrl=https%3A%2F%2Fapp.example%2F&ticket=ST-1"),
    ),
    # -- stream writers ----------------------------------------------------------------------
    *documented(
        TYPING[0],
        "typing",
        put(f"{C}/api/v1/rooms/{ROOM}/typing/{USER}"),
        put(f"{C}/r0/rooms/{ROOM_ENC}/typing/{USER_ENC}"),
        put(f"{C}/v3/rooms/{ROOM}/typing/{USER}"),
        put(f"{C}/v3/rooms/{ROOM_ENC}/typing/{USER_ENC}"),
        put(f"{C}/unstable/rooms/{ROOM_ENC}/typing/{USER_ENC}"),
    ),
    *documented(
        TO_DEVICE[0],
        "to_device",
        put(f"{C}/r0/sendToDevice/m.room.encrypted/txn1"),
        put(f"{C}/v3/sendToDevice/m.room.encrypted/txn1"),
        put(f"{C}/v3/sendToDevice/m.room_key_request/m1700000000000.1"),
        put(f"{C}/unstable/sendToDevice/m.secret.request/txn1"),
    ),
    *documented(
        ACCOUNT_DATA[0],
        "account_data",
        get(f"{C}/r0/user/{USER}/rooms/{ROOM}/tags"),
        get(f"{C}/v3/user/{USER_ENC}/rooms/{ROOM_ENC}/tags"),
        put(f"{C}/v3/user/{USER_ENC}/rooms/{ROOM_ENC}/tags/m.favourite"),
        delete(f"{C}/v3/user/{USER}/rooms/{ROOM}/tags/u.work"),
        put(f"{C}/unstable/user/{USER_ENC}/rooms/{ROOM_ENC}/tags/m.lowpriority"),
    ),
    *documented(
        ACCOUNT_DATA[1],
        "account_data",
        get(f"{C}/r0/user/{USER}/account_data/m.direct"),
        get(f"{C}/v3/user/{USER_ENC}/account_data/m.direct"),
        put(f"{C}/v3/user/{USER_ENC}/account_data/m.ignored_user_list"),
        put(f"{C}/v3/user/{USER}/account_data/im.vector.setting.breadcrumbs"),
        get(f"{C}/v3/user/{USER_ENC}/rooms/{ROOM_ENC}/account_data/m.fully_read"),
        put(f"{C}/v3/user/{USER}/rooms/{ROOM}/account_data/org.example.custom"),
        put(f"{C}/unstable/user/{USER_ENC}/account_data/m.direct"),
    ),
    *documented(
        ACCOUNT_DATA[1],
        "account_data",
        delete(f"{C}/unstable/org.matrix.msc3391/user/{USER_ENC}/account_data/org.example.custom"),
        delete(
            f"{C}/unstable/org.matrix.msc3391/user/{USER_ENC}"
            f"/rooms/{ROOM_ENC}/account_data/org.example.custom"
        ),
    ),
    *documented(
        RECEIPTS[0],
        "receipts",
        post(f"{C}/r0/rooms/{ROOM}/receipt/m.read/{EVENT}"),
        post(f"{C}/v3/rooms/{ROOM_ENC}/receipt/m.read/{EVENT_ENC}"),
        post(f"{C}/v3/rooms/{ROOM}/receipt/m.read.private/{EVENT}"),
        post(f"{C}/unstable/rooms/{ROOM_ENC}/receipt/m.read/{EVENT_ENC}"),
    ),
    *documented(
        RECEIPTS[1],
        "receipts",
        post(f"{C}/r0/rooms/{ROOM}/read_markers"),
        post(f"{C}/v3/rooms/{ROOM_ENC}/read_markers"),
        post(f"{C}/unstable/rooms/{ROOM_ENC}/read_markers"),
    ),
    *documented(
        PRESENCE[0],
        "presence",
        get(f"{C}/api/v1/presence/{USER}/status"),
        put(f"{C}/r0/presence/{USER_ENC}/status"),
        get(f"{C}/v3/presence/{USER_ENC}/status"),
        put(f"{C}/v3/presence/{USER}/status"),
        get(f"{C}/unstable/presence/{USER_ENC}/status"),
    ),
    *documented(
        PUSH_RULES[0],
        "push_rules",
        get(f"{C}/api/v1/pushrules/"),
        get(f"{C}/r0/pushrules/"),
        get(f"{C}/v3/pushrules/"),
        get(f"{C}/v3/pushrules/global/"),
        get(f"{C}/v3/pushrules/global/override/.m.rule.master"),
        put(f"{C}/v3/pushrules/global/room/{ROOM_ENC}"),
        put(f"{C}/v3/pushrules/global/content/nickname", "before=other&after=yet_another"),
        delete(f"{C}/v3/pushrules/global/override/custom_rule"),
        put(f"{C}/v3/pushrules/global/override/.m.rule.master/enabled"),
        put(f"{C}/v3/pushrules/global/underride/.m.rule.message/actions"),
        get(f"{C}/unstable/pushrules/global/"),
    ),
    *documented(
        DEVICE_LISTS[0],
        "device_lists",
        post(f"{C}/r0/delete_devices"),
        post(f"{C}/v3/delete_devices"),
    ),
    *documented(
        DEVICE_LISTS[1],
        "device_lists",
        get(f"{C}/r0/devices"),
        get(f"{C}/v3/devices"),
        get(f"{C}/v3/devices/ABCDEFGHIJ"),
        put(f"{C}/v3/devices/ABCDEFGHIJ"),
        delete(f"{C}/v3/devices/ABCDEFGHIJ"),
        get(f"{C}/unstable/devices"),
    ),
    *documented(
        DEVICE_LISTS[2],
        "device_lists",
        post(f"{C}/r0/keys/upload"),
        post(f"{C}/v3/keys/upload"),
        post(f"{C}/unstable/keys/upload"),
    ),
    *documented(
        DEVICE_LISTS[3],
        "device_lists",
        post(f"{C}/v3/keys/device_signing/upload"),
        post(f"{C}/r0/keys/device_signing/upload"),
        post(f"{C}/unstable/keys/device_signing/upload"),
    ),
    *documented(
        DEVICE_LISTS[4],
        "device_lists",
        post(f"{C}/v3/keys/signatures/upload"),
        post(f"{C}/r0/keys/signatures/upload"),
        post(f"{C}/unstable/keys/signatures/upload"),
    ),
    # -- synapse.app.media_repository -------------------------------------------------------
    *documented(
        MEDIA[0],
        "media_repository",
        post("/_matrix/media/v3/upload", "filename=cat.png"),
        post("/_matrix/media/r0/upload"),
        put("/_matrix/media/v3/upload/example.org/AQwafuaFswefuhsfAFAgsw"),
        post("/_matrix/media/v1/create"),
        get("/_matrix/media/r0/download/example.org/AQwafuaFswefuhsfAFAgsw"),
        get("/_matrix/media/v3/download/example.org/AQwafuaFswefuhsfAFAgsw/cat.png"),
        get("/_matrix/media/v1/download/remote.example/abc", "allow_remote=true"),
        get(
            "/_matrix/media/v3/thumbnail/example.org/AQwafuaFswefuhsfAFAgsw",
            "width=64&height=64&method=crop",
        ),
        get("/_matrix/media/v3/config"),
        get("/_matrix/media/r0/preview_url", "url=https%3A%2F%2Fexample.org%2F&ts=0"),
    ),
    *documented(
        MEDIA[1],
        "media_repository",
        get(f"{C}/v1/media/download/example.org/AQwafuaFswefuhsfAFAgsw"),
        get(f"{C}/v1/media/download/example.org/AQwafuaFswefuhsfAFAgsw/cat.png"),
        get(
            f"{C}/v1/media/thumbnail/example.org/AQwafuaFswefuhsfAFAgsw",
            "width=96&height=96&method=scale&animated=true",
        ),
        get(f"{C}/v1/media/config"),
        get(f"{C}/v1/media/preview_url", "url=https%3A%2F%2Fexample.org%2F"),
    ),
    *documented(
        MEDIA[2],
        "media_repository",
        get(f"{F}/v1/media/download/AQwafuaFswefuhsfAFAgsw"),
        get(f"{F}/v1/media/thumbnail/AQwafuaFswefuhsfAFAgsw", "width=64&height=64&method=crop"),
    ),
    *documented(
        MEDIA[3],
        "media_repository",
        post(f"{ADMIN}/v1/purge_media_cache", "before_ts=1700000000000"),
    ),
    *documented(
        MEDIA[4],
        "media_repository",
        get(f"{ADMIN}/v1/room/{ROOM}/media"),
        get(f"{ADMIN}/v1/room/{ROOM_ENC}/media"),
    ),
    # Beyond the docs: (un)quarantining writes the quarantined_media_changes
    # stream, which only its writer may do (Synapse 1.152+).
    *documented(
        MEDIA[4],
        "quarantined_media_changes",
        post(f"{ADMIN}/v1/room/{ROOM_ENC}/media/quarantine"),
    ),
    *documented(
        MEDIA[5],
        "quarantined_media_changes",
        post(f"{ADMIN}/v1/user/{USER}/media/quarantine"),
        post(f"{ADMIN}/v1/user/{USER_ENC}/media/quarantine"),
    ),
    *documented(
        MEDIA[6],
        "media_repository",
        get(f"{ADMIN}/v1/media/example.org/AQwafuaFswefuhsfAFAgsw"),
        delete(f"{ADMIN}/v1/media/example.org/AQwafuaFswefuhsfAFAgsw"),
        post(f"{ADMIN}/v1/media/delete", "before_ts=1700000000000&size_gt=1048576"),
        post(f"{ADMIN}/v1/media/example.org/delete", "before_ts=1700000000000"),
        post(f"{ADMIN}/v1/media/protect/AQwafuaFswefuhsfAFAgsw"),
    ),
    *documented(
        MEDIA[6],
        "quarantined_media_changes",
        post(f"{ADMIN}/v1/media/quarantine/example.org/AQwafuaFswefuhsfAFAgsw"),
        post(f"{ADMIN}/v1/media/unquarantine/example.org/AQwafuaFswefuhsfAFAgsw"),
    ),
    *documented(
        MEDIA[7],
        "quarantined_media_changes",
        post(f"{ADMIN}/v1/quarantine_media/{ROOM}"),
        post(f"{ADMIN}/v1/quarantine_media/{ROOM_ENC}"),
    ),
    *documented(
        MEDIA[8],
        "media_repository",
        get(f"{ADMIN}/v1/users/{USER}/media"),
        get(f"{ADMIN}/v1/users/{USER_ENC}/media", "from=0&limit=100&order_by=media_length"),
        delete(f"{ADMIN}/v1/users/{USER_ENC}/media"),
    ),
]


class Overlap(NamedTuple):
    """A path two documented regexes match because of a greedy ``.*`` (precedence rule 4).

    ``regex`` names the endpoint the path really is (decided by the segment after
    ``/rooms/{roomId}/``); ``decoy`` is the regex that matches only by accident.
    """

    regex: str
    decoy: str
    method: str
    path: str
    expected: str


def overlaps(regex: str, expected: str, *cases: tuple[str, Example]) -> list[Overlap]:
    return [Overlap(regex, decoy, e.method, e.path, expected) for decoy, e in cases]


V3 = f"{C}/v3/rooms/{ROOM_ENC}"
V3_RAW = f"{C}/v3/rooms/{ROOM}"

OVERLAPS: list[Overlap] = [
    # a state event whose type or state key happens to be spelled like another endpoint
    *overlaps(
        EVENT_SENDING[2],
        "event_creator",
        (CLIENT_API[4], put(f"{V3_RAW}/state/m.custom/members")),
        (CLIENT_API[4], get(f"{V3}/state/org.example/members")),
        (CLIENT_API[2], put(f"{V3}/state/m.custom/joined_members")),
        (CLIENT_API[5], put(f"{V3_RAW}/state/m.custom/state")),
        (CLIENT_API[16], put(f"{V3}/state/event/")),
        (CLIENT_API[19], put(f"{V3}/state/m.custom/aliases")),
        (TYPING[0], put(f"{V3}/state/m.custom/typing")),
        (RECEIPTS[0], put(f"{C}/r0/rooms/{ROOM}/state/m.custom/receipt")),
        (RECEIPTS[1], put(f"{V3}/state/read_markers/")),
        (ACCOUNT_DATA[0], put(f"{V3}/state/m.custom/tags")),
        (ACCOUNT_DATA[1], put(f"{V3}/state/m.custom/account_data")),
        (PAGINATION[0], put(f"{V3}/state/m.custom/messages")),
    ),
    # a message or redaction whose transaction ID is spelled like another endpoint
    *overlaps(
        EVENT_SENDING[1],
        "event_creator",
        (RECEIPTS[0], put(f"{V3_RAW}/send/m.room.message/receipt")),
        (RECEIPTS[1], put(f"{V3}/send/m.room.message/read_markers")),
        (TYPING[0], put(f"{V3}/send/m.room.message/typing")),
        (PAGINATION[0], put(f"{V3}/send/m.room.message/messages")),
        (CLIENT_API[4], put(f"{C}/r0/rooms/{ROOM_ENC}/send/m.room.message/members")),
        (ACCOUNT_DATA[0], put(f"{V3}/send/m.room.message/tags")),
        (EVENT_SENDING[3], put(f"{V3}/send/m.room.message/kick")),
    ),
    *overlaps(
        EVENT_SENDING[0],
        "event_creator",
        (PAGINATION[0], put(f"{V3_RAW}/redact/{EVENT}/messages")),
        (RECEIPTS[0], put(f"{V3}/redact/{EVENT_ENC}/receipt")),
    ),
    # reading an event whose ID is spelled like another endpoint
    *overlaps(CLIENT_API[16], "client_reader", (EVENT_SENDING[3], get(f"{V3}/event/kick"))),
    *overlaps(CLIENT_API[3], "client_reader", (TYPING[0], get(f"{V3}/context/typing"))),
    # a profile field named "tags" (custom profile fields, MSC4133)
    *overlaps(
        EVENT_SENDING[6],
        "event_creator",
        (ACCOUNT_DATA[0], put(f"{C}/v3/profile/{USER_ENC}/tags")),
    ),
]


class NearMiss(NamedTuple):
    """A request that looks like a documented endpoint but is not one: it stays on main."""

    near: str | None  # the documented regex it resembles, None for an undocumented endpoint
    method: str
    path: str
    query: str | None = None


NEAR_MISSES: list[NearMiss] = [
    NearMiss(SYNC[0], "GET", f"{C}/v3/syncx", "since=s1"),
    NearMiss(SYNC[0], "GET", f"{C}/v3/sync/", "since=s1"),
    NearMiss(SYNC[0], "GET", f"{C}/api/v1/sync"),
    NearMiss(SYNC[1], "GET", f"{C}/v3/events/{EVENT_ENC}"),
    NearMiss(INBOUND_FEDERATION[0], "PUT", f"{F}/v2/send/1700000000000"),
    NearMiss(INBOUND_FEDERATION[0], "PUT", f"{F}/v1/send"),
    NearMiss(FEDERATION[0], "GET", f"{F}/v1/version/"),
    NearMiss(FEDERATION[3], "GET", f"{F}/v2/state_ids/{ROOM_ENC}"),
    NearMiss(None, "GET", "/_matrix/key/v2/server"),
    NearMiss(None, "POST", f"{F}/v1/user/keys/query"),
    NearMiss(None, "GET", f"{F}/v1/openid/userinfo", "access_token=abc"),
    NearMiss(None, "POST", f"{C}/v3/logout"),
    NearMiss(None, "POST", f"{C}/v3/logout/all"),
    NearMiss(REGISTRATION[0], "POST", f"{C}/v1/login/get_token"),
    NearMiss(REGISTRATION[0], "GET", f"{C}/v3/login/cas/redirect"),
    NearMiss(REGISTRATION[1], "POST", f"{C}/v3/register/email/requestToken"),
    NearMiss(None, "POST", f"{ADMIN}/v1/register"),
    NearMiss(CLIENT_API[11], "POST", f"{C}/v3/account/3pid/add"),
    NearMiss(None, "POST", f"{C}/v3/account/password"),
    NearMiss(CLIENT_API[22], "GET", f"{C}/v3/directory/list/room/{ROOM_ENC}"),
    NearMiss(CLIENT_API[19], "GET", f"{C}/unstable/rooms/{ROOM_ENC}/aliases"),
    NearMiss(None, "POST", f"{C}/v3/rooms/{ROOM_ENC}/forget"),
    NearMiss(None, "POST", f"{C}/v3/rooms/{ROOM_ENC}/upgrade"),
    NearMiss(None, "POST", f"{C}/v3/rooms/{ROOM_ENC}/report/{EVENT_ENC}"),
    NearMiss(None, "POST", f"{C}/v3/pushers/set"),
    NearMiss(None, "GET", f"{C}/v3/pushers"),
    NearMiss(ADMIN_API[0], "GET", f"{ADMIN}/v1/rooms/{ROOM_ENC}/members"),
    NearMiss(ADMIN_API[0], "GET", f"{ADMIN}/v1/rooms", "limit=10"),
    NearMiss(GET_ONLY_ADMIN[0], "GET", f"{ADMIN}/v2/users", "from=0&limit=10"),
    NearMiss(GET_ONLY_ADMIN[0], "GET", f"{ADMIN}/v2/users/{USER_ENC}/devices"),
    NearMiss(DEVICE_LISTS[0], "POST", f"{C}/unstable/delete_devices"),
    NearMiss(DEVICE_LISTS[1], "GET", f"{C}/v3/devicesx"),
    NearMiss(ENCRYPTION[2], "POST", f"{C}/unstable/org.matrix.msc3983/keys/claim"),
    NearMiss(USER_DIRECTORY[0], "POST", f"{C}/api/v1/user_directory/search"),
    NearMiss(MSC4140[0], "POST", f"{C}/unstable/org.matrix.msc4140/delayed_events/syd_Ab/cancel"),
    NearMiss(MSC4140[0], "POST", f"{C}/unstable/org.matrix.msc4140/delayed_events/syd_Ab/send"),
    NearMiss(MSC4140[0], "POST", f"{C}/unstable/org.matrix.msc4140/delayed_events/syd_Ab"),
    NearMiss(MEDIA[1], "GET", f"{C}/v3/media/config"),
    NearMiss(MEDIA[8], "GET", f"{ADMIN}/v2/users/{USER_ENC}/media"),
    NearMiss(PUSH_RULES[0], "GET", f"{C}/v3/pushrules"),
    NearMiss(None, "POST", f"{SC}/rendezvous"),
]

# -- routing ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy() -> CompiledPolicy:
    return load_policy(str(POLICY_PATH))


def decide(
    policy: CompiledPolicy,
    method: str,
    path: str,
    query: str | None = None,
    auth: str | None = None,
    src: str | None = None,
) -> Decision:
    return policy.decide(Request(method=method, path=path, query=query, auth=auth, src=src))


def row_id(method: str, path: str, query: str | None) -> str:
    return f"{method} {path}" + (f"?{query}" if query is not None else "")


def row_params(rows: list[Row]) -> list[pytest.ParameterSet]:
    return [
        pytest.param(
            row,
            id=f"{row.expected}: {row_id(row.method, row.path, row.query)}",
            marks=[pytest.mark.xfail(reason=row.xfail, strict=True)] if row.xfail else [],
        )
        for row in rows
    ]


@pytest.mark.parametrize("row", row_params(ROWS))
def test_every_documented_regex_reaches_its_class(policy: CompiledPolicy, row: Row) -> None:
    decision = decide(policy, row.method, row.path, row.query)
    assert decision.worker_class == row.expected, (
        f"{row.method} {row.target} (docs: {row.regex}) went to {decision.worker_class!r} "
        f"by rule {decision.rule!r}, expected {row.expected!r}"
    )


@pytest.mark.parametrize(
    "overlap",
    [pytest.param(o, id=f"{o.expected}: {row_id(o.method, o.path, None)}") for o in OVERLAPS],
)
def test_greedy_overlaps_go_to_the_endpoint_the_path_really_is(
    policy: CompiledPolicy, overlap: Overlap
) -> None:
    decision = decide(policy, overlap.method, overlap.path)
    assert decision.worker_class == overlap.expected, (
        f"{overlap.method} {overlap.path} is {overlap.regex}, not {overlap.decoy}; went to "
        f"{decision.worker_class!r} by rule {decision.rule!r}, expected {overlap.expected!r}"
    )


@pytest.mark.parametrize(
    "miss",
    [pytest.param(m, id=row_id(m.method, m.path, m.query)) for m in NEAR_MISSES],
)
def test_near_misses_of_documented_regexes_stay_on_main(
    policy: CompiledPolicy, miss: NearMiss
) -> None:
    decision = decide(policy, miss.method, miss.path, miss.query)
    assert decision.worker_class == "main", (
        f"{row_id(miss.method, miss.path, miss.query)} is not documented "
        f"(near {miss.near}); went to {decision.worker_class!r} by rule {decision.rule!r}"
    )


# -- the table itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "row", [pytest.param(r, id=f"{r.regex} <- {row_id(r.method, r.path, r.query)}") for r in ROWS]
)
def test_each_example_is_an_instance_of_its_documented_regex(row: Row) -> None:
    assert row.regex in DOCUMENTED
    assert re.match(row.regex, row.path), f"{row.path} does not match {row.regex}"


def test_every_documented_regex_has_examples() -> None:
    assert len(set(DOCUMENTED)) == len(DOCUMENTED)
    missing = [regex for regex in DOCUMENTED if not any(row.regex == regex for row in ROWS)]
    assert not missing


def test_the_table_has_no_duplicate_requests() -> None:
    requests = [(row.method, row.path, row.query) for row in ROWS]
    requests += [(o.method, o.path, None) for o in OVERLAPS]
    requests += [(m.method, m.path, m.query) for m in NEAR_MISSES]
    assert len(set(requests)) == len(requests)


@pytest.mark.parametrize("overlap", [pytest.param(o, id=o.path) for o in OVERLAPS])
def test_each_overlap_really_matches_both_regexes(overlap: Overlap) -> None:
    assert overlap.regex in DOCUMENTED and overlap.decoy in DOCUMENTED
    assert re.match(overlap.regex, overlap.path)
    assert re.match(overlap.decoy, overlap.path)


@pytest.mark.parametrize("miss", [pytest.param(m, id=m.path) for m in NEAR_MISSES])
def test_each_near_miss_matches_no_documented_regex(miss: NearMiss) -> None:
    assert miss.near is None or miss.near in DOCUMENTED
    matching = [regex for regex in DOCUMENTED if re.match(regex, miss.path)]
    assert not matching


# -- keys ---------------------------------------------------------------------------------

ALICE = "Bearer syt_YWxpY2U_QWxpY2VTZWNyZXRUb2tlbg_1B2cDe"
ALICE_OTHER_DEVICE = "Bearer syt_YWxpY2U_T3RoZXJEZXZpY2VUb2tlbg_4F5gHi"
BOB = "Bearer syt_Ym9i_Qm9iU2VjcmV0VG9rZW5BYmNk_0a1B2c"


@pytest.mark.parametrize(
    ("method", "path", "query"),
    [
        ("GET", f"{C}/v3/sync", SINCE),
        ("GET", f"{C}/r0/sync", "since=s1_2_3"),
        ("GET", f"{C}/v3/sync", None),
        ("GET", f"{C}/v3/sync", "since=&timeout=0"),
        ("GET", f"{C}/v3/events", "from=s1_2_3"),
        ("GET", f"{C}/v3/initialSync", None),
        ("GET", f"{C}/v3/rooms/{ROOM_ENC}/initialSync", None),
    ],
    ids=str,
)
def test_sync_is_keyed_by_the_user_named_in_the_syt_token(
    policy: CompiledPolicy, method: str, path: str, query: str | None
) -> None:
    alice = decide(policy, method, path, query, auth=ALICE)
    alice_again = decide(policy, method, path, query, auth=ALICE_OTHER_DEVICE)
    bob = decide(policy, method, path, query, auth=BOB)
    assert alice.worker_class in {"synchrotron", "initial_sync"}
    assert (alice.key_kind, alice_again.key_kind, bob.key_kind) == ("user", "user", "user")
    assert alice.key is not None
    assert alice.key == alice_again.key, "two devices of one user must hash alike"
    assert alice.key != bob.key


ROOM_KEYED = [
    ("PUT", f"{C}/v3/rooms/{{room}}/send/m.room.message/txn1", "event_creator"),
    ("PUT", f"{C}/r0/rooms/{{room}}/send/m.room.message/txn1", "event_creator"),
    ("PUT", f"{C}/v3/rooms/{{room}}/send/m.room.message/receipt", "event_creator"),
    ("PUT", f"{C}/v3/rooms/{{room}}/state/m.room.name/", "event_creator"),
    ("PUT", f"{C}/v3/rooms/{{room}}/redact/{EVENT_ENC}/txn1", "event_creator"),
    ("POST", f"{C}/v3/rooms/{{room}}/join", "event_creator"),
    ("POST", f"{C}/v3/rooms/{{room}}/invite", "event_creator"),
    ("POST", f"{C}/v3/join/{{room}}", "event_creator"),
    ("POST", f"{C}/v3/knock/{{room}}", "event_creator"),
    ("GET", f"{C}/api/v1/rooms/{{room}}/messages", "client_reader"),
    ("GET", f"{C}/r0/rooms/{{room}}/messages", "client_reader"),
    ("GET", f"{C}/v3/rooms/{{room}}/messages", "client_reader"),
    ("GET", f"{C}/unstable/rooms/{{room}}/messages", "client_reader"),
]


@pytest.mark.parametrize(
    ("method", "template", "worker_class"),
    ROOM_KEYED,
    ids=[f"{method} {template}" for method, template, _ in ROOM_KEYED],
)
def test_event_sending_and_pagination_are_keyed_by_room_however_it_is_encoded(
    policy: CompiledPolicy, method: str, template: str, worker_class: str
) -> None:
    query = "dir=b&limit=10" if method == "GET" else None
    spellings = (ROOM, ROOM_ENC, "%21abc%3aexample.org")
    decisions = [
        decide(policy, method, template.format(room=room), query, auth=auth)
        for room, auth in zip(spellings, (ALICE, BOB, None), strict=True)
    ]
    other = decide(policy, method, template.format(room="%21xyz%3Aexample.org"), query)
    assert {d.worker_class for d in decisions} == {worker_class}
    assert {d.key_kind for d in decisions} == {"room"}
    assert {d.key_source for d in decisions} == {ROOM}
    assert len({d.key for d in decisions}) == 1, "raw and encoded room IDs must hash alike"
    assert (other.key_kind, other.worker_class) == ("room", worker_class)
    assert other.key != decisions[0].key


def x_matrix(origin: str, key: str = "ed25519:a", sig: str = "x") -> str:
    return f'X-Matrix origin="{origin}",key="{key}",sig="{sig}"'


def test_inbound_federation_transactions_are_keyed_by_the_x_matrix_origin(
    policy: CompiledPolicy,
) -> None:
    first = decide(
        policy,
        "PUT",
        f"{F}/v1/send/1700000000001",
        auth=x_matrix("remote.example"),
        src="192.0.2.1",
    )
    second = decide(
        policy,
        "PUT",
        f"{F}/v1/send/1700000000002",
        auth=x_matrix("remote.example", sig="y"),
        src="198.51.100.7",
    )
    other = decide(
        policy, "PUT", f"{F}/v1/send/1700000000001", auth=x_matrix("other.example"), src="192.0.2.1"
    )
    assert {first.worker_class, second.worker_class, other.worker_class} == {"federation_inbound"}
    assert (first.key_kind, first.key_source) == ("origin", "remote.example")
    assert first.key == second.key, "one remote server, whatever its txn ID or address"
    assert other.key_kind == "origin"
    assert other.key != first.key


@pytest.mark.parametrize(
    ("path", "query"),
    [
        (f"{F}/v1/state_ids/{ROOM_ENC}", f"event_id={EVENT_ENC}"),
        (f"{F}/v1/event/{EVENT_ENC}", None),
        (f"{F}/v1/backfill/{ROOM_ENC}", f"v={EVENT_ENC}&limit=100"),
        (f"{F}/v1/query/profile", "user_id=%40alice%3Aexample.org"),
        ("/_matrix/key/v2/query/remote.example", None),
    ],
    ids=str,
)
def test_federation_reads_are_keyed_by_the_whole_uri(
    policy: CompiledPolicy, path: str, query: str | None
) -> None:
    auth = x_matrix("remote.example")
    decision = decide(policy, "GET", path, query, auth=auth)
    again = decide(policy, "GET", path, query, auth=x_matrix("other.example"), src="192.0.2.9")
    different = decide(policy, "GET", path, f"{query}&x=1" if query else "x=1", auth=auth)
    assert decision.worker_class == "federation_reader"
    assert decision.key_kind == "uri"
    assert decision.key_source == (f"{path}?{query}" if query else path)
    assert decision.key == again.key, "the same URI hashes alike whoever asks"
    assert different.key_kind == "uri"
    assert different.key != decision.key
