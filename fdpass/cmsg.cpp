#include "fdpass/cmsg.hpp"

#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "fdpass/errc.hpp"

namespace fdpass {
namespace {

bool is_would_block(int e) { return e == EAGAIN || e == EWOULDBLOCK; }

}  // namespace

Result<std::size_t> send_with_fds(BorrowedFd sock, std::span<const std::byte> data,
                                  std::span<const BorrowedFd> fds) {
  if (fds.size() > kKernelMaxFds || (!fds.empty() && data.empty())) {
    return make_error_code(errc::invalid_argument);
  }
  iovec iov{const_cast<std::byte*>(data.data()), data.size()};  // NOLINT: sendmsg API
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;

  // Sized for the largest message the kernel accepts; aligned as cmsghdr requires.
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kKernelMaxFds)];
  if (!fds.empty()) {
    std::memset(control, 0, sizeof(control));
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    auto* out = reinterpret_cast<unsigned char*>(CMSG_DATA(c));
    for (std::size_t i = 0; i < fds.size(); ++i) {
      int n = fds[i].get();
      std::memcpy(out + i * sizeof(int), &n, sizeof(int));
    }
  }
  for (;;) {
    ssize_t n = ::sendmsg(sock.get(), &msg, MSG_NOSIGNAL);
    if (n >= 0) return static_cast<std::size_t>(n);
    if (errno == EINTR) continue;
    if (is_would_block(errno)) return make_error_code(errc::would_block);
    return last_error();
  }
}

Result<Received> recv_with_fds(BorrowedFd sock, std::span<std::byte> buf, std::size_t max_fds) {
  iovec iov{buf.data(), buf.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  // Always room for the kernel's maximum, so the kernel never has to truncate and the surplus
  // over max_fds is received (owned) and closed here rather than lost inside the kernel.
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kKernelMaxFds)];
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);

  ssize_t n;
  do {
    n = ::recvmsg(sock.get(), &msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (is_would_block(errno)) return make_error_code(errc::would_block);
    return last_error();
  }

  Received out;
  out.bytes = static_cast<std::size_t>(n);
  // Take ownership of every fd before looking at anything else.
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const auto* in = reinterpret_cast<const unsigned char*>(CMSG_DATA(c));
    for (std::size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, in + i * sizeof(int), sizeof(int));
      out.fds.emplace_back(fd);
    }
  }
  if (msg.msg_flags & MSG_CTRUNC) return make_error_code(errc::control_truncated);
  if (out.fds.size() > max_fds) return make_error_code(errc::too_many_fds);
  if (msg.msg_flags & MSG_TRUNC) return make_error_code(errc::message_truncated);
  return out;
}

}  // namespace fdpass
