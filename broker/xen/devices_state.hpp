// A Xen domain's device state (xen-save-devices-state / xen-load-devices-state), the part of a
// Xen save or migration that QEMU holds. QEMU never opens the file: the broker opens it, passes
// the fd in an fdset (add-fd), and names it /dev/fdset/N; the fdset is removed again whatever
// QEMU answered.
#pragma once

#include <boost/asio/awaitable.hpp>

#include "broker/core/error.hpp"
#include "fdpass/unique_fd.hpp"
#include "qmp/client.hpp"

namespace broker::xen {

// `file` open for writing; `live` as QEMU's argument (true while the guest still runs, for a
// migration's last round).
boost::asio::awaitable<Result<void>> save_devices_state(qmp::Client& qmp, fdpass::BorrowedFd file,
                                                        bool live, qmp::Deadline deadline);
// `file` open for reading; QEMU must be in the incoming state.
boost::asio::awaitable<Result<void>> load_devices_state(qmp::Client& qmp, fdpass::BorrowedFd file,
                                                        qmp::Deadline deadline);

}  // namespace broker::xen
