// qbrokerctl's command line: every API route is a subcommand, each subcommand builds the right
// request, mistakes name the argument, and replies render as tables.
#include <boost/json.hpp>
#include <set>
#include <sstream>

#include "broker/api/router.hpp"
#include "ctl/cli.hpp"
#include "ctl/render.hpp"
#include "ctl/top.hpp"
#include "support/support.hpp"

namespace json = boost::json;

namespace {

qbctl::Invocation parse_ok(std::vector<std::string> args) {
  auto r = qbctl::parse(args);
  if (auto* e = std::get_if<qbctl::CliError>(&r)) FAIL(e->message);
  auto& p = std::get<qbctl::Parsed>(r);
  REQUIRE(p.invocation);
  return *p.invocation;
}

qbctl::CliError parse_bad(std::vector<std::string> args) {
  auto r = qbctl::parse(args);
  REQUIRE(std::holds_alternative<qbctl::CliError>(r));
  return std::get<qbctl::CliError>(r);
}

}  // namespace

TEST_CASE("every API route has a qbrokerctl subcommand", "[api][ctl]") {
  std::set<std::pair<std::string, std::string>> ctl;
  for (const auto& c : qbctl::command_table()) ctl.emplace(c.method, c.route);
  std::set<std::pair<std::string, std::string>> api;
  for (const auto& r : broker::api::routes()) {
    api.emplace(std::string(boost::beast::http::to_string(r.method)), std::string(r.path));
  }
  CHECK(ctl == api);
  // Every subcommand --help lists is one the parser knows.
  for (const auto& c : qbctl::command_table()) {
    std::vector<std::string> words;
    std::istringstream in{std::string(c.words)};
    for (std::string w; in >> w;) words.push_back(w);
    auto r = qbctl::parse(words);
    INFO(c.words);
    if (auto* e = std::get_if<qbctl::CliError>(&r)) {
      CHECK(e->message.find("unknown command") == std::string::npos);
    }
  }
}

