// qmp/wire: framing, parsing and encoding, with byte strings only.
#include "qmp/wire.hpp"

#include <boost/json/parse.hpp>
#include <optional>
#include <string>

#include "support/support.hpp"

using namespace qmp;
namespace json = boost::json;

namespace {

constexpr std::string_view kGreeting =
    R"({"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"},)"
    R"( "capabilities": ["oob"]}})";

Message parse_ok(std::string_view line, const Limits& limits = {}) {
  auto m = parse_message(line, limits);
  REQUIRE(m.has_value());
  return std::move(*m);
}

errc parse_err(std::string_view line, const Limits& limits = {}) {
  auto m = parse_message(line, limits);
  REQUIRE(m.has_error());
  return static_cast<errc>(m.error().code.value());
}

std::vector<std::string> lines_of(LineDecoder& d) {
  std::vector<std::string> out;
  for (;;) {
    auto l = d.next_line();
    REQUIRE(l.has_value());
    if (!*l) return out;
    out.emplace_back(**l);
  }
}

}  // namespace

TEST_CASE("decoder frames lines split across reads", "[qmp][wire]") {
  qbtest::FdLeakCheck leaks;
  LineDecoder d(1024);
  d.feed(R"({"return": {}, "id")");
  CHECK(lines_of(d).empty());
  d.feed(": 1}\r\n{\"return\"");
  CHECK(lines_of(d) == std::vector<std::string>{R"({"return": {}, "id": 1})"});
  d.feed(": 2}\n\n  \r\n{\"a\":1}\n");
  CHECK(lines_of(d) == std::vector<std::string>{R"({"return": 2})", R"({"a":1})"});
  CHECK(d.buffered() == 0);
}

TEST_CASE("decoder refuses a line over the limit, complete or not, and stays failed",
          "[qmp][wire]") {
  qbtest::FdLeakCheck leaks;
  SECTION("partial line") {
    LineDecoder d(100, 16);
    d.feed(std::string(101, 'x'));
    auto l = d.next_line();
    REQUIRE(l.has_error());
    CHECK(l.error().is(errc::line_too_long));
    CHECK(d.next_line().has_error());
    CHECK(d.capacity() == 0);  // memory given back at once
  }
  SECTION("complete line") {
    LineDecoder d(100, 1024);
    d.feed(std::string(101, 'x') + "\n");
    CHECK(d.next_line().has_error());
  }
  SECTION("a partial line at the limit may still end in \\r\\n") {
    LineDecoder d(100, 16);
    d.feed(std::string(100, 'x') + "\r");
    auto l = d.next_line();
    REQUIRE(l.has_value());
    CHECK_FALSE(l->has_value());
    d.feed("\n");
    l = d.next_line();
    REQUIRE(l.has_value());
    REQUIRE(l->has_value());
    CHECK((*l)->size() == 100);
  }
  SECTION("exactly the limit is fine") {
    LineDecoder d(100, 16);
    d.feed(std::string(100, 'x') + "\r\n");
    auto l = d.next_line();
    REQUIRE(l.has_value());
    REQUIRE(l->has_value());
    CHECK((*l)->size() == 100);
  }
}

TEST_CASE("decoder memory stays within max_line plus one read", "[qmp][wire]") {
  qbtest::FdLeakCheck leaks;
  const std::size_t max_line = 64 * 1024;
  const std::size_t read = 4096;
  LineDecoder d(max_line, read);
  std::size_t fed = 0;
  bool failed = false;
  while (fed < 10 * max_line && !failed) {
    auto buf = d.prepare(read);
    std::fill(buf.begin(), buf.end(), 'y');
    d.commit(read);
    fed += read;
    failed = d.next_line().has_error();
  }
  CHECK(failed);
  CHECK(fed <= max_line + read);
  CHECK(d.peak_capacity() <= max_line + 1 + read);
}

TEST_CASE("decoder gives back a large buffer once the line is consumed", "[qmp][wire]") {
  qbtest::FdLeakCheck leaks;
  LineDecoder d(8u << 20, 4096);
  d.feed(std::string(1u << 20, 'z') + "\n");
  CHECK(lines_of(d).size() == 1);
  CHECK(d.peak_capacity() >= (1u << 20));
  (void)d.prepare(4096);
  CHECK(d.capacity() <= 64 * 1024);
  d.release_if_empty();
  CHECK(d.capacity() == 0);
}

