// How qbrokerctl shows replies to people: aligned tables and short sentences. Pure functions of
// the API's JSON, so tests compare text.
#pragma once

#include <boost/json/value.hpp>
#include <string>
#include <vector>

#include "ctl/cli.hpp"

namespace qbctl {

// Columns padded to the widest cell; the first row is the header.
std::string table(const std::vector<std::vector<std::string>>& rows);

// The text for a successful reply of `view`.
std::string render(const Invocation& inv, const boost::json::value& body);

// One event as a line: "12:00:01.234  vm1  qemu  STOP  {...}".
std::string render_event(const std::string& kind, const boost::json::value& data);

// An error reply as lines for stderr: the message, the field (and the flag it came from), the
// code and HTTP status, and QEMU's class/desc when QEMU refused.
std::string render_error(unsigned status, const boost::json::value& body);

// The exit status for an HTTP status (see qbrokerctl --help).
int exit_code(unsigned status);

// "[#########.........]  45%  waiting for the guest  3.1s" (fraction < 0: a spinner).
std::string progress_line(double fraction, const std::string& phase, double seconds, int tick);

}  // namespace qbctl
