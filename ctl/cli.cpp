#include "ctl/cli.hpp"

#include <algorithm>
#include <array>
#include <boost/json.hpp>
#include <boost/url/encode.hpp>
#include <boost/url/rfc/unreserved_chars.hpp>
#include <boost/url/url.hpp>
#include <charconv>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <map>
#include <sstream>

namespace qbctl {
namespace json = boost::json;
namespace urls = boost::urls;
namespace {

constexpr std::array kCommands{
    CommandInfo{"version", "", "GET", "/v1/version", "broker and QEMU versions, QEMU capabilities"},
    CommandInfo{"list", "", "GET", "/v1/domains", "list domains (also: domain list)"},
    CommandInfo{"create",
                "NAME [--memory MIB] [--vcpus N] [--kernel PATH] [--initrd PATH] [--append ARGS]\n"
                "       [--machine q35|none] [--accel auto|kvm|tcg] [--pci-slots N] [--paused]\n"
                "       [--firmware bios|uefi] [--secure-boot] [--nvram PATH] [--boot ID[,ID]...]\n"
                "       [--cdrom ID[=PATH]]... [--disk "
                "id=ID,path=PATH[,format=raw|qcow2][,bus=scsi|virtio][,ro]]...\n"
                "       [--nic id=ID[,tap=TAP][,mac=MAC]]... [--vnc LISTEN]\n"
                "       [--from-json FILE|-]",
                "POST", "/v1/domains", "create and start a domain (also: domain create)"},
    CommandInfo{"show", "NAME [--no-live]", "GET", "/v1/domains/{name}",
                "state, uid, pid, devices and live QEMU status (also: domain show)"},
    CommandInfo{"destroy", "NAME [--graceful] [--purge-nvram]", "DELETE", "/v1/domains/{name}",
                "kill the domain by uid, free everything, print the kill report"},
    CommandInfo{"pause", "NAME", "POST", "/v1/domains/{name}/pause", "pause the guest"},
    CommandInfo{"resume", "NAME", "POST", "/v1/domains/{name}/resume", "resume the guest"},
    CommandInfo{"shutdown", "NAME", "POST", "/v1/domains/{name}/shutdown",
                "press the ACPI power button"},
    CommandInfo{"reset", "NAME", "POST", "/v1/domains/{name}/reset", "reset the machine"},
    CommandInfo{"cdrom insert", "NAME CD PATH [--force]", "PUT",
                "/v1/domains/{name}/cdroms/{id}/medium",
                "insert a medium (the broker opens PATH read-only)"},
    CommandInfo{"cdrom eject", "NAME CD [--force]", "DELETE",
                "/v1/domains/{name}/cdroms/{id}/medium",
                "eject the medium (--force overrides a guest's tray lock)"},
    CommandInfo{"disk add",
                "NAME ID PATH [--format raw|qcow2] [--bus scsi|virtio] [--read-only]\n"
                "       [--backing PATH] [--diskseq N] [--serial S]",
                "POST", "/v1/domains/{name}/disks", "hotplug a disk"},
    CommandInfo{"disk remove", "NAME ID", "DELETE", "/v1/domains/{name}/disks/{id}",
                "unplug a disk (waits for the guest, with a progress bar)"},
    CommandInfo{"nic add", "NAME ID [--tap TAP] [--mac MAC]", "POST", "/v1/domains/{name}/nics",
                "hotplug a NIC"},
    CommandInfo{"nic remove", "NAME ID", "DELETE", "/v1/domains/{name}/nics/{id}",
                "unplug a NIC (waits for the guest, with a progress bar)"},
    CommandInfo{"vnc set", "NAME LISTEN", "PUT", "/v1/domains/{name}/vnc",
                "VNC on LISTEN: 127.0.0.1:5901, [::1]:0 or unix:/path"},
    CommandInfo{"vnc remove", "NAME", "DELETE", "/v1/domains/{name}/vnc",
                "remove the VNC listener"},
    CommandInfo{"save", "NAME PATH [--keep-running]", "POST", "/v1/domains/{name}/save",
                "save the domain's state to PATH, then destroy it unless --keep-running"},
    CommandInfo{"restore", "NAME PATH [--paused]", "POST", "/v1/domains/restore",
                "start domain NAME from a state saved at PATH"},
    CommandInfo{"migrate", "NAME TO [--copy-storage] [--disk-path ID=PATH]...", "POST",
                "/v1/domains/{name}/migrate",
                "live-migrate to another broker: TO its API socket, tcp://HOST:PORT on another "
                "host, or local (a fresh QEMU here); --copy-storage mirrors the writable disks "
                "into the destination's own images, at PATH for disk ID"},
    CommandInfo{"incoming", "FILE [--paused]", "POST", "/v1/migrations",
                "prepare to receive the domain FILE describes (- for stdin), as a migrating broker "
                "asks; prints the one-time token and endpoint"},
    CommandInfo{"cancel", "NAME", "DELETE", "/v1/domains/{name}/job",
                "cancel the domain's save, restore or live update"},
    CommandInfo{"qmp", "NAME JSON|COMMAND", "POST", "/v1/domains/{name}/qmp",
                "raw QMP for admins: '{\"execute\":\"query-status\"}' or just query-status"},
    CommandInfo{"events", "[--domain NAME] [--count N]", "GET", "/v1/events",
                "follow broker and QEMU events (one JSON per line with --json)"},
    CommandInfo{"metrics", "", "GET", "/metrics", "the daemon's metrics, in Prometheus text"},
    CommandInfo{"xen", "", "GET", "/v1/xen",
                "the Xen mode's device models: domid, uid, pid, backend disks and their states"},
    CommandInfo{"pool", "", "GET", "/v1/pool",
                "the warm pool: each shape, its QEMUs ready (uid, pid, since), hits and misses"},
    CommandInfo{"top", "[--interval SECONDS] [--count N]", "GET", "/v1/domains",
                "a live table of domains: state, uid, CPU, memory, job and progress (q quits)"},
};

constexpr std::array kGlobalFlags{
    GlobalFlag{"--socket", "PATH",
               "qbrokerd's socket ($QBROKER_SOCKET, /run/qbroker/qbroker.sock)"},
    GlobalFlag{"--json", "", "print the API's JSON replies as they are, for scripts"},
    GlobalFlag{"--timeout", "SECONDS", "give up on a request after this long (default 300)"},
    GlobalFlag{"--no-progress", "", "no progress bar for long jobs"},
    GlobalFlag{"--help", "", "this text; after a command, that command's usage (also -h)"},
    GlobalFlag{"--version", "", "print qbrokerctl's version"},
};

struct Args {
  std::vector<std::string> pos;
  std::map<std::string, std::vector<std::string>> flags;
  bool has(std::string_view f) const { return flags.contains(std::string(f)); }
  std::optional<std::string> one(std::string_view f) const {
    auto it = flags.find(std::string(f));
    if (it == flags.end() || it->second.empty()) return std::nullopt;
    return it->second.back();
  }
};

// A request target built with Boost.URL. Segments and query values are percent-encoded down
// to RFC 3986's unreserved characters, so a name holding '/', '?' or '%' stays one segment and
// reaches the server (which refuses it) intact.
class Target {
 public:
  explicit Target(std::string_view path) : url_(path) {}
  Target& segment(std::string_view s) {
    auto text = urls::encode(s, urls::unreserved_chars);
    url_.encoded_segments().push_back(urls::pct_string_view(text));
    return *this;
  }
  Target& query(std::string_view key, std::string_view value) {
    auto k = urls::encode(key, urls::unreserved_chars);
    auto v = urls::encode(value, urls::unreserved_chars);
    url_.encoded_params().append(
        urls::param_pct_view(urls::pct_string_view(k), urls::pct_string_view(v)));
    return *this;
  }
  std::string str() const { return std::string(url_.buffer()); }

