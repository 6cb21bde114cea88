--[[
  Take one side whose deadline passed out of the join, keeping a copy until its report is published.

  Input:
    KEYS[1] span       string "<joined 0|1><identity>\n<body>" (put_batch.lua)
    KEYS[2] pending    hash event_id -> record: results waiting for the span
    KEYS[3] expiring   hash "s" | "r:<event_id>" -> copy: sides being reported
    ARGV[1] kind       "s" for the span, "r" for a result
    ARGV[2] event_id   the result's event id (kind "r" only)

  Output:
    {"report", copy}   publish it, then RedisJoinStore.forget drops the copy (until then every call
                       returns the same copy); a span's copy is "<identity>\n<body>"
    {"dropped"}        a span that a result joined: nothing to report
    {"busy"}           a result whose span is here: its delivery is under way
    {"gone"}           nothing is stored
]]
local span, pending, expiring = KEYS[1], KEYS[2], KEYS[3]
local kind, event_id = ARGV[1], ARGV[2]

if kind == 's' then
  local copy = redis.call('HGET', expiring, 's')
  if copy then return {'report', copy} end
  local stored = redis.call('GET', span)
  if not stored then return {'gone'} end
  redis.call('DEL', span)
  if string.sub(stored, 1, 1) == '1' then return {'dropped'} end
  copy = string.sub(stored, 2)
  redis.call('HSET', expiring, 's', copy)
  return {'report', copy}
end
local field = 'r:' .. event_id
local copy = redis.call('HGET', expiring, field)
if copy then return {'report', copy} end
local record = redis.call('HGET', pending, event_id)
if not record then return {'gone'} end
if redis.call('EXISTS', span) == 1 then return {'busy'} end
redis.call('HDEL', pending, event_id)
redis.call('HSET', expiring, field, record)
return {'report', record}
