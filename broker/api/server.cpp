#include "broker/api/server.hpp"

#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <list>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "broker/api/errc.hpp"
#include "broker/api/http_errors.hpp"
#include "broker/core/log.hpp"

namespace broker::api {
namespace asio = boost::asio;
namespace beast = boost::beast;
using asio::awaitable;
using asio::use_awaitable;
using stream_protocol = asio::local::stream_protocol;
using Clock = std::chrono::steady_clock;

bool authorized(const PeerCred& peer, const AccessPolicy& policy) {
  if (peer.uid == 0 || peer.uid == policy.owner) return true;
  if (!policy.admin_gid) return false;
  if (peer.gid == *policy.admin_gid) return true;
  return std::find(peer.groups.begin(), peer.groups.end(), *policy.admin_gid) != peer.groups.end();
}

std::optional<PeerCred> peer_credentials(int fd) {
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return std::nullopt;
  PeerCred p;
  p.pid = cred.pid;
  p.uid = cred.uid;
  p.gid = cred.gid;
  std::vector<gid_t> groups(32);
  for (int attempt = 0; attempt < 4; ++attempt) {
    socklen_t glen = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &glen) == 0) {
      groups.resize(glen / sizeof(gid_t));
      p.groups = std::move(groups);
      return p;
    }
    if (errno != ERANGE) break;
    groups.resize(glen / sizeof(gid_t) + 1);
  }
  return p;  // without supplementary groups: the primary gid still counts
}

namespace {

enum class Phase { idle, reading, executing, writing, streaming };

struct Conn {
  explicit Conn(stream_protocol::socket s)
      : sock(std::move(s)), watchdog(sock.get_executor()), stop(sock.get_executor()) {
    stop.expires_at(asio::steady_timer::time_point::max());
  }
  stream_protocol::socket sock;
  asio::steady_timer watchdog;  // cancels the socket's operations at a deadline
  asio::steady_timer stop;      // cancelled when the server stops (wakes event streams)
  PeerCred peer;
  bool reserved = false;  // holds a slot of the operators' reserve, not of the pool
  Phase phase = Phase::idle;
  std::uint64_t generation = 0;
  bool timed_out = false;
  bool stopping = false;
};

}  // namespace

struct Server::State {
  State(asio::any_io_executor e, Service& s, ServerLimits l, AccessPolicy a)
      : ex(e), service(&s), limits(l), access(a), acceptor(e), retry(e) {}
  asio::any_io_executor ex;
  Service* service;
  ServerLimits limits;
  AccessPolicy access;
  stream_protocol::acceptor acceptor;
  asio::steady_timer retry;
  std::list<std::shared_ptr<Conn>> conns;
  std::list<std::shared_ptr<Conn>> refusing;    // refused, being answered
  std::map<uid_t, std::size_t> per_uid;         // pool slots by peer uid
  std::map<pid_t, std::size_t> reserve_by_pid;  // reserve slots by peer process
  std::size_t reserved = 0;                     // reserve slots taken
  bool stopping = false;
  ServerStats stats;
};

