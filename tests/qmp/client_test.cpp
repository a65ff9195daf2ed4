// qmp::Client against the scripted fake peer: the protocol, fds, events, and hostile peers.
#include "qmp/client.hpp"

#include <fcntl.h>
#include <sys/stat.h>

#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/json/parse.hpp>
#include <future>
#include <string>
#include <vector>

#include "fake_qmp_server.hpp"
#include "fdpass/devices.hpp"
#include "support/support.hpp"
#include "test_util.hpp"

using namespace qmp;
using namespace std::chrono_literals;
using qbfake::FakeQmpPeer;
using qbfake::Script;
namespace asio = boost::asio;
namespace json = boost::json;

namespace {

using ClientPtr = std::unique_ptr<Client>;

ClientPtr connect_ok(asio::io_context& io, FakeQmpPeer& peer, ClientOptions o = {}) {
  auto c = qbtest::run(
      io, Client::connect(io.get_executor(), peer.client_end(), after(5s), std::move(o)));
  if (!c) FAIL("connect: " << c.error().message);
  return std::move(*c);
}

Error connect_err(asio::io_context& io, fdpass::UniqueFd fd, Deadline deadline,
                  ClientOptions o = {}) {
  auto c =
      qbtest::run(io, Client::connect(io.get_executor(), std::move(fd), deadline, std::move(o)));
  REQUIRE(c.has_error());
  return c.error();
}

Result<json::value> exec(asio::io_context& io, Client& c, Command cmd,
                         Deadline deadline = after(5s)) {
  return qbtest::run(io, c.execute(std::move(cmd), deadline));
}

bool is(const Result<json::value>& r, errc e) {
  return r.has_error() && r.error().is(e);
}

// A point in a script where the fake peer waits (at most 5 s) until the test opens it.
class Gate {
 public:
  Script::Step step() {
    return [f = opened_](FakeQmpPeer&) { return f.wait_for(5s) == std::future_status::ready; };
  }
  void open() { go_.set_value(); }

 private:
  std::promise<void> go_;
  std::shared_future<void> opened_ = go_.get_future().share();
};

ino_t inode_of(int fd) {
  struct stat st {};
  REQUIRE(::fstat(fd, &st) == 0);
  return st.st_ino;
}

}  // namespace

TEST_CASE("connect negotiates, execute returns the value, the transcript sees every line",
          "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.handshake().expect("query-status").reply(json::parse(R"({"status":"running","running":true})"));
  s.wait_for_close();
  FakeQmpPeer peer(std::move(s));
  std::vector<std::tuple<Direction, std::string, bool>> lines;
  ClientOptions o;
  o.transcript = [&](Direction d, std::string_view l, bool fd) {
    lines.emplace_back(d, std::string(l), fd);
  };
  auto c = connect_ok(io, peer, o);
  CHECK(c->greeting().version.to_string() == "7.2.22");
  CHECK(c->greeting().capabilities == std::vector<std::string>{"oob"});
  auto r = exec(io, *c, cmd::query_status());
  REQUIRE(r.has_value());
  auto st = reply::status(*r);
  REQUIRE(st.has_value());
  CHECK(st->status == "running");
  c.reset();
  auto report = peer.join();
  CHECK(report.errors.empty());
  CHECK(report.client_closed);
  REQUIRE(report.commands.size() == 2);
  CHECK(report.commands[0].line == R"({"execute":"qmp_capabilities"})");
  CHECK(report.commands[0].args.empty());  // no "oob" capability requested
  REQUIRE(lines.size() == 5);
  CHECK(std::get<0>(lines[0]) == Direction::from_qemu);
  CHECK(std::get<1>(lines[1]) == R"({"execute":"qmp_capabilities"})");
  CHECK(std::get<0>(lines[3]) == Direction::to_qemu);
  CHECK(std::get<1>(lines[3]) == R"({"execute":"query-status"})");
  CHECK(std::get<1>(lines[4]).find("running") != std::string::npos);
}

TEST_CASE("an error reply keeps the QMP class and desc", "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.handshake().expect("blockdev-del").reply_error("GenericError", "Node 'x' not found");
  s.wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  auto r = exec(io, *c, cmd::blockdev_del("x"));
  REQUIRE(is(r, errc::command_failed));
  CHECK(r.error().qmp_class == "GenericError");
  CHECK(r.error().qmp_desc == "Node 'x' not found");
  CHECK(r.error().message == "blockdev-del: Node 'x' not found");
  CHECK(c->is_open());
}

