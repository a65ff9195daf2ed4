// Validated request values: every operation of the broker takes one of these, never raw JSON
// (style point 1). parse_*() turn a JSON body into one, naming the field that is wrong; the HTTP
// router and the CLI both use them, so the rules live in one place.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/json/object.hpp>
#include <boost/json/value.hpp>

#include "broker/core/error.hpp"
#include "broker/lifecycle/spec.hpp"

namespace broker {

enum class DiskFormat { raw, qcow2 };
enum class DiskBus { scsi, virtio };

struct CdromSpec {  // a CD drive created with the domain (empty tray unless path is set)
  std::string id;
  std::string path;  // optional initial medium
  std::optional<std::uint32_t> bootindex;  // from the domain's boot_order
};

struct DiskSpec {
  std::string id;
  std::string path;                     // image file or block device, beneath an image root
  DiskFormat format = DiskFormat::raw;
  DiskBus bus = DiskBus::scsi;
  bool read_only = false;
  std::string backing;                  // qcow2: the backing file, opened by the broker too
  std::optional<std::uint64_t> diskseq; // block devices: refuse any other disk
  std::string serial;                   // virtio: shown in /sys/block/vdX/serial
  std::optional<std::uint32_t> bootindex;  // from the domain's boot_order (create only)
};

struct NicSpec {
  std::string id;
  std::string tap;  // tap name to create or open; empty: the kernel picks one
  std::string mac;  // empty: QEMU picks one
};

// Where the broker binds a VNC listener, parsed once from the user's "127.0.0.1:5901",
// "[::1]:5901" or "unix:/path".
struct VncListen {
  std::string host;         // TCP: the address without brackets (bound numerically)
  std::uint16_t port = 0;   // TCP: 0 picks a free port
  std::string unix_path;    // set for a Unix socket, empty for TCP

  bool is_unix() const { return !unix_path.empty(); }
  // The user's form again ("[::1]:0", "unix:/run/v.sock").
  std::string text() const;
  // Errors are invalid_argument naming `field`.
  static Result<VncListen> parse(std::string_view text, std::string_view field = "listen");
};

struct VncSpec {
  VncListen listen;
};

struct CreateDomain {
  lifecycle::DomainSpec spec;
  std::vector<CdromSpec> cdroms;
  std::vector<DiskSpec> disks;
  std::vector<NicSpec> nics;
  std::optional<VncSpec> vnc;
};

struct InsertMedium {
  std::string path;
  bool force = false;  // override a guest's tray lock
};

// Progress of a long job: fraction in [0, 1] and a phase name ("copying", "waiting for guest").
using ProgressFn = std::function<void(double fraction, std::string_view phase)>;

Result<CreateDomain> parse_create_domain(const boost::json::value& body);
Result<InsertMedium> parse_insert_medium(const boost::json::value& body);
Result<bool> parse_force(const boost::json::value& body);  // {} or {"force": bool}
Result<DiskSpec> parse_disk(const boost::json::value& body);
Result<NicSpec> parse_nic(const boost::json::value& body);
// The request bodies parse_disk and parse_nic read back: a hotplug journals its request with them.
boost::json::object to_json(const DiskSpec& d);
boost::json::object to_json(const NicSpec& n);
Result<VncSpec> parse_vnc(const boost::json::value& body);
Result<std::string> parse_path_body(const boost::json::value& body);  // {"path": "..."}
struct SaveRequest {
  std::string path;
  bool keep_running = false;  // false: destroyed once the file is safely written (virsh save)
};
Result<SaveRequest> parse_save(const boost::json::value& body);  // {"path", "keep_running"?}
struct RestoreRequest {
  std::string path;
  std::string name;
  bool paused = false;
};
Result<RestoreRequest> parse_restore(const boost::json::value& body);
// POST /v1/domains/NAME/migrate: {"to", "copy_storage"?, "disk_paths"?}.
struct MigrateRequest {
  std::string to;
  bool copy_storage = false;  // mirror the writable disks to the destination's own images
  // copy_storage: the destination's image of a disk, by disk id; a disk not named keeps its path
  std::map<std::string, std::string> disk_paths;
};
Result<MigrateRequest> parse_migrate(const boost::json::value& body);
// What a source broker sends its destination (POST /v1/migrations).
struct IncomingDomain {
  boost::json::value domain;  // the domain as the source describes it; checked by the flow
  bool paused = false;
  bool copy_storage = false;  // the writable disks come by NBD: export them, do not share them
};
Result<IncomingDomain> parse_incoming(const boost::json::value& body);

// An administrator's QMP command for the passthrough. Commands that move fds (add-fd, getfd, ...)
// and qmp_capabilities are refused here (forbidden, naming "execute"): the broker owns every fd
// and the session.
struct QmpPassthrough {
  std::string execute;
  boost::json::object arguments;
};
Result<QmpPassthrough> parse_qmp_passthrough(const boost::json::value& body);

std::string_view to_string(DiskFormat f);
std::string_view to_string(DiskBus b);

// Error helper shared by the parsers and the flows: invalid_argument naming `field`.
Error field_error(std::string_view field, std::string message);

}  // namespace broker
