// qmp/outbox: the write side without sockets. Order, ids, short writes with and without an fd,
// the fd gate, giving up before and after the first byte, and what close() does with fds.
#include "qmp/outbox.hpp"

#include <boost/json/object.hpp>
#include <string>
#include <vector>

#include "fdpass/devices.hpp"
#include "support/support.hpp"

using namespace qmp;
using O = Outbox<std::string>;

namespace {

EncodedCommand command(std::string_view name, const boost::json::object& args = {}) {
  auto c = encode_command(name, args, Limits{});
  REQUIRE(c.has_value());
  return std::move(*c);
}

// An fd this test owns, for commands that carry one: the read end of a fresh pipe (the write
// end is closed at once, so each fd counts as one).
fdpass::UniqueFd some_fd() {
  auto p = fdpass::make_pipe();
  REQUIRE(p.has_value());
  return std::move(p->first);
}

// Writes everything the outbox offers now, as a socket that takes it all would; returns the lines
// issued (the transcript) and whether an fd went with each.
struct Written {
  std::vector<std::string> lines;
  std::vector<bool> with_fd;
  std::vector<std::string> slots;
};

Written write_all(O& o) {
  Written out;
  while (auto w = o.next_write()) {
    auto issued = o.commit_write(w->bytes.size());
    if (!issued) continue;
    out.lines.emplace_back(issued->line);
    out.with_fd.push_back(w->fd.valid());
    out.slots.push_back(issued->slot);
    CHECK(issued->with_fd == w->fd.valid());
  }
  return out;
}

}  // namespace

TEST_CASE("commands go out whole, in push order", "[qmp][outbox]") {
  qbtest::FdLeakCheck leaks;
  O o;
  o.push(command("query-status"), "a");
  o.push(command("query-block"), "b");
  o.push(command("query-version"), "c");
  CHECK(o.queued() == 3);
  auto w = o.next_write();
  REQUIRE(w.has_value());
  CHECK(w->bytes == "{\"execute\":\"query-status\"}\n");
  CHECK_FALSE(w->fd.valid());
  // Asking again without a write offers the same bytes.
  CHECK(o.next_write()->bytes == w->bytes);
  auto out = write_all(o);
  CHECK(out.lines == std::vector<std::string>{R"({"execute":"query-status"})",
                                              R"({"execute":"query-block"})",
                                              R"({"execute":"query-version"})"});
  CHECK(out.slots == std::vector<std::string>{"a", "b", "c"});
  CHECK(o.queued() == 0);
  CHECK(o.mux().pending() == 3);
  CHECK_FALSE(o.writable());
  CHECK_FALSE(o.next_write().has_value());
}

TEST_CASE("wire ids follow send order and replies find their commands", "[qmp][outbox]") {
  qbtest::FdLeakCheck leaks;
  O o(IdMode::wire);
  o.push(command("query-status"), "a");
  auto t = o.push(command("query-block"), "b");
  o.push(command("query-version"), "c");
  // A command dropped before it was written takes no id: the ids on the wire have no gap.
  CHECK(o.cancel(t));
  auto out = write_all(o);
  CHECK(out.lines == std::vector<std::string>{R"({"execute":"query-status","id":1})",
                                              R"({"execute":"query-version","id":2})"});
  auto d = o.on_reply(ReplyId::of(2), false);
  CHECK(d.outcome == O::Outcome::complete);
  CHECK(*d.slot == "c");
  CHECK(*o.on_reply(ReplyId::of(1), false).slot == "a");
}

TEST_CASE("a short write without an fd: the rest follows before anything else", "[qmp][outbox]") {
  qbtest::FdLeakCheck leaks;
  O o;
  o.push(command("qom-list", {{"path", "/machine"}}), "a");
  o.push(command("query-status"), "b");
  const std::string line = R"({"execute":"qom-list","arguments":{"path":"/machine"}})"
                           "\n";
  auto w = o.next_write();
  REQUIRE(w.has_value());
  CHECK(w->bytes == line);
  // The first byte issues the command: it is on the wire and waits for its reply.
  auto issued = o.commit_write(1);
  REQUIRE(issued.has_value());
  CHECK(issued->slot == "a");
  CHECK(issued->line == line.substr(0, line.size() - 1));
  CHECK(o.mux().pending() == 1);
  CHECK(o.mid_line());
  std::size_t off = 1;
  for (std::size_t chunk : {5u, 20u}) {
    w = o.next_write();
    REQUIRE(w.has_value());
    CHECK(w->bytes == line.substr(off));
    CHECK_FALSE(o.commit_write(chunk).has_value());
    off += chunk;
  }
  w = o.next_write();
  REQUIRE(w.has_value());
  CHECK(w->bytes == line.substr(off));
  CHECK_FALSE(o.commit_write(w->bytes.size()).has_value());
  CHECK_FALSE(o.mid_line());
  // Only now the next command.
  w = o.next_write();
  REQUIRE(w.has_value());
  CHECK(w->bytes == "{\"execute\":\"query-status\"}\n");
}

