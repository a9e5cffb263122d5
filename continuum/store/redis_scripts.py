"""Lua scripts of the Redis store: each is one atomic step inside one hash slot.

The shared helpers below are prepended to every script so that "room",
"append", "remove", "store a body", "drop a body" and "release" mean the same
thing in the single-script accept (standalone Redis) and in the per-slot
steps (Redis Cluster).  Mailbox keys arrive as log, size, ids; a sender's as
body, stored bytes; the store-wide slot's as expiry index, total bytes.

Every script is safe to run twice (redis-py retries a call whose reply was
lost): accept carries a nonce, appends and removals go by field, references
by recipient, and the store budget by the body's member in the index.
"""

from __future__ import annotations

from proto import Origin

from .base import WAKE_ENTRY_MAX_BYTES

# An emptied stream is kept this long so its last id survives: a new entry in
# the same millisecond must still sort after tags a connected device has seen.
EMPTY_LOG_TTL_MS = 3_600_000
# A body's own member in the expiry index falls due this long after its
# entries.  Normally the last entry's removal drops the body first; the member
# only matters when a relay died between removing an entry and dropping its
# reference, and then it frees the body and its budget at the latest here.
BODY_GRACE_MS = 60_000

_HELPERS = f"""
local function room(log, size, bytes, max_messages, max_bytes)
  local messages = redis.call('XLEN', log)
  local total = tonumber(redis.call('GET', size) or '0')
  return messages + 1 <= max_messages and total + bytes <= max_bytes
end

-- `raw` (the envelope) only for a message with one recipient, whose entry carries
-- it inline; otherwise nil, and the entry refers to the body.
local function append(log, size, ids, field, bytes, sender, msg_id, origin, raw)
  local existing = redis.call('HGET', ids, field)
  if existing then return existing end  -- a retried call after a lost reply
  local entry = {{'s', sender, 'm', msg_id, 'o', origin, 'f', field, 'n', bytes}}
  if raw then
    entry[11], entry[12] = 'r', raw
  end
  local id = redis.call('XADD', log, '*', unpack(entry))
  redis.call('PERSIST', log)
  redis.call('INCRBY', size, bytes)
  redis.call('HSET', ids, field, id)
  return id
end

local WAKE_ENTRY_MAX_BYTES = {WAKE_ENTRY_MAX_BYTES}

-- The id of the newest entry of `log`; of an emptied log (kept EMPTY_LOG_TTL_MS for
-- this), the id of the last entry it held; '' for a log never written (or long gone).
-- What a wake-up's entry follows (base.NewEntry).
local function newest_id(log)
  local newest = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
  if #newest > 0 then return newest[1][1] end
  if redis.call('EXISTS', log) == 0 then return '' end
  local info = redis.call('XINFO', 'STREAM', log)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then return info[i + 1] end
  end
  return ''
end

local function fields_of(entry)
  local out = {{}}
  for i = 1, #entry, 2 do out[entry[i]] = entry[i + 1] end
  return out
end

-- Entries written before bodies were shared carry the envelope inline ('r', no 'n')
-- and have no body record.
local function entry_size(entry)
  return tonumber(entry['n']) or string.len(entry['r'])
end

-- Entries written while envelopes showed their kind carry it ('k': 1 DATA, 2 RECEIPT,
-- 3 EXPIRY, 4 PEER_CHANGE) instead of the origin ('o'); only EXPIRY was a relay's notice.
local function origin_of(entry)
  if entry['o'] then return entry['o'] end
  if entry['k'] == '3' then return '{int(Origin.RELAY)}' end
  return '{int(Origin.DEVICE)}'
end

-- Remove stream entry `id`; returns its fields, or nil when it is already gone.
local function remove(log, size, ids, id)
  local found = redis.call('XRANGE', log, id, id)
  if #found == 0 then return nil end
  local entry = fields_of(found[1][2])
  redis.call('XDEL', log, id)
  redis.call('HDEL', ids, entry['f'])
  redis.call('DECRBY', size, entry_size(entry))
  if redis.call('XLEN', log) == 0 then
    redis.call('DEL', size, ids)
    redis.call('PEXPIRE', log, {EMPTY_LOG_TTL_MS})
  end
  return entry
end

-- nil if (sender, msg_id) is not remembered, else whether this very call (same
-- nonce) stored it.  Either way the key is rewritten unchanged: a write on this
-- connection, so a WAIT after the script also covers the original write.
local function remembered(seen, nonce)
  local owner = redis.call('GET', seen)
  if not owner then return nil end
  redis.call('SET', seen, owner, 'KEEPTTL')
  return owner == nonce
end

local function within(counter, bytes, max_bytes)
  return tonumber(redis.call('GET', counter) or '0') + bytes <= tonumber(max_bytes)
end

-- The body record: 'n' its size, 'r' the envelope unless its one entry carries it
-- (inline), and one field per recipient whose entry refers to it; refs is
-- recipient hex, '1', recipient hex, '1', ...
local function store_body(seen, body, stored, nonce, until_ms, raw, refs, inline)
  redis.call('SET', seen, nonce, 'PXAT', until_ms)
  local bytes = string.len(raw)
  if inline then
    redis.call('HSET', body, 'n', bytes, unpack(refs))
  else
    redis.call('HSET', body, 'n', bytes, 'r', raw, unpack(refs))
  end
  redis.call('INCRBY', stored, bytes)
end

-- Remove the body if it is still there, returning its bytes to the sender's
-- budget; its size, or false when it was already gone.
local function drop_body(body, stored)
  local bytes = tonumber(redis.call('HGET', body, 'n'))
  if not bytes then return false end
  redis.call('DEL', body)
  if redis.call('DECRBY', stored, bytes) <= 0 then redis.call('DEL', stored) end
  return bytes
end

-- One recipient is done with the body; the last one drops it (its size, else false).
local function unref(body, stored, recipient_hex)
  if redis.call('HDEL', body, recipient_hex) == 0 then return false end
  local others = redis.call('HLEN', body) - 1 - redis.call('HEXISTS', body, 'r')
  if others > 0 then return false end
  return drop_body(body, stored)
end

-- Count a body against the store's budget; index it and its entries for expiry.
local function index_body(index, total, member, bytes, expires, entry_members)
  redis.call('INCRBY', total, bytes)
  redis.call('ZADD', index, expires + {BODY_GRACE_MS}, member)
  for _, entry_member in ipairs(entry_members) do
    redis.call('ZADD', index, expires, entry_member)
  end
end

-- The body is gone: stop counting it.  Only the call that removes its member
-- releases, so a retry or a second sweeper never releases twice.
local function release(index, total, member)
  if redis.call('ZREM', index, member) == 1 then
    redis.call('DECRBY', total, tonumber(string.match(member, '^body:(%d+):')))
  end
end
"""

