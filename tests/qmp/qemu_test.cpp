// qmp against a real qemu-system-x86_64 (-machine none, TCG unless /dev/kvm is usable).
#include <fcntl.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <boost/json/serialize.hpp>
#include <cstdlib>
#include <functional>
#include <map>

#include "fdpass/devices.hpp"
#include "qemu_process.hpp"
#include "qmp/capabilities.hpp"
#include "qmp/client.hpp"
#include "support/support.hpp"
#include "test_util.hpp"

using namespace qmp;
using namespace std::chrono_literals;
namespace asio = boost::asio;
namespace json = boost::json;

namespace {

std::unique_ptr<Client> connect(asio::io_context& io, fdpass::UniqueFd fd, ClientOptions o = {}) {
  auto c =
      qbtest::run(io, Client::connect(io.get_executor(), std::move(fd), after(10s), std::move(o)));
  if (!c) FAIL("connect: " << c.error().message);
  return std::move(*c);
}

json::value ok(asio::io_context& io, Client& c, Command cmd) {
  std::string name = cmd.name;
  auto r = qbtest::run(io, c.execute(std::move(cmd), after(10s)));
  if (!r) FAIL(name << ": " << r.error().message);
  return std::move(*r);
}

json::value ok_fd(asio::io_context& io, Client& c, Command cmd, fdpass::BorrowedFd fd) {
  std::string name = cmd.name;
  auto r = qbtest::run(io, c.execute_with_fd(std::move(cmd), fd, after(10s)));
  if (!r) FAIL(name << ": " << r.error().message);
  return std::move(*r);
}

// Checks a command's arguments against the live introspection schema: every key must be a
// member of the argument type (union variants included), and every value must fit its type.
class SchemaCheck {
 public:
  explicit SchemaCheck(const json::value& schema) {
    for (const auto& e : schema.as_array())
      by_name_[std::string(e.at("name").as_string())] = &e.as_object();
  }

  std::string check(const Command& c) const {
    auto it = by_name_.find(c.name);
    if (it == by_name_.end()) return c.name + ": no such command";
    const json::object* args = entity(it->second->at("arg-type").as_string());
    // device_add takes any qdev property besides its declared members.
    return object(c.args, args, c.name == "device_add", c.name);
  }

 private:
  const json::object* entity(std::string_view name) const {
    auto it = by_name_.find(std::string(name));
    return it == by_name_.end() ? nullptr : it->second;
  }

  static const json::object* find_member(const json::object* type, std::string_view key) {
    for (const auto& m : type->at("members").as_array()) {
      if (m.at("name").as_string() == key) return &m.as_object();
    }
    return nullptr;
  }

  std::string object(const json::object& v, const json::object* type, bool open,
                     const std::string& where) const {
    if (type == nullptr || type->at("meta-type").as_string() != "object")
      return where + ": not an object type";
    const json::object* variant = nullptr;
    if (const json::value* tag = type->if_contains("tag")) {
      const json::value* which = v.if_contains(tag->as_string());
      if (which == nullptr) return where + ": missing discriminator";
      for (const auto& var : type->at("variants").as_array()) {
        if (var.at("case") == *which) variant = entity(var.at("type").as_string());
      }
      if (variant == nullptr) return where + ": no variant " + json::serialize(*which);
    }
    for (const auto& kv : v) {
      const json::object* m = find_member(type, kv.key());
      if (m == nullptr && variant != nullptr) m = find_member(variant, kv.key());
      if (m == nullptr) {
        if (open) continue;
        return where + ": unknown member " + std::string(kv.key());
      }
      auto why = value(kv.value(), m->at("type").as_string(), where + "." + std::string(kv.key()));
      if (!why.empty()) return why;
    }
    for (const json::object* t : {type, variant}) {
      if (t == nullptr) continue;
      for (const auto& m : t->at("members").as_array()) {
        if (!m.as_object().contains("default") && !v.contains(m.at("name").as_string())) {
          return where + ": missing required " + std::string(m.at("name").as_string());
        }
      }
    }
    return "";
  }

