// qmp/commands: the exact JSON each builder produces, reply decoders and event predicates.
#include "qmp/commands.hpp"

#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>

#include "support/support.hpp"

using namespace qmp;
namespace json = boost::json;

namespace {

// The command as {"name": ..., "args": ...}, compared as JSON values (key order is irrelevant).
void check(const Command& c, std::string_view name, std::string_view args_json,
           bool takes_fd = false) {
  INFO(c.name << " " << json::serialize(c.args));
  CHECK(c.name == name);
  CHECK(json::value(c.args) == json::parse(args_json));
  CHECK(c.takes_fd == takes_fd);
}

}  // namespace

TEST_CASE("argument-less commands", "[qmp][commands]") {
  qbtest::FdLeakCheck leaks;
  check(cmd::qmp_capabilities(), "qmp_capabilities", "{}");
  check(cmd::cont(), "cont", "{}");
  check(cmd::stop(), "stop", "{}");
  check(cmd::system_powerdown(), "system_powerdown", "{}");
  check(cmd::system_reset(), "system_reset", "{}");
  check(cmd::quit(), "quit", "{}");
  check(cmd::query_version(), "query-version", "{}");
  check(cmd::query_qmp_schema(), "query-qmp-schema", "{}");
  check(cmd::query_commands(), "query-commands", "{}");
  check(cmd::query_status(), "query-status", "{}");
  check(cmd::query_block(), "query-block", "{}");
  check(cmd::query_fdsets(), "query-fdsets", "{}");
  check(cmd::query_migrate(), "query-migrate", "{}");
  check(cmd::migrate_cancel(), "migrate_cancel", "{}");
  check(cmd::query_command_line_options("run-with"), "query-command-line-options",
        R"({"option":"run-with"})");
  check(cmd::qom_list("/machine"), "qom-list", R"({"path":"/machine"})");
}

TEST_CASE("storage migration commands name fds and nodes and never a path", "[qmp][commands]") {
  qbtest::FdLeakCheck leaks;
  check(cmd::nbd_server_start_fd("qb-nbd", 2), "nbd-server-start",
        R"({"addr":{"type":"fd","data":{"str":"qb-nbd"}},"max-connections":2})");
  check(cmd::nbd_server_stop(), "nbd-server-stop", "{}");
  check(cmd::block_export_add_nbd("qb-d0-export", "qb-d0-fmt", "d0"), "block-export-add",
        R"({"type":"nbd","id":"qb-d0-export","node-name":"qb-d0-fmt","name":"d0","writable":true})");
  check(cmd::blockdev_add(cmd::NbdNode{"qb-d0-nbd", "qb-d0-nbd", "d0"}), "blockdev-add",
        R"({"driver":"nbd","node-name":"qb-d0-nbd","server":{"type":"fd","str":"qb-d0-nbd"},"export":"d0"})");
  check(cmd::blockdev_mirror("qb-d0-mirror", "qb-d0-fmt", "qb-d0-nbd"), "blockdev-mirror",
        R"({"job-id":"qb-d0-mirror","device":"qb-d0-fmt","target":"qb-d0-nbd","sync":"full","auto-dismiss":false})");
  check(cmd::block_job_cancel("qb-d0-mirror", false), "block-job-cancel",
        R"({"device":"qb-d0-mirror","force":false})");
  check(cmd::job_dismiss("qb-d0-mirror"), "job-dismiss", R"({"id":"qb-d0-mirror"})");
  check(cmd::query_block_jobs(), "query-block-jobs", "{}");
  check(cmd::migrate_continue_pre_switchover(), "migrate-continue", R"({"state":"pre-switchover"})");
}

TEST_CASE("fd commands say they consume an fd", "[qmp][commands]") {
  qbtest::FdLeakCheck leaks;
  check(cmd::add_fd(), "add-fd", "{}", true);
  check(cmd::add_fd(3, "disk0"), "add-fd", R"({"fdset-id":3,"opaque":"disk0"})", true);
  check(cmd::getfd("vnc0"), "getfd", R"({"fdname":"vnc0"})", true);
  check(cmd::closefd("vnc0"), "closefd", R"({"fdname":"vnc0"})");
  check(cmd::remove_fd(3), "remove-fd", R"({"fdset-id":3})");
  check(cmd::remove_fd(3, 17), "remove-fd", R"({"fdset-id":3,"fd":17})");
  CHECK(cmd::fdset_path(5) == "/dev/fdset/5");
  CHECK(cmd::is_fd_command("getfd"));
  CHECK(cmd::is_fd_command("remove-fd"));
  CHECK_FALSE(cmd::is_fd_command("query-status"));
  CHECK(cmd::raw("add-fd").takes_fd);
  CHECK_FALSE(cmd::raw("query-status").takes_fd);
}

