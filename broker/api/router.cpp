#include "broker/api/router.hpp"

#include <algorithm>
#include <array>
#include <boost/beast/http/field.hpp>
#include <boost/json.hpp>
#include <map>
#include <optional>

#include "broker/api/errc.hpp"
#include "broker/api/http_errors.hpp"
#include "broker/core/errc.hpp"
#include "broker/lifecycle/spec.hpp"
#include "qmp/commands.hpp"

namespace broker::api {
namespace json = boost::json;
using verb = http::verb;

namespace {

constexpr std::array kRoutes{
    RouteInfo{verb::get, "/v1/version", "getVersion",
              "Broker and QEMU versions, QEMU capabilities"},
    RouteInfo{verb::get, "/v1/domains", "listDomains", "List domains"},
    RouteInfo{verb::post, "/v1/domains", "createDomain", "Create and start a domain"},
    RouteInfo{verb::get, "/v1/domains/{name}", "getDomain",
              "State, uid, pid, devices, QEMU status"},
    RouteInfo{verb::delete_, "/v1/domains/{name}", "destroyDomain",
              "Destroy: kill by uid, free everything"},
    RouteInfo{verb::post, "/v1/domains/{name}/pause", "pauseDomain", "Pause the guest's vCPUs"},
    RouteInfo{verb::post, "/v1/domains/{name}/resume", "resumeDomain", "Resume the guest's vCPUs"},
    RouteInfo{verb::post, "/v1/domains/{name}/shutdown", "shutdownDomain",
              "Press the ACPI power button"},
    RouteInfo{verb::post, "/v1/domains/{name}/reset", "resetDomain", "Reset the machine"},
    RouteInfo{verb::put, "/v1/domains/{name}/cdroms/{id}/medium", "insertMedium",
              "Insert a CD medium"},
    RouteInfo{verb::delete_, "/v1/domains/{name}/cdroms/{id}/medium", "ejectMedium",
              "Eject the CD medium"},
    RouteInfo{verb::post, "/v1/domains/{name}/disks", "addDisk", "Hotplug a disk"},
    RouteInfo{verb::delete_, "/v1/domains/{name}/disks/{id}", "removeDisk", "Unplug a disk"},
    RouteInfo{verb::post, "/v1/domains/{name}/nics", "addNic", "Hotplug a NIC"},
    RouteInfo{verb::delete_, "/v1/domains/{name}/nics/{id}", "removeNic", "Unplug a NIC"},
    RouteInfo{verb::put, "/v1/domains/{name}/vnc", "setVnc", "Set the VNC listener"},
    RouteInfo{verb::delete_, "/v1/domains/{name}/vnc", "removeVnc", "Remove the VNC listener"},
    RouteInfo{verb::post, "/v1/domains/{name}/save", "saveDomain",
              "Save the domain's state to a file"},
    RouteInfo{verb::post, "/v1/domains/restore", "restoreDomain",
              "Restore a domain from a saved file"},
    RouteInfo{verb::post, "/v1/domains/{name}/migrate", "migrateDomain",
              "Live-migrate to another broker"},
    RouteInfo{verb::post, "/v1/domains/{name}/qmp", "qmpPassthrough",
              "Raw QMP for admins (fd commands refused)"},
    RouteInfo{verb::get, "/v1/events", "watchEvents",
              "Server-sent events, all domains or ?domain="},
};

Error make(api::errc code, std::string message, std::string field = {}) {
  Error e(make_error_code(code), std::move(message));
  e.field = std::move(field);
  return e;
}

int hex(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Percent-decodes one path segment or query component. NUL bytes and bad escapes are refused.
std::optional<std::string> decode(std::string_view s, bool plus_is_space) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    if (c == '%') {
      if (i + 2 >= s.size()) return std::nullopt;
      int hi = hex(s[i + 1]);
      int lo = hex(s[i + 2]);
      if (hi < 0 || lo < 0) return std::nullopt;
      c = static_cast<char>(hi * 16 + lo);
      if (c == '\0') return std::nullopt;
      i += 2;
    } else if (c == '+' && plus_is_space) {
      c = ' ';
    }
    out.push_back(c);
  }
  return out;
}

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  std::size_t start = 0;
  for (;;) {
    auto pos = s.find(sep, start);
    out.push_back(
        s.substr(start, pos == std::string_view::npos ? std::string_view::npos : pos - start));
    if (pos == std::string_view::npos) break;
    start = pos + 1;
  }
  return out;
}

