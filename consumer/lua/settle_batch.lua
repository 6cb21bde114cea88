--[[
  Record evaluations as finished and drop the pending results that are now delivered in full.

  Input:
    KEYS, two per request: its delivery ledger (claim_batch.lua), its pending results hash;
      then one more, last: the usage hash of the requests' ml_apps (lua/usage.lua)
    ARGV[1] retention_ms   how long a ledger is kept after its last claim or settle
    then per request, read by arg_reader, three counted lists:
      delivered        evaluation ids the intake accepted: recorded "d"
      dead_lettered    evaluation ids the dead-letter topic acknowledged: recorded "x"
      drop_event_ids   results to drop from the pending hash
    recorded in that order, so a result is dropped only with, or after, its last evaluation's record

  Output, per request: the number of evaluations recorded.
]]
local retention_ms = ARGV[1]
--- @include "arg_reader"
local _, next_list = arg_reader(2)
--- @include "usage"
local usage = KEYS[#KEYS]

local out = {}
for base = 1, #KEYS - 1, 2 do
  local ledger, pending = KEYS[base], KEYS[base + 1]
  local delivered = next_list()
  local dead_lettered = next_list()
  local drop_event_ids = next_list()
  for _, eval_id in ipairs(delivered) do redis.call('HSET', ledger, eval_id, 'd') end
  for _, eval_id in ipairs(dead_lettered) do redis.call('HSET', ledger, eval_id, 'x') end
  local recorded = #delivered + #dead_lettered
  if recorded > 0 then redis.call('PEXPIRE', ledger, retention_ms) end
  local app = app_of(pending)
  for _, event_id in ipairs(drop_event_ids) do
    local value = redis.call('HGET', pending, event_id)
    if value then
      redis.call('HDEL', pending, event_id)
      account(app, -1, -#value)
    end
  end
  out[#out + 1] = recorded
end
flush(usage)
return out
