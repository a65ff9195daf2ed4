// The start trace: steps in the order they were marked, each the time since the previous one.
#include <catch2/catch.hpp>
#include <regex>

#include "broker/lifecycle/launcher.hpp"

using broker::lifecycle::StartTrace;

TEST_CASE("a start trace keeps its steps in order and describes them with a total", "[lifecycle]") {
  StartTrace t;
  t.begin();
  t.mark("uid sweep+record");
  t.mark("clone+jail+exec");
  REQUIRE(t.steps().size() == 2);
  CHECK(t.steps()[0].name == "uid sweep+record");
  CHECK(t.steps()[1].name == "clone+jail+exec");
  CHECK(t.total() == t.steps()[0].took + t.steps()[1].took);
  CHECK(std::regex_match(t.describe(),
                         std::regex(R"(uid sweep\+record [0-9]+\.[0-9] ms, clone\+jail\+exec [0-9]+\.[0-9] ms, total [0-9]+\.[0-9] ms)")));
  CHECK(StartTrace().describe() == "total 0.0 ms");
}