 private:
  urls::url url_;
};

Target domain_target(std::string_view name) {
  Target target("/v1/domains");
  target.segment(name);
  return target;
}

bool global_flag(std::span<const std::string> args, std::size_t& i, GlobalOptions& g,
                 std::optional<CliError>& err) {
  const std::string& a = args[i];
  auto value = [&](std::string_view name) -> std::optional<std::string> {
    std::string prefix = std::string(name) + "=";
    if (a.rfind(prefix, 0) == 0) return a.substr(prefix.size());
    if (i + 1 >= args.size()) {
      err = CliError{std::string(name) + ": needs a value", std::string(name)};
      return std::nullopt;
    }
    return args[++i];
  };
  if (a == "--json") return g.json = true;
  if (a == "--no-progress") {
    g.progress = false;
    return true;
  }
  if (a == "-h" || a == "--help") return g.help = true;
  if (a == "--version") return g.version = true;
  if (a == "--socket" || a.rfind("--socket=", 0) == 0) {
    if (auto v = value("--socket")) g.socket = *v;
    return true;
  }
  if (a == "--timeout" || a.rfind("--timeout=", 0) == 0) {
    if (auto v = value("--timeout")) {
      try {
        std::size_t used = 0;
        g.timeout_s = std::stod(*v, &used);
        if (used != v->size() || g.timeout_s <= 0) throw std::invalid_argument("timeout");
      } catch (const std::exception&) {
        err = CliError{"--timeout: must be a positive number of seconds", "--timeout"};
      }
    }
    return true;
  }
  return false;
}

std::variant<Args, CliError> scan(std::span<const std::string> args, std::size_t from,
                                  std::span<const FlagSpec> specs, GlobalOptions& g) {
  Args out;
  bool only_positional = false;
  for (std::size_t i = from; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (only_positional || a.size() < 2 || a[0] != '-' || a == "-") {
      out.pos.push_back(a);
      continue;
    }
    if (a == "--") {
      only_positional = true;
      continue;
    }
    std::optional<CliError> err;
    if (global_flag(args, i, g, err)) {
      if (err) return *err;
      continue;
    }
    std::string name = a;
    std::optional<std::string> value;
    if (auto eq = a.find('='); eq != std::string::npos) {
      name = a.substr(0, eq);
      value = a.substr(eq + 1);
    }
    auto spec =
        std::find_if(specs.begin(), specs.end(), [&](const FlagSpec& f) { return f.name == name; });
    if (spec == specs.end())
      return CliError{name + ": unknown option for this command (see --help)", name};
    if (spec->value && !value) {
      if (i + 1 >= args.size()) return CliError{name + ": needs a value", name};
      value = args[++i];
    }
    if (!spec->value && value) return CliError{name + ": takes no value", name};
    out.flags[name].push_back(value.value_or(""));
  }
  return out;
}

std::optional<CliError> positional(const Args& a, std::span<const std::string_view> names,
                                   std::size_t optional_tail = 0) {
  std::size_t required = names.size() - optional_tail;
  if (a.pos.size() < required) {
    auto missing = *(names.begin() + a.pos.size());
    return CliError{std::string(missing) + ": missing (see --help)", std::string(missing)};
  }
  if (a.pos.size() > names.size()) {
    return CliError{"'" + a.pos[names.size()] + "': unexpected argument", a.pos[names.size()]};
  }
  return std::nullopt;
}

std::optional<CliError> set_number(json::object& o, const Args& a, std::string_view flag,
                                   std::string_view key) {
  auto v = a.one(flag);
  if (!v) return std::nullopt;
  std::uint64_t n = 0;
  auto [p, ec] = std::from_chars(v->data(), v->data() + v->size(), n);
  if (ec != std::errc() || p != v->data() + v->size()) {
    return CliError{std::string(flag) + ": must be a whole number, not '" + *v + "'",
                    std::string(flag)};
  }
  o[key] = n;
  return std::nullopt;
}

// "id=d1,path=/x,format=raw,ro" -> object; bare words are boolean flags.
std::variant<json::object, CliError> kv_list(std::string_view flag, std::string_view text,
                                             std::span<const std::string_view> keys) {
  json::object o;
  std::stringstream ss{std::string(text)};
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    auto eq = item.find('=');
    std::string key = item.substr(0, eq);
    if (key == "ro" || key == "readonly") key = "read_only";
    if (std::find(keys.begin(), keys.end(), key) == keys.end()) {
      return CliError{std::string(flag) + ": unknown key '" + key + "' (keys: " +
                          [&] {
                            std::string k;
                            for (auto x : keys) k += (k.empty() ? "" : ", ") + std::string(x);
                            return k;
                          }() +
                          ")",
                      std::string(flag)};
    }
    if (eq == std::string::npos) {
      o[key] = true;
      continue;
    }
    std::string value = item.substr(eq + 1);
    if (key == "read_only") {
      o[key] = value == "true" || value == "1" || value == "on" || value == "yes";
    } else if (key == "diskseq") {
      try {
        o[key] = std::stoull(value);
      } catch (const std::exception&) {
        return CliError{std::string(flag) + ": diskseq must be a number", std::string(flag)};
      }
    } else {
      o[key] = value;
    }
  }
  return o;
}

std::variant<json::value, CliError> read_json_file(const std::string& path) {
  std::string text;
  if (path == "-") {
    text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  } else {
    std::ifstream in(path);
    if (!in) return CliError{"--from-json: cannot read " + path, "--from-json"};
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  std::error_code ec;
  json::value v = json::parse(text, ec);
  if (ec)
    return CliError{"--from-json: " + path + " is not valid JSON: " + ec.message(), "--from-json"};
  if (!v.is_object())
    return CliError{"--from-json: " + path + " must hold a JSON object", "--from-json"};
  return v;
}

using Out = std::variant<Invocation, CliError>;
using Builder = std::function<Out(const Args&)>;

// --count N into inv.events_count (events: events shown; top: refreshes).
std::optional<CliError> read_count(const Args& a, Invocation& inv) {
  auto c = a.one("--count");
  if (!c) return std::nullopt;
  try {
    std::size_t used = 0;
    inv.events_count = std::stol(*c, &used);
    if (used != c->size() || inv.events_count < 1) throw std::invalid_argument("count");
  } catch (const std::exception&) {
    return CliError{"--count: must be a positive number", "--count"};
  }
  return std::nullopt;
}

// ---- One builder per subcommand: validated arguments -> the request -----------------------------

Out version(const Args&) {
  return Invocation{.method = "GET", .target = "/v1/version", .view = View::version};
}

Out metrics(const Args&) {
  return Invocation{.method = "GET", .target = "/metrics", .view = View::text};
}

Out xen(const Args&) {
  return Invocation{.method = "GET", .target = "/v1/xen", .view = View::xen};
}

Out pool(const Args&) {
  return Invocation{.method = "GET", .target = "/v1/pool", .view = View::pool};
}

Out top(const Args& a) {
  Invocation inv{.method = "GET", .target = "/v1/domains?usage=true", .view = View::top};
  if (auto i = a.one("--interval")) {
    try {
      std::size_t used = 0;
      inv.interval_s = std::stod(*i, &used);
      if (used != i->size() || !(inv.interval_s >= 0.1 && inv.interval_s <= 3600)) {
        throw std::invalid_argument("interval");
      }
    } catch (const std::exception&) {
      return CliError{"--interval: must be between 0.1 and 3600 seconds", "--interval"};
    }
  }
  if (auto bad = read_count(a, inv)) return *bad;
  return inv;
}

Out list(const Args&) {
  return Invocation{.method = "GET", .target = "/v1/domains", .view = View::domains};
}

// --memory, --vcpus, --kernel and the other scalar fields of a create body.
std::optional<CliError> machine_fields(json::object& body, const Args& a) {
  if (auto e = set_number(body, a, "--memory", "memory_mib")) return e;
  if (auto e = set_number(body, a, "--vcpus", "vcpus")) return e;
  if (auto e = set_number(body, a, "--pci-slots", "pci_slots")) return e;
  for (auto [flag, key] : {std::pair{"--kernel", "kernel"}, std::pair{"--initrd", "initrd"},
                           std::pair{"--append", "append"}, std::pair{"--machine", "machine"},
                           std::pair{"--accel", "accel"}, std::pair{"--firmware", "firmware"},
                           std::pair{"--nvram", "nvram"}}) {
    if (auto v = a.one(flag)) body[key] = *v;
  }
  if (a.has("--paused")) body["paused"] = true;
  if (a.has("--secure-boot")) body["secure_boot"] = true;
  if (auto v = a.one("--boot")) {
    json::array order;
    for (std::size_t start = 0; start <= v->size();) {
      const auto comma = std::min(v->find(',', start), v->size());
      order.emplace_back(v->substr(start, comma - start));
      start = comma + 1;
    }
    body["boot_order"] = std::move(order);
  }
  if (auto v = a.one("--vnc")) body["vnc"] = json::object{{"listen", *v}};
  return std::nullopt;
}

// --cdrom ID[=PATH], --disk k=v,... and --nic k=v,..., each repeatable, as the body's lists.
std::optional<CliError> device_lists(json::object& body, const Args& a) {
  if (a.has("--cdrom")) {
    json::array cds;
    for (const auto& c : a.flags.at("--cdrom")) {
      auto eq = c.find('=');
      json::object o{{"id", c.substr(0, eq)}};
      if (eq != std::string::npos) o["path"] = c.substr(eq + 1);
      cds.push_back(std::move(o));
    }
    body["cdroms"] = std::move(cds);
  }
  static constexpr std::string_view kDiskKeys[] = {"id",        "path",    "format",  "bus",
                                                   "read_only", "backing", "diskseq", "serial"};
  static constexpr std::string_view kNicKeys[] = {"id", "tap", "mac"};
  for (auto [flag, key, keys] :
       {std::tuple{"--disk", "disks", std::span<const std::string_view>(kDiskKeys)},
        std::tuple{"--nic", "nics", std::span<const std::string_view>(kNicKeys)}}) {
    if (!a.has(flag)) continue;
    json::array items;
    for (const auto& spec : a.flags.at(flag)) {
      auto o = kv_list(flag, spec, keys);
      if (auto* e = std::get_if<CliError>(&o)) return *e;
      items.push_back(std::get<json::object>(o));
    }
    body[key] = std::move(items);
  }
  return std::nullopt;
}

// NAME and the flags go over --from-json's object: the command line has the last word.
Out create(const Args& a) {
  json::object body;
  if (auto file = a.one("--from-json")) {
    auto v = read_json_file(*file);
    if (auto* e = std::get_if<CliError>(&v)) return *e;
    body = std::get<json::value>(v).get_object();
  } else if (a.pos.empty()) {
    return CliError{"NAME: missing (see --help)", "NAME"};
  }
  if (!a.pos.empty()) body["name"] = a.pos[0];
  if (auto e = machine_fields(body, a)) return *e;
  if (auto e = device_lists(body, a)) return *e;
  if (!body.contains("name"))
    return CliError{"NAME: missing (as an argument or in the JSON)", "NAME"};
  std::string name = body["name"].is_string() ? std::string(body["name"].get_string()) : "";
  return Invocation{.method = "POST",
                    .target = "/v1/domains",
                    .body = json::value(std::move(body)),
                    .view = View::domain,
                    .domain = std::move(name)};
}

Out show(const Args& a) {
  auto target = domain_target(a.pos[0]);
  if (a.has("--no-live")) target.query("live", "false");
  return Invocation{
      .method = "GET", .target = target.str(), .view = View::domain, .domain = a.pos[0]};
}

Out destroy(const Args& a) {
  auto target = domain_target(a.pos[0]);
  if (a.has("--graceful")) target.query("graceful", "true");
  if (a.has("--purge-nvram")) target.query("purge_nvram", "true");
  return Invocation{
      .method = "DELETE", .target = target.str(), .view = View::killed, .domain = a.pos[0]};
}

// pause, resume, shutdown, reset: POST /v1/domains/NAME/VERB, then "DONE NAME".
Builder run_state(std::string_view verb, std::string_view done) {
  return [verb, done](const Args& a) -> Out {
    return Invocation{.method = "POST",
                      .target = domain_target(a.pos[0]).segment(verb).str(),
                      .view = View::message,
                      .domain = a.pos[0],
                      .done = std::string(done) + " " + a.pos[0]};
  };
}

// /v1/domains/NAME/cdroms/CD/medium
std::string medium_target(std::string_view name, std::string_view cd) {
  return domain_target(name).segment("cdroms").segment(cd).segment("medium").str();
}

Out cdrom_insert(const Args& a) {
  json::object body{{"path", a.pos[2]}};
  if (a.has("--force")) body["force"] = true;
  return Invocation{.method = "PUT",
                    .target = medium_target(a.pos[0], a.pos[1]),
                    .body = json::value(std::move(body)),
                    .view = View::message,
                    .domain = a.pos[0],
                    .done = "inserted " + a.pos[2] + " into " + a.pos[0] + " " + a.pos[1]};
}

Out cdrom_eject(const Args& a) {
  std::optional<json::value> body;
  if (a.has("--force")) body = json::object{{"force", true}};
  return Invocation{.method = "DELETE",
                    .target = medium_target(a.pos[0], a.pos[1]),
                    .body = std::move(body),
                    .view = View::message,
                    .domain = a.pos[0],
                    .done = "ejected the medium of " + a.pos[0] + " " + a.pos[1]};
}

Out disk_add(const Args& a) {
  json::object body{{"id", a.pos[1]}, {"path", a.pos[2]}};
  for (auto [flag, key] : {std::pair{"--format", "format"}, std::pair{"--bus", "bus"},
                           std::pair{"--backing", "backing"}, std::pair{"--serial", "serial"}}) {
    if (auto v = a.one(flag)) body[key] = *v;
  }
  if (a.has("--read-only")) body["read_only"] = true;
  if (auto e = set_number(body, a, "--diskseq", "diskseq")) return *e;
  return Invocation{.method = "POST",
                    .target = domain_target(a.pos[0]).segment("disks").str(),
                    .body = json::value(std::move(body)),
                    .view = View::message,
                    .domain = a.pos[0],
                    .done = "added disk " + a.pos[1] + " to " + a.pos[0]};
}

Out nic_add(const Args& a) {
  json::object body{{"id", a.pos[1]}};
  if (auto v = a.one("--tap")) body["tap"] = *v;
  if (auto v = a.one("--mac")) body["mac"] = *v;
  return Invocation{.method = "POST",
                    .target = domain_target(a.pos[0]).segment("nics").str(),
                    .body = json::value(std::move(body)),
                    .view = View::message,
                    .domain = a.pos[0],
                    .done = "added nic " + a.pos[1] + " to " + a.pos[0]};
}

// disk remove, nic remove: the guest has to let go, so progress is shown.
Builder remove_device(std::string_view group, std::string_view collection) {
  return [group, collection](const Args& a) -> Out {
    return Invocation{
        .method = "DELETE",
        .target = domain_target(a.pos[0]).segment(collection).segment(a.pos[1]).str(),
        .view = View::message,
        .domain = a.pos[0],
        .progress_job = std::string(group) + "-remove",
        .done = "removed " + std::string(group) + " " + a.pos[1] + " from " + a.pos[0]};
  };
}

Out vnc_set(const Args& a) {
  return Invocation{.method = "PUT",
                    .target = domain_target(a.pos[0]).segment("vnc").str(),
                    .body = json::value(json::object{{"listen", a.pos[1]}}),
                    .view = View::vnc,
                    .domain = a.pos[0]};
}

Out vnc_remove(const Args& a) {
  return Invocation{.method = "DELETE",
                    .target = domain_target(a.pos[0]).segment("vnc").str(),
                    .view = View::message,
                    .domain = a.pos[0],
                    .done = "removed the VNC listener of " + a.pos[0]};
}

Out save(const Args& a) {
  json::object body{{"path", a.pos[1]}};
  if (a.has("--keep-running")) body["keep_running"] = true;
  return Invocation{.method = "POST",
                    .target = domain_target(a.pos[0]).segment("save").str(),
                    .body = json::value(std::move(body)),
                    .view = View::message,
                    .domain = a.pos[0],
                    .progress_job = "save",
                    .done = "saved " + a.pos[0] + " to " + a.pos[1]};
}

Out migrate(const Args& a) {
  json::object body{{"to", a.pos[1]}};
  if (a.has("--copy-storage")) body["copy_storage"] = true;
  if (auto it = a.flags.find("--disk-path"); it != a.flags.end()) {
    json::object paths;
    for (const auto& v : it->second) {
      const auto eq = v.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == v.size()) {
        return CliError{"--disk-path takes ID=PATH, not '" + v + "'", "--disk-path"};
      }
      paths[v.substr(0, eq)] = v.substr(eq + 1);
    }
    body["disk_paths"] = std::move(paths);
  }
  return Invocation{.method = "POST",
                    .target = domain_target(a.pos[0]).segment("migrate").str(),
                    .body = json::value(std::move(body)),
                    .view = View::message,
                    .domain = a.pos[0],
                    .progress_job = a.pos[1] == "local" ? "live-update" : "migrate",
                    .done = "migrated " + a.pos[0] + " to " + a.pos[1]};
}

Out incoming(const Args& a) {
  auto described = read_json_file(a.pos[0]);
  if (auto* e = std::get_if<CliError>(&described)) {
    return CliError{"FILE: " + e->message.substr(e->message.find(':') + 2), "FILE"};
  }
  json::object body{{"domain", std::get<json::value>(std::move(described))}};
  if (a.has("--paused")) body["paused"] = true;
  return Invocation{.method = "POST",
                    .target = "/v1/migrations",
                    .body = json::value(std::move(body)),
                    .view = View::qmp};
}

Out cancel(const Args& a) {
  return Invocation{.method = "DELETE",
                    .target = domain_target(a.pos[0]).segment("job").str(),
                    .view = View::message,
                    .domain = a.pos[0],
                    .done = "cancelling the job of " + a.pos[0]};
}

Out restore(const Args& a) {
  json::object body{{"name", a.pos[0]}, {"path", a.pos[1]}};
  if (a.has("--paused")) body["paused"] = true;
  return Invocation{.method = "POST",
                    .target = "/v1/domains/restore",
                    .body = json::value(std::move(body)),
                    .view = View::domain,
                    .domain = a.pos[0],
                    .progress_job = "restore"};
}

// A JSON object is sent as it is; a bare word is the command to execute.
Out qmp(const Args& a) {
  json::value body;
  const std::string& text = a.pos[1];
  if (!text.empty() && text.front() == '{') {
    std::error_code ec;
    body = json::parse(text, ec);
    if (ec) return CliError{"JSON: not valid JSON: " + ec.message(), "JSON"};
  } else {
    body = json::object{{"execute", text}};
  }
  return Invocation{.method = "POST",
                    .target = domain_target(a.pos[0]).segment("qmp").str(),
                    .body = std::move(body),
                    .view = View::qmp,
                    .domain = a.pos[0]};
}

Out events(const Args& a) {
  Invocation inv{.method = "GET", .target = events_target(""), .view = View::events};
  if (auto d = a.one("--domain")) {
    inv.events_domain = *d;
    inv.target = events_target(*d);
  }
  if (auto bad = read_count(a, inv)) return *bad;
  return inv;
}

// ---- The subcommand table ---------------------------------------------------------------------

// How one subcommand is read: the flags it takes, its positional arguments, and its builder.
// The words are those of kCommands, which describes the same subcommands for --help.
struct Syntax {
  std::string_view words;
  std::vector<FlagSpec> flags;
  std::vector<std::string_view> positional;
  std::size_t optional_tail = 0;  // how many of the last positional arguments may be left out
  bool domain_alias = false;      // also answers as "domain WORDS"
  Builder build;
};

const std::vector<Syntax>& syntaxes() {
  static const std::vector<Syntax> kSyntax = {
      {"version", {}, {}, 0, false, version},
      {"list", {}, {}, 0, true, list},
      {"create",
       {{"--memory", true},
        {"--vcpus", true},
        {"--kernel", true},
        {"--initrd", true},
        {"--append", true},
        {"--machine", true},
        {"--accel", true},
        {"--pci-slots", true},
        {"--paused", false},
        {"--firmware", true},
        {"--secure-boot", false},
        {"--nvram", true},
        {"--boot", true},
        {"--cdrom", true},
        {"--disk", true},
        {"--nic", true},
        {"--vnc", true},
        {"--from-json", true}},
       {"NAME"},
       1,  // NAME may come from --from-json
       true,
       create},
      {"show", {{"--no-live", false}}, {"NAME"}, 0, true, show},
      {"destroy", {{"--graceful", false}, {"--purge-nvram", false}}, {"NAME"}, 0, true, destroy},
      {"pause", {}, {"NAME"}, 0, true, run_state("pause", "paused")},
      {"resume", {}, {"NAME"}, 0, true, run_state("resume", "resumed")},
      {"shutdown", {}, {"NAME"}, 0, true, run_state("shutdown", "sent the ACPI power button to")},
      {"reset", {}, {"NAME"}, 0, true, run_state("reset", "reset")},
      {"cdrom insert", {{"--force", false}}, {"NAME", "CD", "PATH"}, 0, false, cdrom_insert},
      {"cdrom eject", {{"--force", false}}, {"NAME", "CD"}, 0, false, cdrom_eject},
      {"disk add",
       {{"--format", true},
        {"--bus", true},
        {"--read-only", false},
        {"--backing", true},
        {"--diskseq", true},
        {"--serial", true}},
       {"NAME", "ID", "PATH"},
       0,
       false,
       disk_add},
      {"disk remove", {}, {"NAME", "ID"}, 0, false, remove_device("disk", "disks")},
      {"nic add", {{"--tap", true}, {"--mac", true}}, {"NAME", "ID"}, 0, false, nic_add},
      {"nic remove", {}, {"NAME", "ID"}, 0, false, remove_device("nic", "nics")},
      {"vnc set", {}, {"NAME", "LISTEN"}, 0, false, vnc_set},
      {"vnc remove", {}, {"NAME"}, 0, false, vnc_remove},
      {"save", {{"--keep-running", false}}, {"NAME", "PATH"}, 0, false, save},
      {"restore", {{"--paused", false}}, {"NAME", "PATH"}, 0, false, restore},
      {"migrate", {{"--copy-storage", false}, {"--disk-path", true}}, {"NAME", "TO"}, 0, false, migrate},
      {"incoming", {{"--paused", false}}, {"FILE"}, 0, false, incoming},
      {"cancel", {}, {"NAME"}, 0, false, cancel},
      {"qmp", {}, {"NAME", "JSON"}, 0, false, qmp},
      {"events", {{"--domain", true}, {"--count", true}}, {}, 0, false, events},
      {"metrics", {}, {}, 0, false, metrics},
      {"xen", {}, {}, 0, false, xen},
      {"pool", {}, {}, 0, false, pool},
      {"top", {{"--interval", true}, {"--count", true}}, {}, 0, false, top},
  };
  return kSyntax;
}

const Syntax* find_syntax(std::string_view words) {
  static const std::map<std::string_view, std::string_view> kAliases{{"ls", "list"},
                                                                     {"info", "show"}};
  if (auto it = kAliases.find(words); it != kAliases.end()) words = it->second;
  const auto& all = syntaxes();
  auto it = std::find_if(all.begin(), all.end(), [&](const Syntax& s) { return s.words == words; });
  return it == all.end() ? nullptr : &*it;
}

// The subcommand named at args[i]: its syntax and where its own arguments start.
using Resolved = std::variant<std::pair<const Syntax*, std::size_t>, CliError>;

CliError unknown_command(const std::string& word) {
  return CliError{"'" + word + "': unknown command (see --help)", word};
}

// "cdrom insert", "disk remove", ...: a device group and its verb.
Resolved resolve_group(std::span<const std::string> args, std::size_t i) {
  const std::string& group = args[i];
  if (i + 1 >= args.size()) {
    return CliError{group + ": needs a subcommand (see qbrokerctl help " + group + ")", group};
  }
  const std::string& sub = args[i + 1];
  const Syntax* s = find_syntax(group + " " + sub);
  if (s == nullptr) {
    return CliError{
        "'" + group + " " + sub + "': unknown command (see qbrokerctl help " + group + ")", sub};
  }
  return std::pair{s, i + 2};
}

Resolved resolve(std::span<const std::string> args, std::size_t i) {
  const std::string& word = args[i];
  if (word == "cdrom" || word == "disk" || word == "nic" || word == "vnc") {
    return resolve_group(args, i);
  }
  if (word == "domain") {
    if (i + 1 >= args.size()) return CliError{"domain: needs a subcommand (see --help)", "domain"};
    const Syntax* s = find_syntax(args[i + 1]);
    if (s == nullptr || !s->domain_alias) return unknown_command(args[i + 1]);
    return std::pair{s, i + 2};
  }
  const Syntax* s = find_syntax(word);
  if (s == nullptr) return unknown_command(word);
  return std::pair{s, i + 1};
}

// Reads the subcommand's flags and arguments (global flags may come between them) and builds
// its request.
Out invocation(std::span<const std::string> args, std::size_t i, GlobalOptions& g) {
  auto resolved = resolve(args, i);
  if (auto* e = std::get_if<CliError>(&resolved)) return *e;
  auto [syntax, from] = std::get<0>(resolved);
  auto scanned = scan(args, from, syntax->flags, g);
  if (auto* e = std::get_if<CliError>(&scanned)) return *e;
  const auto& a = std::get<Args>(scanned);
  if (auto e = positional(a, syntax->positional, syntax->optional_tail)) return *e;
  return syntax->build(a);
}

// "qbrokerctl disk add --help": help for that command.
bool wants_help(std::span<const std::string> args, std::size_t from) {
  auto rest = args.subspan(from);
  return std::find(rest.begin(), rest.end(), "--help") != rest.end() ||
         std::find(rest.begin(), rest.end(), "-h") != rest.end();
}

}  // namespace

