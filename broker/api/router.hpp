// broker/api is the HTTP front end of the Broker: this pure router, the one error map, the Service
// and the Beast server.
//
// The control endpoint's pure half: route() turns a method, a target and a body into a
// validated Command, and render() turns an Outcome into an HTTP response (style point 2).
// Neither touches a socket or a domain, so tests call them directly; broker/api/server.cpp is
// transport only and broker/api/service.cpp runs Commands against the Broker.
//
// Targets are read with Boost.URL as RFC 3986 origin-form: an absolute path and a query,
// percent-decoded once. A malformed escape, an encoded NUL, a character that must be encoded or
// a fragment is a 400 before any route is looked at. Each route takes at most two query
// parameters; any other is refused by name, and of a repeated one the first counts.
//
// The route table (routes()) is the single list of what the API offers: the router matches
// against it, docs/api.yaml must list exactly the same routes (tests/api/openapi_test.cpp), and
// qbrokerctl has a subcommand for each (tests/api/ctl_test.cpp).
#pragma once

#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/verb.hpp>
#include <boost/json/value.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "broker/core/error.hpp"
#include "broker/core/metrics.hpp"
#include "broker/control/broker.hpp"
#include "broker/domain/requests.hpp"

namespace broker::api {

namespace http = boost::beast::http;

// One validated command per route.
struct GetVersion {};
struct ListDomains {
  bool usage = false;  // ?usage=true: each domain's cgroup usage too
};
struct CreateDomainCmd {
  CreateDomain request;
};
struct GetDomain {
  std::string name;
  bool live = true;  // ?live=false skips the QMP query-status
};
struct DestroyDomain {
  std::string name;
  bool graceful = false;     // ?graceful=true: QMP quit before the kill by uid
  bool purge_nvram = false;  // ?purge_nvram=true: also remove the UEFI variable store
};
enum class RunOp { pause, resume, shutdown, reset };
struct RunStateCmd {
  std::string name;
  RunOp op = RunOp::pause;
};
struct InsertMediumCmd {
  std::string name;
  std::string cdrom;
  InsertMedium medium;
};
struct EjectMediumCmd {
  std::string name;
  std::string cdrom;
  bool force = false;
};
struct AddDiskCmd {
  std::string name;
  DiskSpec disk;
};
struct RemoveDiskCmd {
  std::string name;
  std::string id;
};
struct AddNicCmd {
  std::string name;
  NicSpec nic;
};
struct RemoveNicCmd {
  std::string name;
  std::string id;
};
struct SetVncCmd {
  std::string name;
  VncSpec vnc;
};
struct RemoveVncCmd {
  std::string name;
};
struct SaveCmd {
  std::string name;
  SaveRequest request;
};
struct CancelJobCmd {
  std::string name;
};
struct RestoreCmd {
  RestoreRequest request;
};
struct MigrateCmd {
  std::string name;
  MigrateRequest request;
};
struct IncomingCmd {
  IncomingDomain request;
};
struct QmpCmd {
  std::string name;
  QmpPassthrough command;
};
struct WatchEvents {
  std::string domain;  // empty: every domain
};
struct GetMetrics {};
struct GetXen {};
struct GetPool {};

using Command = std::variant<GetVersion, ListDomains, CreateDomainCmd, GetDomain, DestroyDomain,
                             RunStateCmd, InsertMediumCmd, EjectMediumCmd, AddDiskCmd,
                             RemoveDiskCmd, AddNicCmd, RemoveNicCmd, SetVncCmd, RemoveVncCmd,
                             SaveCmd, RestoreCmd, MigrateCmd, IncomingCmd, CancelJobCmd, QmpCmd,
                             WatchEvents, GetMetrics, GetXen, GetPool>;

struct RouteInfo {
  http::verb method;
  std::string_view path;       // OpenAPI template: "/v1/domains/{name}/disks/{id}"
  std::string_view operation;  // operationId in docs/api.yaml
  std::string_view summary;
};

// Every route, in the order docs/api.md presents them.
std::span<const RouteInfo> routes();

// The Command for a request, or the error to answer with (api::errc::no_route,
// method_not_allowed, method_not_implemented, malformed_json, or broker::errc::invalid_argument
// naming the field). The body is taken as JSON.
Result<Command> route(http::verb method, std::string_view target, std::string_view body);

// The same for a whole request, whose body must also be declared JSON: a body with any
// Content-Type but application/json (parameters allowed; a charset must be utf-8), or with none,
// is api::errc::unsupported_media_type (415). Checked after the route and its query are known
// and before the body is read.
Result<Command> route(const http::request<http::string_body>& req);

// The index in routes() of the route a request goes to, or routes().size() when none does; for
// counting requests by route.
std::size_t route_index(http::verb method, std::string_view target);

// The methods a path accepts (for the Allow header of a 405), empty when no route matches it.
std::vector<http::verb> allowed_methods(std::string_view target);

// What a handled request produced: a status, a JSON body and extra headers.
struct Outcome {
  http::status status = http::status::ok;
  boost::json::value body;
  std::vector<std::pair<std::string, std::string>> headers;
  // A body that is not JSON, sent instead of `body` as is: the Prometheus text of GET /metrics.
  std::optional<std::string> text;
};

Outcome failure(const Error& e);
Outcome version_outcome(boost::json::object qemu);
Outcome domain_outcome(const DomainInfo& info, http::status status = http::status::ok);
Outcome domains_outcome(const std::vector<DomainInfo>& list);
Outcome kill_outcome(const std::string& name, const lifecycle::KillReport& report);
Outcome vnc_outcome(const std::string& name, const VncState& vnc);
Outcome qmp_outcome(boost::json::value reply);
// The Prometheus text of `registry` and `live`, requests labelled with the routes of routes().
Outcome metrics_outcome(const metrics::Registry& registry, metrics::Live live);
boost::json::object kill_report_json(const lifecycle::KillReport& report);

// The HTTP response for an outcome. `keep_alive` comes from the request (and is forced off for
// errors after which the connection cannot be reused).
http::response<http::string_body> render(const Outcome& outcome, unsigned version, bool keep_alive);

// Server-sent event framing for GET /v1/events: "id: N\nevent: KIND\ndata: JSON\n\n".
std::string sse_frame(const BusEvent& event);

inline constexpr std::string_view kServerName = "qbrokerd/0.1.0";
inline constexpr std::string_view kBrokerVersion = "0.1.0";

}  // namespace broker::api