namespace {

using StatePtr = std::shared_ptr<Server::State>;
using ConnPtr = std::shared_ptr<Conn>;

metrics::Registry& registry(const StatePtr& st) {
  return st->service->broker().metrics();
}

// Arms the connection's watchdog: at `d` from now, the socket's pending operations are cancelled
// and timed_out is set. A later arm() or disarm() makes an earlier expiry harmless.
void arm(const ConnPtr& c, std::chrono::milliseconds d) {
  std::uint64_t gen = ++c->generation;
  c->timed_out = false;
  c->watchdog.expires_after(d);
  std::weak_ptr<Conn> weak = c;
  c->watchdog.async_wait([weak, gen](boost::system::error_code ec) {
    auto conn = weak.lock();
    if (ec || !conn || conn->generation != gen) return;
    conn->timed_out = true;
    boost::system::error_code ignored;
    conn->sock.cancel(ignored);
  });
}

void disarm(const ConnPtr& c) {
  ++c->generation;
  c->watchdog.cancel();
}

Error api_error(api::errc code, std::string message) {
  return Error(make_error_code(code), std::move(message));
}

std::string rendered(const Outcome& o, bool keep_alive = false) {
  auto res = render(o, 11, keep_alive);
  std::ostringstream os;
  os << res;
  return os.str();
}

// Answers a connection that will not be served with one non-blocking send, then closes it: the
// answer when too many refusals are being answered already.
void refuse_at_once(stream_protocol::socket& sock, const Error& e) {
  std::string text = rendered(failure(e));
  (void)::send(sock.native_handle(), text.data(), text.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
  ::shutdown(sock.native_handle(), SHUT_WR);
  boost::system::error_code ignored;
  sock.close(ignored);
}

// Writes one response; for a HEAD request its header only (RFC 9110 9.3.2): the client reads no
// body after it, and a body sent anyway would be read as the next response.
awaitable<bool> write_response(ConnPtr c, const StatePtr& st, http::response<http::string_body> res,
                               bool head_only = false) {
  c->phase = Phase::writing;
  arm(c, st->limits.write_timeout);
  http::response_serializer<http::string_body> sr{res};
  auto [ec, n] = head_only
                     ? co_await http::async_write_header(c->sock, sr, asio::as_tuple(use_awaitable))
                     : co_await http::async_write(c->sock, sr, asio::as_tuple(use_awaitable));
  disarm(c);
  (void)n;
  co_return !ec;
}

// Writes an error response for a request that broke a limit, then the connection is done.
// Counted and logged as a request no route took: it was refused before it was routed.
awaitable<void> write_error(ConnPtr c, StatePtr st, Error e) {
  auto res = render(failure(e), 11, false);
  registry(st).api_request(metrics::Registry::kUnrouted, res.result_int(), {});
  log::info("request refused: " + std::to_string(res.result_int()) + " " + e.message,
            {{"STATUS", std::to_string(res.result_int())},
             {"UID", std::to_string(c->peer.uid)},
             {"CODE", classify(e.code).code}});
  co_await write_response(c, st, std::move(res));
}

// A piece of the event stream: a chunk, or for an HTTP/1.0 client, which knows no chunked
// coding, the bytes themselves (its body ends when the connection does, RFC 9112 6.3).
awaitable<bool> write_frame(const ConnPtr& c, const StatePtr& st, bool chunked,
                            std::string_view data) {
  arm(c, st->limits.write_timeout);
  auto [ec, n] = chunked ? co_await asio::async_write(c->sock, http::make_chunk(asio::buffer(data)),
                                                      asio::as_tuple(use_awaitable))
                         : co_await asio::async_write(c->sock, asio::buffer(data),
                                                      asio::as_tuple(use_awaitable));
  disarm(c);
  (void)n;
  co_return !ec;
}

awaitable<void> wait_stop(ConnPtr c) {
  auto [ec] = co_await c->stop.async_wait(asio::as_tuple(use_awaitable));
  (void)ec;
}

// What the socket's send buffer holds (SO_SNDBUF), read once per stream; 0 when unknown.
int send_capacity(int fd) {
  int capacity = 0;
  socklen_t len = sizeof(capacity);
  return ::getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &capacity, &len) == 0 ? capacity : 0;
}

// A consumer is behind when more than half of its socket's send buffer is unread. The stream
// stops writing there, which leaves room for one last frame that says so.
bool consumer_behind(int fd, int capacity) {
  int unread = 0;
  return capacity > 0 && ::ioctl(fd, SIOCOUTQ, &unread) == 0 && unread > capacity / 2;
}

// Waits for a consumer that is behind to read: the socket turns writable once three quarters
// of its buffer are free. False at write_timeout, or when the server stops.
awaitable<bool> consumer_caught_up(const ConnPtr& c, const StatePtr& st) {
  using namespace asio::experimental::awaitable_operators;
  arm(c, st->limits.write_timeout);
  auto woke = co_await (
      c->sock.async_wait(stream_protocol::socket::wait_write, asio::as_tuple(use_awaitable)) ||
      wait_stop(c));
  disarm(c);
  co_return woke.index() == 0 && !std::get<0>(std::get<0>(woke)) && !c->stopping;
}

// The frame that ends the stream of a consumer that stopped reading: a "dropped" event like the
// one the event bus queues when a subscriber's queue overflows, with the id of the last event
// sent.
std::string stalled_frame(const EventStream& stream, std::uint64_t last_seq) {
  BusEvent dropped;
  dropped.seq = last_seq;
  dropped.kind = "dropped";
  dropped.name = "dropped";
  dropped.data = {{"queued", stream.queued()}, {"reason", "stalled"}};
  dropped.timestamp_us = std::chrono::duration_cast<std::chrono::microseconds>(
                             std::chrono::system_clock::now().time_since_epoch())
                             .count();
  return sse_frame(dropped);
}

// The event stream after its header, one frame at a time, until the peer goes, the stream ends
// (a "dropped" event from the bus), the server stops, or the consumer stalls. A consumer that is
// behind has write_timeout to catch up; then it is sent "dropped" and closed. False when a write
// failed: the stream cannot be ended cleanly.
awaitable<bool> pump_events(ConnPtr c, StatePtr st, EventStream& stream, bool chunked) {
  using namespace asio::experimental::awaitable_operators;
  std::uint64_t last_seq = 0;
  const int capacity = send_capacity(c->sock.native_handle());
  while (!c->stopping) {
    auto got = co_await (stream.next(Clock::now() + st->limits.heartbeat) || wait_stop(c));
    if (got.index() == 1 || c->stopping) co_return true;
    auto& event = std::get<0>(got);
    if (!event && stream.closed()) co_return true;
    if (consumer_behind(c->sock.native_handle(), capacity) && !co_await consumer_caught_up(c, st)) {
      if (c->stopping) co_return true;
      if (!co_await write_frame(c, st, chunked, stalled_frame(stream, last_seq))) co_return false;
      ++st->stats.events_sent;
      co_return true;
    }
    if (!event) {
      if (!co_await write_frame(c, st, chunked, ": keepalive\n\n")) co_return false;
      continue;
    }
    if (!co_await write_frame(c, st, chunked, sse_frame(*event))) co_return false;
    last_seq = event->seq;
    ++st->stats.events_sent;
    if (event->kind == "dropped") co_return true;  // the queue overflowed: told, then closed
  }
  co_return true;
}

// GET /v1/events: a text/event-stream until the peer goes, falls behind or the server stops;
// chunked, or delimited by the close for HTTP/1.0.
awaitable<void> stream_events(ConnPtr c, StatePtr st, unsigned version, std::string domain) {
  auto stream = st->service->broker().events().subscribe(domain, st->limits.event_queue);
  const bool chunked = version >= 11;
  http::response<http::empty_body> res{http::status::ok, version};
  res.set(http::field::server, kServerName);
  res.set(http::field::content_type, "text/event-stream");
  res.set(http::field::cache_control, "no-store");
  res.keep_alive(false);
  res.chunked(chunked);
  http::response_serializer<http::empty_body> sr{res};
  c->phase = Phase::writing;
  arm(c, st->limits.write_timeout);
  auto [ec, n] = co_await http::async_write_header(c->sock, sr, asio::as_tuple(use_awaitable));
  disarm(c);
  (void)n;
  if (ec) co_return;
  // A first comment tells the client the subscription is live (qbrokerctl waits for it before
  // it sends the request whose progress it shows).
  if (!co_await write_frame(c, st, chunked, ": subscribed\n\n")) co_return;
  c->phase = Phase::streaming;
  if (!co_await pump_events(c, st, *stream, chunked) || !chunked) co_return;
  arm(c, st->limits.write_timeout);
  auto [ec2, n2] =
      co_await asio::async_write(c->sock, http::make_chunk_last(), asio::as_tuple(use_awaitable));
  disarm(c);
  (void)ec2;
  (void)n2;
}

using Parser = http::request_parser<http::string_body>;

// Idle between requests: waits for the next request's first byte, at most idle_timeout. False
// when the peer was idle too long, went away, or the server is stopping: close quietly.
awaitable<bool> wait_for_request(const ConnPtr& c, const StatePtr& st) {
  c->phase = Phase::idle;
  arm(c, st->limits.idle_timeout);
  auto [ec] = co_await c->sock.async_wait(stream_protocol::socket::wait_read,
                                          asio::as_tuple(use_awaitable));
  disarm(c);
  co_return !ec && !c->stopping;
}

// The body, after a "100 Continue" when the client waits for one before it sends it.
awaitable<boost::system::error_code> read_body(const ConnPtr& c, beast::flat_buffer& buffer,
                                               Parser& parser) {
  if (beast::iequals(parser.get()[http::field::expect], "100-continue")) {
    static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
    auto [ec, n] =
        co_await asio::async_write(c->sock, asio::buffer(kContinue), asio::as_tuple(use_awaitable));
    (void)n;
    if (ec) co_return ec;
  }
  auto [ec, n] = co_await http::async_read(c->sock, buffer, parser, asio::as_tuple(use_awaitable));
  (void)n;
  co_return ec;
}

struct ReadResult {
  boost::system::error_code ec;
  bool timed_out = false;        // the watchdog ended the read, not the peer
  std::optional<Error> refused;  // a head the server will not serve: answered, then closed
};

std::string_view buffered(const beast::flat_buffer& buffer) {
  auto data = buffer.data();
  return {static_cast<const char*>(data.data()), data.size()};
}

// Reads until the buffer holds a whole request head (through its blank line), more bytes than
// a head may have (Beast's parser then answers 431), or the peer stops. Beast joins folded
// header lines as it parses, so the raw head is kept for the obs-fold check.
awaitable<boost::system::error_code> buffer_head(const ConnPtr& c, beast::flat_buffer& buffer,
                                                 std::size_t limit) {
  std::size_t searched = 0;
  for (;;) {
    auto text = buffered(buffer);
    if (text.find("\r\n\r\n", searched) != std::string_view::npos || text.size() > limit) {
      co_return boost::system::error_code{};
    }
    searched = text.size() < 3 ? 0 : text.size() - 3;
    auto [ec, n] =
        co_await c->sock.async_read_some(buffer.prepare(4096), asio::as_tuple(use_awaitable));
    if (ec) co_return ec;
    buffer.commit(n);
  }
}

// RFC 9112 5.2: a header line that starts with whitespace continues the previous one (obs-fold).
// It is refused rather than joined: a proxy in front may read the fold differently.
bool has_obs_fold(std::string_view head) {
  auto end = head.find("\r\n\r\n");
  if (end != std::string_view::npos) head = head.substr(0, end + 2);
  return head.find("\r\n ") != std::string_view::npos ||
         head.find("\r\n\t") != std::string_view::npos;
}

// The codings of every Transfer-Encoding line, in order, without parameters.
std::vector<std::string> transfer_codings(const http::request<http::string_body>& req) {
  std::vector<std::string> out;
  auto [it, end] = req.equal_range(http::field::transfer_encoding);
  for (; it != end; ++it) {
    std::string_view v = it->value();
    while (!v.empty()) {
      auto comma = v.find(',');
      auto item = v.substr(0, comma);
      item = item.substr(0, item.find(';'));
      auto first = item.find_first_not_of(" \t");
      if (first != std::string_view::npos) {
        item = item.substr(first, item.find_last_not_of(" \t") - first + 1);
        out.emplace_back(item);
      }
      if (comma == std::string_view::npos) break;
      v.remove_prefix(comma + 1);
    }
  }
  return out;
}

// RFC 9112 6.1 and 6.3: a body is framed by Content-Length, or by chunked as the final and only
// coding. With any other Transfer-Encoding the body's end is unknown, so whatever follows could
// be read as a second request: the answer is an error and a close.
std::optional<Error> framing_failure(const http::request<http::string_body>& req) {
  if (req.find(http::field::transfer_encoding) == req.end()) return std::nullopt;
  if (req.version() < 11) {
    return api_error(api::errc::bad_request, "Transfer-Encoding in an HTTP/1.0 request");
  }
  auto codings = transfer_codings(req);
  auto chunked = [](const std::string& coding) { return beast::iequals(coding, "chunked"); };
  if (codings.empty() || !chunked(codings.back())) {
    return api_error(api::errc::bad_request,
                     "Transfer-Encoding: the final coding must be chunked, or the body's length "
                     "is unknown");
  }
  if (std::count_if(codings.begin(), codings.end(), chunked) > 1) {
    return api_error(api::errc::bad_request, "Transfer-Encoding: chunked more than once");
  }
  if (codings.size() > 1) {
    return api_error(api::errc::unsupported_transfer_coding,
                     "Transfer-Encoding: only chunked is accepted, not " + codings.front());
  }
  return std::nullopt;
}

// What RFC 9112 asks of a head beyond what Beast checks: exactly one Host in HTTP/1.1 (3.2), no
// folded lines (5.2), framing that says where the body ends (6.3).
std::optional<Error> head_failure(const http::request<http::string_body>& req, bool folded) {
  if (folded) {
    return api_error(api::errc::bad_request,
                     "a header line starts with whitespace (obs-fold is not accepted)");
  }
  auto [first_host, hosts_end] = req.equal_range(http::field::host);
  auto hosts = std::distance(first_host, hosts_end);
  if (hosts > 1) return api_error(api::errc::bad_request, "more than one Host header");
  if (hosts == 0 && req.version() >= 11) {
    return api_error(api::errc::bad_request, "an HTTP/1.1 request needs a Host header");
  }
  return framing_failure(req);
}

// One whole request, header and body, within request_timeout from its first byte. A head that
// is refused is not followed by a read of its body: the connection is answered and closed.
awaitable<ReadResult> read_request(const ConnPtr& c, const StatePtr& st, beast::flat_buffer& buffer,
                                   Parser& parser) {
  c->phase = Phase::reading;
  parser.header_limit(static_cast<std::uint32_t>(st->limits.max_header_bytes));
  parser.body_limit(st->limits.max_body_bytes);
  arm(c, st->limits.request_timeout);
  auto ec = co_await buffer_head(c, buffer, st->limits.max_header_bytes);
  const bool folded = !ec && has_obs_fold(buffered(buffer));
  if (!ec) {
    auto [hec, n] =
        co_await http::async_read_header(c->sock, buffer, parser, asio::as_tuple(use_awaitable));
    (void)n;
    ec = hec;
  }
  ReadResult r;
  if (!ec) r.refused = head_failure(parser.get(), folded);
  if (!ec && !r.refused && !parser.is_done()) ec = co_await read_body(c, buffer, parser);
  r.ec = ec;
  r.timed_out = c->timed_out;
  disarm(c);
  co_return r;
}

// The answer to a request that could not be read: over a limit, too slow, or not HTTP. End of
// stream, a reset or a half-sent message get none: the peer is gone.
std::optional<Error> read_failure(const ReadResult& r, const ServerLimits& limits) {
  if (r.timed_out) {
    return api_error(api::errc::request_timeout,
                     "the request was not received within " +
                         std::to_string(limits.request_timeout.count()) + " ms");
  }
  if (r.ec == http::error::header_limit) {
    return api_error(
        api::errc::header_too_large,
        "the request header exceeds " + std::to_string(limits.max_header_bytes) + " bytes");
  }
  if (r.ec == http::error::body_limit) {
    return api_error(
        api::errc::body_too_large,
        "the request body exceeds " + std::to_string(limits.max_body_bytes) + " bytes");
  }
  if (r.ec.category() == http::make_error_code(http::error::end_of_stream).category() &&
      r.ec != http::error::end_of_stream && r.ec != http::error::partial_message) {
    return api_error(api::errc::bad_request, "malformed HTTP request: " + r.ec.message());
  }
  return std::nullopt;
}

// A refused route's answer; a 405 lists the methods the path does take.
Outcome refusal(const Error& e, std::string_view target) {
  Outcome out = failure(e);
  if (out.status != http::status::method_not_allowed) return out;
  std::string allow;
  for (auto m : allowed_methods(target)) {
    if (!allow.empty()) allow += ", ";
    allow += std::string(http::to_string(m));
  }
  out.headers.emplace_back("Allow", allow);
  return out;
}

// The domain a request is about: named in its path, else in its answer (a create, a restore).
std::string domain_of(std::string_view route, std::string_view target, const Outcome* out) {
  constexpr std::string_view kPrefix = "/v1/domains/";
  auto path = target.substr(0, target.find('?'));
  if (route.starts_with("/v1/domains/{name}") && path.starts_with(kPrefix)) {
    path.remove_prefix(kPrefix.size());
    return std::string(path.substr(0, path.find('/')));
  }
  if (out == nullptr || !out->body.is_object()) return {};
  const auto* name = out->body.get_object().if_contains("name");
  return name != nullptr && name->is_string() ? std::string(name->get_string()) : std::string();
}

// The error code of an error answer ("not_found"), else empty.
std::string code_of(const Outcome* out) {
  if (out == nullptr || !out->body.is_object()) return {};
  const auto* error = out->body.get_object().if_contains("error");
  if (error == nullptr || !error->is_object()) return {};
  const auto* code = error->get_object().if_contains("code");
  return code != nullptr && code->is_string() ? std::string(code->get_string()) : std::string();
}

// Each request answered is counted by its route and status, and logged once at info level.
// `out`: its answer (none for an event stream).
void account_request(const StatePtr& st, const http::request<http::string_body>& req,
                     const Outcome* out, unsigned status, uid_t uid, Clock::time_point start) {
  auto took = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start);
  auto index = route_index(req.method(), req.target());
  const bool routed = index < routes().size();
  std::string_view route = routed ? routes()[index].path : std::string_view("none");
  registry(st).api_request(routed ? index : metrics::Registry::kUnrouted, status, took);
  std::vector<log::Field> fields{{"ROUTE", std::string(route)},
                                 {"METHOD", std::string(req.method_string())},
                                 {"STATUS", std::to_string(status)},
                                 {"UID", std::to_string(uid)},
                                 {"DURATION_US", std::to_string(took.count())}};
  if (auto domain = domain_of(route, req.target(), out); !domain.empty()) {
    fields.push_back({"DOMAIN", std::move(domain)});
  }
  if (auto code = code_of(out); !code.empty()) fields.push_back({"CODE", std::move(code)});
  log::write(log::Level::info,
             std::string(req.method_string()) + " " + std::string(route) + " " +
                 std::to_string(status),
             fields);
}

