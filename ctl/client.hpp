// qbrokerctl's HTTP/1.1 client over the broker's Unix socket (Boost.Beast on one io_context),
// with server-sent events for `events` and for progress bars during long jobs.
#pragma once

#include <boost/json/value.hpp>
#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <variant>

namespace qbctl {

struct Response {
  unsigned status = 0;
  std::string body;
};

struct TransportError {
  std::string message;
  bool connect_failed = false;  // qbrokerd is not reachable at all
  bool timed_out = false;
};

struct Request {
  std::string method;
  std::string target;
  std::optional<boost::json::value> body;
};

// One event as received: the SSE "event:" name and its JSON data.
struct SseEvent {
  std::string kind;
  boost::json::value data;
};

// Called for each event; return false to stop following.
using EventFn = std::function<bool(const SseEvent&)>;

// A request; when `watch_target` is set (a /v1/events URL), that stream is subscribed first and
// each event goes to `on_event` until the reply arrives. `on_tick` runs about 10 times a second
// while waiting (spinners).
std::variant<Response, TransportError> call(const std::string& socket, const Request& request,
                                            std::chrono::milliseconds timeout,
                                            const std::string& watch_target = {},
                                            EventFn on_event = {},
                                            std::function<void()> on_tick = {});

// Follows an event stream until `on_event` returns false, the stream ends or `timeout` passes
// (zero: no timeout). On success returns the HTTP status (200), else the error.
std::variant<Response, TransportError> follow(const std::string& socket, const std::string& target,
                                              std::chrono::milliseconds timeout, EventFn on_event);

}  // namespace qbctl
