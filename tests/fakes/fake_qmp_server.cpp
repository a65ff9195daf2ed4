#include "fake_qmp_server.hpp"

#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <cstring>
#include <span>
#include <stdexcept>

#include "fdpass/cmsg.hpp"
#include "fdpass/devices.hpp"
#include "fdpass/errc.hpp"

namespace qbfake {
namespace json = boost::json;
using namespace std::chrono_literals;

namespace {

constexpr std::string_view kGreeting =
    R"({"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, )"
    R"("package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}})"
    "\r\n";

std::string reply_line(const json::value* id, const json::value& ret) {
  json::object o{{"return", ret}};
  if (id != nullptr) o["id"] = *id;
  return json::serialize(o) + "\r\n";
}

std::string error_line(const json::value* id, const std::string& cls, const std::string& desc) {
  json::object o{{"error", json::object{{"class", cls}, {"desc", desc}}}};
  if (id != nullptr) o["id"] = *id;
  return json::serialize(o) + "\r\n";
}

template <class T>
T must(fdpass::Result<T> r, const char* what) {
  if (!r) throw std::runtime_error(std::string(what) + ": " + r.error().message());
  return std::move(*r);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Script

Script& Script::greeting() {
  return then([](FakeQmpPeer& p) { return p.send_bytes(kGreeting); });
}

Script& Script::handshake() {
  return greeting().expect("qmp_capabilities").reply();
}

Script& Script::expect(std::string name) {
  return then([name = std::move(name)](FakeQmpPeer& p) {
    auto c = p.read_command();
    if (!c) {
      p.fail("expected " + (name.empty() ? std::string("a command") : name) + ", got nothing");
      return false;
    }
    if (!name.empty() && c->name != name) p.fail("expected " + name + ", got " + c->name);
    p.commands().push_back(std::move(*c));
    return true;
  });
}

Script& Script::reply(json::value ret, std::optional<std::size_t> n) {
  return then([ret = std::move(ret), n](FakeQmpPeer& p) {
    auto& cs = p.commands();
    std::size_t i = n.value_or(cs.size() - 1);
    if (cs.empty() || i >= cs.size()) {
      p.fail("reply: no such command");
      return false;
    }
    return p.send_bytes(reply_line(cs[i].id ? &*cs[i].id : nullptr, ret));
  });
}

Script& Script::reply_error(std::string cls, std::string desc, std::optional<std::size_t> n) {
  return then([cls = std::move(cls), desc = std::move(desc), n](FakeQmpPeer& p) {
    auto& cs = p.commands();
    std::size_t i = n.value_or(cs.size() - 1);
    if (cs.empty() || i >= cs.size()) {
      p.fail("reply_error: no such command");
      return false;
    }
    return p.send_bytes(error_line(cs[i].id ? &*cs[i].id : nullptr, cls, desc));
  });
}

Script& Script::reply_with_id(std::optional<json::value> id, json::value ret) {
  return then([id = std::move(id), ret = std::move(ret)](FakeQmpPeer& p) {
    return p.send_bytes(reply_line(id ? &*id : nullptr, ret));
  });
}

Script& Script::error_with_id(std::optional<json::value> id, std::string cls, std::string desc) {
  return then([id = std::move(id), cls = std::move(cls), desc = std::move(desc)](FakeQmpPeer& p) {
    return p.send_bytes(error_line(id ? &*id : nullptr, cls, desc));
  });
}

Script& Script::event(std::string name, json::object data) {
  return then([name = std::move(name), data = std::move(data)](FakeQmpPeer& p) {
    json::object o{{"timestamp", json::object{{"seconds", 1700000000}, {"microseconds", 1}}},
                   {"event", name}};
    if (!data.empty()) o["data"] = data;
    return p.send_bytes(json::serialize(o) + "\r\n");
  });
}

Script& Script::raw(std::string bytes) {
  return then([bytes = std::move(bytes)](FakeQmpPeer& p) { return p.send_bytes(bytes); });
}

Script& Script::raw_with_fd(std::string bytes, fdpass::BorrowedFd fd) {
  return then([bytes = std::move(bytes), fd](FakeQmpPeer& p) { return p.send_bytes(bytes, fd); });
}

Script& Script::drip(std::string bytes, std::chrono::milliseconds interval) {
  return then([bytes = std::move(bytes), interval](FakeQmpPeer& p) {
    for (char c : bytes) {
      if (!p.send_bytes(std::string_view(&c, 1)) || !p.pause(interval)) return false;
    }
    return true;
  });
}

Script& Script::huge_line(std::size_t size) {
  return then([size](FakeQmpPeer& p) {
    const std::string head = R"({"return": ")";
    if (!p.send_bytes(head)) return true;
    const std::string chunk(64 * 1024, 'a');
    std::size_t sent = head.size();
    while (sent < size) {
      std::size_t n = std::min(chunk.size(), size - sent);
      // The client stops reading once the line is over its limit: that ends the step.
      if (!p.send_bytes(std::string_view(chunk).substr(0, n))) return true;
      sent += n;
    }
    p.send_bytes("\"}\n");
    return true;
  });
}

