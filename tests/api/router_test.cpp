// The router and the renderer are pure functions: every route, every refusal, every error shape,
// with no socket, no root and no sleep.
#include "broker/api/router.hpp"

#include <boost/json.hpp>

#include "broker/api/errc.hpp"
#include "broker/api/http_errors.hpp"
#include "broker/core/errc.hpp"
#include "broker/lifecycle/errc.hpp"
#include "fdpass/errc.hpp"
#include "qmp/error.hpp"
#include "support/broker_printers.hpp"
#include "support/support.hpp"

namespace api = broker::api;
namespace json = boost::json;
using verb = boost::beast::http::verb;
using status = boost::beast::http::status;

namespace {

api::Command ok(verb m, std::string_view target, std::string_view body = {}) {
  auto r = api::route(m, target, body);
  INFO(target << " " << body);
  if (!r) FAIL(r.error().describe());
  return *r;
}

broker::Error refused(verb m, std::string_view target, std::string_view body = {}) {
  auto r = api::route(m, target, body);
  INFO(target << " " << body);
  REQUIRE_FALSE(r);
  return r.error();
}

status status_of(const broker::Error& e) {
  return api::classify(e.code).status;
}

}  // namespace

TEST_CASE("every route in the table routes to its command", "[api][router]") {
  CHECK(std::holds_alternative<api::GetVersion>(ok(verb::get, "/v1/version")));
  CHECK(std::holds_alternative<api::ListDomains>(ok(verb::get, "/v1/domains")));

  auto create = ok(verb::post, "/v1/domains",
                   R"({"name":"vm1","memory_mib":64,"kernel":"/srv/k","cdroms":[{"id":"cd0"}],
                       "disks":[{"id":"d0","path":"/srv/d.img","bus":"virtio"}],
                       "nics":[{"id":"n0","tap":"tap0"}],"vnc":{"listen":"127.0.0.1:0"}})");
  auto& c = std::get<api::CreateDomainCmd>(create);
  CHECK(c.request.spec.name == "vm1");
  CHECK(c.request.spec.memory_mib == 64);
  CHECK(c.request.cdroms.size() == 1);
  CHECK(c.request.disks.at(0).bus == broker::DiskBus::virtio);
  CHECK(c.request.nics.at(0).tap == "tap0");
  CHECK(c.request.vnc->listen.host == "127.0.0.1");
  CHECK(c.request.vnc->listen.port == 0);

  auto get = std::get<api::GetDomain>(ok(verb::get, "/v1/domains/vm1"));
  CHECK(get.name == "vm1");
  CHECK(get.live);
  CHECK_FALSE(std::get<api::GetDomain>(ok(verb::get, "/v1/domains/vm1?live=false")).live);

  auto del = std::get<api::DestroyDomain>(ok(verb::delete_, "/v1/domains/vm1"));
  CHECK(del.name == "vm1");
  CHECK_FALSE(del.graceful);
  CHECK(std::get<api::DestroyDomain>(ok(verb::delete_, "/v1/domains/vm1?graceful=true")).graceful);
  CHECK_FALSE(del.purge_nvram);
  auto both = std::get<api::DestroyDomain>(
      ok(verb::delete_, "/v1/domains/vm1?purge_nvram=true&graceful=true"));
  CHECK(both.purge_nvram);
  CHECK(both.graceful);

  for (auto [path, op] :
       {std::pair{"pause", api::RunOp::pause}, std::pair{"resume", api::RunOp::resume},
        std::pair{"shutdown", api::RunOp::shutdown}, std::pair{"reset", api::RunOp::reset}}) {
    auto rs = std::get<api::RunStateCmd>(ok(verb::post, "/v1/domains/vm1/" + std::string(path)));
    CHECK(rs.op == op);
    // An empty object is as good as no body.
    CHECK(std::holds_alternative<api::RunStateCmd>(
        ok(verb::post, "/v1/domains/vm1/" + std::string(path), "{}")));
  }

  auto ins = std::get<api::InsertMediumCmd>(ok(verb::put, "/v1/domains/vm1/cdroms/cd0/medium",
                                               R"({"path":"/srv/iso/x.iso","force":true})"));
  CHECK(ins.cdrom == "cd0");
  CHECK(ins.medium.path == "/srv/iso/x.iso");
  CHECK(ins.medium.force);
  CHECK_FALSE(
      std::get<api::EjectMediumCmd>(ok(verb::delete_, "/v1/domains/vm1/cdroms/cd0/medium")).force);
  CHECK(std::get<api::EjectMediumCmd>(
            ok(verb::delete_, "/v1/domains/vm1/cdroms/cd0/medium", R"({"force":true})"))
            .force);
  CHECK(std::get<api::EjectMediumCmd>(
            ok(verb::delete_, "/v1/domains/vm1/cdroms/cd0/medium?force=true"))
            .force);

  auto disk = std::get<api::AddDiskCmd>(
      ok(verb::post, "/v1/domains/vm1/disks",
         R"({"id":"d1","path":"/srv/d1.qcow2","format":"qcow2","read_only":true})"));
  CHECK(disk.disk.format == broker::DiskFormat::qcow2);
  CHECK(disk.disk.read_only);
  CHECK(std::get<api::RemoveDiskCmd>(ok(verb::delete_, "/v1/domains/vm1/disks/d1")).id == "d1");
  CHECK(std::get<api::AddNicCmd>(
            ok(verb::post, "/v1/domains/vm1/nics", R"({"id":"n1","mac":"52:54:00:12:34:56"})"))
            .nic.mac == "52:54:00:12:34:56");
  CHECK(std::get<api::RemoveNicCmd>(ok(verb::delete_, "/v1/domains/vm1/nics/n1")).id == "n1");
  CHECK(std::get<api::SetVncCmd>(
            ok(verb::put, "/v1/domains/vm1/vnc", R"({"listen":"unix:/run/v.sock"})"))
            .vnc.listen.text() == "unix:/run/v.sock");
  CHECK(std::holds_alternative<api::RemoveVncCmd>(ok(verb::delete_, "/v1/domains/vm1/vnc")));
  CHECK(std::get<api::SaveCmd>(
            ok(verb::post, "/v1/domains/vm1/save", R"({"path":"/srv/s/vm1.state"})"))
            .request.path == "/srv/s/vm1.state");
  CHECK(std::get<api::SaveCmd>(ok(verb::post, "/v1/domains/vm1/save",
                                  R"({"path":"/srv/s/vm1.state","keep_running":true})"))
            .request.keep_running);
  CHECK(std::get<api::CancelJobCmd>(ok(verb::delete_, "/v1/domains/vm1/job")).name == "vm1");
  auto restore = std::get<api::RestoreCmd>(
      ok(verb::post, "/v1/domains/restore", R"({"path":"/srv/s/vm1.state","name":"vm2"})"));
  CHECK(restore.request.name == "vm2");
  CHECK(std::get<api::MigrateCmd>(
            ok(verb::post, "/v1/domains/vm1/migrate", R"({"to":"unix:/run/b2.sock"})"))
            .name == "vm1");
  auto q =
      std::get<api::QmpCmd>(ok(verb::post, "/v1/domains/vm1/qmp", R"({"execute":"query-status"})"));
  CHECK(q.command.execute == "query-status");
  CHECK(q.command.arguments.empty());
  CHECK(std::get<api::WatchEvents>(ok(verb::get, "/v1/events")).domain.empty());
  CHECK(std::get<api::WatchEvents>(ok(verb::get, "/v1/events?domain=vm1")).domain == "vm1");
}