struct Target {
  std::vector<std::string> segments;  // decoded
  std::vector<std::pair<std::string, std::string>> query;
};

Result<Target> parse_target(std::string_view target) {
  if (target.empty() || target.front() != '/') {
    return make(api::errc::bad_request, "the request target must be an absolute path");
  }
  Target t;
  auto q = target.find('?');
  std::string_view path = target.substr(0, q);
  if (q != std::string_view::npos) {
    std::string_view query = target.substr(q + 1);
    if (auto hash = query.find('#'); hash != std::string_view::npos) query = query.substr(0, hash);
    for (auto part : split(query, '&')) {
      if (part.empty()) continue;
      auto eq = part.find('=');
      auto key = decode(part.substr(0, eq), true);
      auto value =
          decode(eq == std::string_view::npos ? std::string_view() : part.substr(eq + 1), true);
      if (!key || !value)
        return make(api::errc::bad_request, "malformed percent-encoding in the query");
      t.query.emplace_back(std::move(*key), std::move(*value));
    }
  }
  auto parts = split(path.substr(1), '/');
  for (auto part : parts) {
    auto seg = decode(part, false);
    if (!seg) {
      return make(api::errc::bad_request, "malformed percent-encoding in the path");
    }
    t.segments.push_back(std::move(*seg));
  }
  return t;
}

// Matches decoded segments against a route template; fills the {params} in order.
bool matches(const RouteInfo& r, const std::vector<std::string>& segs,
             std::vector<std::pair<std::string_view, std::string>>* params) {
  auto tmpl = split(r.path.substr(1), '/');
  if (tmpl.size() != segs.size()) return false;
  for (std::size_t i = 0; i < tmpl.size(); ++i) {
    if (tmpl[i].size() > 2 && tmpl[i].front() == '{' && tmpl[i].back() == '}') {
      if (segs[i].empty()) return false;
      if (params != nullptr) params->emplace_back(tmpl[i].substr(1, tmpl[i].size() - 2), segs[i]);
      continue;
    }
    if (tmpl[i] != segs[i]) return false;
  }
  return true;
}

// Literal segments beat parameters: POST /v1/domains/restore is not a domain named "restore".
int literal_count(const RouteInfo& r) {
  int n = 0;
  for (auto s : split(r.path.substr(1), '/')) {
    if (s.empty() || s.front() != '{') ++n;
  }
  return n;
}

Result<json::value> parse_body(std::string_view body) {
  auto first = body.find_first_not_of(" \t\r\n");
  if (first == std::string_view::npos) return json::value(nullptr);
  json::parse_options opts;
  opts.max_depth = 64;
  json::parser p(json::storage_ptr(), opts);
  boost::system::error_code ec;
  std::size_t used = p.write_some(body.data(), body.size(), ec);
  if (ec) {
    return make(api::errc::malformed_json,
                "body: malformed JSON at byte " + std::to_string(used) + ": " + ec.message(),
                "body");
  }
  if (body.find_first_not_of(" \t\r\n", used) != std::string_view::npos) {
    return make(api::errc::malformed_json,
                "body: malformed JSON at byte " + std::to_string(used) + ": trailing data", "body");
  }
  return p.release();
}

