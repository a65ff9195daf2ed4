// The fake xenstored (tests/fakes/fake_xenstored) driven by the real libxenstore, as the Xen mode
// will drive it, plus raw bytes for what libxenstore never sends.
#include "fake_xenstored.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <thread>
#include <utility>

#include "fdpass/unique_fd.hpp"
#include "support/support.hpp"
#include "xs_wire.hpp"

extern "C" {
#include <xenstore.h>
}

namespace {

using qbtest::FakeXenstored;
using qbtest::TempDir;
namespace xs = qbtest::xs;
using Event = std::pair<std::string, std::string>;  // path, token

constexpr int wait_ms = 5000;  // bounds every wait for the server; a pass never waits this long

struct Server {
  TempDir dir;
  FakeXenstored xsd{dir / "socket"};
  Server() { ::setenv("XENSTORED_PATH", xsd.socket_path().c_str(), 1); }
};

// A libxenstore connection to the fake (XENSTORED_PATH, set by Server).
struct Client {
  Client() : h(xs_open(0)) { REQUIRE(h != nullptr); }
  ~Client() { xs_close(h); }
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;
  xs_handle* h;
};

std::optional<std::string> xs_get(xs_handle* h, const std::string& path,
                                  xs_transaction_t t = XBT_NULL) {
  unsigned len = 0;
  char* v = static_cast<char*>(xs_read(h, t, path.c_str(), &len));
  if (v == nullptr) return std::nullopt;
  std::string s(v, len);
  std::free(v);
  return s;
}

bool xs_put(xs_handle* h, const std::string& path, const std::string& value,
            xs_transaction_t t = XBT_NULL) {
  return xs_write(h, t, path.c_str(), value.data(), static_cast<unsigned>(value.size()));
}

std::vector<std::string> xs_list(xs_handle* h, const std::string& path) {
  unsigned n = 0;
  char** names = xs_directory(h, XBT_NULL, path.c_str(), &n);
  REQUIRE(names != nullptr);
  std::vector<std::string> out(names, names + n);
  std::free(names);
  return out;
}

// The next watch event, or nothing within `timeout_ms`.
std::optional<Event> next_event(xs_handle* h, int timeout_ms = wait_ms) {
  pollfd p{xs_fileno(h), POLLIN, 0};
  if (::poll(&p, 1, timeout_ms) != 1) return std::nullopt;
  unsigned n = 0;
  char** v = xs_read_watch(h, &n);
  REQUIRE(v != nullptr);
  Event e{v[XS_WATCH_PATH], v[XS_WATCH_TOKEN]};
  std::free(v);
  return e;
}

// No event is queued for `h`. A round trip first: the server queues the events a change causes
// before any later reply on the same socket, so once the reply is in, so is every such event.
bool quiet(xs_handle* h) {
  REQUIRE(xs_get(h, "/").has_value());
  return !next_event(h, 0).has_value();
}

// --- raw bytes, for what libxenstore never sends ---

fdpass::UniqueFd raw_connect(const std::string& path) {
  fdpass::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  REQUIRE(fd);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  REQUIRE(::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0);
  return fd;
}

void send_all(const fdpass::UniqueFd& fd, const std::string& bytes) {
  REQUIRE(::send(fd.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL) ==
          static_cast<ssize_t>(bytes.size()));
}

// The next message from the server; nullopt when it closes the connection (or stays silent).
std::optional<xs::Message> raw_receive(const fdpass::UniqueFd& fd, xs::Decoder& decoder) {
  xs::Message m;
  while (decoder.next(m) != xs::Decoder::Status::message) {
    pollfd p{fd.get(), POLLIN, 0};
    if (::poll(&p, 1, wait_ms) != 1) return std::nullopt;
    char buf[4096];
    const ssize_t n = ::recv(fd.get(), buf, sizeof(buf), 0);
    if (n <= 0) return std::nullopt;
    decoder.feed({buf, static_cast<std::size_t>(n)});
  }
  return m;
}

// The server closed `fd`: end of stream, with nothing before it (ECONNRESET: it closed with our
// bytes unread).
bool dropped(const fdpass::UniqueFd& fd) {
  pollfd p{fd.get(), POLLIN, 0};
  if (::poll(&p, 1, wait_ms) != 1) return false;
  char c;
  const ssize_t n = ::recv(fd.get(), &c, 1, 0);
  return n == 0 || (n < 0 && errno == ECONNRESET);
}

std::string words(std::initializer_list<std::string> w) {
  return xs::join_words(std::vector(w));
}

}  // namespace