TEST_CASE("a domain named like a literal route segment is still a domain", "[api][router]") {
  CHECK(std::get<api::GetDomain>(ok(verb::get, "/v1/domains/restore")).name == "restore");
  CHECK(std::holds_alternative<api::RestoreCmd>(
      ok(verb::post, "/v1/domains/restore", R"({"path":"/s","name":"restore"})")));
}

TEST_CASE("unknown paths are 404 and wrong methods 405 with the allowed ones", "[api][router]") {
  auto e = refused(verb::get, "/v1/nothing");
  CHECK(e.code == api::errc::no_route);
  CHECK(status_of(e) == status::not_found);
  CHECK(refused(verb::get, "/v1/domains/").code == api::errc::no_route);
  CHECK(refused(verb::get, "/v2/domains").code == api::errc::no_route);
  CHECK(refused(verb::get, "v1/domains").code == api::errc::bad_request);

  auto m = refused(verb::patch, "/v1/domains/vm1");
  CHECK(m.code == api::errc::method_not_allowed);
  CHECK(status_of(m) == status::method_not_allowed);
  auto allowed = api::allowed_methods("/v1/domains/vm1");
  CHECK(allowed == std::vector<verb>{verb::get, verb::delete_});
  CHECK(refused(verb::get, "/v1/domains/vm1/pause").code == api::errc::method_not_allowed);
}

