#include "broker/api/router.hpp"

#include <algorithm>
#include <array>
#include <boost/beast/core/string.hpp>
#include <boost/beast/http/field.hpp>
#include <boost/json.hpp>
#include <boost/url/parse.hpp>
#include <boost/url/url_view.hpp>
#include <map>
#include <optional>
#include <span>

#include "broker/api/errc.hpp"
#include "broker/api/http_errors.hpp"
#include "broker/api/json_body.hpp"
#include "broker/core/errc.hpp"
#include "broker/lifecycle/spec.hpp"
#include "qmp/commands.hpp"

namespace broker::api {
namespace json = boost::json;
namespace urls = boost::urls;
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
    RouteInfo{verb::post, "/v1/migrations", "prepareIncoming",
              "Prepare to receive a domain another broker migrates here"},
    RouteInfo{verb::delete_, "/v1/domains/{name}/job", "cancelJob",
              "Cancel the domain's save, restore or live update"},
    RouteInfo{verb::post, "/v1/domains/{name}/qmp", "qmpPassthrough",
              "Raw QMP for admins (fd commands refused)"},
    RouteInfo{verb::get, "/v1/events", "watchEvents",
              "Server-sent events, all domains or ?domain="},
    RouteInfo{verb::get, "/metrics", "getMetrics", "Prometheus metrics"},
    RouteInfo{verb::get, "/v1/xen", "getXen", "The Xen mode's device models"},
    RouteInfo{verb::get, "/v1/pool", "getPool", "The warm pool: shapes and ready QEMUs"},
};

Error make(api::errc code, std::string message, std::string field = {}) {
  Error e(make_error_code(code), std::move(message));
  e.field = std::move(field);
  return e;
}

bool has_nul(std::string_view s) {
  return s.find('\0') != std::string_view::npos;
}

struct Target {
  std::vector<std::string> segments;                       // decoded
  std::vector<std::pair<std::string, std::string>> query;  // decoded, in request order
};

// The path's segments, decoded. A percent-encoded NUL is refused: names end up in C strings.
Result<std::vector<std::string>> path_segments(const urls::url_view& url) {
  std::vector<std::string> out;
  // Boost.URL takes a leading "/." for the prefix it writes itself to keep "//x" from reading
  // as an authority, and leaves it out of segments(). On the wire it is a "." segment, which no
  // route has: it must not make "/./v1/version" a route.
  auto path = url.encoded_path();
  if (path == "/." || path.starts_with("/./")) out.emplace_back(".");
  for (auto segment : url.segments()) {
    if (has_nul(segment)) return make(api::errc::bad_request, "a percent-encoded NUL in the path");
    out.push_back(std::move(segment));
  }
  return out;
}

// The query's key=value pairs, decoded, '+' read as a space as HTML forms write it. Empty
// parameters ("?&a=1&") are skipped; "=x" is a parameter with an empty key.
Result<std::vector<std::pair<std::string, std::string>>> query_params(const urls::url_view& url) {
  std::vector<std::pair<std::string, std::string>> out;
  for (auto param : url.params(urls::encoding_opts(/*space_as_plus=*/true))) {
    if (param.key.empty() && !param.has_value) continue;
    if (has_nul(param.key) || has_nul(param.value)) {
      return make(api::errc::bad_request, "a percent-encoded NUL in the query");
    }
    out.emplace_back(std::move(param.key), std::move(param.value));
  }
  return out;
}

// An HTTP request target in origin-form (RFC 9112 3.2.1): an absolute path and an optional
// query, every other character percent-encoded. No fragment: a client does not send one.
Result<Target> parse_target(std::string_view target) {
  if (target.empty() || target.front() != '/') {
    return make(api::errc::bad_request, "the request target must be an absolute path");
  }
  auto url = urls::parse_origin_form(target);
  if (!url) {
    return make(api::errc::bad_request,
                "malformed request target: a character that must be percent-encoded, or a "
                "malformed percent-escape");
  }
  Target t;
  auto segments = path_segments(*url);
  if (!segments) return segments.error();
  t.segments = std::move(*segments);
  auto query = query_params(*url);
  if (!query) return query.error();
  t.query = std::move(*query);
  return t;
}