// ---------------------------------------------------------------- the tree

TEST_CASE("fake xenstored: write creates parents, mkdir keeps values, rm takes subtrees", "[xen]") {
  Server s;
  Client c;
  REQUIRE(xs_put(c.h, "/a/b/c", "v"));
  CHECK(xs_get(c.h, "/a/b/c") == "v");
  CHECK(xs_get(c.h, "/a/b") == "");
  CHECK(s.xsd.read("/a/b/c") == "v");
  CHECK(xs_list(c.h, "/a") == std::vector<std::string>{"b"});

  REQUIRE(xs_put(c.h, "/a/b", "kept"));
  REQUIRE(xs_mkdir(c.h, XBT_NULL, "/a/b"));
  CHECK(xs_get(c.h, "/a/b") == "kept");
  REQUIRE(xs_mkdir(c.h, XBT_NULL, "/a/d/e"));
  CHECK(s.xsd.directory("/a") == std::vector<std::string>{"b", "d"});

  s.xsd.write("/a/z", "direct");
  CHECK(xs_get(c.h, "/a/z") == "direct");

  REQUIRE(xs_rm(c.h, XBT_NULL, "/a/b"));
  CHECK_FALSE(s.xsd.read("/a/b/c"));
  CHECK_FALSE(s.xsd.read("/a/b"));
  CHECK(xs_list(c.h, "/a") == std::vector<std::string>{"d", "z"});
  errno = 0;
  CHECK_FALSE(xs_get(c.h, "/a/b"));
  CHECK(errno == ENOENT);

  CHECK(xs_rm(c.h, XBT_NULL, "/a/gone"));  // absent, parent present: fine
  errno = 0;
  CHECK_FALSE(xs_rm(c.h, XBT_NULL, "/nowhere/gone"));  // parent absent too
  CHECK(errno == ENOENT);
  errno = 0;
  CHECK_FALSE(xs_put(c.h, "/bad//path", "x"));
  CHECK(errno == EINVAL);
  CHECK_FALSE(s.xsd.read("/bad"));
  char* dom = xs_get_domain_path(c.h, 5);
  REQUIRE(dom != nullptr);
  CHECK(std::string(dom) == "/local/domain/5");
  std::free(dom);
}

TEST_CASE("fake xenstored: a list over 4096 bytes comes back whole, in parts", "[xen]") {
  Server s;
  Client c;
  std::vector<std::string> names;
  for (int i = 0; i < 300; ++i) {
    names.push_back("child-with-a-long-name-" + std::to_string(1000 + i));
    s.xsd.write("/big/" + names.back(), "");
  }
  REQUIRE(xs::join_words(names).size() > 2 * xs::payload_max);
  std::vector<std::string> got = xs_list(c.h, "/big");
  std::sort(got.begin(), got.end());
  CHECK(got == names);
  CHECK(xs_list(c.h, "/big/" + names[0]).empty());
}

TEST_CASE("fake xenstored: permissions round trip, are inherited and validated", "[xen]") {
  Server s;
  Client c;
  REQUIRE(xs_put(c.h, "/p", ""));
  CHECK(s.xsd.perms("/p") == "n0");  // the root's
  xs_permissions set[2] = {{5, XS_PERM_NONE}, {0, XS_PERM_READ | XS_PERM_WRITE}};
  REQUIRE(xs_set_permissions(c.h, XBT_NULL, "/p", set, 2));
  CHECK(s.xsd.perms("/p") == "n5,b0");
  unsigned n = 0;
  xs_permissions* got = xs_get_permissions(c.h, XBT_NULL, "/p", &n);
  REQUIRE(got != nullptr);
  REQUIRE(n == 2);
  CHECK(got[0].id == 5);
  CHECK(got[0].perms == XS_PERM_NONE);
  CHECK(got[1].id == 0);
  CHECK(got[1].perms == (XS_PERM_READ | XS_PERM_WRITE));
  std::free(got);

  REQUIRE(xs_put(c.h, "/p/child/leaf", "x"));
  CHECK(s.xsd.perms("/p/child") == "n5,b0");
  CHECK(s.xsd.perms("/p/child/leaf") == "n5,b0");
  CHECK_FALSE(s.xsd.perms("/absent"));

  const auto raw = raw_connect(s.xsd.socket_path());
  xs::Decoder d;
  for (const char* bad : {"x5", "r", "r70000", "r5x"}) {
    send_all(raw, xs::encode(xs::set_perms, 1, 0, words({"/p", "r1", bad})));
    const auto reply = raw_receive(raw, d);
    REQUIRE(reply);
    CHECK(reply->header.type == xs::error);
    CHECK(reply->payload == std::string("EINVAL\0", 7));
  }
  CHECK(s.xsd.perms("/p") == "n5,b0");
}