TEST_CASE("a short write with an fd: the fd goes with the first byte only", "[qmp][outbox]") {
  qbtest::FdLeakCheck leaks;
  O o;
  const std::size_t before = qbtest::open_fd_count();
  fdpass::UniqueFd fd = some_fd();
  const int number = fd.get();
  o.push(command("getfd", {{"fdname", "tap0"}}), "a", std::move(fd));
  CHECK(qbtest::open_fd_count() == before + 1);  // the outbox holds it until it is sent

  auto w = o.next_write();
  REQUIRE(w.has_value());
  CHECK(w->fd.get() == number);
  // Nothing went out (the socket was full): the same bytes and the same fd next time.
  w = o.next_write();
  REQUIRE(w.has_value());
  CHECK(w->fd.get() == number);

  auto issued = o.commit_write(3);
  REQUIRE(issued.has_value());
  CHECK(issued->with_fd);
  // The kernel holds the fd now; the outbox's copy is closed at once.
  CHECK(qbtest::open_fd_count() == before);
  w = o.next_write();
  REQUIRE(w.has_value());
  CHECK(w->bytes == R"(xecute":"getfd","arguments":{"fdname":"tap0"}})"
                    "\n");
  CHECK_FALSE(w->fd.valid());
  CHECK_FALSE(o.commit_write(w->bytes.size()).has_value());
  CHECK(o.fd_in_flight());
}

TEST_CASE("the fd gate: the next fd waits for the reply to the previous one", "[qmp][outbox]") {
  qbtest::FdLeakCheck leaks;
  auto mode = GENERATE(IdMode::positional, IdMode::wire);
  O o(mode);
  o.push(command("query-status"), "q0");
  o.push(command("getfd", {{"fdname", "a"}}), "fd-a", some_fd());
  o.push(command("query-block"), "q1");
  o.push(command("getfd", {{"fdname", "b"}}), "fd-b", some_fd());
  o.push(command("query-version"), "q2");

  // Plain commands and the first fd go out; the second fd is held, and the plain command pushed
  // after it stays behind it.
  auto out = write_all(o);
  CHECK(out.slots == std::vector<std::string>{"q0", "fd-a", "q1"});
  CHECK(out.with_fd == std::vector<bool>{false, true, false});
  CHECK_FALSE(o.writable());
  CHECK(o.queued() == 2);

  // Answers to commands without an fd do not open the gate.
  auto reply = [&](O::Id id) { return mode == IdMode::wire ? ReplyId::of(id) : ReplyId::absent(); };
  CHECK(*o.on_reply(reply(1), false).slot == "q0");
  CHECK_FALSE(o.writable());
  // The answer to the fd-carrying command does (an error answers it as well).
  CHECK(*o.on_reply(reply(2), true).slot == "fd-a");
  CHECK(o.writable());
  out = write_all(o);
  CHECK(out.slots == std::vector<std::string>{"fd-b", "q2"});
  CHECK(out.with_fd == std::vector<bool>{true, false});
}

TEST_CASE("the fd gate stays shut while an abandoned fd command is unanswered", "[qmp][outbox]") {
  qbtest::FdLeakCheck leaks;
  O o(IdMode::wire);
  o.push(command("add-fd", {{"opaque", "a"}}), "a", some_fd());
  o.push(command("add-fd", {{"opaque", "b"}}), "b", some_fd());
  auto out = write_all(o);
  REQUIRE(out.slots == std::vector<std::string>{"a"});
  // QEMU may still hold the first fd: giving up on the reply does not release the gate.
  CHECK(o.abandon(1));
  CHECK_FALSE(o.writable());
  CHECK(o.on_reply(ReplyId::of(1), false).outcome == O::Outcome::dropped_abandoned);
  CHECK(o.writable());
  out = write_all(o);
  CHECK(out.slots == std::vector<std::string>{"b"});
}

TEST_CASE("giving up: before the first byte the command is never sent", "[qmp][outbox]") {
  qbtest::FdLeakCheck leaks;
  O o(IdMode::wire);
  const std::size_t before = qbtest::open_fd_count();
  auto a = o.push(command("getfd", {{"fdname", "a"}}), "a", some_fd());
  auto b = o.push(command("getfd", {{"fdname", "b"}}), "b", some_fd());
  o.push(command("query-status"), "c");
  CHECK(qbtest::open_fd_count() == before + 2);

  SECTION("queued") {
    CHECK(o.cancel(b));
    CHECK(qbtest::open_fd_count() == before + 1);  // its fd is closed with it
    CHECK_FALSE(o.cancel(b));
    auto out = write_all(o);
    CHECK(out.slots == std::vector<std::string>{"a", "c"});
  }
  SECTION("offered but not written (the socket was full)") {
    auto w = o.next_write();
    REQUIRE(w.has_value());
    CHECK(o.cancel(a));
    CHECK(qbtest::open_fd_count() == before + 1);
    // The next command takes the head's place and its id.
    w = o.next_write();
    REQUIRE(w.has_value());
    CHECK(w->bytes == R"({"execute":"getfd","arguments":{"fdname":"b"},"id":1})"
                      "\n");
    CHECK(w->fd.valid());
  }
}

