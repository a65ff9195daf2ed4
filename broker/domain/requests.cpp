#include "broker/domain/requests.hpp"

#include <algorithm>
#include <charconv>
#include <initializer_list>
#include <set>

#include <boost/json.hpp>

#include "broker/core/errc.hpp"
#include "qmp/commands.hpp"

namespace broker {
namespace json = boost::json;
namespace {

constexpr std::size_t kMaxPath = 4096;

// Refuses any key of `o` not in `known`, naming it (prefix gives nested context: "disks[1].").
Result<void> only_known(const json::object& o, std::initializer_list<std::string_view> known,
                        const std::string& prefix = {}) {
  for (const auto& kv : o) {
    if (std::find(known.begin(), known.end(), kv.key()) == known.end()) {
      return field_error(prefix + std::string(kv.key()), "unknown field");
    }
  }
  return {};
}

Result<const json::object*> as_object(const json::value& v, const std::string& what) {
  if (!v.is_object()) return field_error(what, "must be a JSON object");
  return &v.get_object();
}

Result<std::string> str(const json::object& o, std::string_view key, bool required,
                        const std::string& prefix = {}) {
  auto it = o.find(key);
  std::string field = prefix + std::string(key);
  if (it == o.end()) {
    if (required) return field_error(field, "is required");
    return std::string();
  }
  if (!it->value().is_string()) return field_error(field, "must be a string");
  return std::string(it->value().get_string());
}

Result<bool> boolean(const json::object& o, std::string_view key, bool dflt,
                     const std::string& prefix = {}) {
  auto it = o.find(key);
  if (it == o.end()) return dflt;
  if (!it->value().is_bool()) return field_error(prefix + std::string(key), "must be true or false");
  return it->value().get_bool();
}

Result<void> check_id(const std::string& id, const std::string& field) {
  if (!lifecycle::valid_name(id)) {
    return field_error(field, "must be 1-64 characters of A-Z a-z 0-9 _ . - starting with a letter or digit");
  }
  return {};
}

Result<void> check_path(const std::string& path, const std::string& field) {
  if (path.empty() || path.front() != '/' || path.size() > kMaxPath ||
      path.find('\0') != std::string::npos) {
    return field_error(field, "must be an absolute path");
  }
  return {};
}

bool valid_mac(std::string_view mac) {
  if (mac.size() != 17) return false;
  for (std::size_t i = 0; i < mac.size(); ++i) {
    char c = mac[i];
    if (i % 3 == 2) {
      if (c != ':') return false;
    } else if (!std::isxdigit(static_cast<unsigned char>(c))) {
      return false;
    }
  }
  // A unicast address: the low bit of the first octet is the multicast bit.
  return (std::stoi(std::string(mac.substr(0, 2)), nullptr, 16) & 1) == 0;
}

bool valid_ifname(std::string_view n) {
  return n.size() < 16 && std::all_of(n.begin(), n.end(), [](char c) {
           return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
         });
}

Result<DiskSpec> disk_from(const json::object& o, const std::string& prefix) {
  if (auto ok = only_known(o, {"id", "path", "format", "bus", "read_only", "backing", "diskseq",
                               "serial"}, prefix);
      !ok) {
    return ok.error();
  }
  DiskSpec d;
  auto id = str(o, "id", true, prefix);
  if (!id) return id.error();
  d.id = *id;
  if (auto ok = check_id(d.id, prefix + "id"); !ok) return ok.error();
  auto path = str(o, "path", true, prefix);
  if (!path) return path.error();
  d.path = *path;
  if (auto ok = check_path(d.path, prefix + "path"); !ok) return ok.error();
  auto format = str(o, "format", false, prefix);
  if (!format) return format.error();
  if (*format == "qcow2") d.format = DiskFormat::qcow2;
  else if (!format->empty() && *format != "raw") return field_error(prefix + "format", "must be raw or qcow2");
  auto bus = str(o, "bus", false, prefix);
  if (!bus) return bus.error();
  if (*bus == "virtio") d.bus = DiskBus::virtio;
  else if (!bus->empty() && *bus != "scsi") return field_error(prefix + "bus", "must be scsi or virtio");
  auto ro = boolean(o, "read_only", false, prefix);
  if (!ro) return ro.error();
  d.read_only = *ro;
  auto backing = str(o, "backing", false, prefix);
  if (!backing) return backing.error();
  d.backing = *backing;
  if (!d.backing.empty()) {
    if (d.format != DiskFormat::qcow2) return field_error(prefix + "backing", "needs format qcow2");
    if (auto ok = check_path(d.backing, prefix + "backing"); !ok) return ok.error();
  }
  if (auto it = o.find("diskseq"); it != o.end()) {
    if (!it->value().is_uint64() && !(it->value().is_int64() && it->value().get_int64() > 0)) {
      return field_error(prefix + "diskseq", "must be a positive integer");
    }
    d.diskseq = it->value().to_number<std::uint64_t>();
  }
  auto serial = str(o, "serial", false, prefix);
  if (!serial) return serial.error();
  d.serial = *serial;
  if (d.serial.size() > 20 || !std::all_of(d.serial.begin(), d.serial.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_';
      })) {
    return field_error(prefix + "serial", "must be at most 20 characters of A-Z a-z 0-9 - _");
  }
  return d;
}

Result<NicSpec> nic_from(const json::object& o, const std::string& prefix) {
  if (auto ok = only_known(o, {"id", "tap", "mac"}, prefix); !ok) return ok.error();
  NicSpec n;
  auto id = str(o, "id", true, prefix);
  if (!id) return id.error();
  n.id = *id;
  if (auto ok = check_id(n.id, prefix + "id"); !ok) return ok.error();
  auto tap = str(o, "tap", false, prefix);
  if (!tap) return tap.error();
  n.tap = *tap;
  if (!valid_ifname(n.tap)) {
    return field_error(prefix + "tap", "must be an interface name of at most 15 characters");
  }
  auto mac = str(o, "mac", false, prefix);
  if (!mac) return mac.error();
  n.mac = *mac;
  if (!n.mac.empty() && !valid_mac(n.mac)) {
    return field_error(prefix + "mac", "must be a unicast MAC address like 52:54:00:12:34:56");
  }
  return n;
}

Result<VncSpec> vnc_from(const json::object& o, const std::string& prefix) {
  if (auto ok = only_known(o, {"listen"}, prefix); !ok) return ok.error();
  auto listen = str(o, "listen", true, prefix);
  if (!listen) return listen.error();
  auto parsed = VncListen::parse(*listen, prefix + "listen");
  if (!parsed) return parsed.error();
  return VncSpec{std::move(*parsed)};
}

}  // namespace

