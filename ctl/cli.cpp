#include "ctl/cli.hpp"

#include <algorithm>
#include <array>
#include <boost/json.hpp>
#include <charconv>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <sstream>

namespace qbctl {
namespace json = boost::json;
namespace {

constexpr std::array kCommands{
    CommandInfo{"version", "", "GET", "/v1/version", "broker and QEMU versions, QEMU capabilities"},
    CommandInfo{"list", "", "GET", "/v1/domains", "list domains (also: domain list)"},
    CommandInfo{"create",
                "NAME [--memory MIB] [--vcpus N] [--kernel PATH] [--initrd PATH] [--append ARGS]\n"
                "       [--machine q35|none] [--accel auto|kvm|tcg] [--pci-slots N] [--paused]\n"
                "       [--cdrom ID[=PATH]]... [--disk "
                "id=ID,path=PATH[,format=raw|qcow2][,bus=scsi|virtio][,ro]]...\n"
                "       [--nic id=ID[,tap=TAP][,mac=MAC]]... [--vnc LISTEN]\n"
                "       [--from-json FILE|-]",
                "POST", "/v1/domains", "create and start a domain (also: domain create)"},
    CommandInfo{"show", "NAME [--no-live]", "GET", "/v1/domains/{name}",
                "state, uid, pid, devices and live QEMU status (also: domain show)"},
    CommandInfo{"destroy", "NAME [--graceful]", "DELETE", "/v1/domains/{name}",
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
    CommandInfo{"save", "NAME PATH", "POST", "/v1/domains/{name}/save",
                "save the domain's state to PATH"},
    CommandInfo{"restore", "NAME PATH [--paused]", "POST", "/v1/domains/restore",
                "start domain NAME from a state saved at PATH"},
    CommandInfo{"migrate", "NAME TO", "POST", "/v1/domains/{name}/migrate",
                "live-migrate to another broker's endpoint TO"},
    CommandInfo{"qmp", "NAME JSON|COMMAND", "POST", "/v1/domains/{name}/qmp",
                "raw QMP for admins: '{\"execute\":\"query-status\"}' or just query-status"},
    CommandInfo{"events", "[--domain NAME] [--count N]", "GET", "/v1/events",
                "follow broker and QEMU events (one JSON per line with --json)"},
};

struct FlagSpec {
  std::string_view name;
  bool value;
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

// Percent-encodes a path segment or query value (RFC 3986 unreserved characters stay).
std::string encode(std::string_view s) {
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
      out.push_back(static_cast<char>(c));
    } else {
      static const char* hex = "0123456789ABCDEF";
      out.push_back('%');
      out.push_back(hex[c >> 4]);
      out.push_back(hex[c & 15]);
    }
  }
  return out;
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
                                  std::initializer_list<FlagSpec> specs, GlobalOptions& g) {
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

std::optional<CliError> positional(const Args& a, std::initializer_list<std::string_view> names,
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

std::string dom(const std::string& name) {
  return "/v1/domains/" + encode(name);
}

using Out = std::variant<Invocation, CliError>;

Out create(std::span<const std::string> args, std::size_t from, GlobalOptions& g) {
  auto sc = scan(args, from,
                 {{"--memory", true},
                  {"--vcpus", true},
                  {"--kernel", true},
                  {"--initrd", true},
                  {"--append", true},
                  {"--machine", true},
                  {"--accel", true},
                  {"--pci-slots", true},
                  {"--paused", false},
                  {"--cdrom", true},
                  {"--disk", true},
                  {"--nic", true},
                  {"--vnc", true},
                  {"--from-json", true}},
                 g);
  if (auto* e = std::get_if<CliError>(&sc)) return *e;
  auto& a = std::get<Args>(sc);
  json::object body;
  if (auto file = a.one("--from-json")) {
    auto v = read_json_file(*file);
    if (auto* e = std::get_if<CliError>(&v)) return *e;
    body = std::get<json::value>(v).get_object();
    if (auto e = positional(a, {"NAME"}, 1)) return *e;
  } else if (auto e = positional(a, {"NAME"})) {
    return *e;
  }
  if (!a.pos.empty()) body["name"] = a.pos[0];
  if (auto e = set_number(body, a, "--memory", "memory_mib")) return *e;
  if (auto e = set_number(body, a, "--vcpus", "vcpus")) return *e;
  if (auto e = set_number(body, a, "--pci-slots", "pci_slots")) return *e;
  for (auto [flag, key] : {std::pair{"--kernel", "kernel"}, std::pair{"--initrd", "initrd"},
                           std::pair{"--append", "append"}, std::pair{"--machine", "machine"},
                           std::pair{"--accel", "accel"}}) {
    if (auto v = a.one(flag)) body[key] = *v;
  }
  if (a.has("--paused")) body["paused"] = true;
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
    json::array list;
    for (const auto& spec : a.flags.at(flag)) {
      auto o = kv_list(flag, spec, keys);
      if (auto* e = std::get_if<CliError>(&o)) return *e;
      list.push_back(std::get<json::object>(o));
    }
    body[key] = std::move(list);
  }
  if (auto v = a.one("--vnc")) body["vnc"] = json::object{{"listen", *v}};
  if (!body.contains("name"))
    return CliError{"NAME: missing (as an argument or in the JSON)", "NAME"};
  Invocation inv{"POST", "/v1/domains", json::value(body), View::domain};
  inv.domain = body["name"].is_string() ? std::string(body["name"].get_string()) : "";
  return inv;
}

Out domain_command(std::string_view verb, std::span<const std::string> args, std::size_t from,
                   GlobalOptions& g) {
  if (verb == "create") return create(args, from, g);
  if (verb == "list" || verb == "ls") {
    auto sc = scan(args, from, {}, g);
    if (auto* e = std::get_if<CliError>(&sc)) return *e;
    if (auto e = positional(std::get<Args>(sc), {})) return *e;
    return Invocation{"GET", "/v1/domains", std::nullopt, View::domains};
  }
  if (verb == "show" || verb == "info") {
    auto sc = scan(args, from, {{"--no-live", false}}, g);
    if (auto* e = std::get_if<CliError>(&sc)) return *e;
    auto& a = std::get<Args>(sc);
    if (auto e = positional(a, {"NAME"})) return *e;
    Invocation inv{"GET", dom(a.pos[0]) + (a.has("--no-live") ? "?live=false" : ""), std::nullopt,
                   View::domain};
    inv.domain = a.pos[0];
    return inv;
  }
  if (verb == "destroy") {
    auto sc = scan(args, from, {{"--graceful", false}}, g);
    if (auto* e = std::get_if<CliError>(&sc)) return *e;
    auto& a = std::get<Args>(sc);
    if (auto e = positional(a, {"NAME"})) return *e;
    Invocation inv{"DELETE", dom(a.pos[0]) + (a.has("--graceful") ? "?graceful=true" : ""),
                   std::nullopt, View::killed};
    inv.domain = a.pos[0];
    return inv;
  }
  static const std::map<std::string_view, std::string_view> kDone{
      {"pause", "paused"},
      {"resume", "resumed"},
      {"shutdown", "sent the ACPI power button to"},
      {"reset", "reset"}};
  if (auto it = kDone.find(verb); it != kDone.end()) {
    auto sc = scan(args, from, {}, g);
    if (auto* e = std::get_if<CliError>(&sc)) return *e;
    auto& a = std::get<Args>(sc);
    if (auto e = positional(a, {"NAME"})) return *e;
    Invocation inv{"POST", dom(a.pos[0]) + "/" + std::string(verb), std::nullopt, View::message};
    inv.domain = a.pos[0];
    inv.done = std::string(it->second) + " " + a.pos[0];
    return inv;
  }
  return CliError{"'" + std::string(verb) + "': unknown command (see --help)", std::string(verb)};
}

Out device_command(std::string_view group, std::span<const std::string> args, std::size_t from,
                   GlobalOptions& g) {
  if (from >= args.size()) {
    return CliError{std::string(group) + ": needs a subcommand (see qbrokerctl help " +
                        std::string(group) + ")",
                    std::string(group)};
  }
  std::string sub = args[from];
  ++from;
  auto bad_sub = [&] {
    return CliError{"'" + std::string(group) + " " + sub +
                        "': unknown command (see qbrokerctl help " + std::string(group) + ")",
                    sub};
  };
  if (group == "cdrom") {
    if (sub != "insert" && sub != "eject") return bad_sub();
    auto sc = scan(args, from, {{"--force", false}}, g);
    if (auto* e = std::get_if<CliError>(&sc)) return *e;
    auto& a = std::get<Args>(sc);
    if (sub == "insert") {
      if (auto e = positional(a, {"NAME", "CD", "PATH"})) return *e;
      json::object body{{"path", a.pos[2]}};
      if (a.has("--force")) body["force"] = true;
      Invocation inv{"PUT", dom(a.pos[0]) + "/cdroms/" + encode(a.pos[1]) + "/medium",
                     json::value(body), View::message};
      inv.domain = a.pos[0];
      inv.done = "inserted " + a.pos[2] + " into " + a.pos[0] + " " + a.pos[1];
      return inv;
    }
    if (auto e = positional(a, {"NAME", "CD"})) return *e;
    Invocation inv{
        "DELETE", dom(a.pos[0]) + "/cdroms/" + encode(a.pos[1]) + "/medium",
        a.has("--force") ? std::optional<json::value>(json::object{{"force", true}}) : std::nullopt,
        View::message};
    inv.domain = a.pos[0];
    inv.done = "ejected the medium of " + a.pos[0] + " " + a.pos[1];
    return inv;
  }
  if (group == "disk" || group == "nic") {
    if (sub != "add" && sub != "remove") return bad_sub();
    std::string coll = group == "disk" ? "disks" : "nics";
    if (sub == "remove") {
      auto sc = scan(args, from, {}, g);
      if (auto* e = std::get_if<CliError>(&sc)) return *e;
      auto& a = std::get<Args>(sc);
      if (auto e = positional(a, {"NAME", "ID"})) return *e;
      Invocation inv{"DELETE", dom(a.pos[0]) + "/" + coll + "/" + encode(a.pos[1]), std::nullopt,
                     View::message};
      inv.domain = a.pos[0];
      inv.progress_job = std::string(group) + "-remove";
      inv.done = "removed " + std::string(group) + " " + a.pos[1] + " from " + a.pos[0];
      return inv;
    }
    if (group == "disk") {
      auto sc = scan(args, from,
                     {{"--format", true},
                      {"--bus", true},
                      {"--read-only", false},
                      {"--backing", true},
                      {"--diskseq", true},
                      {"--serial", true}},
                     g);
      if (auto* e = std::get_if<CliError>(&sc)) return *e;
      auto& a = std::get<Args>(sc);
      if (auto e = positional(a, {"NAME", "ID", "PATH"})) return *e;
      json::object body{{"id", a.pos[1]}, {"path", a.pos[2]}};
      for (auto [flag, key] :
           {std::pair{"--format", "format"}, std::pair{"--bus", "bus"},
            std::pair{"--backing", "backing"}, std::pair{"--serial", "serial"}}) {
        if (auto v = a.one(flag)) body[key] = *v;
      }
      if (a.has("--read-only")) body["read_only"] = true;
      if (auto e = set_number(body, a, "--diskseq", "diskseq")) return *e;
      Invocation inv{"POST", dom(a.pos[0]) + "/disks", json::value(body), View::message};
      inv.domain = a.pos[0];
      inv.done = "added disk " + a.pos[1] + " to " + a.pos[0];
      return inv;
    }
    auto sc = scan(args, from, {{"--tap", true}, {"--mac", true}}, g);
    if (auto* e = std::get_if<CliError>(&sc)) return *e;
    auto& a = std::get<Args>(sc);
    if (auto e = positional(a, {"NAME", "ID"})) return *e;
    json::object body{{"id", a.pos[1]}};
    if (auto v = a.one("--tap")) body["tap"] = *v;
    if (auto v = a.one("--mac")) body["mac"] = *v;
    Invocation inv{"POST", dom(a.pos[0]) + "/nics", json::value(body), View::message};
    inv.domain = a.pos[0];
    inv.done = "added nic " + a.pos[1] + " to " + a.pos[0];
    return inv;
  }
  // vnc
  if (sub != "set" && sub != "remove") return bad_sub();
  auto sc = scan(args, from, {}, g);
  if (auto* e = std::get_if<CliError>(&sc)) return *e;
  auto& a = std::get<Args>(sc);
  if (sub == "set") {
    if (auto e = positional(a, {"NAME", "LISTEN"})) return *e;
    Invocation inv{"PUT", dom(a.pos[0]) + "/vnc", json::value(json::object{{"listen", a.pos[1]}}),
                   View::vnc};
    inv.domain = a.pos[0];
    return inv;
  }
  if (auto e = positional(a, {"NAME"})) return *e;
  Invocation inv{"DELETE", dom(a.pos[0]) + "/vnc", std::nullopt, View::message};
  inv.domain = a.pos[0];
  inv.done = "removed the VNC listener of " + a.pos[0];
  return inv;
}

Out other_command(std::string_view cmd, std::span<const std::string> args, std::size_t from,
                  GlobalOptions& g) {
  if (cmd == "version") {
    auto sc = scan(args, from, {}, g);
    if (auto* e = std::get_if<CliError>(&sc)) return *e;
    if (auto e = positional(std::get<Args>(sc), {})) return *e;
    return Invocation{"GET", "/v1/version", std::nullopt, View::version};
  }
  if (cmd == "save" || cmd == "migrate") {
    auto sc = scan(args, from, {}, g);
    if (auto* e = std::get_if<CliError>(&sc)) return *e;
    auto& a = std::get<Args>(sc);
    bool save = cmd == "save";
    if (auto e = positional(a, {"NAME", save ? "PATH" : "TO"})) return *e;
    Invocation inv{"POST", dom(a.pos[0]) + "/" + std::string(cmd),
                   json::value(json::object{{save ? "path" : "to", a.pos[1]}}), View::message};
    inv.domain = a.pos[0];
    inv.progress_job = std::string(cmd);
    inv.done =
        save ? "saved " + a.pos[0] + " to " + a.pos[1] : "migrated " + a.pos[0] + " to " + a.pos[1];
    return inv;
  }
  if (cmd == "restore") {
    auto sc = scan(args, from, {{"--paused", false}}, g);
    if (auto* e = std::get_if<CliError>(&sc)) return *e;
    auto& a = std::get<Args>(sc);
    if (auto e = positional(a, {"NAME", "PATH"})) return *e;
    json::object body{{"name", a.pos[0]}, {"path", a.pos[1]}};
    if (a.has("--paused")) body["paused"] = true;
    Invocation inv{"POST", "/v1/domains/restore", json::value(body), View::domain};
    inv.domain = a.pos[0];
    inv.progress_job = "restore";
    return inv;
  }
  if (cmd == "qmp") {
    auto sc = scan(args, from, {}, g);
    if (auto* e = std::get_if<CliError>(&sc)) return *e;
    auto& a = std::get<Args>(sc);
    if (auto e = positional(a, {"NAME", "JSON"})) return *e;
    json::value body;
    const std::string& text = a.pos[1];
    if (!text.empty() && text.front() == '{') {
      std::error_code ec;
      body = json::parse(text, ec);
      if (ec) return CliError{"JSON: not valid JSON: " + ec.message(), "JSON"};
    } else {
      body = json::object{{"execute", text}};
    }
    Invocation inv{"POST", dom(a.pos[0]) + "/qmp", body, View::qmp};
    inv.domain = a.pos[0];
    return inv;
  }
  if (cmd == "events") {
    auto sc = scan(args, from, {{"--domain", true}, {"--count", true}}, g);
    if (auto* e = std::get_if<CliError>(&sc)) return *e;
    auto& a = std::get<Args>(sc);
    if (auto e = positional(a, {})) return *e;
    Invocation inv{"GET", "/v1/events", std::nullopt, View::events};
    if (auto d = a.one("--domain")) {
      inv.events_domain = *d;
      inv.target += "?domain=" + encode(*d);
    }
    if (auto c = a.one("--count")) {
      try {
        std::size_t used = 0;
        inv.events_count = std::stol(*c, &used);
        if (used != c->size() || inv.events_count < 1) throw std::invalid_argument("count");
      } catch (const std::exception&) {
        return CliError{"--count: must be a positive number", "--count"};
      }
    }
    return inv;
  }
  return domain_command(cmd, args, from, g);
}

}  // namespace

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
  std::string cmd = args[i];
  if (!cmd.empty() && cmd[0] == '-') return CliError{cmd + ": unknown option (see --help)", cmd};
  if (cmd == "help") {
    p.global.help = true;
    p.help_topic.assign(args.begin() + static_cast<std::ptrdiff_t>(i) + 1, args.end());
    return p;
  }
  // "qbrokerctl disk add --help": help for that command.
  if (std::find(args.begin() + static_cast<std::ptrdiff_t>(i), args.end(), "--help") !=
          args.end() ||
      std::find(args.begin() + static_cast<std::ptrdiff_t>(i), args.end(), "-h") != args.end()) {
    p.global.help = true;
    for (std::size_t j = i; j < args.size() && args[j][0] != '-'; ++j)
      p.help_topic.push_back(args[j]);
    return p;
  }
  Out out;
  if (cmd == "domain") {
    if (i + 1 >= args.size()) return CliError{"domain: needs a subcommand (see --help)", "domain"};
    out = domain_command(args[i + 1], args, i + 2, p.global);
  } else if (cmd == "cdrom" || cmd == "disk" || cmd == "nic" || cmd == "vnc") {
    out = device_command(cmd, args, i + 1, p.global);
  } else {
    out = other_command(cmd, args, i + 1, p.global);
  }
  if (auto* e = std::get_if<CliError>(&out)) return *e;
  p.invocation = std::move(std::get<Invocation>(out));
  return p;
}

std::span<const CommandInfo> command_table() {
  return kCommands;
}

std::string usage() {
  std::string out =
      "usage: qbrokerctl [--socket PATH] [--json] [--timeout SECONDS] [--no-progress] COMMAND ...\n"
      "Talks to qbrokerd over its Unix socket ($QBROKER_SOCKET or --socket, default\n"
      "/run/qbroker/qbroker.sock). Tables for people; --json prints the API's JSON for scripts.\n\n"
      "commands:\n";
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