// Routes that take no body accept nothing, "" or {}.
Result<void> no_body(const json::value& v) {
  if (v.is_null()) return {};
  if (!v.is_object()) return field_error("body", "this route takes no body (or {})");
  for (const auto& kv : v.get_object()) return field_error(kv.key(), "unknown field");
  return {};
}

Result<bool> parse_bool(std::string_view key, std::string_view v) {
  if (v == "true" || v == "1" || v.empty()) return true;
  if (v == "false" || v == "0") return false;
  return field_error(key, "must be true or false");
}

class Query {
 public:
  explicit Query(const std::vector<std::pair<std::string, std::string>>& q) : q_(q) {}
  // Refuses any parameter not in `known`.
  Result<void> only(std::initializer_list<std::string_view> known) const {
    for (const auto& [k, v] : q_) {
      if (std::find(known.begin(), known.end(), k) == known.end()) {
        return field_error(k, "unknown query parameter");
      }
    }
    return {};
  }
  std::optional<std::string> get(std::string_view key) const {
    for (const auto& [k, v] : q_) {
      if (k == key) return v;
    }
    return std::nullopt;
  }
  Result<bool> flag(std::string_view key, bool dflt) const {
    auto v = get(key);
    if (!v) return dflt;
    return parse_bool(key, *v);
  }

 private:
  const std::vector<std::pair<std::string, std::string>>& q_;
};

#define QB_TRY(var, expr) \
  auto var = (expr);      \
  if (!var) return var.error()

