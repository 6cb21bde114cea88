-- Join a result with its span, or buffer it until the span arrives.
-- KEYS[1] span string (see put_span.lua)   KEYS[2] pending results hash   KEYS[3] expiring hash   KEYS[4] delivery ledger
-- ARGV[1] event_id   ARGV[2] result record   ARGV[3..] the result's evaluation ids
-- Returns {"joined", "<span identity>\n<span body>"} | {"buffered"} | {"duplicate"}.
local span = redis.call('GET', KEYS[1])
if span then
  if string.sub(span, 1, 1) ~= '1' then redis.call('SETRANGE', KEYS[1], 0, '1') end
  return {'joined', string.sub(span, 2)}
end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 or redis.call('HEXISTS', KEYS[3], 'r:' .. ARGV[1]) == 1 then
  return {'duplicate'}
end
-- Already delivered (or dead-lettered) in full, e.g. redelivered after its span expired: nothing to do.
if #ARGV > 2 then
  local settled = true
  for i = 3, #ARGV do
    local state = redis.call('HGET', KEYS[4], ARGV[i])
    if not state or (state ~= 'd' and state ~= 'x') then settled = false break end
  end
  if settled then return {'duplicate'} end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {'buffered'}
