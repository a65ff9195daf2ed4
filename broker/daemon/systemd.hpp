// The two systemd protocols qbrokerd speaks, both optional: socket activation (sd_listen_fds:
// systemd binds /run/qbroker/qbroker.sock and passes it as fd 3) and readiness (sd_notify
// READY=1 once the state is recovered and the socket is served). Without systemd, neither
// variable is set and both calls do nothing.
#pragma once

#include <string_view>

#include "broker/core/error.hpp"
#include "fdpass/unique_fd.hpp"

namespace broker::daemon {

// The listening Unix stream socket systemd passed, an empty fd when none was passed, or an
// error when what was passed is not one listening Unix stream socket.
Result<fdpass::UniqueFd> socket_from_systemd();

// sd_notify(0, state); false when there is no notification socket.
bool notify(std::string_view state);

}  // namespace broker::daemon
