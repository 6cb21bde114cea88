--[[
  Not a script: what each ml_app holds in the buffer, and its quota (put_batch, settle_batch, expire_side),
  pasted in place of their include line when the store loads them (store_redis._script).

  The usage hash (a single Redis: one for the whole buffer; a Redis Cluster: one per hash slot, in the
  slot of the keys it counts, so that the scripts keep it exact) holds per ml_app (as in the key's tag,
  percent-encoded):
    "s:<app>"  sides: spans (current and replaced) and results in pending hashes
    "b:<app>"  the bytes of their values
  A script adds up its changes per app with account() and writes them once, at the end, with flush().
  A count that would fall below zero (sides stored before the service counted them, then dropped) is
  cleared instead, so it never counts more than is stored.

    app_of(key)                    the ml_app part of a key's hash tag
    account(app, sides, bytes)     count a change
    used(usage, app)               sides and bytes the app holds, with this script's changes so far (the hash
                                   is read once per app and script)
    flush(usage)                   write the changes
]]
local usage_delta = {}

local function app_of(key)
  return string.match(key, '{([^:}]*)')
end

local function account(app, sides, bytes)
  local d = usage_delta[app]
  if not d then
    d = {0, 0}
    usage_delta[app] = d
  end
  d[1] = d[1] + sides
  d[2] = d[2] + bytes
end

local usage_read = {}  -- app -> {sides, bytes} as the hash held them when this script first asked

local function used(usage, app)
  local stored = usage_read[app]
  if not stored then
    local read = redis.call('HMGET', usage, 's:' .. app, 'b:' .. app)
    stored = {tonumber(read[1]) or 0, tonumber(read[2]) or 0}
    usage_read[app] = stored
  end
  local d = usage_delta[app] or {0, 0}
  return stored[1] + d[1], stored[2] + d[2]
end

local function flush(usage)
  for app, d in pairs(usage_delta) do
    if d[1] ~= 0 or d[2] ~= 0 then
      local sides = redis.call('HINCRBY', usage, 's:' .. app, d[1])
      local bytes = redis.call('HINCRBY', usage, 'b:' .. app, d[2])
      if sides <= 0 then
        redis.call('HDEL', usage, 's:' .. app, 'b:' .. app)
      elseif bytes < 0 then
        redis.call('HSET', usage, 'b:' .. app, 0)
      end
    end
  end
end