std::string events_target(std::string_view domain) {
  Target target("/v1/events");
  if (!domain.empty()) target.query("domain", domain);
  return target.str();
}

std::variant<Parsed, CliError> parse(std::span<const std::string> args,
                                     std::string_view env_socket) {
  Parsed p;
  if (!env_socket.empty()) p.global.socket = std::string(env_socket);
  std::size_t i = 0;
  for (; i < args.size(); ++i) {
    std::optional<CliError> err;
    if (!global_flag(args, i, p.global, err)) break;
    if (err) return *err;
  }
  if (i >= args.size()) {
    if (!p.global.help && !p.global.version) p.global.help = true;
    return p;
  }
  const std::string& cmd = args[i];
  if (!cmd.empty() && cmd[0] == '-') return CliError{cmd + ": unknown option (see --help)", cmd};
  if (cmd == "help") {
    p.global.help = true;
    p.help_topic.assign(args.begin() + static_cast<std::ptrdiff_t>(i) + 1, args.end());
    return p;
  }
  if (wants_help(args, i)) {
    p.global.help = true;
    for (std::size_t j = i; j < args.size() && args[j][0] != '-'; ++j)
      p.help_topic.push_back(args[j]);
    return p;
  }
  auto out = invocation(args, i, p.global);
  if (auto* e = std::get_if<CliError>(&out)) return *e;
  p.invocation = std::move(std::get<Invocation>(out));
  return p;
}

