--[[
  Claim evaluations for delivery, so that two consumers never send the same one at once.

  Input:
    KEYS, one per request: its delivery ledger, hash eval_id ->
      "d" delivered | "x" dead-lettered | "c|<owner>|<lease_until_ms>" claimed
    ARGV[1] owner          the claiming consumer
    ARGV[2] now_ms
    ARGV[3] lease_ms       how long a claim holds off other owners
    ARGV[4] retention_ms   how long a ledger is kept after its last claim or settle
    then per request, read by arg_reader: eval_ids (a counted list)

  Output, per request, one verdict per evaluation id:
    "new"   claimed by the caller now (also when it held the claim already): it may send it
    "done"  delivered or dead-lettered already
    "busy"  another owner's claim is live
]]
local owner = ARGV[1]
local now_ms = tonumber(ARGV[2])
local lease_ms = tonumber(ARGV[3])
local retention_ms = ARGV[4]
--- @include "arg_reader"
local _, next_list = arg_reader(5)

local claim = 'c|' .. owner .. '|' .. (now_ms + lease_ms)
local out = {}
for i, ledger in ipairs(KEYS) do
  local verdicts = {}
  for _, eval_id in ipairs(next_list()) do
    local state = redis.call('HGET', ledger, eval_id)
    local verdict = 'new'
    if state == 'd' or state == 'x' then
      verdict = 'done'
    elseif state then
      local holder, until_ms = string.match(state, '^c|(.*)|(%d+)$')
      if holder ~= owner and until_ms and tonumber(until_ms) > now_ms then verdict = 'busy' end
    end
    if verdict == 'new' then redis.call('HSET', ledger, eval_id, claim) end
    verdicts[#verdicts + 1] = verdict
  end
  redis.call('PEXPIRE', ledger, retention_ms)
  out[i] = verdicts
end
return out
