-- Join a result with its span, or buffer it until the span arrives.
-- KEYS[1] span string (see put_span.lua)   KEYS[2] pending results hash   KEYS[3] expiring hash   KEYS[4] delivery ledger
-- KEYS[5] (optional) the deadline index: when given, a buffered result is indexed here, atomically;
--         on a Redis Cluster it lives in another slot, and the caller indexes afterwards.
-- ARGV[1] event_id   ARGV[2] result record   ARGV[3] deadline ms   ARGV[4] index member
-- ARGV[5..] the result's evaluation ids
-- Returns {"joined", "<span identity>\n<span body>"} | {"buffered"} | {"duplicate"}.
local function indexed(status)
  -- GT: a redelivered side never pulls a deadline earlier; a republished one may push it later.
  if KEYS[5] then redis.call('ZADD', KEYS[5], 'GT', ARGV[3], ARGV[4]) end
  return {status}
end
local span = redis.call('GET', KEYS[1])
if span then
  if string.sub(span, 1, 1) ~= '1' then redis.call('SETRANGE', KEYS[1], 0, '1') end
  return {'joined', string.sub(span, 2)}
end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 or redis.call('HEXISTS', KEYS[3], 'r:' .. ARGV[1]) == 1 then
  return indexed('duplicate')
end
-- Already delivered (or dead-lettered) in full, e.g. redelivered after its span expired: nothing to do.
if #ARGV > 4 then
  local settled = true
  for i = 5, #ARGV do
    local state = redis.call('HGET', KEYS[4], ARGV[i])
    if not state or (state ~= 'd' and state ~= 'x') then settled = false break end
  end
  if settled then return indexed('duplicate') end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return indexed('buffered')
