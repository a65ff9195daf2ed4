// Kill by uid (seed 000, libxl's dm_kill_uid): a child process takes real uid = the reaper uid,
// effective uid = the target uid, saved uid = 0, and calls kill(-1, SIGKILL). The kernel lets a
// process signal every process whose real or saved uid matches its own real or effective uid, and
// kill(-1) visits every such process under the tasklist lock, so a fork storm cannot outrun it:
// a process with SIGKILL pending cannot complete a fork. The reaper's own real uid is the reaper
// uid (which never runs a QEMU), so nothing running under the target uid can signal the reaper.
//
// kill(-1) cannot reach a process that holds the uid only as its effective or filesystem uid
// (setresuid(other, uid, other)). Such a process is found by the same /proc scan that checks the
// kill, and killed by pid as the last step: through a pidfd opened before its uids are read
// again, so a pid reused in between is never signalled. This is not a fallback: kill(-1) has
// run first and must have succeeded, and a kill that fails is still an error.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <string>

#include "broker/core/error.hpp"

namespace broker::lifecycle {

struct KillReport {
  uid_t uid = 0;
  std::size_t found = 0;      // processes of the uid seen right after the first kill round
  std::size_t survivors = 0;  // live processes of the uid after it (0 on success)
  int rounds = 0;             // kill(-1) rounds taken
  std::size_t by_pid = 0;     // processes kill(-1) could not reach, killed by pid
  std::string method;         // e.g. "cgroup.kill+pidns-init+uid"
  std::chrono::microseconds duration{0};
};

// What touches the world in a kill, injectable so tests can make it fail.
class UidKiller {
 public:
  virtual ~UidKiller() = default;
  // One kill(-1, SIGKILL) round as `uid`, from a child running with the reaper's credentials.
  virtual std::error_code kill_all(uid_t reaper_uid, uid_t uid) = 0;
  // SIGKILL to `pid` if, read through a pidfd that pins it, the process still holds `uid` as any
  // of its uids in `proc_root`. A process that is gone is not an error. The default kills nothing.
  virtual std::error_code kill_holder(const std::string& proc_root, pid_t pid, uid_t uid);
};

// The real thing: a child that runs setresuid(reaper, uid, 0) then kill(-1, SIGKILL).
class ForkingUidKiller final : public UidKiller {
 public:
  std::error_code kill_all(uid_t reaper_uid, uid_t uid) override;
  std::error_code kill_holder(const std::string& proc_root, pid_t pid, uid_t uid) override;
};

class Reaper {
 public:
  Reaper(UidKiller& killer, uid_t reaper_uid, std::string proc_root = "/proc",
         std::chrono::milliseconds settle = std::chrono::milliseconds(10000))
      : killer_(killer), reaper_uid_(reaper_uid), proc_root_(std::move(proc_root)),
        settle_(settle) {}

  // Kills every process of `uid` and waits (bounded by `settle`) until /proc shows none alive.
  // Zombies do not count as alive; their parents reap them (the daemon is a subreaper).
  Result<KillReport> kill_uid(uid_t uid) { return kill_uid(uid, false); }
  // The same after a first round of kill(-1) as `uid` went out earlier (send_round), so that the
  // round overlaps with something else (a destroy waiting for QEMU to exit): the scans and any
  // further rounds follow as in kill_uid, and the report counts that first round.
  Result<KillReport> kill_uid(uid_t uid, bool round_sent);
  // One round of kill(-1) as `uid`, nothing more.
  std::error_code send_round(uid_t uid) { return killer_.kill_all(reaper_uid_, uid); }

  uid_t reaper_uid() const { return reaper_uid_; }
  const std::string& proc_root() const { return proc_root_; }

 private:
  UidKiller& killer_;
  uid_t reaper_uid_;
  std::string proc_root_;
  std::chrono::milliseconds settle_;
};

}  // namespace broker::lifecycle