TEST_CASE("an error names the command once, and its class only beside the message",
          "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.handshake()
      .expect("no-such-cmd")
      .reply_error("CommandNotFound", "The command no-such-cmd has not been found");
  s.wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  auto r = exec(io, *c, cmd::raw("no-such-cmd"));
  REQUIRE(is(r, errc::command_failed));
  CHECK(r.error().message == "The command no-such-cmd has not been found");
  CHECK(r.error().qmp_class == "CommandNotFound");
}

TEST_CASE("events interleaved with replies reach subscriptions in order", "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.handshake().expect("stop").event("STOP").reply().expect("cont");
  s.event("RESUME").event("DEVICE_DELETED", {{"device", "d0"}}).reply().wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  auto sub = c->subscribe();
  REQUIRE(exec(io, *c, cmd::stop()).has_value());
  REQUIRE(exec(io, *c, cmd::cont()).has_value());
  CHECK(sub.size() == 3);
  auto e = qbtest::run(io, sub.next(after(1s)));
  REQUIRE(e.has_value());
  CHECK(e->name == "STOP");
  CHECK(e->timestamp.seconds == 1700000000);
  e = qbtest::run(io, sub.wait_for(event::device_deleted("d0"), after(1s)));
  REQUIRE(e.has_value());
  CHECK(e->data.at("device").as_string() == "d0");
  CHECK(sub.size() == 0);  // RESUME was consumed on the way
  CHECK(sub.dropped() == 0);
  CHECK(c->stats().events == 3);
}

TEST_CASE("wait_for_event skips what does not match", "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Gate gate;
  Script s;
  s.handshake().then(gate.step());
  s.event("DEVICE_DELETED", {{"device", "d0"}}).event("DEVICE_DELETED", {{"device", "d1"}});
  s.wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  auto w = qbtest::spawn(io, c->wait_for_event(event::device_deleted("d1"), after(5s)));
  gate.open();
  qbtest::run_until(io, [&] { return w->has_value(); });
  REQUIRE((*w)->has_value());
  CHECK((**w)->data.at("device").as_string() == "d1");
}

TEST_CASE("a subscription overflows by dropping its oldest events, and counts them",
          "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.handshake().expect("query-status");
  for (int i = 0; i < 10; ++i) s.event("E" + std::to_string(i));
  s.reply().wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  auto small = c->subscribe(SubscriptionOptions{3, 1u << 20});
  auto tiny = c->subscribe(SubscriptionOptions{100, 1});  // byte budget below one event
  auto all = c->subscribe();
  REQUIRE(exec(io, *c, cmd::query_status()).has_value());
  CHECK(small.size() == 3);
  CHECK(small.dropped() == 7);
  CHECK(small.try_next()->name == "E7");
  CHECK(small.try_next()->name == "E8");
  CHECK(small.try_next()->name == "E9");
  CHECK_FALSE(small.try_next().has_value());
  CHECK(tiny.size() == 0);
  CHECK(tiny.dropped() == 10);
  CHECK(all.size() == 10);
  CHECK(all.dropped() == 0);
}

TEST_CASE("a large event reaches every subscription within the message budget", "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.handshake().expect("query-status").event("BIG", {{"blob", std::string(400 * 1024, 'b')}});
  s.reply().wait_for_close();
  FakeQmpPeer peer(std::move(s));
  ClientOptions o;
  o.limits.max_message_memory = 1u << 20;
  auto c = connect_ok(io, peer, o);
  std::vector<EventSubscription> subs;
  for (int i = 0; i < 3; ++i) subs.push_back(c->subscribe(SubscriptionOptions{8, 4u << 20}));
  auto small = c->subscribe(SubscriptionOptions{8, 64 * 1024});
  REQUIRE(exec(io, *c, cmd::query_status()).has_value());
  for (auto& sub : subs) {
    auto e = sub.try_next();
    REQUIRE(e.has_value());
    CHECK(e->data.at("blob").as_string().size() == 400 * 1024);
  }
  CHECK(small.size() == 0);
  CHECK(small.dropped() == 1);
  CHECK(c->is_open());
}