  std::string value(const json::value& v, std::string_view type_name,
                    const std::string& where) const {
    const json::object* t = entity(type_name);
    if (t == nullptr) return where + ": unknown type";
    auto meta = t->at("meta-type").as_string();
    if (meta == "builtin") {
      auto jt = t->at("json-type").as_string();
      bool fits = jt == "value" || (jt == "string" && v.is_string()) ||
                  (jt == "int" && (v.is_int64() || v.is_uint64())) ||
                  (jt == "number" && v.is_number()) || (jt == "boolean" && v.is_bool()) ||
                  (jt == "null" && v.is_null());
      return fits ? "" : where + ": not a " + std::string(jt);
    }
    if (meta == "enum") {
      if (!v.is_string()) return where + ": enum needs a string";
      if (const json::value* vals = t->if_contains("values")) {
        for (const auto& e : vals->as_array()) {
          if (e == v) return "";
        }
      }
      return where + ": no enum value " + std::string(v.as_string());
    }
    if (meta == "array") {
      if (!v.is_array()) return where + ": not an array";
      for (const auto& e : v.as_array()) {
        auto why = value(e, t->at("element-type").as_string(), where + "[]");
        if (!why.empty()) return why;
      }
      return "";
    }
    if (meta == "alternate") {
      for (const auto& m : t->at("members").as_array()) {
        if (value(v, m.at("type").as_string(), where).empty()) return "";
      }
      return where + ": fits no alternative";
    }
    if (meta == "object") {
      if (!v.is_object()) return where + ": not an object";
      return object(v.as_object(), t, false, where);
    }
    return where + ": unexpected meta-type";
  }

  std::map<std::string, const json::object*, std::less<>> by_name_;
};

std::vector<Command> every_builder() {
  return {
      cmd::qmp_capabilities(),
      cmd::cont(),
      cmd::stop(),
      cmd::system_powerdown(),
      cmd::system_reset(),
      cmd::quit(),
      cmd::query_version(),
      cmd::query_qmp_schema(),
      cmd::query_commands(),
      cmd::query_command_line_options("run-with"),
      cmd::query_status(),
      cmd::query_block(),
      cmd::query_fdsets(),
      cmd::query_migrate(),
      cmd::qom_list("/machine"),
      cmd::add_fd(),
      cmd::add_fd(1, "x"),
      cmd::remove_fd(1),
      cmd::remove_fd(1, 20),
      cmd::getfd("f"),
      cmd::closefd("f"),
      cmd::blockdev_add(cmd::FileNode{"f0", 1, true, false, std::nullopt}),
      cmd::blockdev_add(cmd::FileNode{"f1", 1, false, true, cmd::Aio::native}),
      cmd::blockdev_add(cmd::RawNode{"r0", "f0", true}),
      cmd::blockdev_add(cmd::Qcow2Node{"q0", "f1", std::nullopt, false}),
      cmd::blockdev_add(cmd::Qcow2Node{"q1", "f1", "q0", false}),
      cmd::blockdev_del("q1"),
      cmd::blockdev_change_medium({"cd0", 2, "raw", cmd::ReadOnlyMode::read_only, false}),
      cmd::blockdev_remove_medium("cd0"),
      cmd::blockdev_open_tray("cd0", true),
      cmd::blockdev_close_tray("cd0"),
      cmd::eject("cd0", true),
      cmd::device_add(cmd::scsi_hd("h0", "r0", "scsi0.0")),
      cmd::device_add(cmd::virtio_net_pci("n0", "net0", "52:54:00:00:00:01")),
      cmd::device_del("h0"),
      cmd::netdev_add_tap("net0", "tap0"),
      cmd::netdev_del("net0"),
      cmd::display_update_vnc_fd("vnc0"),
      cmd::add_client(cmd::ClientProtocol::vnc, "c0", true),
      cmd::migrate_to_fd("m0"),
      cmd::migrate_to_fdset_file(3),
      cmd::migrate_incoming_fd("m0"),
      cmd::migrate_cancel(),
      cmd::migrate_set_capabilities({{cmd::MigrationCapability::events, true},
                                     {cmd::MigrationCapability::auto_converge, false},
                                     {cmd::MigrationCapability::postcopy_ram, false},
                                     {cmd::MigrationCapability::return_path, false},
                                     {cmd::MigrationCapability::multifd, false},
                                     {cmd::MigrationCapability::xbzrle, false},
                                     {cmd::MigrationCapability::pause_before_switchover, false}}),
  };
}

}  // namespace

TEST_CASE("qemu: greeting and capabilities negotiation", "[qmp][qemu]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  auto qemu = qbtest::QemuProcess::start(1, {"-S"});
  auto c = connect(io, std::move(qemu->monitors[0]));
  CHECK(c->greeting().version.at_least(7, 2));
  CHECK(std::find(c->greeting().capabilities.begin(), c->greeting().capabilities.end(), "oob") !=
        c->greeting().capabilities.end());
  auto st = reply::status(ok(io, *c, cmd::query_status()));
  REQUIRE(st.has_value());
  CHECK_FALSE(st->running);
  auto ver = reply::version(ok(io, *c, cmd::query_version()));
  REQUIRE(ver.has_value());
  CHECK(ver->to_string() == c->greeting().version.to_string());
  auto unknown = qbtest::run(io, c->execute(cmd::raw("no-such-command"), after(10s)));
  REQUIRE(unknown.has_error());
  CHECK(unknown.error().qmp_class == "CommandNotFound");
}