TEST_CASE("giving up: after the first byte the line is finished and the reply dropped",
          "[qmp][outbox]") {
  qbtest::FdLeakCheck leaks;
  O o(IdMode::wire);
  auto a = o.push(command("query-status"), "a");
  o.push(command("query-block"), "b");
  auto w = o.next_write();
  REQUIRE(w.has_value());
  auto issued = o.commit_write(4);
  REQUIRE(issued.has_value());
  CHECK(issued->ticket == a);
  // Written bytes cannot be recalled: it is no longer queued, but abandoned.
  CHECK_FALSE(o.cancel(a));
  CHECK(o.abandon(issued->id));
  CHECK(o.mid_line());
  w = o.next_write();
  REQUIRE(w.has_value());
  CHECK(w->bytes == std::string(R"({"execute":"query-status","id":1})"
                                "\n")
                        .substr(4));
  auto out = write_all(o);
  CHECK(out.slots == std::vector<std::string>{"b"});
  CHECK(o.on_reply(ReplyId::of(1), false).outcome == O::Outcome::dropped_abandoned);
  CHECK(*o.on_reply(ReplyId::of(2), false).slot == "b");
}

TEST_CASE("too many abandoned commands make the outbox unresponsive", "[qmp][outbox]") {
  qbtest::FdLeakCheck leaks;
  O o(IdMode::positional, 1);
  o.push(command("query-status"), "a");
  o.push(command("query-status"), "b");
  write_all(o);
  CHECK(o.abandon(1));
  CHECK_FALSE(o.unresponsive());
  CHECK(o.abandon(2));
  CHECK(o.unresponsive());
}

TEST_CASE("close hands back every waiting command and closes every unsent fd", "[qmp][outbox]") {
  qbtest::FdLeakCheck leaks;
  O o(IdMode::wire);
  const std::size_t before = qbtest::open_fd_count();
  o.push(command("getfd", {{"fdname", "a"}}), "sent", some_fd());
  o.push(command("query-status"), "partly-sent");
  o.push(command("getfd", {{"fdname", "b"}}), "held", some_fd());
  o.push(command("getfd", {{"fdname", "c"}}), "queued", some_fd());
  o.push(command("query-block"), "abandoned-queued");
  auto w = o.next_write();
  REQUIRE(w.has_value());
  REQUIRE(o.commit_write(w->bytes.size()).has_value());  // "sent" went out whole
  w = o.next_write();
  REQUIRE(w.has_value());
  REQUIRE(o.commit_write(2).has_value());  // "partly-sent" is half out
  CHECK(o.mid_line());
  CHECK(qbtest::open_fd_count() == before + 2);  // "held" and "queued" still own theirs

  std::vector<std::string> seen;
  o.close([&](std::string& s) { seen.push_back(s); });
  CHECK(seen ==
        std::vector<std::string>{"sent", "partly-sent", "held", "queued", "abandoned-queued"});
  CHECK(qbtest::open_fd_count() == before);
  CHECK(o.queued() == 0);
  CHECK(o.mux().pending() == 0);
  CHECK_FALSE(o.mid_line());
  CHECK_FALSE(o.fd_in_flight());
  CHECK_FALSE(o.next_write().has_value());

  // Ids are not reused: a reply to a command from before close() answers nothing new.
  o.push(command("query-version"), "after");
  w = o.next_write();
  REQUIRE(w.has_value());
  CHECK(w->bytes == R"({"execute":"query-version","id":3})"
                    "\n");
  CHECK_FALSE(w->fd.valid());
}

TEST_CASE("destroying an outbox closes the fds it still holds", "[qmp][outbox]") {
  qbtest::FdLeakCheck leaks;
  const std::size_t before = qbtest::open_fd_count();
  {
    O o;
    o.push(command("getfd", {{"fdname", "a"}}), "a", some_fd());
    o.push(command("getfd", {{"fdname", "b"}}), "b", some_fd());
    write_all(o);
    CHECK(qbtest::open_fd_count() == before + 1);
  }
  CHECK(qbtest::open_fd_count() == before);
}

TEST_CASE("a huge line's buffer is given back once written", "[qmp][outbox]") {
  qbtest::FdLeakCheck leaks;
  O o;
  o.push(command("qom-list", {{"path", std::string(1u << 20, 'p')}}), "big");
  auto w = o.next_write();
  REQUIRE(w.has_value());
  const std::size_t size = w->bytes.size();
  std::size_t sent = 0;
  while (auto part = o.next_write()) {
    o.commit_write(std::min<std::size_t>(part->bytes.size(), 65536));
    sent += std::min<std::size_t>(part->bytes.size(), 65536);
  }
  CHECK(sent == size);
  CHECK(o.buffer_capacity() < std::size_t{64} << 10);
}
