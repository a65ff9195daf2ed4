// A real qemu-system-x86_64 for tests and benchmarks: QMP-only (-machine none), monitors on
// socketpairs or on a listening socket, killed by pid and reaped on destruction.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "fdpass/unique_fd.hpp"
#include "support/qemu.hpp"  // qemu_binary()

namespace qbtest {

// "kvm" when /dev/kvm can be opened, else "tcg".
std::string qemu_accel();

class QemuProcess {
 public:
  // `monitors` QMP monitors, each on one end of a socketpair (server=off).
  static std::unique_ptr<QemuProcess> start(int monitors = 1,
                                            const std::vector<std::string>& extra = {});
  // One QMP monitor on a listening Unix socket (server=on,wait=off): QEMU accepts again after a
  // client disconnects.
  static std::unique_ptr<QemuProcess> start_listening(fdpass::UniqueFd listener,
                                                      const std::vector<std::string>& extra = {});
  ~QemuProcess();  // SIGKILL and reap

  pid_t pid() const { return pid_; }
  std::vector<fdpass::UniqueFd> monitors;  // the client ends, for start()

 private:
  static std::unique_ptr<QemuProcess> spawn(std::vector<fdpass::UniqueFd> child_fds,
                                            std::vector<std::string> args);
  pid_t pid_ = -1;
};

}  // namespace qbtest
