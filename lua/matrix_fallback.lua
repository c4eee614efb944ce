-- matrix_fallback.lua: route a request when the matrix-spoa agent gave no answer.
--
-- HAProxy runs this action only when the SPOE agent did not set
-- txn.route.backend (agent down, slow or failing). It covers the core
-- endpoint families of the bundled policies and must give, for each of them,
-- the same class and the same hash key as the agent (spoa/policy/compiled.py
-- and spoa/matrix/*.py), so that requests keep reaching the same worker
-- while the agent is away. Everything else goes to the "rest" class.
--
-- Usage (haproxy.cfg):
--
--   lua-load matrix_fallback.lua
--   http-request lua.matrix_fallback sync=synchrotron:user \
--       initial_sync=initial_sync:user federation_inbound=federation_inbound:origin \
--       federation_reader=federation_reader:uri media=media_repository:none \
--       event_sending=event_creator:room rest=main:none seed=0 \
--       if !{ var(txn.route.backend) -m found }
--
-- Every argument is "family=class:keykind" (key kinds as in the policy
-- format: token, user, room, origin, uri, src, none), plus "seed=N", the
-- policy's MurmurHash3 seed. Arguments may come in any order. A malformed
-- argument is logged once and its family is routed as "rest" without a key;
-- a request is never refused because of it.
--
-- The action sets txn.route.backend (class), txn.route.key (8 hex digits,
-- only when there is a key), txn.route.rule ("fallback_<family>"),
-- txn.route.policy ("fallback") and txn.route.via ("fallback"). It never
-- raises: on an internal error only txn.route.via is set, to
-- "fallback-error", and HAProxy's default_backend takes the request.

local FAMILIES = {
    "sync",
    "initial_sync",
    "federation_inbound",
    "federation_reader",
    "media",
    "event_sending",
    "rest",
}

local KEY_KINDS = {
    token = true,
    user = true,
    room = true,
    origin = true,
    uri = true,
    src = true,
    none = true,
}

-- Class names become backend names (be_<class>): the policy format's alphabet.
local CLASS_PATTERN = "^[%w_.%-]+$"
local CLASS_MAX = 48

-- -- logging ------------------------------------------------------------------

local logged = {}

-- Configuration problems are logged once each, not once per request.
local function log_once(message)
    if logged[message] then
        return
    end
    logged[message] = true
    pcall(core.log, core.warning, "matrix_fallback: " .. message)
end

-- -- path patterns ------------------------------------------------------------

-- The rules' regexes are written as in policies/synapse-workers.yaml. They use
-- only "^", "$", "[^/]+" and literal text, which mean the same in Lua
-- patterns, and "(a|b)" groups, which Lua lacks: expand() turns a regex into
-- one pattern per combination of alternatives.
local function expand(regex, into)
    local before, group, after = regex:match("^(.-)%(([^()]*)%)(.*)$")
    if before == nil then
        into[#into + 1] = regex
        return into
    end
    for alternative in (group .. "|"):gmatch("([^|]*)|") do
        expand(before .. alternative .. after, into)
    end
    return into
end

local function patterns(regexes)
    local result = {}
    for _, regex in ipairs(regexes) do
        expand(regex, result)
    end
    return result
end

-- Rule initial_sync (without "since") and rule sync (with it) share /sync.
local SYNC_PATHS = patterns({ "^/_matrix/client/(r0|v3)/sync$" })

-- Rule initial_sync_legacy.
local INITIAL_SYNC_PATHS = patterns({
    "^/_matrix/client/(api/v1|r0|v3)/initialSync$",
    "^/_matrix/client/(api/v1|r0|v3)/rooms/[^/]+/initialSync$",
})

-- Rule sync, but for /sync itself.
local EVENTS_PATHS = patterns({ "^/_matrix/client/(api/v1|r0|v3)/events$" })

-- Rule sliding_sync: native sliding sync (Element X), the sync family's
-- class and key, whatever its query ("pos" is no initial-sync marker).
local SLIDING_SYNC_PATHS = patterns({ "^/_matrix/client/unstable/org.matrix.simplified_msc3575/sync$" })

-- Rule media: its client and federation paths, not the admin API ones.
local MEDIA_PATHS = patterns({
    "^/_matrix/media/",
    "^/_matrix/client/v1/media/",
    "^/_matrix/federation/v1/media/",
})

-- Rule federation_inbound.
local FEDERATION_INBOUND_PATHS = patterns({ "^/_matrix/federation/v1/send/" })

-- Rule federation_reader.
local FEDERATION_READER_PATHS = patterns({
    "^/_matrix/federation/v1/version$",
    "^/_matrix/federation/v1/event/",
    "^/_matrix/federation/v1/state/",
    "^/_matrix/federation/v1/state_ids/",
    "^/_matrix/federation/v1/backfill/",
    "^/_matrix/federation/v1/get_missing_events/",
    "^/_matrix/federation/v1/publicRooms",
    "^/_matrix/federation/v1/query/",
    "^/_matrix/federation/v1/make_join/",
    "^/_matrix/federation/v1/make_leave/",
    "^/_matrix/federation/(v1|v2)/send_join/",
    "^/_matrix/federation/(v1|v2)/send_leave/",
    "^/_matrix/federation/v1/make_knock/",
    "^/_matrix/federation/v1/send_knock/",
    "^/_matrix/federation/(v1|v2)/invite/",
    "^/_matrix/federation/v1/event_auth/",
    "^/_matrix/federation/v1/timestamp_to_event/",
    "^/_matrix/federation/v1/exchange_third_party_invite/",
    "^/_matrix/federation/v1/user/devices/",
    "^/_matrix/key/v2/query",
    "^/_matrix/federation/v1/hierarchy/",
})

-- Rule event_sending.
local EVENT_SENDING_PATHS = patterns({
    "^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/[^/]+/redact",
    "^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/[^/]+/send",
    "^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/[^/]+/state/",
    "^/_matrix/client/(api/v1|r0|v3|unstable)/rooms/[^/]+/(join|invite|leave|ban|unban|kick)$",
    "^/_matrix/client/(api/v1|r0|v3|unstable)/join/",
    "^/_matrix/client/(api/v1|r0|v3|unstable)/knock/",
})

local function matches_any(path, patterns)
    for _, pattern in ipairs(patterns) do
        if path:find(pattern) then
            return true
        end
    end
    return false
end

-- -- query strings and percent-decoding (spoa/matrix/query.py) ----------------

local function hex_byte(digits)
    return string.char(tonumber(digits, 16))
end

-- %XX escapes decoded exactly once, at byte level; bad escapes stay as they are.
local function percent_decode(text)
    if not text:find("%", 1, true) then
        return text
    end
    return (text:gsub("%%(%x%x)", hex_byte))
end

-- The raw value of the first "name" parameter ("" without "="), or nil.
-- Names are compared as given and, if they hold a "%", percent-decoded.
local function query_value(query, name)
    if not query or query == "" then
        return nil
    end
    if not query:find(name, 1, true) and not query:find("%", 1, true) then
        return nil
    end
    for part in (query .. "&"):gmatch("([^&]*)&") do
        local equals = part:find("=", 1, true)
        local key, value = part, ""
        if equals then
            key, value = part:sub(1, equals - 1), part:sub(equals + 1)
        end
        if key == name or (key:find("%", 1, true) and percent_decode(key) == name) then
            return value
        end
    end
    return nil
end

-- "?since=" and a bare "?since" count as absent (an initial sync).
local function has_value(query, name)
    local value = query_value(query, name)
    return value ~= nil and value ~= ""
end

-- -- tokens and users (spoa/matrix/tokens.py) ---------------------------------

-- The Bearer token first, the access_token query parameter second.
local function access_token(auth, query)
    if auth and auth:sub(1, 7):lower() == "bearer " then
        local token = auth:sub(8):gsub("^[ \t]+", ""):gsub("[ \t]+$", "")
        if token ~= "" then
            return token
        end
    end
    -- The agent only looks at the parameter when its literal name occurs.
    if query and query:find("access_token", 1, true) then
        local value = query_value(query, "access_token")
        if value and value ~= "" then
            return percent_decode(value)
        end
    end
    return nil
end

local BASE64_VALUES = {}
do
    local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    for i = 1, #alphabet do
        BASE64_VALUES[alphabet:byte(i)] = i - 1
    end
end
local PAD = 61 -- "="

-- Python's binascii.a2b_base64(data, strict_mode=True) (3.11): the same
-- accepted inputs and output, nil where it raises. Leftover bits of a final
-- partial quad are ignored, as there.
local function base64_decode_strict(data)
    if data:byte(1) == PAD then
        return nil -- leading padding
    end
    local out = {}
    local quad, carry, pads, padding = 0, 0, 0, false
    for i = 1, #data do
        local byte = data:byte(i)
        if byte == PAD then
            padding = true
            if quad >= 2 then
                pads = pads + 1
                if quad + pads >= 4 then
                    if i < #data then
                        return nil -- data after the padding
                    end
                    return table.concat(out)
                end
            end
        else
            local value = BASE64_VALUES[byte]
            if value == nil or padding then
                return nil -- not base64, or data between padding characters
            end
            pads = 0
            if quad == 0 then
                carry, quad = value, 1
            elseif quad == 1 then
                out[#out + 1] = string.char(((carry << 2) | (value >> 4)) & 0xff)
                carry, quad = value & 0x0f, 2
            elseif quad == 2 then
                out[#out + 1] = string.char(((carry << 4) | (value >> 2)) & 0xff)
                carry, quad = value & 0x03, 3
            else
                out[#out + 1] = string.char(((carry << 6) | value) & 0xff)
                quad = 0
            end
        end
    end
    if quad ~= 0 then
        return nil -- impossible length or missing padding
    end
    return table.concat(out)
end

-- Valid UTF-8 as Python's strict decoder sees it: Lua 5.3's utf8.len rejects
-- overlong forms and code points above U+10FFFF but accepts surrogates.
local function valid_utf8(text)
    return utf8.len(text) ~= nil and not text:find("\xED[\xA0-\xBF]")
end

-- The localpart inside syt_<unpadded base64 localpart>_<random>_<crc>, or nil.
local function syt_localpart(token)
    if token:sub(1, 4) ~= "syt_" then
        return nil
    end
    local parts = {}
    for part in (token .. "_"):gmatch("([^_]*)_") do
        parts[#parts + 1] = part
    end
    local encoded = parts[2]
    if #parts < 3 or encoded == "" then
        return nil
    end
    local localpart = base64_decode_strict(encoded .. string.rep("=", -#encoded % 4))
    if localpart == nil or localpart == "" or not valid_utf8(localpart) then
        return nil
    end
    return localpart
end

-- -- rooms (spoa/matrix/rooms.py) ---------------------------------------------

-- The first non-empty segment after the leftmost /rooms/, /join/ or /knock/.
local function room_from_path(path)
    local best_start, best_room
    for _, pattern in ipairs({ "/rooms/([^/]+)", "/join/([^/]+)", "/knock/([^/]+)" }) do
        local start, _, room = path:find(pattern)
        if start and (best_start == nil or start < best_start) then
            best_start, best_room = start, room
        end
    end
    return best_room and percent_decode(best_room)
end

-- -- X-Matrix origins (spoa/matrix/xmatrix.py) --------------------------------

-- RFC 9110 token characters: parameter names.
local TOKEN_CHARS = {}
do
    local chars = "!#$%&'*+.^_`|~-0123456789"
        .. "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    for i = 1, #chars do
        TOKEN_CHARS[chars:byte(i)] = true
    end
end

-- What ends a bare value: the agent's regex stops at "," '"' and at Python's
-- "\s", which also matches these ASCII controls and, decoded from UTF-8, a
-- few non-ASCII spaces.
local VALUE_STOP = { [44] = true, [34] = true }
for _, byte in ipairs({ 9, 10, 11, 12, 13, 28, 29, 30, 31, 32 }) do
    VALUE_STOP[byte] = true
end
local WIDE_SPACES = {
    ["\xC2\x85"] = true,
    ["\xC2\xA0"] = true,
    ["\xE1\x9A\x80"] = true,
    ["\xE2\x80\xA8"] = true,
    ["\xE2\x80\xA9"] = true,
    ["\xE2\x80\xAF"] = true,
    ["\xE2\x81\x9F"] = true,
    ["\xE3\x80\x80"] = true,
}
for last = 0x80, 0x8A do
    WIDE_SPACES["\xE2\x80" .. string.char(last)] = true
end

-- Whether a bare value ends at byte i. A non-ASCII space always decodes as
-- itself in the agent: its lead byte can never be part of an earlier character.
local function ends_bare_value(header, i)
    local byte = header:byte(i)
    if byte < 0x80 then
        return VALUE_STOP[byte] == true
    end
    return WIDE_SPACES[header:sub(i, i + 1)] == true or WIDE_SPACES[header:sub(i, i + 2)] == true
end

local function skip_blanks(header, i)
    while true do
        local byte = header:byte(i)
        if byte ~= 32 and byte ~= 9 then
            return i
        end
        i = i + 1
    end
end

-- One "name=value" parameter starting at i: name, value, position after it
-- (past the comma), or nil on a syntax error.
local function xmatrix_param(header, i)
    local size = #header
    i = skip_blanks(header, i)
    local name_start = i
    while i <= size and TOKEN_CHARS[header:byte(i)] do
        i = i + 1
    end
    if i == name_start then
        return nil
    end
    local name = header:sub(name_start, i - 1)
    i = skip_blanks(header, i)
    if header:byte(i) ~= 61 then -- "="
        return nil
    end
    i = skip_blanks(header, i + 1)
    local value
    if header:byte(i) == 34 then -- quoted, with backslash escapes
        local chars = {}
        i = i + 1
        while true do
            local byte = header:byte(i)
            if byte == nil then
                return nil -- unterminated
            elseif byte == 34 then
                i = i + 1
                break
            elseif byte == 92 then
                if i + 1 > size then
                    return nil -- a backslash escaping nothing
                end
                chars[#chars + 1] = header:sub(i + 1, i + 1)
                i = i + 2
            else
                chars[#chars + 1] = header:sub(i, i)
                i = i + 1
            end
        end
        value = table.concat(chars)
    else
        local value_start = i
        while i <= size and not ends_bare_value(header, i) do
            i = i + 1
        end
        value = header:sub(value_start, i - 1)
    end
    i = skip_blanks(header, i)
    if i <= size then
        if header:byte(i) ~= 44 then -- ","
            return nil
        end
        i = i + 1
    end
    return name, value, i
end

-- The origin of "Authorization: X-Matrix ...", or nil. Parameters are read in
-- order until the first "origin"; a syntax error before it gives nil.
local function xmatrix_origin(auth)
    if not auth or auth:sub(1, 8):lower() ~= "x-matrix" or auth:byte(9) ~= 32 then
        return nil
    end
    local i = 9
    while auth:byte(i) == 32 do
        i = i + 1
    end
    while i <= #auth do
        local name, value, after = xmatrix_param(auth, i)
        if name == nil then
            return nil
        end
        if name:lower() == "origin" then
            if value == "" then
                return nil
            end
            return value
        end
        i = after
    end
    return nil
end

-- -- MurmurHash3_x86_32 -------------------------------------------------------

-- Lua 5.3 integers are 64-bit: products keep their low 32 bits exactly, so
-- masking after each step gives 32-bit unsigned arithmetic.
local function mul32(a, b)
    return (a * b) & 0xffffffff
end

local function rotl32(x, r)
    return ((x << r) | (x >> (32 - r))) & 0xffffffff
end

local function mix_block(k)
    return mul32(rotl32(mul32(k, 0xcc9e2d51), 15), 0x1b873593)
end

local function murmur3_32(data, seed)
    local h = seed & 0xffffffff
    local length = #data
    local blocks = length // 4
    for block = 0, blocks - 1 do
        local k = string.unpack("<I4", data, block * 4 + 1)
        h = h ~ mix_block(k)
        h = (rotl32(h, 13) * 5 + 0xe6546b64) & 0xffffffff
    end
    local tail = blocks * 4
    local remaining = length - tail
    if remaining > 0 then
        local k = 0
        for offset = remaining, 1, -1 do
            k = (k << 8) | data:byte(tail + offset)
        end
        h = h ~ mix_block(k)
    end
    h = h ~ (length & 0xffffffff)
    h = h ~ (h >> 16)
    h = mul32(h, 0x85ebca6b)
    h = h ~ (h >> 13)
    h = mul32(h, 0xc2b2ae35)
    h = h ~ (h >> 16)
    return h
end

-- -- keys (the extractors of spoa/policy/compiled.py) -------------------------

-- The client address as HAProxy prints it, with IPv4-mapped IPv6 addresses
-- (an IPv4 client on a dual-stack listener: "::ffff:127.0.0.1") written as
-- plain IPv4, as the agent does: both sides then agree whatever the listener
-- and whatever Python version prints the agent's addresses.
local function src_key(request)
    local src = request.src
    if src == nil or src == "" then
        return nil
    end
    local mapped = src:match("^::[fF][fF][fF][fF]:(%d+%.%d+%.%d+%.%d+)$")
    return mapped or src
end

local KEY_EXTRACTORS = {
    none = function()
        return nil
    end,
    token = function(request)
        return access_token(request.auth, request.query)
    end,
    user = function(request)
        local token = access_token(request.auth, request.query)
        if token == nil then
            return nil
        end
        -- Other tokens than syt_ ones are keys by themselves.
        return syt_localpart(token) or token
    end,
    room = function(request)
        return room_from_path(request.path)
    end,
    origin = function(request)
        return xmatrix_origin(request.auth) or src_key(request)
    end,
    uri = function(request)
        local query = request.query
        if query and query ~= "" then
            return request.path .. "?" .. query
        end
        return request.path
    end,
    src = src_key,
}

-- -- classification -----------------------------------------------------------

-- The family of a request, in the rule order of policies/synapse-workers.yaml.
local function family_of(path, query)
    if matches_any(path, SYNC_PATHS) then
        return has_value(query, "since") and "sync" or "initial_sync"
    end
    if matches_any(path, INITIAL_SYNC_PATHS) then
        return "initial_sync"
    end
    if matches_any(path, EVENTS_PATHS) or matches_any(path, SLIDING_SYNC_PATHS) then
        return "sync"
    end
    if matches_any(path, MEDIA_PATHS) then
        return "media"
    end
    if matches_any(path, FEDERATION_INBOUND_PATHS) then
        return "federation_inbound"
    end
    if matches_any(path, FEDERATION_READER_PATHS) then
        return "federation_reader"
    end
    if matches_any(path, EVENT_SENDING_PATHS) then
        return "event_sending"
    end
    return "rest"
end

-- -- arguments ----------------------------------------------------------------

local IS_FAMILY = {}
for _, family in ipairs(FAMILIES) do
    IS_FAMILY[family] = true
end

-- A family's route from "class:keykind", or nil and the reason.
local function parse_route(value)
    local class, kind = value:match("^([^:]*):([^:]*)$")
    if class == nil then
        return nil, "expected class:keykind"
    end
    if #class > CLASS_MAX or not class:find(CLASS_PATTERN) then
        return nil, "bad class name"
    end
    if not KEY_KINDS[kind] then
        return nil, "unknown key kind"
    end
    return { class = class, kind = kind }
end

local function parse_seed(value)
    if #value > 10 or not value:find("^%d+$") then
        return nil
    end
    local seed = math.tointeger(tonumber(value))
    if seed == nil or seed > 0xffffffff then
        return nil
    end
    return seed
end

-- The routes of all families and the seed, from the action's arguments.
-- Problems are logged; a family without a usable route is routed as rest.
local function parse_arguments(args)
    local routes, seed = {}, nil
    for _, arg in ipairs(args) do
        local name, value = tostring(arg):match("^([^=]*)=(.*)$")
        if name == nil then
            log_once(string.format("argument %q is not name=value; ignored", tostring(arg)))
        elseif name == "seed" then
            if seed ~= nil then
                log_once("seed is given twice; the first one is used")
            else
                seed = parse_seed(value)
                if seed == nil then
                    log_once(string.format("seed %q is not within 0..4294967295; 0 is used", value))
                    seed = 0
                end
            end
        elseif not IS_FAMILY[name] then
            log_once(string.format("unknown family %q; ignored", name))
        elseif routes[name] ~= nil then
            log_once(string.format("family %s is given twice; the first one is used", name))
        else
            local route, reason = parse_route(value)
            if route == nil then
                log_once(string.format("family %s: %s in %q; routed as rest", name, reason, value))
                route = false
            end
            routes[name] = route
        end
    end
    if seed == nil then
        log_once("no seed argument; 0 is used")
        seed = 0
    end
    for _, family in ipairs(FAMILIES) do
        if routes[family] == nil then
            log_once(string.format("no argument for family %s; routed as rest", family))
        end
        -- false marked a malformed route: from now on, missing and malformed
        -- are the same (nil), and decide() routes the family as rest.
        if not routes[family] then
            routes[family] = nil
        end
    end
    return { routes = routes, seed = seed }
end

local configurations = {}

-- Arguments are the same for every request of a given rule: parse them once.
local function configuration(args)
    local signature = table.concat(args, "\0")
    local config = configurations[signature]
    if config == nil then
        config = parse_arguments(args)
        configurations[signature] = config
    end
    return config
end

-- -- the action ---------------------------------------------------------------

-- What to set, computed before anything is set: class (or nil), key (or nil),
-- rule.
local function decide(config, request)
    local family = family_of(request.path, request.query)
    local route = config.routes[family]
    local kind = route and route.kind
    if route == nil then
        -- A family without a usable argument: the rest class, with no key.
        family, route, kind = "rest", config.routes.rest, "none"
    end
    local rule = "fallback_" .. family
    if route == nil then
        -- No usable rest class either: HAProxy's default_backend decides.
        return nil, nil, rule
    end
    local source = KEY_EXTRACTORS[kind](request)
    local key = source and string.format("%08x", murmur3_32(source, config.seed))
    return route.class, key, rule
end

local function fetch(txn, name, ...)
    local value = txn.f[name](txn.f, ...)
    if value == nil then
        return nil
    end
    return tostring(value)
end

local function route_request(txn, ...)
    local config = configuration({ ... })
    local request = {
        path = fetch(txn, "path") or "",
        query = fetch(txn, "query"),
        auth = fetch(txn, "req_fhdr", "authorization"),
        src = fetch(txn, "src"),
    }
    local class, key, rule = decide(config, request)
    if class then
        txn:set_var("txn.route.backend", class)
    end
    if key then
        txn:set_var("txn.route.key", key)
    end
    txn:set_var("txn.route.rule", rule)
    txn:set_var("txn.route.policy", "fallback")
    txn:set_var("txn.route.via", "fallback")
end

local ROUTE_VARS = { "txn.route.backend", "txn.route.key", "txn.route.rule", "txn.route.policy" }

-- Internal errors are bugs, not configuration: log the first few only, and
-- never more than the error itself (no request data).
local ERRORS_LOGGED_MAX = 10
local errors_logged = 0

core.register_action("matrix_fallback", { "http-req" }, function(txn, ...)
    local ok, err = pcall(route_request, txn, ...)
    if not ok then
        -- Undo whatever was set: the request goes to the default backend.
        for _, name in ipairs(ROUTE_VARS) do
            pcall(txn.unset_var, txn, name)
        end
        pcall(txn.set_var, txn, "txn.route.via", "fallback-error")
        if errors_logged < ERRORS_LOGGED_MAX then
            errors_logged = errors_logged + 1
            pcall(core.log, core.err, "matrix_fallback: internal error: " .. tostring(err))
        end
    end
end, 8)
