// qmp/mux: positional and id matching, abandoned and unmatched replies, id-less errors, the fd
// gate. The last cases drive decoder + parser + mux with byte strings, as the client does.
#include "qmp/mux.hpp"

#include <boost/json/serialize.hpp>
#include <string>
#include <vector>

#include "support/support.hpp"

using namespace qmp;
using M = Mux<int>;

TEST_CASE("positional: each reply answers the oldest command", "[qmp][mux]") {
  qbtest::FdLeakCheck leaks;
  M m;
  CHECK(m.mode() == IdMode::positional);
  auto a = m.issue(10, false);
  auto b = m.issue(20, false);
  auto d = m.on_reply(ReplyId::absent(), false);
  CHECK(d.outcome == M::Outcome::complete);
  CHECK(d.id == a);
  CHECK(*d.slot == 10);
  d = m.on_reply(ReplyId::absent(), true);
  CHECK(d.outcome == M::Outcome::complete);
  CHECK(d.id == b);
  // Nothing outstanding, and ids were never sent: both are unmatched.
  CHECK(m.on_reply(ReplyId::absent(), false).outcome == M::Outcome::dropped_unmatched);
  m.issue(30, false);
  CHECK(m.on_reply(ReplyId::of(3), false).outcome == M::Outcome::dropped_unmatched);
  CHECK(m.pending() == 1);
  CHECK(m.counters().id_less_errors == 0);
}

TEST_CASE("wire ids: ids increase and replies find their command", "[qmp][mux]") {
  qbtest::FdLeakCheck leaks;
  M m(IdMode::wire);
  CHECK(m.next_id() == 1);
  auto a = m.issue(10, false);
  auto b = m.issue(20, false);
  CHECK(a == 1);
  CHECK(b == 2);
  CHECK(m.pending() == 2);
  auto d = m.on_reply(ReplyId::of(b), false);  // out of order is fine
  CHECK(d.outcome == M::Outcome::complete);
  CHECK(d.id == b);
  CHECK(*d.slot == 20);
  d = m.on_reply(ReplyId::of(a), true);
  CHECK(d.outcome == M::Outcome::complete);
  CHECK(*d.slot == 10);
  CHECK(m.pending() == 0);
  CHECK(m.counters().completed == 2);
}

TEST_CASE("the late reply of an abandoned command is dropped", "[qmp][mux]") {
  qbtest::FdLeakCheck leaks;
  auto mode = GENERATE(IdMode::positional, IdMode::wire);
  M m(mode);
  auto a = m.issue(1, false);
  CHECK(m.abandon(a));
  CHECK_FALSE(m.abandon(a));
  CHECK(m.pending() == 0);
  CHECK(m.abandoned() == 1);
  auto d = m.on_reply(mode == IdMode::wire ? ReplyId::of(a) : ReplyId::absent(), false);
  CHECK(d.outcome == M::Outcome::dropped_abandoned);
  CHECK_FALSE(d.slot.has_value());
  CHECK(m.abandoned() == 0);
  CHECK(m.counters().dropped_abandoned == 1);
}

TEST_CASE("wire ids: replies for unknown, duplicate and foreign ids are dropped and counted",
          "[qmp][mux]") {
  qbtest::FdLeakCheck leaks;
  M m(IdMode::wire);
  auto a = m.issue(1, false);
  CHECK(m.on_reply(ReplyId::of(99), false).outcome == M::Outcome::dropped_unmatched);
  CHECK(m.on_reply(ReplyId::of(0), false).outcome == M::Outcome::dropped_unmatched);
  CHECK(m.on_reply({ReplyId::Kind::foreign, 0}, false).outcome == M::Outcome::dropped_unmatched);
  CHECK(m.pending() == 1);
  CHECK(m.on_reply(ReplyId::of(a), false).outcome == M::Outcome::complete);
  CHECK(m.on_reply(ReplyId::of(a), false).outcome == M::Outcome::dropped_unmatched);
  CHECK(m.counters().dropped_unmatched == 4);
}

TEST_CASE("wire ids: an error without an id fails the oldest outstanding command", "[qmp][mux]") {
  qbtest::FdLeakCheck leaks;
  M m(IdMode::wire);
  SECTION("oldest pending") {
    m.issue(1, false);
    m.issue(2, false);
    auto d = m.on_reply(ReplyId::absent(), true);
    CHECK(d.outcome == M::Outcome::complete);
    CHECK(*d.slot == 1);
    CHECK(m.pending() == 1);
    CHECK(m.counters().id_less_errors == 1);
  }
  SECTION("oldest abandoned absorbs it") {
    auto a = m.issue(1, false);
    m.issue(2, false);
    m.abandon(a);
    CHECK(m.on_reply(ReplyId::absent(), true).outcome == M::Outcome::dropped_abandoned);
    CHECK(m.pending() == 1);
  }
  SECTION("nothing outstanding") {
    CHECK(m.on_reply(ReplyId::absent(), true).outcome == M::Outcome::dropped_unmatched);
    CHECK(m.counters().id_less_errors == 1);
  }
  SECTION("a success without an id answers nothing") {
    m.issue(1, false);
    CHECK(m.on_reply(ReplyId::absent(), false).outcome == M::Outcome::dropped_unmatched);
    CHECK(m.pending() == 1);
  }
}

TEST_CASE("one fd-carrying command in flight, until its reply even when abandoned", "[qmp][mux]") {
  qbtest::FdLeakCheck leaks;
  M m(IdMode::wire);
  CHECK_FALSE(m.fd_in_flight());
  auto q = m.issue(1, false);
  CHECK_FALSE(m.fd_in_flight());
  auto f = m.issue(2, true);
  CHECK(m.fd_in_flight());
  m.on_reply(ReplyId::of(q), false);
  CHECK(m.fd_in_flight());
  m.abandon(f);
  CHECK(m.fd_in_flight());  // QEMU may still be holding the fd
  m.on_reply(ReplyId::of(f), false);
  CHECK_FALSE(m.fd_in_flight());
}

