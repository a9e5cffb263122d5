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

-- nil if this replay key (sender, msg_id, recipient) is not remembered, else whether
-- this very call (same nonce) stored it.  Either way the key is rewritten unchanged: a write on this
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
local function store_body(body, stored, raw, refs, inline)
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

-- Standalone Redis only: remove entry `tag` and unindex it, drop its body reference and
-- release the body with its last one.  The body's keys follow from the entry's field
-- (redis_keys.KeySpace.body and .stored, rebuilt here from the prefix), so they are not
-- declared: a cluster would refuse that, and runs ACK, UNREF and FORGET each in its slot.
-- 1 if this removed the entry, 0 if it was gone already.
local function remove_all(log, size, ids, index, total, tag, recipient_hex, prefix)
  local entry = remove(log, size, ids, tag)
  if not entry then return 0 end
  local field = entry['f']
  redis.call('ZREM', index, recipient_hex .. ':' .. field)
  if entry['n'] then
    local sender_hex, rest = string.match(field, '^([^:]*):(.*)$')
    local body = prefix .. 'body:{{' .. sender_hex .. '}}:' .. rest
    local stored = prefix .. 'stored:{{' .. sender_hex .. '}}'
    if unref(body, stored, recipient_hex) then
      release(index, total, 'body:' .. entry['n'] .. ':' .. field)
    end
  end
  return 1
end

-- Whether a move of a mailbox's mail under the access list of `stamp` (floor_text) may
-- touch this store: not if a move under a newer list did.  Every step of a move (adopt
-- here, remove from here) raises the mailbox's move stamp to its own, so of two relays
-- on different lists, moving one device's mail in opposite directions, the older one
-- stops as soon as the newer one has begun (SPEC §19).  Kept until `until_ms`, the
-- latest expiry of the mail moved under it (plus a lease): after that nothing it
-- guarded is left to move.
local function may_move(moves, stamp, until_ms)
  local held = redis.call('HGET', moves, 's')
  if held and held > stamp then return false end
  local keep = math.max(tonumber(redis.call('HGET', moves, 'u') or '0'), tonumber(until_ms))
  local text = string.format('%d', keep)
  redis.call('HSET', moves, 's', stamp, 'u', text)
  redis.call('PEXPIREAT', moves, text)
  return true
