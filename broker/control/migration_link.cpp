#include "broker/control/migration_link.hpp"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/json.hpp>
#include <charconv>
#include <optional>
#include <thread>
#include <vector>

#include "broker/control/tls_channel.hpp"
#include "broker/core/errc.hpp"

namespace broker {
namespace asio = boost::asio;
namespace ssl = boost::asio::ssl;
namespace json = boost::json;
using asio::awaitable;
using asio::ip::tcp;

namespace {

constexpr auto kAwait = asio::as_tuple(asio::use_awaitable);
constexpr std::size_t kRelayBuffer = 256 * 1024;  // TLS: one read from the socketpair
constexpr std::size_t kSpliceChunk = 1 << 20;     // plain: the pipe's size and one splice

Error link_error(std::string what, const boost::system::error_code& ec) {
  Error e(make_error_code(errc::qemu_error), std::move(what) + ": " + ec.message());
  e.field = "to";
  return e;
}

Error sys_error(int e, std::string what) {
  return Error(std::error_code(e, std::system_category()), std::move(what));
}

bool valid_port(std::string_view p) {
  unsigned v = 0;
  auto [end, ec] = std::from_chars(p.data(), p.data() + p.size(), v);
  return !p.empty() && ec == std::errc() && end == p.data() + p.size() && v >= 1 && v <= 65535;
}

// Splits "HOST:PORT" or "[V6]:PORT"; the host may be empty.
std::optional<std::pair<std::string, std::string>> split_host_port(std::string_view s) {
  std::string_view host, port;
  if (s.starts_with('[')) {
    auto close = s.find(']');
    if (close == std::string_view::npos || close + 1 >= s.size() || s[close + 1] != ':') return {};
    host = s.substr(1, close - 1);
    port = s.substr(close + 2);
  } else {
    auto colon = s.rfind(':');
    if (colon == std::string_view::npos) return {};
    host = s.substr(0, colon);
    port = s.substr(colon + 1);
    if (host.find(':') != std::string_view::npos) return {};  // an IPv6 address needs brackets
  }
  if (!valid_port(port)) return {};
  return std::make_pair(std::string(host), std::string(port));
}

}  // namespace

Result<TcpTarget> parse_tcp_target(std::string_view to) {
  constexpr std::string_view kScheme = "tcp://";
  auto bad = [&](std::string why) {
    Error e(make_error_code(errc::invalid_argument), "to: " + why);
    e.field = "to";
    return e;
  };
  if (!to.starts_with(kScheme)) return bad("a remote broker is tcp://HOST:PORT");
  auto hp = split_host_port(to.substr(kScheme.size()));
  if (!hp || hp->first.empty()) return bad("a remote broker is tcp://HOST:PORT, PORT 1 to 65535");
  for (char c : hp->first) {
    const bool ok =
        std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == ':' || c == '_';
    if (!ok) return bad("the host '" + hp->first + "' is not a host name or an address");
  }
  return TcpTarget{hp->first, hp->second};
}

Result<tcp::endpoint> parse_listen_address(std::string_view text) {
  auto bad = [&](std::string why) {
    Error e(make_error_code(errc::invalid_argument), std::move(why));
    e.field = "migration-listen";
    return e;
  };
  auto hp = split_host_port(text);
  if (!hp) return bad("must be ADDRESS:PORT, [IPV6]:PORT or *:PORT, PORT 1 to 65535");
  const auto port = static_cast<unsigned short>(std::stoul(hp->second));
  if (hp->first.empty() || hp->first == "*") return tcp::endpoint(tcp::v6(), port);
  boost::system::error_code ec;
  auto addr = asio::ip::make_address(hp->first, ec);
  if (ec) return bad("'" + hp->first + "' is not an IP address");
  return tcp::endpoint(addr, port);
}

Result<std::shared_ptr<ssl::context>> make_tls_context(const MigrationTransport& t, bool server) {
  auto ctx =
      std::make_shared<ssl::context>(server ? ssl::context::tls_server : ssl::context::tls_client);
  ::SSL_CTX_set_min_proto_version(ctx->native_handle(), TLS1_3_VERSION);
  auto fail = [](std::string field, std::string what, const boost::system::error_code& ec) {
    Error e(make_error_code(errc::invalid_argument), what + ": " + ec.message());
    e.field = std::move(field);
    return e;
  };
  boost::system::error_code ec;
  ctx->use_certificate_chain_file(t.cert, ec);
  if (ec) return fail("migration-cert", "cannot use the certificate " + t.cert, ec);
  ctx->use_private_key_file(t.key, ssl::context::pem, ec);
  if (ec) return fail("migration-key", "cannot use the private key " + t.key, ec);
  if (::SSL_CTX_check_private_key(ctx->native_handle()) != 1) {
    Error e(make_error_code(errc::invalid_argument),
            "the private key " + t.key + " does not belong to the certificate " + t.cert);
    e.field = "migration-key";
    return e;
  }
  ctx->load_verify_file(t.ca, ec);
  if (ec) return fail("migration-ca", "cannot use the CA bundle " + t.ca, ec);
  ctx->set_verify_mode(ssl::verify_peer | ssl::verify_fail_if_no_peer_cert);
  return ctx;
}

void widen_relay_buffers(int fd) {
  constexpr int kBytes = 4 << 20;
  for (int opt : {SO_SNDBUFFORCE, SO_RCVBUFFORCE}) {
    if (::setsockopt(fd, SOL_SOCKET, opt, &kBytes, sizeof kBytes) != 0) {
      ::setsockopt(fd, SOL_SOCKET, opt == SO_SNDBUFFORCE ? SO_SNDBUF : SO_RCVBUF, &kBytes,
                   sizeof kBytes);
    }
  }
}

struct MigrationLink::Impl {
  asio::any_io_executor ex;
  std::shared_ptr<ssl::context> ctx;
  std::optional<tcp::socket> sock;
  std::unique_ptr<TlsChannel> secure;  // null: plain TCP
  std::string pending;                 // read past the end of the last line
  std::string peer;
  bool closed = false;