TEST_CASE("block nodes name fdsets and explicit backing", "[qmp][commands]") {
  qbtest::FdLeakCheck leaks;
  check(cmd::blockdev_add(cmd::FileNode{"f0", 2, true, false, std::nullopt}), "blockdev-add",
        R"({"driver":"file","node-name":"f0","filename":"/dev/fdset/2","read-only":true})");
  check(cmd::blockdev_add(cmd::FileNode{"f1", 4, false, true, cmd::Aio::native}), "blockdev-add",
        R"({"driver":"file","node-name":"f1","filename":"/dev/fdset/4","read-only":false,)"
        R"("cache":{"direct":true},"aio":"native"})");
  check(cmd::blockdev_add(cmd::RawNode{"d0", "f0", true}), "blockdev-add",
        R"({"driver":"raw","node-name":"d0","file":"f0","read-only":true})");
  check(cmd::blockdev_add(cmd::Qcow2Node{"q0", "f1", std::nullopt, false}), "blockdev-add",
        R"({"driver":"qcow2","node-name":"q0","file":"f1","read-only":false,"backing":null})");
  check(cmd::blockdev_add(cmd::Qcow2Node{"q1", "f2", "q0", false}), "blockdev-add",
        R"({"driver":"qcow2","node-name":"q1","file":"f2","read-only":false,"backing":"q0"})");
  check(cmd::blockdev_del("q1"), "blockdev-del", R"({"node-name":"q1"})");
}

TEST_CASE("removable media commands select the drive by qdev id", "[qmp][commands]") {
  qbtest::FdLeakCheck leaks;
  check(cmd::blockdev_change_medium({"cd0", 7, "raw", cmd::ReadOnlyMode::read_only, true}),
        "blockdev-change-medium",
        R"({"id":"cd0","filename":"/dev/fdset/7","format":"raw","read-only-mode":"read-only",)"
        R"("force":true})");
  check(cmd::blockdev_change_medium({"cd0", 7, "raw", std::nullopt, std::nullopt}),
        "blockdev-change-medium", R"({"id":"cd0","filename":"/dev/fdset/7","format":"raw"})");
  // A block device: the protocol driver is named through a json: filename.
  check(cmd::blockdev_change_medium({"cd0", 7, "raw", std::nullopt, std::nullopt, "host_cdrom"}),
        "blockdev-change-medium",
        R"({"id":"cd0","filename":"json:{\"file\":{\"driver\":\"host_cdrom\",)"
        R"(\"filename\":\"/dev/fdset/7\"}}","format":"raw"})");
  check(cmd::blockdev_remove_medium("cd0"), "blockdev-remove-medium", R"({"id":"cd0"})");
  check(cmd::blockdev_open_tray("cd0", true), "blockdev-open-tray", R"({"id":"cd0","force":true})");
  check(cmd::blockdev_open_tray("cd0"), "blockdev-open-tray", R"({"id":"cd0"})");
  check(cmd::blockdev_close_tray("cd0"), "blockdev-close-tray", R"({"id":"cd0"})");
  check(cmd::eject("cd0", false), "eject", R"({"id":"cd0","force":false})");
}

