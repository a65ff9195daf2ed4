// A small blocking HTTP/1.1 client for the API tests: raw sockets with poll() deadlines (so a
// broken server fails a test instead of hanging it) and Beast's parser for the replies.
#pragma once

#include <boost/json/value.hpp>
#include <chrono>
#include <optional>
#include <string>

#include "fdpass/unique_fd.hpp"

namespace qbtest::http {

using namespace std::chrono_literals;

struct Reply {
  unsigned status = 0;
  std::string body;
  boost::json::value json;  // null when the body is not JSON
  bool keep_alive = false;
  std::string header(const std::string& name) const;
  std::string headers;  // raw header block
  // {"error": {"code": ...}} -> code, field
  std::string error_code() const;
  std::string error_field() const;
};

// A connected Unix stream socket; invalid when connect failed.
fdpass::UniqueFd connect(const std::string& path);

// "METHOD target" with an optional body, as HTTP/1.1 text.
std::string request_text(const std::string& method, const std::string& target,
                         const std::string& body = {}, bool keep_alive = true);

bool send_all(int fd, std::string_view data);

// Reads one response; nullopt on timeout or a malformed reply.
std::optional<Reply> read_reply(int fd, std::chrono::milliseconds timeout = 10s);

// True when the peer closed (EOF or reset) within `timeout`, consuming anything before it.
bool closed_within(int fd, std::chrono::milliseconds timeout);

// Connect, send, read one reply, close.
std::optional<Reply> call(const std::string& socket, const std::string& method,
                          const std::string& target, const std::string& body = {},
                          std::chrono::milliseconds timeout = 10s);

// An event stream: subscribe, then read events.
class EventReader {
 public:
  EventReader(const std::string& socket, const std::string& target);
  bool ok() const { return ok_; }
  // The next frame's "event:" and data JSON; nullopt on timeout or the end of the stream.
  struct Event {
    std::string kind;
    boost::json::value data;
  };
  std::optional<Event> next(std::chrono::milliseconds timeout = 5s);
  bool ended() const { return ended_; }
  int fd() const { return fd_.get(); }

 private:
  bool fill(std::chrono::milliseconds timeout);
  fdpass::UniqueFd fd_;
  std::string raw_;      // bytes after the header, still chunk-encoded
  std::string decoded_;  // de-chunked body not yet consumed
  bool ok_ = false;
  bool ended_ = false;
};

}  // namespace qbtest::http