// ---------------------------------------------------------------- watches

TEST_CASE("fake xenstored: a watch fires once at once, then for changes at or below it", "[xen]") {
  Server s;
  Client c;
  REQUIRE(xs_watch(c.h, "/w", "tok"));
  CHECK(next_event(c.h) == Event{"/w", "tok"});
  CHECK(s.xsd.watched() == std::vector<std::string>{"/w"});

  s.xsd.write("/w/x/y", "1");
  CHECK(next_event(c.h) == Event{"/w/x/y", "tok"});
  REQUIRE(xs_put(c.h, "/w", "2"));
  CHECK(next_event(c.h) == Event{"/w", "tok"});
  s.xsd.write("/wx", "sibling, not a child");
  s.xsd.write("/other", "");
  CHECK(quiet(c.h));

  REQUIRE(xs_watch(c.h, "/r/s/t", "deep"));
  CHECK(next_event(c.h) == Event{"/r/s/t", "deep"});
  s.xsd.write("/r/s/t", "");
  CHECK(next_event(c.h) == Event{"/r/s/t", "deep"});
  s.xsd.rm("/r");  // a removed ancestor fires the watch below it, with the watch's own path
  CHECK(next_event(c.h) == Event{"/r/s/t", "deep"});
  REQUIRE(xs_rm(c.h, XBT_NULL, "/w/x"));
  CHECK(next_event(c.h) == Event{"/w/x", "tok"});
  CHECK(quiet(c.h));
}

TEST_CASE("fake xenstored: unwatch stops the events", "[xen]") {
  Server s;
  Client c;
  REQUIRE(xs_watch(c.h, "/u", "t1"));
  REQUIRE(xs_watch(c.h, "/u", "t2"));
  CHECK(next_event(c.h) == Event{"/u", "t1"});
  CHECK(next_event(c.h) == Event{"/u", "t2"});
  CHECK(s.xsd.watched() == std::vector<std::string>{"/u", "/u"});
  REQUIRE(xs_unwatch(c.h, "/u", "t1"));
  CHECK(s.xsd.watched() == std::vector<std::string>{"/u"});
  s.xsd.write("/u/v", "");
  CHECK(next_event(c.h) == Event{"/u/v", "t2"});
  CHECK(quiet(c.h));
  errno = 0;
  CHECK_FALSE(xs_unwatch(c.h, "/u", "t1"));
  CHECK(errno == ENOENT);
}

TEST_CASE("fake xenstored: @releaseDomain fires only through fire()", "[xen]") {
  Server s;
  Client c;
  REQUIRE(xs_watch(c.h, "@releaseDomain", "rel"));
  CHECK(next_event(c.h) == Event{"@releaseDomain", "rel"});
  s.xsd.write("/local/domain/3", "");
  s.xsd.fire("@introduceDomain");
  CHECK(quiet(c.h));
  s.xsd.fire("@releaseDomain");
  CHECK(next_event(c.h) == Event{"@releaseDomain", "rel"});
  CHECK(quiet(c.h));
}

// ---------------------------------------------------------------- transactions

TEST_CASE("fake xenstored: a transaction sees its writes, others see them at commit", "[xen]") {
  Server s;
  Client c;
  REQUIRE(xs_watch(c.h, "/t", "tok"));
  CHECK(next_event(c.h) == Event{"/t", "tok"});
  const xs_transaction_t t = xs_transaction_start(c.h);
  REQUIRE(t != XBT_NULL);
  REQUIRE(xs_put(c.h, "/t/k", "v", t));
  REQUIRE(xs_mkdir(c.h, t, "/t/dir"));
  CHECK(xs_get(c.h, "/t/k", t) == "v");
  CHECK_FALSE(xs_get(c.h, "/t/k"));
  CHECK_FALSE(s.xsd.read("/t/k"));
  CHECK(quiet(c.h));  // watches fire on commit, not before

  REQUIRE(xs_transaction_end(c.h, t, false));
  CHECK(s.xsd.read("/t/k") == "v");
  CHECK(s.xsd.directory("/t") == std::vector<std::string>{"dir", "k"});
  CHECK(next_event(c.h) == Event{"/t/k", "tok"});
  CHECK(next_event(c.h) == Event{"/t/dir", "tok"});
  CHECK(quiet(c.h));
  CHECK(s.xsd.commits() == 1);
  CHECK(s.xsd.conflicts() == 0);
}