TEST_CASE("a method no route takes is 501 where no route has the path, 405 where one has",
          "[api][router]") {
  for (verb m : {verb::head, verb::options, verb::patch, verb::trace}) {
    auto e = refused(m, "/v1/nothing");
    INFO(boost::beast::http::to_string(m));
    CHECK(e.code == api::errc::method_not_implemented);
    CHECK(status_of(e) == status::not_implemented);
    CHECK(api::classify(e.code).code == "method_not_implemented");
  }
  // The path exists: the Allow header tells the client what to use instead.
  CHECK(refused(verb::head, "/v1/version").code == api::errc::method_not_allowed);
  CHECK(refused(verb::patch, "/v1/domains/vm1").code == api::errc::method_not_allowed);
  // A method the server does take, on a path no route has, is still 404.
  CHECK(refused(verb::delete_, "/v1/nothing").code == api::errc::no_route);
  // A token Beast has no verb for is named as it was sent.
  boost::beast::http::request<boost::beast::http::string_body> brew;
  brew.method_string("BREW");
  brew.target("/v1/pot");
  auto r = api::route(brew);
  REQUIRE_FALSE(r);
  CHECK(r.error().code == api::errc::method_not_implemented);
  CHECK(r.error().message.find("BREW") != std::string::npos);
  brew.target("/v1/version");
  r = api::route(brew);
  REQUIRE_FALSE(r);
  CHECK(r.error().code == api::errc::method_not_allowed);
  CHECK(r.error().message == "BREW is not allowed on /v1/version");
}

TEST_CASE("malformed JSON and wrong types are 400 naming the field", "[api][router][bad-input]") {
  auto e = refused(verb::post, "/v1/domains", R"({"name": "vm1", )");
  CHECK(e.code == api::errc::malformed_json);
  CHECK(e.field == "body");
  CHECK(status_of(e) == status::bad_request);
  CHECK(e.message.find("byte") != std::string::npos);

  CHECK(refused(verb::post, "/v1/domains", R"({"name":"a"} trailing)").code ==
        api::errc::malformed_json);
  CHECK(refused(verb::post, "/v1/domains", "\xff\xfe").code == api::errc::malformed_json);
  // Deep nesting is refused by the parser, not by the stack.
  std::string deep(10000, '[');
  CHECK(refused(verb::post, "/v1/domains", deep).code == api::errc::malformed_json);

  auto t = refused(verb::post, "/v1/domains", R"({"name":"vm1","memory_mib":"lots"})");
  CHECK(t.code == broker::errc::invalid_argument);
  CHECK(t.field == "memory_mib");
  auto arr = refused(verb::post, "/v1/domains", "[1,2]");
  CHECK(arr.field == "body");
  auto b = refused(verb::put, "/v1/domains/vm1/cdroms/cd0/medium", R"({"path":42})");
  CHECK(b.field == "path");
  auto f =
      refused(verb::put, "/v1/domains/vm1/cdroms/cd0/medium", R"({"path":"/x","force":"yes"})");
  CHECK(f.field == "force");
  auto missing = refused(verb::put, "/v1/domains/vm1/cdroms/cd0/medium", "");
  CHECK(missing.code == broker::errc::invalid_argument);

  // A boot order names disks and CDs of the same request, and nothing else.
  auto boot = refused(verb::post, "/v1/domains",
                      R"({"name":"vm1","boot_order":["cd0","d9"],"cdroms":[{"id":"cd0"}]})");
  CHECK(boot.field == "boot_order");
  CHECK(boot.message.find("'d9'") != std::string::npos);
  auto nic = refused(verb::post, "/v1/domains",
                     R"({"name":"vm1","boot_order":["n0"],"nics":[{"id":"n0"}]})");
  CHECK(nic.field == "boot_order");
  auto uefi_kernel = refused(verb::post, "/v1/domains", R"({"name":"vm1","kernel":"/k","firmware":"uefi"})");
  CHECK(uefi_kernel.field == "firmware");
}