TEST_CASE("too many abandoned commands mean QEMU stopped answering", "[qmp][mux]") {
  qbtest::FdLeakCheck leaks;
  M m(IdMode::positional, 4);
  for (int i = 0; i < 4; ++i) m.abandon(m.issue(i, i == 0));
  CHECK_FALSE(m.unresponsive());
  m.abandon(m.issue(4, false));
  CHECK(m.unresponsive());
  // Late replies still drain them in order.
  m.on_reply(ReplyId::absent(), false);
  CHECK_FALSE(m.unresponsive());
  CHECK_FALSE(m.fd_in_flight());
}

TEST_CASE("drain hands back every pending slot in order", "[qmp][mux]") {
  qbtest::FdLeakCheck leaks;
  M m;
  m.issue(1, true);
  auto b = m.issue(2, false);
  m.issue(3, false);
  m.abandon(b);
  std::vector<int> seen;
  m.drain([&](M::Id, int s) { seen.push_back(s); });
  CHECK(seen == std::vector<int>{1, 3});
  CHECK(m.pending() == 0);
  CHECK(m.abandoned() == 0);
  CHECK_FALSE(m.fd_in_flight());
  CHECK(m.next_id() == 4);  // ids are never reused
}

// --- decoder + parser + mux on byte strings -----------------------------------------------

namespace {

struct Pipeline {
  LineDecoder decoder{1 << 20};
  Limits limits;
  Mux<std::string> mux{IdMode::wire};
  std::vector<std::string> completed;  // "slot=value" or "slot!class"
  std::vector<std::string> events;

  void feed(std::string_view bytes) {
    decoder.feed(bytes);
    for (;;) {
      auto line = decoder.next_line();
      REQUIRE(line.has_value());
      if (!*line) return;
      auto msg = parse_message(**line, limits);
      REQUIRE(msg.has_value());
      if (auto* r = std::get_if<Return>(&*msg)) {
        auto d = mux.on_reply(r->id, false);
        if (d.slot) completed.push_back(*d.slot + "=" + boost::json::serialize(r->value));
      } else if (auto* e = std::get_if<ErrorReply>(&*msg)) {
        auto d = mux.on_reply(e->id, true);
        if (d.slot) completed.push_back(*d.slot + "!" + e->error_class);
      } else if (auto* ev = std::get_if<Event>(&*msg)) {
        events.push_back(ev->name);
      }
    }
  }
};

}  // namespace

TEST_CASE("bytes: half a line completes nothing until the rest comes", "[qmp][mux]") {
  qbtest::FdLeakCheck leaks;
  Pipeline p;
  p.mux.issue("a", false);
  p.feed(R"({"return": {"status": "runn)");
  CHECK(p.completed.empty());
  p.feed("ing\"}, \"id\": 1}\r\n");
  CHECK(p.completed == std::vector<std::string>{R"(a={"status":"running"})"});
}

TEST_CASE("bytes: an event between two replies", "[qmp][mux]") {
  qbtest::FdLeakCheck leaks;
  Pipeline p;
  p.mux.issue("a", false);
  p.mux.issue("b", false);
  p.feed(
      "{\"return\": 1, \"id\": 1}\r\n"
      "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 1}, \"event\": \"STOP\"}\r\n"
      "{\"return\": 2, \"id\": 2}\r\n");
  CHECK(p.completed == std::vector<std::string>{"a=1", "b=2"});
  CHECK(p.events == std::vector<std::string>{"STOP"});
}

TEST_CASE("bytes: a reply for an abandoned id and one for an unknown id", "[qmp][mux]") {
  qbtest::FdLeakCheck leaks;
  Pipeline p;
  auto a = p.mux.issue("a", false);
  p.mux.issue("b", false);
  p.mux.abandon(a);
  p.feed(
      "{\"return\": \"late\", \"id\": 1}\n{\"return\": \"who\", \"id\": 77}\n"
      "{\"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}, \"id\": 2}\n");
  CHECK(p.completed == std::vector<std::string>{"b!GenericError"});
  CHECK(p.mux.counters().dropped_abandoned == 1);
  CHECK(p.mux.counters().dropped_unmatched == 1);
}

TEST_CASE("bytes: positional replies with an event between them", "[qmp][mux]") {
  qbtest::FdLeakCheck leaks;
  Pipeline p;
  p.mux = Mux<std::string>(IdMode::positional);
  p.mux.issue("a", false);
  p.mux.issue("b", false);
  p.feed(
      "{\"return\": 1}\r\n"
      "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 1}, \"event\": \"STOP\"}\r\n"
      "{\"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}}\r\n"
      "{\"return\": 3, \"id\": 1}\r\n");
  CHECK(p.completed == std::vector<std::string>{"a=1", "b!GenericError"});
  CHECK(p.events == std::vector<std::string>{"STOP"});
  CHECK(p.mux.counters().dropped_unmatched == 1);
}

TEST_CASE("bytes: an id-less error fails the oldest command", "[qmp][mux]") {
  qbtest::FdLeakCheck leaks;
  Pipeline p;
  p.mux.issue("a", false);
  p.mux.issue("b", false);
  p.feed(
      "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error\"}}\r\n"
      "{\"return\": {}, \"id\": 2}\r\n");
  CHECK(p.completed == std::vector<std::string>{"a!GenericError", "b={}"});
}
