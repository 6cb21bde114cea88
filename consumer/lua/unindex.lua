-- Remove a deadline entry only if nobody moved it since it was read (a redelivered side may have
-- pushed it later). KEYS[1] deadline index   ARGV[1] member   ARGV[2] the score that was read
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
