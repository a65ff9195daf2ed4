// The server over a real Unix socket: keep-alive, the JSON error shape on the wire, and each
// kind of bad input and abuse refused cleanly while other clients are still served.
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/json.hpp>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "api_fixture.hpp"
#include "broker/domain/event_bus.hpp"
#include "http_client.hpp"

using namespace std::chrono_literals;
namespace http = qbtest::http;
namespace json = boost::json;
using Clock = std::chrono::steady_clock;

namespace {
// Each test case has its own uid range (no QEMU runs here, but the pool sweeps what it hands out).
constexpr uid_t kKeepAlive = 3'103'000;
constexpr uid_t kBadInput = 3'103'100;
constexpr uid_t kLimits = 3'103'200;
constexpr uid_t kSlow = 3'103'300;
constexpr uid_t kAuth = 3'103'400;
constexpr uid_t kFlood = 3'103'500;
constexpr uid_t kEvents = 3'103'600;
constexpr uid_t kStop = 3'103'700;
constexpr uid_t kIdle = 3'103'800;
constexpr uid_t kFraming = 3'107'000;
constexpr uid_t kHead = 3'107'016;
constexpr uid_t kMediaType = 3'107'032;
constexpr uid_t kRefused = 3'107'048;  // +8: a stranger, +9: an admin-group member
constexpr uid_t kMethods = 3'107'064;
constexpr uid_t kEvents10 = 3'107'096;
constexpr uid_t kStalled = 3'107'112;
constexpr uid_t kReserve = 3'107'128;

double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

// A child that takes `uid`/`gid` and runs `body`; returns the child's exit status.
template <class F>
int as_user(uid_t uid, gid_t gid, F body) {
  pid_t pid = ::fork();
  if (pid == 0) {
    if (::setgroups(0, nullptr) != 0 || ::setresgid(gid, gid, gid) != 0 ||
        ::setresuid(uid, uid, uid) != 0) {
      ::_exit(100);
    }
    ::_exit(body());
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 200;
}

bool wait_readable(int fd, std::chrono::milliseconds timeout) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, static_cast<int>(timeout.count())) == 1;
}

struct Output {
  int status = -1;
  std::string text;  // stdout and stderr
};

// Runs the program `args` as uid/gid (no supplementary groups) and returns its exit status and
// output. The child only calls async-signal-safe functions: the fixture's io_context thread may
// hold the allocator's lock at the fork.
Output run_as(uid_t uid, gid_t gid, const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0) return {};
  const bool same_user = uid == ::geteuid() && gid == ::getegid();
  pid_t pid = ::fork();
  if (pid == 0) {
    if (::dup2(out[1], 1) < 0 || ::dup2(out[1], 2) < 0) ::_exit(100);
    if (!same_user && (::setgroups(0, nullptr) != 0 || ::setresgid(gid, gid, gid) != 0 ||
                       ::setresuid(uid, uid, uid) != 0)) {
      ::_exit(100);
    }
    ::execv(argv[0], argv.data());
    ::_exit(101);
  }
  ::close(out[1]);
  Output o;
  char buf[4096];
  for (ssize_t n; (n = ::read(out[0], buf, sizeof(buf))) != 0;) {
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) break;
    o.text.append(buf, static_cast<std::size_t>(n));
  }
  ::close(out[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  o.status = WIFEXITED(status) ? WEXITSTATUS(status) : 200;
  return o;
}

// Sends `raw` on a new connection and reads the one reply to it. The server must close the
// connection after that reply and answer nothing else it was sent.
std::optional<http::Reply> one_reply_then_close(const std::string& socket, const std::string& raw) {
  auto fd = http::connect(socket);
  if (!fd || !http::send_all(fd.get(), raw)) return std::nullopt;
  auto r = http::read_reply(fd.get(), 3s);
  if (!r) return std::nullopt;
  INFO(raw);
  CHECK_FALSE(r->keep_alive);
  CHECK_FALSE(http::read_reply(fd.get(), 1s));  // the bytes after the refused head: unanswered
  CHECK(http::closed_within(fd.get(), 1s));
  return r;
}

}  // namespace