TEST_CASE("a migration's copy_storage and disk_paths are checked by field", "[api][router][bad-input]") {
  const std::string route = "/v1/domains/vm1/migrate";
  auto copy = std::get<api::MigrateCmd>(
      ok(verb::post, route, R"({"to":"/run/b2.sock","copy_storage":true,"disk_paths":{"d0":"/srv/b/d0.img"}})"));
  CHECK(copy.request.to == "/run/b2.sock");
  CHECK(copy.request.copy_storage);
  CHECK(copy.request.disk_paths == std::map<std::string, std::string>{{"d0", "/srv/b/d0.img"}});
  auto plain = std::get<api::MigrateCmd>(ok(verb::post, route, R"({"to":"/run/b2.sock"})"));
  CHECK_FALSE(plain.request.copy_storage);
  CHECK(plain.request.disk_paths.empty());

  CHECK(refused(verb::post, route, R"({"to":"/b.sock","copy_storage":"yes"})").field == "copy_storage");
  // disk_paths only with copy_storage, an object of disk ids to absolute paths.
  CHECK(refused(verb::post, route, R"({"to":"/b.sock","disk_paths":{"d0":"/x"}})").field == "disk_paths");
  CHECK(refused(verb::post, route, R"({"to":"/b.sock","copy_storage":true,"disk_paths":["/x"]})").field ==
        "disk_paths");
  CHECK(refused(verb::post, route, R"({"to":"/b.sock","copy_storage":true,"disk_paths":{"d0":"x.img"}})")
            .field == "disk_paths.d0");
  CHECK(refused(verb::post, route, R"({"to":"/b.sock","copy_storage":true,"disk_paths":{"d0":7}})")
            .field == "disk_paths.d0");
  CHECK(refused(verb::post, route, R"({"to":"/b.sock","copy_storage":true,"disk_paths":{"../d":"/x"}})")
            .field == "disk_paths.../d");
  // The destination's side takes copy_storage as a flag.
  auto in = std::get<api::IncomingCmd>(
      ok(verb::post, "/v1/migrations", R"({"domain":{},"copy_storage":true})"));
  CHECK(in.request.copy_storage);
  CHECK(refused(verb::post, "/v1/migrations", R"({"domain":{},"copy_storage":1})").field == "copy_storage");
}

TEST_CASE("a key twice in one JSON object is 400 naming it, at any depth",
          "[api][router][bad-input]") {
  auto top =
      refused(verb::post, "/v1/domains", R"({"name":"vm1","memory_mib":64,"memory_mib":4096})");
  CHECK(top.code == api::errc::duplicate_key);
  CHECK(status_of(top) == status::bad_request);
  CHECK(top.field == "memory_mib");
  CHECK(api::classify(top.code).code == "duplicate_key");
  // Keys are compared as decoded: an escape does not make a second name.
  CHECK(refused(verb::post, "/v1/domains", R"({"name":"vm1","n\u0061me":"vm2"})").field == "name");
  CHECK(refused(verb::post, "/v1/domains",
                R"({"name":"vm1","kernel":"/k","disks":[{"id":"d0","path":"/a"},)"
                R"({"id":"d1","path":"/a","path":"/b"}]})")
            .field == "disks[1].path");
  CHECK(refused(verb::put, "/v1/domains/vm1/vnc", R"({"listen":"127.0.0.1:0","listen":"unix:/x"})")
            .field == "listen");
  CHECK(
      refused(verb::post, "/v1/domains", R"({"name":"vm1","vnc":{"listen":"a:1","listen":"b:2"}})")
          .field == "vnc.listen");
  // Nothing of the QMP arguments is read by the broker, and still no key counts twice.
  CHECK(refused(verb::post, "/v1/domains/vm1/qmp",
                R"({"execute":"x","arguments":{"l":[[1],[{"k":1,"k":2}]]}})")
            .field == "arguments.l[1][0].k");
  // Before the body is read for its meaning: even an unknown key is named as the duplicate.
  CHECK(refused(verb::post, "/v1/domains/vm1/pause", R"({"x":1,"x":1})").code ==
        api::errc::duplicate_key);
  // The same key in two objects is two keys.
  auto two = ok(
      verb::post, "/v1/domains",
      R"({"name":"vm1","kernel":"/k","disks":[{"id":"d0","path":"/a"},{"id":"d1","path":"/b"}]})");
  CHECK(std::get<api::CreateDomainCmd>(two).request.disks.size() == 2);
}

namespace {

boost::beast::http::request<boost::beast::http::string_body> request(
    verb m, std::string_view target, std::string body, std::optional<std::string> content_type) {
  boost::beast::http::request<boost::beast::http::string_body> req{m, target, 11};
  if (content_type) req.set(boost::beast::http::field::content_type, *content_type);
  req.body() = std::move(body);
  req.prepare_payload();
  return req;
}

}  // namespace