TEST_CASE("wire ids: commands carry ids and replies out of order find their commands",
          "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.handshake().expect("query-status").expect("query-version");
  s.reply(json::value("second"), 2).reply(json::value("first"), 1).wait_for_close();
  FakeQmpPeer peer(std::move(s));
  ClientOptions o;
  o.ids = IdMode::wire;
  auto c = connect_ok(io, peer, o);
  auto a = qbtest::spawn(io, c->execute(cmd::query_status(), after(5s)));
  auto b = qbtest::spawn(io, c->execute(cmd::query_version(), after(5s)));
  qbtest::run_until(io, [&] { return a->has_value() && b->has_value(); });
  REQUIRE((*a)->has_value());
  REQUIRE((*b)->has_value());
  CHECK(**(*a) == json::value("first"));
  CHECK(**(*b) == json::value("second"));
  c.reset();
  auto report = peer.join();
  REQUIRE(report.commands.size() == 3);
  CHECK(report.commands[0].line == R"({"execute":"qmp_capabilities","id":1})");
  CHECK(report.commands[2].line == R"({"execute":"query-version","id":3})");
}

TEST_CASE("bogus, duplicate and foreign ids are dropped and counted", "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  ClientOptions o;
  o.ids = GENERATE(IdMode::positional, IdMode::wire);
  asio::io_context io;
  Script s;
  s.handshake().expect("query-status");
  s.reply_with_id(json::value("bogus"), json::value(1))
      .reply_with_id(json::value(999), json::value(2));
  s.reply_with_id(json::value(-3), json::value(3))
      .reply(json::value("ok"))
      .reply(json::value("dup"));
  s.reply_with_id(std::nullopt, json::value("no id"));
  s.expect("query-version").reply(json::value("v")).wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer, o);
  auto r = exec(io, *c, cmd::query_status());
  REQUIRE(r.has_value());
  CHECK(*r == json::value("ok"));
  // Let the extra replies arrive while nothing is outstanding: by position alone, an extra
  // reply would answer the next command (see qmp/mux.hpp); with wire ids it never could.
  qbtest::run_until(io, [&] { return c->stats().mux.dropped_unmatched == 5; });
  r = exec(io, *c, cmd::query_version());
  REQUIRE(r.has_value());
  CHECK(*r == json::value("v"));
  CHECK(c->stats().mux.dropped_unmatched == 5);
  CHECK(c->is_open());
}

TEST_CASE("wire ids: a duplicate reply never answers the next command", "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  ClientOptions o;
  o.ids = IdMode::wire;
  asio::io_context io;
  Script s;
  s.handshake().expect("query-status").reply(json::value("ok")).expect("query-version");
  s.reply(json::value("dup"), 1).reply(json::value("v"), 2).wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer, o);
  auto r = exec(io, *c, cmd::query_status());
  REQUIRE(r.has_value());
  r = exec(io, *c, cmd::query_version());
  REQUIRE(r.has_value());
  CHECK(*r == json::value("v"));
  CHECK(c->stats().mux.dropped_unmatched == 1);
}

TEST_CASE("an error without an id fails the oldest outstanding command", "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  ClientOptions o;
  o.ids = GENERATE(IdMode::positional, IdMode::wire);
  asio::io_context io;
  Script s;
  s.handshake().expect("query-status").expect("query-version");
  s.error_with_id(std::nullopt, "GenericError", "JSON parse error, stray '}'");
  s.reply(json::value("v"), 2).wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer, o);
  auto a = qbtest::spawn(io, c->execute(cmd::query_status(), after(5s)));
  auto b = qbtest::spawn(io, c->execute(cmd::query_version(), after(5s)));
  qbtest::run_until(io, [&] { return a->has_value() && b->has_value(); });
  REQUIRE(is(**a, errc::command_failed));
  CHECK((*a)->error().qmp_desc == "JSON parse error, stray '}'");
  CHECK((*b)->has_value());
  CHECK(c->stats().mux.id_less_errors == (o.ids == IdMode::wire ? 1u : 0u));
}