  tcp::socket& socket() { return *sock; }

  awaitable<std::tuple<boost::system::error_code, std::size_t>> read_some(asio::mutable_buffer b) {
    if (secure) co_return co_await secure->read_some(*sock, b);
    co_return co_await sock->async_read_some(b, kAwait);
  }
  awaitable<boost::system::error_code> write_all(asio::const_buffer b) {
    if (secure) co_return co_await secure->write_all(*sock, b);
    auto [ec, n] = co_await asio::async_write(*sock, b, kAwait);
    co_return ec;
  }
  void close() {
    closed = true;
    boost::system::error_code ignored;
    // Wakes a relay thread blocked on its duplicate of the socket (splice_all).
    socket().shutdown(tcp::socket::shutdown_both, ignored);
    socket().close(ignored);
  }
};

namespace {

// Closes the link when `dog` expires first; the caller cancels `dog` when its operation ends.
void arm(asio::steady_timer& dog, std::chrono::milliseconds timeout,
         std::weak_ptr<MigrationLink::Impl> link, std::shared_ptr<bool> fired) {
  dog.expires_after(timeout);
  dog.async_wait([link = std::move(link), fired = std::move(fired)](boost::system::error_code ec) {
    if (ec) return;
    *fired = true;
    if (auto l = link.lock()) {
      boost::system::error_code ignored;
      l->socket().close(ignored);
    }
  });
}

// A peer host that goes away without a word (power, network) ends the connection within a
// minute: the destination's incoming QEMU then sees its stream end and is torn down, where it
// would otherwise wait for ever.
void keep_alive(tcp::socket& s) {
  boost::system::error_code ignored;
  s.set_option(tcp::socket::keep_alive(true), ignored);
  const int fd = s.native_handle();
  const int idle = 30, interval = 5, count = 6;
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count);
}

std::string endpoint_text(const tcp::socket& s) {
  boost::system::error_code ec;
  auto ep = s.remote_endpoint(ec);
  if (ec) return "?";
  return (ep.address().is_v6() ? "[" + ep.address().to_string() + "]" : ep.address().to_string()) +
         ":" + std::to_string(ep.port());
}

}  // namespace

