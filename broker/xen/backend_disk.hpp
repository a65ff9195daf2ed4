// A disk handed to blkback (seed 004). blkback opens a block device by number, so a number
// reused between the toolstack's check and blkback's open would hand the guest another device.
// The broker closes that window:
//   - a regular file becomes a loop device through LOOP_CONFIGURE with autoclear, so the device
//     exists only while someone holds it open and cannot outlive a crashed broker;
//   - a block device is named by st_rdev and its disk sequence number (BLKGETDISKSEQ), which the
//     kernel never reuses while the system runs;
//   - `physical-device` (major:minor, hex), `params` and a hex `diskseq` go to the backend's
//     xenstore directory. A blkback that checks diskseq (seed 004's proposal; mainline Linux
//     reads physical-device alone) refuses a device whose sequence differs;
//   - what protects the disk with any blkback: the broker holds its fd until the backend reports
//     Connected (state 4). Until blkback holds the device itself, the device cannot be detached,
//     so its number cannot be reused for another.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

#include "broker/core/error.hpp"
#include "broker/xen/store.hpp"
#include "fdpass/unique_fd.hpp"

namespace broker::xen {

struct BackendDisk {
  fdpass::UniqueFd fd;     // the loop device or the block device, held open
  dev_t rdev = 0;
  std::uint64_t diskseq = 0;
  std::string node;        // /dev/loopN, or the block device's path as opened
  bool loop = false;
};

// `image` is the file or block device the broker opened (beneath its image roots); `path` names
// it in messages and, for a block device, in `params`. A regular file gets a fresh loop device.
Result<BackendDisk> open_backend_disk(fdpass::BorrowedFd image, const std::string& path,
                                      bool read_only, const std::string& dev_root = "/dev");

// /local/domain/0/backend/vbd/<domid>/<devid>
std::string backend_path(std::uint32_t domid, std::uint32_t devid);

// blkback's names for a device: "major:minor" and the diskseq, in hex as xenstore holds them.
std::string physical_device(dev_t rdev);
std::string diskseq_hex(std::uint64_t diskseq);

// Writes params, physical-device and diskseq (16 hex digits) in one transaction.
Result<void> publish_backend_disk(Store& xs, const BackendDisk& disk, const std::string& backend);

// XenbusStateConnected.
inline constexpr const char* kConnected = "4";
// Reads `backend`/state: true once it is Connected.
Result<bool> backend_connected(Store& xs, const std::string& backend);

}  // namespace broker::xen
