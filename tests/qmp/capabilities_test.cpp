// qmp/capabilities: flags from schemas of several shapes, and the per-binary cache.
#include "qmp/capabilities.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/json/parse.hpp>

#include "fake_qmp_server.hpp"
#include "support/support.hpp"
#include "test_util.hpp"

using namespace qmp;
using namespace std::chrono_literals;
namespace asio = boost::asio;
namespace json = boost::json;

namespace {

// The shape of QEMU 7.2's introspection (masked type names, enums with "values").
constexpr std::string_view kSchema72 = R"([
  {"name": "display-update", "meta-type": "command", "arg-type": "10", "ret-type": "0"},
  {"name": "10", "meta-type": "object", "tag": "type", "members": [{"name": "type", "type": "11"}],
   "variants": [{"case": "vnc", "type": "12"}]},
  {"name": "11", "meta-type": "enum", "values": ["vnc"]},
  {"name": "12", "meta-type": "object",
   "members": [{"name": "addresses", "default": null, "type": "[13]"}]},
  {"name": "[13]", "meta-type": "array", "element-type": "13"},
  {"name": "13", "meta-type": "object", "tag": "type", "members": [{"name": "type", "type": "14"}],
   "variants": [{"case": "inet", "type": "15"}, {"case": "fd", "type": "16"}]},
  {"name": "14", "meta-type": "enum", "values": ["inet", "unix", "vsock", "fd"]},
  {"name": "15", "meta-type": "object", "members": [{"name": "host", "type": "str"}]},
  {"name": "16", "meta-type": "object", "members": [{"name": "str", "type": "str"}]},
  {"name": "blockdev-change-medium", "meta-type": "command", "arg-type": "20", "ret-type": "0"},
  {"name": "20", "meta-type": "object", "members": [
    {"name": "device", "default": null, "type": "str", "features": ["deprecated"]},
    {"name": "id", "default": null, "type": "str"}, {"name": "filename", "type": "str"},
    {"name": "format", "default": null, "type": "str"},
    {"name": "force", "default": null, "type": "bool"},
    {"name": "read-only-mode", "default": null, "type": "21"}]},
  {"name": "21", "meta-type": "enum", "values": ["retain", "read-only", "read-write"]},
  {"name": "query-status", "meta-type": "command", "arg-type": "0", "ret-type": "0"},
  {"name": "STOP", "meta-type": "event", "arg-type": "0"},
  {"name": "0", "meta-type": "object", "members": []},
  {"name": "str", "meta-type": "builtin", "json-type": "string"}
])";

// Newer QEMUs list enum members as objects; older ones lack display-update.
constexpr std::string_view kSchemaMembersEnum = R"([
  {"name": "display-update", "meta-type": "command", "arg-type": "10", "ret-type": "0"},
  {"name": "10", "meta-type": "object", "tag": "type", "members": [{"name": "type", "type": "11"}],
   "variants": [{"case": "vnc", "type": "12"}]},
  {"name": "11", "meta-type": "enum", "members": [{"name": "vnc"}]},
  {"name": "12", "meta-type": "object", "members": [{"name": "addresses", "type": "[13]"}]},
  {"name": "[13]", "meta-type": "array", "element-type": "13"},
  {"name": "13", "meta-type": "object", "tag": "type", "members": [{"name": "type", "type": "14"}],
   "variants": [{"case": "fd", "type": "16"}]},
  {"name": "14", "meta-type": "enum", "members": [{"name": "inet"}, {"name": "fd"}]},
  {"name": "16", "meta-type": "object", "members": [{"name": "str", "type": "str"}]},
  {"name": "blockdev-change-medium", "meta-type": "command", "arg-type": "20", "ret-type": "0"},
  {"name": "20", "meta-type": "object", "members": [{"name": "id", "type": "str"},
    {"name": "filename", "type": "str"}]}
])";

constexpr std::string_view kSchemaOld = R"([
  {"name": "blockdev-change-medium", "meta-type": "command", "arg-type": "20", "ret-type": "0"},
  {"name": "20", "meta-type": "object", "members": [{"name": "device", "type": "str"},
    {"name": "filename", "type": "str"}]},
  {"name": "13", "meta-type": "object", "tag": "type", "members": [{"name": "type", "type": "14"}],
   "variants": []},
  {"name": "14", "meta-type": "enum", "values": ["inet", "unix"]}
])";

Version v(int major, int minor) {
  Version ver;
  ver.major = major;
  ver.minor = minor;
  return ver;
}

}  // namespace

TEST_CASE("flags from a QEMU 7.2 schema", "[qmp][capabilities]") {
  qbtest::FdLeakCheck leaks;
  auto c = derive_capabilities(v(7, 2), json::parse(kSchema72), nullptr);
  REQUIRE(c.has_value());
  CHECK(c->display_update_vnc_fd);
  CHECK_FALSE(c->run_with);
  CHECK_FALSE(c->run_with_user);
  CHECK_FALSE(c->fdset_explicit_remove);
  CHECK_FALSE(c->file_migration_fdset);
  CHECK(c->change_medium.id);
  CHECK(c->change_medium.device);
  CHECK(c->change_medium.read_only_mode);
  CHECK(c->change_medium.force);
  CHECK(c->has_command("query-status"));
  CHECK(c->has_command("display-update"));
  CHECK_FALSE(c->has_command("STOP"));
  CHECK(c->has_event("STOP"));
}