TEST_CASE("greeting, return, error and event parse into typed values", "[qmp][wire]") {
  qbtest::FdLeakCheck leaks;
  auto g = std::get<Greeting>(parse_ok(kGreeting));
  CHECK(g.version.major == 7);
  CHECK(g.version.minor == 2);
  CHECK(g.version.micro == 22);
  CHECK(g.version.package == "Debian");
  CHECK(g.version.to_string() == "7.2.22");
  CHECK(g.capabilities == std::vector<std::string>{"oob"});

  auto r = std::get<Return>(parse_ok(R"({"return": {"status": "running"}, "id": 7})"));
  CHECK(r.id == ReplyId::of(7));
  CHECK(r.value.at("status").as_string() == "running");

  auto e = std::get<ErrorReply>(
      parse_ok(R"({"id": 3, "error": {"class": "GenericError", "desc": "nope"}})"));
  CHECK(e.id == ReplyId::of(3));
  CHECK(e.error_class == "GenericError");
  CHECK(e.desc == "nope");

  auto ev = std::get<Event>(
      parse_ok(R"({"timestamp": {"seconds": 10, "microseconds": 20}, "event": "DEVICE_DELETED", )"
               R"("data": {"device": "d0", "path": "/machine/peripheral/d0"}})"));
  CHECK(ev.name == "DEVICE_DELETED");
  CHECK(ev.data.at("device").as_string() == "d0");
  CHECK(ev.timestamp.seconds == 10);
  CHECK(ev.timestamp.microseconds == 20);
  CHECK(ev.memory > 0);

  auto resume = std::get<Event>(
      parse_ok(R"({"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"})"));
  CHECK(resume.data.empty());
}

TEST_CASE("reply ids: ours, absent, foreign", "[qmp][wire]") {
  qbtest::FdLeakCheck leaks;
  CHECK(std::get<Return>(parse_ok(R"({"return": {}})")).id == ReplyId::absent());
  CHECK(std::get<Return>(parse_ok(R"({"return": {}, "id": 18446744073709551615})")).id ==
        ReplyId::of(18446744073709551615ull));
  for (auto line : {R"({"return": {}, "id": "1"})", R"({"return": {}, "id": -1})",
                    R"({"return": {}, "id": 1.5})", R"({"return": {}, "id": null})",
                    R"({"return": {}, "id": [1]})"}) {
    CHECK(std::get<Return>(parse_ok(line)).id.kind == ReplyId::Kind::foreign);
  }
}

TEST_CASE("invalid JSON and invalid UTF-8 are connection errors", "[qmp][wire]") {
  qbtest::FdLeakCheck leaks;
  CHECK(parse_err(R"({"return": )") == errc::invalid_json);
  CHECK(parse_err(R"({"return": {}} trailing)") == errc::invalid_json);
  CHECK(parse_err("{\"return\": \"\xff\"}") == errc::invalid_json);
  CHECK(parse_err("{\"return\": \"\xc0\xaf\"}") == errc::invalid_json);      // overlong '/'
  CHECK(parse_err("{\"return\": \"\xed\xa0\x80\"}") == errc::invalid_json);  // surrogate
  CHECK(parse_err(R"({'return': {}})") == errc::invalid_json);
  CHECK(parse_err(R"({"return": {}, /* c */ "id": 1})") == errc::invalid_json);
  CHECK(parse_err(std::string("{\"return\": 1}\0", 14)) == errc::invalid_json);
}

TEST_CASE("nesting is bounded", "[qmp][wire]") {
  qbtest::FdLeakCheck leaks;
  Limits lim;
  lim.max_depth = 16;
  auto nest = [](std::size_t n) {
    return R"({"return": )" + std::string(n - 1, '[') + std::string(n - 1, ']') + "}";
  };
  CHECK(std::holds_alternative<Return>(parse_ok(nest(16), lim)));
  CHECK(parse_err(nest(17), lim) == errc::too_deep);
  CHECK(parse_err(nest(10000)) == errc::too_deep);
}