std::span<const CommandInfo> command_table() {
  return kCommands;
}

std::vector<SyntaxInfo> syntax_table() {
  std::vector<SyntaxInfo> out;
  for (const auto& s : syntaxes()) out.push_back({s.words, s.flags, s.positional, s.domain_alias});
  return out;
}

std::span<const GlobalFlag> global_flags() {
  return kGlobalFlags;
}

std::string usage() {
  std::string out =
      "usage: qbrokerctl [--socket PATH] [--json] [--timeout SECONDS] [--no-progress] COMMAND ...\n"
      "Talks to qbrokerd over its Unix socket ($QBROKER_SOCKET or --socket, default\n"
      "/run/qbroker/qbroker.sock). Tables for people; --json prints the API's JSON for scripts.\n\n"
      "options:\n";
  for (const auto& f : kGlobalFlags) {
    std::string left = "  " + std::string(f.name) + (f.arg.empty() ? "" : " ") + std::string(f.arg);
    if (left.size() < 22) left.resize(22, ' ');
    out += left + std::string(f.help) + "\n";
  }
  out += "\ncommands:\n";
  for (const auto& c : kCommands) {
    std::string left = "  " + std::string(c.words);
    if (left.size() < 16) left.resize(16, ' ');
    out += left + std::string(c.summary) + "\n";
  }
  out +=
      "  help COMMAND  details of one command\n\n"
      "Domain commands also answer as 'domain COMMAND' (domain create, domain list, ...).\n\n"
      "exit status:\n"
      "  0 success            1 internal error        2 usage error         3 not found\n"
      "  4 conflict (busy, exists, wrong state)      5 invalid request (a field is wrong)\n"
      "  6 forbidden          7 timed out             8 cannot reach qbrokerd\n"
      "  9 not implemented    10 QEMU failed or gone  11 broker unavailable (limits)\n";
  return out;
}

