// The pool of QEMU uids: BASE+1 ... BASE+COUNT-1, one per domain. BASE itself is the reaper uid
// and never runs a QEMU (docs/lifecycle.md). Allocation order:
//   1. pick the lowest uid that has no record and is not quarantined;
//   2. sweep it: kill(-1) as that uid, so nothing left from an earlier owner (or planted by a
//      local user who could setuid to it) survives into the new domain; if anything survives,
//      quarantine the uid, report it, and try the next one;
//   3. record the allocation (atomic write and rename) before the caller spawns anything, so a
//      broker restarted at any point still knows which uid to kill. No fsync: the record must
//      survive a crash of the broker, and the page cache does; a crash of the host ends every
//      process of the uid as well, so a record lost with it leaves nothing behind to kill.
// A uid is released only after its teardown verified that no process runs under it.
// Thread-safe: independent domains start and stop on several threads at once.
#pragma once

#include <sys/types.h>

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "broker/core/error.hpp"
#include "broker/lifecycle/reaper.hpp"

namespace broker::lifecycle {

struct UidRange {
  uid_t base = 0;    // the reaper uid
  uid_t count = 0;   // base + 1 ... base + count - 1 run QEMUs

  // "BASE:COUNT".
  static Result<UidRange> parse(std::string_view text);
  // libxl-style: the named user's uid is the base; `count` uids follow it.
  static Result<UidRange> from_user(const std::string& name, uid_t count);
  // Refuses base 0, count < 2, overflow, and any uid above the base that has a passwd entry.
  // `passwd` is a path so tests can supply their own file.
  Result<void> validate(const std::string& passwd = "/etc/passwd") const;
};

class UidPool {
 public:
  // `state_dir/uids/<uid>` holds the name of the domain that owns the uid.
  UidPool(UidRange range, std::string state_dir, Reaper& reaper);

  // Shared-uid mode, only when asked for explicitly: every QEMU runs as `uid` (as with libvirt's
  // one qemu user, or Xen's xen-qemuuser-shared). It is weaker: a compromised QEMU can signal or
  // ptrace the others, and kill by uid is impossible without killing every domain, so teardown
  // relies on cgroup.kill and the pid namespace alone. The pool logs a warning saying so.
  static UidPool shared(uid_t uid, std::string state_dir, Reaper& reaper);
  bool is_shared() const { return shared_; }

  // Reloads the records written by an earlier broker. Returns uid -> domain name.
  std::map<uid_t, std::string> load();

  // Sweeps and records a uid for `domain`. On Xen the caller names the uid (base + domid).
  Result<uid_t> allocate(const std::string& domain, std::optional<uid_t> wanted = std::nullopt);

  // Records `domain` as the owner of `uid`, which this pool allocated: a warm-pool QEMU becomes a
  // domain's. Nothing is swept: the uid's one QEMU keeps running.
  Result<void> reassign(uid_t uid, const std::string& domain);

  // Forgets the record. Call only after the uid's teardown verified that nothing runs under it.
  Result<void> release(uid_t uid);

  // Sweeps each quarantined uid again and frees those nothing holds any more (the holder exited
  // or was killed by other means). Returns the uids freed.
  std::vector<uid_t> retry_quarantined();

  // Copies: starts and destroys of different domains run on several threads at once.
  std::set<uid_t> quarantined() const;
  std::map<uid_t, std::string> in_use() const;
  // The uids load() found recorded by an earlier broker and not released since: the only ones a
  // reclaim may take. A uid this broker allocated belongs to a start or a domain of its own.
  std::set<uid_t> inherited() const;
  const UidRange& range() const { return range_; }
  Reaper& reaper() { return reaper_; }

 private:
  Result<void> sweep(uid_t uid);

  // Reserves the lowest uid that is neither in use, quarantined nor in `skip` (under the lock);
  // nullopt when none is left.
  std::optional<uid_t> reserve_lowest(const std::string& domain, const std::set<uid_t>& skip);
  // Sweeps and records a reserved uid; on failure the reservation goes (and a uid the sweep
  // could not clear is quarantined).
  Result<uid_t> take(uid_t uid, const std::string& domain);

  UidRange range_;
  std::string dir_;
  Reaper& reaper_;
  // Guards the three sets below. The sweep (a kill by uid) runs outside it: a uid is reserved in
  // in_use_ first, so no other start can pick it meanwhile.
  // (Behind a pointer: a pool is movable, as UidPool::shared returns one.)
  std::unique_ptr<std::mutex> mutex_ = std::make_unique<std::mutex>();
  std::map<uid_t, std::string> in_use_;
  std::set<uid_t> inherited_;
  std::set<uid_t> quarantined_;
  bool shared_ = false;
};

}  // namespace broker::lifecycle