TEST_CASE("fake xenstored: a commit after another writer changed what it read is EAGAIN", "[xen]") {
  Server s;
  Client c;
  Client other;
  s.xsd.write("/c", "1");
  s.xsd.write("/unrelated", "");
  xs_transaction_t t = xs_transaction_start(c.h);
  REQUIRE(t != XBT_NULL);
  CHECK(xs_get(c.h, "/c", t) == "1");
  REQUIRE(xs_put(c.h, "/mine", "x", t));
  REQUIRE(xs_put(other.h, "/c", "2"));
  errno = 0;
  CHECK_FALSE(xs_transaction_end(c.h, t, false));
  CHECK(errno == EAGAIN);
  CHECK_FALSE(s.xsd.read("/mine"));
  CHECK(s.xsd.conflicts() == 1);

  t = xs_transaction_start(c.h);  // the retry
  CHECK(xs_get(c.h, "/c", t) == "2");
  REQUIRE(xs_put(c.h, "/mine", "x", t));
  REQUIRE(xs_put(other.h, "/unrelated", "y"));  // per node: no conflict (no new child of /)
  CHECK(xs_transaction_end(c.h, t, false));
  CHECK(s.xsd.read("/mine") == "x");
  CHECK(s.xsd.commits() == 1);

  SECTION("a sibling created under a directory the transaction listed conflicts") {
    t = xs_transaction_start(c.h);
    unsigned n = 0;
    std::free(xs_directory(c.h, t, "/", &n));
    s.xsd.write("/new", "");
    errno = 0;
    CHECK_FALSE(xs_transaction_end(c.h, t, false));
    CHECK(errno == EAGAIN);
  }
  SECTION("a node the transaction created, created meanwhile by another, conflicts") {
    t = xs_transaction_start(c.h);
    REQUIRE(xs_put(c.h, "/fresh/a", "mine", t));
    s.xsd.write("/fresh/b", "theirs");
    errno = 0;
    CHECK_FALSE(xs_transaction_end(c.h, t, false));
    CHECK(errno == EAGAIN);
    CHECK_FALSE(s.xsd.read("/fresh/a"));
  }
}

TEST_CASE("fake xenstored: fail_next_commits answers EAGAIN to that many commits", "[xen]") {
  Server s;
  Client c;
  s.xsd.fail_next_commits(2);
  int attempts = 0;
  for (;;) {
    ++attempts;
    const xs_transaction_t t = xs_transaction_start(c.h);
    REQUIRE(t != XBT_NULL);
    REQUIRE(xs_put(c.h, "/f", std::to_string(attempts), t));
    if (xs_transaction_end(c.h, t, false)) break;
    REQUIRE(errno == EAGAIN);
    CHECK_FALSE(s.xsd.read("/f"));
    REQUIRE(attempts < 10);
  }
  CHECK(attempts == 3);
  CHECK(s.xsd.read("/f") == "3");
  CHECK(s.xsd.conflicts() == 2);
  CHECK(s.xsd.commits() == 1);
}

TEST_CASE("fake xenstored: an aborted transaction leaves nothing", "[xen]") {
  Server s;
  Client c;
  s.xsd.write("/keep", "old");
  REQUIRE(xs_watch(c.h, "/", "all"));
  CHECK(next_event(c.h) == Event{"/", "all"});
  const xs_transaction_t t = xs_transaction_start(c.h);
  REQUIRE(xs_put(c.h, "/keep", "new", t));
  REQUIRE(xs_put(c.h, "/added/x", "1", t));
  REQUIRE(xs_rm(c.h, t, "/keep"));
  CHECK_FALSE(xs_get(c.h, "/keep", t));
  REQUIRE(xs_transaction_end(c.h, t, true));
  CHECK(s.xsd.read("/keep") == "old");
  CHECK_FALSE(s.xsd.read("/added"));
  CHECK(quiet(c.h));
  CHECK(s.xsd.commits() == 0);
  errno = 0;
  CHECK_FALSE(xs_get(c.h, "/keep", t));  // the transaction is gone
  CHECK(errno == ENOENT);
}

TEST_CASE("fake xenstored: a connection's watches end with it", "[xen]") {
  Server s;
  Client stays;
  xs_handle* leaves = xs_open(0);
  REQUIRE(leaves != nullptr);
  REQUIRE(xs_watch(leaves, "/x", "t"));
  REQUIRE(xs_watch(stays.h, "/y", "t"));
  CHECK(s.xsd.watched() == std::vector<std::string>{"/x", "/y"});
  xs_close(leaves);
  // The close is on the server's side before this request is, and a poll round takes both.
  REQUIRE(xs_get(stays.h, "/").has_value());
  CHECK(s.xsd.watched() == std::vector<std::string>{"/y"});
}