Script& Script::deep_nesting(std::size_t depth) {
  return then([depth](FakeQmpPeer& p) {
    std::string line = R"({"return": )";
    line.append(depth, '[');
    line.append(depth, ']');
    line += R"(, "id": 1})";
    line += '\n';
    return p.send_bytes(line);
  });
}

Script& Script::wait_for_close() {
  return then([](FakeQmpPeer& p) { return p.wait_closed(); });
}

Script& Script::close() {
  return then([](FakeQmpPeer& p) {
    p.close_socket();
    return true;
  });
}

Script& Script::then(Step f) {
  steps.push_back(std::move(f));
  return *this;
}

// ---------------------------------------------------------------------------------------------
// FakeQmpPeer

FakeQmpPeer::FakeQmpPeer(Script script, std::chrono::milliseconds timeout) : timeout_(timeout) {
  auto pair = must(fdpass::make_socketpair(SOCK_STREAM), "socketpair");
  sock_ = std::move(pair.first);
  client_ = std::move(pair.second);
  auto pipe = must(fdpass::make_pipe(), "pipe");
  stop_rd_ = std::move(pipe.first);
  stop_wr_ = std::move(pipe.second);
  if (auto r = fdpass::set_nonblocking(sock_, true); !r) {
    throw std::runtime_error("set_nonblocking: " + r.error().message());
  }
  thread_ = std::thread([this, s = std::move(script)]() mutable { run(std::move(s)); });
}

FakeQmpPeer::~FakeQmpPeer() {
  if (!joined_) join(true);
}

fdpass::UniqueFd FakeQmpPeer::client_end() {
  return std::move(client_);
}

void FakeQmpPeer::stop() {
  if (stopped_.exchange(true)) return;
  char b = 1;
  (void)!::write(stop_wr_.get(), &b, 1);
}

FakeQmpPeer::Report FakeQmpPeer::join(bool stop_first) {
  if (stop_first) stop();
  if (thread_.joinable()) thread_.join();
  joined_ = true;
  sock_.reset();
  return std::move(report_);
}

void FakeQmpPeer::run(Script script) {
  for (auto& step : script.steps) {
    if (stopped_ || !step(*this)) break;
  }
}

FakeQmpPeer::Wait FakeQmpPeer::wait(short events, std::chrono::steady_clock::time_point deadline) {
  for (;;) {
    if (!sock_.valid()) return Wait::closed;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return Wait::timeout;
    pollfd fds[2] = {{sock_.get(), events, 0}, {stop_rd_.get(), POLLIN, 0}};
    int n = ::poll(fds, 2, static_cast<int>(left.count()));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Wait::closed;
    if (n == 0) return Wait::timeout;
    if (fds[1].revents != 0) return Wait::stopped;
    if ((fds[0].revents & events) != 0) return Wait::ready;
    if ((fds[0].revents & (POLLHUP | POLLERR | POLLNVAL)) != 0) return Wait::closed;
  }
}