// Routes, executes and answers one request. True when the connection is kept for another.
awaitable<bool> serve_request(ConnPtr c, StatePtr st, http::request<http::string_body> req) {
  ++st->stats.requests;
  auto start = Clock::now();
  auto cmd = route(req);
  Outcome out;
  if (!cmd) {
    out = refusal(cmd.error(), req.target());
  } else if (auto* watch = std::get_if<WatchEvents>(&*cmd)) {
    account_request(st, req, nullptr, 200, c->peer.uid, start);
    co_await stream_events(c, st, req.version(), watch->domain);
    co_return false;
  } else {
    c->phase = Phase::executing;
    out = co_await st->service->execute(std::move(*cmd));
  }
  bool keep_alive = req.keep_alive() && !st->stopping && !c->stopping;
  auto res = render(out, req.version(), keep_alive);
  account_request(st, req, &out, res.result_int(), c->peer.uid, start);
  if (!co_await write_response(c, st, std::move(res), req.method() == http::verb::head)) {
    co_return false;
  }
  co_return keep_alive;
}

void close_connection(const ConnPtr& c) {
  boost::system::error_code ignored;
  c->sock.shutdown(stream_protocol::socket::shutdown_both, ignored);
  c->sock.close(ignored);
}

// One connection: requests one after another (keep-alive) until the peer goes, a request
// cannot be read, a response cannot be written, or the server stops.
awaitable<void> session(StatePtr st, ConnPtr c) {
  beast::flat_buffer buffer;
  while (!st->stopping && !c->stopping) {
    if (buffer.size() == 0 && !co_await wait_for_request(c, st)) break;
    Parser parser;
    auto read = co_await read_request(c, st, buffer, parser);
    if (read.refused) {
      co_await write_error(c, st, std::move(*read.refused));
      break;
    }
    if (read.ec) {
      if (c->stopping) break;
      if (read.timed_out) ++st->stats.timeouts;
      if (auto e = read_failure(read, st->limits)) co_await write_error(c, st, std::move(*e));
      break;
    }
    if (!co_await serve_request(c, st, parser.release())) break;
  }
  close_connection(c);
}

