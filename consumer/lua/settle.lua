-- Record evaluations as finished and drop the pending results that are now delivered in full.
-- KEYS[1] delivery ledger   KEYS[2] pending results hash
-- ARGV[1] "d" delivered | "x" dead-lettered   ARGV[2] retention_ms   ARGV[3] number of eval ids n
-- ARGV[4 .. 3+n] eval ids   ARGV[4+n ..] event ids to drop from the pending hash
local n = tonumber(ARGV[3])
for i = 4, 3 + n do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[1])
end
if n > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
for i = 4 + n, #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
end
return n
