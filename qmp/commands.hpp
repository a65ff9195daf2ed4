// Typed QMP commands, reply decoders and event matchers: the only place that spells QMP names.
//
// Builders return a Command value: the name, the arguments, and whether the command consumes an
// fd sent with it (add-fd, getfd). Client::execute() refuses an fd-consuming command and
// Client::execute_with_fd() refuses any other, so an fd is never left pending inside QEMU.
//
// Nothing here takes a host path. Block nodes and media name an fdset (`/dev/fdset/N` is built
// here from the number), migration names an fd passed with getfd, VNC names a passed socket.
#pragma once

#include <boost/json/object.hpp>
#include <boost/json/value.hpp>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "qmp/error.hpp"
#include "qmp/wire.hpp"

namespace qmp {

struct Command {
  std::string name;
  boost::json::object args;
  bool takes_fd = false;  // QEMU consumes an fd sent in the same sendmsg
};

namespace cmd {

// Session and run state.
Command qmp_capabilities();
Command cont();
Command stop();
Command system_powerdown();
Command system_reset();
Command quit();

// Queries.
Command query_version();
Command query_qmp_schema();
Command query_commands();
Command query_command_line_options(std::string_view option);
Command query_status();
Command query_block();
Command query_vnc();
Command query_fdsets();
Command query_migrate();
Command qom_list(std::string_view path);

// File descriptors. add-fd and getfd must go through Client::execute_with_fd().
Command add_fd(std::optional<std::int64_t> fdset_id = std::nullopt,
               std::optional<std::string> opaque = std::nullopt);
Command remove_fd(std::int64_t fdset_id, std::optional<std::int64_t> fd = std::nullopt);
Command getfd(std::string_view fdname);
Command closefd(std::string_view fdname);
std::string fdset_path(std::int64_t fdset_id);  // "/dev/fdset/N"

// Block nodes. A file node reads an fdset; format nodes sit on a file node. qcow2 always names
// its backing explicitly (a node, or null for none) so QEMU never opens a backing path itself.
enum class Aio { threads, native, io_uring };
struct FileNode {
  std::string node_name;
  std::int64_t fdset_id = -1;
  bool read_only = false;
  bool cache_direct = false;  // O_DIRECT: the fdset's fd must be opened O_DIRECT on QEMU 9.1+
  std::optional<Aio> aio;     // native needs cache_direct
};
struct RawNode {
  std::string node_name;
  std::string file;  // node name of the file node
  bool read_only = false;
};
struct Qcow2Node {
  std::string node_name;
  std::string file;                    // node name of the file node
  std::optional<std::string> backing;  // a node name, or nullopt for "no backing file" (null)
  bool read_only = false;
};
// A host block device read through an fdset (driver host_device: "file" refuses block devices).
struct HostDeviceNode {
  std::string node_name;
  std::int64_t fdset_id = -1;
  bool read_only = false;
};
Command blockdev_add(const FileNode& node);
Command blockdev_add(const HostDeviceNode& node);
Command blockdev_add(const RawNode& node);
Command blockdev_add(const Qcow2Node& node);
Command blockdev_del(std::string_view node_name);

// Storage migration. The destination's NBD server listens on a socket the broker made and passed
// with getfd, and exports the format nodes of its disks; the source mirrors each disk into an NBD
// client node over a connected socket passed the same way. Neither QEMU opens a path.
Command nbd_server_start_fd(std::string_view fdname, std::uint32_t max_connections);
Command nbd_server_stop();
Command block_export_add_nbd(std::string_view id, std::string_view node_name,
                             std::string_view export_name);
struct NbdNode {
  std::string node_name;
  std::string fdname;  // a connected socket, passed with getfd
  std::string export_name;
};
Command blockdev_add(const NbdNode& node);
// A full copy of `device` into the node `target`; the job stays after it ends (auto-dismiss off)
// so that its error can be read, and goes with job_dismiss.
Command blockdev_mirror(std::string_view job_id, std::string_view device, std::string_view target);
// force false on a ready mirror: the target is brought level with the source, then the job ends.
Command block_job_cancel(std::string_view job_id, bool force);
Command job_dismiss(std::string_view job_id);
Command query_block_jobs();
// Lets a migration paused in "pre-switchover" (capability pause_before_switchover) complete.
Command migrate_continue_pre_switchover();

// Removable media (CD-ROM); `id` is the qdev id of the drive device.
enum class ReadOnlyMode { retain, read_only, read_write };
struct ChangeMedium {
  std::string id;
  std::int64_t fdset_id = -1;
  std::string format = "raw";
  std::optional<ReadOnlyMode> read_only_mode;
  std::optional<bool> force;
  // The protocol driver under the format node. Empty leaves it to QEMU, which picks `file` for
  // /dev/fdset/N; a block device needs `host_cdrom` (or `host_device`), which the command can
  // only name through a json: filename (QEMU still reports the plain /dev/fdset/N as the file).
  std::string protocol;
};
Command blockdev_change_medium(const ChangeMedium& m);
Command blockdev_remove_medium(std::string_view id);
Command blockdev_open_tray(std::string_view id, std::optional<bool> force = std::nullopt);
Command blockdev_close_tray(std::string_view id);
Command eject(std::string_view id, std::optional<bool> force = std::nullopt);

// Devices. The typed helpers cover the devices the flows use; Device is the general form.
struct Device {
  std::string driver;
  std::string id;
  std::optional<std::string> bus;
  boost::json::object props;
};
Device scsi_hd(std::string id, std::string drive, std::optional<std::string> bus = std::nullopt);
Device scsi_cd(std::string id, std::optional<std::string> drive = std::nullopt,
               std::optional<std::string> bus = std::nullopt);
Device virtio_scsi_pci(std::string id, std::optional<std::string> bus = std::nullopt);
Device virtio_blk_pci(std::string id, std::string drive,
                      std::optional<std::string> bus = std::nullopt);
// romfile is set to "" because a jailed QEMU has no option ROM files.
Device virtio_net_pci(std::string id, std::string netdev, std::optional<std::string> mac,
                      std::optional<std::string> bus = std::nullopt);
Command device_add(const Device& d);
Command device_del(std::string_view id);

// Network: a tap passed with getfd under `fdname`.
Command netdev_add_tap(std::string_view id, std::string_view fdname);
Command netdev_del(std::string_view id);

// Display: a listening socket passed with getfd (display-update, QEMU 7.1+), or one connected
// client passed with getfd (add_client).
Command display_update_vnc_fd(std::string_view fdname);
// display-update with no addresses: QEMU closes its VNC listener (connected clients stay).
Command display_update_vnc_none();
enum class ClientProtocol { vnc, spice };
Command add_client(ClientProtocol protocol, std::string_view fdname, bool skipauth,
                   std::optional<bool> tls = std::nullopt);

// Migration: an fd passed with getfd ("fd:NAME"), or a file fdset ("file:/dev/fdset/N", 8.2+).
enum class MigrationCapability {
  events,
  auto_converge,
  postcopy_ram,
  return_path,
  multifd,
  xbzrle,
  pause_before_switchover,
};
Command migrate_to_fd(std::string_view fdname);
Command migrate_to_fdset_file(std::int64_t fdset_id, std::uint64_t offset = 0);
Command migrate_incoming_fd(std::string_view fdname);
Command migrate_cancel();
// migrate-set-parameters max-bandwidth: QEMU throttles a migration to 32 MiB/s unless told.
Command migrate_set_max_bandwidth(std::uint64_t bytes_per_second);
// The largest max-bandwidth (what libvirt sets for a save to a file): no throttle.
inline constexpr std::uint64_t kUnlimitedBandwidth = (INT64_MAX >> 20) << 20;
Command migrate_set_capabilities(
    const std::vector<std::pair<MigrationCapability, bool>>& capabilities);

// Administrators' passthrough. The caller decides whether to allow it; is_fd_command() names the
// commands that move fds and must never come from a user.
Command raw(std::string_view name, boost::json::object args = {});
bool is_fd_command(std::string_view name);

}  // namespace cmd

// Typed views of replies. Each fails with errc::bad_reply when the shape is not the expected one.
namespace reply {

struct AddFdInfo {
  std::int64_t fdset_id = -1;
  std::int64_t fd = -1;  // QEMU's number for the fd
};
struct StatusInfo {
  std::string status;  // "running", "paused", "prelaunch", "inmigrate", ...
  bool running = false;
};
struct FdsetFd {
  std::int64_t fd = -1;
  std::optional<std::string> opaque;
};
struct FdsetInfo {
  std::int64_t fdset_id = -1;
  std::vector<FdsetFd> fds;
};
struct BlockInfo {
  std::string device;               // legacy drive name; "" for -blockdev drives
  std::optional<std::string> qdev;  // qdev id or path of the attached device
  bool removable = false;
  std::optional<bool> tray_open;
  std::optional<std::string> node_name;  // root node of the inserted medium
  std::optional<std::string> file;       // what the inserted medium was opened as ("/dev/fdset/3")
};
struct VncInfo {
  bool enabled = false;               // a VNC server listens
  std::optional<std::string> host;    // where: an address, or the socket path for "unix"
  std::optional<std::string> service;  // the port
  std::optional<std::string> family;  // "ipv4", "ipv6", "unix"
};
struct MigrationInfo {
  std::string status;  // "none", "setup", "active", "completed", "failed", "cancelled", ...
  std::optional<std::string> error_desc;
  // From "ram" (absent before the first iteration): bytes sent, the guest's RAM size, what is
  // left of it to send, and the rate of the last iteration in Mbit/s.
  std::uint64_t transferred = 0;
  std::uint64_t total = 0;
  std::uint64_t remaining = 0;
  double mbps = 0;
};
struct ObjectProperty {
  std::string name;
  std::string type;
};

Result<AddFdInfo> add_fd(const boost::json::value& v);
Result<StatusInfo> status(const boost::json::value& v);
Result<std::vector<FdsetInfo>> fdsets(const boost::json::value& v);
Result<std::vector<BlockInfo>> block(const boost::json::value& v);
Result<MigrationInfo> migration(const boost::json::value& v);
struct BlockJobInfo {
  std::string id;      // "device" in the reply: the job id
  std::string status;  // "created", "running", "ready", "concluded", ...
  bool ready = false;
  std::uint64_t len = 0;     // bytes to copy, as QEMU last estimated them
  std::uint64_t offset = 0;  // bytes copied
  std::optional<std::string> error;
};
Result<std::vector<BlockJobInfo>> block_jobs(const boost::json::value& v);
Result<VncInfo> vnc(const boost::json::value& v);
Result<Version> version(const boost::json::value& v);
Result<std::vector<std::string>> command_names(const boost::json::value& v);
Result<std::vector<ObjectProperty>> qom_list(const boost::json::value& v);

}  // namespace reply

// Events the flows wait for, as predicates for Client::wait_for_event and subscriptions.
namespace event {

using Predicate = std::function<bool(const Event&)>;

inline constexpr std::string_view kStop = "STOP";
inline constexpr std::string_view kResume = "RESUME";
inline constexpr std::string_view kShutdown = "SHUTDOWN";
inline constexpr std::string_view kDeviceDeleted = "DEVICE_DELETED";
inline constexpr std::string_view kTrayMoved = "DEVICE_TRAY_MOVED";
inline constexpr std::string_view kMigration = "MIGRATION";

Predicate named(std::string_view name);
// DEVICE_DELETED for the device with qdev id `id`.
Predicate device_deleted(std::string id);
// DEVICE_TRAY_MOVED for qdev id `id` (matched on "id": "device" is "" for -blockdev drives).
Predicate tray_moved(std::string id, std::optional<bool> open = std::nullopt);
// MIGRATION with status `status` ("completed", "failed", ...).
Predicate migration_status(std::string status);

}  // namespace event

}  // namespace qmp
