#include "broker/lifecycle/cgroup.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <dirent.h>

#include <cerrno>
#include <cstdlib>
#include <string_view>
#include <fstream>
#include <sstream>

#include "broker/core/atomic_file.hpp"
#include "broker/core/log.hpp"
#include "broker/lifecycle/errc.hpp"

namespace broker::lifecycle {
namespace {

bool write_text(const std::string& path, std::string_view text) {
  fdpass::UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
  if (!fd) return false;
  return ::write(fd.get(), text.data(), text.size()) == static_cast<ssize_t>(text.size());
}

std::string find_cgroup2_mount() {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    // ... mount-point ... - fstype source options
    auto dash = line.find(" - ");
    if (dash == std::string::npos) continue;
    std::istringstream tail(line.substr(dash + 3));
    std::string fstype;
    tail >> fstype;
    if (fstype != "cgroup2") continue;
    std::istringstream head(line.substr(0, dash));
    std::string id, parent, devno, root, mount_point;
    head >> id >> parent >> devno >> root >> mount_point;
    return mount_point;
  }
  return {};
}

}  // namespace

bool Cgroup::kill() const {
  return !path_.empty() && write_text(path_ + "/cgroup.kill", "1");
}

bool Cgroup::populated() const {
  auto events = read_small_file(path_ + "/cgroup.events", 4096);
  return events && events->find("populated 1") != std::string::npos;
}

std::optional<std::uint64_t> Cgroup::cpu_usage_us() const {
  if (path_.empty()) return std::nullopt;
  auto stat = read_small_file(path_ + "/cpu.stat", 4096);
  if (!stat) return std::nullopt;
  constexpr std::string_view kKey = "usage_usec ";
  auto at = stat->find(kKey);
  if (at == std::string::npos) return std::nullopt;
  return std::strtoull(stat->c_str() + at + kKey.size(), nullptr, 10);
}

std::optional<std::uint64_t> Cgroup::memory_current() const {
  if (path_.empty()) return std::nullopt;
  auto current = read_small_file(path_ + "/memory.current", 64);
  if (!current || current->empty()) return std::nullopt;
  return std::strtoull(current->c_str(), nullptr, 10);
}

std::string Cgroup::name() const { return path_.substr(path_.rfind('/') + 1); }

Result<void> Cgroup::remove() {
  if (path_.empty()) return {};
  dir_.reset();
  if (::rmdir(path_.c_str()) != 0 && errno != ENOENT) {
    return make_error({errno, std::system_category()}, "removing cgroup " + path_);
  }
  path_.clear();
  return {};
}

CgroupManager::CgroupManager(std::string root, std::string group) {
  if (root.empty()) root = find_cgroup2_mount();
  if (root.empty()) {
    why_ = "no cgroup2 hierarchy is mounted";
    return;
  }
  std::string base = root + "/" + group;
  if (::mkdir(base.c_str(), 0755) != 0 && errno != EEXIST) {
    why_ = "cannot create " + base + ": " + std::error_code(errno, std::system_category()).message();
    return;
  }
  // Delegate what the parent offers, so per-domain limits can be written below.
  auto offered = read_small_file(root + "/cgroup.controllers", 4096).value_or("");
  std::string enable;
  for (const char* c : {"memory", "pids"}) {
    if (offered.find(c) != std::string::npos) enable += std::string(enable.empty() ? "+" : " +") + c;
  }
  if (!enable.empty()) write_text(base + "/cgroup.subtree_control", enable);
  auto delegated = read_small_file(base + "/cgroup.subtree_control", 4096).value_or("");
  limits_supported_ = delegated.find("memory") != std::string::npos &&
                      delegated.find("pids") != std::string::npos;
  if (!limits_supported_) {
    log::info("cgroup2 at " + root + " lacks the memory/pids controllers (hybrid v1/v2 host): " +
              "domain cgroups give cgroup.kill but no memory.max/pids.max");
  }
  base_ = base;
}

Result<Cgroup> CgroupManager::create(const std::string& name, const CgroupLimits& limits) {
  if (!available()) return Error(make_error_code(errc::cgroup_unavailable), why_);
  retry_retired();
  Cgroup cg;
  cg.path_ = base_ + "/" + name;
  if (::mkdir(cg.path_.c_str(), 0755) != 0) {
    return make_error({errno, std::system_category()}, "creating cgroup " + cg.path_);
  }
  cg.dir_.reset(::open(cg.path_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!cg.dir_) {
    auto e = make_error({errno, std::system_category()}, "opening cgroup " + cg.path_);
    ::rmdir(cg.path_.c_str());
    return e;
  }
  {
    std::lock_guard lock(mutex_);
    created_.insert(name);
  }
  auto apply = [&](const char* file, std::uint64_t value) {
    if (value == 0 || !limits_supported_) return;
    if (!write_text(cg.path_ + "/" + file, std::to_string(value))) {
      log::warn(std::string("cgroup ") + cg.path_ + ": cannot write " + file);
    }
  };
  apply("memory.max", limits.memory_bytes);
  apply("pids.max", limits.pids);
  return cg;
}

std::optional<Cgroup> CgroupManager::open(const std::string& name) {
  if (!available()) return std::nullopt;
  Cgroup cg;
  cg.path_ = base_ + "/" + name;
  cg.dir_.reset(::open(cg.path_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!cg.dir_) return std::nullopt;
  return cg;
}

bool CgroupManager::retire(Cgroup& cgroup) {
  if (cgroup.path_.empty()) return true;
  auto name = cgroup.name();
  {
    std::lock_guard lock(mutex_);
    created_.erase(name);
  }
  auto removed = cgroup.remove();
  if (removed) return true;
  log::info(removed.error().describe() + "; retried later");
  cgroup.path_.clear();
  std::lock_guard lock(mutex_);
  retired_.insert(name);
  return false;
}

void CgroupManager::retry_retired() {
  std::lock_guard lock(mutex_);
  for (auto it = retired_.begin(); it != retired_.end();) {
    auto path = base_ + "/" + *it;
    if (::rmdir(path.c_str()) == 0 || errno == ENOENT) {
      it = retired_.erase(it);
    } else {
      ++it;
    }
  }
}

void CgroupManager::sweep(const std::string& prefix, const std::set<std::string>& keep) {
  if (!available()) return;
  std::vector<std::string> stale;
  if (DIR* dir = ::opendir(base_.c_str())) {
    while (dirent* e = ::readdir(dir)) {
      std::string name = e->d_name;
      if (e->d_type == DT_DIR && name.starts_with(prefix) && !keep.contains(name)) {
        stale.push_back(std::move(name));
      }
    }
    ::closedir(dir);
  }
  {
    std::lock_guard lock(mutex_);
    for (auto& name : stale) {
      if (!created_.contains(name)) retired_.insert(std::move(name));
    }
  }
  retry_retired();
}

bool CgroupManager::remove_base_if_empty() {
  if (!available()) return false;
  retry_retired();
  return ::rmdir(base_.c_str()) == 0 || errno == ENOENT;
}

std::vector<std::string> CgroupManager::retired() const {
  std::lock_guard lock(mutex_);
  return {retired_.begin(), retired_.end()};
}

}  // namespace broker::lifecycle