TEST_CASE("execute_with_fd sends the fd with the command's first byte", "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  qbtest::TempDir dir;
  qbtest::write_file(dir / "disk.img", "data");
  fdpass::UniqueFd file(::open((dir / "disk.img").c_str(), O_RDONLY | O_CLOEXEC));
  REQUIRE(file.valid());
  asio::io_context io;
  Script s;
  s.handshake().expect("add-fd").reply(json::parse(R"({"fdset-id": 0, "fd": 20})"));
  s.wait_for_close();
  FakeQmpPeer peer(std::move(s));
  std::vector<bool> with_fd;
  ClientOptions o;
  o.transcript = [&](Direction d, std::string_view, bool fd) {
    if (d == Direction::to_qemu) with_fd.push_back(fd);
  };
  auto c = connect_ok(io, peer, o);
  auto r = qbtest::run(io, c->execute_with_fd(cmd::add_fd(std::nullopt, "disk0"), file, after(5s)));
  REQUIRE(r.has_value());
  auto info = reply::add_fd(*r);
  REQUIRE(info.has_value());
  CHECK(info->fdset_id == 0);
  c.reset();
  auto report = peer.join();
  REQUIRE(report.commands.size() == 2);
  const auto& add = report.commands[1];
  CHECK(add.name == "add-fd");
  CHECK(add.fd_on_first_byte);
  REQUIRE(add.fds.size() == 1);
  CHECK(inode_of(add.fds[0].get()) == inode_of(file.get()));
  CHECK(report.commands[0].fds.empty());
  CHECK(with_fd == std::vector<bool>{false, true});
}

TEST_CASE("fd commands need execute_with_fd and other commands refuse an fd", "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.handshake().wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  CHECK(is(exec(io, *c, cmd::getfd("x")), errc::invalid_command));
  auto fds = fdpass::make_pipe();
  REQUIRE(fds.has_value());
  auto r = qbtest::run(io, c->execute_with_fd(cmd::query_status(), fds->first, after(1s)));
  CHECK(is(r, errc::invalid_command));
  r = qbtest::run(io, c->execute_with_fd(cmd::getfd("x"), fdpass::BorrowedFd(), after(1s)));
  CHECK(is(r, errc::invalid_command));
  CHECK(is(exec(io, *c, cmd::raw("bad name")), errc::invalid_command));
  CHECK(c->stats().lines_sent == 1);
}

TEST_CASE("only one fd-carrying command is in flight", "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  auto a = fdpass::make_pipe();
  REQUIRE(a.has_value());
  asio::io_context io;
  Gate gate;
  Script s;
  s.handshake().expect("getfd");
  s.then(gate.step());
  s.reply().expect("getfd").reply().expect("query-status").reply().wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  auto first = qbtest::spawn(io, c->execute_with_fd(cmd::getfd("a"), a->first, after(5s)));
  auto second = qbtest::spawn(io, c->execute_with_fd(cmd::getfd("b"), a->second, after(5s)));
  auto third = qbtest::spawn(io, c->execute(cmd::query_status(), after(5s)));
  qbtest::drain(io);
  // The second waits for the first's reply, and the third stays behind it, in order.
  CHECK(c->stats().lines_sent == 2);
  gate.open();
  qbtest::run_until(
      io, [&] { return first->has_value() && second->has_value() && third->has_value(); });
  CHECK((*first)->has_value());
  CHECK((*second)->has_value());
  CHECK((*third)->has_value());
  c.reset();
  auto report = peer.join();
  REQUIRE(report.commands.size() == 4);
  CHECK(report.commands[1].args.at("fdname").as_string() == "a");
  CHECK(report.commands[2].args.at("fdname").as_string() == "b");
  CHECK(report.commands[1].fd_on_first_byte);
  CHECK(report.commands[2].fd_on_first_byte);
  CHECK(inode_of(report.commands[1].fds.at(0).get()) == inode_of(a->first.get()));
  CHECK(inode_of(report.commands[2].fds.at(0).get()) == inode_of(a->second.get()));
}

TEST_CASE("a timed-out command is abandoned and its late reply dropped", "[qmp][client][slow]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.handshake().expect("query-status").expect("query-version");
  s.reply(json::value("late"), 1).reply(json::value("v"), 2).wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  auto t0 = Clock::now();
  auto r = exec(io, *c, cmd::query_status(), after(50ms));
  CHECK(Clock::now() - t0 < 2s);
  REQUIRE(is(r, errc::timeout));
  CHECK(r.error().message == "query-status: no reply before the deadline");
  r = exec(io, *c, cmd::query_version());
  REQUIRE(r.has_value());
  CHECK(*r == json::value("v"));
  CHECK(c->stats().mux.dropped_abandoned == 1);
}