// Reads and drops what the peer sends until a blank line ends its request head, more than
// `limit` bytes came, the peer stops, or the watchdog fires.
awaitable<void> skip_head(const ConnPtr& c, std::size_t limit) {
  std::array<char, 4096> buf;
  std::string window;  // the last bytes read, enough to find a "\r\n\r\n" split across reads
  for (std::size_t total = 0; total <= limit;) {
    auto [ec, n] =
        co_await c->sock.async_read_some(asio::buffer(buf), asio::as_tuple(use_awaitable));
    if (ec) co_return;
    total += n;
    window.append(buf.data(), n);
    if (window.find("\r\n\r\n") != std::string::npos) co_return;
    window.erase(0, window.size() > 3 ? window.size() - 3 : 0);
  }
}

// Reads and drops the rest of the request (its body) until the peer closes, `limit` bytes came,
// or the watchdog fires: a peer still writing must not fail before it reads the answer.
awaitable<void> drain(const ConnPtr& c, std::size_t limit) {
  std::array<char, 4096> buf;
  for (std::size_t total = 0; total <= limit;) {
    auto [ec, n] =
        co_await c->sock.async_read_some(asio::buffer(buf), asio::as_tuple(use_awaitable));
    if (ec) co_return;
    total += n;
  }
}

// A refused connection: its request head, then the answer, then whatever else it sends, each
// within refuse_timeout. Had the answer been sent before the request was read, the client's
// write of its request could fail on the closed socket (EPIPE) and the client would give up
// without reading the answer waiting for it.
awaitable<void> answer_refused(StatePtr st, ConnPtr c, Error e) {
  const auto deadline = st->limits.refuse_timeout;
  arm(c, deadline);
  co_await skip_head(c, st->limits.max_header_bytes);
  std::string text = rendered(failure(e));
  arm(c, deadline);
  auto [ec, n] =
      co_await asio::async_write(c->sock, asio::buffer(text), asio::as_tuple(use_awaitable));
  (void)n;
  if (!ec && !c->stopping) {
    boost::system::error_code ignored;
    c->sock.shutdown(stream_protocol::socket::shutdown_send, ignored);
    arm(c, deadline);
    co_await drain(c, st->limits.max_header_bytes + st->limits.max_body_bytes);
  }
  disarm(c);
  close_connection(c);
}

