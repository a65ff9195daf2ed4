// A cgroup v2 directory per domain, when a writable cgroup2 hierarchy exists. The child is
// cloned straight into it (CLONE_INTO_CGROUP), so it is never outside its cgroup; teardown writes
// cgroup.kill, which kills everything inside it at once, whatever uid it runs as. Memory and pid
// limits are written when those controllers are enabled; when they are not (a hybrid v1/v2 host,
// as on these machines), the cgroup still gives cgroup.kill and the log says what is missing.
//
// Every instance gets a cgroup of its own, never reused: a QEMU that was re-adopted after a
// restart is not the broker's child, so once killed it stays a zombie until PID 1 reaps it, and
// its cgroup can stay busy meanwhile. Such a cgroup is retired: the manager retries the
// removal later, and nothing new is ever placed in it.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

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
  // The directory's name below the manager's base.
  std::string name() const;
  fdpass::BorrowedFd dir() const { return dir_; }
  bool valid() const { return dir_.valid(); }

  // Writes "1" to cgroup.kill. Returns false where the kernel has no cgroup.kill.
  bool kill() const;
  // True while any process is inside (cgroup.events "populated 1").
  bool populated() const;
  // CPU time used by everything inside, in microseconds (cpu.stat usage_usec; cgroup v2 keeps
  // it without the cpu controller), and the memory charged to it (memory.current, only with the
  // memory controller).
  std::optional<std::uint64_t> cpu_usage_us() const;
  std::optional<std::uint64_t> memory_current() const;
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

  // Creates base/<name>, which must not exist yet, and applies the limits that the hierarchy
  // supports. Retired cgroups are retried first.
  Result<Cgroup> create(const std::string& name, const CgroupLimits& limits);
  // Opens an existing cgroup (after a restart).
  std::optional<Cgroup> open(const std::string& name);
  // Removes the cgroup; one that is still busy (a zombie not yet reaped by its parent) is kept
  // and retried by later calls. Returns false when the removal had to be deferred.
  bool retire(Cgroup& cgroup);
  // Removes every cgroup below the base whose name starts with `prefix` and is not in `keep`
  // (left behind by an earlier broker); busy ones are retired. A cgroup this manager created and
  // has not retired is never swept: a start running beside the sweep owns it.
  void sweep(const std::string& prefix, const std::set<std::string>& keep);
  // Removes the base when no domain cgroup is left below it (a broker that stops with domains
  // running keeps it). Returns true when it is gone.
  bool remove_base_if_empty();
  // The cgroups whose removal is still pending.
  std::vector<std::string> retired() const;

 private:
  void retry_retired();

  std::string base_;
  std::string why_;
  bool limits_supported_ = false;
  mutable std::mutex mutex_;
  std::set<std::string> retired_;  // names below base_
  std::set<std::string> created_;  // made here and not retired since
};

}  // namespace broker::lifecycle
