-- Take one side whose deadline passed out of the join, keeping a copy until its report is published.
-- KEYS[1] span hash   KEYS[2] pending results hash   KEYS[3] expiring hash
-- ARGV[1] "s" for the span, or "r" with ARGV[2] the event id of a result
-- Returns {"report", body} (publish it, then call forget_expired), {"dropped"} (a span that was
-- joined: nothing to report), {"busy"} (a result whose span is here: its delivery is under way),
-- or {"gone"}.
if ARGV[1] == 's' then
  local expiring = redis.call('HGET', KEYS[3], 's')
  if expiring then return {'report', expiring} end
  local id = redis.call('HGET', KEYS[1], 'id')
  if not id then return {'gone'} end
  local body = redis.call('HGET', KEYS[1], 'body')
  local joined = redis.call('HGET', KEYS[1], 'joined')
  redis.call('DEL', KEYS[1])
  if joined then return {'dropped'} end
  redis.call('HSET', KEYS[3], 's', id .. '\n' .. body)
  return {'report', id .. '\n' .. body}
end
local field = 'r:' .. ARGV[2]
local expiring = redis.call('HGET', KEYS[3], field)
if expiring then return {'report', expiring} end
local body = redis.call('HGET', KEYS[2], ARGV[2])
if not body then return {'gone'} end
if redis.call('HEXISTS', KEYS[1], 'id') == 1 then return {'busy'} end
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], field, body)
return {'report', body}