awaitable<void> serve_refusal(StatePtr st, ConnPtr c, Error e) {
  try {
    co_await answer_refused(st, c, std::move(e));
  } catch (const std::exception& ex) {
    log::error(std::string("api refusal: ") + ex.what());
  }
  st->refusing.remove(c);
}

// Refuses a connection, answering it once its request is read while fewer than max_refusing
// are being answered, else at once.
void refuse(const StatePtr& st, stream_protocol::socket sock, Error e) {
  if (st->refusing.size() >= st->limits.max_refusing) {
    refuse_at_once(sock, e);
    return;
  }
  auto c = std::make_shared<Conn>(std::move(sock));
  st->refusing.push_back(c);
  asio::co_spawn(st->ex, serve_refusal(st, c, std::move(e)), asio::detached);
}

void release(const StatePtr& st, const ConnPtr& c) {
  st->conns.remove(c);
  registry(st).connections_open.add(-1);
  if (c->reserved) {
    --st->reserved;
    auto it = st->reserve_by_pid.find(c->peer.pid);
    if (it != st->reserve_by_pid.end() && --it->second == 0) st->reserve_by_pid.erase(it);
    return;
  }
  auto it = st->per_uid.find(c->peer.uid);
  if (it != st->per_uid.end() && --it->second == 0) st->per_uid.erase(it);
}

