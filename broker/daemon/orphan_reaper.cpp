#include "broker/daemon/orphan_reaper.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

namespace broker::daemon {
namespace {

// Parses "pid (comm) S ppid ..." (comm may hold spaces and parentheses: split at the last ')').
bool zombie_child_of(const std::string& stat_path, pid_t self) {
  int fd = ::open(stat_path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char buf[512];
  ssize_t n = ::read(fd, buf, sizeof(buf) - 1);
  ::close(fd);
  if (n <= 0) return false;
  buf[n] = '\0';
  const char* close_paren = std::strrchr(buf, ')');
  if (close_paren == nullptr || close_paren[1] != ' ') return false;
  char state = close_paren[2];
  pid_t ppid = static_cast<pid_t>(std::strtol(close_paren + 4, nullptr, 10));
  return state == 'Z' && ppid == self;
}

}  // namespace

std::size_t OrphanReaper::sweep(const std::set<pid_t>& keep) {
  // Most sweeps find no zombie child at all: one waitid(WNOWAIT) says so without reaping, and
  // the /proc scan (a few ms with hundreds of domains) is skipped.
  siginfo_t peek{};
  if (::waitid(P_ALL, 0, &peek, WEXITED | WNOHANG | WNOWAIT) != 0 || peek.si_pid == 0) {
    seen_.clear();
    return 0;
  }
  pid_t self = ::getpid();
  std::set<pid_t> zombies;
  DIR* dir = ::opendir(proc_root_.c_str());
  if (dir == nullptr) return 0;
  while (dirent* e = ::readdir(dir)) {
    char* end = nullptr;
    long pid = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != '\0' || pid <= 0) continue;
    if (zombie_child_of(proc_root_ + "/" + e->d_name + "/stat", self)) {
      zombies.insert(static_cast<pid_t>(pid));
    }
  }
  ::closedir(dir);
  std::size_t reaped = 0;
  for (pid_t pid : zombies) {
    if (!seen_.contains(pid) || keep.contains(pid)) continue;
    siginfo_t info{};
    if (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG) == 0 &&
        info.si_pid == pid) {
      ++reaped;
    }
  }
  seen_ = std::move(zombies);
  return reaped;
}

}  // namespace broker::daemon
