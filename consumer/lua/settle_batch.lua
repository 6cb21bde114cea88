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
--- @include "fields"
local usage = KEYS[#KEYS]

local out = {}
for base = 1, #KEYS - 1, 2 do
  local ledger, pending = KEYS[base], KEYS[base + 1]
  local delivered = next_list()
  local dead_lettered = next_list()
  local drop_event_ids = next_list()
  local states = {}
  for _, eval_id in ipairs(delivered) do
    states[#states + 1] = eval_id
    states[#states + 1] = 'd'
  end
  for _, eval_id in ipairs(dead_lettered) do
    states[#states + 1] = eval_id
    states[#states + 1] = 'x'
  end
  hset_all(ledger, states)  -- in that order: an id in both lists ends "x", as with one HSET each
  local recorded = #delivered + #dead_lettered
  if recorded > 0 then redis.call('PEXPIRE', ledger, retention_ms) end
  if #drop_event_ids > 0 then
    local app = app_of(pending)
    local dropped, seen = {}, {}
    for j, value in ipairs(hmget_all(pending, drop_event_ids)) do
      local event_id = drop_event_ids[j]
      if value and not seen[event_id] then  -- an id listed twice is dropped, and counted, once
        seen[event_id] = true
        dropped[#dropped + 1] = event_id
        account(app, -1, -#value)
      end
    end
    hdel_all(pending, dropped)
  end
  out[#out + 1] = recorded
end
flush(usage)
return out
