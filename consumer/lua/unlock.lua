--[[
  Release a lock only if the caller still holds it.

  Input:
    KEYS[1] lock    a sweeper lock: string, its holder's token
    ARGV[1] token   the caller's token

  Output: 1 if the lock was released, else 0.
]]
local lock = KEYS[1]
local token = ARGV[1]

if redis.call('GET', lock) == token then return redis.call('DEL', lock) end
return 0
