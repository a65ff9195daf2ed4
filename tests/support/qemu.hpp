// Helpers for tests that run real QEMUs: the test guest's files, a blocking QMP handshake for
// tests below the QMP client, a console client, and child reaping for subreaper tests.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "fdpass/unique_fd.hpp"

namespace qbtest {

// The directory tests/guest/build.sh fills (QB_GUEST_DIR or /var/cache/qbroker/guest).
std::string guest_dir();
std::string guest_kernel();
std::string guest_initrd();
inline const char* kGuestAppend = "console=ttyS0 quiet panic=-1 cryptomgr.notests";
// Boot media beside them (tests/guest/build-boot-images.sh) that start the same guest through
// SeaBIOS or OVMF, with kGuestAppend plus qb_boot=disk or qb_boot=cd on /proc/cmdline. Every
// test shares them: attach them read-only.
std::string guest_boot_disk();
std::string guest_boot_iso();

// The QEMU under test. $QB_QEMU_PREFIX names a prefix tests/guest/second-qemu.sh filled: its
// binary, and its data directories (qbrokerd --qemu-datadir). Else $QB_QEMU or the system's
// /usr/bin/qemu-system-x86_64, with its built-in data directories. Throws when the binary is
// not executable.
std::string qemu_binary();
std::vector<std::string> qemu_data_dirs();

// True when `fd_link` (/proc/PID/fd/N) is QEMU's own anonymous memory: a memfd it created, with
// no name in any filesystem (QEMU 10 keeps its display surface in one). Never a host path.
bool is_anonymous_memory(const std::string& fd_link);

// Connects to a Unix socket path, retrying until `timeout` (the listener may not exist yet).
fdpass::UniqueFd connect_retry(const std::string& path, std::chrono::milliseconds timeout);

// Reads one line (without the newline), waiting at most `timeout`. nullopt on EOF or timeout.
std::optional<std::string> read_line(int fd, std::chrono::milliseconds timeout);
bool write_all(int fd, std::string_view data);

// Greeting + qmp_capabilities on a connected QMP socket. Returns false on any failure.
bool qmp_handshake(int fd, std::chrono::milliseconds timeout);
// Sends one command and returns the reply line (events before it are skipped).
std::optional<std::string> qmp_command(int fd, const std::string& json,
                                       std::chrono::milliseconds timeout);

// Forks and execs `argv` unjailed, as the benchmarks' raw floor does, with the fds the launcher's
// command line names: `qmp` becomes fd 3 (QEMU's QMP chardev) and `console` fd 4 (its serial
// console chardev), both made non-blocking as the launcher makes them; stdout and stderr go to
// /dev/null. Returns the pid (-1 when fork fails).
pid_t spawn_with_listeners(const std::vector<std::string>& argv, int qmp, int console);

// Makes the calling process a child subreaper, and reaps every exited child without blocking.
void become_subreaper();
int reap_exited_children();

// A serial console session on the test guest (tests/guest/README.md has the protocol).
class GuestConsole {
 public:
  explicit GuestConsole(fdpass::UniqueFd fd) : fd_(std::move(fd)) {}
  // Waits for the guest's ready marker.
  bool wait_ready(std::chrono::milliseconds timeout);
  // Runs a shell command; returns its output and exit code, nullopt on timeout.
  struct Output {
    std::string text;
    int rc = -1;
  };
  std::optional<Output> run(const std::string& command, std::chrono::milliseconds timeout);
  // Reads the console until `marker`; `out` gets everything up to and including it.
  bool read_until(const std::string& marker, std::string& out, std::chrono::milliseconds timeout);

 private:
  fdpass::UniqueFd fd_;
  std::string buffer_;
};

}  // namespace qbtest