// A route template's segments: "/v1/domains/{name}" -> {"v1", "domains", "{name}"}. Templates
// are not URLs ("{" is not a URL character), so they are split here.
std::vector<std::string_view> template_segments(std::string_view path) {
  std::vector<std::string_view> out;
  path.remove_prefix(1);
  for (;;) {
    auto slash = path.find('/');
    out.push_back(path.substr(0, slash));
    if (slash == std::string_view::npos) return out;
    path.remove_prefix(slash + 1);
  }
}

bool is_parameter(std::string_view segment) {
  return segment.size() > 2 && segment.front() == '{' && segment.back() == '}';
}

using Params = std::vector<std::pair<std::string_view, std::string>>;

// Matches decoded segments against a route template; fills the {params} in order.
bool matches(const RouteInfo& r, const std::vector<std::string>& segs, Params* params) {
  auto tmpl = template_segments(r.path);
  if (tmpl.size() != segs.size()) return false;
  for (std::size_t i = 0; i < tmpl.size(); ++i) {
    if (is_parameter(tmpl[i])) {
      if (segs[i].empty()) return false;
      if (params != nullptr) params->emplace_back(tmpl[i].substr(1, tmpl[i].size() - 2), segs[i]);
      continue;
    }
    if (tmpl[i] != segs[i]) return false;
  }
  return true;
}