TEST_CASE("subcommands build the request of their route", "[api][ctl]") {
  auto v = parse_ok({"version"});
  CHECK(v.method == "GET");
  CHECK(v.target == "/v1/version");
  CHECK(parse_ok({"list"}).target == "/v1/domains");
  CHECK(parse_ok({"domain", "list"}).target == "/v1/domains");

  auto c = parse_ok({"domain",
                     "create",
                     "vm1",
                     "--kernel",
                     "/srv/k",
                     "--initrd",
                     "/srv/i",
                     "--memory",
                     "128",
                     "--cdrom",
                     "cd0",
                     "--cdrom",
                     "cd1=/srv/iso/x.iso",
                     "--disk",
                     "id=d0,path=/srv/d.img,bus=virtio,ro",
                     "--nic",
                     "id=n0,tap=tap0",
                     "--vnc",
                     "127.0.0.1:0",
                     "--paused"});
  CHECK(c.method == "POST");
  CHECK(c.target == "/v1/domains");
  const auto& b = c.body->as_object();
  CHECK(b.at("name") == "vm1");
  CHECK(b.at("memory_mib") == 128);
  CHECK(b.at("kernel") == "/srv/k");
  CHECK(b.at("paused") == true);
  CHECK(b.at("cdroms").as_array().size() == 2);
  CHECK(b.at("cdroms").as_array()[1].at("path") == "/srv/iso/x.iso");
  CHECK(b.at("disks").as_array()[0].at("bus") == "virtio");
  CHECK(b.at("disks").as_array()[0].at("read_only") == true);
  CHECK(b.at("nics").as_array()[0].at("tap") == "tap0");
  CHECK(b.at("vnc").at("listen") == "127.0.0.1:0");

  qbtest::TempDir dir;
  qbtest::write_file(dir / "vm.json", R"({"name":"fromfile","memory_mib":64})");
  auto f = parse_ok({"create", "--from-json", dir / "vm.json", "--vcpus", "2"});
  CHECK(f.body->at("name") == "fromfile");
  CHECK(f.body->at("vcpus") == 2);
  CHECK(parse_ok({"create", "renamed", "--from-json", dir / "vm.json"}).body->at("name") ==
        "renamed");

  CHECK(parse_ok({"show", "vm1"}).target == "/v1/domains/vm1");
  CHECK(parse_ok({"show", "vm1", "--no-live"}).target == "/v1/domains/vm1?live=false");
  auto d = parse_ok({"destroy", "vm1", "--graceful"});
  CHECK(d.method == "DELETE");
  CHECK(d.target == "/v1/domains/vm1?graceful=true");
  CHECK(parse_ok({"destroy", "vm1", "--purge-nvram"}).target == "/v1/domains/vm1?purge_nvram=true");

  // Firmware boot from a disk and a CD given with their paths.
  auto fw = parse_ok({"create", "vm2", "--firmware", "uefi", "--secure-boot", "--nvram",
                      "/srv/vm2.fd", "--cdrom", "cd0=/srv/iso/x.iso", "--disk",
                      "id=d0,path=/srv/d.img", "--boot", "cd0,d0"});
  const auto& fb = fw.body->as_object();
  CHECK(fb.at("firmware") == "uefi");
  CHECK(fb.at("secure_boot") == true);
  CHECK(fb.at("nvram") == "/srv/vm2.fd");
  CHECK(fb.at("boot_order") == json::parse(R"(["cd0","d0"])"));
  CHECK_FALSE(fb.contains("kernel"));
  for (const char* op : {"pause", "resume", "shutdown", "reset"}) {
    auto r = parse_ok({op, "vm1"});
    CHECK(r.method == "POST");
    CHECK(r.target == "/v1/domains/vm1/" + std::string(op));
  }
  auto ins = parse_ok({"cdrom", "insert", "vm1", "cd0", "/srv/iso/x.iso"});
  CHECK(ins.method == "PUT");
  CHECK(ins.target == "/v1/domains/vm1/cdroms/cd0/medium");
  CHECK(ins.body->at("path") == "/srv/iso/x.iso");
  auto ej = parse_ok({"cdrom", "eject", "vm1", "cd0", "--force"});
  CHECK(ej.method == "DELETE");
  CHECK(ej.body->at("force") == true);
  auto da =
      parse_ok({"disk", "add", "vm1", "d1", "/srv/d1.qcow2", "--format", "qcow2", "--read-only"});
  CHECK(da.target == "/v1/domains/vm1/disks");
  CHECK(da.body->at("format") == "qcow2");
  auto dr = parse_ok({"disk", "remove", "vm1", "d1"});
  CHECK(dr.method == "DELETE");
  CHECK(dr.target == "/v1/domains/vm1/disks/d1");
  CHECK(dr.progress_job == "disk-remove");
  CHECK(parse_ok({"nic", "add", "vm1", "n0", "--mac", "52:54:00:12:34:56"}).body->at("mac") ==
        "52:54:00:12:34:56");
  CHECK(parse_ok({"nic", "remove", "vm1", "n0"}).target == "/v1/domains/vm1/nics/n0");
  CHECK(parse_ok({"vnc", "set", "vm1", "unix:/run/v.sock"}).body->at("listen") ==
        "unix:/run/v.sock");
  CHECK(parse_ok({"vnc", "remove", "vm1"}).method == "DELETE");
  CHECK(parse_ok({"save", "vm1", "/srv/s"}).body->at("path") == "/srv/s");
  CHECK_FALSE(parse_ok({"save", "vm1", "/srv/s"}).body->as_object().contains("keep_running"));
  CHECK(parse_ok({"save", "vm1", "/srv/s", "--keep-running"}).body->at("keep_running") == true);
  CHECK(*parse_ok({"migrate", "vm1", "/run/b.sock"}).body == json::parse(R"({"to":"/run/b.sock"})"));
  CHECK(*parse_ok({"migrate", "vm1", "/run/b.sock", "--copy-storage", "--disk-path", "d0=/srv/b/d0.img",
                   "--disk-path", "d1=/srv/b/d=1.img"})
             .body == json::parse(R"({"to":"/run/b.sock","copy_storage":true,)"
                                  R"("disk_paths":{"d0":"/srv/b/d0.img","d1":"/srv/b/d=1.img"}})"));
  CHECK(parse_bad({"migrate", "vm1", "/run/b.sock", "--disk-path", "d0"}).field == "--disk-path");
  CHECK(parse_bad({"migrate", "vm1", "/run/b.sock", "--disk-path", "=/x"}).field == "--disk-path");
  auto cancel = parse_ok({"cancel", "vm1"});
  CHECK(cancel.method == "DELETE");
  CHECK(cancel.target == "/v1/domains/vm1/job");
  auto rs = parse_ok({"restore", "vm2", "/srv/s", "--paused"});
  CHECK(rs.target == "/v1/domains/restore");
  CHECK(rs.body->at("name") == "vm2");
  CHECK(parse_ok({"migrate", "vm1", "unix:/run/b.sock"}).body->at("to") == "unix:/run/b.sock");
  CHECK(parse_ok({"qmp", "vm1", R"({"execute":"query-status"})"}).body->at("execute") ==
        "query-status");
  CHECK(parse_ok({"qmp", "vm1", "query-block"}).body->at("execute") == "query-block");
  auto ev = parse_ok({"events", "--domain", "vm1", "--count", "3"});
  CHECK(ev.target == "/v1/events?domain=vm1");
  CHECK(ev.events_count == 3);
  // Names are percent-encoded, so a hostile one reaches the server (which refuses it) intact.
  CHECK(parse_ok({"show", "../x"}).target == "/v1/domains/..%2Fx");
}

