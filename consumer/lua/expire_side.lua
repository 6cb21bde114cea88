-- Take one side whose deadline passed out of the join, keeping a copy until its report is published.
-- KEYS[1] span string (see put_span.lua)   KEYS[2] pending results hash   KEYS[3] expiring hash
-- ARGV[1] "s" for the span, or "r" with ARGV[2] the event id of a result
-- Returns {"report", body} (publish it, then call forget_expired; a span's is "<identity>\n<body>"),
-- {"dropped"} (a span that was joined: nothing to report), {"busy"} (a result whose span is here: its delivery is under way),
-- or {"gone"}.
if ARGV[1] == 's' then
  local expiring = redis.call('HGET', KEYS[3], 's')
  if expiring then return {'report', expiring} end
  local stored = redis.call('GET', KEYS[1])
  if not stored then return {'gone'} end
  redis.call('DEL', KEYS[1])
  if string.sub(stored, 1, 1) == '1' then return {'dropped'} end
  local copy = string.sub(stored, 2)
  redis.call('HSET', KEYS[3], 's', copy)
  return {'report', copy}
end
local field = 'r:' .. ARGV[2]
local expiring = redis.call('HGET', KEYS[3], field)
if expiring then return {'report', expiring} end
local body = redis.call('HGET', KEYS[2], ARGV[2])
if not body then return {'gone'} end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'busy'} end
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[3], field, body)
return {'report', body}