TEST_CASE("devices, network, display, migration", "[qmp][commands]") {
  qbtest::FdLeakCheck leaks;
  check(cmd::device_add(cmd::scsi_hd("disk1", "d1", "scsi0.0")), "device_add",
        R"({"driver":"scsi-hd","id":"disk1","drive":"d1","bus":"scsi0.0"})");
  check(cmd::device_add(cmd::scsi_cd("cd0")), "device_add", R"({"driver":"scsi-cd","id":"cd0"})");
  check(cmd::device_add(cmd::virtio_scsi_pci("scsi0")), "device_add",
        R"({"driver":"virtio-scsi-pci","id":"scsi0","romfile":""})");
  check(cmd::device_add(cmd::virtio_blk_pci("vd0", "d0")), "device_add",
        R"({"driver":"virtio-blk-pci","id":"vd0","drive":"d0","romfile":""})");
  check(cmd::device_add(cmd::virtio_net_pci("nic0", "net0", "52:54:00:12:34:56")), "device_add",
        R"({"driver":"virtio-net-pci","id":"nic0","netdev":"net0","romfile":"",)"
        R"("mac":"52:54:00:12:34:56"})");
  check(cmd::device_del("nic0"), "device_del", R"({"id":"nic0"})");
  check(cmd::netdev_add_tap("net0", "tap0"), "netdev_add",
        R"({"type":"tap","id":"net0","fd":"tap0"})");
  check(cmd::netdev_del("net0"), "netdev_del", R"({"id":"net0"})");
  check(cmd::display_update_vnc_fd("vnc0"), "display-update",
        R"({"type":"vnc","addresses":[{"type":"fd","str":"vnc0"}]})");
  check(cmd::add_client(cmd::ClientProtocol::vnc, "c0", true), "add_client",
        R"({"protocol":"vnc","fdname":"c0","skipauth":true})");
  check(cmd::migrate_to_fd("mig0"), "migrate", R"({"uri":"fd:mig0"})");
  check(cmd::migrate_to_fdset_file(3), "migrate", R"({"uri":"file:/dev/fdset/3"})");
  check(cmd::migrate_to_fdset_file(3, 4096), "migrate",
        R"({"uri":"file:/dev/fdset/3,offset=4096"})");
  check(cmd::migrate_incoming_fd("in0"), "migrate-incoming", R"({"uri":"fd:in0"})");
  check(cmd::migrate_set_capabilities({{cmd::MigrationCapability::events, true},
                                       {cmd::MigrationCapability::auto_converge, false}}),
        "migrate-set-capabilities",
        R"({"capabilities":[{"capability":"events","state":true},)"
        R"({"capability":"auto-converge","state":false}]})");
}

