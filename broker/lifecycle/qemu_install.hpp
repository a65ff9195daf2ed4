// The QEMU installation a launcher runs: its binary, the directories it reads firmware and option
// ROMs from, and how it takes its QMP monitor.
//
// A QEMU outside /usr (a second version unpacked beneath a prefix, a build in /opt) is shown to
// its jail the same way /usr is: its binary's directory and its data directories are bound
// read-only at their own paths, and each data directory reaches QEMU as `-L`, ahead of the ones
// built into it. Every one of them must belong to root and be writable by nobody else, or one
// host user could change the code or firmware every domain runs.
#pragma once

#include <chrono>
#include <string>
#include <string_view>
#include <vector>

#include "broker/core/error.hpp"

namespace broker::lifecycle {

struct QemuInstall {
  std::string binary = "/usr/bin/qemu-system-x86_64";
  std::vector<std::string> data_dirs;  // -L, in order; empty: the binary's built-in ones
  bool monitor_object = false;         // the QMP monitor as `-object monitor-qmp`, not `-mon`
};

// Refuses a binary or data directory that is not absolute and normal, is missing, is of the
// wrong kind, or that a user other than root could change (the path's last component and its
// directory). The message names the path and what is wrong with it.
Result<void> check_qemu_install(const QemuInstall& install);

// What a jail binds read-only besides /usr, at the same paths: the binary's directory (exec) and
// the data directories (noexec), those not beneath /usr, without duplicates, in a stable order.
struct InstallBinds {
  std::vector<std::string> exec_dirs;
  std::vector<std::string> data_dirs;
};
InstallBinds jail_binds_of(const QemuInstall& install);

// True when `object_help` (what `qemu -object help` prints) lists the monitor-qmp object type.
bool lists_monitor_object(std::string_view object_help);

// Runs `binary -object help` as an unprivileged user (nobody) with an empty environment and
// reads what it lists, within a deadline; the process is killed by pid and reaped either way.
Result<bool> probe_monitor_object(const std::string& binary,
                                  std::chrono::milliseconds deadline = std::chrono::seconds(5));

// The QEMU words that put the QMP monitor on the chardev named `chardev`.
std::vector<std::string> monitor_args(const QemuInstall& install, std::string_view chardev);

}  // namespace broker::lifecycle
