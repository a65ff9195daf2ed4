#include "qmp/commands.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <boost/json/serialize.hpp>

namespace qmp {
namespace json = boost::json;

namespace cmd {
namespace {

Command make(std::string_view name, json::object args = {}, bool takes_fd = false) {
  return Command{std::string(name), std::move(args), takes_fd};
}

std::string_view aio_name(Aio a) {
  switch (a) {
    case Aio::threads:
      return "threads";
    case Aio::native:
      return "native";
    case Aio::io_uring:
      return "io_uring";
  }
  return "threads";
}

std::string_view read_only_mode_name(ReadOnlyMode m) {
  switch (m) {
    case ReadOnlyMode::retain:
      return "retain";
    case ReadOnlyMode::read_only:
      return "read-only";
    case ReadOnlyMode::read_write:
      return "read-write";
  }
  return "retain";
}

std::string_view capability_name(MigrationCapability c) {
  switch (c) {
    case MigrationCapability::events:
      return "events";
    case MigrationCapability::auto_converge:
      return "auto-converge";
    case MigrationCapability::postcopy_ram:
      return "postcopy-ram";
    case MigrationCapability::return_path:
      return "return-path";
    case MigrationCapability::multifd:
      return "multifd";
    case MigrationCapability::xbzrle:
      return "xbzrle";
    case MigrationCapability::pause_before_switchover:
      return "pause-before-switchover";
  }
  return "events";
}

json::object id_args(std::string_view id) {
  return {{"id", id}};
}

}  // namespace

Command qmp_capabilities() {
  return make("qmp_capabilities");
}
Command cont() {
  return make("cont");
}
Command stop() {
  return make("stop");
}
Command system_powerdown() {
  return make("system_powerdown");
}
Command system_reset() {
  return make("system_reset");
}
Command quit() {
  return make("quit");
}

Command query_version() {
  return make("query-version");
}
Command query_qmp_schema() {
  return make("query-qmp-schema");
}
Command query_commands() {
  return make("query-commands");
}
Command query_command_line_options(std::string_view option) {
  return make("query-command-line-options", {{"option", option}});
}
Command query_status() {
  return make("query-status");
}
Command query_vnc() { return make("query-vnc"); }

Command query_block() {
  return make("query-block");
}
Command query_fdsets() {
  return make("query-fdsets");
}
Command query_migrate() {
  return make("query-migrate");
}
Command qom_list(std::string_view path) {
  return make("qom-list", {{"path", path}});
}

Command add_fd(std::optional<std::int64_t> fdset_id, std::optional<std::string> opaque) {
  json::object a;
  if (fdset_id) a["fdset-id"] = *fdset_id;
  if (opaque) a["opaque"] = *opaque;
  return make("add-fd", std::move(a), true);
}
Command remove_fd(std::int64_t fdset_id, std::optional<std::int64_t> fd) {
  json::object a{{"fdset-id", fdset_id}};
  if (fd) a["fd"] = *fd;
  return make("remove-fd", std::move(a));
}
Command getfd(std::string_view fdname) {
  return make("getfd", {{"fdname", fdname}}, true);
}
Command closefd(std::string_view fdname) {
  return make("closefd", {{"fdname", fdname}});
}
std::string fdset_path(std::int64_t fdset_id) {
  return "/dev/fdset/" + std::to_string(fdset_id);
}

Command blockdev_add(const FileNode& n) {
  json::object a{{"driver", "file"},
                 {"node-name", n.node_name},
                 {"filename", fdset_path(n.fdset_id)},
                 {"read-only", n.read_only}};
  if (n.cache_direct) a["cache"] = json::object{{"direct", true}};
  if (n.aio) a["aio"] = aio_name(*n.aio);
  return make("blockdev-add", std::move(a));
}
Command blockdev_add(const HostDeviceNode& n) {
  return make("blockdev-add", {{"driver", "host_device"},
                               {"node-name", n.node_name},
                               {"filename", fdset_path(n.fdset_id)},
                               {"read-only", n.read_only}});
}
Command blockdev_add(const RawNode& n) {
  return make("blockdev-add", {{"driver", "raw"},
                               {"node-name", n.node_name},
                               {"file", n.file},
                               {"read-only", n.read_only}});
}
Command blockdev_add(const Qcow2Node& n) {
  json::object a{{"driver", "qcow2"},
                 {"node-name", n.node_name},
                 {"file", n.file},
                 {"read-only", n.read_only}};
  a["backing"] = n.backing ? json::value(*n.backing) : json::value(nullptr);
  return make("blockdev-add", std::move(a));
}
Command blockdev_del(std::string_view node_name) {
  return make("blockdev-del", {{"node-name", node_name}});
}

Command nbd_server_start_fd(std::string_view fdname, std::uint32_t max_connections) {
  // nbd-server-start takes the legacy SocketAddress: the fd's name under "data".
  json::object addr{{"type", "fd"}, {"data", json::object{{"str", fdname}}}};
  return make("nbd-server-start", {{"addr", std::move(addr)}, {"max-connections", max_connections}});
}
Command nbd_server_stop() {
  return make("nbd-server-stop");
}
Command block_export_add_nbd(std::string_view id, std::string_view node_name,
                             std::string_view export_name) {
  return make("block-export-add", {{"type", "nbd"},
                                   {"id", id},
                                   {"node-name", node_name},
                                   {"name", export_name},
                                   {"writable", true}});
}
Command blockdev_add(const NbdNode& n) {
  return make("blockdev-add", {{"driver", "nbd"},
                               {"node-name", n.node_name},
                               {"server", json::object{{"type", "fd"}, {"str", n.fdname}}},
                               {"export", n.export_name}});
}
Command blockdev_mirror(std::string_view job_id, std::string_view device, std::string_view target) {
  return make("blockdev-mirror", {{"job-id", job_id},
                                  {"device", device},
                                  {"target", target},
                                  {"sync", "full"},
                                  {"auto-dismiss", false}});
}
Command block_job_cancel(std::string_view job_id, bool force) {
  return make("block-job-cancel", {{"device", job_id}, {"force", force}});
}
Command job_dismiss(std::string_view job_id) {
  return make("job-dismiss", {{"id", job_id}});
}
Command query_block_jobs() {
  return make("query-block-jobs");
}
Command migrate_continue_pre_switchover() {
  return make("migrate-continue", {{"state", "pre-switchover"}});
}

Command blockdev_change_medium(const ChangeMedium& m) {
  std::string filename = fdset_path(m.fdset_id);
  if (!m.protocol.empty()) {
    json::object file{{"driver", m.protocol}, {"filename", filename}};
    filename = "json:" + json::serialize(json::object{{"file", std::move(file)}});
  }
  json::object a{{"id", m.id}, {"filename", std::move(filename)}, {"format", m.format}};
  if (m.read_only_mode) a["read-only-mode"] = read_only_mode_name(*m.read_only_mode);
  if (m.force) a["force"] = *m.force;
  return make("blockdev-change-medium", std::move(a));
}
Command blockdev_remove_medium(std::string_view id) {
  return make("blockdev-remove-medium", id_args(id));
}
Command blockdev_open_tray(std::string_view id, std::optional<bool> force) {
  json::object a = id_args(id);
  if (force) a["force"] = *force;
  return make("blockdev-open-tray", std::move(a));
}
Command blockdev_close_tray(std::string_view id) {
  return make("blockdev-close-tray", id_args(id));
}
Command eject(std::string_view id, std::optional<bool> force) {
  json::object a = id_args(id);
  if (force) a["force"] = *force;
  return make("eject", std::move(a));
}

Device scsi_hd(std::string id, std::string drive, std::optional<std::string> bus) {
  return Device{"scsi-hd", std::move(id), std::move(bus), {{"drive", std::move(drive)}}};
}
Device scsi_cd(std::string id, std::optional<std::string> drive, std::optional<std::string> bus) {
  Device d{"scsi-cd", std::move(id), std::move(bus), {}};
  if (drive) d.props["drive"] = std::move(*drive);
  return d;
}
Device virtio_scsi_pci(std::string id, std::optional<std::string> bus) {
  return Device{"virtio-scsi-pci", std::move(id), std::move(bus), {{"romfile", ""}}};
}
Device virtio_blk_pci(std::string id, std::string drive, std::optional<std::string> bus) {
  return Device{"virtio-blk-pci",
                std::move(id),
                std::move(bus),
                {{"drive", std::move(drive)}, {"romfile", ""}}};
}
Device virtio_net_pci(std::string id, std::string netdev, std::optional<std::string> mac,
                      std::optional<std::string> bus) {
  Device d{"virtio-net-pci",
           std::move(id),
           std::move(bus),
           {{"netdev", std::move(netdev)}, {"romfile", ""}}};
  if (mac) d.props["mac"] = std::move(*mac);
  return d;
}
Command device_add(const Device& d) {
  json::object a = d.props;
  a["driver"] = d.driver;
  a["id"] = d.id;
  if (d.bus) a["bus"] = *d.bus;
  return make("device_add", std::move(a));
}
Command device_del(std::string_view id) {
  return make("device_del", id_args(id));
}

Command netdev_add_tap(std::string_view id, std::string_view fdname) {
  return make("netdev_add", {{"type", "tap"}, {"id", id}, {"fd", fdname}});
}
Command netdev_del(std::string_view id) {
  return make("netdev_del", id_args(id));
}

Command display_update_vnc_fd(std::string_view fdname) {
  json::array addresses{json::object{{"type", "fd"}, {"str", fdname}}};
  return make("display-update", {{"type", "vnc"}, {"addresses", std::move(addresses)}});
}
Command display_update_vnc_none() {
  return make("display-update", {{"type", "vnc"}, {"addresses", json::array{}}});
}
Command add_client(ClientProtocol protocol, std::string_view fdname, bool skipauth,
                   std::optional<bool> tls) {
  json::object a{{"protocol", protocol == ClientProtocol::vnc ? "vnc" : "spice"},
                 {"fdname", fdname},
                 {"skipauth", skipauth}};
  if (tls) a["tls"] = *tls;
  return make("add_client", std::move(a));
}

Command migrate_to_fd(std::string_view fdname) {
  return make("migrate", {{"uri", "fd:" + std::string(fdname)}});
}
Command migrate_to_fdset_file(std::int64_t fdset_id, std::uint64_t offset) {
  std::string uri = "file:" + fdset_path(fdset_id);
  if (offset != 0) uri += ",offset=" + std::to_string(offset);
  return make("migrate", {{"uri", uri}});
}
Command migrate_incoming_fd(std::string_view fdname) {
  return make("migrate-incoming", {{"uri", "fd:" + std::string(fdname)}});
}
Command migrate_cancel() {
  return make("migrate_cancel");
}
Command migrate_set_max_bandwidth(std::uint64_t bytes_per_second) {
  return make("migrate-set-parameters", {{"max-bandwidth", bytes_per_second}});
}
Command migrate_set_capabilities(
    const std::vector<std::pair<MigrationCapability, bool>>& capabilities) {
  json::array caps;
  for (const auto& [c, on] : capabilities) {
    caps.push_back(json::object{{"capability", capability_name(c)}, {"state", on}});
  }
  return make("migrate-set-capabilities", {{"capabilities", std::move(caps)}});
}

Command raw(std::string_view name, json::object args) {
  return make(name, std::move(args), is_fd_command(name));
}

bool is_fd_command(std::string_view name) {
  static constexpr std::array<std::string_view, 4> kFd = {"add-fd", "remove-fd", "getfd",
                                                          "closefd"};
  return std::find(kFd.begin(), kFd.end(), name) != kFd.end();
}

}  // namespace cmd

// ---------------------------------------------------------------------------------------------

namespace reply {
namespace {

Error bad(std::string_view what) {
  return {errc::bad_reply, std::string(what)};
}

std::optional<std::int64_t> get_int(const json::object& o, std::string_view key) {
  const json::value* v = o.if_contains(key);
  if (v == nullptr) return std::nullopt;
  if (v->is_int64()) return v->get_int64();
  if (v->is_uint64() && v->get_uint64() <= static_cast<std::uint64_t>(INT64_MAX)) {
    return static_cast<std::int64_t>(v->get_uint64());
  }
  return std::nullopt;
}

std::optional<std::string> get_string(const json::object& o, std::string_view key) {
  const json::value* v = o.if_contains(key);
  if (v == nullptr || !v->is_string()) return std::nullopt;
  return std::string(v->get_string());
}

// A byte count as QEMU sends it; negative, absent or not a number reads as 0, and one past 2^64
// (a hostile QEMU) as the largest count, never as a cast out of range.
std::uint64_t get_count(const json::object& o, std::string_view key) {
  const auto* n = o.if_contains(key);
  if (n == nullptr) return 0;
  if (n->is_uint64()) return n->get_uint64();
  if (n->is_int64()) return n->get_int64() < 0 ? 0 : static_cast<std::uint64_t>(n->get_int64());
  if (!n->is_double() || !(n->get_double() > 0)) return 0;
  constexpr double kTwo64 = 18446744073709551616.0;
  return n->get_double() >= kTwo64 ? UINT64_MAX : static_cast<std::uint64_t>(n->get_double());
}

std::optional<bool> get_bool(const json::object& o, std::string_view key) {
  const json::value* v = o.if_contains(key);
  if (v == nullptr || !v->is_bool()) return std::nullopt;
  return v->get_bool();
}

}  // namespace

Result<AddFdInfo> add_fd(const json::value& v) {
  const json::object* o = v.if_object();
  if (o == nullptr) return bad("add-fd: reply is not an object");
  auto set = get_int(*o, "fdset-id");
  auto fd = get_int(*o, "fd");
  if (!set || !fd) return bad("add-fd: missing fdset-id or fd");
  return AddFdInfo{*set, *fd};
}

Result<StatusInfo> status(const json::value& v) {
  const json::object* o = v.if_object();
  if (o == nullptr) return bad("query-status: reply is not an object");
  auto s = get_string(*o, "status");
  auto running = get_bool(*o, "running");
  if (!s || !running) return bad("query-status: missing status or running");
  return StatusInfo{std::move(*s), *running};
}

Result<std::vector<FdsetInfo>> fdsets(const json::value& v) {
  const json::array* a = v.if_array();
  if (a == nullptr) return bad("query-fdsets: reply is not an array");
  std::vector<FdsetInfo> out;
  for (const json::value& e : *a) {
    const json::object* o = e.if_object();
    if (o == nullptr) return bad("query-fdsets: entry is not an object");
    auto id = get_int(*o, "fdset-id");
    const json::value* fds = o->if_contains("fds");
    if (!id || fds == nullptr || !fds->is_array()) return bad("query-fdsets: bad entry");
    FdsetInfo info{*id, {}};
    for (const json::value& f : fds->get_array()) {
      const json::object* fo = f.if_object();
      auto n = fo != nullptr ? get_int(*fo, "fd") : std::nullopt;
      if (!n) return bad("query-fdsets: bad fd entry");
      info.fds.push_back(FdsetFd{*n, get_string(*fo, "opaque")});
    }
    out.push_back(std::move(info));
  }
  return out;
}

Result<std::vector<BlockInfo>> block(const json::value& v) {
  const json::array* a = v.if_array();
  if (a == nullptr) return bad("query-block: reply is not an array");
  std::vector<BlockInfo> out;
  for (const json::value& e : *a) {
    const json::object* o = e.if_object();
    if (o == nullptr) return bad("query-block: entry is not an object");
    BlockInfo b;
    auto dev = get_string(*o, "device");
    auto removable = get_bool(*o, "removable");
    if (!dev || !removable) return bad("query-block: missing device or removable");
    b.device = std::move(*dev);
    b.removable = *removable;
    b.qdev = get_string(*o, "qdev");
    b.tray_open = get_bool(*o, "tray_open");
    if (const json::value* ins = o->if_contains("inserted"); ins && ins->is_object()) {
      b.node_name = get_string(ins->get_object(), "node-name");
      b.file = get_string(ins->get_object(), "file");
    }
    out.push_back(std::move(b));
  }
  return out;
}

Result<MigrationInfo> migration(const json::value& v) {
  const json::object* o = v.if_object();
  if (o == nullptr) return bad("query-migrate: reply is not an object");
  MigrationInfo m;
  m.status = get_string(*o, "status").value_or("none");  // absent before any migration
  m.error_desc = get_string(*o, "error-desc");
  if (const auto* ram = o->if_contains("ram"); ram != nullptr && ram->is_object()) {
    const auto& r = ram->get_object();
    m.transferred = get_count(r, "transferred");
    m.total = get_count(r, "total");
    m.remaining = get_count(r, "remaining");
    const auto* mbps = r.if_contains("mbps");
    m.mbps = mbps != nullptr && mbps->is_number() ? mbps->to_number<double>() : 0.0;
  }
  return m;
}

Result<std::vector<BlockJobInfo>> block_jobs(const json::value& v) {
  const json::array* a = v.if_array();
  if (a == nullptr) return bad("query-block-jobs: reply is not an array");
  std::vector<BlockJobInfo> out;
  for (const auto& j : *a) {
    const json::object* o = j.if_object();
    if (o == nullptr) return bad("query-block-jobs: a job is not an object");
    auto id = get_string(*o, "device");
    if (!id) return bad("query-block-jobs: a job without a device");
    BlockJobInfo info;
    info.id = std::move(*id);
    info.status = get_string(*o, "status").value_or("");
    info.ready = get_bool(*o, "ready").value_or(false);
    info.len = get_count(*o, "len");
    info.offset = get_count(*o, "offset");
    info.error = get_string(*o, "error");
    out.push_back(std::move(info));
  }
  return out;
}

Result<VncInfo> vnc(const json::value& v) {
  const json::object* o = v.if_object();
  if (o == nullptr) return bad("query-vnc: reply is not an object");
  auto enabled = get_bool(*o, "enabled");
  if (!enabled) return bad("query-vnc: missing enabled");
  VncInfo i;
  i.enabled = *enabled;
  i.host = get_string(*o, "host");
  i.service = get_string(*o, "service");
  i.family = get_string(*o, "family");
  return i;
}

Result<Version> version(const json::value& v) {
  const json::object* o = v.if_object();
  const json::value* q = o != nullptr ? o->if_contains("qemu") : nullptr;
  if (q == nullptr || !q->is_object()) return bad("query-version: missing qemu");
  auto major = get_int(q->get_object(), "major");
  auto minor = get_int(q->get_object(), "minor");
  auto micro = get_int(q->get_object(), "micro");
  if (!major || !minor || !micro) return bad("query-version: missing numbers");
  Version ver;
  ver.major = static_cast<int>(*major);
  ver.minor = static_cast<int>(*minor);
  ver.micro = static_cast<int>(*micro);
  ver.package = get_string(*o, "package").value_or("");
  return ver;
}

Result<std::vector<std::string>> command_names(const json::value& v) {
  const json::array* a = v.if_array();
  if (a == nullptr) return bad("query-commands: reply is not an array");
  std::vector<std::string> out;
  for (const json::value& e : *a) {
    const json::object* o = e.if_object();
    auto name = o != nullptr ? get_string(*o, "name") : std::nullopt;
    if (!name) return bad("query-commands: entry without name");
    out.push_back(std::move(*name));
  }
  return out;
}

Result<std::vector<ObjectProperty>> qom_list(const json::value& v) {
  const json::array* a = v.if_array();
  if (a == nullptr) return bad("qom-list: reply is not an array");
  std::vector<ObjectProperty> out;
  for (const json::value& e : *a) {
    const json::object* o = e.if_object();
    auto name = o != nullptr ? get_string(*o, "name") : std::nullopt;
    auto type = o != nullptr ? get_string(*o, "type") : std::nullopt;
    if (!name || !type) return bad("qom-list: entry without name or type");
    out.push_back(ObjectProperty{std::move(*name), std::move(*type)});
  }
  return out;
}

}  // namespace reply

// ---------------------------------------------------------------------------------------------

namespace event {
namespace {

bool string_field_is(const Event& e, std::string_view key, std::string_view want) {
  const json::value* v = e.data.if_contains(key);
  return v != nullptr && v->is_string() && v->get_string() == want;
}

}  // namespace

Predicate named(std::string_view name) {
  return [n = std::string(name)](const Event& e) { return e.name == n; };
}

Predicate device_deleted(std::string id) {
  return [id = std::move(id)](const Event& e) {
    return e.name == kDeviceDeleted && string_field_is(e, "device", id);
  };
}

Predicate tray_moved(std::string id, std::optional<bool> open) {
  return [id = std::move(id), open](const Event& e) {
    if (e.name != kTrayMoved || !string_field_is(e, "id", id)) return false;
    if (!open) return true;
    const json::value* t = e.data.if_contains("tray-open");
    return t != nullptr && t->is_bool() && t->get_bool() == *open;
  };
}

Predicate migration_status(std::string status) {
  return [status = std::move(status)](const Event& e) {
    return e.name == kMigration && string_field_is(e, "status", status);
  };
}

}  // namespace event

}  // namespace qmp