TEST_CASE("a body is application/json or the request is 415", "[api][router][bad-input]") {
  const std::string create = R"({"name":"vm1","memory_mib":64})";
  for (std::string type :
       {"application/json", "APPLICATION/JSON", "application/json; charset=utf-8",
        "application/json;charset=\"UTF-8\"", " application/json ; q=1"}) {
    INFO(type);
    auto r = api::route(request(verb::post, "/v1/domains", create, type));
    REQUIRE(r);
    CHECK(std::get<api::CreateDomainCmd>(*r).request.spec.memory_mib == 64);
  }
  // What a browser sends across origins without asking first, and anything else but JSON.
  for (std::optional<std::string> type :
       {std::optional<std::string>("text/plain"),
        std::optional<std::string>("text/plain;charset=UTF-8"),
        std::optional<std::string>("application/x-www-form-urlencoded"),
        std::optional<std::string>("multipart/form-data; boundary=x"),
        std::optional<std::string>("application/jsonx"),
        std::optional<std::string>("application/json; charset=latin1"),
        std::optional<std::string>(""), std::optional<std::string>()}) {
    INFO(type.value_or("(none)"));
    auto r = api::route(request(verb::post, "/v1/domains", create, type));
    REQUIRE_FALSE(r);
    CHECK(r.error().code == api::errc::unsupported_media_type);
    CHECK(status_of(r.error()) == status::unsupported_media_type);
  }
  // Without a body there is nothing to declare.
  CHECK(api::route(request(verb::post, "/v1/domains/vm1/pause", "", std::nullopt)));
  CHECK(api::route(request(verb::delete_, "/v1/domains/vm1", "", "text/plain")));
  // Even an empty object is a body.
  CHECK_FALSE(api::route(request(verb::post, "/v1/domains/vm1/pause", "{}", "text/plain")));
  // The route and its query come first; the body's meaning after.
  CHECK(api::route(request(verb::post, "/v1/nothing", "{}", "text/plain")).error().code ==
        api::errc::no_route);
  CHECK(api::route(request(verb::post, "/v1/domains?x=1", "{}", "text/plain")).error().field ==
        "x");
  CHECK(api::route(request(verb::post, "/v1/domains", "{", "text/plain")).error().code ==
        api::errc::unsupported_media_type);
}

TEST_CASE("unknown fields and query parameters are refused by name", "[api][router][bad-input]") {
  auto e = refused(verb::post, "/v1/domains", R"({"name":"vm1","memory":128})");
  CHECK(e.field == "memory");
  CHECK(e.message.find("unknown field") != std::string::npos);
  CHECK(refused(verb::post, "/v1/domains",
                R"({"name":"vm1","kernel":"/k","disks":[{"id":"d","path":"/x","cache":"none"}]})")
            .field == "disks[0].cache");
  CHECK(refused(verb::post, "/v1/domains/vm1/pause", R"({"now":true})").field == "now");
  CHECK(refused(verb::post, "/v1/domains/vm1/pause", R"("please")").field == "body");
  CHECK(refused(verb::get, "/v1/domains/vm1?verbose=1").field == "verbose");
  CHECK(refused(verb::get, "/v1/domains/vm1?live=maybe").field == "live");
  CHECK(refused(verb::get, "/v1/events?domain=../x").field == "domain");
  CHECK(refused(verb::post, "/v1/domains/vm1/qmp", R"({"execute":"query-status","id":1})").field ==
        "id");
}

TEST_CASE("path traversal in names and paths is refused", "[api][router][bad-input]") {
  for (std::string target :
       {"/v1/domains/..", "/v1/domains/.", "/v1/domains/..%2F..%2Fetc%2Fpasswd",
        "/v1/domains/vm1%00", "/v1/domains/%2e%2e", "/v1/domains/a%2Fb/pause"}) {
    auto r =
        api::route(target.find("pause") != std::string::npos ? verb::post : verb::get, target, {});
    INFO(target);
    REQUIRE_FALSE(r);
    CHECK(status_of(r.error()) == status::bad_request);
  }
  CHECK(refused(verb::get, "/v1/domains/..%2F..%2Fetc").field == "name");
  CHECK(refused(verb::delete_, "/v1/domains/vm1/disks/..").field == "id");
  // ".." as its own segments is a path no route has, not a walk up the tree.
  CHECK(refused(verb::get, "/v1/domains/vm1/../../version").code == api::errc::no_route);
  CHECK(refused(verb::get, "/v1/domains/%zz").code == api::errc::bad_request);
  // Image paths must be absolute; the image roots (openat2 RESOLVE_BENEATH) do the rest.
  CHECK(refused(verb::put, "/v1/domains/vm1/cdroms/cd0/medium", R"({"path":"../../etc/shadow"})")
            .field == "path");
}

