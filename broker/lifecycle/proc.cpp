#include "broker/lifecycle/proc.hpp"

#include <dirent.h>
#include <signal.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "broker/core/atomic_file.hpp"

namespace broker::lifecycle {

namespace {

// /proc/<name>/status as a ProcInfo, if the process holds `uid` as any of its four uids.
std::optional<ProcInfo> read_status(const std::string& proc_root, const char* name, uid_t uid) {
  char* end = nullptr;
  long pid = std::strtol(name, &end, 10);
  if (pid <= 0 || *end != '\0') return std::nullopt;
  auto status = read_small_file(proc_root + "/" + name + "/status", 64 << 10);
  if (!status) return std::nullopt;  // gone since readdir
  auto uid_at = status->find("\nUid:");
  auto state_at = status->find("\nState:");
  if (uid_at == std::string::npos) return std::nullopt;
  const char* p = status->c_str() + uid_at + 5;
  bool match = false;
  for (int i = 0; i < 4; ++i) {
    char* next = nullptr;
    unsigned long v = std::strtoul(p, &next, 10);
    if (next == p) break;
    if (v == uid) match = true;
    p = next;
  }
  if (!match) return std::nullopt;
  const auto uids_end = status->find('\n', uid_at + 5);
  std::string uids = status->substr(uid_at + 6, uids_end == std::string::npos ? std::string::npos
                                                                              : uids_end - uid_at - 6);
  for (auto& c : uids) c = c == '\t' ? ' ' : c;
  bool zombie = state_at != std::string::npos && status->compare(state_at + 7, 2, "\tZ") == 0;
  // SigPnd (thread) and ShdPnd (process) are hex masks; SIGKILL is bit 9 - 1.
  bool kill_pending = false;
  for (const char* key : {"\nSigPnd:", "\nShdPnd:"}) {
    auto at = status->find(key);
    if (at == std::string::npos) continue;
    unsigned long long mask = std::strtoull(status->c_str() + at + 8, nullptr, 16);
    kill_pending = kill_pending || (mask & (1ULL << (SIGKILL - 1))) != 0;
  }
  char state = state_at != std::string::npos && state_at + 8 < status->size() ? (*status)[state_at + 8] : '?';
  return ProcInfo{static_cast<pid_t>(pid), zombie, kill_pending, state, std::move(uids)};
}

}  // namespace

std::vector<pid_t> kernel_threads(const std::string& proc_root) {
  std::vector<pid_t> out;
  auto comm = read_small_file(proc_root + "/2/comm", 64);
  if (!comm || *comm != "kthreadd\n") return out;
  auto children = read_small_file(proc_root + "/2/task/2/children", 1 << 20);
  if (!children) return out;
  out.push_back(2);
  const char* p = children->c_str();
  for (;;) {
    char* end = nullptr;
    const long pid = std::strtol(p, &end, 10);
    if (end == p) break;
    if (pid > 0) out.push_back(static_cast<pid_t>(pid));
    p = end;
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<ProcInfo> processes_of_uid(const std::string& proc_root, uid_t uid) {
  std::vector<ProcInfo> out;
  // Read before the listing: a kernel thread that starts meanwhile is read like any process.
  const std::vector<pid_t> before = kernel_threads(proc_root);
  std::vector<pid_t> passed;  // kernel threads the listing passed over, unread
  DIR* d = ::opendir(proc_root.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    char* end = nullptr;
    const long pid = std::strtol(e->d_name, &end, 10);
    if (pid > 0 && *end == '\0' &&
        std::binary_search(before.begin(), before.end(), static_cast<pid_t>(pid))) {
      passed.push_back(static_cast<pid_t>(pid));
      continue;
    }
    if (auto info = read_status(proc_root, e->d_name, uid)) out.push_back(std::move(*info));
  }
  ::closedir(d);
  // A pid passed over must have been kthreadd's child before and after the listing; one that
  // was not (a kernel thread exited and its pid went to a process) is read now.
  const std::vector<pid_t> after = kernel_threads(proc_root);
  for (pid_t pid : passed) {
    if (std::binary_search(after.begin(), after.end(), pid)) continue;
    if (auto info = read_status(proc_root, std::to_string(pid).c_str(), uid)) out.push_back(std::move(*info));
  }
  return out;
}

std::optional<ProcInfo> process_of_uid(const std::string& proc_root, pid_t pid, uid_t uid) {
  return read_status(proc_root, std::to_string(pid).c_str(), uid);
}

std::size_t live_processes_of_uid(const std::string& proc_root, uid_t uid) {
  std::size_t n = 0;
  for (const auto& p : processes_of_uid(proc_root, uid)) n += p.zombie ? 0 : 1;
  return n;
}

unsigned long long process_start_time(const std::string& proc_root, pid_t pid) {
  auto stat = read_small_file(proc_root + "/" + std::to_string(pid) + "/stat", 8192);
  if (!stat) return 0;
  // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
  auto close = stat->rfind(')');
  if (close == std::string::npos) return 0;
  const char* p = stat->c_str() + close + 1;
  for (int field = 3; field < 22; ++field) {
    p = std::strchr(p + 1, ' ');
    if (p == nullptr) return 0;
  }
  return std::strtoull(p + 1, nullptr, 10);
}

char process_state(const std::string& proc_root, pid_t pid) {
  auto stat = read_small_file(proc_root + "/" + std::to_string(pid) + "/stat", 8192);
  if (!stat) return 0;
  auto close = stat->rfind(')');
  if (close == std::string::npos || close + 2 >= stat->size()) return 0;
  return (*stat)[close + 2];
}

}  // namespace broker::lifecycle