bool FakeQmpPeer::send_bytes(std::string_view bytes, fdpass::BorrowedFd fd) {
  auto deadline = std::chrono::steady_clock::now() + timeout_;
  bool with_fd = fd.valid();
  while (!bytes.empty()) {
    if (!sock_.valid() || stopped_) return false;
    fdpass::BorrowedFd fds[1] = {fd};
    auto r = fdpass::send_with_fds(sock_, std::as_bytes(std::span(bytes.data(), bytes.size())),
                                   std::span<const fdpass::BorrowedFd>(fds, with_fd ? 1 : 0));
    if (!r) {
      if (r.error() == fdpass::errc::would_block && wait(POLLOUT, deadline) == Wait::ready) {
        continue;
      }
      return false;
    }
    with_fd = false;
    report_.bytes_sent += *r;
    bytes.remove_prefix(*r);
  }
  return true;
}

std::optional<Received> FakeQmpPeer::read_command() {
  auto deadline = std::chrono::steady_clock::now() + timeout_;
  Received c;
  bool first = true;
  for (;;) {
    if (wait(POLLIN, deadline) != Wait::ready) return std::nullopt;
    std::size_t want = 1;
    if (!first) {
      // Read up to the end of the line in one go; fds can only arrive with a first byte.
      char peek[65536];
      ssize_t n = ::recv(sock_.get(), peek, sizeof(peek), MSG_PEEK | MSG_DONTWAIT);
      if (n <= 0) {
        if (n < 0 && errno == EAGAIN) continue;
        return std::nullopt;
      }
      auto* nl = static_cast<const char*>(std::memchr(peek, '\n', static_cast<std::size_t>(n)));
      want = nl != nullptr ? static_cast<std::size_t>(nl - peek) + 1 : static_cast<std::size_t>(n);
    }
    std::string buf(want, '\0');
    auto r = fdpass::recv_with_fds(sock_, std::as_writable_bytes(std::span(buf)), 16);
    if (!r) {
      if (r.error() == fdpass::errc::would_block) continue;
      return std::nullopt;
    }
    if (r->bytes == 0) {
      report_.client_closed = true;
      return std::nullopt;
    }
    if (!r->fds.empty() && first) c.fd_on_first_byte = true;
    for (auto& f : r->fds) c.fds.push_back(std::move(f));
    first = false;
    c.line.append(buf.data(), r->bytes);
    if (c.line.back() == '\n') break;
  }
  c.line.pop_back();
  boost::system::error_code ec;
  json::value v = json::parse(c.line, ec);
  const json::object* o = ec ? nullptr : v.if_object();
  if (o == nullptr) {
    fail("not a JSON object: " + c.line.substr(0, 200));
    return c;
  }
  if (const json::value* n = o->if_contains("execute"); n && n->is_string()) {
    c.name = std::string(n->get_string());
  }
  if (const json::value* id = o->if_contains("id")) c.id = *id;
  if (const json::value* a = o->if_contains("arguments"); a && a->is_object()) {
    c.args = a->get_object();
  }
  return c;
}

bool FakeQmpPeer::wait_closed() {
  auto deadline = std::chrono::steady_clock::now() + timeout_;
  char buf[4096];
  for (;;) {
    Wait w = wait(POLLIN, deadline);
    if (w == Wait::closed) {
      report_.client_closed = true;
      return true;
    }
    if (w != Wait::ready) return false;
    auto r = fdpass::recv_with_fds(sock_, std::as_writable_bytes(std::span(buf)), 16);
    if (r && r->bytes == 0 && r->fds.empty()) {
      report_.client_closed = true;
      return true;
    }
    if (!r && r.error() != fdpass::errc::would_block) {
      report_.client_closed = true;
      return true;
    }
  }
}

bool FakeQmpPeer::pause(std::chrono::milliseconds d) {
  pollfd p{stop_rd_.get(), POLLIN, 0};
  return ::poll(&p, 1, static_cast<int>(d.count())) == 0;
}

void FakeQmpPeer::fail(std::string what) {
  report_.errors.push_back(std::move(what));
}

void FakeQmpPeer::close_socket() {
  sock_.reset();
}

}  // namespace qbfake