// Root and qbrokerd's own uid: whoever runs the daemon, who must reach it whatever others hold.
bool is_operator(const PeerCred& peer, const AccessPolicy& access) {
  return peer.uid == 0 || peer.uid == access.owner;
}

// Where an authorized peer's connection goes: a slot of the pool, within its uid's quota
// (false), or, for an operator when the pool or its quota is full, one of the reserve (true).
// The reserve is shared by at most reserve_per_process connections per peer process, so one
// that leaks connections cannot take it all. The error is the 503 to refuse the peer with.
Result<bool> admit(const Server::State& st, const PeerCred& peer) {
  const auto& l = st.limits;
  auto uid = st.per_uid.find(peer.uid);
  std::size_t held = uid == st.per_uid.end() ? 0 : uid->second;
  std::string full;
  if (st.conns.size() - st.reserved >= l.max_connections) {
    full = "the broker serves at most " + std::to_string(l.max_connections) + " connections";
  } else if (held >= l.max_connections_per_uid) {
    full = "uid " + std::to_string(peer.uid) + " already has " +
           std::to_string(l.max_connections_per_uid) + " connections open";
  } else {
    return false;
  }
  if (!is_operator(peer, st.access)) return api_error(api::errc::too_many_connections, full);
  if (st.reserved >= l.admin_reserve) {
    return api_error(api::errc::too_many_connections, full + ", and the " +
                                                          std::to_string(l.admin_reserve) +
                                                          " connections kept for root are taken");
  }
  auto pid = st.reserve_by_pid.find(peer.pid);
  if (pid != st.reserve_by_pid.end() && pid->second >= l.reserve_per_process) {
    return api_error(api::errc::too_many_connections,
                     full + ", and process " + std::to_string(peer.pid) + " already holds " +
                         std::to_string(l.reserve_per_process) +
                         " of the connections kept for root");
  }
  return true;
}

