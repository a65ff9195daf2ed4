// qbrokerctl top: a live table of the domains (state, uid, CPU and memory from each domain's
// cgroup, the running job and its progress), refreshed every --interval seconds from
// GET /v1/domains?usage=true. On a terminal each refresh redraws the screen (ANSI home and clear)
// and `q` or Ctrl-C quits; when stdout is not a terminal each refresh is printed after the last,
// so `qbrokerctl top --count 1 > file` records one table.
#pragma once

#include <boost/json/value.hpp>
#include <chrono>
#include <cstdint>
#include <map>
#include <string>

#include "ctl/cli.hpp"

namespace qbctl {

// The CPU time of each domain at one refresh, to turn the next one's into a percentage.
using CpuTimes = std::map<std::string, std::uint64_t>;

// The table for one reply of GET /v1/domains?usage=true. CPU% is the CPU time used since
// `before` over `elapsed`, "-" for a domain not in `before` (or elapsed zero). Fills `now`.
std::string top_table(const boost::json::value& body, const CpuTimes& before,
                      std::chrono::microseconds elapsed, CpuTimes& now);

// Runs the view until `q`, Ctrl-C, --count refreshes, or a failed request; the exit status.
int top(const GlobalOptions& g, const Invocation& inv);

}  // namespace qbctl