// Literal segments beat parameters: POST /v1/domains/restore is not a domain named "restore".
std::ptrdiff_t literal_count(const RouteInfo& r) {
  auto tmpl = template_segments(r.path);
  return std::count_if(tmpl.begin(), tmpl.end(), [](auto s) { return !is_parameter(s); });
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
  // Refuses any parameter but those in `known` (empty entries name none).
  Result<void> only(std::span<const std::string_view> known) const {
    for (const auto& [k, v] : q_) {
      if (k.empty() || std::find(known.begin(), known.end(), k) == known.end()) {
        return field_error(k, "unknown query parameter");
      }
    }
    return {};
  }
  // The first value given for `key`: a repeated parameter does not override it.
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

// What a route's handler gets: the path parameters (already valid names), the query (already
// limited to the route's key) and the body, not yet parsed.
struct Request {
  const std::map<std::string_view, std::string>& params;
  const Query& query;
  std::string_view raw_body;

  const std::string& name() const { return params.at("name"); }
  const std::string& id() const { return params.at("id"); }
  Result<json::value> body() const { return parse_json_body(raw_body); }
  Result<void> empty_body() const {
    auto b = body();
    if (!b) return b.error();
    return no_body(*b);
  }
};

#define QB_TRY(var, expr) \
  auto var = (expr);      \
  if (!var) return var.error()

// The handlers, one per operation of the route table.

Result<Command> watch_events(const Request& r) {
  auto d = r.query.get("domain").value_or("");
  if (!d.empty() && !lifecycle::valid_name(d)) {
    return field_error("domain", "must be a domain name: 1-64 characters of A-Z a-z 0-9 _ . -");
  }
  QB_TRY(empty, r.empty_body());
  return Command{WatchEvents{d}};
}

Result<Command> get_metrics(const Request& r) {
  QB_TRY(empty, r.empty_body());
  return Command{GetMetrics{}};
}

Result<Command> get_xen(const Request& r) {
  QB_TRY(empty, r.empty_body());
  return Command{GetXen{}};
}

Result<Command> get_pool(const Request& r) {
  QB_TRY(empty, r.empty_body());
  return Command{GetPool{}};
}

Result<Command> get_version(const Request& r) {
  QB_TRY(empty, r.empty_body());
  return Command{GetVersion{}};
}

Result<Command> list_domains(const Request& r) {
  QB_TRY(empty, r.empty_body());
  QB_TRY(usage, r.query.flag("usage", false));
  return Command{ListDomains{*usage}};
}

Result<Command> create_domain(const Request& r) {
  QB_TRY(body, r.body());
  QB_TRY(req, parse_create_domain(*body));
  return Command{CreateDomainCmd{std::move(*req)}};
}

Result<Command> get_domain(const Request& r) {
  QB_TRY(empty, r.empty_body());
  QB_TRY(live, r.query.flag("live", true));
  return Command{GetDomain{r.name(), *live}};
}

Result<Command> destroy_domain(const Request& r) {
  QB_TRY(empty, r.empty_body());
  QB_TRY(graceful, r.query.flag("graceful", false));
  QB_TRY(purge, r.query.flag("purge_nvram", false));
  return Command{DestroyDomain{r.name(), *graceful, *purge}};
}

template <RunOp op>
Result<Command> run_state(const Request& r) {
  QB_TRY(empty, r.empty_body());
  return Command{RunStateCmd{r.name(), op}};
}

Result<Command> insert_medium(const Request& r) {
  QB_TRY(body, r.body());
  QB_TRY(m, parse_insert_medium(*body));
  return Command{InsertMediumCmd{r.name(), r.id(), std::move(*m)}};
}

// The body's {"force": true} and ?force=true say the same.
Result<Command> eject_medium(const Request& r) {
  QB_TRY(body, r.body());
  QB_TRY(force, parse_force(*body));
  QB_TRY(qforce, r.query.flag("force", false));
  return Command{EjectMediumCmd{r.name(), r.id(), *force || *qforce}};
}

Result<Command> add_disk(const Request& r) {
  QB_TRY(body, r.body());
  QB_TRY(d, parse_disk(*body));
  return Command{AddDiskCmd{r.name(), std::move(*d)}};
}

Result<Command> remove_disk(const Request& r) {
  QB_TRY(empty, r.empty_body());
  return Command{RemoveDiskCmd{r.name(), r.id()}};
}

Result<Command> add_nic(const Request& r) {
  QB_TRY(body, r.body());
  QB_TRY(n, parse_nic(*body));
  return Command{AddNicCmd{r.name(), std::move(*n)}};
}

Result<Command> remove_nic(const Request& r) {
  QB_TRY(empty, r.empty_body());
  return Command{RemoveNicCmd{r.name(), r.id()}};
}

Result<Command> set_vnc(const Request& r) {
  QB_TRY(body, r.body());
  QB_TRY(v, parse_vnc(*body));
  return Command{SetVncCmd{r.name(), std::move(*v)}};
}

Result<Command> remove_vnc(const Request& r) {
  QB_TRY(empty, r.empty_body());
  return Command{RemoveVncCmd{r.name()}};
}

Result<Command> save_domain(const Request& r) {
  QB_TRY(body, r.body());
  QB_TRY(req, parse_save(*body));
  return Command{SaveCmd{r.name(), std::move(*req)}};
}

Result<Command> cancel_job(const Request& r) {
  QB_TRY(empty, r.empty_body());
  return Command{CancelJobCmd{r.name()}};
}

Result<Command> restore_domain(const Request& r) {
  QB_TRY(body, r.body());
  QB_TRY(req, parse_restore(*body));
  return Command{RestoreCmd{std::move(*req)}};
}

Result<Command> migrate_domain(const Request& r) {
  QB_TRY(body, r.body());
  QB_TRY(req, parse_migrate(*body));
  return Command{MigrateCmd{r.name(), std::move(*req)}};
}

Result<Command> prepare_incoming(const Request& r) {
  QB_TRY(body, r.body());
  QB_TRY(req, parse_incoming(*body));
  return Command{IncomingCmd{std::move(*req)}};
}

Result<Command> qmp_passthrough(const Request& r) {
  QB_TRY(body, r.body());
  QB_TRY(command, parse_qmp_passthrough(*body));
  return Command{QmpCmd{r.name(), std::move(*command)}};
}

#undef QB_TRY

struct Handler {
  std::string_view operation;  // as in kRoutes
  std::array<std::string_view, 2> query_keys;  // the query parameters the route takes
  Result<Command> (*build)(const Request&);
};

constexpr std::array kHandlers{
    Handler{"getVersion", {}, get_version},
    Handler{"listDomains", {"usage"}, list_domains},
    Handler{"createDomain", {}, create_domain},
    Handler{"getDomain", {"live"}, get_domain},
    Handler{"destroyDomain", {"graceful", "purge_nvram"}, destroy_domain},
    Handler{"pauseDomain", {}, run_state<RunOp::pause>},
    Handler{"resumeDomain", {}, run_state<RunOp::resume>},
    Handler{"shutdownDomain", {}, run_state<RunOp::shutdown>},
    Handler{"resetDomain", {}, run_state<RunOp::reset>},
    Handler{"insertMedium", {}, insert_medium},
    Handler{"ejectMedium", {"force"}, eject_medium},
    Handler{"addDisk", {}, add_disk},
    Handler{"removeDisk", {}, remove_disk},
    Handler{"addNic", {}, add_nic},
    Handler{"removeNic", {}, remove_nic},
    Handler{"setVnc", {}, set_vnc},
    Handler{"removeVnc", {}, remove_vnc},
    Handler{"saveDomain", {}, save_domain},
    Handler{"restoreDomain", {}, restore_domain},
    Handler{"prepareIncoming", {}, prepare_incoming},
    Handler{"migrateDomain", {}, migrate_domain},
    Handler{"cancelJob", {}, cancel_job},
    Handler{"qmpPassthrough", {}, qmp_passthrough},
    Handler{"watchEvents", {"domain"}, watch_events},
    Handler{"getMetrics", {}, get_metrics},
    Handler{"getXen", {}, get_xen},
    Handler{"getPool", {}, get_pool},
};

// What route() reads of a request. The Content-Type is checked only when given: the
// three-argument route() takes its body as JSON.
struct Incoming {
  http::verb method;
  std::string_view method_name;  // as sent: an unknown method has no verb of its own
  std::string_view target;
  std::string_view body;
  std::optional<std::string_view> content_type;
};

std::string_view trimmed(std::string_view s) {
  auto first = s.find_first_not_of(" \t");
  if (first == std::string_view::npos) return {};
  return s.substr(first, s.find_last_not_of(" \t") - first + 1);
}

// application/json, with parameters (RFC 9110 8.3.1); a charset, if named, is UTF-8, the one
// JSON has (RFC 8259 8.1).
bool is_json_media_type(std::string_view content_type) {
  auto semi = content_type.find(';');
  if (!boost::beast::iequals(trimmed(content_type.substr(0, semi)), "application/json")) {
    return false;
  }
  while (semi != std::string_view::npos) {
    content_type.remove_prefix(semi + 1);
    semi = content_type.find(';');
    auto param = content_type.substr(0, semi);
    auto eq = param.find('=');
    if (eq == std::string_view::npos) continue;
    if (!boost::beast::iequals(trimmed(param.substr(0, eq)), "charset")) continue;
    auto value = trimmed(param.substr(eq + 1));
    if (value.size() >= 2 && value.front() == '"' && value.back() == '"') {
      value = value.substr(1, value.size() - 2);
    }
    if (!boost::beast::iequals(value, "utf-8")) return false;
  }
  return true;
}

// A body is JSON and says so. What a browser may send across origins without asking first
// (text/plain, a form) never reaches a handler, should the socket ever be bridged to TCP.
Result<void> check_media_type(const Incoming& in) {
  if (!in.content_type || in.body.empty() || is_json_media_type(*in.content_type)) return {};
  std::string given = in.content_type->empty() ? "none" : std::string(*in.content_type);
  return make(api::errc::unsupported_media_type,
              "the body must be sent as Content-Type: application/json, not " + given);
}

// The query is checked before the body, so an unknown parameter is named even when the body is
// wrong too.
Result<Command> build(std::string_view op, const std::map<std::string_view, std::string>& params,
                      const Query& query, const Incoming& in) {
  auto h = std::find_if(kHandlers.begin(), kHandlers.end(),
                        [&](const Handler& x) { return x.operation == op; });
  if (h == kHandlers.end()) {
    return Error(make_error_code(broker::errc::internal),
                 "route without a handler: " + std::string(op));
  }
  if (auto ok = query.only(h->query_keys); !ok) return ok.error();
  if (auto ok = check_media_type(in); !ok) return ok.error();
  return h->build(Request{params, query, in.body});
}

// The methods some route takes. Any other (HEAD, OPTIONS, PATCH, an unknown token) is a
// method the server does not implement (RFC 9110 15.6.2).
bool implemented(http::verb method) {
  return std::any_of(kRoutes.begin(), kRoutes.end(),
                     [&](const RouteInfo& r) { return r.method == method; });
}

// The route for a method and decoded segments, with its path parameters; or 405 when another
// method has the path, 501 for a method no route takes on a path no route has, or 404.
Result<std::pair<const RouteInfo*, Params>> select_route(http::verb method,
                                                         std::string_view method_name,
                                                         const Target& t, std::string_view target) {
  const RouteInfo* best = nullptr;
  bool path_known = false;
  Params params;
  for (const auto& r : kRoutes) {
    Params p;
    if (!matches(r, t.segments, &p)) continue;
    path_known = true;
    if (r.method != method) continue;
    if (best == nullptr || literal_count(r) > literal_count(*best)) {
      best = &r;
      params = std::move(p);
    }
  }
  if (best != nullptr) return std::pair{best, std::move(params)};
  std::string path(target.substr(0, target.find('?')));
  if (path_known) {
    return make(api::errc::method_not_allowed,
                std::string(method_name) + " is not allowed on " + path);
  }
  if (!implemented(method)) {
    return make(api::errc::method_not_implemented,
                std::string(method_name) + " is not a method this server implements");
  }
  return make(api::errc::no_route, "no route for " + std::string(method_name) + " " + path);
}

// Path parameters become QEMU ids and file names: the same rule as every other name.
Result<std::map<std::string_view, std::string>> valid_params(Params params) {
  std::map<std::string_view, std::string> out;
  for (auto& [key, value] : params) {
    if (!lifecycle::valid_name(value)) {
      return field_error(
          key, "must be 1-64 characters of A-Z a-z 0-9 _ . - starting with a letter or digit");
    }
    out.emplace(key, std::move(value));
  }
  return out;
}

}  // namespace