TEST_CASE("qemu: add-fd with a real file, block nodes on the fdset, remove-fd", "[qmp][qemu]") {
  qbtest::FdLeakCheck leaks;
  qbtest::TempDir dir;
  qbtest::write_file(dir / "raw.img", std::string(1 << 20, '\0'));
  REQUIRE(std::system(("qemu-img create -q -f qcow2 " + (dir / "q.qcow2") + " 1M").c_str()) == 0);
  asio::io_context io;
  auto qemu = qbtest::QemuProcess::start();
  std::vector<std::string> sent;
  ClientOptions o;
  o.transcript = [&](Direction d, std::string_view line, bool) {
    if (d == Direction::to_qemu) sent.emplace_back(line);
  };
  auto c = connect(io, std::move(qemu->monitors[0]), o);

  fdpass::UniqueFd raw(::open((dir / "raw.img").c_str(), O_RDWR | O_CLOEXEC));
  REQUIRE(raw.valid());
  auto added = reply::add_fd(ok_fd(io, *c, cmd::add_fd(std::nullopt, "disk0"), raw));
  REQUIRE(added.has_value());
  auto sets = reply::fdsets(ok(io, *c, cmd::query_fdsets()));
  REQUIRE(sets.has_value());
  REQUIRE(sets->size() == 1);
  CHECK(sets->at(0).fdset_id == added->fdset_id);
  REQUIRE(sets->at(0).fds.size() == 1);
  CHECK(sets->at(0).fds[0].fd == added->fd);
  CHECK(sets->at(0).fds[0].opaque == std::optional<std::string>("disk0"));

  ok(io, *c, cmd::blockdev_add(cmd::FileNode{"f0", added->fdset_id, false, false, std::nullopt}));
  ok(io, *c, cmd::blockdev_add(cmd::RawNode{"d0", "f0", false}));
  auto busy = qbtest::run(io, c->execute(cmd::blockdev_del("f0"), after(10s)));
  REQUIRE(busy.has_error());
  CHECK(busy.error().qmp_class == "GenericError");
  ok(io, *c, cmd::blockdev_del("d0"));
  ok(io, *c, cmd::blockdev_del("f0"));

  // qcow2 with its backing given explicitly as null.
  fdpass::UniqueFd q(::open((dir / "q.qcow2").c_str(), O_RDWR | O_CLOEXEC));
  REQUIRE(q.valid());
  {
    auto qa = reply::add_fd(ok_fd(io, *c, cmd::add_fd(), q));
    REQUIRE(qa.has_value());
    ok(io, *c, cmd::blockdev_add(cmd::FileNode{"qf", qa->fdset_id, false, false, std::nullopt}));
    ok(io, *c, cmd::blockdev_add(cmd::Qcow2Node{"qd", "qf", std::nullopt, false}));
    ok(io, *c, cmd::blockdev_del("qd"));
    ok(io, *c, cmd::blockdev_del("qf"));
    ok(io, *c, cmd::remove_fd(qa->fdset_id));
  }

  ok(io, *c, cmd::remove_fd(added->fdset_id));
  sets = reply::fdsets(ok(io, *c, cmd::query_fdsets()));
  REQUIRE(sets.has_value());
  for (const auto& s : *sets) CHECK(s.fdset_id != added->fdset_id);

  // No host path went to QEMU: only fds and /dev/fdset names.
  for (const auto& line : sent) {
    INFO(line);
    CHECK(line.find(dir.path()) == std::string::npos);
    CHECK(line.find("/tmp") == std::string::npos);
  }
}

TEST_CASE("qemu: getfd and closefd", "[qmp][qemu]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  auto qemu = qbtest::QemuProcess::start();
  auto c = connect(io, std::move(qemu->monitors[0]));
  auto p = fdpass::make_pipe();
  REQUIRE(p.has_value());
  ok_fd(io, *c, cmd::getfd("p0"), p->second);
  ok_fd(io, *c, cmd::getfd("p1"), p->first);
  ok(io, *c, cmd::closefd("p0"));
  auto again = qbtest::run(io, c->execute(cmd::closefd("p0"), after(10s)));
  REQUIRE(again.has_error());
  CHECK(again.error().is(errc::command_failed));
  CHECK(again.error().qmp_class == "GenericError");
  CHECK(again.error().qmp_desc.find("p0") != std::string::npos);
  ok(io, *c, cmd::closefd("p1"));
}

