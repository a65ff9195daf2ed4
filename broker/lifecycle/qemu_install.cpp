#include "broker/lifecycle/qemu_install.hpp"

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "broker/lifecycle/errc.hpp"
#include "fdpass/devices.hpp"
#include "fdpass/unique_fd.hpp"

namespace broker::lifecycle {
namespace {

constexpr uid_t kNobody = 65534;
constexpr std::size_t kProbeMaxOutput = 64 * 1024;

Error invalid(const std::string& path, const std::string& what) {
  return Error(make_error_code(errc::invalid_spec), "QEMU install: " + path + " " + what);
}

bool beneath_usr(const std::string& path) { return path == "/usr" || path.starts_with("/usr/"); }

std::string parent_of(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == 0 ? "/" : path.substr(0, slash);
}

// Absolute and already normal: no ".", "..", "//" or trailing '/', so the path the jail binds is
// the one that was checked.
bool normal(const std::string& path) {
  if (path.empty() || path.front() != '/') return false;
  if (path == "/") return true;
  return path.back() != '/' && std::filesystem::path(path).lexically_normal().string() == path;
}

// Owned by root and writable by nobody else. lstat: a symlink is judged as itself, and the
// jail's bind would follow it to somewhere unchecked.
Result<void> check_owned(const std::string& path, mode_t kind, const char* kind_name) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    return invalid(path, std::string("cannot be read: ") + std::strerror(errno));
  }
  if ((st.st_mode & S_IFMT) != kind) return invalid(path, std::string("is not a ") + kind_name);
  if (st.st_uid != 0) return invalid(path, "belongs to uid " + std::to_string(st.st_uid) + ", not root");
  if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
    return invalid(path, "is writable by its group or by others");
  }
  return {};
}

}  // namespace

Result<void> check_qemu_install(const QemuInstall& install) {
  if (!normal(install.binary)) return invalid(install.binary, "must be an absolute, normal path");
  if (auto ok = check_owned(install.binary, S_IFREG, "regular file"); !ok) return ok;
  if (::access(install.binary.c_str(), X_OK) != 0) return invalid(install.binary, "is not executable");
  if (auto ok = check_owned(parent_of(install.binary), S_IFDIR, "directory"); !ok) return ok;
  for (const auto& dir : install.data_dirs) {
    if (!normal(dir) || dir == "/") return invalid(dir, "must be an absolute, normal path below /");
    if (auto ok = check_owned(dir, S_IFDIR, "directory"); !ok) return ok;
  }
  return {};
}

InstallBinds jail_binds_of(const QemuInstall& install) {
  InstallBinds binds;
  const std::string bin_dir = parent_of(install.binary);
  if (!beneath_usr(bin_dir)) binds.exec_dirs.push_back(bin_dir);
  for (const auto& dir : install.data_dirs) {
    if (beneath_usr(dir) || dir == bin_dir ||
        std::find(binds.data_dirs.begin(), binds.data_dirs.end(), dir) != binds.data_dirs.end()) {
      continue;
    }
    binds.data_dirs.push_back(dir);
  }
  return binds;
}

bool lists_monitor_object(std::string_view object_help) {
  // One type per line, indented: "  monitor-qmp".
  std::size_t pos = 0;
  while (pos < object_help.size()) {
    auto end = object_help.find('\n', pos);
    if (end == std::string_view::npos) end = object_help.size();
    auto line = object_help.substr(pos, end - pos);
    auto first = line.find_first_not_of(" \t");
    auto last = line.find_last_not_of(" \t\r");
    if (first != std::string_view::npos && line.substr(first, last - first + 1) == "monitor-qmp") {
      return true;
    }
    pos = end + 1;
  }
  return false;
}

namespace {

// The probe's child: only async-signal-safe calls between fork and exec.
[[noreturn]] void probe_child(const char* binary, int out) {
  ::dup2(out, STDOUT_FILENO);
  int null = ::open("/dev/null", O_RDWR);
  if (null >= 0) {
    ::dup2(null, STDIN_FILENO);
    ::dup2(null, STDERR_FILENO);
  }
  if (::setgroups(0, nullptr) != 0 && ::geteuid() == 0) ::_exit(126);
  if (::geteuid() == 0 && (::setresgid(kNobody, kNobody, kNobody) != 0 ||
                           ::setresuid(kNobody, kNobody, kNobody) != 0)) {
    ::_exit(126);
  }
  const char* argv[] = {binary, "-object", "help", nullptr};
  const char* envp[] = {nullptr};
  ::execve(binary, const_cast<char* const*>(argv), const_cast<char* const*>(envp));
  ::_exit(127);
}

// Reads the child's output until it closes it, the output is too long, or the deadline passes.
std::string read_until_closed(int fd, std::chrono::steady_clock::time_point deadline) {
  std::string text;
  char buf[4096];
  while (text.size() < kProbeMaxOutput) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    pollfd p{fd, POLLIN, 0};
    int ready = ::poll(&p, 1, static_cast<int>(left.count()));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) break;
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    text.append(buf, static_cast<std::size_t>(n));
  }
  return text;
}

// True once `pid` (a child, not yet reaped) has exited, waiting at most until `deadline`.
bool exited_by(pid_t pid, std::chrono::steady_clock::time_point deadline) {
  fdpass::UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pidfd) return false;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    pollfd p{pidfd.get(), POLLIN, 0};
    int ready = ::poll(&p, 1, static_cast<int>(std::max<long long>(left.count(), 0)));
    if (ready < 0 && errno == EINTR) continue;
    return ready > 0;
  }
}

}  // namespace

Result<bool> probe_monitor_object(const std::string& binary, std::chrono::milliseconds deadline) {
  auto pipe = fdpass::make_pipe();
  if (!pipe) return make_error(pipe.error(), "QEMU probe: pipe");
  pid_t pid = ::fork();
  if (pid < 0) return make_error({errno, std::system_category()}, "QEMU probe: fork");
  if (pid == 0) probe_child(binary.c_str(), pipe->second.get());
  pipe->second.reset();
  const auto until = std::chrono::steady_clock::now() + deadline;
  std::string text = read_until_closed(pipe->first.get(), until);
  int status = 0;
  if (!exited_by(pid, until)) ::kill(pid, SIGKILL);  // by pid: this child, not yet reaped
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return Error(make_error_code(errc::invalid_spec),
                 "QEMU probe: " + binary + " -object help did not exit 0 within " +
                     std::to_string(deadline.count()) + " ms");
  }
  return lists_monitor_object(text);
}

std::vector<std::string> monitor_args(const QemuInstall& install, std::string_view chardev) {
  if (install.monitor_object) {
    return {"-object", "monitor-qmp,id=qmp-monitor,chardev=" + std::string(chardev)};
  }
  return {"-mon", "chardev=" + std::string(chardev) + ",mode=control"};
}

}  // namespace broker::lifecycle
