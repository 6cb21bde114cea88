-- Record evaluations as finished and drop the pending results that are now delivered in full.
-- KEYS per request: delivery ledger, pending results hash
-- ARGV[1] "d" delivered | "x" dead-lettered   ARGV[2] retention_ms
-- then per request: n, n evaluation ids, m, m event ids to drop from the pending hash
-- Returns per request the number of evaluations recorded.
local out = {}
local a = 3
for base = 1, #KEYS, 2 do
  local ledger, pending = KEYS[base], KEYS[base + 1]
  local n = tonumber(ARGV[a])
  for j = a + 1, a + n do redis.call('HSET', ledger, ARGV[j], ARGV[1]) end
  if n > 0 then redis.call('PEXPIRE', ledger, ARGV[2]) end
  a = a + 1 + n
  local m = tonumber(ARGV[a])
  for j = a + 1, a + m do redis.call('HDEL', pending, ARGV[j]) end
  a = a + 1 + m
  out[#out + 1] = n
end
return out