# Standalone Redis only: every key of the message in one script.
# KEYS: seen, body, sender's stored bytes, expiry index, total bytes, then
#       (log, size, ids) per recipient.
# ARGV: [1] nonce, [2] replay_until_ms, [3] raw, [4] sender, [5] msg_id, [6] origin,
#       [7] expires_at_ms, [8] field, [9] max_messages, [10] max_bytes,
#       [11] sender_max_bytes, [12] store_max_bytes, [13] body member, then per
#       recipient its hex, its index member and its wake channel.
# Returns {0} stored, {1} replay, {2, i} recipient i (1-based) is full,
#         {3} over the sender's budget, {4} over the store's budget.
# The wake-ups are published from here, and only for a message stored now: no round trip
# of their own, and none spurious after a refusal.  Each carries the recipient's new entry
# when the envelope is small: `<id> <previous id> <envelope>` (redis_wakeups.wake_entry).
ACCEPT_ALL = _HELPERS + """
local again = remembered(KEYS[1], ARGV[1])
if again ~= nil then
  if again then return {0} end  -- our own earlier attempt: already stored
  return {1}
end
local count = (#KEYS - 5) / 3
local bytes = string.len(ARGV[3])
for i = 1, count do
  local b = 5 + (i - 1) * 3
  if not room(KEYS[b + 1], KEYS[b + 2], bytes, tonumber(ARGV[9]), tonumber(ARGV[10])) then
    return {2, i}
  end
end
if not within(KEYS[3], bytes, ARGV[11]) then return {3} end
if not within(KEYS[5], bytes, ARGV[12]) then return {4} end
local refs, members = {}, {}
for i = 1, count do
  refs[2 * i - 1], refs[2 * i] = ARGV[11 + 3 * i], '1'
  members[i] = ARGV[12 + 3 * i]
end
local inline = count == 1
store_body(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], refs, inline)
index_body(KEYS[4], KEYS[5], ARGV[13], bytes, tonumber(ARGV[7]), members)
local wakes = {}
for i = 1, count do
  local b = 5 + (i - 1) * 3
  -- The newest id only for an entry that rides on its wake-up ('' is true in Lua).
  local previous = bytes <= WAKE_ENTRY_MAX_BYTES and newest_id(KEYS[b + 1])
  local id = append(KEYS[b + 1], KEYS[b + 2], KEYS[b + 3], ARGV[8], bytes, ARGV[4], ARGV[5],
                    ARGV[6], inline and ARGV[3] or nil)
  wakes[i] = previous and (id .. ' ' .. previous .. ' ' .. ARGV[3]) or ''
end
for i = 1, count do
  redis.call('PUBLISH', ARGV[13 + 3 * i], wakes[i])
end
return {0}
"""

# Cluster, store-wide slot, first step of accept.  KEYS: expiry index, total bytes.
# ARGV: body member, bytes, store_max_bytes, expires_at_ms, entry members...
# Returns 1 reserved (or reserved by this call before), 0 over the store's budget.
RESERVE = _HELPERS + """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
if not within(KEYS[2], tonumber(ARGV[2]), ARGV[3]) then return 0 end
index_body(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4]), {unpack(ARGV, 5)})
return 1
"""

