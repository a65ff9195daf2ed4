// A Xen domain's device model as libxl 4.17 records it in xenstore (docs/xen.md), and the Xen
// device nodes a jailed QEMU opens. QEMU's Xen words are the launcher's (lifecycle::XenPart).
//
// The kill uid is written before QEMU exists: a broker that dies at any point after the spawn
// leaves behind a record from which the next broker (or libxl's own reaper) kills by uid.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "broker/core/error.hpp"
#include "broker/xen/store.hpp"
#include "broker/xen/values.hpp"

namespace broker::xen {


namespace paths {
std::string domain(std::uint32_t domid);            // /local/domain/<domid>
std::string kill_uid(std::uint32_t domid);          // .../image/device-model-kill-uid
std::string dm_pid(std::uint32_t domid);            // .../image/device-model-pid
std::string dm_dir(std::uint32_t domid);            // /local/domain/0/device-model/<domid>
std::string dm_state(std::uint32_t domid);          // .../state
std::string libxl(std::uint32_t domid);             // /libxl/<domid>
std::string dm_version(std::uint32_t domid);        // /libxl/<domid>/dm-version
std::string type(std::uint32_t domid);              // /libxl/<domid>/type
}  // namespace paths

// What the broker writes before QEMU starts: the kill uid (unless the uid is shared, as libxl
// does), dm-version and type under /libxl/<domid>, and the device model's directory, which the
// guest domain may read. One transaction, retried when another writer conflicts.
struct DeviceModelRecord {
  std::uint32_t domid = 0;
  GuestType type = GuestType::hvm;
  std::optional<uid_t> kill_uid;
};
Result<void> record_device_model(Store& xs, const DeviceModelRecord& r);
// Once QEMU runs: image/device-model-pid.
Result<void> record_pid(Store& xs, std::uint32_t domid, pid_t pid);

// What an earlier broker (or libxl) recorded for `domid`. kill_uid is nullopt when none was
// written; a value that is not a decimal uid above 0 is an error, never a guess.
struct Recorded {
  std::optional<uid_t> kill_uid;
  std::optional<pid_t> pid;
  std::optional<std::string> dm_version;
};
Result<Recorded> read_record(Store& xs, std::uint32_t domid);
// The domids that have a /libxl/<domid> record.
Result<std::vector<std::uint32_t>> recorded_domids(Store& xs);
// Removes what record_device_model and record_pid wrote, once the device model is dead.
Result<void> remove_record(Store& xs, std::uint32_t domid);

// The Xen device nodes QEMU opens, by name under /dev/xen.
inline constexpr const char* kDeviceNodes[] = {"privcmd", "hypercall", "evtchn", "gntdev",
                                               "gntalloc", "xenbus"};

// Makes, in `dir`, a private copy of each node of kDeviceNodes that `host_dir` (/dev/xen) has:
// the same device number, owned by `uid`, mode 0600. The jail binds these at /dev/xen/<name>.
// QEMU opens them after it has dropped to `uid` and restricts each handle to its domid
// (-xen-domid-restrict); a node of its own lets it do so without opening the host's nodes to the
// uid, and no other domain's uid can open this copy. Returns {host copy, jail path} pairs.
Result<std::vector<std::pair<std::string, std::string>>> make_device_nodes(
    const std::string& host_dir, const std::string& dir, uid_t uid);
// Takes the copies in `dir` away from the domain uid (root's, mode 0). Call once QEMU has
// restricted its handles to its domid (it does so before it answers on QMP): QEMU keeps the
// handles it holds, and can open no new, unrestricted one. The jail's binds follow the inodes.
Result<void> seal_device_nodes(const std::string& dir);
// Removes the copies and `dir`.
void remove_device_nodes(const std::string& dir);

}  // namespace broker::xen