Result<VncListen> VncListen::parse(std::string_view text, std::string_view field) {
  const std::string f(field);
  VncListen l;
  if (text.starts_with("unix:")) {
    l.unix_path = std::string(text.substr(5));
    if (auto ok = check_path(l.unix_path, f); !ok) return ok.error();
    if (l.unix_path.size() >= 108) return field_error(f, "unix socket path is too long");
    return l;
  }
  auto colon = text.rfind(':');
  if (colon == std::string_view::npos || colon == 0 || colon + 1 == text.size()) {
    return field_error(f, "must be HOST:PORT or unix:/path");
  }
  std::string_view host = text.substr(0, colon);
  std::string_view port = text.substr(colon + 1);
  unsigned n = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), n);
  if (ec != std::errc() || end != port.data() + port.size() || n > 65535) {
    return field_error(f, "port must be 0-65535");
  }
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  l.host = std::string(host);
  l.port = static_cast<std::uint16_t>(n);
  return l;
}

std::string VncListen::text() const {
  if (is_unix()) return "unix:" + unix_path;
  const bool v6 = host.find(':') != std::string::npos;
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

Error field_error(std::string_view field, std::string message) {
  Error e(make_error_code(errc::invalid_argument), std::string(field) + ": " + message);
  e.field = std::string(field);
  return e;
}

Result<QmpPassthrough> parse_qmp_passthrough(const json::value& body) {
  if (!body.is_object()) return field_error("body", "must be a QMP command object {\"execute\": ...}");
  const auto& o = body.get_object();
  for (const auto& kv : o) {
    if (kv.key() != "execute" && kv.key() != "arguments") {
      return field_error(kv.key(), "unknown field (a QMP command has execute and arguments)");
    }
  }
  auto exec = o.find("execute");
  if (exec == o.end() || !exec->value().is_string()) {
    return field_error("execute", "must be the name of a QMP command");
  }
  QmpPassthrough p;
  p.execute = std::string(exec->value().get_string());
  if (qmp::cmd::is_fd_command(p.execute) || p.execute == "qmp_capabilities") {
    Error e(make_error_code(errc::forbidden),
            "execute: '" + p.execute +
                "' is not allowed through the passthrough: the broker owns every fd");
    e.field = "execute";
    return e;
  }
  if (auto a = o.find("arguments"); a != o.end()) {
    if (!a->value().is_object()) return field_error("arguments", "must be an object");
    p.arguments = a->value().get_object();
  }
  return p;
}

std::string_view to_string(DiskFormat f) { return f == DiskFormat::raw ? "raw" : "qcow2"; }
std::string_view to_string(DiskBus b) { return b == DiskBus::scsi ? "scsi" : "virtio"; }

namespace {

Result<CdromSpec> cdrom_from(const json::object& o, const std::string& prefix) {
  if (auto ok = only_known(o, {"id", "path"}, prefix); !ok) return ok.error();
  CdromSpec cd;
  auto id = str(o, "id", true, prefix);
  if (!id) return id.error();
  cd.id = *id;
  if (auto ok = check_id(cd.id, prefix + "id"); !ok) return ok.error();
  auto path = str(o, "path", false, prefix);
  if (!path) return path.error();
  cd.path = *path;
  if (!cd.path.empty()) {
    if (auto ok = check_path(cd.path, prefix + "path"); !ok) return ok.error();
  }
  return cd;
}

// The device list `key` of a create body ("disks": [...]), each entry parsed by `parse` with its
// index in the field names it blames ("disks[1].path"), every id unique across all lists.
template <class T, class Parse>
Result<void> device_list(const json::object& body, std::string_view key, Parse parse,
                         std::set<std::string>& ids, std::vector<T>& out) {
  auto it = body.find(key);
  if (it == body.end()) return {};
  if (!it->value().is_array()) return field_error(key, "must be an array");
  const auto& items = it->value().get_array();
  if (items.size() > 16) return field_error(key, "at most 16 entries");
  for (std::size_t i = 0; i < items.size(); ++i) {
    const std::string at = std::string(key) + "[" + std::to_string(i) + "]";
    auto obj = as_object(items[i], at);
    if (!obj) return obj.error();
    Result<T> item = parse(**obj, at + ".");
    if (!item) return item.error();
    if (!ids.insert(item->id).second) {
      return field_error(at + ".id", "duplicate device id '" + item->id + "'");
    }
    out.push_back(std::move(*item));
  }
  return {};
}

}  // namespace

Result<CreateDomain> parse_create_domain(const json::value& body) {
  auto spec = lifecycle::parse_domain_spec(body, {"cdroms", "disks", "nics", "vnc"});
  if (!spec) {
    Error e = spec.error();
    e.code = make_error_code(errc::invalid_argument);
    return e;
  }
  CreateDomain c;
  c.spec = std::move(*spec);
  const auto& o = body.get_object();
  std::set<std::string> ids;
  if (auto ok = device_list(o, "cdroms", cdrom_from, ids, c.cdroms); !ok) return ok.error();
  if (auto ok = device_list(o, "disks", disk_from, ids, c.disks); !ok) return ok.error();
  if (auto ok = device_list(o, "nics", nic_from, ids, c.nics); !ok) return ok.error();
  if (auto it = o.find("vnc"); it != o.end() && !it->value().is_null()) {
    auto obj = as_object(it->value(), "vnc");
    if (!obj) return obj.error();
    auto v = vnc_from(**obj, "vnc.");
    if (!v) return v.error();
    c.vnc = *v;
  }
  // Each id of boot_order names a disk or CD of this request, which boots at that place.
  for (std::uint32_t i = 0; i < c.spec.boot_order.size(); ++i) {
    const std::string& id = c.spec.boot_order[i];
    auto disk = std::find_if(c.disks.begin(), c.disks.end(), [&](const DiskSpec& x) { return x.id == id; });
    auto cd = std::find_if(c.cdroms.begin(), c.cdroms.end(), [&](const CdromSpec& x) { return x.id == id; });
    if (disk != c.disks.end()) {
      disk->bootindex = i + 1;
    } else if (cd != c.cdroms.end()) {
      cd->bootindex = i + 1;
    } else {
      return field_error("boot_order", "'" + id + "' is not a disk or CD drive of this domain");
    }
  }
  return c;
}

Result<InsertMedium> parse_insert_medium(const json::value& body) {
  auto o = as_object(body, "body");
  if (!o) return o.error();
  if (auto ok = only_known(**o, {"path", "force"}); !ok) return ok.error();
  InsertMedium m;
  auto path = str(**o, "path", true);
  if (!path) return path.error();
  m.path = *path;
  if (auto ok = check_path(m.path, "path"); !ok) return ok.error();
  auto force = boolean(**o, "force", false);
  if (!force) return force.error();
  m.force = *force;
  return m;
}

Result<bool> parse_force(const json::value& body) {
  if (body.is_null()) return false;
  auto o = as_object(body, "body");
  if (!o) return o.error();
  if (auto ok = only_known(**o, {"force"}); !ok) return ok.error();
  return boolean(**o, "force", false);
}

json::object to_json(const DiskSpec& d) {
  json::object o{{"id", d.id},
                 {"path", d.path},
                 {"format", d.format == DiskFormat::qcow2 ? "qcow2" : "raw"},
                 {"bus", d.bus == DiskBus::virtio ? "virtio" : "scsi"},
                 {"read_only", d.read_only}};
  if (!d.backing.empty()) o["backing"] = d.backing;
  if (d.diskseq) o["diskseq"] = *d.diskseq;
  if (!d.serial.empty()) o["serial"] = d.serial;
  return o;
}

json::object to_json(const NicSpec& n) {
  json::object o{{"id", n.id}};
  if (!n.tap.empty()) o["tap"] = n.tap;
  if (!n.mac.empty()) o["mac"] = n.mac;
  return o;
}

Result<DiskSpec> parse_disk(const json::value& body) {
  auto o = as_object(body, "body");
  if (!o) return o.error();
  return disk_from(**o, "");
}

Result<NicSpec> parse_nic(const json::value& body) {
  auto o = as_object(body, "body");
  if (!o) return o.error();
  return nic_from(**o, "");
}

Result<VncSpec> parse_vnc(const json::value& body) {
  auto o = as_object(body, "body");
  if (!o) return o.error();
  return vnc_from(**o, "");
}

Result<std::string> parse_path_body(const json::value& body) {
  auto o = as_object(body, "body");
  if (!o) return o.error();
  if (auto ok = only_known(**o, {"path"}); !ok) return ok.error();
  auto path = str(**o, "path", true);
  if (!path) return path.error();
  if (auto ok = check_path(*path, "path"); !ok) return ok.error();
  return *path;
}

Result<SaveRequest> parse_save(const json::value& body) {
  auto o = as_object(body, "body");
  if (!o) return o.error();
  if (auto ok = only_known(**o, {"path", "keep_running"}); !ok) return ok.error();
  SaveRequest r;
  auto path = str(**o, "path", true);
  if (!path) return path.error();
  r.path = *path;
  if (auto ok = check_path(r.path, "path"); !ok) return ok.error();
  auto keep = boolean(**o, "keep_running", false);
  if (!keep) return keep.error();
  r.keep_running = *keep;
  return r;
}

Result<RestoreRequest> parse_restore(const json::value& body) {
  auto o = as_object(body, "body");
  if (!o) return o.error();
  if (auto ok = only_known(**o, {"path", "name", "paused"}); !ok) return ok.error();
  RestoreRequest r;
  auto path = str(**o, "path", true);
  if (!path) return path.error();
  r.path = *path;
  if (auto ok = check_path(r.path, "path"); !ok) return ok.error();
  auto name = str(**o, "name", true);
  if (!name) return name.error();
  r.name = *name;
  if (auto ok = check_id(r.name, "name"); !ok) return ok.error();
  auto paused = boolean(**o, "paused", false);
  if (!paused) return paused.error();
  r.paused = *paused;
  return r;
}

Result<IncomingDomain> parse_incoming(const json::value& body) {
  auto o = as_object(body, "body");
  if (!o) return o.error();
  if (auto ok = only_known(**o, {"domain", "paused", "copy_storage"}); !ok) return ok.error();
  const auto* domain = (*o)->if_contains("domain");
  if (domain == nullptr) return field_error("domain", "is required");
  if (!domain->is_object()) return field_error("domain", "must be an object");
  auto paused = boolean(**o, "paused", false);
  if (!paused) return paused.error();
  auto copy = boolean(**o, "copy_storage", false);
  if (!copy) return copy.error();
  return IncomingDomain{*domain, *paused, *copy};
}

Result<MigrateRequest> parse_migrate(const json::value& body) {
  auto o = as_object(body, "body");
  if (!o) return o.error();
  if (auto ok = only_known(**o, {"to", "copy_storage", "disk_paths"}); !ok) return ok.error();
  auto to = str(**o, "to", true);
  if (!to) return to.error();
  if (to->empty()) return field_error("to", "must name another broker's endpoint");
  auto copy = boolean(**o, "copy_storage", false);
  if (!copy) return copy.error();
  MigrateRequest req{std::move(*to), *copy, {}};
  const auto* paths = (*o)->if_contains("disk_paths");
  if (paths == nullptr) return req;
  if (!req.copy_storage) return field_error("disk_paths", "needs copy_storage: true");
  if (!paths->is_object()) return field_error("disk_paths", "must be an object of disk id to path");
  for (const auto& kv : paths->get_object()) {
    const std::string field = "disk_paths." + std::string(kv.key());
    if (auto ok = check_id(std::string(kv.key()), field); !ok) return ok.error();
    if (!kv.value().is_string()) return field_error(field, "must be a string");
    std::string path(kv.value().get_string());
    if (auto ok = check_path(path, field); !ok) return ok.error();
    req.disk_paths.emplace(std::string(kv.key()), std::move(path));
  }
  return req;
}

}  // namespace broker
