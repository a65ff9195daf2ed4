// fdpass/ is the libc-only bottom layer: owned fds, SCM_RIGHTS, the safe image opener, devices
// and sockets.
//
// Owned and borrowed file descriptors.
//
// Ownership rules (docs/architecture.md has the full list):
//  - An fd is owned by exactly one UniqueFd from the instruction that created it. There is no
//    implicit conversion to or from int; get() lends the number for a syscall, release() hands
//    ownership to something that closes it (exec, a kernel object), and is [[nodiscard]].
//  - A function that takes ownership takes UniqueFd by value; one that only uses the fd takes
//    BorrowedFd. BorrowedFd is to UniqueFd what string_view is to string.
//  - Every fd the project creates is O_CLOEXEC, so a spawned child gets only what the spawner
//    places on purpose.
#pragma once

#include <unistd.h>

#include <cerrno>
#include <utility>

namespace fdpass {

class BorrowedFd;

class UniqueFd {
 public:
  UniqueFd() noexcept = default;
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    reset(other.release());
    return *this;
  }
  ~UniqueFd() { reset(); }

  int get() const noexcept { return fd_; }
  bool valid() const noexcept { return fd_ >= 0; }
  explicit operator bool() const noexcept { return valid(); }

  [[nodiscard]] int release() noexcept { return std::exchange(fd_, -1); }

  // Closes the held fd (if any) and takes `fd`. Keeps errno, so it is safe in error paths.
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0 && fd_ != fd) {
      int saved = errno;
      // No EINTR retry: on Linux the fd is released even when close() reports EINTR, and a
      // retry could close an fd another thread just received.
      ::close(fd_);
      errno = saved;
    }
    fd_ = fd;
  }

  BorrowedFd borrow() const noexcept;

 private:
  int fd_ = -1;
};

class BorrowedFd {
 public:
  constexpr BorrowedFd() noexcept = default;
  explicit constexpr BorrowedFd(int fd) noexcept : fd_(fd) {}
  BorrowedFd(const UniqueFd& fd) noexcept : fd_(fd.get()) {}  // NOLINT: borrowing is implicit
  constexpr int get() const noexcept { return fd_; }
  constexpr bool valid() const noexcept { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

inline BorrowedFd UniqueFd::borrow() const noexcept { return BorrowedFd(fd_); }

struct FdPair {
  UniqueFd first;
  UniqueFd second;
};

}  // namespace fdpass
