--[[
  Not a script: one hash command over many fields (claim_batch, settle_batch), pasted in place of its
  include line when the store loads them (store_redis._script).

  One call per up to FIELDS_PER_CALL fields instead of one per field: each redis.call costs the script
  more than the field it reads or writes, and each write is a command of its own in the AOF. The bound
  keeps a call's arguments within what Lua's unpack can pass.

    hmget_all(key, fields)   the values of fields, in order (false where the hash has none)
    hset_all(key, flat)      HSET of a flat list field, value, field, value, ...
    hdel_all(key, fields)    HDEL of fields
]]
local FIELDS_PER_CALL = 1000

local function hmget_all(key, fields)
  local out = {}
  for i = 1, #fields, FIELDS_PER_CALL do
    local got = redis.call('HMGET', key, unpack(fields, i, math.min(i + FIELDS_PER_CALL - 1, #fields)))
    for j = 1, #got do out[#out + 1] = got[j] end
  end
  return out
end

local function hset_all(key, flat)
  for i = 1, #flat, 2 * FIELDS_PER_CALL do
    redis.call('HSET', key, unpack(flat, i, math.min(i + 2 * FIELDS_PER_CALL - 1, #flat)))
  end
end

local function hdel_all(key, fields)
  for i = 1, #fields, FIELDS_PER_CALL do
    redis.call('HDEL', key, unpack(fields, i, math.min(i + FIELDS_PER_CALL - 1, #fields)))
  end
end