TEST_CASE("keep-alive serves several requests on one connection", "[api][server]") {
  qbtest::ApiFixture fx(kKeepAlive);
  auto fd = http::connect(fx.socket);
  REQUIRE(fd);
  for (int i = 0; i < 3; ++i) {
    REQUIRE(http::send_all(fd.get(), http::request_text("GET", "/v1/version")));
    auto r = http::read_reply(fd.get());
    REQUIRE(r);
    CHECK(r->status == 200);
    CHECK(r->keep_alive);
    CHECK(r->json.at("broker").at("api") == "v1");
  }
  // Two requests in one write (pipelined) are answered in order.
  REQUIRE(http::send_all(fd.get(), http::request_text("GET", "/v1/domains") +
                                       http::request_text("GET", "/v1/domains/nope")));
  auto a = http::read_reply(fd.get());
  auto b = http::read_reply(fd.get());
  REQUIRE((a && b));
  CHECK(a->status == 200);
  CHECK(a->json.at("domains").as_array().empty());
  CHECK(b->status == 404);
  CHECK(b->error_code() == "not_found");
  CHECK(b->error_field() == "name");
  CHECK(b->header("Content-Type") == "application/json");
  // Connection: close is honoured.
  REQUIRE(http::send_all(fd.get(), http::request_text("GET", "/v1/version", {}, false)));
  auto c = http::read_reply(fd.get());
  REQUIRE(c);
  CHECK_FALSE(c->keep_alive);
  CHECK(http::closed_within(fd.get(), 1s));
}

TEST_CASE("bad input on the wire is refused with the field named", "[api][server][bad-input]") {
  qbtest::ApiFixture fx(kBadInput);
  auto r = http::call(fx.socket, "POST", "/v1/domains", R"({"name": "vm1",)");
  REQUIRE(r);
  CHECK(r->status == 400);
  CHECK(r->error_code() == "malformed_json");
  CHECK(r->error_field() == "body");

  r = http::call(fx.socket, "POST", "/v1/domains", R"({"name":"vm1","vcpus":"two"})");
  REQUIRE(r);
  CHECK(r->status == 400);
  CHECK(r->error_field() == "vcpus");

  r = http::call(fx.socket, "POST", "/v1/domains", R"({"name":"vm1","colour":"blue"})");
  REQUIRE(r);
  CHECK(r->status == 400);
  CHECK(r->error_field() == "colour");
  CHECK(r->json.at("error").at("message").as_string().find("unknown field") != json::string::npos);

  r = http::call(fx.socket, "GET", "/v1/domains/..%2F..%2Fetc%2Fpasswd");
  REQUIRE(r);
  CHECK(r->status == 400);
  CHECK(r->error_field() == "name");

  // A path outside every image root is refused by the broker before anything is spawned.
  r = http::call(fx.socket, "POST", "/v1/domains", R"({"name":"vm1","kernel":"/etc/shadow"})");
  REQUIRE(r);
  CHECK(r->status == 400);
  CHECK(r->error_code() == "outside_roots");
  CHECK(fx.on_io([&] { return fx.broker.list().size(); }) == 0);

  // Not HTTP at all.
  auto fd = http::connect(fx.socket);
  REQUIRE(http::send_all(fd.get(), "HELLO\x01\x02 nonsense\r\n\r\n"));
  auto g = http::read_reply(fd.get());
  REQUIRE(g);
  CHECK(g->status == 400);
  CHECK(g->error_code() == "bad_request");
  CHECK(http::closed_within(fd.get(), 1s));
}

TEST_CASE("oversized header and body are 431 and 413 while other clients are served",
          "[api][server][bad-input]") {
  qbtest::ApiFixture fx(kLimits);
  auto big_header = http::connect(fx.socket);
  REQUIRE(http::send_all(big_header.get(), "GET /v1/version HTTP/1.1\r\nHost: x\r\nX-Pad: " +
                                               std::string(64 * 1024, 'a') + "\r\n\r\n"));
  auto h = http::read_reply(big_header.get());
  REQUIRE(h);
  CHECK(h->status == 431);
  CHECK(h->error_code() == "header_too_large");

  // 100 MiB announced and sent: refused after the header, without reading the body into memory.
  auto big = http::connect(fx.socket);
  REQUIRE(
      http::send_all(big.get(),
                     "POST /v1/domains HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Content-Length: 104857600\r\n\r\n"));
  std::string chunk(1 << 20, ' ');
  int fl = ::fcntl(big.get(), F_GETFL);
  ::fcntl(big.get(), F_SETFL, fl | O_NONBLOCK);
  std::size_t sent = 0;
  auto t0 = Clock::now();
  while (sent < (100u << 20) && ms_since(t0) < 5000) {
    pollfd p{big.get(), POLLIN | POLLOUT, 0};
    ::poll(&p, 1, 100);
    if (p.revents & (POLLIN | POLLHUP | POLLERR)) break;  // answered (or closed)
    if (p.revents & POLLOUT) {
      ssize_t n = ::send(big.get(), chunk.data(), chunk.size(), MSG_NOSIGNAL);
      if (n < 0 && errno != EAGAIN) break;
      if (n > 0) sent += static_cast<std::size_t>(n);
    }
  }
  ::fcntl(big.get(), F_SETFL, fl);
  CHECK(sent < (100u << 20));
  auto b = http::read_reply(big.get());
  REQUIRE(b);
  CHECK(b->status == 413);
  CHECK(b->error_code() == "body_too_large");

  // A chunked body without a length is cut off at the limit too.
  auto chunked = http::connect(fx.socket);
  std::string body = "POST /v1/domains HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
  for (int i = 0; i < 3; ++i) body += "80000\r\n" + std::string(0x80000, ' ') + "\r\n";
  (void)http::send_all(chunked.get(), body);
  auto c = http::read_reply(chunked.get());
  REQUIRE(c);
  CHECK(c->status == 413);

  auto ok = http::call(fx.socket, "GET", "/v1/version");
  REQUIRE(ok);
  CHECK(ok->status == 200);
}

