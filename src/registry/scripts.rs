//! Lua scripts: the atomic read-modify-writes of the registry.

use std::sync::LazyLock;

/// Compare-and-set on an agent record.
///
/// KEYS[1] the agent hash. ARGV[1] expected generation (`""`: any), ARGV[2]
/// expected host (`""`: any), ARGV[3] comma-separated allowed current states
/// (`""`: any), ARGV[4] the number N of fields to delete, ARGV[5..5+N] their
/// names, then field/value pairs to set.
///
/// Returns `{code, state, generation, host}` as they were before: code 1 applied,
/// 0 no such record, -1 an expectation failed (nothing written).
pub(super) static UPDATE_AGENT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
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
local ndel = tonumber(ARGV[4])
for i = 5, 4 + ndel do redis.call('HDEL', KEYS[1], ARGV[i]) end
local first = 5 + ndel
if first <= #ARGV then redis.call('HSET', KEYS[1], unpack(ARGV, first, #ARGV)) end
return {1, state, gen, host}
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