TEST_CASE("the target is an RFC 3986 origin-form path and query, decoded once",
          "[api][router][bad-input]") {
  // Percent-encoded names decode to the name, in either case of hex digit.
  CHECK(std::get<api::GetDomain>(ok(verb::get, "/v1/domains/vm%2D1")).name == "vm-1");
  CHECK(std::get<api::GetDomain>(ok(verb::get, "/v1/domains/%76m%2d1")).name == "vm-1");
  auto ins = std::get<api::InsertMediumCmd>(
      ok(verb::put, "/v1/domains/vm1/cdroms/cd%30/medium", R"({"path":"/srv/x.iso"})"));
  CHECK(ins.cdrom == "cd0");
  // Decoded once: "%252F" is the three characters "%2F", not a slash.
  CHECK(refused(verb::get, "/v1/domains/a%252Fb").field == "name");

  // Malformed escapes, a NUL, characters that must be encoded and fragments are 400 before any
  // route is looked at.
  for (std::string target :
       {"/v1/domains/vm%", "/v1/domains/vm%4", "/v1/domains/vm%g1", "/v1/domains/a b",
        "/v1/domains/a{b}", "/v1/domains/vm1#top", "/v1/nothing%zz", "/v1/events?domain=vm%zz",
        "/v1/events?domain=%", "/v1/events?domain=vm1%00", "/v1/events?x%00=1",
        "/v1/events?domain=vm1#top", "http://localhost/v1/version", "*"}) {
    INFO(target);
    auto e = refused(verb::get, target);
    CHECK(e.code == api::errc::bad_request);
    CHECK(e.field.empty());
    CHECK(api::allowed_methods(target).empty());
  }

  // "/./" and "//" are segments of their own, not a way to another route.
  CHECK(refused(verb::get, "/./v1/version").code == api::errc::no_route);
  CHECK(refused(verb::get, "/.//v1/version").code == api::errc::no_route);
  CHECK(refused(verb::get, "//v1/version").code == api::errc::no_route);
  CHECK(refused(verb::get, "/v1//version").code == api::errc::no_route);
  CHECK(refused(verb::get, "/v1/%76ersion/").code == api::errc::no_route);
  CHECK(std::holds_alternative<api::GetVersion>(ok(verb::get, "/v1/%76ersion")));
}

TEST_CASE("query parameters: decoded, the first of a repeated one counts, unknown ones refused",
          "[api][router][bad-input]") {
  // Keys and values are decoded; '+' is a space in a query, as HTML forms write it.
  CHECK_FALSE(std::get<api::GetDomain>(ok(verb::get, "/v1/domains/vm1?li%76e=f%61lse")).live);
  CHECK(std::get<api::WatchEvents>(ok(verb::get, "/v1/events?domain=vm%2D1")).domain == "vm-1");
  CHECK(refused(verb::get, "/v1/version?a+b%2Bc=1").field == "a b+c");
  // Empty parameters are nothing; a bare key is true.
  CHECK(std::holds_alternative<api::GetVersion>(ok(verb::get, "/v1/version?")));
  CHECK(std::holds_alternative<api::GetVersion>(ok(verb::get, "/v1/version?&&")));
  CHECK(std::get<api::DestroyDomain>(ok(verb::delete_, "/v1/domains/vm1?graceful")).graceful);

  // A repeated parameter: the first one counts, whatever follows.
  CHECK_FALSE(std::get<api::GetDomain>(ok(verb::get, "/v1/domains/vm1?live=false&live=true")).live);
  CHECK(std::get<api::DestroyDomain>(
            ok(verb::delete_, "/v1/domains/vm1?graceful=true&graceful=false"))
            .graceful);
  CHECK(std::get<api::WatchEvents>(ok(verb::get, "/v1/events?domain=vm1&domain=vm2")).domain ==
        "vm1");

  // Each route knows its one parameter (or none); anything else is named, even an empty key,
  // and even when the known one is there too.
  CHECK(refused(verb::get, "/v1/version?x=1").field == "x");
  CHECK(refused(verb::get, "/v1/domains?live=false").field == "live");
  CHECK(refused(verb::get, "/v1/events?domain=vm1&verbose").field == "verbose");
  CHECK(refused(verb::get, "/v1/events?verbose=1&verbose=2").field == "verbose");
  CHECK(refused(verb::delete_, "/v1/domains/vm1/cdroms/cd0/medium?force=1&now=1").field == "now");
  CHECK(refused(verb::post, "/v1/domains/vm1/pause?force=true").field == "force");
  CHECK(refused(verb::get, "/v1/version?=x").field == "");
  CHECK(refused(verb::get, "/v1/version?=x").code == broker::errc::invalid_argument);
  // The query is checked before the body.
  CHECK(refused(verb::post, "/v1/domains?x=1", "{not json").field == "x");
}