# Cluster, sender slot.  KEYS: seen, body, sender's stored bytes.
# ARGV: nonce, replay_until_ms, raw, sender_max_bytes, recipient hexes...
# Returns 0 stored (or stored by this call before), 1 replay, 3 over the sender's budget.
CLAIM = _HELPERS + """
local again = remembered(KEYS[1], ARGV[1])
if again ~= nil then
  if again then return 0 end
  return 1
end
if not within(KEYS[3], string.len(ARGV[3]), ARGV[4]) then return 3 end
local refs = {}
for i = 5, #ARGV do
  refs[#refs + 1] = ARGV[i]
  refs[#refs + 1] = '1'
end
store_body(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], refs, #ARGV == 5)
return 0
"""

# Cluster, sender slot: undo CLAIM.  KEYS: seen, body, sender's stored bytes.  ARGV: nonce.
UNCLAIM = _HELPERS + """
drop_body(KEYS[2], KEYS[3])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: log, size, ids.  ARGV: field, bytes, sender, msg_id, origin, max_messages,
# max_bytes, and the envelope for a message with one recipient (inline).
# Returns the stream id, or false when full.
APPEND_ONE = _HELPERS + """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then
  if not room(KEYS[1], KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[6]), tonumber(ARGV[7])) then
    return false
  end
end
return append(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[8])
"""

# KEYS: log, size, ids.  ARGV: field.  Returns {sender, msg_id, origin, size} or
# false; size is false for an entry without a shared body.  Whoever's call
# removes the entry is the one caller that gets it back.
REMOVE_BY_FIELD = _HELPERS + """
local id = redis.call('HGET', KEYS[3], ARGV[1])
if not id then return false end
local entry = remove(KEYS[1], KEYS[2], KEYS[3], id)
if not entry then
  redis.call('HDEL', KEYS[3], ARGV[1])
  return false
end
return {entry['s'], entry['m'], origin_of(entry), entry['n'] or false}
"""

# KEYS: log, size, ids.  ARGV: tag.  Returns {field, size} (size false for an
# entry without a shared body), or false if the entry is gone.
ACK = _HELPERS + """
local entry = remove(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
if not entry then return false end
return {entry['f'], entry['n'] or false}
"""

# Standalone Redis only: ACK, then UNREF and FORGET of the entry, in one step (one round
# trip per ACK).  The body's keys follow from the entry's field (redis_keys.KeySpace.body
# and .stored, rebuilt here from the prefix), so they are not declared: a cluster would
# refuse that, and runs ACK, UNREF and FORGET each in its slot.
# KEYS: log, size, ids, expiry index, total bytes.  ARGV: tag, recipient hex, key prefix.
# Returns 1 if this removed the entry, 0 if it was gone already (acked or expired).
ACK_ALL = _HELPERS + """
local entry = remove(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
if not entry then return 0 end
local field = entry['f']
redis.call('ZREM', KEYS[4], ARGV[2] .. ':' .. field)
if entry['n'] then
  local sender_hex, rest = string.match(field, '^([^:]*):(.*)$')
  local body = ARGV[3] .. 'body:{' .. sender_hex .. '}:' .. rest
  local stored = ARGV[3] .. 'stored:{' .. sender_hex .. '}'
  if unref(body, stored, ARGV[2]) then
    release(KEYS[4], KEYS[5], 'body:' .. entry['n'] .. ':' .. field)
  end
end
return 1
"""

# Sender slot.  KEYS: body, sender's stored bytes.  ARGV: recipient hex.
# Returns the body's size if this dropped it, else false.
UNREF = _HELPERS + """
return unref(KEYS[1], KEYS[2], ARGV[1])
"""

# Sender slot.  KEYS: body, sender's stored bytes.  Drops what is left of a body
# whose index member fell due; returns its size or false.
DROP_BODY = _HELPERS + """
return drop_body(KEYS[1], KEYS[2])
"""

# Store-wide slot.  KEYS: expiry index, total bytes.  ARGV: n, then n entry
# members to unindex, then the members of bodies that are gone, to release.
FORGET = _HELPERS + """
local n = tonumber(ARGV[1])
if n > 0 then redis.call('ZREM', KEYS[1], unpack(ARGV, 2, n + 1)) end
for i = n + 2, #ARGV do release(KEYS[1], KEYS[2], ARGV[i]) end
return 0
"""

# KEYS: expiry index.  ARGV: now_ms, limit, lease_until_ms.
# Due members are pushed to the lease time rather than removed, so a replica
# that dies holding them leaves them due again instead of lost.
CLAIM_DUE = """
local due = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[3], member)
end
return due
"""

# KEYS: bucket.  ARGV: now_ms, rate_per_s, burst.  Returns 1 allowed, 0 refused.
TAKE_TOKEN = """
local now, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 't', 'l')
local tokens = tonumber(state[1]) or burst
local last = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate / 1000.0)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 't', string.format('%.6f', tokens),
           'l', string.format('%d', math.max(now, last)))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return allowed
"""

# KEYS: the access-list floor.  ARGV: a stamp as `floor_text` spells it (fixed width, so
# a greater string is a greater stamp).  Keeps the greater of the two; returns it.
RAISE_FLOOR = """
local held = redis.call('GET', KEYS[1])
if held and held >= ARGV[1] then return held end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""