std::span<const RouteInfo> routes() {
  return kRoutes;
}

std::size_t route_index(http::verb method, std::string_view target) {
  auto t = parse_target(target);
  if (!t) return kRoutes.size();
  auto selected = select_route(method, http::to_string(method), *t, target);
  if (!selected) return kRoutes.size();
  return static_cast<std::size_t>(selected->first - kRoutes.data());
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

namespace {

Result<Command> route_incoming(const Incoming& in) {
  auto t = parse_target(in.target);
  if (!t) return t.error();
  auto selected = select_route(in.method, in.method_name, *t, in.target);
  if (!selected) return selected.error();
  auto params = valid_params(std::move(selected->second));
  if (!params) return params.error();
  return build(selected->first->operation, *params, Query(t->query), in);
}

}  // namespace

Result<Command> route(http::verb method, std::string_view target, std::string_view body) {
  return route_incoming(Incoming{method, http::to_string(method), target, body, std::nullopt});
}

Result<Command> route(const http::request<http::string_body>& req) {
  return route_incoming(Incoming{req.method(), req.method_string(), req.target(), req.body(),
                                 req[http::field::content_type]});
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

Outcome metrics_outcome(const metrics::Registry& registry, metrics::Live live) {
  // Built once: the labels name the routes for as long as the daemon runs.
  static const auto labels = [] {
    std::vector<std::pair<std::string_view, std::string_view>> out;
    for (const auto& r : kRoutes) out.emplace_back(http::to_string(r.method), r.path);
    return out;
  }();
  live.routes = labels;
  Outcome o;
  o.text = registry.render(live);
  return o;
}

http::response<http::string_body> render(const Outcome& outcome, unsigned version,
                                         bool keep_alive) {
  http::response<http::string_body> res{outcome.status, version};
  res.set(http::field::server, kServerName);
  res.set(http::field::cache_control, "no-store");
  if (outcome.text) {
    res.set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
    res.body() = *outcome.text;
  } else {
    res.set(http::field::content_type, "application/json");
    res.body() = json::serialize(outcome.body);
    res.body().push_back('\n');
  }
  for (const auto& [k, v] : outcome.headers) res.set(k, v);
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
