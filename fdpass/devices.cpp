#include "fdpass/devices.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <linux/loop.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "fdpass/errc.hpp"

namespace fdpass {
namespace {

Result<sockaddr_un> unix_address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path) ||
      path.find('\0') != std::string::npos) {
    return make_error_code(errc::bad_path);
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

}  // namespace

Result<LoopDevice> attach_loop(BorrowedFd backing, Access access) {
  UniqueFd control(::open("/dev/loop-control", O_RDWR | O_CLOEXEC));
  if (!control) return last_error();
  const int mode = access == Access::read_write ? O_RDWR : O_RDONLY;
  // Another process may take the free device between GET_FREE and CONFIGURE: try again.
  for (int attempt = 0; attempt < 16; ++attempt) {
    int index = ::ioctl(control.get(), LOOP_CTL_GET_FREE);
    if (index < 0) return last_error();
    std::string path = "/dev/loop" + std::to_string(index);
    UniqueFd dev(::open(path.c_str(), mode | O_CLOEXEC));
    if (!dev) return last_error();
    loop_config config{};
    config.fd = static_cast<__u32>(backing.get());
    config.info.lo_flags = LO_FLAGS_AUTOCLEAR |
                           (access == Access::read_only ? LO_FLAGS_READ_ONLY : 0);
    if (::ioctl(dev.get(), LOOP_CONFIGURE, &config) != 0) {
      if (errno == EBUSY) continue;
      return last_error();
    }
    struct stat st {};
    if (::fstat(dev.get(), &st) != 0) return last_error();
    auto seq = disk_sequence(dev);
    if (!seq) return seq.error();
    return LoopDevice{std::move(dev), std::move(path), st.st_rdev, *seq};
  }
  return make_error_code(std::errc::device_or_resource_busy);
}

Result<Tap> open_tap(std::string_view name, bool vnet_hdr) {
  if (name.size() >= IFNAMSIZ || name.find('\0') != std::string_view::npos ||
      name.find('/') != std::string_view::npos) {
    return make_error_code(errc::invalid_argument);
  }
  UniqueFd fd(::open("/dev/net/tun", O_RDWR | O_CLOEXEC));
  if (!fd) return last_error();
  ifreq ifr{};
  ifr.ifr_flags = static_cast<short>(IFF_TAP | IFF_NO_PI | (vnet_hdr ? IFF_VNET_HDR : 0));
  std::memcpy(ifr.ifr_name, name.data(), name.size());
  if (::ioctl(fd.get(), TUNSETIFF, &ifr) != 0) return last_error();
  return Tap{std::move(fd), std::string(ifr.ifr_name, ::strnlen(ifr.ifr_name, IFNAMSIZ))};
}

Result<UniqueFd> listen_unix(const std::string& path, mode_t mode, uid_t owner, gid_t group,
                             int backlog) {
  if ((mode & ~07777U) != 0) return make_error_code(errc::invalid_argument);
  static std::atomic<unsigned> counter{0};
  std::string temp = path + ".tmp." + std::to_string(::getpid()) + "." +
                     std::to_string(counter.fetch_add(1));
  auto addr = unix_address(temp);
  if (!addr) return addr.error();
  if (!unix_address(path)) return make_error_code(errc::bad_path);

  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return last_error();
  // The socket inode's mode (less umask) becomes the file's mode at bind: start owner-only, so
  // nobody else can connect before the final mode and owner are in place.
  if (::fchmod(fd.get(), 0600) != 0) return last_error();
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof(*addr)) != 0) {
    return last_error();
  }
  auto fail = [&temp]() -> std::error_code {
    auto ec = last_error();
    ::unlink(temp.c_str());
    return ec;
  };
  if (::fchownat(AT_FDCWD, temp.c_str(), owner, group, AT_SYMLINK_NOFOLLOW) != 0) return fail();
  if (::fchmodat(AT_FDCWD, temp.c_str(), mode, 0) != 0) return fail();
  if (::listen(fd.get(), backlog) != 0) return fail();
  if (::rename(temp.c_str(), path.c_str()) != 0) return fail();
  return fd;
}

Result<UniqueFd> connect_unix(const std::string& path) {
  auto addr = unix_address(path);
  if (!addr) return addr.error();
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return last_error();
  int rc;
  do {
    rc = ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof(*addr));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) return last_error();
  return fd;
}

Result<UniqueFd> listen_tcp(std::string_view host, std::uint16_t port, int backlog) {
  std::string h(host);
  sockaddr_storage ss{};
  socklen_t len = 0;
  int family = AF_INET;
  auto* v4 = reinterpret_cast<sockaddr_in*>(&ss);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&ss);
  if (::inet_pton(AF_INET, h.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(port);
    len = sizeof(*v4);
  } else if (::inet_pton(AF_INET6, h.c_str(), &v6->sin6_addr) == 1) {
    family = AF_INET6;
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(port);
    len = sizeof(*v6);
  } else {
    return make_error_code(errc::invalid_argument);
  }
  UniqueFd fd(::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return last_error();
  int one = 1;
  if (::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0) {
    return last_error();
  }
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&ss), len) != 0) return last_error();
  if (::listen(fd.get(), backlog) != 0) return last_error();
  return fd;
}

Result<std::uint16_t> local_port(BorrowedFd sock) {
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  if (::getsockname(sock.get(), reinterpret_cast<sockaddr*>(&ss), &len) != 0) return last_error();
  if (ss.ss_family == AF_INET) return ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  if (ss.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
  return make_error_code(errc::invalid_argument);
}

Result<FdPair> make_socketpair(int type) {
  if (type != SOCK_STREAM && type != SOCK_SEQPACKET && type != SOCK_DGRAM) {
    return make_error_code(errc::invalid_argument);
  }
  int fds[2];
  if (::socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, fds) != 0) return last_error();
  return FdPair{UniqueFd(fds[0]), UniqueFd(fds[1])};
}

Result<FdPair> make_pipe() {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return last_error();
  return FdPair{UniqueFd(fds[0]), UniqueFd(fds[1])};
}

Result<void> set_nonblocking(BorrowedFd fd, bool on) {
  int fl = ::fcntl(fd.get(), F_GETFL);
  if (fl < 0) return last_error();
  int want = on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK);
  if (want != fl && ::fcntl(fd.get(), F_SETFL, want) != 0) return last_error();
  return {};
}

}  // namespace fdpass
