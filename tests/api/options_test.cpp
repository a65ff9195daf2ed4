// qbrokerd's flags and config file, parsed without starting anything.
#include "broker/daemon/options.hpp"

#include "broker/lifecycle/uid_pool.hpp"
#include "support/broker_printers.hpp"
#include "support/support.hpp"

using broker::daemon::DaemonOptions;
using broker::daemon::parse_options;
using namespace std::chrono_literals;

namespace {
broker::Result<DaemonOptions> parse(std::initializer_list<std::string_view> args) {
  std::vector<std::string_view> v(args);
  return parse_options(v);
}
}  // namespace

TEST_CASE("qbrokerd's defaults are the design's", "[api][daemon][options]") {
  auto o = parse({});
  REQUIRE(o);
  CHECK(o->socket == "/run/qbroker/qbroker.sock");
  CHECK(o->state_dir == "/var/lib/qbroker");
  CHECK(o->run_dir == "/run/qbroker");
  CHECK(o->qemu == "/usr/bin/qemu-system-x86_64");
  CHECK(o->uid_range.empty());
  CHECK(o->image_roots.empty());
  CHECK_FALSE(o->xen);
  CHECK(o->limits.max_body_bytes == 1024 * 1024);
  auto range = broker::lifecycle::UidRange::parse(broker::daemon::kDefaultUidRange);
  REQUIRE(range);
  CHECK(range->validate());  // no passwd entry in the default range
}

TEST_CASE("flags set every option and name the one that is wrong", "[api][daemon][options]") {
  auto o = parse({"--socket",
                  "/tmp/s.sock",
                  "--state-dir=/tmp/st",
                  "--run-dir",
                  "/tmp/run",
                  "--uid-range",
                  "3103000:64",
                  "--image-root",
                  "/srv/a",
                  "--image-root",
                  "/srv/b",
                  "--qemu",
                  "/opt/qemu",
                  "--admin-group",
                  "qbroker",
                  "--qmp-timeout-ms",
                  "250",
                  "--max-connections",
                  "64",
                  "--request-timeout-ms=900",
                  "--log-level",
                  "debug"});
  REQUIRE(o);
  CHECK(o->socket == "/tmp/s.sock");
  CHECK(o->state_dir == "/tmp/st");
  CHECK(o->uid_range == "3103000:64");
  CHECK(o->image_roots == std::vector<std::string>{"/srv/a", "/srv/b"});
  CHECK(o->admin_group == "qbroker");
  CHECK(o->qmp_timeout == 250ms);
  CHECK(o->limits.max_connections == 64);
  CHECK(o->limits.request_timeout == 900ms);
  CHECK(o->log_level == "debug");
  CHECK(parse({"--xen"})->xen);
  CHECK(parse({"--help"})->help);

  auto unknown = parse({"--colour", "blue"});
  REQUIRE_FALSE(unknown);
  CHECK(unknown.error().field == "--colour");
  auto relative = parse({"--state-dir", "var/lib"});
  REQUIRE_FALSE(relative);
  CHECK(relative.error().field == "--state-dir");
  auto number = parse({"--max-connections", "lots"});
  REQUIRE_FALSE(number);
  CHECK(number.error().field == "--max-connections");
  auto missing = parse({"--socket"});
  REQUIRE_FALSE(missing);
  CHECK(missing.error().field == "--socket");
  auto both = parse({"--uid-range", "3103000:8", "--uid-range-user", "qemu"});
  REQUIRE_FALSE(both);
  CHECK(both.error().message.find("exclude") != std::string::npos);
  CHECK_FALSE(parse({"--uid-range", "3103000"}));
  CHECK_FALSE(parse({"stray"}));
}

TEST_CASE("a JSON config file has the flags' keys and flags override it",
          "[api][daemon][options]") {
  qbtest::TempDir dir;
  qbtest::write_file(dir / "qbrokerd.json",
                     R"({"state-dir": "/srv/state", "image-root": ["/srv/iso", "/srv/img"],
                                               "uid-range": "3103000:16", "qmp-timeout-ms": 1500,
                                               "max-connections-per-uid": 8, "xen": false})");
  auto o = parse({"--config", dir / "qbrokerd.json", "--state-dir", "/srv/other"});
  REQUIRE(o);
  CHECK(o->state_dir == "/srv/other");
  CHECK(o->image_roots == std::vector<std::string>{"/srv/iso", "/srv/img"});
  CHECK(o->uid_range == "3103000:16");
  CHECK(o->qmp_timeout == 1500ms);
  CHECK(o->limits.max_connections_per_uid == 8);
  // Flags replace the file's image roots rather than adding to them.
  auto roots = parse({"--image-root", "/srv/cli", "--config", dir / "qbrokerd.json"});
  REQUIRE(roots);
  CHECK(roots->image_roots == std::vector<std::string>{"/srv/cli"});

  qbtest::write_file(dir / "bad.json", R"({"state-dir": "/srv/state", "colour": "blue"})");
  auto bad = parse({"--config", dir / "bad.json"});
  REQUIRE_FALSE(bad);
  CHECK(bad.error().field == "colour");
  qbtest::write_file(dir / "type.json", R"({"max-connections": "many"})");
  auto type = parse({"--config", dir / "type.json"});
  REQUIRE_FALSE(type);
  CHECK(type.error().field == "max-connections");
  qbtest::write_file(dir / "broken.json", R"({"state-dir": )");
  CHECK_FALSE(parse({"--config", dir / "broken.json"}));
  CHECK_FALSE(parse({"--config", dir / "missing.json"}));
}

TEST_CASE("usage lists every option", "[api][daemon][options]") {
  auto text = broker::daemon::usage();
  for (const char* flag :
       {"--config", "--socket", "--state-dir", "--run-dir", "--uid-range", "--uid-range-user",
        "--image-root", "--qemu", "--admin-group", "--xen"}) {
    INFO(flag);
    CHECK(text.find(flag) != std::string::npos);
  }
}