TEST_CASE("flags from newer and older schema shapes", "[qmp][capabilities]") {
  qbtest::FdLeakCheck leaks;
  auto run_with = json::parse(
      R"([{"option": "run-with", "parameters": [{"name": "chroot", "type": "string"},
                                                {"name": "user", "type": "string"}]}])");
  auto c = derive_capabilities(v(9, 1), json::parse(kSchemaMembersEnum), &run_with);
  REQUIRE(c.has_value());
  CHECK(c->display_update_vnc_fd);
  CHECK(c->run_with);
  CHECK(c->run_with_user);
  CHECK(c->fdset_explicit_remove);
  CHECK(c->file_migration_fdset);
  CHECK(c->change_medium.id);
  CHECK_FALSE(c->change_medium.device);
  CHECK_FALSE(c->change_medium.read_only_mode);

  auto chroot_only = json::parse(
      R"([{"option": "run-with", "parameters": [{"name": "chroot", "type": "string"}]}])");
  c = derive_capabilities(v(8, 2), json::parse(kSchemaMembersEnum), &chroot_only);
  REQUIRE(c.has_value());
  CHECK(c->run_with);
  CHECK_FALSE(c->run_with_user);
  CHECK_FALSE(c->fdset_explicit_remove);
  CHECK(c->file_migration_fdset);

  c = derive_capabilities(v(6, 2), json::parse(kSchemaOld), nullptr);
  REQUIRE(c.has_value());
  CHECK_FALSE(c->display_update_vnc_fd);
  CHECK_FALSE(c->change_medium.id);
  CHECK(c->change_medium.device);
}

TEST_CASE("a malformed schema is a bad reply", "[qmp][capabilities]") {
  qbtest::FdLeakCheck leaks;
  CHECK(derive_capabilities(v(7, 2), json::parse("{}"), nullptr).has_error());
  CHECK(derive_capabilities(v(7, 2), json::parse(R"([{"name": "x"}])"), nullptr).has_error());
  CHECK(derive_capabilities(v(7, 2), json::parse(R"([5])"), nullptr).has_error());
}

TEST_CASE("binary identity follows the file", "[qmp][capabilities]") {
  qbtest::FdLeakCheck leaks;
  qbtest::TempDir dir;
  qbtest::write_file(dir / "qemu", "one");
  auto a = BinaryId::of(dir / "qemu");
  REQUIRE(a.has_value());
  CHECK(BinaryId::of(dir / "qemu").value() == *a);
  qbtest::write_file(dir / "qemu", "three");
  auto b = BinaryId::of(dir / "qemu");
  REQUIRE(b.has_value());
  CHECK_FALSE(*b == *a);
  CHECK(BinaryId::of(dir / "missing").has_error());
}

namespace {

qbfake::Script probe_script() {
  qbfake::Script s;
  s.handshake();
  s.expect("query-version")
      .reply(json::parse(R"({"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""})"));
  s.expect("query-qmp-schema").reply(json::parse(kSchema72));
  s.expect("query-command-line-options")
      .reply_error("GenericError", "invalid option name: run-with");
  return s;
}

}  // namespace

TEST_CASE("capabilities are probed once per binary", "[qmp][capabilities]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  auto s = probe_script();
  s.wait_for_close();
  qbfake::FakeQmpPeer peer(std::move(s));
  auto c = qbtest::run(io, Client::connect(io.get_executor(), peer.client_end(), after(5s)));
  REQUIRE(c.has_value());
  CapabilityCache cache;
  BinaryId bin{1, 2, 3, 4};
  CHECK(cache.find(bin) == nullptr);
  // Two concurrent gets share one probe.
  auto a = qbtest::spawn(io, cache.get(bin, **c, after(5s)));
  auto b = qbtest::spawn(io, cache.get(bin, **c, after(5s)));
  qbtest::run_until(io, [&] { return a->has_value() && b->has_value(); });
  REQUIRE((*a)->has_value());
  REQUIRE((*b)->has_value());
  CHECK(***a == ***b);
  CHECK((***a)->display_update_vnc_fd);
  CHECK_FALSE((***a)->run_with);
  auto again = qbtest::run(io, cache.get(bin, **c, after(5s)));
  REQUIRE(again.has_value());
  CHECK(*again == ***a);
  CHECK(cache.probes() == 1);
  CHECK(cache.find(bin) == ***a);
  c->reset();
  auto report = peer.join();
  CHECK(report.errors.empty());
  CHECK(report.commands.size() == 4);  // qmp_capabilities + three queries, once
}

TEST_CASE("a failed probe is not cached", "[qmp][capabilities]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  qbfake::Script s;
  s.handshake().expect("query-version").reply_error("GenericError", "busy");
  s.expect("query-version")
      .reply(json::parse(R"({"qemu": {"micro": 0, "minor": 2, "major": 8}, "package": ""})"));
  s.expect("query-qmp-schema").reply(json::parse(kSchema72));
  s.expect("query-command-line-options")
      .reply(json::parse(
          R"([{"option": "run-with", "parameters": [{"name": "chroot", "type": "string"}]}])"));
  s.wait_for_close();
  qbfake::FakeQmpPeer peer(std::move(s));
  auto c = qbtest::run(io, Client::connect(io.get_executor(), peer.client_end(), after(5s)));
  REQUIRE(c.has_value());
  CapabilityCache cache;
  BinaryId bin{1, 2, 3, 4};
  auto first = qbtest::run(io, cache.get(bin, **c, after(5s)));
  REQUIRE(first.has_error());
  CHECK(first.error().qmp_desc == "busy");
  CHECK(cache.find(bin) == nullptr);
  auto second = qbtest::run(io, cache.get(bin, **c, after(5s)));
  REQUIRE(second.has_value());
  CHECK((*second)->version.major == 8);
  CHECK((*second)->run_with);
  CHECK((*second)->file_migration_fdset);
  CHECK(cache.probes() == 2);
}