// A session, then its slot is given back.
awaitable<void> serve(StatePtr st, ConnPtr c) {
  try {
    co_await session(st, c);
  } catch (const std::exception& e) {
    log::error(std::string("api session: ") + e.what());
  }
  release(st, c);
}

awaitable<void> accept_loop(StatePtr st) {
  bool warned_fds = false;
  for (;;) {
    auto [ec, sock] = co_await st->acceptor.async_accept(asio::as_tuple(use_awaitable));
    if (st->stopping || !st->acceptor.is_open()) break;
    if (ec) {
      if (ec == asio::error::operation_aborted) break;
      if (ec == asio::error::no_descriptors || ec.value() == ENFILE || ec.value() == ENOMEM ||
          ec.value() == ENOBUFS) {
        // Out of fds: back off instead of spinning; the listen backlog holds the peers.
        if (!warned_fds) log::warn("api: accept: " + ec.message() + "; backing off");
        warned_fds = true;
        st->retry.expires_after(std::chrono::milliseconds(50));
        co_await st->retry.async_wait(asio::as_tuple(use_awaitable));
        continue;
      }
      log::warn("api: accept: " + ec.message());
      continue;
    }
    warned_fds = false;
    auto peer = peer_credentials(sock.native_handle());
    if (!peer || !authorized(*peer, st->access)) {
      ++st->stats.refused_unauthorized;
      registry(st).connections_refused_unauthorized.inc();
      std::string who = peer ? "uid " + std::to_string(peer->uid) : "an unknown peer";
      refuse(st, std::move(sock),
             api_error(api::errc::unauthorized_peer,
                       who + " is not root and not a member of the admin group"));
      continue;
    }
    auto reserved = admit(*st, *peer);
    if (!reserved) {
      ++st->stats.refused_busy;
      registry(st).connections_refused_busy.inc();
      refuse(st, std::move(sock), std::move(reserved.error()));
      continue;
    }
    ++st->stats.accepted;
    registry(st).connections_accepted.inc();
    registry(st).connections_open.add(1);
    auto c = std::make_shared<Conn>(std::move(sock));
    c->peer = std::move(*peer);
    c->reserved = *reserved;
    if (c->reserved) {
      ++st->stats.accepted_reserve;
      ++st->reserved;
      ++st->reserve_by_pid[c->peer.pid];
    } else {
      ++st->per_uid[c->peer.uid];
    }
    st->conns.push_back(c);
    asio::co_spawn(st->ex, serve(st, c), asio::detached);
  }
}

}  // namespace

