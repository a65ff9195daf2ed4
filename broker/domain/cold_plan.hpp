// The devices of a create, planned before QEMU starts and plugged by its command line.
//
// A create's disks and CDs go through the same flows as hotplug (open beneath an image root,
// check, hand over the fd, blockdev-add, device_add), with the domain in planning mode: instead
// of QMP, each command is written down here and becomes a QEMU word at spawn, and each fd goes
// into an fdset QEMU gets with -add-fd. The devices are then present when the machine is built,
// so the firmware's boot order (fw_cfg "bootorder") includes them without a reset, and the create
// costs no QMP round trip per device.
//
//   add-fd                  -> -add-fd fd=N,set=S,opaque=O   (S chosen here, from 0 up)
//   blockdev-add ARGS       -> -blockdev JSON(ARGS)
//   device_add ARGS         -> -device JSON(ARGS)
//   blockdev-change-medium  -> -drive if=none,id=qb-ID-medium,file.driver=D,
//                              file.filename=/dev/fdset/S,format=raw,readonly=on (D: file, or
//                              host_device/host_cdrom for a block device, as the medium's json:
//                              filename names it), and drive=qb-ID-medium on device ID: the medium sits
//                              in a drive of its own, so an eject closes its fd as after a change
//                              made over QMP
// Nothing else can be planned (a tap's getfd, a VNC listener): those are plugged over QMP once
// QEMU runs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <boost/json/object.hpp>

#include "broker/core/error.hpp"
#include "broker/lifecycle/fd_handover.hpp"
#include "fdpass/unique_fd.hpp"
#include "qmp/commands.hpp"

namespace broker {

class ColdPlan {
 public:
  // Writes `c` down; internal error for a command that has no command-line form.
  Result<void> add(const qmp::Command& c);
  // A copy of `fd` for a new fdset named by `opaque`; returns the fdset's id.
  Result<std::int64_t> add_fd(fdpass::BorrowedFd fd, std::string opaque);

  // The fds for -add-fd, in fdset order; Launcher::start places them and adds the -add-fd words.
  lifecycle::FdHandover& fds() { return fds_; }
  // The -drive, -blockdev and -device words, devices in the order they were added.
  std::vector<std::string> args() const;

 private:
  lifecycle::FdHandover fds_;
  std::int64_t next_fdset_ = 0;
  std::vector<std::string> drives_;            // -drive and -blockdev words
  std::vector<boost::json::object> devices_;   // device_add arguments
};

}  // namespace broker