std::optional<std::string> command_help(std::span<const std::string> words) {
  std::string joined;
  for (const auto& w : words) {
    if (w == "domain" && joined.empty()) continue;
    joined += (joined.empty() ? "" : " ") + w;
  }
  std::string out;
  for (const auto& c : kCommands) {
    bool group = c.words.rfind(joined + " ", 0) == 0;
    if (c.words != joined && !group) continue;
    out += "usage: qbrokerctl " + std::string(c.words) +
           (c.args.empty() ? "" : " " + std::string(c.args)) + "\n  " + std::string(c.summary) +
           "\n  API: " + std::string(c.method) + " " + std::string(c.route) + "\n";
  }
  if (out.empty()) return std::nullopt;
  return out;
}

std::string flag_for_field(std::string_view field) {
  static const std::map<std::string_view, std::string_view> kFlags{{"memory_mib", "--memory"},
                                                                   {"vcpus", "--vcpus"},
                                                                   {"kernel", "--kernel"},
                                                                   {"initrd", "--initrd"},
                                                                   {"append", "--append"},
                                                                   {"machine", "--machine"},
                                                                   {"accel", "--accel"},
                                                                   {"pci_slots", "--pci-slots"},
                                                                   {"paused", "--paused"},
                                                                   {"firmware", "--firmware"},
                                                                   {"secure_boot", "--secure-boot"},
                                                                   {"nvram", "--nvram"},
                                                                   {"boot_order", "--boot"},
                                                                   {"purge_nvram", "--purge-nvram"},
                                                                   {"name", "NAME"},
                                                                   {"path", "PATH"},
                                                                   {"format", "--format"},
                                                                   {"bus", "--bus"},
                                                                   {"read_only", "--read-only"},
                                                                   {"backing", "--backing"},
                                                                   {"diskseq", "--diskseq"},
                                                                   {"serial", "--serial"},
                                                                   {"tap", "--tap"},
                                                                   {"mac", "--mac"},
                                                                   {"listen", "LISTEN"},
                                                                   {"force", "--force"},
                                                                   {"execute", "JSON"},
                                                                   {"arguments", "JSON"},
                                                                   {"to", "TO"},
                                                                   {"id", "ID"},
                                                                   {"domain", "--domain"},
                                                                   {"live", "--no-live"},
                                                                   {"graceful", "--graceful"}};
  for (auto [prefix, flag] : {std::pair{"cdroms[", "--cdrom"}, std::pair{"disks[", "--disk"},
                              std::pair{"nics[", "--nic"}, std::pair{"vnc.", "--vnc"}}) {
    if (field.rfind(prefix, 0) == 0) return flag;
  }
  if (field == "vnc" || field == "disks" || field == "nics" || field == "cdroms") {
    return "--" + std::string(field == "vnc" ? "vnc" : field.substr(0, field.size() - 1));
  }
  auto it = kFlags.find(field);
  return it == kFlags.end() ? std::string() : std::string(it->second);
}

}  // namespace qbctl