TEST_CASE("names are percent-encoded into one segment the router decodes back", "[api][ctl]") {
  CHECK(parse_ok({"show", "a b"}).target == "/v1/domains/a%20b");
  CHECK(parse_ok({"cdrom", "eject", "vm 1", "cd/0"}).target ==
        "/v1/domains/vm%201/cdroms/cd%2F0/medium");
  CHECK(parse_ok({"disk", "remove", "vm1", "d?1"}).target == "/v1/domains/vm1/disks/d%3F1");
  CHECK(parse_ok({"events", "--domain", "a&b=c"}).target == "/v1/events?domain=a%26b%3Dc");
  CHECK(qbctl::events_target("") == "/v1/events");
  CHECK(qbctl::events_target("vm1") == "/v1/events?domain=vm1");
  CHECK(parse_ok({"show", "vm1", "--no-live"}).target == "/v1/domains/vm1?live=false");

  // Whatever a name holds, it reaches the router as that one name (which the router then
  // judges): not as a malformed target, another path or a query.
  for (std::string name : {"../x", "a b", "a/b", "a?live=false", "a#b", "%2F", "a+b", "é"}) {
    INFO(name);
    auto inv = parse_ok({"show", name});
    auto r = broker::api::route(boost::beast::http::verb::get, inv.target, "");
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().field == "name");
    CHECK(r.error().message.find("name: ") == 0);
  }
  auto vm = parse_ok({"destroy", "vm-1.a_b", "--graceful"});
  auto routed = broker::api::route(boost::beast::http::verb::delete_, vm.target, "");
  REQUIRE(routed.has_value());
  CHECK(std::get<broker::api::DestroyDomain>(*routed).name == "vm-1.a_b");
  CHECK(std::get<broker::api::DestroyDomain>(*routed).graceful);
}

TEST_CASE("aliases and the domain prefix reach the same subcommands", "[api][ctl]") {
  CHECK(parse_ok({"ls"}).target == "/v1/domains");
  CHECK(parse_ok({"info", "vm1"}).target == "/v1/domains/vm1");
  CHECK(parse_ok({"domain", "info", "vm1"}).target == "/v1/domains/vm1");
  CHECK(parse_ok({"domain", "pause", "vm1"}).done == "paused vm1");
  CHECK(parse_ok({"domain", "create", "vm1"}).body->at("name") == "vm1");
  // Only domain commands take the prefix; groups need their verb.
  CHECK(parse_bad({"domain", "version"}).field == "version");
  CHECK(parse_bad({"domain", "cdrom", "eject", "vm1", "cd0"}).field == "cdrom");
  CHECK(parse_bad({"domain"}).field == "domain");
  CHECK(parse_bad({"cdrom"}).field == "cdrom");
  CHECK(parse_bad({"vnc", "add", "vm1"}).message.find("qbrokerctl help vnc") != std::string::npos);
  // Flags belong to their subcommand; global flags go anywhere, values included.
  CHECK(parse_bad({"pause", "vm1", "--force"}).field == "--force");
  CHECK(parse_bad({"disk", "add", "vm1", "d1", "/x", "--read-only=yes"}).field == "--read-only");
  CHECK(parse_bad({"disk", "add", "vm1", "d1"}).field == "PATH");
  CHECK(parse_bad({"create"}).field == "NAME");
  CHECK(parse_ok({"nic", "add", "--json", "vm1", "n0", "--tap=tap0"}).body->at("tap") == "tap0");
  CHECK(parse_ok({"save", "vm1", "--", "--odd-path"}).body->at("path") == "--odd-path");
}

