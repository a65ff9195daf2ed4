// Helpers shared by every test: fd-leak checks, root checks and the test guest's location.
#pragma once

#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstddef>
#include <string>
#include <vector>

namespace qbtest {

// Number of open fds of this process (entries of /proc/self/fd, minus the one used to read it).
std::size_t open_fd_count();

// How many fds of process `pid` name `path` (what QEMU holds of an image, say).
int fds_on(pid_t pid, const std::string& path);

// The arguments of process `pid`'s command line, from /proc/PID/cmdline; empty when it is gone.
std::vector<std::string> cmdline_words(pid_t pid);

// Forks a child that switches to `uid` (and gid) and pauses until killed; returns once the child
// runs as `uid`, so /proc already counts it. -1 when the fork or the switch failed.
pid_t fork_as_uid(uid_t uid);

// A forked child that is killed and reaped at scope exit unless the test reaped it, so a test that
// fails half way leaves nothing running under the uid it planted the child in.
class ChildGuard {
 public:
  explicit ChildGuard(pid_t pid) : pid_(pid) {}
  ChildGuard(const ChildGuard&) = delete;
  ChildGuard& operator=(const ChildGuard&) = delete;
  ~ChildGuard();
  // The test waited for the child itself: its pid may be reused and is never signalled again.
  void reaped() { pid_ = -1; }

 private:
  pid_t pid_;
};

// Asserts at scope exit that the fd count is what it was at construction.
class FdLeakCheck {
 public:
  FdLeakCheck() : before_(open_fd_count()) {}
  ~FdLeakCheck() { CHECK(open_fd_count() == before_); }
  FdLeakCheck(const FdLeakCheck&) = delete;
  FdLeakCheck& operator=(const FdLeakCheck&) = delete;

 private:
  std::size_t before_;
};

inline bool is_root() {
  return ::geteuid() == 0;
}

// A fresh, empty temporary directory removed (recursively) at scope exit.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Writes `content` to `path` (created or truncated, mode 0644).
void write_file(const std::string& path, const std::string& content);

// A CA, and a certificate it signed for 127.0.0.1 and localhost, made with openssl beneath
// `dir`/`tag`: the files qbrokerd takes for TLS between brokers.
struct TestCerts {
  std::string ca, cert, key;
  TestCerts(const TempDir& dir, const std::string& tag);
  // --migration-cert, --migration-key and --migration-ca with these files.
  std::vector<std::string> args() const;
};

}  // namespace qbtest

// Skips the rest of a [privileged] test when not running as root.
#define QB_REQUIRE_ROOT()                         \
  do {                                            \
    if (!::qbtest::is_root()) {                   \
      WARN("skipped: needs root ([privileged])"); \
      return;                                     \
    }                                             \
  } while (0)