Server::Server(asio::any_io_executor ex, Service& service, ServerLimits limits, AccessPolicy access)
    : state_(std::make_shared<State>(ex, service, limits, access)) {}

Server::~Server() {
  stop();
}

Result<void> Server::start(fdpass::UniqueFd listener) {
  boost::system::error_code ec;
  int fd = listener.release();
  state_->acceptor.assign(stream_protocol(), fd, ec);
  if (ec) {
    ::close(fd);
    return Error(std::error_code(ec.value(), std::system_category()),
                 "api: cannot serve on the listening socket: " + ec.message());
  }
  asio::co_spawn(state_->ex, accept_loop(state_), asio::detached);
  return {};
}

void Server::stop() {
  auto& st = *state_;
  if (st.stopping) return;
  st.stopping = true;
  boost::system::error_code ignored;
  st.acceptor.close(ignored);
  st.retry.cancel();
  for (auto& c : st.conns) {
    c->stopping = true;
    c->stop.cancel();
    // Idle and half-read connections end now; one being executed is answered first.
    if (c->phase == Phase::idle || c->phase == Phase::reading) c->sock.cancel(ignored);
  }
  // Refusals are answered now, without waiting for the rest of their request.
  for (auto& c : st.refusing) {
    c->stopping = true;
    c->sock.cancel(ignored);
  }
}

std::size_t Server::connections() const {
  return state_->conns.size();
}
ServerStats Server::stats() const {
  return state_->stats;
}

}  // namespace broker::api