TEST_CASE("reply decoders", "[qmp][commands]") {
  qbtest::FdLeakCheck leaks;
  auto fd = reply::add_fd(json::parse(R"({"fdset-id": 1, "fd": 25})"));
  REQUIRE(fd.has_value());
  CHECK(fd->fdset_id == 1);
  CHECK(fd->fd == 25);
  CHECK(reply::add_fd(json::parse(R"({"fd": 25})")).has_error());

  auto st =
      reply::status(json::parse(R"({"status": "paused", "singlestep": false, "running": false})"));
  REQUIRE(st.has_value());
  CHECK(st->status == "paused");
  CHECK_FALSE(st->running);

  auto sets = reply::fdsets(json::parse(
      R"([{"fdset-id": 0, "fds": [{"fd": 20, "opaque": "cd"}, {"fd": 21}]}, {"fdset-id": 2, "fds": []}])"));
  REQUIRE(sets.has_value());
  REQUIRE(sets->size() == 2);
  CHECK((*sets)[0].fds.size() == 2);
  CHECK((*sets)[0].fds[0].opaque == std::optional<std::string>("cd"));
  CHECK_FALSE((*sets)[0].fds[1].opaque.has_value());

  auto blk = reply::block(json::parse(
      R"([{"device": "", "qdev": "cd0", "removable": true, "tray_open": false,
           "locked": false, "inserted": {"node-name": "m0", "ro": true, "file": "/dev/fdset/3"}},
          {"device": "", "qdev": "/machine/peripheral/d1/virtio-backend", "removable": false}])"));
  REQUIRE(blk.has_value());
  CHECK((*blk)[0].node_name == std::optional<std::string>("m0"));
  CHECK((*blk)[0].file == std::optional<std::string>("/dev/fdset/3"));
  CHECK((*blk)[0].tray_open == std::optional<bool>(false));
  CHECK_FALSE((*blk)[1].node_name.has_value());
  CHECK_FALSE((*blk)[1].file.has_value());

  auto off = reply::vnc(json::parse(R"({"enabled": false})"));
  REQUIRE(off.has_value());
  CHECK_FALSE(off->enabled);
  auto on = reply::vnc(json::parse(
      R"({"enabled": true, "host": "127.0.0.1", "service": "5901", "family": "ipv4", "auth": "none", "clients": []})"));
  REQUIRE(on.has_value());
  CHECK(on->enabled);
  CHECK(on->host == std::optional<std::string>("127.0.0.1"));
  CHECK(on->service == std::optional<std::string>("5901"));
  CHECK_FALSE(reply::vnc(json::parse(R"({"host": "x"})")).has_value());

  auto mig = reply::migration(json::parse(R"({})"));
  REQUIRE(mig.has_value());
  CHECK(mig->status == "none");
  mig = reply::migration(json::parse(R"({"status": "failed", "error-desc": "boom"})"));
  CHECK(mig->error_desc == std::optional<std::string>("boom"));

  // query-block-jobs as QEMU 7.2 answers it; a concluded job keeps its error.
  auto jobs = reply::block_jobs(json::parse(
      R"([{"auto-finalize": true, "io-status": "ok", "device": "qb-d0-mirror", "auto-dismiss": false,
           "busy": false, "len": 8388608, "offset": 8388608, "status": "ready", "paused": false,
           "speed": 0, "ready": true, "type": "mirror"},
          {"device": "qb-d1-mirror", "status": "concluded", "ready": false, "len": -1, "offset": 1e30,
           "error": "Source and target image have different sizes", "type": "mirror"}])"));
  REQUIRE(jobs.has_value());
  REQUIRE(jobs->size() == 2);
  CHECK(jobs->at(0).id == "qb-d0-mirror");
  CHECK(jobs->at(0).ready);
  CHECK(jobs->at(0).len == 8388608);
  CHECK(jobs->at(0).offset == 8388608);
  CHECK_FALSE(jobs->at(0).error);
  CHECK(jobs->at(1).status == "concluded");
  CHECK(jobs->at(1).len == 0);                // negative reads as 0
  CHECK(jobs->at(1).offset == UINT64_MAX);    // past 2^64 reads as the largest count
  CHECK(jobs->at(1).error == std::optional<std::string>("Source and target image have different sizes"));
  CHECK(reply::block_jobs(json::parse(R"({})")).has_error());
  CHECK(reply::block_jobs(json::parse(R"([1])")).has_error());
  CHECK(reply::block_jobs(json::parse(R"([{"status": "ready"}])")).has_error());

  auto ver = reply::version(
      json::parse(R"({"qemu": {"micro": 1, "minor": 1, "major": 9}, "package": "v9.1.1"})"));
  REQUIRE(ver.has_value());
  CHECK(ver->at_least(9, 1));
  CHECK_FALSE(ver->at_least(9, 2));

  auto names = reply::command_names(json::parse(R"([{"name": "cont"}, {"name": "stop"}])"));
  CHECK(names->size() == 2);
  auto props = reply::qom_list(json::parse(R"([{"name": "type", "type": "string"}])"));
  CHECK(props->at(0).type == "string");
  CHECK(reply::qom_list(json::parse(R"({})")).has_error());
}

TEST_CASE("event predicates", "[qmp][commands]") {
  qbtest::FdLeakCheck leaks;
  auto ev = [](std::string name, std::string_view data) {
    return Event{std::move(name), json::parse(data).as_object(), {}, 0};
  };
  CHECK(event::device_deleted("d0")(ev("DEVICE_DELETED", R"({"device": "d0", "path": "/x"})")));
  CHECK_FALSE(event::device_deleted("d0")(ev("DEVICE_DELETED", R"({"path": "/x"})")));
  CHECK_FALSE(event::device_deleted("d0")(ev("DEVICE_DELETED", R"({"device": "d1"})")));
  auto tray = ev("DEVICE_TRAY_MOVED", R"({"device": "", "id": "cd0", "tray-open": true})");
  CHECK(event::tray_moved("cd0")(tray));
  CHECK(event::tray_moved("cd0", true)(tray));
  CHECK_FALSE(event::tray_moved("cd0", false)(tray));
  CHECK_FALSE(event::tray_moved("")(tray));
  CHECK(event::migration_status("completed")(ev("MIGRATION", R"({"status": "completed"})")));
  CHECK(event::named(event::kStop)(ev("STOP", "{}")));
  CHECK_FALSE(event::named(event::kStop)(ev("RESUME", "{}")));
}