TEST_CASE("a slowloris client gets 408 while others are served without delay",
          "[api][server][bad-input]") {
  qbtest::ApiFixture fx(kSlow);  // request_timeout 500 ms
  auto slow = http::connect(fx.socket);
  REQUIRE(http::send_all(slow.get(), "GET /v1/version HTTP/1.1\r\n"));
  auto t0 = Clock::now();
  // One header byte every 50 ms never completes the request in time; meanwhile others are fast.
  double worst = 0;
  std::string drip = "X-Slow: aaaaaaaaaaaaaaaa";
  for (std::size_t i = 0; i < drip.size() && ms_since(t0) < 450; ++i) {
    (void)http::send_all(slow.get(), drip.substr(i, 1));
    auto t = Clock::now();
    auto r = http::call(fx.socket, "GET", "/v1/domains");
    REQUIRE(r);
    CHECK(r->status == 200);
    worst = std::max(worst, ms_since(t));
    std::this_thread::sleep_for(30ms);
  }
  CHECK(worst < 100);
  auto r = http::read_reply(slow.get(), 3s);
  REQUIRE(r);
  CHECK(r->status == 408);
  CHECK(r->error_code() == "request_timeout");
  CHECK(ms_since(t0) >= 450);
  CHECK(ms_since(t0) < 1500);
  CHECK(http::closed_within(slow.get(), 1s));
}

TEST_CASE("an idle keep-alive connection is closed quietly after the idle timeout",
          "[api][server]") {
  auto limits = qbtest::ApiFixture::test_limits();
  limits.idle_timeout = 300ms;
  qbtest::ApiFixture fx(kIdle, limits);
  auto fd = http::connect(fx.socket);
  REQUIRE(http::send_all(fd.get(), http::request_text("GET", "/v1/version")));
  REQUIRE(http::read_reply(fd.get()));
  auto t0 = Clock::now();
  CHECK(http::closed_within(fd.get(), 2s));
  CHECK(ms_since(t0) >= 250);
  for (int i = 0; i < 100 && fx.on_io([&] { return fx.server.connections(); }) > 0; ++i) {
    std::this_thread::sleep_for(5ms);
  }
  CHECK(fx.on_io([&] { return fx.server.connections(); }) == 0);
}

TEST_CASE("peers that are neither root nor in the admin group get 403",
          "[api][server][privileged]") {
  QB_REQUIRE_ROOT();
  group* users = ::getgrnam("users");
  REQUIRE(users != nullptr);
  gid_t admin = users->gr_gid;
  qbtest::ApiFixture fx(kAuth, qbtest::ApiFixture::test_limits(), {}, admin);
  const std::string sock = fx.socket;
  auto status_as = [&](uid_t uid, gid_t gid) {
    return as_user(uid, gid, [&] {
      auto r = http::call(sock, "GET", "/v1/version");
      if (!r) return 99;
      if (r->status == 403 && r->error_code() != "unauthorized_peer") return 98;
      return static_cast<int>(r->status / 100);  // 2 or 4
    });
  };
  CHECK(status_as(kAuth + 50, kAuth + 50) == 4);  // a stranger
  CHECK(status_as(kAuth + 51, admin) == 2);       // a member of the admin group
  auto stats = fx.on_io([&] { return fx.server.stats(); });
  CHECK(stats.refused_unauthorized == 1);
  auto r = http::call(fx.socket, "GET", "/v1/version");  // root
  REQUIRE(r);
  CHECK(r->status == 200);
}

