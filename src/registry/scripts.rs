//! Lua scripts: the atomic read-modify-writes of the registry.

use std::sync::LazyLock;
use std::time::Duration;

/// How long a host's revision key lives after its last change: a host
/// whose revision expired reads its records' heads once more, so no key
/// outlives its host by more than this.
pub(super) const REVISION_TTL: Duration = Duration::from_secs(24 * 3600);

/// A script that sets host revision keys (`REVISION_TTL_MS` in its text
/// is their TTL).
fn revision_script(text: &str) -> redis::Script {
    redis::Script::new(&text.replace("REVISION_TTL_MS", &REVISION_TTL.as_millis().to_string()))
}

/// Compare-and-set on an agent record, and the event of a state change in the
/// same atomic step (so every change is in `ap:events` exactly once).
///
/// KEYS[1] the agent hash, KEYS[2] the event stream, KEYS[3] the agent's
/// location, KEYS[4] the old host's agent set and KEYS[5] the new one's
/// (when they differ, membership moves in the same step), KEYS[6..] the
/// state indexes of every state (a state change moves the id from the old
/// state's index to the new one's, in the same step). ARGV[1] expected generation (`""`: any), ARGV[2] expected
/// host (`""`: any), ARGV[3] comma-separated allowed current states (`""`:
/// any), ARGV[4] the time (ms), ARGV[5] the stream's approximate length
/// bound, ARGV[6] the event type of a state change (`""`: AGENT_STATE),
/// ARGV[7] the location's host (`""`: location untouched) and ARGV[8] its
/// TTL in ms, ARGV[9] the prefix of the shard's host revision keys and
/// ARGV[10] a fresh token: a write that makes the record stop naming its
/// host at its generation (another host or generation, or LOST) sets that
/// host's revision to the token (see [`super::keys::Keys::host_revision`]).
/// ARGV[11] the number N of fields to delete, ARGV[12..12+N] their names,
/// then field/value pairs to set.
///
/// Returns `{code, state, generation, host}` as they were before: code 1 applied,
/// 0 no such record, -1 an expectation failed (nothing written).
pub(super) static UPDATE_AGENT: LazyLock<redis::Script> = LazyLock::new(|| {
    revision_script(
        r"
local cur = redis.call('HMGET', KEYS[1], 'state', 'generation', 'host')
if not cur[1] then return {0, '', '', ''} end
local state, gen, host = cur[1], cur[2] or '', cur[3] or ''
if ARGV[1] ~= '' and ARGV[1] ~= gen then return {-1, state, gen, host} end
if ARGV[2] ~= '' and ARGV[2] ~= host then return {-1, state, gen, host} end
if ARGV[3] ~= '' then
  local ok = false
  for s in string.gmatch(ARGV[3], '[^,]+') do
    if s == state then ok = true end
  end
  if not ok then return {-1, state, gen, host} end
end
local ndel = tonumber(ARGV[11])
if ndel > 0 then redis.call('HDEL', KEYS[1], unpack(ARGV, 12, 11 + ndel)) end
local first = 12 + ndel
if first <= #ARGV then redis.call('HSET', KEYS[1], unpack(ARGV, first, #ARGV)) end
local after = redis.call('HMGET', KEYS[1], 'id', 'state', 'host', 'generation')
if KEYS[4] ~= KEYS[5] then
  redis.call('SREM', KEYS[4], after[1])
  redis.call('SADD', KEYS[5], after[1])
end
if after[2] ~= state then
  local old, new = ':' .. state, ':' .. (after[2] or '')
  for i = 6, #KEYS do
    if string.sub(KEYS[i], -#old) == old then redis.call('ZREM', KEYS[i], after[1]) end
    if string.sub(KEYS[i], -#new) == new then redis.call('ZADD', KEYS[i], 0, after[1]) end
  end
end
if ARGV[7] ~= '' then redis.call('SET', KEYS[3], ARGV[7], 'PX', ARGV[8]) end
if host ~= '' and ((after[3] or '') ~= host or (after[4] or '') ~= gen
    or (after[2] == 'LOST' and state ~= 'LOST')) then
  redis.call('SET', ARGV[9] .. host, ARGV[10], 'PX', REVISION_TTL_MS)
end
if after[2] ~= state or after[4] ~= gen then
  local ty = ARGV[6]
  if ty == '' then ty = 'AGENT_STATE' end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
    'type', ty, 'agent', after[1] or '', 'state', after[2] or '',
    'previous', state, 'host', after[3] or '', 'generation', after[4] or '', 'at', ARGV[4])
end
return {1, state, gen, host}
",
    )
});

/// Emits HOST_LOST once per disappearance: KEYS[1] the host key, KEYS[2] the
/// set of hosts known alive, KEYS[3] the stream, KEYS[4] the set of lost
/// hosts still to settle (the host joins it in the same step); ARGV[1] host
/// id, ARGV[2] time, ARGV[3] stream bound. Returns 1 if this call declared
/// the loss.
pub(super) static MARK_HOST_LOST: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SREM', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*',
  'type', 'HOST_LOST', 'host', ARGV[1], 'at', ARGV[2])
return 1
",
    )
});

/// Sets one field of a live host only: KEYS[1] the host key, ARGV[1] the
/// field, ARGV[2] its value (`""`: delete it). Returns 0 when the host is
/// not live.
pub(super) static SET_HOST_FIELD: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 1
",
    )
});

/// Leads (or keeps leading) a host's drain: KEYS[1] the drain lease, ARGV[1]
/// this leader, ARGV[2] the lease in ms. Returns 1 when ARGV[1] leads.
pub(super) static LEAD_DRAIN: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
",
    )
});