TEST_CASE("global options go anywhere and mistakes name the argument", "[api][ctl]") {
  auto r = qbctl::parse(std::vector<std::string>{"list", "--json", "--socket", "/tmp/s"});
  auto& p = std::get<qbctl::Parsed>(r);
  CHECK(p.global.json);
  CHECK(p.global.socket == "/tmp/s");
  auto env = qbctl::parse(std::vector<std::string>{"list"}, "/tmp/env.sock");
  CHECK(std::get<qbctl::Parsed>(env).global.socket == "/tmp/env.sock");

  CHECK(parse_bad({"cdrom", "insert", "vm1", "cd0"}).field == "PATH");
  CHECK(parse_bad({"create", "vm1", "--memory", "lots"}).field == "--memory");
  CHECK(parse_bad({"create", "vm1", "--colour", "blue"}).field == "--colour");
  CHECK(parse_bad({"create", "vm1", "--disk", "id=d,size=4"}).field == "--disk");
  CHECK(parse_bad({"show", "vm1", "extra"}).field == "extra");
  CHECK(parse_bad({"frobnicate"}).field == "frobnicate");
  CHECK(parse_bad({"disk", "explode", "vm1"}).field == "explode");
  CHECK(parse_bad({"list", "--timeout", "-1"}).field == "--timeout");
  CHECK(parse_bad({"qmp", "vm1", "{not json"}).field == "JSON");

  auto help = qbctl::parse(std::vector<std::string>{"help", "cdrom"});
  CHECK(std::get<qbctl::Parsed>(help).global.help);
  auto text = qbctl::command_help(std::vector<std::string>{"cdrom"});
  REQUIRE(text);
  CHECK(text->find("qbrokerctl cdrom insert NAME CD PATH") != std::string::npos);
  CHECK(text->find("PUT /v1/domains/{name}/cdroms/{id}/medium") != std::string::npos);
  CHECK(qbctl::command_help(std::vector<std::string>{"domain", "create"}));
  CHECK_FALSE(qbctl::command_help(std::vector<std::string>{"nothing"}));
  CHECK(qbctl::usage().find("exit status") != std::string::npos);
  CHECK(qbctl::flag_for_field("memory_mib") == "--memory");
  CHECK(qbctl::flag_for_field("disks[0].path") == "--disk");
}

TEST_CASE("the Xen view renders its device models and their backend disks", "[api][ctl]") {
  qbctl::Invocation xen{"GET", "/v1/xen", std::nullopt, qbctl::View::xen};
  auto text = qbctl::render(xen, json::parse(R"({"uid_base":131072,"reaper_uid":131000,
      "device_models":[
        {"domid":5,"type":"hvm","uid":131077,"shared_uid":false,"started_by":"qbroker",
         "sealed":true,"pid":4711,"backends":[{"devid":51712,"path":"/local/domain/0/backend/vbd/5/51712",
         "node":"/dev/loop3","physical_device":"7:3","diskseq":"000000000000002a","state":"2",
         "held":true}]},
        {"domid":9,"type":"pv","uid":131081,"shared_uid":false,"started_by":"libxl",
         "sealed":false,"backends":[]}]})"));
  CHECK(text.find("device-model uids 131072 + domid, reaper uid 131000\n") == 0);
  CHECK(text.find("5      hvm   131077  4711  qbroker     yes     1") != std::string::npos);
  CHECK(text.find("9      pv    131081  -     libxl       no      0") != std::string::npos);
  CHECK(text.find("5      51712  /dev/loop3  7:3     000000000000002a  2      yes") !=
        std::string::npos);
  auto none = qbctl::render(xen, json::parse(R"({"uid_base":1,"reaper_uid":1,"device_models":[]})"));
  CHECK(none.find("no device models\n") != std::string::npos);
  auto parsed = parse_ok({"xen"});
  CHECK(parsed.target == "/v1/xen");
  CHECK(parsed.view == qbctl::View::xen);
}