TEST_CASE("the parsed tree is bounded by max_message_memory", "[qmp][wire]") {
  qbtest::FdLeakCheck leaks;
  Limits lim;
  lim.max_message_memory = 64 * 1024;
  std::string line = R"({"return": [)";
  for (int i = 0; i < 100000; ++i) line += "0,";
  line += "0]}";
  CHECK(parse_err(line, lim) == errc::message_too_large);
  std::string big_string = R"({"return": ")" + std::string(100000, 'q') + "\"}";
  CHECK(parse_err(big_string, lim) == errc::message_too_large);
  CHECK(std::holds_alternative<Return>(parse_ok(R"({"return": [0, 1, 2]})", lim)));
}

TEST_CASE("the budget counts the tree, not only the parser's work stack", "[qmp][wire]") {
  qbtest::FdLeakCheck leaks;
  Limits lim;
  lim.max_message_memory = 64 * 1024;
  // 40 strings of 2000 characters: a few hundred bytes of stack, 80 KB of tree.
  auto strings = [](int n) {
    std::string line = R"({"return": [)";
    for (int i = 0; i < n; ++i) line += (i > 0 ? ",\"" : "\"") + std::string(2000, 's') + "\"";
    return line + "]}";
  };
  CHECK(parse_err(strings(40), lim) == errc::message_too_large);
  CHECK(std::holds_alternative<Return>(parse_ok(strings(20), lim)));
  // Many small objects, each closed before the next opens.
  std::string objects = R"({"return": [)";
  for (int i = 0; i < 2000; ++i) objects += R"({"k": 1},)";
  objects += "{}]}";
  CHECK(parse_err(objects, lim) == errc::message_too_large);
}

TEST_CASE("an event's memory is what its tree holds", "[qmp][wire]") {
  qbtest::FdLeakCheck leaks;
  auto small = std::get<Event>(
      parse_ok(R"({"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"})"));
  const std::string blob(100000, 'b');
  auto big = std::get<Event>(parse_ok(R"({"timestamp": {"seconds": 1, "microseconds": 2}, )"
                                      R"("event": "X", "data": {"blob": ")" +
                                      blob + "\"}}"));
  CHECK(small.memory < 1024);
  CHECK(big.memory >= blob.size());
  CHECK(big.memory < blob.size() + 4096);
}

TEST_CASE("one parser reads many lines, as a connection does", "[qmp][wire]") {
  qbtest::FdLeakCheck leaks;
  Limits lim;
  lim.max_message_memory = 1u << 20;
  MessageParser parser(lim);
  const std::string big = R"({"return": [)" + std::string(60000, '[') + "]}";  // too deep
  std::string wide = R"({"return": [)";
  for (int i = 0; i < 20000; ++i) wide += "0,";
  wide += "0]}";
  const std::string lines[] = {
      std::string(kGreeting),
      R"({"return": {"status": "running", "singlestep": false, "running": true}})",
      R"({"return": )",  // invalid: the parser must not carry anything into the next line
      R"({"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"})",
      big,
      wide,  // needs a large work stack, which is given back afterwards
      R"({"error": {"class": "GenericError", "desc": "x"}, "id": 4})",
      "{\"return\": \"\xff\"}",
      R"({"return": [1, {"a": [true, null, 1.5, "s"]}], "id": 9})",
  };
  for (const auto& line : lines) {
    INFO(line.substr(0, 80));
    auto reused = parser.parse(line);
    auto fresh = parse_message(line, lim);
    REQUIRE(reused.has_value() == fresh.has_value());
    if (!fresh) {
      CHECK(reused.error().code == fresh.error().code);
      continue;
    }
    REQUIRE(reused->index() == fresh->index());
    if (auto* r = std::get_if<Return>(&*reused)) {
      CHECK(r->value == std::get<Return>(*fresh).value);
      CHECK(r->id == std::get<Return>(*fresh).id);
    }
    CHECK(parser.retained() <= 64 * 1024);
  }
  // The work stack stays between lines (that is the point of keeping the parser).
  CHECK(parser.retained() > 0);
}

TEST_CASE("parsed values outlive the parser", "[qmp][wire]") {
  qbtest::FdLeakCheck leaks;
  std::optional<Message> kept;
  {
    MessageParser parser(Limits{});
    auto m = parser.parse(R"({"return": {"blockdev": [{"node-name": "qb-d0-fmt-long-name"}]}})");
    REQUIRE(m.has_value());
    kept = std::move(*m);
  }
  auto& r = std::get<Return>(*kept);
  CHECK(r.value.at("blockdev").at(0).at("node-name").as_string() == "qb-d0-fmt-long-name");
  // And they are ordinary values: they grow without a budget.
  r.value.as_object()["more"] = std::string(100000, 'm');
  CHECK(r.value.at("more").as_string().size() == 100000);
}