/// Deletes KEYS[1] only if its value is ARGV[1] (releasing an idempotency key
/// that points at an agent that was never created).
pub(super) static DELETE_IF_EQUAL: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// Takes over a claim whose owner is gone: KEYS[1] the claim (a request id
/// or a name), KEYS[2..] keys that must not exist (the owner's agent record
/// and claim lease, on one Redis; none on a Cluster, where they are in
/// another slot and the caller checked them just before); ARGV[1] the owner
/// read, ARGV[2] the new owner, ARGV[3] the claim's TTL in ms (`0`: none).
/// Sets the claim to the new owner only if it still names the old one and
/// none of those keys exists. Returns 1 when taken over.
pub(super) static TAKE_OVER_CLAIM: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then return 0 end
end
if ARGV[3] == '0' then
  redis.call('SET', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
",
    )
});

/// What the event stream KEYS[1] still holds, from `XINFO STREAM` (a script so
/// that a missing stream is an answer, not an error). Returns false when the
/// stream does not exist, else `{length, last-generated-id,
/// max-deleted-entry-id, entries-added, first entry id}` as strings; the third
/// and fourth are `''` on Redis before 7, the fifth when the stream is empty.
pub(super) static STREAM_BOUNDS: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local f = {}
for i = 1, #info, 2 do f[info[i]] = info[i + 1] end
local first = ''
if type(f['first-entry']) == 'table' then first = f['first-entry'][1] end
return {tostring(f['length']), f['last-generated-id'], f['max-deleted-entry-id'] or '',
  tostring(f['entries-added'] or ''), first}
",
    )
});

/// Writes a whole record back from a host agent's memory, unless the record
/// there has this generation or a newer one (after a data loss the newest
/// copy wins, whichever host writes first).
///
/// KEYS[1] the agent hash, KEYS[2] the new host's agent set, KEYS[3] the
/// location key, KEYS[4] the set of the host the record named when read
/// (may be KEYS[2]), KEYS[5] the index of all agents, KEYS[6..12] the state
/// indexes of every state, KEYS[13..] the agent's label indexes. ARGV[1] the generation, ARGV[2] the host the record
/// named when read (`""`: none), ARGV[3] the agent id, ARGV[4] the host,
/// ARGV[5] the lease TTL (ms), ARGV[6] the prefix of the shard's host
/// revision keys and ARGV[7] a fresh token (the host named before gets
/// it: its copy is no longer the record's), then field/value pairs.
///
/// Returns 1 written, 0 not (a record of this generation or newer is there,
/// or it changed hands since it was read: read again).
pub(super) static REWRITE_AGENT: LazyLock<redis::Script> = LazyLock::new(|| {
    revision_script(
        r"
local cur = redis.call('HMGET', KEYS[1], 'generation', 'host')
if cur[1] and tonumber(cur[1]) >= tonumber(ARGV[1]) then return 0 end
if (cur[2] or '') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 8, #ARGV))
if ARGV[2] ~= '' then
  redis.call('SREM', KEYS[4], ARGV[3])
  redis.call('SET', ARGV[6] .. ARGV[2], ARGV[7], 'PX', REVISION_TTL_MS)
end
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
redis.call('ZADD', KEYS[5], 0, ARGV[3])
local new = ':' .. (redis.call('HGET', KEYS[1], 'state') or '')
for i = 6, 12 do
  redis.call('ZREM', KEYS[i], ARGV[3])
  if string.sub(KEYS[i], -#new) == new then redis.call('ZADD', KEYS[i], 0, ARGV[3]) end
end
for i = 13, #KEYS do redis.call('ZADD', KEYS[i], 0, ARGV[3]) end
return 1
",
    )
});

/// Drops stale index entries: KEYS[1] an index, then pairs of (agent hash
/// key in KEYS[2i], its id in ARGV[2i-1]); ARGV[2i] the state the index
/// stands for (`""`: any). An entry goes only if its record is gone or (for
/// a state index) is in another state now, checked in the same step as
/// the removal. Returns how many went.
pub(super) static DROP_STALE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local n = 0
for i = 2, #KEYS do
  local id, want = ARGV[2 * (i - 1) - 1], ARGV[2 * (i - 1)]
  local st = redis.call('HGET', KEYS[i], 'state')
  if (not st) or (want ~= '' and st ~= want) then
    n = n + redis.call('ZREM', KEYS[1], id)
  end
end
return n
",
    )
});

/// LocateAgent's read: KEYS[1] the agent hash, KEYS[2] its location key;
/// ARGV[1] the host key prefix (`ap:host:`), to which the record's host is
/// appended (a key the script derives: with Redis Cluster this read must
/// become two). Returns `{HGETALL of the record, the lease's host or false,
/// the host's address or false}`.
pub(super) static LOCATE_AGENT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local rec = redis.call('HGETALL', KEYS[1])
local lease = redis.call('GET', KEYS[2])
local host = redis.call('HGET', KEYS[1], 'host')
local addr = false
if host and host ~= '' then addr = redis.call('HGET', ARGV[1] .. host, 'address') end
return {rec, lease, addr}
",
    )
});

/// A lost host that is back: KEYS[1] its host key, KEYS[2] the lost hosts;
/// ARGV[1] its id. Leaves the lost hosts only if its key exists now (a
/// view of it read before it expired must not take it out while another
/// replica settles it). Returns 1 when it left.
pub(super) static SETTLED_IF_BACK: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('SREM', KEYS[2], ARGV[1])
",
    )
});
