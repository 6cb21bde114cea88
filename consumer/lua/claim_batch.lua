-- Claim evaluations for delivery, so that two consumers never send the same one at once.
-- KEYS: one delivery ledger hash per request {eval_id -> "d" delivered | "x" dead-lettered | "c|owner|lease_until_ms"}
-- ARGV[1] owner   ARGV[2] now_ms   ARGV[3] lease_ms   ARGV[4] ledger retention_ms
-- then per request (per key): n, n evaluation ids
-- Returns per request a list with one of "new" (claimed by the caller) | "done" | "busy" (another
-- owner's live claim) per id.
local now = tonumber(ARGV[2])
local claim = 'c|' .. ARGV[1] .. '|' .. (now + tonumber(ARGV[3]))
local out = {}
local a = 5
for i, ledger in ipairs(KEYS) do
  local n = tonumber(ARGV[a])
  local verdicts = {}
  for j = a + 1, a + n do
    local state = redis.call('HGET', ledger, ARGV[j])
    local verdict = 'new'
    if state == 'd' or state == 'x' then
      verdict = 'done'
    elseif state then
      local owner, until_ms = string.match(state, '^c|(.*)|(%d+)$')
      if owner ~= ARGV[1] and until_ms and tonumber(until_ms) > now then verdict = 'busy' end
    end
    if verdict == 'new' then redis.call('HSET', ledger, ARGV[j], claim) end
    verdicts[#verdicts + 1] = verdict
  end
  redis.call('PEXPIRE', ledger, ARGV[4])
  out[i] = verdicts
  a = a + 1 + n
end
return out