end
"""

# Standalone Redis only: every key of the message in one script.
# KEYS: body, sender's stored bytes, expiry index, total bytes, then per recipient its
#       replay key (sender slot) and its mailbox (log, size, ids).
# ARGV: [1] nonce, [2] replay_until_ms, [3] raw, [4] sender, [5] msg_id, [6] origin,
#       [7] expires_at_ms, [8] field, [9] max_messages, [10] max_bytes,
#       [11] sender_max_bytes, [12] store_max_bytes, [13] body member, then per
#       recipient its hex, its index member and its wake channel.
# Returns {0} stored, {1} replay, {2, i} recipient i (1-based) is full,
#         {3} over the sender's budget, {4} over the store's budget.
# The replay check is per recipient: a recipient whose key is remembered here (its copy
# is held or was consumed here, perhaps moved in from its former home) is skipped, the
# others are stored, and the answer is REPLAY if any was skipped (the sender's retry:
# "stored").  A key holding this call's own nonce is an earlier attempt of this call.
# The wake-ups are published from here, and only for a message stored now: no round trip
# of their own, and none spurious after a refusal.  Each carries the recipient's new entry
# when the envelope is small: `<id> <previous id> <envelope>` (redis_wakeups.wake_entry).
ACCEPT_ALL = _HELPERS + """
local count = (#KEYS - 4) / 4
local fresh, replayed = {}, false
for i = 1, count do
  local again = remembered(KEYS[4 * i + 1], ARGV[1])
  if again == nil then
    fresh[#fresh + 1] = i
  elseif not again then
    replayed = true
  end
end
local answer = {replayed and 1 or 0}
if #fresh == 0 then return answer end
local bytes = string.len(ARGV[3])
for _, i in ipairs(fresh) do
  local b = 4 * i + 1
  if not room(KEYS[b + 1], KEYS[b + 2], bytes, tonumber(ARGV[9]), tonumber(ARGV[10])) then
    return {2, i}
  end
end
if not within(KEYS[2], bytes, ARGV[11]) then return {3} end
if not within(KEYS[4], bytes, ARGV[12]) then return {4} end
local refs, members = {}, {}
for n, i in ipairs(fresh) do
  redis.call('SET', KEYS[4 * i + 1], ARGV[1], 'PXAT', ARGV[2])
  refs[2 * n - 1], refs[2 * n] = ARGV[11 + 3 * i], '1'
  members[n] = ARGV[12 + 3 * i]
end
local inline = #fresh == 1
store_body(KEYS[1], KEYS[2], ARGV[3], refs, inline)
index_body(KEYS[3], KEYS[4], ARGV[13], bytes, tonumber(ARGV[7]), members)
local wakes = {}
for n, i in ipairs(fresh) do
  local b = 4 * i + 1
  -- The newest id only for an entry that rides on its wake-up ('' is true in Lua).
  local previous = bytes <= WAKE_ENTRY_MAX_BYTES and newest_id(KEYS[b + 1])
  local id = append(KEYS[b + 1], KEYS[b + 2], KEYS[b + 3], ARGV[8], bytes, ARGV[4], ARGV[5],
                    ARGV[6], inline and ARGV[3] or nil)
  wakes[n] = previous and (id .. ' ' .. previous .. ' ' .. ARGV[3]) or ''
end
for n, i in ipairs(fresh) do
  redis.call('PUBLISH', ARGV[13 + 3 * i], wakes[n])
end
return answer
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

# Cluster, sender slot, first step of accept.  KEYS: body, sender's stored bytes, then
# each recipient's replay key.  ARGV: nonce, replay_until_ms, raw, sender_max_bytes,
# recipient hexes (in the order of the replay keys).
# Returns {status, i...}: the recipients (1-based) to append to, as in ACCEPT_ALL (those
# not remembered; or, when this call ran before, those it claimed then), status 0, or 1
# when some recipient was remembered already (a replay); {3} over the sender's budget.
CLAIM = _HELPERS + """
local ours, fresh, replayed = {}, {}, false
for i = 3, #KEYS do
  local again = remembered(KEYS[i], ARGV[1])
  if again == nil then
    fresh[#fresh + 1] = i - 2
  elseif again then
    ours[#ours + 1] = i - 2
  else
    replayed = true
  end
end
local status = replayed and 1 or 0
if #ours > 0 then return {status, unpack(ours)} end  -- this call's body is stored already
if #fresh == 0 then return {status} end
if not within(KEYS[2], string.len(ARGV[3]), ARGV[4]) then return {3} end
local refs = {}
for _, i in ipairs(fresh) do
  redis.call('SET', KEYS[i + 2], ARGV[1], 'PXAT', ARGV[2])
  refs[#refs + 1] = ARGV[4 + i]
  refs[#refs + 1] = '1'
end
store_body(KEYS[1], KEYS[2], ARGV[3], refs, #fresh == 1)
return {status, unpack(fresh)}
"""

# Cluster, sender slot: undo CLAIM.  KEYS: body, sender's stored bytes, replay keys.
# ARGV: nonce.
UNCLAIM = _HELPERS + """
drop_body(KEYS[1], KEYS[2])
for i = 3, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('DEL', KEYS[i]) end
end
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
# trip per ACK); see remove_all.
# KEYS: log, size, ids, expiry index, total bytes.  ARGV: tag, recipient hex, key prefix.
# Returns 1 if this removed the entry, 0 if it was gone already (acked or expired).
ACK_ALL = _HELPERS + """
return remove_all(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[2], ARGV[3])
"""

# Recipient slot, the first step of adopting a moved copy (see may_move).
# KEYS: the mailbox's move stamp.  ARGV: stamp, until_ms.  Returns 1 go on, 0 superseded.
MOVE_STAMP = _HELPERS + """
return may_move(KEYS[1], ARGV[1], ARGV[2]) and 1 or 0
"""

# Standalone Redis only: a moved copy leaves its former home.  Unless a newer move
# touched the mailbox, entry `tag` is removed as by ACK_ALL and, if this removed it, its
# recipient's replay key goes with it: that key now means "held or consumed here", and
# this store does neither any more (the new home's adopt wrote its own).  An entry acked
# meanwhile keeps its key (consumed here).
# KEYS: log, size, ids, move stamp, expiry index, total bytes, replay key.
# ARGV: tag, recipient hex, key prefix, stamp, until_ms.
# Returns 1 removed now, 0 gone already, 2 superseded (nothing done).
MOVE_OUT_ALL = _HELPERS + """
if not may_move(KEYS[4], ARGV[4], ARGV[5]) then return 2 end
local removed = remove_all(KEYS[1], KEYS[2], KEYS[3], KEYS[5], KEYS[6], ARGV[1], ARGV[2],
                           ARGV[3])
if removed == 1 then redis.call('DEL', KEYS[7]) end
return removed
"""

# Cluster, recipient slot: MOVE_OUT_ALL's mailbox step (the replay key was dropped before,
# in the sender's slot).  KEYS: log, size, ids, move stamp.  ARGV: tag, stamp, until_ms.
# Returns {1, field, size} (size false for an entry without a shared body) if removed
# now, {0} if gone already, {2} superseded.
MOVE_OUT = _HELPERS + """
if not may_move(KEYS[4], ARGV[2], ARGV[3]) then return {2} end
local entry = remove(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
if not entry then return {0} end
return {1, entry['f'], entry['n'] or false}
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
