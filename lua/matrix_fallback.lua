-- matrix_fallback.lua: route a request when the matrix-spoa agent gave no answer.
--
-- haproxy.cfg calls this converter only when the SPOE agent did not set
-- txn.route.backend (agent down, slow or failing). It routes by a table
-- generated from the agent's policy (spoa/fallback.py): every rule, in the
-- policy's order, with its path patterns, methods, query conditions, class
-- and key kind. For every request it must give the class, hash key and rule
-- the agent would have given (spoa/policy/compiled.py, spoa/matrix/*.py), so
-- requests keep reaching the same worker while the agent is away.
--
-- A converter, not an action: HAProxy builds no transaction object for it
-- and the request's fields come from native fetches, which makes it a
-- fraction of an action's cost. Usage (haproxy.cfg has the full block):
--
--   lua-load matrix_fallback.lua
--   http-request set-var(txn.fallback) method,concat(' ',txn.fallback_src,' '),...,
--       lua.matrix_fallback(/run/matrix-spoa/fallback.table)
--
-- Input: "method src path query authorization", one space between fields
-- (the path and query are raw, the query without "?"; the authorization
-- header is last, whatever it holds). Output: "class rule policy [key]",
-- where key is 8 hex digits when the rule's key was found, policy is the
-- version of the policy the table came from, and class "-" means "leave the
-- request to HAProxy's default_backend" (rule "fallback_no_table" without a
-- table, "fallback_error" on an internal error, which is logged).
--
-- The one argument is the table's path. The agent writes the table whenever
-- it loads a policy (spoa serve --fallback-table); "spoa fallback POLICY"
-- writes one offline. The file is read at the first request and again
-- whenever its content changes (checked every two seconds): a new policy
-- reaches the fallback with no reload. A missing or broken file is logged and
-- the last good table stays in use.

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
    if not query:find("%", 1, true) then
        -- No escapes: the first occurrence of the name that is a whole key.
        local start = 1
        while true do
            local first, last = query:find(name, start, true)
            if first == nil then
                return nil
            end
            if first == 1 or query:byte(first - 1) == 38 then -- "&"
                local after = query:byte(last + 1)
                if after == nil or after == 38 then
                    return ""
                elseif after == 61 then -- "="
                    local stop = query:find("&", last + 2, true)
                    return query:sub(last + 2, stop and stop - 1 or -1)
                end
            end
            start = first + 1
        end
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
-- The usual header, origin first and plain ASCII (a quoted value without
-- backslashes, or a bare one), read with one pattern: what the parser below
-- would find.
local ORIGIN_FIRST = "^ +[Oo][Rr][Ii][Gg][Ii][Nn][ \t]*=[ \t]*"
local QUOTED_END = '^"([^"\\]*)"[ \t]*()'
local BARE_END = "^([!#-+%--~]+)[ \t]*()"

local function xmatrix_origin(auth)
    if not auth or auth:sub(1, 8):lower() ~= "x-matrix" or auth:byte(9) ~= 32 then
        return nil
    end
    local _, value_start = auth:find(ORIGIN_FIRST, 9)
    if value_start then
        local value, after = auth:match(QUOTED_END, value_start + 1)
        if value == nil then
            value, after = auth:match(BARE_END, value_start + 1)
        end
        if value and (after > #auth or auth:byte(after) == 44) then -- end, or ","
            return value ~= "" and value or nil
        end
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
-- masking after each step gives 32-bit unsigned arithmetic. Written out, with
-- no helper calls: this runs for every key that is not remembered.
local unpack = string.unpack

local function murmur3_32(data, seed)
    local h = seed & 0xffffffff
    local length = #data
    local tail = length - length % 4
    for position = 1, tail, 4 do
        local k = unpack("<I4", data, position)
        k = (k * 0xcc9e2d51) & 0xffffffff
        k = ((k << 15) | (k >> 17)) & 0xffffffff
        k = (k * 0x1b873593) & 0xffffffff
        h = h ~ k
        h = ((h << 13) | (h >> 19)) & 0xffffffff
        h = (h * 5 + 0xe6546b64) & 0xffffffff
    end
    local remaining = length - tail
    if remaining > 0 then
        local k = 0
        for offset = remaining, 1, -1 do
            k = (k << 8) | data:byte(tail + offset)
        end
        k = (k * 0xcc9e2d51) & 0xffffffff
        k = ((k << 15) | (k >> 17)) & 0xffffffff
        k = (k * 0x1b873593) & 0xffffffff
        h = h ~ k
    end
    h = h ~ (length & 0xffffffff)
    h = h ~ (h >> 16)
    h = (h * 0x85ebca6b) & 0xffffffff
    h = h ~ (h >> 13)
    h = (h * 0xc2b2ae35) & 0xffffffff
    h = h ~ (h >> 16)
    return h
end

-- -- keys (the extractors of spoa/policy/compiled.py) -------------------------

-- The client address as HAProxy prints it, with IPv4-mapped IPv6 addresses
-- (an IPv4 client on a dual-stack listener: "::ffff:127.0.0.1") written as
-- plain IPv4, as the agent does: both sides then agree whatever the listener
-- and whatever Python version prints the agent's addresses.
local function src_key(src)
    if src == nil or src == "" then
        return nil
    end
    local mapped = src:match("^::[fF][fF][fF][fF]:(%d+%.%d+%.%d+%.%d+)$")
    return mapped or src
end

-- Bounded memos, as the agent's: at most MEMO_ENTRIES entries of texts up to
-- MEMO_MAX_TEXT bytes each, emptied when full. Memory stays bounded whatever
-- the traffic; the usual traffic (each user's sync loop, a room's sends) is
-- answered from them.
local MEMO_ENTRIES = 8192
local MEMO_MAX_TEXT = 256

local function new_memo()
    return { entries = {}, size = 0 }
end

local function remember(memo, key, value)
    if #key <= MEMO_MAX_TEXT then
        if memo.size >= MEMO_ENTRIES then
            memo.entries, memo.size = {}, 0
        end
        memo.entries[key] = value
        memo.size = memo.size + 1
    end
    return value
end

-- Users by token: a syt_ token's localpart, or the token itself.
local users = new_memo()

-- The key source of a request for a key kind, or nil.
local function key_source(kind, path, query, auth, src)
    if kind == "none" then
        return nil
    elseif kind == "user" or kind == "token" then
        local token = access_token(auth, query)
        if token == nil or kind == "token" then
            return token
        end
        local user = users.entries[token]
        if user == nil then
            -- Other tokens than syt_ ones are keys by themselves.
            user = remember(users, token, syt_localpart(token) or token)
        end
        return user
    elseif kind == "room" then
        return room_from_path(path)
    elseif kind == "origin" then
        return xmatrix_origin(auth) or src_key(src)
    elseif kind == "uri" then
        if query and query ~= "" then
            return path .. "?" .. query
        end
        return path
    end
    return src_key(src)
end

-- -- the table ----------------------------------------------------------------

local TABLE_FORMAT = "matrix-spoa-fallback 1"

-- Patterns are indexed by the path's start up to its BUCKET_SLASHES-th "/"
-- ("/_matrix/client/v3/"): a path is tried only against the patterns that can
-- match it, in the policy's order.
local BUCKET_SLASHES = 4

-- Where a path's bucket ends: the position of its BUCKET_SLASHES-th "/", or
-- its length.
local function bucket_end(path)
    local position = 0
    for _ = 1, BUCKET_SLASHES do
        position = path:find("/", position + 1, true)
        if position == nil then
            return #path
        end
    end
    return position
end

-- The literal text an anchored pattern starts with ("" if not anchored).
local function literal_prefix(pattern)
    if pattern:sub(1, 1) ~= "^" then
        return ""
    end
    local out, i = {}, 2
    while i <= #pattern do
        local char = pattern:sub(i, i)
        local width = 1
        if char == "%" then
            char, width = pattern:sub(i + 1, i + 1), 2
            if char:find("%w") then
                break -- a class (%d, %a, ...), not a literal
            end
        elseif char:find("[%^%$%(%)%.%[%]%*%+%-%?]") then
            break
        end
        local after = pattern:sub(i + width, i + width)
        if after == "*" or after == "+" or after == "-" or after == "?" then
            break -- quantified: not fixed text
        end
        out[#out + 1] = char
        i = i + width
    end
    return table.concat(out)
end

local function split_list(text)
    local list = {}
    if text ~= "-" then
        for item in (text .. ","):gmatch("([^,]*),") do
            list[#list + 1] = item
        end
    end
    return list
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

local function valid_route(class, kind)
    if #class > CLASS_MAX or not class:find(CLASS_PATTERN) or not class:find("%w") then
        return "bad class name " .. string.format("%q", class)
    end
    if not KEY_KINDS[kind] then
        return "unknown key kind " .. string.format("%q", kind)
    end
    return nil
end

-- Index the patterns: each bucket lists, in policy order, the patterns of
-- its own and the short ones (anchored on less than a bucket's worth of
-- text, or not anchored) that could match a path in it.
local function index(routing)
    local keys, short = {}, {}
    for _, entry in ipairs(routing.patterns) do
        local prefix = literal_prefix(entry.pattern)
        if select(2, prefix:gsub("/", "")) >= BUCKET_SLASHES then
            local key = prefix:sub(1, bucket_end(prefix))
            keys[key] = true
            entry.bucket = key
        else
            entry.prefix = prefix
            short[#short + 1] = entry
        end
    end
    routing.short = short
    routing.buckets = {}
    for key in pairs(keys) do
        local list = {}
        for _, entry in ipairs(routing.patterns) do
            if entry.bucket == key or (entry.bucket == nil and key:sub(1, #entry.prefix) == entry.prefix) then
                list[#list + 1] = entry
            end
        end
        routing.buckets[key] = list
    end
end

-- A table from a file's text, or nil and the reason.
local function parse_table(text)
    local lines = {}
    for line in text:gmatch("([^\n]*)\n") do
        lines[#lines + 1] = line
    end
    if lines[1] ~= TABLE_FORMAT then
        return nil, "not a matrix-spoa fallback table (its first line is not " .. TABLE_FORMAT .. ")"
    end
    if lines[#lines] ~= "end" then
        return nil, "incomplete: no final \"end\" line"
    end
    local routing = { rules = {}, patterns = {}, chains = new_memo(), keys = new_memo() }
    local rule
    for number = 2, #lines - 1 do
        local record, rest = lines[number]:match("^(%l+) (.+)$")
        local problem
        if record == "path" then
            if rule == nil then
                problem = "a path before any rule"
            else
                routing.patterns[#routing.patterns + 1] = { pattern = rest, rule = rule }
            end
        elseif record == "rule" then
            local name, class, kind, methods, present, absent =
                rest:match("^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+)$")
            if name == nil then
                problem = "a rule needs name, class, key kind, methods, present and absent"
            else
                problem = valid_route(class, kind)
                local method_set = nil
                if methods ~= "-" then
                    method_set = {}
                    for _, method in ipairs(split_list(methods)) do
                        method_set[method] = true
                    end
                end
                rule = {
                    index = #routing.rules + 1,
                    name = name,
                    class = class,
                    kind = kind,
                    methods = method_set,
                    present = split_list(present),
                    absent = split_list(absent),
                }
                rule.conditional = method_set ~= nil or #rule.present > 0 or #rule.absent > 0
                routing.rules[#routing.rules + 1] = rule
            end
        elseif record == "default" then
            local class, kind = rest:match("^(%S+) (%S+)$")
            problem = class == nil and "default needs a class and a key kind" or valid_route(class, kind)
            routing.default = { name = "default", class = class, kind = kind }
        elseif record == "seed" then
            routing.seed = parse_seed(rest)
            problem = routing.seed == nil and "seed is not within 0..4294967295" or nil
        elseif record == "policy" then
            routing.version = rest:match("^%S+ (%S+)$")
            problem = routing.version == nil and "policy needs a name and a version" or nil
        else
            problem = "unknown record"
        end
        if problem then
            return nil, string.format("line %d: %s", number, problem)
        end
    end
    if routing.default == nil or routing.seed == nil or routing.version == nil then
        return nil, "no policy, seed or default line"
    end
    index(routing)
    return routing
end

-- Tables by path: the routing in use (or false) and the text it came from.
local tables = {}

local function read_file(path)
    local handle, err = io.open(path, "rb")
    if handle == nil then
        return nil, err
    end
    local text = handle:read("a")
    handle:close()
    return text
end

-- (Re)load a table if its file changed; a bad file keeps the last good table.
-- A read error is logged once while it lasts, and again if it comes back.
local function refresh(path, entry)
    local text, err = read_file(path)
    if text == nil then
        if entry.unreadable ~= err then
            entry.unreadable = err
            pcall(core.log, core.warning, "matrix_fallback: cannot read the table: " .. tostring(err)
                .. (entry.routing and "; the last one read stays in use" or "; requests go to the default backend"))
        end
        return
    end
    if entry.unreadable then
        entry.unreadable = nil
        if text == entry.text then
            pcall(core.log, core.info, "matrix_fallback: table " .. path .. " readable again, unchanged")
        end
    end
    if text == entry.text then
        return
    end
    entry.text = text
    local routing, problem = parse_table(text)
    if routing == nil then
        pcall(core.log, core.warning, "matrix_fallback: table " .. path .. " rejected: " .. problem
            .. (entry.routing and "; the last good one stays in use" or "; requests go to the default backend"))
        return
    end
    entry.routing = routing
    pcall(core.log, core.info, "matrix_fallback: table " .. path .. " loaded (policy " .. routing.version .. ")")
end

local function table_for(path)
    local entry = tables[path]
    if entry == nil then
        entry = { routing = false }
        tables[path] = entry
        refresh(path, entry)
    end
    return entry.routing
end

core.register_task(function()
    while true do
        core.msleep(2000)
        for path, entry in pairs(tables) do
            pcall(refresh, path, entry)
        end
    end
end)

-- -- matching -----------------------------------------------------------------

local NO_RULES = {}

-- The rules whose patterns match the path, in order, up to the first without
-- conditions (the agent's CompiledPolicy._chain). Remembered by path.
local function chain_of(routing, path)
    local chain = routing.chains.entries[path]
    if chain then
        return chain
    end
    local finish = bucket_end(path)
    local candidates = routing.buckets[path:sub(1, finish)] or routing.short
    local last = 0
    for _, entry in ipairs(candidates) do
        local rule = entry.rule
        if rule.index > last and path:find(entry.pattern) then
            if chain == nil then
                chain = {}
            end
            chain[#chain + 1] = rule
            last = rule.index
            if not rule.conditional then
                break
            end
        end
    end
    return remember(routing.chains, path, chain or NO_RULES)
end

local function conditions_hold(rule, method, query)
    if rule.methods and not rule.methods[method] then
        return false
    end
    for _, name in ipairs(rule.present) do
        if not has_value(query, name) then
            return false
        end
    end
    for _, name in ipairs(rule.absent) do
        if has_value(query, name) then
            return false
        end
    end
    return true
end

-- -- the converter ------------------------------------------------------------

-- The request, as haproxy.cfg joins it: "method src path query auth", each
-- field up to the next space but the last (an Authorization header may hold
-- spaces; the others cannot). Empty fields are absent.
local function split_request(input)
    local method, src, path, query, auth = input:match("^([^ ]*) ([^ ]*) ([^ ]*) ([^ ]*) (.*)$")
    if method == nil then
        -- Not what haproxy.cfg joins: no method, no key, only a path.
        return "", nil, input, nil, nil
    end
    return method, src, path, query ~= "" and query or nil, auth ~= "" and auth or nil
end

-- "class rule policy [key]": what haproxy.cfg sets txn.route.* from.
local function route(input, table_path)
    local routing = table_for(table_path)
    if not routing then
        return "- fallback_no_table -"
    end
    local method, src, path, query, auth = split_request(input)
    local chain = chain_of(routing, path)
    local rule = routing.default
    for _, candidate in ipairs(chain) do
        if not candidate.conditional or conditions_hold(candidate, method, query) then
            rule = candidate
            break
        end
    end
    local answer = rule.answer
    if answer == nil then
        answer = rule.class .. " " .. rule.name .. " " .. routing.version
        rule.answer = answer
    end
    local source = key_source(rule.kind, path, query, auth, src)
    if source == nil then
        return answer
    end
    local key = routing.keys.entries[source]
    if key == nil then
        key = remember(routing.keys, source, string.format("%08x", murmur3_32(source, routing.seed)))
    end
    return answer .. " " .. key
end

-- Internal errors are bugs, not configuration: log the first few only, and
-- never more than the error itself (no request data).
local ERRORS_LOGGED_MAX = 10
local errors_logged = 0

core.register_converters("matrix_fallback", function(input, table_path)
    local ok, answer = pcall(route, input, table_path or "")
    if ok then
        return answer
    end
    if errors_logged < ERRORS_LOGGED_MAX then
        errors_logged = errors_logged + 1
        pcall(core.log, core.err, "matrix_fallback: internal error: " .. tostring(answer))
    end
    -- Nothing is routed: HAProxy's default_backend takes the request.
    return "- fallback_error -"
end)
