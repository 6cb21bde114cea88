-- Claim evaluations for delivery, so that two consumers never send the same one at once.
-- KEYS[1] delivery ledger hash {eval_id -> "d" delivered | "x" dead-lettered | "c|owner|lease_until_ms"}
-- ARGV[1] owner   ARGV[2] now_ms   ARGV[3] lease_ms   ARGV[4] ledger retention_ms   ARGV[5..] eval ids
-- Returns one of "new" (claimed by the caller) | "done" | "busy" (another owner's live claim) per id.
local out = {}
local lease_until = tonumber(ARGV[2]) + tonumber(ARGV[3])
for i = 5, #ARGV do
  local state = redis.call('HGET', KEYS[1], ARGV[i])
  local verdict = 'new'
  if state == 'd' or state == 'x' then
    verdict = 'done'
  elseif state then
    local owner, until_ms = string.match(state, '^c|(.*)|(%d+)$')
    if owner ~= ARGV[1] and until_ms and tonumber(until_ms) > tonumber(ARGV[2]) then verdict = 'busy' end
  end
  if verdict == 'new' then
    redis.call('HSET', KEYS[1], ARGV[i], 'c|' .. ARGV[1] .. '|' .. lease_until)
  end
  out[#out + 1] = verdict
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return out