TEST_CASE("10000 idle connections are refused cleanly with 503 while others are still served",
          "[api][server][privileged][bad-input]") {
  QB_REQUIRE_ROOT();
  group* users = ::getgrnam("users");
  REQUIRE(users != nullptr);
  auto limits = qbtest::ApiFixture::test_limits();
  limits.max_connections = 512;
  limits.max_connections_per_uid = 256;
  limits.idle_timeout = 20s;
  limits.refuse_timeout = 200ms;  // the flood sends no request: each refusal waits this long
  qbtest::ApiFixture fx(kFlood, limits, {}, users->gr_gid);
  const std::string sock = fx.socket;
  int ready[2], done[2];
  REQUIRE(::pipe(ready) == 0);
  REQUIRE(::pipe(done) == 0);
  pid_t child = ::fork();
  if (child == 0) {
    // The flood, from an admin-group member with a uid of its own.
    if (::setgroups(0, nullptr) != 0 ||
        ::setresgid(users->gr_gid, users->gr_gid, users->gr_gid) != 0 ||
        ::setresuid(kFlood + 60, kFlood + 60, kFlood + 60) != 0) {
      ::_exit(100);
    }
    rlimit rl{};
    ::getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &rl);
    std::vector<int> fds;
    int refused = 0;
    for (int i = 0; i < 10000; ++i) {
      auto fd = http::connect(sock);
      if (!fd) ::_exit(101);
      fds.push_back(fd.release());
    }
    // Every refused connection has its 503 waiting; the accepted ones stay silent.
    std::vector<pollfd> pfds;
    for (int fd : fds) pfds.push_back({fd, POLLIN, 0});
    for (;;) {
      int ready_n = ::poll(pfds.data(), pfds.size(), 500);
      if (ready_n <= 0) break;
      for (auto& p : pfds) {
        if (p.fd < 0 || p.revents == 0) continue;
        char buf[512];
        ssize_t n = ::recv(p.fd, buf, sizeof(buf) - 1, 0);
        if (n > 12 && std::string_view(buf, 12) == "HTTP/1.1 503") ++refused;
        p.fd = -1;
      }
    }
    std::string msg = std::to_string(refused);
    (void)!::write(ready[1], msg.data(), msg.size());
    char c;
    (void)!::read(done[0], &c, 1);  // hold the idle connections until the parent is done
    ::_exit(0);
  }
  ::close(ready[1]);
  ::close(done[0]);
  char buf[32] = {};
  pollfd p{ready[0], POLLIN, 0};
  REQUIRE(::poll(&p, 1, 60000) == 1);
  ssize_t n = ::read(ready[0], buf, sizeof(buf) - 1);
  REQUIRE(n > 0);
  int refused = std::stoi(std::string(buf, static_cast<std::size_t>(n)));
  CHECK(refused == 10000 - 256);
  // While the flood holds its 256 idle connections, root is served, quickly.
  auto t0 = Clock::now();
  for (int i = 0; i < 20; ++i) {
    auto r = http::call(fx.socket, "GET", "/v1/domains");
    REQUIRE(r);
    CHECK(r->status == 200);
  }
  CHECK(ms_since(t0) < 1000);
  auto stats = fx.on_io([&] { return fx.server.stats(); });
  CHECK(stats.refused_busy == 10000 - 256);
  CHECK(fx.on_io([&] { return fx.server.connections(); }) == 256);
  (void)!::write(done[1], "x", 1);
  ::close(done[1]);
  ::close(ready[0]);
  int status = 0;
  ::waitpid(child, &status, 0);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  for (int i = 0; i < 200 && fx.on_io([&] { return fx.server.connections(); }) > 0; ++i) {
    std::this_thread::sleep_for(10ms);
  }
  CHECK(fx.on_io([&] { return fx.server.connections(); }) == 0);
}

