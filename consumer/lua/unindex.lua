--[[
  Remove a deadline entry only if nobody moved it since it was read (a redelivered side may have
  pushed it later).

  Input:
    KEYS[1] index        a deadline index shard: sorted set member -> deadline_ms
    ARGV[1] member
    ARGV[2] deadline_ms  the entry's score when it was read

  Output: 1 if the entry was removed, else 0.
]]
local index = KEYS[1]
local member, deadline_ms = ARGV[1], ARGV[2]

local score = redis.call('ZSCORE', index, member)
if score and tonumber(score) == tonumber(deadline_ms) then
  return redis.call('ZREM', index, member)
end
return 0