TEST_CASE("too many unanswered commands close the connection", "[qmp][client][slow]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.handshake().wait_for_close();
  FakeQmpPeer peer(std::move(s));
  ClientOptions o;
  o.max_abandoned = 2;
  auto c = connect_ok(io, peer, o);
  CHECK(is(exec(io, *c, cmd::query_status(), after(10ms)), errc::timeout));
  CHECK(is(exec(io, *c, cmd::query_status(), after(10ms)), errc::timeout));
  CHECK(c->is_open());
  CHECK(is(exec(io, *c, cmd::query_status(), after(10ms)), errc::timeout));
  CHECK_FALSE(c->is_open());
  CHECK(c->close_reason()->is(errc::unresponsive));
  CHECK(is(exec(io, *c, cmd::query_status()), errc::disconnected));
}

TEST_CASE("a command whose deadline passes while queued is never sent", "[qmp][client][slow]") {
  qbtest::FdLeakCheck leaks;
  auto p = fdpass::make_pipe();
  REQUIRE(p.has_value());
  asio::io_context io;
  Gate gate;
  Script s;
  s.handshake().expect("getfd");
  s.then(gate.step());
  s.reply().expect("query-status").reply().wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  auto first = qbtest::spawn(io, c->execute_with_fd(cmd::getfd("a"), p->first, after(5s)));
  auto queued = qbtest::run(io, c->execute_with_fd(cmd::getfd("b"), p->second, after(30ms)));
  CHECK(is(queued, errc::timeout));
  gate.open();
  qbtest::run_until(io, [&] { return first->has_value(); });
  CHECK(exec(io, *c, cmd::query_status()).has_value());
  c.reset();
  auto report = peer.join();
  REQUIRE(report.commands.size() == 3);
  CHECK(report.commands[2].name == "query-status");
}

TEST_CASE("cancelling the wait abandons the command", "[qmp][client][slow]") {
  using namespace asio::experimental::awaitable_operators;
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.handshake().expect("query-status").expect("query-version");
  s.reply(json::value("late"), 1).reply(json::value("v"), 2).wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  auto race = [&]() -> asio::awaitable<std::size_t> {
    asio::steady_timer t(io, 20ms);
    auto v =
        co_await (c->execute(cmd::query_status(), after(5s)) || t.async_wait(asio::use_awaitable));
    co_return v.index();
  };
  CHECK(qbtest::run(io, race()) == 1);
  auto r = exec(io, *c, cmd::query_version());
  REQUIRE(r.has_value());
  CHECK(*r == json::value("v"));
  CHECK(c->stats().mux.dropped_abandoned == 1);
}

TEST_CASE("a disconnect fails every pending command with a clear error", "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.handshake().expect("query-status").expect("query-block").close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  auto sub = c->subscribe();
  auto a = qbtest::spawn(io, c->execute(cmd::query_status(), after(5s)));
  auto b = qbtest::spawn(io, c->execute(cmd::query_block(), after(5s)));
  qbtest::run_until(io, [&] { return a->has_value() && b->has_value(); });
  REQUIRE(is(**a, errc::disconnected));
  CHECK((*a)->error().message ==
        "query-status: QMP connection lost: the peer closed the connection");
  CHECK(is(**b, errc::disconnected));
  CHECK_FALSE(c->is_open());
  REQUIRE(c->close_reason().has_value());
  CHECK(c->close_reason()->is(errc::disconnected));
  CHECK(is(exec(io, *c, cmd::query_status()), errc::disconnected));
  auto e = qbtest::run(io, sub.next(after(1s)));
  REQUIRE(e.has_error());
  CHECK(e.error().is(errc::disconnected));
  auto late = c->subscribe();
  CHECK(qbtest::run(io, late.next(after(1s))).error().is(errc::disconnected));
}

TEST_CASE("close() fails pending commands with errc::closed", "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.handshake().expect("query-status").wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  auto a = qbtest::spawn(io, c->execute(cmd::query_status(), after(5s)));
  qbtest::drain(io);
  c->close();
  c->close();
  qbtest::run_until(io, [&] { return a->has_value(); });
  CHECK(is(**a, errc::closed));
  CHECK(is(exec(io, *c, cmd::cont()), errc::closed));
  c.reset();
  CHECK(peer.join().client_closed);
}