TEST_CASE("the QMP passthrough refuses fd commands and capability negotiation", "[api][router]") {
  for (const char* cmd : {"add-fd", "getfd", "closefd", "remove-fd", "qmp_capabilities"}) {
    auto e = refused(verb::post, "/v1/domains/vm1/qmp",
                     std::string(R"({"execute":")") + cmd + R"(","arguments":{}})");
    INFO(cmd);
    CHECK(e.code == broker::errc::forbidden);
    CHECK(status_of(e) == status::forbidden);
    CHECK(e.field == "execute");
  }
  CHECK(refused(verb::post, "/v1/domains/vm1/qmp", R"({"arguments":{}})").field == "execute");
  CHECK(refused(verb::post, "/v1/domains/vm1/qmp", R"({"execute":"x","arguments":[]})").field ==
        "arguments");
}

// tests/api/http_errors_test.cpp walks every code of every module; these are the statuses users
// meet most.
TEST_CASE("the common error codes map to the documented statuses", "[api][errors]") {
  using B = broker::errc;
  CHECK(api::classify(B::invalid_argument).status == status::bad_request);
  CHECK(api::classify(B::not_found).status == status::not_found);
  CHECK(api::classify(B::busy).status == status::conflict);
  CHECK(api::classify(B::already_exists).status == status::conflict);
  CHECK(api::classify(B::qemu_timeout).status == status::gateway_timeout);
  CHECK(api::classify(B::qemu_error).status == status::bad_gateway);
  CHECK(api::classify(B::not_implemented).status == status::not_implemented);
  // A passthrough command QMP cannot encode is the caller's mistake.
  CHECK(api::classify(qmp::errc::invalid_command).status == status::bad_request);
  CHECK(api::classify(qmp::errc::command_failed).code == "qemu_error");
  CHECK(api::classify(fdpass::errc::outside_roots).status == status::bad_request);
  CHECK(api::classify(fdpass::errc::not_found).status == status::not_found);
  CHECK(api::classify(fdpass::errc::symlink).code == "symlink");
  // The image-root refusals: each its own code, all the request's fault.
  CHECK(api::classify(fdpass::errc::crosses_mount).code == "crosses_mount");
  CHECK(api::classify(fdpass::errc::hard_linked).code == "hard_linked");
  CHECK(api::classify(fdpass::errc::foreign_owner).code == "foreign_owner");
  CHECK(api::classify(fdpass::errc::hard_linked).status == status::bad_request);
  CHECK(api::classify(fdpass::errc::foreign_owner).status == status::bad_request);
  CHECK(api::classify(std::error_code(ENOENT, std::system_category())).code == "ENOENT");
  CHECK(api::classify(std::error_code(ENOENT, std::system_category())).status == status::not_found);
  CHECK(api::classify(api::errc::body_too_large).status == status::payload_too_large);
  CHECK(api::classify(api::errc::header_too_large).status ==
        status::request_header_fields_too_large);
  CHECK(api::classify(api::errc::request_timeout).status == status::request_timeout);
  CHECK(api::classify(api::errc::too_many_connections).status == status::service_unavailable);
  CHECK(api::classify(api::errc::unauthorized_peer).status == status::forbidden);
}

TEST_CASE("errors render as the documented JSON shape with QMP class and desc", "[api][render]") {
  broker::Error e(make_error_code(broker::errc::qemu_error), "device_add d1: Duplicate ID");
  e.qmp_class = "GenericError";
  e.qmp_desc = "Duplicate device ID 'd1'";
  auto res = api::render(api::failure(e), 11, true);
  CHECK(res.result() == status::bad_gateway);
  CHECK(res[boost::beast::http::field::content_type] == "application/json");
  auto body = json::parse(res.body()).as_object();
  const auto& err = body.at("error").as_object();
  CHECK(err.at("code") == "qemu_error");
  CHECK(err.at("message") == "device_add d1: Duplicate ID");
  CHECK(err.at("qmp").as_object().at("class") == "GenericError");
  CHECK(err.at("qmp").as_object().at("desc") == "Duplicate device ID 'd1'");
  CHECK_FALSE(err.contains("field"));

  auto f =
      api::render(api::failure(broker::field_error("memory_mib", "must be 16-65536")), 11, false);
  auto fb = json::parse(f.body()).as_object().at("error").as_object();
  CHECK(fb.at("field") == "memory_mib");
  CHECK(fb.at("code") == "invalid_argument");
  CHECK_FALSE(fb.contains("qmp"));
  CHECK_FALSE(f.keep_alive());
}

TEST_CASE("an error quoting bytes that are not UTF-8 still renders as JSON", "[api][render]") {
  // Overlong, surrogate, past U+10FFFF, a lone continuation, a bad lead, and two good sequences.
  const std::string quoted =
      "\xe0\x9e\x8f|\xed\xa0\x80|\xf4\x90\x80\x80|\x80|\xf5|\xe2\x82\xac|\xf0\x9f\x98\x80";
  broker::Error e(make_error_code(api::errc::unsupported_media_type), "not " + quoted);
  e.field = quoted;
  auto res = api::render(api::failure(e), 11, false);
  std::error_code ec;
  auto body = json::parse(res.body(), ec);
  REQUIRE_FALSE(ec);
  const auto& err = body.at("error");
  CHECK(err.at("message") ==
        "not \\xe0\\x9e\\x8f|\\xed\\xa0\\x80|\\xf4\\x90\\x80\\x80|\\x80|\\xf5|\xe2\x82\xac|\xf0\x9f\x98\x80");
  CHECK(err.at("field").as_string().starts_with("\\xe0"));
}

TEST_CASE("outcomes render domains and kill reports and events", "[api][render]") {
  broker::DomainInfo info;
  info.name = "vm1";
  info.state = broker::RunState::running;
  info.uid = 3'103'001;
  info.pid = 42;
  auto created = api::render(api::domain_outcome(info, status::created), 11, true);
  CHECK(created.result() == status::created);
  CHECK(created[boost::beast::http::field::location] == "/v1/domains/vm1");
  auto d = json::parse(created.body()).as_object();
  CHECK(d.at("name") == "vm1");
  CHECK(d.at("state") == "running");
  CHECK(d.at("uid") == 3'103'001);

  broker::lifecycle::KillReport k;
  k.uid = 3'103'001;
  k.found = 2;
  k.rounds = 1;
  k.method = "cgroup.kill+pidns-init+uid";
  k.duration = std::chrono::microseconds(1500);
  auto killed = json::parse(api::render(api::kill_outcome("vm1", k), 11, true).body()).as_object();
  CHECK(killed.at("kill_report").as_object().at("found") == 2);
  CHECK(killed.at("kill_report").as_object().at("duration_us") == 1500);

  broker::BusEvent ev;
  ev.seq = 7;
  ev.domain = "vm1";
  ev.kind = "qemu";
  ev.name = "STOP";
  auto frame = api::sse_frame(ev);
  CHECK(frame.rfind("id: 7\nevent: qemu\ndata: {", 0) == 0);
  CHECK(frame.substr(frame.size() - 2) == "\n\n");
  CHECK(std::count(frame.begin(), frame.end(), '\n') == 4);
}

TEST_CASE("GET /metrics answers Prometheus text, requests counted by their route's index",
          "[api][router][metrics]") {
  CHECK(std::holds_alternative<api::GetMetrics>(ok(verb::get, "/metrics")));
  CHECK(status_of(refused(verb::post, "/metrics")) == status::method_not_allowed);
  CHECK(status_of(refused(verb::get, "/metrics?x=1")) == status::bad_request);

  auto routes = api::routes();
  const auto metrics = api::route_index(verb::get, "/metrics");
  REQUIRE(metrics < routes.size());
  CHECK(routes[metrics].path == "/metrics");
  const auto domain = api::route_index(verb::get, "/v1/domains/vm1?live=false");
  REQUIRE(domain < routes.size());
  CHECK(routes[domain].path == "/v1/domains/{name}");
  CHECK(routes[api::route_index(verb::post, "/v1/domains/restore")].operation == "restoreDomain");
  CHECK(api::route_index(verb::get, "/nowhere") == routes.size());
  CHECK(api::route_index(verb::put, "/metrics") == routes.size());
  CHECK(routes.size() < broker::metrics::Registry::kUnrouted);  // each route has its own cell

  broker::metrics::Registry registry;
  registry.api_request(metrics, 200, std::chrono::microseconds(5));
  broker::metrics::Live live;
  live.proc_self.clear();
  auto res = api::render(api::metrics_outcome(registry, live), 11, true);
  CHECK(res[boost::beast::http::field::content_type] == "text/plain; version=0.0.4; charset=utf-8");
  CHECK(res.body().find("qbroker_api_requests_total{method=\"GET\",route=\"/metrics\",code=\"200\"} 1\n") !=
        std::string::npos);
}

TEST_CASE("GET /v1/domains takes ?usage", "[api][router]") {
  CHECK_FALSE(std::get<api::ListDomains>(ok(verb::get, "/v1/domains")).usage);
  CHECK(std::get<api::ListDomains>(ok(verb::get, "/v1/domains?usage=true")).usage);
  CHECK(status_of(refused(verb::get, "/v1/domains?usage=maybe")) == status::bad_request);
}