Result<Command> build(std::string_view op, const std::map<std::string_view, std::string>& p,
                      const Query& query, std::string_view raw_body) {
  // Every route but the event stream is validated for query parameters here; GET
  // /v1/domains/{name}, DELETE /v1/domains/{name}, eject and events list theirs.
  std::initializer_list<std::string_view> none{};
  auto name = [&] { return p.at("name"); };
  auto id = [&] { return p.at("id"); };

  if (op == "watchEvents") {
    if (auto ok = query.only({"domain"}); !ok) return ok.error();
    auto d = query.get("domain").value_or("");
    if (!d.empty() && !lifecycle::valid_name(d)) {
      return field_error("domain", "must be a domain name: 1-64 characters of A-Z a-z 0-9 _ . -");
    }
    QB_TRY(body, parse_body(raw_body));
    if (auto ok = no_body(*body); !ok) return ok.error();
    return Command{WatchEvents{d}};
  }
  if (op == "getDomain") {
    if (auto ok = query.only({"live"}); !ok) return ok.error();
  } else if (op == "destroyDomain") {
    if (auto ok = query.only({"graceful"}); !ok) return ok.error();
  } else if (op == "ejectMedium") {
    if (auto ok = query.only({"force"}); !ok) return ok.error();
  } else if (auto ok = query.only(none); !ok) {
    return ok.error();
  }

  QB_TRY(body, parse_body(raw_body));
  const json::value& b = *body;

  if (op == "getVersion" || op == "listDomains") {
    if (auto ok = no_body(b); !ok) return ok.error();
    if (op == "getVersion") return Command{GetVersion{}};
    return Command{ListDomains{}};
  }
  if (op == "createDomain") {
    QB_TRY(req, parse_create_domain(b));
    return Command{CreateDomainCmd{std::move(*req)}};
  }
  if (op == "getDomain") {
    if (auto ok = no_body(b); !ok) return ok.error();
    QB_TRY(live, query.flag("live", true));
    return Command{GetDomain{name(), *live}};
  }
  if (op == "destroyDomain") {
    if (auto ok = no_body(b); !ok) return ok.error();
    QB_TRY(graceful, query.flag("graceful", false));
    return Command{DestroyDomain{name(), *graceful}};
  }
  static const std::map<std::string_view, RunOp> kRun{{"pauseDomain", RunOp::pause},
                                                      {"resumeDomain", RunOp::resume},
                                                      {"shutdownDomain", RunOp::shutdown},
                                                      {"resetDomain", RunOp::reset}};
  if (auto it = kRun.find(op); it != kRun.end()) {
    if (auto ok = no_body(b); !ok) return ok.error();
    return Command{RunStateCmd{name(), it->second}};
  }
  if (op == "insertMedium") {
    QB_TRY(m, parse_insert_medium(b));
    return Command{InsertMediumCmd{name(), id(), std::move(*m)}};
  }
  if (op == "ejectMedium") {
    QB_TRY(force, parse_force(b));
    QB_TRY(qforce, query.flag("force", false));
    return Command{EjectMediumCmd{name(), id(), *force || *qforce}};
  }
  if (op == "addDisk") {
    QB_TRY(d, parse_disk(b));
    return Command{AddDiskCmd{name(), std::move(*d)}};
  }
  if (op == "removeDisk") {
    if (auto ok = no_body(b); !ok) return ok.error();
    return Command{RemoveDiskCmd{name(), id()}};
  }
  if (op == "addNic") {
    QB_TRY(n, parse_nic(b));
    return Command{AddNicCmd{name(), std::move(*n)}};
  }
  if (op == "removeNic") {
    if (auto ok = no_body(b); !ok) return ok.error();
    return Command{RemoveNicCmd{name(), id()}};
  }
  if (op == "setVnc") {
    QB_TRY(v, parse_vnc(b));
    return Command{SetVncCmd{name(), std::move(*v)}};
  }
  if (op == "removeVnc") {
    if (auto ok = no_body(b); !ok) return ok.error();
    return Command{RemoveVncCmd{name()}};
  }
  if (op == "saveDomain") {
    QB_TRY(path, parse_path_body(b));
    return Command{SaveCmd{name(), std::move(*path)}};
  }
  if (op == "restoreDomain") {
    QB_TRY(r, parse_restore(b));
    return Command{RestoreCmd{std::move(*r)}};
  }
  if (op == "migrateDomain") {
    QB_TRY(to, parse_migrate(b));
    return Command{MigrateCmd{name(), std::move(*to)}};
  }
  if (op == "qmpPassthrough") {
    if (!b.is_object())
      return field_error("body", "must be a QMP command object {\"execute\": ...}");
    const auto& o = b.get_object();
    for (const auto& kv : o) {
      if (kv.key() != "execute" && kv.key() != "arguments") {
        return field_error(kv.key(), "unknown field (a QMP command has execute and arguments)");
      }
    }
    auto exec = o.find("execute");
    if (exec == o.end() || !exec->value().is_string()) {
      return field_error("execute", "must be the name of a QMP command");
    }
    std::string_view cmd = exec->value().get_string();
    if (qmp::cmd::is_fd_command(cmd) || cmd == "qmp_capabilities") {
      Error e(make_error_code(broker::errc::forbidden),
              "execute: '" + std::string(cmd) +
                  "' is not allowed through the passthrough: the broker owns every fd");
      e.field = "execute";
      return e;
    }
    if (auto a = o.find("arguments"); a != o.end() && !a->value().is_object()) {
      return field_error("arguments", "must be an object");
    }
    return Command{QmpCmd{name(), b}};
  }
  return Error(make_error_code(broker::errc::internal),
               "route without a handler: " + std::string(op));
}

#undef QB_TRY

}  // namespace

std::span<const RouteInfo> routes() {
  return kRoutes;
}

std::vector<http::verb> allowed_methods(std::string_view target) {
  std::vector<http::verb> out;
  auto t = parse_target(target);
  if (!t) return out;
  for (const auto& r : kRoutes) {
    if (matches(r, t->segments, nullptr) &&
        std::find(out.begin(), out.end(), r.method) == out.end()) {
      out.push_back(r.method);
    }
  }
  return out;
}