TEST_CASE("a command larger than the socket buffer is written in pieces, in order",
          "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.handshake().expect("qom-list").reply().expect("query-status").reply().wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  const std::string path(3u << 20, 'p');
  auto a = qbtest::spawn(io, c->execute(cmd::qom_list(path), after(10s)));
  auto b = qbtest::spawn(io, c->execute(cmd::query_status(), after(10s)));
  qbtest::run_until(io, [&] { return a->has_value() && b->has_value(); });
  CHECK((*a)->has_value());
  CHECK((*b)->has_value());
  c.reset();
  auto report = peer.join();
  REQUIRE(report.commands.size() == 3);
  CHECK(report.commands[1].args.at("path").as_string().size() == path.size());
  CHECK(report.commands[2].name == "query-status");
}

// --- hostile peers ------------------------------------------------------------------------

TEST_CASE("hostile: a 100 MiB line fails the connection in bounded memory and time",
          "[qmp][client][hostile]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.handshake().expect("query-status").huge_line(100u << 20);
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  const Limits limits;
  const std::size_t rss_before = qbtest::proc_status_kib("VmRSS");
  auto t0 = Clock::now();
  auto r = exec(io, *c, cmd::query_status(), after(30s));
  CHECK(Clock::now() - t0 < 10s);
  REQUIRE(is(r, errc::disconnected));
  CHECK(c->close_reason()->is(errc::line_too_long));
  CHECK(c->stats().peak_line_buffer <= limits.max_line + 1 + ClientOptions{}.read_size);
  // The peer offered 100 MiB; the client held at most the line bound, plus the copies a
  // growing buffer leaves behind and a constant.
  const std::size_t hwm = qbtest::proc_status_kib("VmHWM");
  CHECK(hwm - std::min(hwm, rss_before) < 3 * (limits.max_line >> 10) + 16 * 1024);
  auto report = peer.join();
  CHECK(report.bytes_sent < (100u << 20));
}

TEST_CASE("hostile: 10,000 levels of nesting", "[qmp][client][hostile]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.handshake().expect("query-status").deep_nesting(10000).wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  CHECK(is(exec(io, *c, cmd::query_status()), errc::disconnected));
  CHECK(c->close_reason()->is(errc::too_deep));
  c.reset();
  CHECK(peer.join().client_closed);
}

TEST_CASE("hostile: invalid UTF-8 and non-QMP JSON", "[qmp][client][hostile]") {
  qbtest::FdLeakCheck leaks;
  auto line = GENERATE(std::string("{\"return\": \"\xc3\x28\", \"id\": 2}\n"),
                       std::string("[1, 2, 3]\n"), std::string("{\"return\": }\n"));
  asio::io_context io;
  Script s;
  s.handshake().expect("query-status").raw(line).wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  CHECK(is(exec(io, *c, cmd::query_status()), errc::disconnected));
  CHECK((c->close_reason()->is(errc::invalid_json) ||
         c->close_reason()->is(errc::unexpected_message)));
}

TEST_CASE("hostile: fds sent back are closed and fail the connection", "[qmp][client][hostile]") {
  qbtest::FdLeakCheck leaks;
  auto p = fdpass::make_pipe();
  REQUIRE(p.has_value());
  asio::io_context io;
  Script s;
  s.handshake().expect("query-status");
  s.raw_with_fd("{\"return\": {}}\r\n", p->first).wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  CHECK(is(exec(io, *c, cmd::query_status()), errc::disconnected));
  CHECK(c->close_reason()->is(errc::unexpected_fds));
  CHECK(c->stats().fds_refused == 1);
}

TEST_CASE("hostile: with max_fds set, stray fds are closed and counted", "[qmp][client][hostile]") {
  qbtest::FdLeakCheck leaks;
  auto p = fdpass::make_pipe();
  REQUIRE(p.has_value());
  asio::io_context io;
  Script s;
  s.handshake().expect("query-status");
  s.raw_with_fd("{\"return\": {}}\r\n", p->first).wait_for_close();
  FakeQmpPeer peer(std::move(s));
  ClientOptions o;
  o.limits.max_fds = 1;
  auto c = connect_ok(io, peer, o);
  CHECK(exec(io, *c, cmd::query_status()).has_value());
  CHECK(c->stats().fds_refused == 1);
  CHECK(c->is_open());
}

