// qbrokerd is a child subreaper (PR_SET_CHILD_SUBREAPER), so it must reap what it adopts: PID 1
// here reaps orphans only every ~1.4 s (shared/qemu-facts.md), and an unreaped zombie keeps a
// uid's teardown waiting.
//
// It must not steal children that others wait for by pid: the Launcher reaps each QEMU through
// its pidfd (it tolerates ECHILD) and ForkingUidKiller waits for its reaper child with
// waitpid(child) on a lifecycle thread, where an ECHILD would turn into kill_failed. So this
// reaper never calls waitpid(-1). Each sweep lists this process's zombie children in /proc and
// reaps, by pid, only those that were already zombies at the previous sweep and are not in
// `keep` (the live domains' QEMU pids). A child someone waits for is reaped by its waiter within
// microseconds of exiting, so it is never a zombie across two sweeps a second apart.
#pragma once

#include <sys/types.h>

#include <set>
#include <string>

namespace broker::daemon {

class OrphanReaper {
 public:
  explicit OrphanReaper(std::string proc_root = "/proc") : proc_root_(std::move(proc_root)) {}

  // One sweep; returns how many children it reaped.
  std::size_t sweep(const std::set<pid_t>& keep);

 private:
  std::string proc_root_;
  std::set<pid_t> seen_;  // zombie children at the previous sweep
};

}  // namespace broker::daemon
