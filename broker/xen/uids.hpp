// The device model's uid and the reaper, as libxl 4.17 chooses them (docs/xen.md):
//   - user `xen-qemuuser-range-base` exists: uid = its uid + domid, refused when that uid has a
//     passwd entry of its own (it would belong to a real user); killed by uid;
//   - else user `xen-qemuuser-shared`, only when the broker was started with --xen-shared-uid:
//     every device model shares that uid, so none can be killed by uid;
//   - else an error. uid 0 is always refused.
// The reaper is `xen-qemuuser-reaper`, else the range base, and never root. It runs
// setresuid(reaper, kill_uid, 0) then kill(-1, SIGKILL) while holding flock on
// /var/run/xen/dm-reaper-lock, the lock libxl's reapers take, so the two never race on one uid.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>

#include "broker/core/error.hpp"
#include "broker/lifecycle/reaper.hpp"

namespace broker::xen {

inline constexpr const char* kRangeBaseUser = "xen-qemuuser-range-base";
inline constexpr const char* kSharedUser = "xen-qemuuser-shared";
inline constexpr const char* kReaperUser = "xen-qemuuser-reaper";
inline constexpr std::uint32_t kFirstReservedDomid = 0x7ff0;  // DOMID_FIRST_RESERVED

// The user database, injectable so tests need not edit /etc/passwd.
class UserDb {
 public:
  virtual ~UserDb() = default;
  virtual std::optional<uid_t> uid_of(const std::string& user) const;  // getpwnam
  virtual bool has_entry(uid_t uid) const;                             // getpwuid
};

struct DmUid {
  uid_t uid = 0;
  bool shared = false;  // true: no kill by uid is possible; the kill uid is not written
};

// Refuses domid 0 (dom0 runs no device model of its own here) and reserved domids.
Result<void> check_domid(std::uint32_t domid);

Result<DmUid> device_model_uid(const UserDb& users, std::uint32_t domid, bool allow_shared);
Result<uid_t> reaper_uid(const UserDb& users);
// The base of the per-domid range: the uid of kRangeBaseUser.
Result<uid_t> range_base(const UserDb& users);

// Takes libxl's reaper lock around each kill(-1) round of `inner`.
class LockingUidKiller final : public lifecycle::UidKiller {
 public:
  LockingUidKiller(lifecycle::UidKiller& inner, std::string lock_path = "/var/run/xen/dm-reaper-lock")
      : inner_(inner), lock_path_(std::move(lock_path)) {}
  std::error_code kill_all(uid_t reaper_uid, uid_t uid) override;
  std::error_code kill_holder(const std::string& proc_root, pid_t pid, uid_t uid) override {
    return inner_.kill_holder(proc_root, pid, uid);
  }
  const std::string& lock_path() const { return lock_path_; }

 private:
  lifecycle::UidKiller& inner_;
  std::string lock_path_;
};

}  // namespace broker::xen
