--[[
  Take one side whose deadline passed out of the join, keeping a copy until its report is published.

  Input:
    KEYS[1] span       string "<0|1><identity>\n<body>" or "b<book>\30<identity>\n<body>" (put_batch.lua)
    KEYS[2] pending    hash event_id -> record (with its slots first, without a run): results waiting
                       for a span, or taken by one and not delivered yet
    KEYS[3] expiring   hash "s" | "r:<event_id>" -> copy: sides being reported
    KEYS[4] replaced   string, as span: the span the current one replaced (put_batch.lua)
    KEYS[5] usage      the usage hash of the side's ml_app (lua/usage.lua): a side taken out no longer counts
    ARGV[1] kind       "s" for the span, "r" for a result
    ARGV[2] event_id   the result's event id (kind "r" only)

  Output:
    {"report", copy}   publish it, then RedisJoinStore.forget drops the copy (until then every call
                       returns the same copy); a span's copy is "<identity>\n<body>", a result's its record
    {"dropped"}        a span that a result joined: nothing to report
    {"busy"}           a result a span here took: its delivery is under way
    {"gone"}           nothing is stored
]]
local span, pending, expiring, replaced, usage = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local kind, event_id = ARGV[1], ARGV[2]
--- @include "book"
--- @include "usage"
local app = app_of(span)

if kind == 's' then
  local copy = redis.call('HGET', expiring, 's')
  if copy then return {'report', copy} end
  local stored = redis.call('GET', span)
  if not stored then return {'gone'} end
  local old_size = redis.call('STRLEN', replaced)
  account(app, old_size > 0 and -2 or -1, -#stored - old_size)
  flush(usage)
  redis.call('DEL', span, replaced)
  if string.sub(stored, 1, 1) ~= '0' then return {'dropped'} end
  copy = string.sub(stored, 2)
  redis.call('HSET', expiring, 's', copy)
  return {'report', copy}
end
local field = 'r:' .. event_id
local copy = redis.call('HGET', expiring, field)
if copy then return {'report', copy} end
local value = redis.call('HGET', pending, event_id)
if not value then return {'gone'} end
local slots, record = parse_pending(value)
local stored = redis.call('GET', span)
if stored then
  -- Without slots (a run names the answer), the span here took it. With slots, only if a book says so:
  -- else it waits for the key's next answer, which has not come.
  if not slots then return {'busy'} end
  local _, book = parse_span(stored)
  local ev = digest(event_id)
  if took(book, ev) then return {'busy'} end
  local old = redis.call('GET', replaced)
  if old then
    local _, old_book = parse_span(old)
    if took(old_book, ev) then return {'busy'} end
  end
end
redis.call('HDEL', pending, event_id)
account(app, -1, -#value)
flush(usage)
redis.call('HSET', expiring, field, record)
return {'report', record}
