#include "broker/lifecycle/uid_pool.hpp"

#include <pwd.h>
#include <unistd.h>

#include <cerrno>

#include <charconv>
#include <fstream>
#include <sstream>

#include "broker/core/atomic_file.hpp"
#include "broker/core/log.hpp"
#include "broker/lifecycle/errc.hpp"

namespace broker::lifecycle {
namespace {

Error range_error(std::string msg) {
  Error e(make_error_code(errc::invalid_uid_range), std::move(msg));
  e.field = "uid-range";
  return e;
}

template <class T>
bool parse_number(std::string_view s, T& out) {
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return ec == std::errc() && p == s.data() + s.size() && !s.empty();
}

}  // namespace

Result<UidRange> UidRange::parse(std::string_view text) {
  auto colon = text.find(':');
  UidRange r;
  if (colon == std::string_view::npos || !parse_number(text.substr(0, colon), r.base) ||
      !parse_number(text.substr(colon + 1), r.count)) {
    return range_error("uid range must be BASE:COUNT, got '" + std::string(text) + "'");
  }
  return r;
}

Result<UidRange> UidRange::from_user(const std::string& name, uid_t count) {
  passwd pw{};
  passwd* found = nullptr;
  char buf[4096];
  if (::getpwnam_r(name.c_str(), &pw, buf, sizeof(buf), &found) != 0 || found == nullptr) {
    return range_error("no user named '" + name + "' for the uid range base");
  }
  return UidRange{found->pw_uid, count};
}

Result<void> UidRange::validate(const std::string& passwd) const {
  if (base == 0) return range_error("uid range base must not be 0 (root)");
  if (count < 2) return range_error("uid range needs at least 2 uids (the reaper and one QEMU)");
  if (base > 0xfffffffeU - count) return range_error("uid range overflows");
  std::ifstream in(passwd);
  std::string line;
  while (std::getline(in, line)) {
    // name:x:uid:...
    std::istringstream fields(line);
    std::string name, pw, uid_text;
    if (!std::getline(fields, name, ':') || !std::getline(fields, pw, ':') ||
        !std::getline(fields, uid_text, ':')) {
      continue;
    }
    uid_t uid = 0;
    if (!parse_number(std::string_view(uid_text), uid)) continue;
    if (uid > base && uid < base + count) {
      return range_error("uid " + std::to_string(uid) + " in range " + std::to_string(base) +
                         ":" + std::to_string(count) + " belongs to user '" + name + "'");
    }
  }
  return {};
}

UidPool::UidPool(UidRange range, std::string state_dir, Reaper& reaper)
    : range_(range), dir_(std::move(state_dir) + "/uids"), reaper_(reaper) {}

UidPool UidPool::shared(uid_t uid, std::string state_dir, Reaper& reaper) {
  UidPool pool({uid, 1}, std::move(state_dir), reaper);
  pool.shared_ = true;
  log::warn("shared-uid mode: every QEMU runs as uid " + std::to_string(uid) +
            "; a compromised QEMU can signal or ptrace the others, and teardown cannot kill by "
            "uid (it relies on cgroup.kill and the pid namespace). Use a uid range instead.");
  return pool;
}

std::map<uid_t, std::string> UidPool::load() {
  make_dirs(dir_);
  std::lock_guard lock(*mutex_);
  in_use_.clear();
  inherited_.clear();
  for (const auto& name : list_dir(dir_)) {
    // The temporary file of a record write a crash cut short: the record was never made.
    if (name.starts_with('.') && name.ends_with(".tmp")) {
      ::unlink((dir_ + "/" + name).c_str());
      continue;
    }
    uid_t uid = 0;
    if (!parse_number(std::string_view(name), uid)) continue;
    auto owner = read_small_file(dir_ + "/" + name, 4096);
    in_use_[uid] = owner ? *owner : std::string();
    inherited_.insert(uid);
  }
  return in_use_;
}

std::set<uid_t> UidPool::quarantined() const {
  std::lock_guard lock(*mutex_);
  return quarantined_;
}

std::map<uid_t, std::string> UidPool::in_use() const {
  std::lock_guard lock(*mutex_);
  return in_use_;
}

std::set<uid_t> UidPool::inherited() const {
  std::lock_guard lock(*mutex_);
  return inherited_;
}

Result<void> UidPool::sweep(uid_t uid) {
  auto report = reaper_.kill_uid(uid);
  if (!report) {
    std::lock_guard lock(*mutex_);
    quarantined_.insert(uid);
    log::error("uid " + std::to_string(uid) + " quarantined: " + report.error().describe());
    Error e(make_error_code(errc::uid_quarantined), report.error().message);
    return e;
  }
  if (report->found > 0) {
    log::warn("uid " + std::to_string(uid) + ": killed " + std::to_string(report->found) +
              " leftover processes before reuse");
  }
  return {};
}

std::vector<uid_t> UidPool::retry_quarantined() {
  std::vector<uid_t> freed;
  for (uid_t uid : quarantined()) {
    auto report = reaper_.kill_uid(uid);
    if (!report) {
      log::debug("uid " + std::to_string(uid) + " stays quarantined: " + report.error().describe());
      continue;
    }
    {
      std::lock_guard lock(*mutex_);
      quarantined_.erase(uid);
    }
    freed.push_back(uid);
    log::info("uid " + std::to_string(uid) + " is free again: nothing holds it any more" +
              (report->found > 0 ? " (killed " + std::to_string(report->found) + " processes)"
                                 : std::string()));
  }
  return freed;
}

std::optional<uid_t> UidPool::reserve_lowest(const std::string& domain,
                                             const std::set<uid_t>& skip) {
  std::lock_guard lock(*mutex_);
  for (uid_t uid = range_.base + 1; uid < range_.base + range_.count; ++uid) {
    if (in_use_.contains(uid) || quarantined_.contains(uid) || skip.contains(uid)) continue;
    in_use_[uid] = domain;
    return uid;
  }
  return std::nullopt;
}

Result<uid_t> UidPool::take(uid_t uid, const std::string& domain) {
  auto unreserve = [&] {
    std::lock_guard lock(*mutex_);
    in_use_.erase(uid);
  };
  if (auto swept = sweep(uid); !swept) {
    unreserve();
    return swept.error();
  }
  // Sync::process: the record must outlive this process, not the host. A host crash takes
  // every QEMU of the uid with it, so a record lost that way leaves nothing to kill.
  if (auto ec = write_file_atomic(dir_, std::to_string(uid), domain, 0600, Sync::process)) {
    unreserve();
    return make_error(ec, "recording uid " + std::to_string(uid));
  }
  return uid;
}

Result<uid_t> UidPool::allocate(const std::string& domain, std::optional<uid_t> wanted) {
  if (shared_) {
    // No sweep: the other domains run under this uid. No record: the uid is never released.
    if (range_.base == 0) return range_error("the shared uid must not be 0 (root)");
    return range_.base;
  }
  if (auto ec = make_dirs(dir_)) return make_error(ec, "creating " + dir_);
  if (wanted) {
    if (*wanted <= range_.base || *wanted >= range_.base + range_.count) {
      return range_error("uid " + std::to_string(*wanted) + " is outside the range");
    }
    {
      std::lock_guard lock(*mutex_);
      if (in_use_.contains(*wanted) || quarantined_.contains(*wanted)) {
        Error e(make_error_code(errc::uid_exhausted),
                "uid " + std::to_string(*wanted) + " is in use or quarantined");
        return e;
      }
      in_use_[*wanted] = domain;
    }
    return take(*wanted, domain);
  }
  std::set<uid_t> tried;
  while (auto uid = reserve_lowest(domain, tried)) {
    auto r = take(*uid, domain);
    if (r) return r;
    if (r.error().code != errc::uid_quarantined) return r;
    tried.insert(*uid);
  }
  Error e(make_error_code(errc::uid_exhausted),
          "all " + std::to_string(range_.count - 1) + " uids of the range are in use or quarantined");
  return e;
}

Result<void> UidPool::reassign(uid_t uid, const std::string& domain) {
  if (shared_) return {};
  {
    std::lock_guard lock(*mutex_);
    if (!in_use_.contains(uid)) {
      return range_error("uid " + std::to_string(uid) + " is not allocated");
    }
  }
  if (auto ec = write_file_atomic(dir_, std::to_string(uid), domain, 0600, Sync::process)) {
    return make_error(ec, "recording uid " + std::to_string(uid));
  }
  std::lock_guard lock(*mutex_);
  in_use_[uid] = domain;
  return {};
}

Result<void> UidPool::release(uid_t uid) {
  if (shared_) return {};
  // No fsync: if the removal is lost in a crash, the restarted broker finds a record with no
  // domain, sweeps the uid and frees it again. Only allocation must be durable before use.
  if (::unlink((dir_ + "/" + std::to_string(uid)).c_str()) != 0 && errno != ENOENT) {
    std::error_code ec(errno, std::system_category());
    return make_error(ec, "forgetting uid " + std::to_string(uid));
  }
  std::lock_guard lock(*mutex_);
  in_use_.erase(uid);
  inherited_.erase(uid);
  return {};
}

}  // namespace broker::lifecycle
