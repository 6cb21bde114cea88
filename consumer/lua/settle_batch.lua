-- Record evaluations as finished and drop the pending results that are now delivered in full.
-- KEYS per request: delivery ledger, pending results hash
-- ARGV[1] retention_ms, then per request: n, n evaluation ids delivered, x, x evaluation ids
-- dead-lettered, m, m event ids to drop from the pending hash (recorded in that order, so a result
-- is dropped only with, or after, its last evaluation's record)
-- Returns per request the number of evaluations recorded.
local out = {}
local a = 2
for base = 1, #KEYS, 2 do
  local ledger, pending = KEYS[base], KEYS[base + 1]
  local recorded = 0
  for _, state in ipairs({'d', 'x'}) do
    local n = tonumber(ARGV[a])
    for j = a + 1, a + n do redis.call('HSET', ledger, ARGV[j], state) end
    recorded = recorded + n
    a = a + 1 + n
  end
  if recorded > 0 then redis.call('PEXPIRE', ledger, ARGV[1]) end
  local m = tonumber(ARGV[a])
  for j = a + 1, a + m do redis.call('HDEL', pending, ARGV[j]) end
  a = a + 1 + m
  out[#out + 1] = recorded
end
return out