MigrationLink::MigrationLink(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
MigrationLink::~MigrationLink() {
  if (impl_) impl_->close();
}

bool MigrationLink::tls() const {
  return impl_->secure != nullptr;
}
std::string MigrationLink::peer() const {
  return impl_->peer;
}
void MigrationLink::close() {
  impl_->close();
}
void MigrationLink::shutdown_send() {
  boost::system::error_code ignored;
  impl_->socket().shutdown(tcp::socket::shutdown_send, ignored);
}

awaitable<Result<std::unique_ptr<MigrationLink>>> MigrationLink::connect(
    asio::any_io_executor ex, std::shared_ptr<ssl::context> tls, TcpTarget target,
    std::chrono::milliseconds timeout) {
  const std::string where = target.host + ":" + target.port;
  tcp::resolver resolver(ex);
  auto [rec, found] = co_await resolver.async_resolve(target.host, target.port, kAwait);
  if (rec) co_return link_error("migration: resolving " + target.host, rec);

  auto shared = std::make_shared<Impl>();
  shared->ex = ex;
  shared->ctx = tls;
  shared->sock.emplace(ex);
  if (tls) {
    shared->secure =
        std::make_unique<TlsChannel>(tls->native_handle(), TlsChannel::Role::client, target.host);
  }
  asio::steady_timer dog(ex);
  auto fired = std::make_shared<bool>(false);
  arm(dog, timeout, shared, fired);
  auto [cec, ep] = co_await asio::async_connect(shared->socket(), found, kAwait);
  if (cec) {
    dog.cancel();
    co_return link_error("migration: connecting to " + where + (*fired ? " timed out" : ""), cec);
  }
  shared->socket().set_option(tcp::no_delay(true));
  keep_alive(shared->socket());
  shared->peer = endpoint_text(shared->socket());
  if (tls) {
    auto hec = co_await shared->secure->handshake(*shared->sock);
    if (hec) {
      dog.cancel();
      co_return link_error("migration: TLS with " + where + (*fired ? " timed out" : ""), hec);
    }
  }
  dog.cancel();
  co_return std::unique_ptr<MigrationLink>(new MigrationLink(std::move(shared)));
}

awaitable<Result<std::unique_ptr<MigrationLink>>> MigrationLink::accept(
    tcp::socket sock, std::shared_ptr<ssl::context> tls, std::chrono::milliseconds timeout) {
  auto ex = sock.get_executor();
  auto shared = std::make_shared<Impl>();
  shared->ex = ex;
  shared->ctx = tls;
  shared->peer = endpoint_text(sock);
  boost::system::error_code ignored;
  sock.set_option(tcp::no_delay(true), ignored);
  keep_alive(sock);
  shared->sock.emplace(std::move(sock));
  if (tls) {
    shared->secure = std::make_unique<TlsChannel>(tls->native_handle(), TlsChannel::Role::server);
    asio::steady_timer dog(ex);
    auto fired = std::make_shared<bool>(false);
    arm(dog, timeout, shared, fired);
    auto hec = co_await shared->secure->handshake(*shared->sock);
    dog.cancel();
    if (hec) {
      co_return link_error("migration: TLS with " + shared->peer + (*fired ? " timed out" : ""),
                           hec);
    }
  }
  co_return std::unique_ptr<MigrationLink>(new MigrationLink(std::move(shared)));
}

awaitable<Result<json::value>> MigrationLink::read_message(std::size_t max,
                                                           std::chrono::milliseconds timeout) {
  asio::steady_timer dog(impl_->ex);
  auto fired = std::make_shared<bool>(false);
  arm(dog, timeout, impl_, fired);
  std::array<char, 16384> chunk;
  std::size_t nl;
  while ((nl = impl_->pending.find('\n')) == std::string::npos) {
    if (impl_->pending.size() > max) {
      dog.cancel();
      co_return link_error(
          "migration: " + impl_->peer + " sent a message over " + std::to_string(max) + " bytes",
          {});
    }
    auto [ec, n] = co_await impl_->read_some(asio::buffer(chunk));
    if (ec) {
      dog.cancel();
      // TLS 1.3 ends the client's handshake before the server has judged its certificate: a
      // refusal arrives as an alert on the first read.
      const bool alert = impl_->secure && ec.category() == asio::error::get_ssl_category();
      co_return link_error(
          "migration: " +
              (alert ? impl_->peer + " refused this broker's certificate or ended TLS"
                     : "reading from " + impl_->peer) +
              (*fired ? ": no message in time" : ""),
          ec);
    }
    impl_->pending.append(chunk.data(), n);
  }
  dog.cancel();
  std::string line = impl_->pending.substr(0, nl);
  impl_->pending.erase(0, nl + 1);
  boost::system::error_code jec;
  json::value v = json::parse(line, jec);
  if (jec || !v.is_object()) {
    co_return link_error("migration: " + impl_->peer + " sent something that is not a JSON object",
                         jec);
  }
  co_return v;
}

awaitable<Result<void>> MigrationLink::write_message(const json::value& v) {
  std::string line = json::serialize(v) + "\n";
  auto ec = co_await impl_->write_all(asio::buffer(line));
  if (ec) co_return link_error("migration: writing to " + impl_->peer, ec);
  co_return Result<void>{};
}

namespace {

struct Pipe {
  fdpass::UniqueFd r, w;
};

Result<Pipe> make_pipe() {
  int p[2];
  if (::pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) return sys_error(errno, "migration: pipe");
  Pipe pipe{fdpass::UniqueFd(p[0]), fdpass::UniqueFd(p[1])};
  ::fcntl(p[1], F_SETPIPE_SZ, static_cast<int>(kSpliceChunk));  // best effort
  return pipe;
}

// The plain relay's copy: on a thread of its own, blocking, from `from` into the pipe and on to
// `to` until EOF, an error, or a shutdown of the link's socket (MigrationLink::close). Blocking
// splice on a thread moves the stream with no event loop round trip per chunk; the bytes never
// enter user space.
struct SpliceJob {
  explicit SpliceJob(asio::any_io_executor e)
      : ex(e), wake(e, asio::steady_timer::time_point::max()) {}
  asio::any_io_executor ex;
  fdpass::UniqueFd from, to;
  Pipe pipe;
  std::uint64_t bytes = 0;
  int error = 0;
  const char* failed_at = "";
  bool done = false;
  asio::steady_timer wake;
};

// A copy in the other direction over the same socket (an NBD connection) may put its flags back
// to non-blocking first: EAGAIN then waits for the fd instead of ending the copy.
bool wait_ready(int fd, short events) {
  if (errno != EAGAIN && errno != EWOULDBLOCK) return errno == EINTR;
  pollfd p{fd, events, 0};
  return ::poll(&p, 1, -1) >= 0 || errno == EINTR;
}

void splice_all(SpliceJob& j) {
  for (;;) {
    ssize_t in =
        ::splice(j.from.get(), nullptr, j.pipe.w.get(), nullptr, kSpliceChunk, SPLICE_F_MOVE);
    if (in == 0) return;
    if (in < 0) {
      if (wait_ready(j.from.get(), POLLIN)) continue;
      j.error = errno;
      j.failed_at = "read";
      return;
    }
    for (auto left = static_cast<std::size_t>(in); left > 0;) {
      ssize_t out = ::splice(j.pipe.r.get(), nullptr, j.to.get(), nullptr, left,
                             SPLICE_F_MOVE | SPLICE_F_MORE);
      if (out < 0 && wait_ready(j.to.get(), POLLOUT)) continue;
      if (out <= 0) {
        j.error = out < 0 ? errno : EPIPE;
        j.failed_at = "write";
        return;
      }
      left -= static_cast<std::size_t>(out);
      j.bytes += static_cast<std::uint64_t>(out);
    }
  }
}

void start_splice_thread(std::shared_ptr<SpliceJob> job) {
  std::thread([job] {
    splice_all(*job);
    asio::post(job->ex, [job] {
      job->done = true;
      job->wake.cancel();
    });
  }).detach();
}

// Runs the blocking copy from `from` to `to` on its thread and waits for it. Both fds are made
// blocking for it (a duplicate of the link's socket shares its flags: they are put back after).
awaitable<Result<std::uint64_t>> splice_on_thread(asio::any_io_executor ex, int from, int to) {
  auto job = std::make_shared<SpliceJob>(ex);
  auto pipe = make_pipe();
  if (!pipe) co_return pipe.error();
  job->pipe = std::move(*pipe);
  job->from.reset(::fcntl(from, F_DUPFD_CLOEXEC, 0));
  job->to.reset(::fcntl(to, F_DUPFD_CLOEXEC, 0));
  if (!job->from || !job->to) co_return sys_error(errno, "migration: relay: dup");
  const int from_flags = ::fcntl(from, F_GETFL);
  const int to_flags = ::fcntl(to, F_GETFL);
  ::fcntl(from, F_SETFL, from_flags & ~O_NONBLOCK);
  ::fcntl(to, F_SETFL, to_flags & ~O_NONBLOCK);
  ::fcntl(job->pipe.r.get(), F_SETFL, 0);
  ::fcntl(job->pipe.w.get(), F_SETFL, 0);
  start_splice_thread(job);
  if (!job->done) co_await job->wake.async_wait(kAwait);
  // Through the duplicates: the numbers `from` and `to` may have been closed meanwhile (the link
  // closed) and reused; the flags belong to the open file, which the duplicates still hold.
  ::fcntl(job->from.get(), F_SETFL, from_flags);
  ::fcntl(job->to.get(), F_SETFL, to_flags);
  if (job->error != 0) {
    co_return sys_error(job->error, std::string("migration: relay ") + job->failed_at);
  }
  co_return job->bytes;
}

// The link ended: QEMU sees EOF on its socketpair after the last byte.
Result<RelayStats> ended(int local, RelayStats stats) {
  ::shutdown(local, SHUT_WR);
  return stats;
}

}  // namespace

awaitable<Result<RelayStats>> MigrationLink::relay_from(fdpass::UniqueFd local_fd) {
  RelayStats stats;
  ::fcntl(local_fd.get(), F_SETFL, ::fcntl(local_fd.get(), F_GETFL) | O_NONBLOCK);
  asio::posix::stream_descriptor local(impl_->ex, local_fd.release());
  if (impl_->secure) {
    std::vector<char> buf(kRelayBuffer);
    for (;;) {
      auto [ec, n] = co_await local.async_read_some(asio::buffer(buf), kAwait);
      if (ec == asio::error::eof) co_return stats;
      if (ec) co_return link_error("migration: reading QEMU's stream", ec);
      auto wec = co_await impl_->write_all(asio::buffer(buf.data(), n));
      if (wec) co_return link_error("migration: sending to " + impl_->peer, wec);
      stats.bytes += n;
    }
  }
  auto moved =
      co_await splice_on_thread(impl_->ex, local.native_handle(), impl_->sock->native_handle());
  if (!moved) co_return moved.error();
  stats.bytes = *moved;
  co_return stats;
}

awaitable<Result<RelayStats>> MigrationLink::relay_to(fdpass::UniqueFd local_fd) {
  RelayStats stats;
  ::fcntl(local_fd.get(), F_SETFL, ::fcntl(local_fd.get(), F_GETFL) | O_NONBLOCK);
  asio::posix::stream_descriptor local(impl_->ex, local_fd.release());
  if (!impl_->pending.empty()) {
    auto [ec, n] = co_await asio::async_write(local, asio::buffer(impl_->pending), kAwait);
    if (ec) co_return link_error("migration: writing to QEMU", ec);
    stats.bytes += n;
    impl_->pending.clear();
  }
  if (impl_->secure) {
    std::vector<char> buf(kRelayBuffer);
    for (;;) {
      auto [ec, n] = co_await impl_->read_some(asio::buffer(buf));
      if (ec && (ec == asio::error::eof || ec == ssl::error::stream_truncated || impl_->closed)) {
        co_return ended(local.native_handle(), stats);
      }
      if (ec) co_return link_error("migration: receiving from " + impl_->peer, ec);
      auto [wec, m] = co_await asio::async_write(local, asio::buffer(buf.data(), n), kAwait);
      if (wec) co_return link_error("migration: writing to QEMU", wec);
      stats.bytes += n;
    }
  }
  auto moved =
      co_await splice_on_thread(impl_->ex, impl_->sock->native_handle(), local.native_handle());
  if (!moved && !impl_->closed) co_return moved.error();
  stats.bytes += moved ? *moved : 0;
  co_return ended(local.native_handle(), stats);
}

RelayWatch::RelayWatch(asio::any_io_executor ex)
    : wake(ex, asio::steady_timer::time_point::max()) {}

awaitable<void> watch_relay(std::shared_ptr<MigrationLink> link, fdpass::UniqueFd local,
                            RelayDirection direction, std::shared_ptr<RelayWatch> done) {
  if (direction == RelayDirection::from_local) {
    done->result = co_await link->relay_from(std::move(local));
  } else {
    done->result = co_await link->relay_to(std::move(local));
  }
  done->wake.cancel();
}

awaitable<void> wait_relay(RelayWatch& done, std::chrono::milliseconds timeout) {
  if (done.result) co_return;
  done.wake.expires_after(timeout);
  co_await done.wake.async_wait(kAwait);
}

awaitable<Result<void>> relay_both_ways(std::shared_ptr<MigrationLink> link,
                                        fdpass::UniqueFd local) {
  fdpass::UniqueFd back(::fcntl(local.get(), F_DUPFD_CLOEXEC, 0));
  if (!back) co_return sys_error(errno, "migration: relay: dup");
  auto ex = co_await asio::this_coro::executor;
  auto done = std::make_shared<RelayWatch>(ex);
  asio::co_spawn(ex, watch_relay(link, std::move(back), RelayDirection::to_local, done),
                 asio::detached);
  auto sent = co_await link->relay_from(std::move(local));
  if (sent)
    link->shutdown_send();  // the peer reads the end of this direction
  else
    link->close();
  if (!done->result) co_await done->wake.async_wait(kAwait);
  link->close();
  if (!sent) co_return sent.error();
  if (!*done->result) co_return done->result->error();
  co_return Result<void>{};
}

}  // namespace broker