TEST_CASE("events stream as SSE filtered by domain and a slow consumer is dropped",
          "[api][server][events]") {
  auto limits = qbtest::ApiFixture::test_limits();
  limits.event_queue = 8;
  qbtest::ApiFixture fx(kEvents, limits);
  http::EventReader all(fx.socket, "/v1/events");
  http::EventReader only_a(fx.socket, "/v1/events?domain=a");
  REQUIRE(all.ok());
  REQUIRE(only_a.ok());
  fx.on_io([&] {
    fx.broker.events().publish("a", "qemu", "STOP");
    fx.broker.events().publish("b", "qemu", "RESUME");
    fx.broker.events().publish("a", "domain", "created", {{"uid", 1}});
  });
  auto e1 = all.next();
  auto e2 = all.next();
  auto e3 = all.next();
  REQUIRE((e1 && e2 && e3));
  CHECK(e1->kind == "qemu");
  CHECK(e1->data.at("name") == "STOP");
  CHECK(e2->data.at("domain") == "b");
  CHECK(e3->data.at("data").at("uid") == 1);
  auto a1 = only_a.next();
  auto a2 = only_a.next();
  REQUIRE((a1 && a2));
  CHECK(a1->data.at("name") == "STOP");
  CHECK(a2->data.at("name") == "created");
  CHECK_FALSE(only_a.next(300ms));  // b's event never came; heartbeats are comments

  // The slow consumer: 10,000 events published in one go, faster than anyone reads.
  http::EventReader slow(fx.socket, "/v1/events");
  REQUIRE(slow.ok());
  fx.on_io([&] {
    for (int i = 0; i < 10000; ++i) fx.broker.events().publish("x", "job", "progress", {{"i", i}});
  });
  int got = 0;
  std::optional<http::EventReader::Event> last;
  while (auto e = slow.next(2s)) {
    last = e;
    if (e->kind == "dropped") break;
    ++got;
  }
  REQUIRE(last);
  CHECK(last->kind == "dropped");
  CHECK(got <= 8);
  CHECK(http::closed_within(slow.fd(), 2s));
  // The dropped subscription is gone; the others are still subscribed.
  for (int i = 0; i < 100 && fx.on_io([&] { return fx.broker.events().subscribers(); }) > 2; ++i) {
    std::this_thread::sleep_for(10ms);
  }
  CHECK(fx.on_io([&] { return fx.broker.events().subscribers(); }) <= 2);
}

TEST_CASE("stopping the server ends idle connections and event streams at once", "[api][server]") {
  qbtest::ApiFixture fx(kStop);
  http::EventReader events(fx.socket, "/v1/events");
  REQUIRE(events.ok());
  auto idle = http::connect(fx.socket);
  REQUIRE(http::send_all(idle.get(), http::request_text("GET", "/v1/version")));
  REQUIRE(http::read_reply(idle.get()));
  auto t0 = Clock::now();
  fx.on_io([&] { fx.server.stop(); });
  CHECK(http::closed_within(idle.get(), 1s));
  while (events.next(1s)) {
  }
  CHECK(events.ended());
  CHECK(ms_since(t0) < 1000);
  for (int i = 0; i < 100 && fx.on_io([&] { return fx.server.connections(); }) > 0; ++i) {
    std::this_thread::sleep_for(5ms);
  }
  CHECK(fx.on_io([&] { return fx.server.connections(); }) == 0);
  // New connections are refused by the kernel (the listener is closed).
  CHECK_FALSE(http::call(fx.socket, "GET", "/v1/version", {}, 500ms));
}

