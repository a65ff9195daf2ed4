// VNC: QEMU runs with `-vnc none` in its own network namespace, so it cannot listen anywhere a
// client could reach. The broker binds the listener in the host namespace and hands it over.
//
// Set:    bind (TCP on a numeric address, or a Unix socket path, mode 0600, owner root) ->
//         display_update: getfd qb-vnc -> display-update {vnc, addresses: [fd qb-vnc]} (QEMU 7.1+;
//                         QEMU takes the named fd and replaces any listener it had)
//         add_client:     the broker keeps the listener; for each connection it accepts:
//                         getfd qb-vnc-client -> add_client {vnc, fdname qb-vnc-client}
//         automatic:      display_update, and add_client when QEMU lacks display-update.
// Remove: display-update with no addresses (or stop the accept loop) -> unlink a Unix path.
// Connected clients stay connected: QEMU has no command that drops VNC clients.
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "broker/core/errc.hpp"
#include "broker/core/log.hpp"
#include "broker/flows/common.hpp"
#include "broker/flows/flows.hpp"
#include "fdpass/devices.hpp"
#include "fdpass/errc.hpp"
#include "qmp/client.hpp"

namespace broker::flows {
using namespace detail;
namespace asio = boost::asio;

namespace {

struct Listener {
  fdpass::UniqueFd fd;
  std::string address;    // what clients connect to
  std::string unix_path;  // set for Unix listeners: the broker removes it again
};

Result<Listener> bind_listener(const VncListen& spec) {
  Listener l;
  if (spec.is_unix()) {
    l.unix_path = spec.unix_path;
    struct stat st {};
    // listen_unix() renames its socket into place: never over something that is not a socket.
    if (::lstat(l.unix_path.c_str(), &st) == 0 && !S_ISSOCK(st.st_mode)) {
      return field_error("listen", l.unix_path + " exists and is not a socket");
    }
    auto fd = fdpass::listen_unix(l.unix_path, 0600, 0, 0);
    if (!fd) return field_error("listen", "cannot listen on " + l.unix_path + ": " + fd.error().message());
    l.fd = std::move(*fd);
    l.address = spec.text();
    return l;
  }
  auto fd = fdpass::listen_tcp(spec.host, spec.port);
  if (!fd) {
    return field_error("listen", "cannot listen on " + spec.text() + ": " + fd.error().message() +
                                     (fd.error() == fdpass::errc::invalid_argument
                                          ? " (the host must be a numeric IPv4 or IPv6 address)"
                                          : ""));
  }
  auto bound = fdpass::local_port(*fd);
  if (!bound) return field_error("listen", "cannot read the bound port: " + bound.error().message());
  l.fd = std::move(*fd);
  VncListen actual = spec;
  actual.port = *bound;
  l.address = actual.text();
  return l;
}

// Removes a Unix listener's path the broker made, if it still names a socket.
void unlink_socket(const std::string& path) {
  struct stat st {};
  if (!path.empty() && ::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(path.c_str());
}

std::string unix_path_of(const std::optional<VncState>& v) { return v ? v->spec.listen.unix_path : ""; }

// The add_client hand-over: a loop that accepts on the broker's listener and passes each
// connection to QEMU. It runs beside the domain's jobs (QMP orders the fd commands). Domain holds
// an AcceptorHandle; destroying it (VNC removed or replaced, domain gone) stops the loop, which
// then touches nothing of the domain again.
struct Acceptor {
  Acceptor(asio::any_io_executor ex, fdpass::UniqueFd fd, Domain* dom, std::chrono::milliseconds t)
      : sock(ex, fd.release()), d(dom), timeout(t) {}
  asio::posix::stream_descriptor sock;
  Domain* d;
  std::chrono::milliseconds timeout;
  bool stopped = false;
};

struct AcceptorHandle {
  explicit AcceptorHandle(std::shared_ptr<Acceptor> acc) : a(std::move(acc)) {}
  AcceptorHandle(const AcceptorHandle&) = delete;
  AcceptorHandle& operator=(const AcceptorHandle&) = delete;
  ~AcceptorHandle() {
    a->stopped = true;
    boost::system::error_code ignored;
    a->sock.close(ignored);  // wakes the loop with operation_aborted
  }
  std::shared_ptr<Acceptor> a;
};

awaitable<void> accept_loop(std::shared_ptr<Acceptor> a) {
  for (;;) {
    auto [ec] = co_await a->sock.async_wait(asio::posix::stream_descriptor::wait_read,
                                            asio::as_tuple(asio::use_awaitable));
    if (a->stopped) co_return;
    if (ec) {
      log::warn("domain " + a->d->name() + ": VNC listener: " + ec.message() + "; no more clients");
      co_return;
    }
    fdpass::UniqueFd conn(::accept4(a->sock.native_handle(), nullptr, nullptr,
                                    SOCK_CLOEXEC | SOCK_NONBLOCK));
    if (!conn) {
      if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED) continue;
      log::warn("domain " + a->d->name() + ": VNC accept: " + std::string(std::strerror(errno)));
      asio::steady_timer backoff(a->sock.get_executor(), std::chrono::milliseconds(100));
      co_await backoff.async_wait(asio::as_tuple(asio::use_awaitable));
      if (a->stopped) co_return;
      continue;
    }
    if (a->d->qmp() == nullptr) continue;  // QEMU is gone; the client is dropped
    qmp::Command pass = qmp::cmd::getfd(kVncClientFd);
    const fdpass::BorrowedFd client_fd = conn.borrow();
    auto passed = co_await a->d->qmp()->execute_with_fd(std::move(pass), client_fd,
                                                        qmp::after(a->timeout));
    if (a->stopped) co_return;
    conn.reset();
    if (!passed || a->d->qmp() == nullptr) continue;
    qmp::Command add = qmp::cmd::add_client(qmp::cmd::ClientProtocol::vnc, kVncClientFd, false);
    auto added = co_await a->d->qmp()->execute(std::move(add), qmp::after(a->timeout));
    if (a->stopped) co_return;
    if (!added) log::warn("domain " + a->d->name() + ": add_client: " + added.error().message);
  }
}

Result<void> start_acceptor(Context& ctx, Domain& d, fdpass::UniqueFd fd) {
  if (auto nb = fdpass::set_nonblocking(fd, true); !nb) {
    return Error(nb.error(), "VNC listener: cannot make it non-blocking");
  }
  auto a = std::make_shared<Acceptor>(ctx.ex, std::move(fd), &d, ctx.timeouts.qmp);
  asio::co_spawn(ctx.ex, accept_loop(a), asio::detached);
  d.vnc_acceptor = std::make_shared<AcceptorHandle>(std::move(a));  // stops any previous loop
  return {};
}

// Removes a Unix listener the broker bound for a handover that did not happen.
class SocketCleanup {
 public:
  explicit SocketCleanup(std::string path) : path_(std::move(path)) {}
  SocketCleanup(const SocketCleanup&) = delete;
  SocketCleanup& operator=(const SocketCleanup&) = delete;
  ~SocketCleanup() { unlink_socket(path_); }
  void commit() { path_.clear(); }

