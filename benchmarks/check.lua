-- wrk script: checks every response body against the expected bytes, counts
-- non-2xx responses and wrong bodies per thread, and prints one JSON line in done().
-- Usage: wrk ... -s check.lua URL -- EXPECTED_BODY
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  expected = args[1] or ""
  wrong = 0
  non2xx = 0
  checked = 0
  sample = ""
  sample_status = 0
end

function response(status, headers, body)
  checked = checked + 1
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    if sample == "" then sample = body or ""; sample_status = status end
  elseif body ~= expected then
    wrong = wrong + 1
    if sample == "" then sample = body or ""; sample_status = status end
  end
end

local function esc(s)
  s = string.sub(s or "", 1, 300)
  s = string.gsub(s, '[%c"\\]', function(ch)
    return string.format("\\u%04x", string.byte(ch))
  end)
  return s
end

function done(summary, latency, requests)
  local w, n, c, smp, sst = 0, 0, 0, "", 0
  for _, t in ipairs(threads) do
    w = w + t:get("wrong")
    n = n + t:get("non2xx")
    c = c + t:get("checked")
    local s = t:get("sample")
    if smp == "" and s ~= nil and s ~= "" then smp = s; sst = t:get("sample_status") end
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"checked": %d, "wrong_bodies": %d, "non2xx": %d, ' ..
    '"socket_errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"min": %d, "mean": %.1f, "max": %d, "p50": %d, "p90": %d, "p99": %d, "p999": %d}, ' ..
    '"sample_bad_status": %d, "sample_bad_body": "%s"}\n',
    summary.requests, summary.duration, summary.bytes,
    c, w, n,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    sst, esc(smp)))
end
