// A cgroup v2 directory per domain, when a writable cgroup2 hierarchy exists. The child is
// cloned straight into it (CLONE_INTO_CGROUP), so it is never outside its cgroup; teardown writes
// cgroup.kill, which kills everything inside it at once, whatever uid it runs as. Memory and pid
// limits are written when those controllers are enabled; when they are not (a hybrid v1/v2 host,
// as on these machines), the cgroup still gives cgroup.kill and the log says what is missing.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>

#include "broker/core/error.hpp"
#include "fdpass/unique_fd.hpp"

namespace broker::lifecycle {

struct CgroupLimits {
  std::uint64_t memory_bytes = 0;  // 0: no limit
  std::uint64_t pids = 0;          // 0: no limit
};

class Cgroup {
 public:
  Cgroup() = default;
  const std::string& path() const { return path_; }
  fdpass::BorrowedFd dir() const { return dir_; }
  bool valid() const { return dir_.valid(); }

  // Writes "1" to cgroup.kill. Returns false where the kernel has no cgroup.kill.
  bool kill() const;
  // True while any process is inside (cgroup.events "populated 1").
  bool populated() const;
  // Removes the directory (after the processes are gone).
  Result<void> remove();

 private:
  friend class CgroupManager;
  std::string path_;
  fdpass::UniqueFd dir_;
};

class CgroupManager {
 public:
  // `root` is a cgroup2 mount point, or empty to find one in /proc/self/mountinfo.
  explicit CgroupManager(std::string root = {}, std::string group = "qbroker");

  bool available() const { return !base_.empty(); }
  const std::string& base() const { return base_; }
  const std::string& why_unavailable() const { return why_; }

  // Creates (or reuses) base/<name> and applies the limits that the hierarchy supports.
  Result<Cgroup> create(const std::string& name, const CgroupLimits& limits);
  // Opens an existing cgroup (after a restart).
  std::optional<Cgroup> open(const std::string& name);

 private:
  std::string base_;
  std::string why_;
  bool limits_supported_ = false;
};

}  // namespace broker::lifecycle
