#include "ctl/client.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <boost/json.hpp>
#include <variant>

namespace qbctl {
namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
using asio::awaitable;
using asio::use_awaitable;
using stream_protocol = asio::local::stream_protocol;

namespace {

using Outcome = std::variant<Response, TransportError>;

struct Shared {
  explicit Shared(asio::io_context& io) : subscribed(io), ticker(io) {
    subscribed.expires_at(asio::steady_timer::time_point::max());
  }
  asio::steady_timer subscribed;  // cancelled once the event stream is live (or failed)
  asio::steady_timer ticker;
  bool done = false;
  std::optional<Outcome> result;
  std::vector<stream_protocol::socket*> sockets;  // closed when everything must stop
};

http::request<http::string_body> make_request(const Request& r) {
  http::request<http::string_body> req{http::string_to_verb(r.method), r.target, 11};
  req.set(http::field::host, "localhost");
  req.set(http::field::user_agent, "qbrokerctl/0.1.0");
  req.set(http::field::accept, r.method == "GET" && r.target.rfind("/v1/events", 0) == 0
                                   ? "text/event-stream"
                                   : "application/json");
  if (r.body) {
    req.set(http::field::content_type, "application/json");
    req.body() = json::serialize(*r.body);
  }
  req.keep_alive(false);
  req.prepare_payload();
  return req;
}

TransportError connect_error(const std::string& socket, const boost::system::error_code& ec) {
  return TransportError{
      "cannot connect to qbrokerd at " + socket + ": " + ec.message() +
          " (is qbrokerd running? --socket or $QBROKER_SOCKET name another socket)",
      true};
}

// Parses "event: kind\ndata: {...}\n\n" frames out of `pending`; comments (":") are skipped.
bool drain_frames(std::string& pending, const EventFn& on_event) {
  for (;;) {
    auto end = pending.find("\n\n");
    if (end == std::string::npos) return true;
    std::string frame = pending.substr(0, end);
    pending.erase(0, end + 2);
    SseEvent ev;
    std::string data;
    std::size_t pos = 0;
    while (pos <= frame.size()) {
      auto nl = frame.find('\n', pos);
      std::string line = frame.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos);
      pos = nl == std::string::npos ? frame.size() + 1 : nl + 1;
      if (line.rfind("event: ", 0) == 0)
        ev.kind = line.substr(7);
      else if (line.rfind("data: ", 0) == 0)
        data += line.substr(6);
    }
    if (data.empty()) continue;  // a comment (": keepalive")
    std::error_code ec;
    ev.data = json::parse(data, ec);
    if (ec) continue;
    if (!on_event(ev)) return false;
  }
}

awaitable<void> watch(stream_protocol::socket& sock, std::string socket_path, std::string target,
                      EventFn on_event, Shared& sh, bool primary) {
  auto [cec] = co_await sock.async_connect(stream_protocol::endpoint(socket_path),
                                           asio::as_tuple(use_awaitable));
  if (cec) {
    sh.subscribed.cancel();
    if (primary && !sh.result) sh.result = connect_error(socket_path, cec);
    co_return;
  }
  auto req = make_request(Request{"GET", target, std::nullopt});
  auto [wec, wn] = co_await http::async_write(sock, req, asio::as_tuple(use_awaitable));
  (void)wn;
  beast::flat_buffer buffer;
  http::response_parser<http::buffer_body> parser;
  parser.body_limit(boost::none);
  auto [hec, hn] =
      co_await http::async_read_header(sock, buffer, parser, asio::as_tuple(use_awaitable));
  (void)hn;
  if (wec || hec) {
    sh.subscribed.cancel();
    if (primary && !sh.result) {
      sh.result = TransportError{"event stream: " + (wec ? wec : hec).message()};
    }
    co_return;
  }
  if (parser.get().result_int() != 200) {
    // An error body: read it whole and report it as the reply.
    std::string body;
    char buf[4096];
    while (!parser.is_done()) {
      parser.get().body().data = buf;
      parser.get().body().size = sizeof(buf);
      auto [ec, n] =
          co_await http::async_read_some(sock, buffer, parser, asio::as_tuple(use_awaitable));
      (void)n;
      body.append(buf, sizeof(buf) - parser.get().body().size);
      if (ec && ec != http::error::need_buffer) break;
    }
    sh.subscribed.cancel();
    if (primary && !sh.result) sh.result = Response{parser.get().result_int(), body};
    co_return;
  }
  std::string pending;
  bool first = true;
  char buf[8192];
  while (!parser.is_done() && !sh.done) {
    parser.get().body().data = buf;
    parser.get().body().size = sizeof(buf);
    auto [ec, n] =
        co_await http::async_read_some(sock, buffer, parser, asio::as_tuple(use_awaitable));
    (void)n;
    pending.append(buf, sizeof(buf) - parser.get().body().size);
    if (first && pending.find("\n\n") != std::string::npos) {
      first = false;
      sh.subscribed.cancel();  // ": subscribed" arrived: the stream is live
    }
    if (!drain_frames(pending, on_event)) break;
    if (ec && ec != http::error::need_buffer) break;
  }
  sh.subscribed.cancel();
  if (primary && !sh.result) sh.result = Response{200, {}};
}

awaitable<void> exchange(stream_protocol::socket& sock, std::string socket_path, Request request,
                         Shared& sh, bool wait_subscription) {
  if (wait_subscription) co_await sh.subscribed.async_wait(asio::as_tuple(use_awaitable));
  auto [cec] = co_await sock.async_connect(stream_protocol::endpoint(socket_path),
                                           asio::as_tuple(use_awaitable));
  if (cec) {
    if (!sh.result) sh.result = connect_error(socket_path, cec);
    co_return;
  }
  auto req = make_request(request);
  auto [wec, wn] = co_await http::async_write(sock, req, asio::as_tuple(use_awaitable));
  (void)wn;
  // A refused connection (403, 503) may be answered and closed before the request is read;
  // the answer is still there to read.
  beast::flat_buffer buffer;
  http::response_parser<http::string_body> parser;
  parser.body_limit(256u << 20);
  auto [rec, rn] = co_await http::async_read(sock, buffer, parser, asio::as_tuple(use_awaitable));
  (void)rn;
  if (rec) {
    if (!sh.result) {
      sh.result = TransportError{"qbrokerd closed the connection: " + (wec ? wec : rec).message()};
    }
    co_return;
  }
  if (!sh.result) sh.result = Response{parser.get().result_int(), parser.get().body()};
}

awaitable<void> tick(Shared& sh, std::function<void()> on_tick) {
  while (!sh.done) {
    sh.ticker.expires_after(std::chrono::milliseconds(100));
    auto [ec] = co_await sh.ticker.async_wait(asio::as_tuple(use_awaitable));
    if (ec || sh.done) break;
    if (on_tick) on_tick();
  }
}

Outcome run_until_result(asio::io_context& io, Shared& sh, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!sh.result) {
    if (timeout.count() > 0 && std::chrono::steady_clock::now() >= deadline) {
      sh.result = TransportError{"no answer from qbrokerd within " +
                                     std::to_string(timeout.count() / 1000.0).substr(0, 5) +
                                     " s (--timeout)",
                                 false, true};
      break;
    }
    if (timeout.count() > 0)
      io.run_one_until(deadline);
    else
      io.run_one();
    if (io.stopped()) break;
  }
  sh.done = true;
  sh.ticker.cancel();
  sh.subscribed.cancel();
  for (auto* s : sh.sockets) {
    boost::system::error_code ignored;
    s->close(ignored);
  }
  io.restart();
  io.poll();
  if (!sh.result) sh.result = TransportError{"the connection ended without an answer"};
  return *sh.result;
}

}  // namespace

Outcome call(const std::string& socket, const Request& request, std::chrono::milliseconds timeout,
             const std::string& watch_target, EventFn on_event, std::function<void()> on_tick) {
  asio::io_context io(1);
  Shared sh(io);
  stream_protocol::socket req_sock(io);
  stream_protocol::socket ev_sock(io);
  sh.sockets = {&req_sock, &ev_sock};
  bool watching = !watch_target.empty() && on_event;
  if (watching) {
    asio::co_spawn(io, watch(ev_sock, socket, watch_target, on_event, sh, false), asio::detached);
  }
  asio::co_spawn(io, exchange(req_sock, socket, request, sh, watching), asio::detached);
  if (on_tick) asio::co_spawn(io, tick(sh, on_tick), asio::detached);
  return run_until_result(io, sh, timeout);
}

Outcome follow(const std::string& socket, const std::string& target,
               std::chrono::milliseconds timeout, EventFn on_event) {
  asio::io_context io(1);
  Shared sh(io);
  stream_protocol::socket ev_sock(io);
  sh.sockets = {&ev_sock};
  asio::co_spawn(io, watch(ev_sock, socket, target, on_event, sh, true), asio::detached);
  return run_until_result(io, sh, timeout);
}

}  // namespace qbctl
