#include "http_client.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <boost/asio/buffer.hpp>
#include <boost/beast/http.hpp>
#include <boost/json.hpp>
#include <cstring>
#include <map>
#include <utility>

namespace qbtest::http {
namespace beast = boost::beast;
namespace json = boost::json;
using Clock = std::chrono::steady_clock;

namespace {
// Bytes read past the end of one reply (a pipelined second reply), kept for the next read on the
// same connection. connect() clears the entry of the fd number it hands out.
thread_local std::map<int, std::string> g_leftover;
}  // namespace

std::string Reply::header(const std::string& name) const {
  std::string lower_headers = headers;
  for (auto& c : lower_headers) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  std::string key = "\r\n";
  for (char c : name) key.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
  key += ": ";
  auto at = lower_headers.find(key);
  if (at == std::string::npos) return {};
  auto start = at + key.size();
  return headers.substr(start, headers.find("\r\n", start) - start);
}

std::string Reply::error_code() const {
  if (!json.is_object() || !json.as_object().contains("error")) return {};
  const auto& e = json.as_object().at("error").as_object();
  return e.contains("code") ? std::string(e.at("code").as_string()) : std::string();
}

std::string Reply::error_field() const {
  if (!json.is_object() || !json.as_object().contains("error")) return {};
  const auto& e = json.as_object().at("error").as_object();
  return e.contains("field") ? std::string(e.at("field").as_string()) : std::string();
}

fdpass::UniqueFd connect(const std::string& path) {
  fdpass::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  g_leftover.erase(fd.get());
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return {};
  return fd;
}

std::string request_text(const std::string& method, const std::string& target,
                         const std::string& body, bool keep_alive) {
  std::string out = method + " " + target + " HTTP/1.1\r\nHost: localhost\r\n";
  if (!keep_alive) out += "Connection: close\r\n";
  if (!body.empty() || method == "POST" || method == "PUT") {
    out +=
        "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
  }
  return out + "\r\n" + body;
}

bool send_all(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

namespace {
bool wait_readable(int fd, Clock::time_point deadline) {
  for (;;) {
    auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left < 0) return false;
    pollfd p{fd, POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left));
    if (r > 0) return true;
    if (r == 0) return false;
    if (errno != EINTR) return false;
  }
}
}  // namespace

std::optional<Reply> read_reply(int fd, std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  beast::http::response_parser<beast::http::string_body> parser;
  parser.eager(true);
  parser.body_limit(64u << 20);
  std::string buf = std::exchange(g_leftover[fd], {});
  std::string raw_header = buf;
  bool first = true;
  while (!parser.is_done()) {
    beast::error_code ec;
    if (!first || buf.empty()) {
      if (!wait_readable(fd, deadline)) return std::nullopt;
      char tmp[65536];
      ssize_t n = ::recv(fd, tmp, sizeof(tmp), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        // The peer closed: only a reply without Content-Length may end here.
        if (!parser.got_some()) return std::nullopt;
        if (!buf.empty()) parser.put(boost::asio::buffer(buf), ec);
        parser.put_eof(ec);
        if (ec || !parser.is_done()) return std::nullopt;
        break;
      }
      if (!parser.is_header_done()) raw_header.append(tmp, static_cast<std::size_t>(n));
      buf.append(tmp, static_cast<std::size_t>(n));
    }
    first = false;
    while (!buf.empty() && !parser.is_done()) {
      std::size_t used = parser.put(boost::asio::buffer(buf), ec);
      buf.erase(0, used);
      if (ec == beast::http::error::need_more) {
        ec = {};
        break;
      }
      if (ec) return std::nullopt;
      if (used == 0) break;
    }
  }
  if (!buf.empty()) g_leftover[fd] = std::move(buf);
  Reply r;
  r.status = parser.get().result_int();
  r.body = parser.get().body();
  r.keep_alive = parser.get().keep_alive();
  r.headers = "\r\n" + raw_header.substr(0, raw_header.find("\r\n\r\n") + 2);
  std::error_code jec;
  r.json = json::parse(r.body, jec);
  if (jec) r.json = nullptr;
  return r;
}

bool closed_within(int fd, std::chrono::milliseconds timeout) {
  g_leftover.erase(fd);
  auto deadline = Clock::now() + timeout;
  for (;;) {
    if (!wait_readable(fd, deadline)) return false;
    char tmp[4096];
    ssize_t n = ::recv(fd, tmp, sizeof(tmp), 0);
    if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN)) return true;
  }
}

std::optional<Reply> call(const std::string& socket, const std::string& method,
                          const std::string& target, const std::string& body,
                          std::chrono::milliseconds timeout) {
  auto fd = connect(socket);
  if (!fd) return std::nullopt;
  // A refused connection (403, 503) may be answered and closed before the request is sent in
  // full; the answer is still there to read, as qbrokerctl reads it.
  (void)send_all(fd.get(), request_text(method, target, body, false));
  return read_reply(fd.get(), timeout);
}

EventReader::EventReader(const std::string& socket, const std::string& target)
    : fd_(connect(socket)) {
  if (!fd_ || !send_all(fd_.get(), request_text("GET", target))) return;
  // The header, then the first ": subscribed" comment.
  auto deadline = Clock::now() + 5s;
  while (raw_.find("\r\n\r\n") == std::string::npos) {
    if (!wait_readable(fd_.get(), deadline)) return;
    char tmp[4096];
    ssize_t n = ::recv(fd_.get(), tmp, sizeof(tmp), 0);
    if (n <= 0) return;
    raw_.append(tmp, static_cast<std::size_t>(n));
  }
  std::string header = raw_.substr(0, raw_.find("\r\n\r\n"));
  raw_.erase(0, header.size() + 4);
  if (header.find(" 200 ") == std::string::npos) return;
  while (decoded_.find(": subscribed\n\n") == std::string::npos) {
    if (!fill(5s)) return;
  }
  decoded_.erase(0, decoded_.find(": subscribed\n\n") + 14);
  ok_ = true;
}

// De-chunks what has arrived; reads more when no complete chunk is buffered.
bool EventReader::fill(std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    auto crlf = raw_.find("\r\n");
    if (crlf != std::string::npos) {
      std::size_t size = std::stoul(raw_.substr(0, crlf), nullptr, 16);
      if (size == 0) {
        ended_ = true;
        return false;
      }
      if (raw_.size() >= crlf + 2 + size + 2) {
        decoded_ += raw_.substr(crlf + 2, size);
        raw_.erase(0, crlf + 2 + size + 2);
        return true;
      }
    }
    if (!wait_readable(fd_.get(), deadline)) return false;
    char tmp[65536];
    ssize_t n = ::recv(fd_.get(), tmp, sizeof(tmp), 0);
    if (n <= 0) {
      ended_ = true;
      return false;
    }
    raw_.append(tmp, static_cast<std::size_t>(n));
  }
}

std::optional<EventReader::Event> EventReader::next(std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    auto end = decoded_.find("\n\n");
    if (end != std::string::npos) {
      std::string frame = decoded_.substr(0, end);
      decoded_.erase(0, end + 2);
      if (frame.rfind(":", 0) == 0) continue;  // comment
      Event e;
      auto ev = frame.find("event: ");
      auto data = frame.find("data: ");
      if (ev != std::string::npos) e.kind = frame.substr(ev + 7, frame.find('\n', ev) - ev - 7);
      if (data != std::string::npos) e.data = json::parse(frame.substr(data + 6));
      return e;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0 || !fill(left)) return std::nullopt;
  }
}

}  // namespace qbtest::http