TEST_CASE("replies render as tables and exit codes follow the status", "[api][ctl]") {
  CHECK(qbctl::table({{"NAME", "STATE"}, {"vm1", "running"}, {"a-longer-name", "paused"}}) ==
        "NAME           STATE\nvm1            running\na-longer-name  paused\n");
  qbctl::Invocation list{"GET", "/v1/domains", std::nullopt, qbctl::View::domains};
  auto text = qbctl::render(
      list, json::parse(R"({"domains":[{"name":"vm1","state":"running","uid":5,"pid":9,
                                                 "machine":"none","memory_mib":16,"vcpus":1,"job":null}]})"));
  CHECK(text.find("vm1   running") != std::string::npos);
  CHECK(qbctl::render(list, json::parse(R"({"domains":[]})")) == "no domains\n");
  qbctl::Invocation killed{"DELETE", "/v1/domains/vm1", std::nullopt, qbctl::View::killed};
  auto k = qbctl::render(
      killed, json::parse(R"({"name":"vm1","kill_report":{"uid":5,"found":2,"survivors":0,
                                                "rounds":1,"method":"uid","duration_us":2500}})"));
  CHECK(k.find("processes killed  2") != std::string::npos);
  CHECK(k.find("2.5 ms") != std::string::npos);
  auto err = qbctl::render_error(
      400, json::parse(R"({"error":{"code":"invalid_argument","message":"memory_mib: too small",
                                                     "field":"memory_mib"}})"));
  CHECK(err.find("field: memory_mib (--memory)") != std::string::npos);
  auto qerr = qbctl::render_error(502, json::parse(R"({"error":{"code":"qemu_error","message":"x",
                                                      "qmp":{"class":"GenericError","desc":"Duplicate ID"}}})"));
  CHECK(qerr.find("GenericError: Duplicate ID") != std::string::npos);
  // A desc the message already carries is not shown twice.
  auto said = qbctl::render_error(
      502,
      json::parse(
          R"({"error":{"code":"qemu_error","message":"domain vm1: The command x has not been found",
                           "qmp":{"class":"CommandNotFound","desc":"The command x has not been found"}}})"));
  CHECK(said ==
        "error: domain vm1: The command x has not been found\n  qemu:  CommandNotFound\n"
        "  code:  qemu_error (HTTP 502)\n");
  CHECK(qbctl::exit_code(200) == 0);
  CHECK(qbctl::exit_code(404) == 3);
  CHECK(qbctl::exit_code(409) == 4);
  CHECK(qbctl::exit_code(400) == 5);
  CHECK(qbctl::exit_code(403) == 6);
  CHECK(qbctl::exit_code(504) == 7);
  CHECK(qbctl::exit_code(501) == 9);
  CHECK(qbctl::exit_code(502) == 10);
  CHECK(qbctl::progress_line(0.5, "waiting for the guest", 1.25, 0) ==
        "[############............]  50%  waiting for the guest  1.2s");
  CHECK(qbctl::progress_line(-1, "", 0, 3).find("###") != std::string::npos);
}

TEST_CASE("top's table: CPU as a share of the time between refreshes, memory in MiB, progress",
          "[api][ctl][top]") {
  auto body = boost::json::parse(R"({"domains":[
      {"name":"vm1","state":"running","uid":7,"job":null,
       "usage":{"cpu_us":1500000,"memory_bytes":134217728,"memory_from":"cgroup"}},
      {"name":"vm2","state":"paused","uid":8,"job":"disk-remove",
       "job_progress":{"fraction":0.5,"phase":"waiting for the guest"}}]})");
  qbctl::CpuTimes now;
  auto first = qbctl::top_table(body, {}, std::chrono::seconds(1), now);
  CHECK(now.at("vm1") == 1500000);
  CHECK_FALSE(now.contains("vm2"));  // no usage: no cgroup
  CHECK(first.find("134217728") == std::string::npos);
  CHECK(first.find("128.0 MiB") != std::string::npos);
  CHECK(first.find("50% waiting for the guest") != std::string::npos);
  qbctl::CpuTimes later;
  auto second = qbctl::top_table(body, {{"vm1", 1000000}}, std::chrono::seconds(2), later);
  CHECK(second.find("25.0%") != std::string::npos);  // 0.5 s of CPU in 2 s
  CHECK(qbctl::top_table(boost::json::parse(R"({"domains":[]})"), {}, {}, later) == "no domains\n");
  CHECK(std::get<qbctl::CliError>(qbctl::parse(std::vector<std::string>{"top", "--interval", "0"})).field ==
        "--interval");
}
