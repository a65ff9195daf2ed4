// The one error map (broker/api/http_errors.cpp), proven over every enumerator of every module's
// errc: each has a status and a stable, unique name, and the walk itself cannot go stale because
// each module's kErrcCount is checked against its enum at compile time.
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "broker/api/errc.hpp"
#include "broker/api/http_errors.hpp"
#include "broker/core/errc.hpp"
#include "broker/lifecycle/errc.hpp"
#include "fdpass/errc.hpp"
#include "qmp/error.hpp"
#include "support/support.hpp"

namespace api = broker::api;
using status = boost::beast::http::status;

namespace {

// Whether V is a named enumerator of its enum. GCC and Clang spell the template argument in
// __PRETTY_FUNCTION__ as "V = ns::errc::name" for an enumerator and "V = (ns::errc)N" otherwise.
template <auto V>
constexpr bool is_enumerator() {
  const std::string_view f = __PRETTY_FUNCTION__;
  const auto at = f.find("V = ");
  return at != std::string_view::npos && f[at + 4] != '(';
}

// Every value 0 .. Count-1 is an enumerator and Count is not: the enum is contiguous and Count
// names its end, so a code added after the one kErrcCount names fails this.
template <class E, int Count>
constexpr bool count_is_exact() {
  return []<int... I>(std::integer_sequence<int, I...>) {
    return (is_enumerator<static_cast<E>(I)>() && ...) && !is_enumerator<static_cast<E>(Count)>();
  }(std::make_integer_sequence<int, Count>{});
}

enum class Probe { a, b };
static_assert(is_enumerator<Probe::b>() && !is_enumerator<static_cast<Probe>(2)>(),
              "the enumerator test must tell a named value from an unnamed one");
static_assert(count_is_exact<Probe, 2>() && !count_is_exact<Probe, 1>() &&
              !count_is_exact<Probe, 3>());

static_assert(count_is_exact<broker::errc, broker::kErrcCount>());
static_assert(count_is_exact<broker::lifecycle::errc, broker::lifecycle::kErrcCount>());
static_assert(count_is_exact<fdpass::errc, fdpass::kErrcCount>());
static_assert(count_is_exact<qmp::errc, qmp::kErrcCount>());
static_assert(count_is_exact<api::errc, api::kErrcCount>());

struct Module {
  const std::error_category& category;
  int count;
};

std::vector<Module> modules() {
  return {{broker::category(), broker::kErrcCount},
          {broker::lifecycle::category(), broker::lifecycle::kErrcCount},
          {fdpass::category(), fdpass::kErrcCount},
          {qmp::category(), qmp::kErrcCount},
          {api::category(), api::kErrcCount}};
}

// Two enumerators of one module that share an API code on purpose.
struct Alias {
  std::error_code a, b;
};

std::vector<Alias> aliases() {
  // Whether QEMU's connection dropped or the client was closed under a waiting command, the
  // user's answer is the same: the QEMU is gone.
  return {{qmp::errc::closed, qmp::errc::disconnected}};
}

bool is_alias(const std::error_code& a, const std::error_code& b) {
  for (const auto& alias : aliases()) {
    if ((alias.a == a && alias.b == b) || (alias.a == b && alias.b == a)) return true;
  }
  return false;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

TEST_CASE("every code of every module maps to a status and a stable name", "[api][errors]") {
  const std::regex stable_name("[a-z][a-z0-9_]*");
  for (const auto& m : modules()) {
    for (int i = 0; i < m.count; ++i) {
      const std::error_code ec(i, m.category);
      const auto c = api::classify(ec);
      INFO(m.category.name() << " " << i << " " << ec.message() << " -> " << c.code);
      CHECK(c.code != "unmapped");
      CHECK(std::regex_match(c.code, stable_name));
      if (i == 0) {
        CHECK(c.status == status::ok);
        CHECK(c.code == "ok");
        continue;
      }
      CHECK(static_cast<int>(c.status) >= 400);
      CHECK(static_cast<int>(c.status) <= 599);
    }
  }
}

TEST_CASE("a value past a module's last code is unmapped", "[api][errors]") {
  // The check above would catch a code the map forgot: this is what it looks like.
  for (const auto& m : modules()) {
    INFO(m.category.name());
    const auto c = api::classify(std::error_code(m.count, m.category));
    CHECK(c.code == "unmapped");
    CHECK(c.status == status::internal_server_error);
  }
}

TEST_CASE("names are unique within a module, in the API and in the category", "[api][errors]") {
  for (const auto& m : modules()) {
    std::map<std::string, std::error_code> by_code, by_message;
    for (int i = 0; i < m.count; ++i) {
      const std::error_code ec(i, m.category);
      const auto code = api::classify(ec).code;
      INFO(m.category.name() << " " << i << " " << code << ": " << ec.message());
      CHECK(ec.message().rfind("unknown", 0) == std::string::npos);
      auto [seen, fresh] = by_code.emplace(code, ec);
      if (!fresh) CHECK(is_alias(seen->second, ec));
      CHECK(by_message.emplace(ec.message(), ec).second);
    }
  }
  // Each listed alias still holds: the list cannot outlive the map.
  for (const auto& alias : aliases()) {
    CHECK(alias.a.category() == alias.b.category());
    CHECK(api::classify(alias.a).code == api::classify(alias.b).code);
  }
}

TEST_CASE("every spawn step code is a 500 named by its enumerator", "[api][errors]") {
  using E = broker::lifecycle::errc;
  int steps = 0;
  for (int i = static_cast<int>(E::step_clone); i <= static_cast<int>(E::step_exec); ++i) {
    const auto c = api::classify(static_cast<E>(i));
    INFO(c.code);
    CHECK(c.status == status::internal_server_error);
    CHECK(c.code.rfind("step_", 0) == 0);
    ++steps;
  }
  CHECK(steps > 0);
  CHECK(api::classify(E::child_died).status == status::internal_server_error);
}

TEST_CASE("docs/lifecycle.md names every spawn step code, in the order of the enum",
          "[api][errors][docs]") {
  const std::string doc = read_file(QB_SOURCE_DIR "/docs/lifecycle.md");
  const auto begin = doc.find("## 4. Spawn in the jail");
  const auto end = doc.find("\n## 5.", begin);
  REQUIRE(begin != std::string::npos);
  REQUIRE(end != std::string::npos);
  const std::string section = doc.substr(begin, end - begin);

  using E = broker::lifecycle::errc;
  std::set<std::string> codes;
  std::size_t previous = 0;
  for (int i = static_cast<int>(E::step_clone); i <= static_cast<int>(E::step_exec); ++i) {
    const std::string code = api::classify(static_cast<E>(i)).code;
    codes.insert(code);
    const auto at = section.find("`" + code + "`");
    INFO(code);
    REQUIRE(at != std::string::npos);
    CHECK(at > previous);
    previous = at;
  }
  // And the section names no step code that does not exist.
  const std::regex named("`(step_[a-z_]+)`");
  for (std::sregex_iterator it(section.begin(), section.end(), named), last; it != last; ++it) {
    INFO((*it)[1].str());
    CHECK(codes.contains((*it)[1].str()));
  }
}

TEST_CASE("docs/api.md's status table has a row for every status the map gives",
          "[api][errors][docs]") {
  const std::string doc = read_file(QB_SOURCE_DIR "/docs/api.md");
  std::set<int> statuses;
  for (const auto& m : modules()) {
    for (int i = 1; i < m.count; ++i) {
      statuses.insert(static_cast<int>(api::classify(std::error_code(i, m.category)).status));
    }
  }
  for (int e = 1; e < 134; ++e) {
    statuses.insert(
        static_cast<int>(api::classify(std::error_code(e, std::system_category())).status));
  }
  for (int st : statuses) {
    INFO(st);
    CHECK(doc.find("\n| " + std::to_string(st) + " | ") != std::string::npos);
  }
}
