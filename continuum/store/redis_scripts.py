"""Lua scripts of the Redis store: each is one atomic step inside one hash slot.

The shared helpers below are prepended to every mailbox script so that
"room", "append" and "remove" mean the same thing in the single-script
accept (standalone Redis) and in the per-recipient steps (Redis Cluster).
Mailbox keys arrive as KEYS[base+1..base+3] = log, size, ids.
"""

from __future__ import annotations

# An emptied stream is kept this long so its last id survives: a new entry in
# the same millisecond must still sort after tags a connected device has seen.
EMPTY_LOG_TTL_MS = 3_600_000

_HELPERS = f"""
local function room(log, size, bytes, max_messages, max_bytes)
  local messages = redis.call('XLEN', log)
  local total = tonumber(redis.call('GET', size) or '0')
  return messages + 1 <= max_messages and total + bytes <= max_bytes
end

local function append(log, size, ids, field, raw, sender, msg_id, kind, expires)
  local existing = redis.call('HGET', ids, field)
  if existing then return existing end  -- a retried call after a lost reply
  local id = redis.call('XADD', log, '*', 'r', raw, 's', sender, 'm', msg_id,
                        'k', kind, 'f', field)
  redis.call('PERSIST', log)
  redis.call('INCRBY', size, string.len(raw))
  redis.call('HSET', ids, field, id)
  return id
end

local function fields_of(entry)
  local out = {{}}
  for i = 1, #entry, 2 do out[entry[i]] = entry[i + 1] end
  return out
end

-- Remove stream entry `id`; returns its fields, or nil when it is already gone.
local function remove(log, size, ids, id)
  local found = redis.call('XRANGE', log, id, id)
  if #found == 0 then return nil end
  local entry = fields_of(found[1][2])
  redis.call('XDEL', log, id)
  redis.call('HDEL', ids, entry['f'])
  redis.call('DECRBY', size, string.len(entry['r']))
  if redis.call('XLEN', log) == 0 then
    redis.call('DEL', size, ids)
    redis.call('PEXPIRE', log, {EMPTY_LOG_TTL_MS})
  end
  return entry
end
"""

# KEYS: seen, expiry index, then (log, size, ids) per recipient.
# ARGV: nonce, replay_until_ms, raw, sender, msg_id, kind, expires_at_ms,
#       field, max_messages, max_bytes, then one index member per recipient.
# Returns {0} stored, {1} replay, {2, i} recipient i (1-based) is full.
ACCEPT_ALL = _HELPERS + """
local seen = redis.call('GET', KEYS[1])
if seen then
  if seen == ARGV[1] then return {0} end  -- our own earlier attempt: already stored
  return {1}
end
local count = (#KEYS - 2) / 3
local bytes = string.len(ARGV[3])
for i = 1, count do
  local b = 2 + (i - 1) * 3
  if not room(KEYS[b + 1], KEYS[b + 2], bytes, tonumber(ARGV[9]), tonumber(ARGV[10])) then
    return {2, i}
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
for i = 1, count do
  local b = 2 + (i - 1) * 3
  append(KEYS[b + 1], KEYS[b + 2], KEYS[b + 3], ARGV[8], ARGV[3], ARGV[4], ARGV[5],
         ARGV[6], ARGV[7])
  redis.call('ZADD', KEYS[2], ARGV[7], ARGV[10 + i])
end
return {0}
"""

# KEYS: log, size, ids.  ARGV: field, raw, sender, msg_id, kind, expires_at_ms,
# max_messages, max_bytes.  Returns the stream id, or false when full.
APPEND_ONE = _HELPERS + """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then
  if not room(KEYS[1], KEYS[2], string.len(ARGV[2]), tonumber(ARGV[7]), tonumber(ARGV[8])) then
    return false
  end
end
return append(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
"""

# KEYS: log, size, ids.  ARGV: field.  Returns {sender, msg_id, kind} or false.
# Whoever's call removes the entry is the one caller that gets it back.
REMOVE_BY_FIELD = _HELPERS + """
local id = redis.call('HGET', KEYS[3], ARGV[1])
if not id then return false end
local entry = remove(KEYS[1], KEYS[2], KEYS[3], id)
if not entry then
  redis.call('HDEL', KEYS[3], ARGV[1])
  return false
end
return {entry['s'], entry['m'], entry['k']}
"""

# KEYS: log, size, ids.  ARGV: tag.  Returns the entry's field, or false if gone.
ACK = _HELPERS + """
local entry = remove(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
if not entry then return false end
return entry['f']
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