 private:
  std::string path_;
};

// Hands the listener to QEMU with getfd + display-update. False when QEMU predates
// display-update (and the caller may fall back to add_client); the fd stays with the caller then.
awaitable<Result<bool>> hand_over_listener(Context& ctx, Domain& d, Listener& l) {
  // A copy goes to QEMU, so the broker still holds the listener when it must fall back.
  fdpass::UniqueFd copy(::fcntl(l.fd.get(), F_DUPFD_CLOEXEC, 0));
  if (!copy) co_return Error(std::error_code(errno, std::system_category()), "VNC listener: dup");
  lifecycle::FdHandover fds;
  fds.add_named(std::move(copy), std::string(kVncFd));
  if (auto ok = co_await hand_over(ctx, d, fds); !ok) co_return ok.error();
  qmp::Command update = qmp::cmd::display_update_vnc_fd(kVncFd);
  auto r = co_await call(ctx, d, std::move(update));
  if (r) {
    l.fd.reset();  // QEMU listens on its copy now
    co_return true;
  }
  // QEMU did not take the named fd: give it back.
  Undo undo;
  undo.push_all(fds.rollback());
  co_await undo.run(ctx, d);
  // Only a QEMU without display-update (before 7.1) falls back; any other refusal is real.
  if (ctx.vnc == VncHandover::display_update || r.error().qmp_class != "CommandNotFound") {
    co_return r.error();
  }
  log::info("domain " + d.name() + ": display-update refused (" + r.error().describe() +
            "); handing VNC clients over one by one with add_client");
  co_return false;
}

// Keeps the listener in the broker and passes QEMU each client, after QEMU drops its own.
awaitable<Result<void>> relay_clients(Context& ctx, Domain& d, Listener& l, bool qemu_listens) {
  if (qemu_listens) {
    qmp::Command none = qmp::cmd::display_update_vnc_none();
    auto r = co_await call(ctx, d, std::move(none));
    if (!r) co_return r.error();
  }
  co_return start_acceptor(ctx, d, std::move(l.fd));
}

}  // namespace

awaitable<Result<VncState>> set_vnc(Context& ctx, Domain& d, VncSpec vnc) {
  auto q = qmp_client(d);
  if (!q) co_return q.error();
  auto l = bind_listener(vnc.listen);
  if (!l) co_return l.error();
  const std::string old_path = unix_path_of(d.vnc);
  const bool qemu_listens = d.vnc && !d.vnc_acceptor;  // QEMU holds an earlier listener
  SocketCleanup cleanup(l->unix_path != old_path ? l->unix_path : "");

  bool handed_over = false;
  if (ctx.vnc != VncHandover::add_client) {
    auto r = co_await hand_over_listener(ctx, d, *l);
    if (!r) co_return r.error();
    handed_over = *r;
    if (handed_over) d.vnc_acceptor.reset();
  }
  if (!handed_over) {
    if (auto ok = co_await relay_clients(ctx, d, *l, qemu_listens); !ok) co_return ok.error();
  }
  cleanup.commit();
  if (!old_path.empty() && old_path != l->unix_path) unlink_socket(old_path);
  d.vnc = VncState{std::move(vnc), l->address};
  co_return *d.vnc;
}

awaitable<Result<void>> remove_vnc(Context& ctx, Domain& d) {
  if (!d.vnc) {
    Error e(make_error_code(errc::not_found), "domain " + d.name() + " has no VNC listener");
    co_return e;
  }
  if (d.vnc_acceptor) {
    d.vnc_acceptor.reset();
  } else {
    qmp::Command none = qmp::cmd::display_update_vnc_none();
    auto r = co_await call(ctx, d, std::move(none));
    if (!r) co_return r.error();
  }
  unlink_socket(unix_path_of(d.vnc));
  d.vnc.reset();
  co_return Result<void>{};
}

}  // namespace broker::flows