Result<Command> route(http::verb method, std::string_view target, std::string_view body) {
  auto t = parse_target(target);
  if (!t) return t.error();
  const RouteInfo* best = nullptr;
  bool path_known = false;
  std::vector<std::pair<std::string_view, std::string>> params;
  for (const auto& r : kRoutes) {
    std::vector<std::pair<std::string_view, std::string>> p;
    if (!matches(r, t->segments, &p)) continue;
    path_known = true;
    if (r.method != method) continue;
    if (best == nullptr || literal_count(r) > literal_count(*best)) {
      best = &r;
      params = std::move(p);
    }
  }
  if (best == nullptr) {
    std::string path(target.substr(0, target.find('?')));
    if (path_known) {
      return make(api::errc::method_not_allowed,
                  std::string(http::to_string(method)) + " is not allowed on " + path);
    }
    return make(api::errc::no_route,
                "no route for " + std::string(http::to_string(method)) + " " + path);
  }
  // Path parameters become QEMU ids and file names: the same rule as every other name.
  std::map<std::string_view, std::string> p;
  for (auto& [key, value] : params) {
    if (!lifecycle::valid_name(value)) {
      return field_error(
          key, "must be 1-64 characters of A-Z a-z 0-9 _ . - starting with a letter or digit");
    }
    p.emplace(key, std::move(value));
  }
  return build(best->operation, p, Query(t->query), body);
}

// ---- Rendering ---------------------------------------------------------------------------------

Outcome failure(const Error& e) {
  Outcome o;
  o.status = classify(e.code).status;
  o.body = error_body(e);
  return o;
}

Outcome version_outcome(json::object qemu) {
  Outcome o;
  o.body = json::object{{"broker", json::object{{"version", kBrokerVersion}, {"api", "v1"}}},
                        {"qemu", std::move(qemu)}};
  return o;
}

Outcome domain_outcome(const DomainInfo& info, http::status status) {
  Outcome o;
  o.status = status;
  o.body = info.to_json();
  if (status == http::status::created)
    o.headers.emplace_back("Location", "/v1/domains/" + info.name);
  return o;
}

Outcome domains_outcome(const std::vector<DomainInfo>& list) {
  json::array arr;
  for (const auto& d : list) arr.push_back(d.to_json());
  Outcome o;
  o.body = json::object{{"domains", std::move(arr)}};
  return o;
}

json::object kill_report_json(const lifecycle::KillReport& r) {
  return json::object{
      {"uid", r.uid},       {"found", r.found},   {"survivors", r.survivors},
      {"rounds", r.rounds}, {"method", r.method}, {"duration_us", r.duration.count()}};
}

Outcome kill_outcome(const std::string& name, const lifecycle::KillReport& report) {
  Outcome o;
  o.body =
      json::object{{"name", name}, {"destroyed", true}, {"kill_report", kill_report_json(report)}};
  return o;
}

Outcome vnc_outcome(const std::string& name, const VncState& vnc) {
  Outcome o;
  o.body = json::object{
      {"name", name}, {"vnc", json::object{{"listen", vnc.spec.listen.text()}, {"address", vnc.address}}}};
  return o;
}

Outcome qmp_outcome(json::value reply) {
  Outcome o;
  o.body = json::object{{"return", std::move(reply)}};
  return o;
}

http::response<http::string_body> render(const Outcome& outcome, unsigned version,
                                         bool keep_alive) {
  http::response<http::string_body> res{outcome.status, version};
  res.set(http::field::server, kServerName);
  res.set(http::field::content_type, "application/json");
  res.set(http::field::cache_control, "no-store");
  for (const auto& [k, v] : outcome.headers) res.set(k, v);
  res.body() = json::serialize(outcome.body);
  res.body().push_back('\n');
  res.keep_alive(keep_alive);
  res.prepare_payload();
  return res;
}

std::string sse_frame(const BusEvent& event) {
  std::string out = "id: " + std::to_string(event.seq) + "\nevent: " + event.kind + "\ndata: ";
  out += json::serialize(event.to_json());  // compact JSON has no newline
  out += "\n\n";
  return out;
}

}  // namespace broker::api