TEST_CASE("hostile: a close in the middle of a line", "[qmp][client][hostile]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.handshake().expect("query-status").raw(R"({"return": {"stat)").close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  auto r = exec(io, *c, cmd::query_status());
  REQUIRE(is(r, errc::disconnected));
  CHECK(c->close_reason()->is(errc::disconnected));
}

TEST_CASE("hostile: a greeting that never comes", "[qmp][client][hostile][slow]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto t0 = Clock::now();
  auto e = connect_err(io, peer.client_end(), after(100ms));
  CHECK(Clock::now() - t0 < 2s);
  CHECK(e.is(errc::no_greeting));
  CHECK(peer.join().client_closed);
}

TEST_CASE("hostile: a greeting dripped one byte per ms", "[qmp][client][hostile][slow]") {
  qbtest::FdLeakCheck leaks;
  const std::string greeting =
      R"({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}})"
      "\r\n";
  asio::io_context io;
  SECTION("within the deadline") {
    Script s;
    s.drip(greeting).expect("qmp_capabilities").reply().wait_for_close();
    FakeQmpPeer peer(std::move(s));
    auto c = connect_ok(io, peer);
    CHECK(c->greeting().version.minor == 2);
  }
  SECTION("past the deadline") {
    Script s;
    s.drip(greeting).wait_for_close();
    FakeQmpPeer peer(std::move(s));
    auto t0 = Clock::now();
    auto e = connect_err(io, peer.client_end(), after(40ms));
    CHECK(Clock::now() - t0 < 2s);
    CHECK(e.is(errc::no_greeting));
  }
}

TEST_CASE("hostile: anything but a greeting first", "[qmp][client][hostile]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.raw("{\"return\": {}, \"id\": 1}\n").wait_for_close();
  FakeQmpPeer peer(std::move(s));
  CHECK(connect_err(io, peer.client_end(), after(5s)).is(errc::no_greeting));
}

TEST_CASE("an event ahead of the greeting is let through", "[qmp][client]") {
  // QEMU sends RESUME first to a client that connected while it was starting.
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.event("RESUME").handshake().expect("query-status").reply({{"status", "running"}, {"running", true}, {"singlestep", false}});
  s.wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto c = connect_ok(io, peer);
  CHECK(c->stats().events == 1);
  auto r = exec(io, *c, cmd::query_status());
  REQUIRE(r.has_value());
  CHECK(reply::status(*r).has_value());
}

TEST_CASE("refused capabilities negotiation", "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  Script s;
  s.greeting().expect("qmp_capabilities").reply_error("CommandNotFound", "nope").wait_for_close();
  FakeQmpPeer peer(std::move(s));
  auto e = connect_err(io, peer.client_end(), after(5s));
  CHECK(e.is(errc::negotiation_failed));
  CHECK(e.qmp_class == "CommandNotFound");
  CHECK(peer.join().client_closed);
}

TEST_CASE("connect refuses what is not a connected Unix stream socket", "[qmp][client]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  auto p = fdpass::make_pipe();
  REQUIRE(p.has_value());
  CHECK(connect_err(io, std::move(p->first), after(1s)).is(errc::bad_socket));
  auto sp = fdpass::make_socketpair(SOCK_SEQPACKET);
  REQUIRE(sp.has_value());
  CHECK(connect_err(io, std::move(sp->first), after(1s)).is(errc::bad_socket));
  fdpass::UniqueFd unconnected(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  CHECK(connect_err(io, std::move(unconnected), after(1s)).is(errc::bad_socket));
}

TEST_CASE("a repeated greeting is ignored, a different second one closes the connection",
          "[qmp][client][hostile]") {
  qbtest::FdLeakCheck leaks;
  {
    asio::io_context io;
    Script s;
    s.greeting().greeting().expect("qmp_capabilities").reply().expect("query-status")
        .reply(json::object{{"status", "running"}, {"running", true}})
        .wait_for_close();
    FakeQmpPeer peer(std::move(s));
    auto c = connect_ok(io, peer);
    CHECK(exec(io, *c, cmd::query_status()).has_value());
    c.reset();
    CHECK(peer.join().client_closed);
  }
  {
    asio::io_context io;
    Script s;
    s.handshake()
        .raw(R"({"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}})"
             "\n")
        .wait_for_close();
    FakeQmpPeer peer(std::move(s));
    auto c = connect_ok(io, peer);
    CHECK(is(exec(io, *c, cmd::query_status()), errc::disconnected));
    REQUIRE(c->close_reason());
    CHECK(c->close_reason()->is(errc::unexpected_message));
  }
}
