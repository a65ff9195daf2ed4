// The fdsets QEMU holds that no device needs any more.
//
// A device flow gives QEMU its image and medium fds in fdsets and takes them out with remove-fd.
// QEMU 7.2 closes a removed fd only while the VM runs: an unplug or a rolled back plug on a
// paused or never started domain leaves the fd listed in query-fdsets and the file open in QEMU
// until the VM next runs. Such fdsets are kept in Domain::fdsets_to_close, which GET reports and
// the record keeps, and removed again once the VM runs (RESUME), when QEMU closes them at last.
#pragma once

#include <chrono>

#include <boost/asio/awaitable.hpp>

#include "broker/core/error.hpp"
#include "broker/domain/domain.hpp"

namespace broker {

// Removes every fdset QEMU lists that no current device uses (disk image, backing file, CD
// medium, UEFI firmware) and sets `d.fdsets_to_close` to those QEMU still lists afterwards. Only for a domain no
// job is changing: inside a job, or while it is being adopted. True when fdsets_to_close changed.
boost::asio::awaitable<Result<bool>> collect_fdsets(Domain& d, std::chrono::milliseconds timeout);

// Removes again the fdsets in `d.fdsets_to_close` and drops those QEMU no longer lists. It
// touches no other fdset, so it may run beside a job. True when fdsets_to_close changed.
boost::asio::awaitable<Result<bool>> close_held_fdsets(Domain& d, std::chrono::milliseconds timeout);

}  // namespace broker
