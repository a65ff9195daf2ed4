// The names the broker gives its objects inside QEMU: the one owner of every "qb-" name, used by
// the flows that create the objects and by recovery that finds what an interrupted job left.
//   devices       the user's id (cd0, disk1, net0), validated by lifecycle::valid_name
//   block nodes   qb-<id>-file, qb-<id>-fmt, qb-<id>-backing-file, qb-<id>-backing
//   netdevs       qb-net-<id>          getfd names  qb-tap-<id>, qb-vnc, qb-vnc-client
//   fdset opaque  qb:<id>              SCSI         controller "qb-scsi0" on its own root port
//   root ports    rp1 .. rpN (lifecycle::DomainSpec::pci_slots)
//   copy_storage  source: NBD client node and its getfd name qb-<id>-nbd, mirror job
//                 qb-<id>-mirror; destination: listener getfd name qb-nbd, export qb-<id>-export
#pragma once

#include <array>
#include <string>
#include <string_view>

namespace broker::names {

// The prefix no user id may take: it marks the broker's own objects.
inline constexpr std::string_view kReserved = "qb-";

inline constexpr std::string_view kScsiController = "qb-scsi0";
inline constexpr std::string_view kScsiBus = "qb-scsi0.0";
inline constexpr std::string_view kVncFd = "qb-vnc";
inline constexpr std::string_view kVncClientFd = "qb-vnc-client";

inline std::string file_node(std::string_view id) { return "qb-" + std::string(id) + "-file"; }
inline std::string format_node(std::string_view id) { return "qb-" + std::string(id) + "-fmt"; }
inline std::string backing_file_node(std::string_view id) {
  return "qb-" + std::string(id) + "-backing-file";
}
inline std::string backing_node(std::string_view id) { return "qb-" + std::string(id) + "-backing"; }
// The drive holding a CD's medium when it was plugged at spawn (broker/domain/cold_plan.hpp).
inline std::string medium_drive(std::string_view id) { return "qb-" + std::string(id) + "-medium"; }
inline std::string netdev_id(std::string_view id) { return "qb-net-" + std::string(id); }
inline std::string tap_fd_name(std::string_view id) { return "qb-tap-" + std::string(id); }
inline std::string fdset_opaque(std::string_view id) { return "qb:" + std::string(id); }
inline constexpr std::string_view kNbdListenerFd = "qb-nbd";
inline std::string mirror_node(std::string_view id) { return "qb-" + std::string(id) + "-nbd"; }
inline std::string mirror_job(std::string_view id) { return "qb-" + std::string(id) + "-mirror"; }
inline std::string export_id(std::string_view id) { return "qb-" + std::string(id) + "-export"; }
inline std::string root_port(unsigned n) { return "rp" + std::to_string(n); }

// Every block node a disk or CD `id` may own, top (format) first: the order they are deleted in.
inline std::array<std::string, 4> block_nodes(std::string_view id) {
  return {format_node(id), file_node(id), backing_node(id), backing_file_node(id)};
}

}  // namespace broker::names
