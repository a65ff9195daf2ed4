// Fuzz target for the bodies of the two migration requests: POST /v1/migrations, which another
// broker (or an operator) sends a destination with the domain it is to take, and
// POST /v1/domains/{name}/migrate, which names the destination. Both are read as the router
// reads them: parse_json_body (the server's strict JSON: 64 levels, no repeated key), then
// parse_incoming and parse_migrate (broker/domain/requests).
//
// Input: a request body.
//
// Invariants checked (a violation aborts):
//  - nothing throws;
//  - a body that is not JSON is malformed_json naming "body", a repeated key is duplicate_key;
//  - every refusal of the parsers is invalid_argument naming a field of the request's schema
//    (docs/api.yaml: domain, paused and copy_storage, or to, copy_storage, disk_paths and
//    disk_paths.ID for an ID the body names; "body" for a body that is not an object), or, for
//    an unknown field, a key the body has and the schema does not;
//  - an accepted IncomingDomain, rendered as the source broker renders it (broker/control/
//    broker.cpp, migrate_out) and read again, gives the same domain, paused and copy_storage;
//    an accepted MigrateRequest, rendered again, gives the same request, and disk_paths only
//    comes with copy_storage;
//  - a described domain the destination can take (as broker/flows/migrate.cpp checks it:
//    domain_from_json with an empty instance), described again by described_domain_of, sent and
//    taken again, is described the same way: a domain moves on unchanged from broker to broker.
#include <algorithm>
#include <boost/json/serialize.hpp>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <string_view>

#include "broker/api/errc.hpp"
#include "broker/api/json_body.hpp"
#include "broker/core/errc.hpp"
#include "broker/domain/requests.hpp"
#include "broker/domain/state_file.hpp"
#include "broker/flows/flows.hpp"
#include "json_compare.hpp"

namespace {

namespace api = broker::api;
namespace json = boost::json;

// The line of the broken invariant goes to stderr: a crash report then says which it was.
void check(bool ok, int line = __builtin_LINE()) {
  if (ok) return;
  std::fprintf(stderr, "invariant broken at %s:%d\n", __FILE__, line);
  std::abort();
}

// The field a refusal names is one of the schema's, or the unknown key the body carried.
void check_refusal(const broker::Error& e, const json::value& body,
                   std::initializer_list<std::string_view> schema) {
  check(e.code == broker::errc::invalid_argument);
  if (e.field == "body") {
    check(!body.is_object());
    return;
  }
  check(body.is_object());
  const bool known = std::find(schema.begin(), schema.end(), e.field) != schema.end();
  check(known || body.as_object().contains(e.field));
  check(known != (e.message == e.field + ": unknown field"));
}

// What the source sends, read as the destination reads it.
broker::IncomingDomain sent(const json::value& domain, bool paused, bool copy_storage) {
  json::object ask{{"domain", domain}, {"paused", paused}};
  if (copy_storage) ask["copy_storage"] = true;
  const std::string text = json::serialize(ask);
  auto body = api::parse_json_body(text);
  check(body.has_value());
  auto req = broker::parse_incoming(*body);
  check(req.has_value());
  return std::move(*req);
}

// The destination's check of a described domain (described_domain in broker/flows/migrate.cpp).
broker::Result<std::shared_ptr<broker::Domain>> taken(const json::value& described) {
  json::object o = described.as_object();
  o["instance"] = json::object{{"uid", 0},  {"pid", 0},      {"start_time", 0}, {"accel", "tcg"},
                               {"qmp", ""}, {"console", ""}, {"log", ""}};
  return broker::domain_from_json(o);
}

void check_incoming(const json::value& body) {
  auto req = broker::parse_incoming(body);
  if (!req) {
    check_refusal(req.error(), body, {"domain", "paused", "copy_storage"});
    return;
  }
  check(req->domain.is_object());
  if (!qb_fuzz::all_finite(req->domain)) return;
  auto again = sent(req->domain, req->paused, req->copy_storage);
  check(qb_fuzz::same_json(again.domain, req->domain) && again.paused == req->paused &&
        again.copy_storage == req->copy_storage);
  auto d = taken(req->domain);
  if (!d) return;
  const json::value described = broker::flows::described_domain_of(**d);
  auto next = sent(described, req->paused, req->copy_storage);
  auto d2 = taken(next.domain);
  check(d2.has_value());
  check(qb_fuzz::same_json(broker::flows::described_domain_of(**d2), described));
}

// A refusal naming disk_paths.ID names an ID the body's disk_paths holds.
bool names_a_disk_path(const broker::Error& e, const json::value& body) {
  constexpr std::string_view kPrefix = "disk_paths.";
  if (!e.field.starts_with(kPrefix) || !body.is_object()) return false;
  const auto* paths = body.as_object().if_contains("disk_paths");
  return paths != nullptr && paths->is_object() &&
         paths->as_object().contains(std::string_view(e.field).substr(kPrefix.size()));
}

void check_migrate(const json::value& body) {
  auto req = broker::parse_migrate(body);
  if (!req) {
    if (names_a_disk_path(req.error(), body)) {
      check(req.error().code == broker::errc::invalid_argument);
      return;
    }
    check_refusal(req.error(), body, {"to", "copy_storage", "disk_paths"});
    return;
  }
  check(!req->to.empty());
  check(req->copy_storage || req->disk_paths.empty());
  json::object paths;
  for (const auto& [id, path] : req->disk_paths) paths[id] = path;
  json::object rendered{{"to", req->to}, {"copy_storage", req->copy_storage}};
  if (!paths.empty()) rendered["disk_paths"] = std::move(paths);
  auto again = api::parse_json_body(json::serialize(rendered));
  check(again.has_value());
  auto req2 = broker::parse_migrate(*again);
  check(req2.has_value() && req2->to == req->to && req2->copy_storage == req->copy_storage &&
        req2->disk_paths == req->disk_paths);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  auto body = api::parse_json_body(in);
  if (!body) {
    const auto& e = body.error();
    check((e.code == api::errc::malformed_json && e.field == "body") ||
          (e.code == api::errc::duplicate_key && !e.field.empty()));
    return 0;
  }
  check_incoming(*body);
  check_migrate(*body);
  return 0;
}
