// Sending and receiving file descriptors with SCM_RIGHTS over stream and seqpacket sockets.
//
// Received fds are owned from the first instruction: recv_with_fds() wraps each one in a
// UniqueFd before it inspects anything else, asks the kernel for MSG_CMSG_CLOEXEC, and closes
// every fd of a message that breaks a rule (truncated control data, more fds than allowed).
#pragma once

#include <cstddef>
#include <span>
#include <vector>

#include "fdpass/result.hpp"
#include "fdpass/unique_fd.hpp"

namespace fdpass {

// Linux accepts up to SCM_MAX_FD (253) per message; QEMU reads at most 16 per recvmsg, and the
// broker never needs more than one. The default cap follows QEMU.
inline constexpr std::size_t kDefaultMaxFds = 16;
inline constexpr std::size_t kKernelMaxFds = 253;

// Sends `data` with `fds` attached to the first byte. Retries EINTR. Never raises SIGPIPE.
// On a non-blocking socket a full buffer is errc::would_block and nothing was sent. A short
// count means the fds went with the bytes that were sent; the caller sends the rest plainly.
// `data` must not be empty when `fds` is not (the kernel drops fds sent with no data).
Result<std::size_t> send_with_fds(BorrowedFd sock, std::span<const std::byte> data,
                                  std::span<const BorrowedFd> fds);

struct Received {
  std::size_t bytes = 0;  // 0 with no fds means the peer closed (stream) or sent an empty datagram
  std::vector<UniqueFd> fds;
};

// Reads up to buf.size() bytes and up to `max_fds` fds. Retries EINTR.
//  - errc::too_many_fds: more fds arrived than max_fds; every one was closed, bytes are lost.
//  - errc::control_truncated: the kernel truncated the control data; the fds that did arrive
//    were closed.
//  - errc::message_truncated: a seqpacket/datagram message was longer than buf.
//  - errc::would_block: non-blocking socket with nothing to read.
Result<Received> recv_with_fds(BorrowedFd sock, std::span<std::byte> buf,
                               std::size_t max_fds = kDefaultMaxFds);

}  // namespace fdpass