TEST_CASE("valid JSON that is not a QMP message is refused", "[qmp][wire]") {
  qbtest::FdLeakCheck leaks;
  for (
      auto line :
      {R"([1, 2])", R"("x")", R"({})", R"({"id": 1})",
       R"({"return": {}, "error": {"class": "a", "desc": "b"}})", R"({"error": "oops", "id": 1})",
       R"({"error": {"class": "X"}, "id": 1})",
       R"({"event": 5, "timestamp": {"seconds": 1, "microseconds": 1}})", R"({"event": "X"})",
       R"({"event": "X", "timestamp": {}})",
       R"({"event": "X", "data": [], "timestamp": {"seconds": 1, "microseconds": 1}})",
       R"({"QMP": {}})", R"({"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}})",
       R"({"QMP": {"version": {"qemu": {"major": -1, "minor": 0, "micro": 0}}, "capabilities": []}})",
       R"({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": [1]}})"}) {
    INFO(line);
    CHECK(parse_err(line) == errc::unexpected_message);
  }
}

TEST_CASE("commands are encoded with the id last", "[qmp][wire]") {
  qbtest::FdLeakCheck leaks;
  auto c = encode_command("query-status", {}, Limits{});
  REQUIRE(c.has_value());
  CHECK(c->name() == "query-status");
  CHECK(c->line() == "{\"execute\":\"query-status\"}\n");
  CHECK(c->line(42) == "{\"execute\":\"query-status\",\"id\":42}\n");

  auto d = encode_command("device_del", {{"id", "d\"0"}}, Limits{});
  REQUIRE(d.has_value());
  auto v = json::parse(d->line(1));
  CHECK(v.at("execute").as_string() == "device_del");
  CHECK(v.at("arguments").at("id").as_string() == "d\"0");
  CHECK(v.at("id").as_int64() == 1);
}

TEST_CASE("commands QEMU could not parse are refused before sending", "[qmp][wire]") {
  qbtest::FdLeakCheck leaks;
  auto bad = [](std::string_view name, const json::object& args, Limits lim = {}) {
    auto c = encode_command(name, args, lim);
    return c.has_error() && c.error().is(errc::invalid_command);
  };
  CHECK(bad("", {}));
  CHECK(bad("quit\",\"x", {}));
  CHECK(bad("a b", {}));
  CHECK(bad("x", {{"s", "\xff"}}));
  CHECK(bad("x", {{"\xc3", 1}}));
  CHECK(bad("x", {{"s", std::string("a\0b", 3)}}));
  CHECK(bad("x", {{"d", std::numeric_limits<double>::infinity()}}));
  CHECK(bad("x", {{"d", std::numeric_limits<double>::quiet_NaN()}}));
  Limits shallow;
  shallow.max_depth = 4;
  json::value deep = json::array{json::array{json::array{1}}};
  CHECK(bad("x", {{"a", deep}}, shallow));
  CHECK_FALSE(bad("x", {{"a", json::array{json::array{1}}}}, shallow));
  Limits short_line;
  short_line.max_line = 64;
  CHECK(bad("x", {{"s", std::string(100, 'a')}}, short_line));
  CHECK_FALSE(bad("__com.redhat_drive-mirror", {}));
}

TEST_CASE("UTF-8 validation", "[qmp][wire]") {
  qbtest::FdLeakCheck leaks;
  CHECK(is_valid_utf8(""));
  CHECK(is_valid_utf8("plain"));
  CHECK(is_valid_utf8("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"));
  CHECK_FALSE(is_valid_utf8("\x80"));
  CHECK_FALSE(is_valid_utf8("\xc3"));
  CHECK_FALSE(is_valid_utf8("\xe0\x80\x80"));          // overlong
  CHECK_FALSE(is_valid_utf8("\xf4\x90\x80\x80"));      // above U+10FFFF
  CHECK_FALSE(is_valid_utf8("\xed\xbf\xbf"));          // surrogate
  CHECK_FALSE(is_valid_utf8("\xf8\x88\x80\x80\x80"));  // 5-byte form
}
