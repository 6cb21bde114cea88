--[[
  Not a script: the argument reader of the batch scripts (put_batch, claim_batch, settle_batch),
  pasted in place of their include line when the store loads them (store_redis._script).

  arg_reader(start) reads ARGV in order, from ARGV[start], and returns two closures:
    next_arg()   the next value
    next_list()  a counted list: the next value is its length n, then come its n values
  so a script reads its per-item inputs by name, in the order its header lists them, and counts no offsets.
]]
local function arg_reader(start)
  local at = start - 1
  local function next_arg()
    at = at + 1
    return ARGV[at]
  end
  local function next_list()
    local values = {}
    for i = 1, tonumber(next_arg()) do values[i] = next_arg() end
    return values
  end
  return next_arg, next_list
end
