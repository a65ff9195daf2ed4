#include "broker/daemon/systemd.hpp"

#include <fcntl.h>
#include <sys/socket.h>

#include <string>

#include "broker/core/errc.hpp"

#if QB_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

namespace broker::daemon {

Result<fdpass::UniqueFd> socket_from_systemd() {
#if QB_HAVE_SYSTEMD
  // unset_environment=1: QEMU and every other child must not see LISTEN_FDS.
  int n = ::sd_listen_fds(1);
  if (n < 0) return Error(std::error_code(-n, std::system_category()), "sd_listen_fds");
  if (n == 0) return fdpass::UniqueFd();
  if (n != 1) {
    return Error(make_error_code(errc::invalid_argument),
                 "systemd passed " + std::to_string(n) + " sockets; qbrokerd takes exactly one");
  }
  int fd = SD_LISTEN_FDS_START;
  if (::sd_is_socket_unix(fd, SOCK_STREAM, 1, nullptr, 0) <= 0) {
    return Error(make_error_code(errc::invalid_argument),
                 "the socket systemd passed is not a listening Unix stream socket");
  }
  ::fcntl(fd, F_SETFD, FD_CLOEXEC);  // systemd passes it inheritable; no child needs it
  return fdpass::UniqueFd(fd);
#else
  return fdpass::UniqueFd();
#endif
}

bool notify(std::string_view state) {
#if QB_HAVE_SYSTEMD
  return ::sd_notify(0, std::string(state).c_str()) > 0;
#else
  (void)state;
  return false;
#endif
}

}  // namespace broker::daemon
