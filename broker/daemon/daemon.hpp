// broker/daemon is qbrokerd itself: options, systemd glue, the orphan reaper and this wiring.
//
// qbrokerd's composition root: the one place that builds the objects (uid pool, reaper, cgroups,
// image roots, launcher, Broker, API service and server) and wires them together; nothing else
// constructs them and there are no globals. The configuration comes validated (options.hpp);
// run() checks only what the host must tell (users, groups, directories, the listener).
#pragma once

#include "broker/daemon/options.hpp"

namespace broker::daemon {

// Runs until SIGTERM or SIGINT. Returns the process exit status: 0 after a clean stop, 1 when
// start-up failed (the reason is logged).
int run(const DaemonConfig& config);

}  // namespace broker::daemon
