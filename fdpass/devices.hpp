// Kernel objects the broker creates for a domain: loop devices, taps, listening sockets, pairs.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "fdpass/opener.hpp"
#include "fdpass/result.hpp"
#include "fdpass/unique_fd.hpp"

namespace fdpass {

// A loop device bound to a regular file with LO_FLAGS_AUTOCLEAR: it exists for exactly as long
// as some fd to it is open, so holding `fd` keeps the device and closing the last fd detaches it.
// The diskseq taken right after configuring names this attachment and no later one (seed 004).
struct LoopDevice {
  UniqueFd fd;
  std::string path;  // /dev/loopN, for logs only
  dev_t rdev = 0;
  std::uint64_t diskseq = 0;
};
Result<LoopDevice> attach_loop(BorrowedFd backing, Access access);

// A tap device from /dev/net/tun with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR. An empty name lets the
// kernel pick one (tapN). The actual name is returned.
struct Tap {
  UniqueFd fd;
  std::string name;
};
Result<Tap> open_tap(std::string_view name, bool vnet_hdr = true);

// A listening Unix stream socket at `path` with exactly `mode`, `owner` and `group`. The socket
// is bound under a temporary name in the same directory, which only root can use (mode 0600
// before bind), then given its mode and owner, then renamed into place: no window exists where
// umask or a pre-existing owner decides who can connect. An existing socket at `path` is replaced.
Result<UniqueFd> listen_unix(const std::string& path, mode_t mode, uid_t owner, gid_t group,
                             int backlog = 64);

// A Unix socket bound to the abstract namespace or to nothing, for tests.
Result<UniqueFd> connect_unix(const std::string& path);

// A TCP listener bound in the caller's network namespace. `host` is a numeric IPv4 or IPv6
// address; port 0 picks a free port (see local_port()).
Result<UniqueFd> listen_tcp(std::string_view host, std::uint16_t port, int backlog = 16);
Result<std::uint16_t> local_port(BorrowedFd sock);

// Owned pairs, O_CLOEXEC.
Result<FdPair> make_socketpair(int type);  // SOCK_STREAM or SOCK_SEQPACKET
Result<FdPair> make_pipe();                // first = read end, second = write end

// Sets or clears O_NONBLOCK.
Result<void> set_nonblocking(BorrowedFd fd, bool on);

}  // namespace fdpass