TEST_CASE("fake xenstored: stopping closes every connection and removes the socket", "[xen]") {
  TempDir dir;
  const std::string path = dir / "socket";
  {
    qbtest::FdLeakCheck no_leak;
    std::optional<FakeXenstored> xsd(std::in_place, path);
    ::setenv("XENSTORED_PATH", path.c_str(), 1);
    Client c;
    REQUIRE(xs_watch(c.h, "/", "t"));
    const auto raw = raw_connect(path);
    xs::Decoder d;
    send_all(raw, xs::encode(xs::read, 1, 0, std::string("/\0", 2)));
    REQUIRE(raw_receive(raw, d));  // accepted and served
    xsd.reset();
    CHECK(dropped(raw));
    CHECK(::access(path.c_str(), F_OK) != 0);
  }
  CHECK(xs_open(0) == nullptr);
  CHECK_THROWS_AS(FakeXenstored(dir / std::string(200, 'x')), std::invalid_argument);
}

// ---------------------------------------------------------------- strictness

TEST_CASE("fake xenstored: malformed requests drop the connection", "[xen]") {
  Server s;
  const auto raw = raw_connect(s.xsd.socket_path());
  xs::Decoder d;
  send_all(raw, xs::encode(xs::read, 42, 0, std::string("/\0", 2)));
  const auto reply = raw_receive(raw, d);  // the same socket served a good request first
  REQUIRE(reply);
  CHECK(reply->header.type == xs::read);
  CHECK(reply->header.req_id == 42);
  send_all(raw, xs::encode(8 /* XS_INTRODUCE */, 43, 0, words({"1", "2", "3"})));
  const auto unsupported = raw_receive(raw, d);
  REQUIRE(unsupported);
  CHECK(unsupported->header.type == xs::error);
  CHECK(unsupported->payload == std::string("ENOSYS\0", 7));
  CHECK(s.xsd.dropped_connections() == 0);

  SECTION("a type past XS_TYPE_COUNT") {
    send_all(raw, xs::encode_header({0xffff, 1, 0, 0}));
  }
  SECTION("a payload over 4096 bytes") {
    send_all(raw, xs::encode_header({xs::write, 1, 0, xs::payload_max + 1}));
  }
  SECTION("a path without its NUL") {
    send_all(raw, xs::encode(xs::read, 1, 0, "/a"));
  }
  SECTION("a WRITE with no NUL after the path") {
    send_all(raw, xs::encode(xs::write, 1, 0, "/a"));
  }
  CHECK(dropped(raw));
  CHECK(s.xsd.dropped_connections() == 1);
  Client c;  // the server itself carries on
  CHECK(xs_put(c.h, "/still", "up"));
}

TEST_CASE("fake xenstored: many clients at once, transactions keep a counter exact", "[xen]") {
  Server s;
  s.xsd.write("/counter", "0");
  constexpr int clients = 8;
  constexpr int increments = 25;
  std::vector<std::thread> threads;
  std::vector<int> failures(clients, 0);
  for (int i = 0; i < clients; ++i) {
    threads.emplace_back([i, &failures] {
      xs_handle* h = xs_open(0);
      if (h == nullptr) {
        ++failures[i];
        return;
      }
      const std::string mine = "/clients/" + std::to_string(i);
      for (int n = 0; n < increments; ++n) {
        if (!xs_put(h, mine, std::to_string(n))) ++failures[i];
        for (int attempt = 0;; ++attempt) {
          const xs_transaction_t t = xs_transaction_start(h);
          const auto v = xs_get(h, "/counter", t);
          if (t == XBT_NULL || !v || attempt > 1000) {
            ++failures[i];
            break;
          }
          if (!xs_put(h, "/counter", std::to_string(std::stoi(*v) + 1), t)) ++failures[i];
          if (xs_transaction_end(h, t, false)) break;
          if (errno != EAGAIN) ++failures[i];
        }
      }
      xs_close(h);
    });
  }
  for (auto& t : threads) t.join();
  CHECK(failures == std::vector<int>(clients, 0));
  CHECK(s.xsd.read("/counter") == std::to_string(clients * increments));
  CHECK(s.xsd.commits() == clients * increments);
  CHECK(s.xsd.directory("/clients").size() == clients);
  CHECK(s.xsd.read("/clients/0") == std::to_string(increments - 1));
}