TEST_CASE("qemu: STOP and RESUME events on stop and cont", "[qmp][qemu]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  auto qemu = qbtest::QemuProcess::start(1, {"-S"});
  auto c = connect(io, std::move(qemu->monitors[0]));
  auto sub = c->subscribe();
  ok(io, *c, cmd::cont());
  auto e = qbtest::run(io, sub.wait_for(event::named(event::kResume), after(10s)));
  REQUIRE(e.has_value());
  CHECK(e->timestamp.seconds > 0);
  CHECK(reply::status(ok(io, *c, cmd::query_status()))->running);
  ok(io, *c, cmd::stop());
  e = qbtest::run(io, sub.wait_for(event::named(event::kStop), after(10s)));
  REQUIRE(e.has_value());
  auto st = reply::status(ok(io, *c, cmd::query_status()));
  CHECK_FALSE(st->running);
  CHECK(st->status == "paused");
}

TEST_CASE("qemu: schema-derived flags, probed once per binary", "[qmp][qemu]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  auto bin = BinaryId::of(qbtest::qemu_binary());
  REQUIRE(bin.has_value());
  CapabilityCache cache;
  auto qemu = qbtest::QemuProcess::start(2);
  auto c1 = connect(io, std::move(qemu->monitors[0]));
  auto c2 = connect(io, std::move(qemu->monitors[1]));
  auto caps = qbtest::run(io, cache.get(*bin, *c1, after(10s)));
  REQUIRE(caps.has_value());
  const Capabilities& k = **caps;
  const Version& v = k.version;
  CHECK(v.to_string() == c1->greeting().version.to_string());
  CHECK(k.display_update_vnc_fd == v.at_least(7, 1));
  CHECK(k.run_with == v.at_least(8, 1));
  CHECK(k.run_with_user == v.at_least(9, 1));
  CHECK(k.fdset_explicit_remove == v.at_least(9, 1));
  CHECK(k.file_migration_fdset == v.at_least(8, 2));
  CHECK(k.change_medium.id);
  CHECK(k.change_medium.read_only_mode);
  CHECK(k.change_medium.force);
  for (const auto& b : every_builder()) {
    INFO(b.name);
    CHECK(k.has_command(b.name));
  }
  CHECK(k.has_event("DEVICE_DELETED"));
  CHECK(k.has_event("DEVICE_TRAY_MOVED"));
  std::uint64_t sent = c2->stats().lines_sent;
  auto cached = qbtest::run(io, cache.get(*bin, *c2, after(10s)));
  REQUIRE(cached.has_value());
  CHECK(*cached == *caps);
  CHECK(cache.probes() == 1);
  CHECK(c2->stats().lines_sent == sent);
}

TEST_CASE("qemu: every command builder matches the live schema", "[qmp][qemu]") {
  qbtest::FdLeakCheck leaks;
  asio::io_context io;
  auto qemu = qbtest::QemuProcess::start();
  auto c = connect(io, std::move(qemu->monitors[0]));
  auto schema = ok(io, *c, cmd::query_qmp_schema());
  CHECK(c->stats().peak_line_buffer <=
        ClientOptions{}.limits.max_line + 1 + ClientOptions{}.read_size);
  SchemaCheck check(schema);
  for (const auto& b : every_builder()) {
    INFO(b.name << " " << json::serialize(b.args));
    CHECK(check.check(b) == "");
  }
  // Controls: the check does refuse what QEMU would refuse.
  CHECK(check.check(cmd::raw("blockdev-del", {{"node", "x"}})) != "");
  CHECK(check.check(cmd::raw("blockdev-add", {{"driver", "nope"}, {"node-name", "x"}})) != "");
  CHECK(check.check(cmd::raw("getfd", {})) != "");
  CHECK(check.check(cmd::raw("migrate", {{"uri", 5}})) != "");
  CHECK(check.check(cmd::raw("no-such-command")) != "");
}

TEST_CASE("qemu: a listening monitor socket takes a new client after a disconnect", "[qmp][qemu]") {
  qbtest::FdLeakCheck leaks;
  qbtest::TempDir dir;
  auto listener = fdpass::listen_unix(dir / "qmp.sock", 0600, ::getuid(), ::getgid());
  REQUIRE(listener.has_value());
  asio::io_context io;
  auto qemu = qbtest::QemuProcess::start_listening(std::move(*listener));
  for (int round = 0; round < 2; ++round) {
    // The socket listens from before QEMU starts, so connecting never races its start-up.
    auto sock = fdpass::connect_unix(dir / "qmp.sock");
    REQUIRE(sock.has_value());
    auto c = connect(io, std::move(*sock));
    CHECK(reply::status(ok(io, *c, cmd::query_status())).has_value());
  }
}