TEST_CASE("a body whose end is unknown is 400 and a close: no second request is smuggled in",
          "[api][server][bad-input]") {
  qbtest::ApiFixture fx(kFraming);
  // Were the first request read with an empty body, this would run as a request of its own.
  const std::string smuggled = "DELETE /v1/domains/victim HTTP/1.1\r\nHost: x\r\n\r\n";
  for (std::string codings : {"gzip", "chunked, gzip", "identity", "chunked;x=1, deflate", ","}) {
    INFO(codings);
    auto r = one_reply_then_close(
        fx.socket, "GET /v1/domains HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + codings +
                       "\r\n\r\n" + smuggled);
    REQUIRE(r);
    CHECK(r->status == 400);
    CHECK(r->error_code() == "bad_request");
  }
  // chunked twice is not chunked once.
  auto twice = one_reply_then_close(
      fx.socket,
      "GET /v1/domains HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"
      "0\r\n\r\n" +
          smuggled);
  REQUIRE(twice);
  CHECK(twice->status == 400);
  // HTTP/1.0 has no transfer codings (RFC 9112 6.1): its framing cannot be trusted.
  auto old = one_reply_then_close(
      fx.socket,
      "GET /v1/domains HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled);
  REQUIRE(old);
  CHECK(old->status == 400);
  // A coding before chunked, on one line or two, is one the server does not implement.
  for (std::string te : {"Transfer-Encoding: gzip, chunked\r\n",
                         "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"}) {
    INFO(te);
    auto r = one_reply_then_close(
        fx.socket, "POST /v1/domains HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
                       te + "\r\n4\r\n{}  \r\n0\r\n\r\n" + smuggled);
    REQUIRE(r);
    CHECK(r->status == 501);
    CHECK(r->error_code() == "unsupported_transfer_coding");
  }
  // Plain chunked still carries a body, and the connection stays usable after it.
  auto fd = http::connect(fx.socket);
  REQUIRE(http::send_all(
      fd.get(),
      "POST /v1/domains HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
      "Transfer-Encoding: chunked\r\n\r\n1e\r\n{\"name\":\"vm1\",\"colour\":\"blue\"}\r\n"
      "0\r\n\r\n" +
          http::request_text("GET", "/v1/version")));
  auto body = http::read_reply(fd.get());
  REQUIRE(body);
  CHECK(body->status == 400);
  CHECK(body->error_field() == "colour");
  auto next = http::read_reply(fd.get());
  REQUIRE(next);
  CHECK(next->status == 200);
  CHECK(fx.on_io([&] { return fx.broker.list().size(); }) == 0);
}

TEST_CASE("a request without Host, with two, or with a folded header line is 400 and a close",
          "[api][server][bad-input]") {
  qbtest::ApiFixture fx(kHead);
  const std::string next = http::request_text("GET", "/v1/version");
  for (std::string head : {
           "GET /v1/version HTTP/1.1\r\n\r\n",
           "GET /v1/version HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
           "GET /v1/version HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
           "GET /v1/version HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n\tb\r\n\r\n",
           "GET /v1/version HTTP/1.1\r\n Host: x\r\n\r\n",
       }) {
    auto r = one_reply_then_close(fx.socket, head + next);
    REQUIRE(r);
    CHECK(r->status == 400);
    CHECK(r->error_code() == "bad_request");
  }
  // HTTP/1.0 does not need a Host (RFC 9112 3.2 asks it of HTTP/1.1).
  auto fd = http::connect(fx.socket);
  REQUIRE(http::send_all(fd.get(), "GET /v1/version HTTP/1.0\r\n\r\n"));
  auto old = http::read_reply(fd.get());
  REQUIRE(old);
  CHECK(old->status == 200);
}

TEST_CASE("a body a browser could send across origins is 415 and creates nothing",
          "[api][server][bad-input]") {
  qbtest::ApiFixture fx(kMediaType);
  const std::string body = R"({"name":"vm1","machine":"none","memory_mib":16,"pci_slots":0})";
  for (std::string type : {"text/plain", "application/x-www-form-urlencoded"}) {
    auto fd = http::connect(fx.socket);
    REQUIRE(http::send_all(
        fd.get(), "POST /v1/domains HTTP/1.1\r\nHost: x\r\nContent-Type: " + type +
                      "\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body));
    auto r = http::read_reply(fd.get());
    REQUIRE(r);
    CHECK(r->status == 415);
    CHECK(r->error_code() == "unsupported_media_type");
  }
  CHECK(fx.on_io([&] { return fx.broker.list().size(); }) == 0);
}

TEST_CASE("a refused client reads its 403 or 503: curl and qbrokerctl show it every time",
          "[api][server][privileged]") {
  QB_REQUIRE_ROOT();
  group* users = ::getgrnam("users");
  REQUIRE(users != nullptr);
  auto limits = qbtest::ApiFixture::test_limits();
  limits.max_connections = 2;
  limits.idle_timeout = 20s;
  qbtest::ApiFixture fx(kRefused, limits, {}, users->gr_gid);
  // A body larger than the socket's buffers: the client is still writing it when it is refused.
  const std::string big = fx.run.path() + "/big.json";
  {
    std::ofstream f(big);
    f << "{\"name\":\"vm1\"" << std::string(512 * 1024, ' ') << "}";
  }
  REQUIRE(::chmod(big.c_str(), 0644) == 0);
  const std::vector<std::string> post{"/usr/bin/curl", "-sS",     "--unix-socket",
                                      fx.socket,       "-H",      "Content-Type: application/json",
                                      "--data-binary", "@" + big, "http://localhost/v1/domains"};
  const std::vector<std::string> get{"/usr/bin/curl", "-sS", "--unix-socket", fx.socket,
                                     "http://localhost/v1/version"};
  const std::vector<std::string> ctl{QBROKERCTL, "--socket", fx.socket, "list"};
  // Each client, many times: the answer must not depend on who wins a race to the socket.
  auto check_refused = [&](uid_t uid, gid_t gid, const std::string& code, int ctl_status) {
    for (int i = 0; i < 10; ++i) {
      for (const auto* args : {&post, &get}) {
        auto r = run_as(uid, gid, *args);
        INFO(r.text);
        CHECK(r.status == 0);
        CHECK(r.text.find("\"code\":\"" + code + "\"") != std::string::npos);
      }
      auto c = run_as(uid, gid, ctl);
      INFO(c.text);
      CHECK(c.status == ctl_status);
      CHECK(c.text.find("code:  " + code) != std::string::npos);
    }
  };
  check_refused(kRefused + 8, kRefused + 8, "unauthorized_peer", 6);

  // Both slots taken: a member of the admin group is refused for want of room.
  auto a = http::connect(fx.socket);
  auto b = http::connect(fx.socket);
  for (int fd : {a.get(), b.get()}) {
    REQUIRE(http::send_all(fd, http::request_text("GET", "/v1/version")));
    REQUIRE(http::read_reply(fd));
  }
  check_refused(kRefused + 9, users->gr_gid, "too_many_connections", 11);
  auto stats = fx.on_io([&] { return fx.server.stats(); });
  CHECK(stats.refused_unauthorized == 30);
  CHECK(stats.refused_busy == 30);
}

TEST_CASE("HEAD and unknown methods are 501 where no route has the path; HEAD gets no body",
          "[api][server]") {
  qbtest::ApiFixture fx(kMethods);
  auto fd = http::connect(fx.socket);
  REQUIRE(http::send_all(fd.get(), "BREW /v1/pot HTTP/1.1\r\nHost: x\r\n\r\n"));
  auto brew = http::read_reply(fd.get());
  REQUIRE(brew);
  CHECK(brew->status == 501);
  CHECK(brew->error_code() == "method_not_implemented");
  REQUIRE(http::send_all(fd.get(), "BREW /v1/version HTTP/1.1\r\nHost: x\r\n\r\n"));
  auto allowed = http::read_reply(fd.get());
  REQUIRE(allowed);
  CHECK(allowed->status == 405);
  CHECK(allowed->header("Allow") == "GET");

  // HEAD, then a GET on the same connection: the answer to HEAD is a header and nothing else,
  // so the next bytes are the GET's answer.
  for (std::string target : {"/v1/nothing", "/v1/version"}) {
    auto head = http::connect(fx.socket);
    REQUIRE(http::send_all(head.get(), "HEAD " + target + " HTTP/1.1\r\nHost: x\r\n\r\n" +
                                           http::request_text("GET", "/v1/version", {}, false)));
    std::string wire;
    char buf[4096];
    while (wait_readable(head.get(), 3s)) {
      ssize_t n = ::recv(head.get(), buf, sizeof(buf), 0);
      if (n <= 0) break;
      wire.append(buf, static_cast<std::size_t>(n));
    }
    INFO(wire);
    CHECK(wire.rfind(target == "/v1/nothing" ? "HTTP/1.1 501 " : "HTTP/1.1 405 ", 0) == 0);
    auto end = wire.find("\r\n\r\n");
    REQUIRE(end != std::string::npos);
    CHECK(wire.compare(end + 4, 13, "HTTP/1.1 200 ") == 0);
  }
}

TEST_CASE("events to an HTTP/1.0 client are sent without chunking, ended by the close",
          "[api][server][events]") {
  qbtest::ApiFixture fx(kEvents10);
  auto fd = http::connect(fx.socket);
  REQUIRE(http::send_all(fd.get(), "GET /v1/events?domain=a HTTP/1.0\r\n\r\n"));
  // Reads until `text` holds `needle`, or nothing more comes within 3 s.
  std::string text;
  auto read_until = [&](std::string_view needle) {
    char buf[4096];
    while (text.find(needle) == std::string::npos && wait_readable(fd.get(), 3s)) {
      ssize_t n = ::recv(fd.get(), buf, sizeof(buf), 0);
      if (n <= 0) return false;
      text.append(buf, static_cast<std::size_t>(n));
    }
    return text.find(needle) != std::string::npos;
  };
  REQUIRE(read_until(": subscribed\n\n"));
  auto end = text.find("\r\n\r\n");
  REQUIRE(end != std::string::npos);
  std::string header = text.substr(0, end + 2);
  INFO(header);
  CHECK(header.rfind("HTTP/1.0 200 ", 0) == 0);
  CHECK(header.find("Transfer-Encoding") == std::string::npos);
  CHECK(header.find("Content-Length") == std::string::npos);
  CHECK(text.substr(end + 4) == ": subscribed\n\n");
  text.clear();
  fx.on_io([&] { fx.broker.events().publish("a", "qemu", "STOP"); });
  REQUIRE(read_until("\n\n"));
  CHECK(text.rfind("id: ", 0) == 0);
  CHECK(text.find("\nevent: qemu\ndata: {") != std::string::npos);
  // The end of the stream is the close, with no last chunk before it.
  text.clear();
  fx.on_io([&] { fx.server.stop(); });
  CHECK_FALSE(read_until("0\r\n"));
  CHECK(text.empty());
  CHECK(http::closed_within(fd.get(), 1s));
}

TEST_CASE("a consumer that stops reading is sent a last dropped frame, then closed",
          "[api][server][events]") {
  auto limits = qbtest::ApiFixture::test_limits();  // write_timeout 1 s
  // Room for 16 batches between two turns of the writer. With 8, on a loaded 2-core host two
  // batches sometimes ran before the writer had a turn, and the stream ended on a full queue (a
  // "dropped" frame without a reason) before it could stall.
  limits.event_queue = 64;
  qbtest::ApiFixture fx(kStalled, limits);
  http::EventReader stalled(fx.socket, "/v1/events");
  REQUIRE(stalled.ok());
  // Events a few at a time, never more than the queue holds between two turns of the writer:
  // the stream falls behind only because its reader stopped reading, and the socket's buffer
  // fills until the writer would block.
  const std::string pad(4096, 'p');
  for (int batch = 0; batch < 150; ++batch) {
    fx.on_io([&] {
      for (int i = 0; i < 4; ++i) {
        fx.broker.events().publish("x", "job", "progress", {{"i", batch * 4 + i}, {"pad", pad}});
      }
    });
    std::this_thread::sleep_for(1ms);
  }
  std::this_thread::sleep_for(limits.write_timeout + 500ms);
  // Now the reader reads everything that was sent: the last frame says why it ends.
  int got = 0;
  std::optional<http::EventReader::Event> last;
  while (auto e = stalled.next(2s)) {
    last = e;
    if (e->kind == "dropped") break;
    ++got;
  }
  REQUIRE(last);
  CHECK(last->kind == "dropped");
  CHECK(last->data.at("data").at("reason") == "stalled");
  CHECK(got > 8);
  CHECK(http::closed_within(stalled.fd(), 2s));
}

TEST_CASE("root has a reserve past its quota: a process holding every root slot locks out no other",
          "[api][server]") {
  auto limits = qbtest::ApiFixture::test_limits();
  limits.max_connections_per_uid = 4;
  limits.admin_reserve = 3;
  limits.reserve_per_process = 2;
  limits.idle_timeout = 20s;
  qbtest::ApiFixture fx(kReserve, limits);  // this process runs as the daemon's own uid
  auto open_served = [&] {
    auto fd = http::connect(fx.socket);
    if (!fd || !http::send_all(fd.get(), http::request_text("GET", "/v1/version"))) return fd;
    auto r = http::read_reply(fd.get());
    if (!r || r->status != 200) fd.reset();
    return fd;
  };
  std::vector<fdpass::UniqueFd> held;
  for (int i = 0; i < 4 + 2; ++i) {  // the uid's quota, then this process's share of the reserve
    held.push_back(open_served());
    REQUIRE(held.back());
  }
  auto third = http::call(fx.socket, "GET", "/v1/version");
  REQUIRE(third);
  CHECK(third->status == 503);
  CHECK(third->json.at("error").at("message").as_string().find("already holds 2") !=
        json::string::npos);

  // Another process of the same uid is served from what is left of the reserve...
  const std::vector<std::string> curl{"/usr/bin/curl", "-sS", "--unix-socket", fx.socket,
                                      "http://localhost/v1/version"};
  auto other = run_as(::geteuid(), ::getegid(), curl);
  INFO(other.text);
  CHECK(other.status == 0);
  CHECK(other.text.find("\"broker\"") != std::string::npos);

  // ...until a third process holds the last slot of it.
  const std::string request = http::request_text("GET", "/v1/version");
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, fx.socket.c_str(), sizeof(addr.sun_path) - 1);
  int release[2];
  REQUIRE(::pipe2(release, O_CLOEXEC) == 0);
  pid_t holder = ::fork();
  if (holder == 0) {
    ::close(release[1]);
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) ::_exit(1);
    if (::write(fd, request.data(), request.size()) < 0) ::_exit(2);
    char c;
    (void)!::read(release[0], &c, 1);
    ::_exit(0);
  }
  ::close(release[0]);
  for (int i = 0; i < 200 && fx.on_io([&] { return fx.server.connections(); }) < 7; ++i) {
    std::this_thread::sleep_for(10ms);
  }
  REQUIRE(fx.on_io([&] { return fx.server.connections(); }) == 7);
  auto full = run_as(::geteuid(), ::getegid(), curl);
  INFO(full.text);
  CHECK(full.text.find("are taken") != std::string::npos);
  ::close(release[1]);
  int status = 0;
  ::waitpid(holder, &status, 0);
  for (int i = 0; i < 200 && fx.on_io([&] { return fx.server.connections(); }) > 6; ++i) {
    std::this_thread::sleep_for(10ms);
  }
  CHECK(run_as(::geteuid(), ::getegid(), curl).text.find("\"broker\"") != std::string::npos);
  auto stats = fx.on_io([&] { return fx.server.stats(); });
  CHECK(stats.accepted_reserve == 5);
}
