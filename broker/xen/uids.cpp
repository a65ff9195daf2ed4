#include "broker/xen/uids.hpp"

#include <fcntl.h>
#include <pwd.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

#include "fdpass/unique_fd.hpp"

namespace broker::xen {
namespace {

Error refused(std::string message) {
  return Error(std::make_error_code(std::errc::operation_not_permitted), std::move(message));
}

}  // namespace

std::optional<uid_t> UserDb::uid_of(const std::string& user) const {
  struct passwd pw {};
  struct passwd* found = nullptr;
  std::vector<char> buf(16384);
  if (::getpwnam_r(user.c_str(), &pw, buf.data(), buf.size(), &found) != 0 || found == nullptr) {
    return std::nullopt;
  }
  return found->pw_uid;
}

bool UserDb::has_entry(uid_t uid) const {
  struct passwd pw {};
  struct passwd* found = nullptr;
  std::vector<char> buf(16384);
  return ::getpwuid_r(uid, &pw, buf.data(), buf.size(), &found) == 0 && found != nullptr;
}

Result<void> check_domid(std::uint32_t domid) {
  if (domid == 0 || domid >= kFirstReservedDomid) {
    Error e(std::make_error_code(std::errc::invalid_argument),
            "domid " + std::to_string(domid) + " is dom0 or reserved: a device model serves a "
            "domain with a domid from 1 to 32751");
    e.field = "xen.domid";
    return e;
  }
  return {};
}

Result<uid_t> range_base(const UserDb& users) {
  auto base = users.uid_of(kRangeBaseUser);
  if (!base) return refused(std::string("no user ") + kRangeBaseUser);
  if (*base == 0) return refused(std::string(kRangeBaseUser) + " has uid 0");
  return *base;
}

Result<DmUid> device_model_uid(const UserDb& users, std::uint32_t domid, bool allow_shared) {
  if (auto ok = check_domid(domid); !ok) return ok.error();
  if (auto base = users.uid_of(kRangeBaseUser)) {
    if (*base == 0) return refused(std::string(kRangeBaseUser) + " has uid 0");
    const auto uid = static_cast<uid_t>(*base + domid);
    if (uid < *base) return refused("uid of domid " + std::to_string(domid) + " overflows");
    if (users.has_entry(uid)) {
      return refused("uid " + std::to_string(uid) + " (" + kRangeBaseUser + " + domid " +
                     std::to_string(domid) + ") belongs to a user: refusing to run a device "
                     "model and kill processes under it");
    }
    return DmUid{uid, false};
  }
  if (auto shared = users.uid_of(kSharedUser)) {
    if (!allow_shared) {
      return refused(std::string("only ") + kSharedUser + " exists: a shared device-model uid "
                     "cannot be killed by uid; pass --xen-shared-uid to accept that, or create " +
                     kRangeBaseUser);
    }
    if (*shared == 0) return refused(std::string(kSharedUser) + " has uid 0");
    return DmUid{*shared, true};
  }
  return refused(std::string("neither ") + kRangeBaseUser + " nor " + kSharedUser +
                 " exists: create the range base user (docs/xen.md)");
}

Result<uid_t> reaper_uid(const UserDb& users) {
  auto reaper = users.uid_of(kReaperUser);
  if (!reaper) reaper = users.uid_of(kRangeBaseUser);
  if (!reaper) return refused(std::string("no reaper: neither ") + kReaperUser + " nor " +
                              kRangeBaseUser + " exists");
  if (*reaper == 0) return refused("the reaper user has uid 0: a root reaper would kill everything");
  return *reaper;
}

std::error_code LockingUidKiller::kill_all(uid_t reaper_uid, uid_t uid) {
  fdpass::UniqueFd lock(::open(lock_path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!lock) return {errno, std::system_category()};
  while (::flock(lock.get(), LOCK_EX) != 0) {
    if (errno != EINTR) return {errno, std::system_category()};
  }
  return inner_.kill_all(reaper_uid, uid);  // the lock goes with the fd
}

}  // namespace broker::xen
