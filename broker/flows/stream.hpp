// What save and restore share (private to broker/flows): the save root, and following QEMU's
// migration while the broker's copy runs, publishing the job's progress.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/json/value.hpp>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "broker/core/error.hpp"
#include "broker/flows/flows.hpp"
#include "broker/flows/save_file.hpp"
#include "fdpass/unique_fd.hpp"
#include "qmp/commands.hpp"

namespace broker::flows::detail {

// The fd name the migration stream's pipe end has inside QEMU.
inline constexpr std::string_view kStreamFd = "qb-migrate";

// A save target: the directory that will hold the file (opened beneath the save root, no link
// followed), the file's name in it and the temp name written first.
struct SaveTarget {
  fdpass::UniqueFd dir;
  std::string name;
  std::string temp;
};
Result<SaveTarget> open_target(const std::string& save_root, const std::string& path,
                               const std::string& domain);

// What the job is, for its progress events.
struct Follow {
  std::string job;          // "save", "restore"
  bool outgoing = true;     // QEMU sends (save): a cancel or a failed copy is a migrate_cancel
  std::uint64_t total = 0;  // bytes expected; 0: QEMU's estimate
};

// Publishes a "job" "progress" event: `bytes` of `what.total` (or of QEMU's RAM estimate), the
// rate since the job began `took` ago, QEMU's migration status as the phase.
void publish_progress(Context& ctx, const Domain& d, const Follow& what, std::uint64_t bytes,
                      const qmp::reply::MigrationInfo& info,
                      std::chrono::steady_clock::duration took);

// Waits for the copy and QEMU's side of the migration to end, polling query-migrate every
// timeouts.migrate_poll and publishing "job" "progress" events (bytes, total, rate, phase). A
// cancel, or a copy that fails while QEMU sends, cancels QEMU's migration (incoming: stops the
// copy). Returns QEMU's last migration state; errors only when QEMU cannot be asked.
boost::asio::awaitable<Result<qmp::reply::MigrationInfo>> follow(
    Context& ctx, Domain& d, save_file::StreamCopy& copy,
    std::shared_ptr<boost::asio::steady_timer> wake, Follow what, CancelFlag cancel);

// Every device of `saved` plugged into `d` (paused, before any migrate-incoming) where it was:
// root-port devices in port order, each on its old port, then on the SCSI bus the CD drives and
// SCSI disks (each in id order, as a create plugs them); then each disk's identity compared with
// the saved one (identity_changed), except for the disks named in `fresh` (copy_storage: the
// destination's own images).
boost::asio::awaitable<Result<void>> replug(Context& ctx, Domain& d, const Domain& saved,
                                            const std::vector<std::string>& fresh = {});

// The domain as a save file's header or a migration keeps it: its spec and devices with their
// paths and identities, not the instance that ran it.
boost::json::value saved_domain(const Domain& d);

// Every disk and medium of `saved` opened again as hotplug opens it; identity_changed when one is
// no longer the object it was, naming the field (disks.ID, cdroms.ID). The disks named in
// `fresh` are left to the plug.
Result<void> check_identities(Context& ctx, const Domain& saved,
                              const std::vector<std::string>& fresh = {});

// True while QEMU's migration status says it still runs.
bool migration_busy(const std::string& status);

// Follows an outgoing migration until it ends, polling query-migrate and publishing the job's
// progress; a cancel is a migrate_cancel. Returns QEMU's last migration state. With `mirrors`
// (disk ids, copy_storage), a migration paused in "pre-switchover" has its mirrors brought level
// and closed (finish_mirrors) before it is let go on; one that fails cancels the migration.
boost::asio::awaitable<Result<qmp::reply::MigrationInfo>> follow_live(
    Context& ctx, Domain& d, std::string job, CancelFlag cancel,
    const std::vector<std::string>& mirrors = {});

// cont, when the guest is not running (QEMU leaves it stopped after a completed migration).
boost::asio::awaitable<Result<void>> ensure_running(Context& ctx, Domain& d);

// An errno as an Error with `what` as its context, blaming `field` when set.
Error errno_error(int e, const std::string& what, std::string_view field = {});

// errc::cancelled for a job stopped by a cancel.
Error cancelled(const std::string& what);

}  // namespace broker::flows::detail
