// qbrokerd's flags and config file, parsed without starting anything.
#include "broker/daemon/options.hpp"

#include "broker/lifecycle/uid_pool.hpp"
#include "support/broker_printers.hpp"
#include "support/support.hpp"

using broker::daemon::DaemonConfig;
using broker::daemon::parse_config;
using broker::lifecycle::UidRange;
using namespace std::chrono_literals;

namespace {
broker::Result<DaemonConfig> parse(std::initializer_list<std::string_view> args) {
  std::vector<std::string_view> v(args);
  return parse_config(v);
}

UidRange range_of(const DaemonConfig& c) {
  REQUIRE(std::holds_alternative<UidRange>(c.uids));
  return std::get<UidRange>(c.uids);
}
}  // namespace

TEST_CASE("qbrokerd's defaults are the design's", "[api][daemon][options]") {
  auto o = parse({});
  REQUIRE(o);
  CHECK(o->socket == "/run/qbroker/qbroker.sock");
  CHECK(o->state_dir == "/var/lib/qbroker");
  CHECK(o->run_dir == "/run/qbroker");
  CHECK(o->qemu == "/usr/bin/qemu-system-x86_64");
  CHECK(o->image_roots.empty());
  CHECK(o->save_root.empty());  // save and restore are off until a save root is named
  CHECK_FALSE(o->xen);
  CHECK(o->log_level == broker::log::Level::info);
  CHECK(o->limits.max_body_bytes == 1024 * 1024);
  auto range = UidRange::parse(broker::daemon::kDefaultUidRange);
  REQUIRE(range);
  CHECK(range->base == range_of(*o).base);
  CHECK(range->count == range_of(*o).count);
  CHECK(range->validate());  // no passwd entry in the default range
}

TEST_CASE("flags set every option and name the one that is wrong", "[api][daemon][options]") {
  auto o = parse({"--socket",
                  "/tmp/s.sock",
                  "--state-dir=/tmp/st",
                  "--run-dir",
                  "/tmp/run",
                  "--uid-range",
                  "3103000:64",
                  "--image-root",
                  "/srv/a",
                  "--image-root",
                  "/srv/b",
                  "--save-root",
                  "/srv/saves",
                  "--qemu",
                  "/opt/qemu",
                  "--admin-group",
                  "qbroker",
                  "--qmp-timeout-ms",
                  "250",
                  "--max-connections",
                  "64",
                  "--request-timeout-ms=900",
                  "--log-level",
                  "debug"});
  REQUIRE(o);
  CHECK(o->socket == "/tmp/s.sock");
  CHECK(o->state_dir == "/tmp/st");
  CHECK(range_of(*o).base == 3103000);
  CHECK(range_of(*o).count == 64);
  CHECK(o->image_roots == std::vector<std::string>{"/srv/a", "/srv/b"});
  CHECK(o->save_root == "/srv/saves");
  CHECK(o->admin_group == "qbroker");
  CHECK(o->qmp_timeout == 250ms);
  CHECK(o->limits.max_connections == 64);
  CHECK(o->limits.request_timeout == 900ms);
  CHECK(o->log_level == broker::log::Level::debug);
  CHECK(parse({"--xen"})->xen);
  CHECK(parse({"--help"})->help);
  CHECK(o->image_owners.empty());
  CHECK_FALSE(o->allow_hardlinks);
  auto images = parse({"--image-owner", "alice", "--image-owner=1007", "--allow-hardlinks"});
  REQUIRE(images);
  CHECK(images->image_owners == std::vector<std::string>{"alice", "1007"});
  CHECK(images->allow_hardlinks);
  CHECK(parse({"--image-owner="}).error().field == "--image-owner");
  CHECK(parse({"--allow-hardlinks=yes"}).error().field == "--allow-hardlinks");

  auto unknown = parse({"--colour", "blue"});
  REQUIRE_FALSE(unknown);
  CHECK(unknown.error().field == "--colour");
  auto relative = parse({"--state-dir", "var/lib"});
  REQUIRE_FALSE(relative);
  CHECK(relative.error().field == "--state-dir");
  auto number = parse({"--max-connections", "lots"});
  REQUIRE_FALSE(number);
  CHECK(number.error().field == "--max-connections");
  auto missing = parse({"--socket"});
  REQUIRE_FALSE(missing);
  CHECK(missing.error().field == "--socket");
  auto both = parse({"--uid-range", "3103000:8", "--uid-range-user", "qemu"});
  REQUIRE_FALSE(both);
  CHECK(both.error().message.find("exclude") != std::string::npos);
  CHECK_FALSE(parse({"--uid-range", "3103000"}));
  CHECK_FALSE(parse({"stray"}));
}

TEST_CASE("a JSON config file has the flags' keys and flags override it",
          "[api][daemon][options]") {
  qbtest::TempDir dir;
  qbtest::write_file(dir / "qbrokerd.json",
                     R"({"state-dir": "/srv/state", "image-root": ["/srv/iso", "/srv/img"],
                                               "uid-range": "3103000:16", "qmp-timeout-ms": 1500,
                                               "max-connections-per-uid": 8, "xen": false})");
  auto o = parse({"--config", dir / "qbrokerd.json", "--state-dir", "/srv/other"});
  REQUIRE(o);
  CHECK(o->state_dir == "/srv/other");
  CHECK(o->image_roots == std::vector<std::string>{"/srv/iso", "/srv/img"});
  CHECK(range_of(*o).base == 3103000);
  CHECK(o->qmp_timeout == 1500ms);
  CHECK(o->limits.max_connections_per_uid == 8);
  // Flags replace the file's image roots rather than adding to them.
  auto roots = parse({"--image-root", "/srv/cli", "--config", dir / "qbrokerd.json"});
  REQUIRE(roots);
  CHECK(roots->image_roots == std::vector<std::string>{"/srv/cli"});

  qbtest::write_file(dir / "bad.json", R"({"state-dir": "/srv/state", "colour": "blue"})");
  auto bad = parse({"--config", dir / "bad.json"});
  REQUIRE_FALSE(bad);
  CHECK(bad.error().field == "colour");
  qbtest::write_file(dir / "type.json", R"({"max-connections": "many"})");
  auto type = parse({"--config", dir / "type.json"});
  REQUIRE_FALSE(type);
  CHECK(type.error().field == "max-connections");
  qbtest::write_file(dir / "broken.json", R"({"state-dir": )");
  CHECK_FALSE(parse({"--config", dir / "broken.json"}));
  CHECK_FALSE(parse({"--config", dir / "missing.json"}));
}

TEST_CASE("the command line is read strictly: no abbreviations, no strays",
          "[api][daemon][options]") {
  CHECK(parse({"-h"})->help);
  CHECK(parse({"--version"})->version);
  CHECK(parse({"--xen"})->xen);
  CHECK_FALSE(parse({"--xen=false"})->xen);
  CHECK(parse({"--xen=maybe"}).error().field == "--xen");
  CHECK(parse({"--sock", "/tmp/s"}).error().field == "--sock");
  CHECK(parse({"--socket="}).error().field == "--socket");
  CHECK(parse({"--help=yes"}).error().field == "--help");
  CHECK(parse({"-x"}).error().field == "-x");
  CHECK(parse({"--colour=blue"}).error().field == "--colour");
  CHECK(parse({"--socket", "/tmp/a", "--socket", "/tmp/b"})->socket == "/tmp/b");
  CHECK(parse({"--log-level", "loud"}).error().field == "--log-level");
  CHECK(parse({"--uid-range", "3103000:lots"}).error().field == "--uid-range");
  CHECK(parse({"--uid-count", "1"}).error().field == "--uid-count");
  CHECK(parse({"--admin-group="}).error().field == "--admin-group");

  auto user = parse({"--uid-range-user", "qemu", "--uid-count", "16"});
  REQUIRE(user);
  REQUIRE(std::holds_alternative<broker::daemon::UidRangeUser>(user->uids));
  CHECK(std::get<broker::daemon::UidRangeUser>(user->uids).name == "qemu");
  CHECK(user->uid_count == 16);
}

TEST_CASE("config files and flags are merged, then validated once", "[api][daemon][options]") {
  qbtest::TempDir dir;
  auto file = [&](const std::string& name, const std::string& text) {
    qbtest::write_file(dir / name, text);
    return dir / name;
  };
  // A value the flags replace is never judged: the merged configuration is.
  auto zero = file("zero.json", R"({"max-connections": 0})");
  auto merged = parse({"--config", zero, "--max-connections", "5"});
  REQUIRE(merged);
  CHECK(merged->limits.max_connections == 5);
  auto bad = parse({"--config", zero});
  REQUIRE_FALSE(bad);
  CHECK(bad.error().field == "max-connections");
  CHECK(bad.error().message.find(zero) == 0);  // the file, then the key

  // Later files win over earlier ones, key by key; every file read is listed.
  auto first = file("first.json", R"({"qemu": "/opt/a", "run-dir": "/srv/run"})");
  auto second = file("second.json", R"({"qemu": "/opt/b", "image-root": "/srv/one"})");
  auto both = parse({"--config", first, "--config=" + second});
  REQUIRE(both);
  CHECK(both->qemu == "/opt/b");
  CHECK(both->run_dir == "/srv/run");
  CHECK(both->image_roots == std::vector<std::string>{"/srv/one"});
  CHECK(both->config_files == std::vector<std::string>{first, second});

  // JSON types: a flag option takes a boolean, nothing takes an object; "config" is no key.
  CHECK(parse({"--config", file("xen.json", R"({"xen": "true"})")}).error().field == "xen");
  CHECK(parse({"--config", file("obj.json", R"({"socket": {}})")}).error().field == "socket");
  CHECK(parse({"--config", file("cfg.json", R"({"config": "/x"})")}).error().field == "config");
  CHECK(parse({"--config", file("arr.json", R"([])")}).error().field == "config");
  auto level = parse({"--config", file("level.json", R"({"log-level": "warn", "xen": true})")});
  REQUIRE(level);
  CHECK(level->log_level == broker::log::Level::warn);
  CHECK(level->xen);

  // --uid-range in a file and --uid-range-user on the command line still exclude each other.
  auto range = file("range.json", R"({"uid-range": "3103000:8"})");
  auto clash = parse({"--config", range, "--uid-range-user", "qemu"});
  REQUIRE_FALSE(clash);
  CHECK(clash.error().field == "--uid-range-user");
}

TEST_CASE("usage lists every option", "[api][daemon][options]") {
  auto text = broker::daemon::usage();
  for (const char* flag :
       {"--config", "--socket", "--state-dir", "--run-dir", "--uid-range", "--uid-range-user",
        "--image-root", "--image-owner", "--allow-hardlinks", "--qemu", "--admin-group",
        "--xen"}) {
    INFO(flag);
    CHECK(text.find(flag) != std::string::npos);
  }
}

TEST_CASE("qbrokerd's --pool takes shapes, from flags or a config file, and names what is wrong",
          "[api][daemon][options][pool]") {
  auto o = parse({"--pool", "machine=q35,memory_mib=256,vcpus=2,firmware=bios,count=2",
                  "--pool", "memory_mib=128,count=1"});
  REQUIRE(o);
  REQUIRE(o->pool.size() == 2);
  CHECK(o->pool[0].memory_mib == 256);
  CHECK(o->pool[0].vcpus == 2);
  CHECK(o->pool[0].count == 2);
  CHECK(o->pool[0].pci_slots == 4);
  CHECK(o->pool[1].memory_mib == 128);
  CHECK(o->pool[1].vcpus == 1);
  CHECK(broker::to_string(o->pool[0]) ==
        "machine=q35,memory_mib=256,vcpus=2,firmware=bios,pci_slots=4,count=2");
  // What is printed reads back as the same shape.
  auto again = broker::parse_pool_shape(broker::to_string(o->pool[0]));
  REQUIRE(again);
  CHECK(*again == o->pool[0]);

  qbtest::TempDir dir;
  qbtest::write_file(dir / "pool.json", R"({"pool": ["memory_mib=512,count=3"]})");
  auto file = parse({"--config", dir / "pool.json"});
  REQUIRE(file);
  REQUIRE(file->pool.size() == 1);
  CHECK(file->pool[0].count == 3);

  struct Bad {
    std::string_view value;
    std::string_view says;
  };
  for (const Bad& bad : {Bad{"memory_mib=128", "count is needed"},
                         Bad{"count=0", "count must be a number from 1"},
                         Bad{"count=2,count=3", "count is given twice"},
                         Bad{"firmware=uefi,count=1", "variable store"},
                         Bad{"machine=none,count=1", "machine must be q35"},
                         Bad{"memory_mib=lots,count=1", "memory_mib must be a number"},
                         Bad{"vcpus=0,count=1", "vcpus must be a number"},
                         Bad{"colour=blue,count=1", "unknown key 'colour'"},
                         Bad{"count", "is not KEY=VALUE"}}) {
    INFO(bad.value);
    auto r = parse({"--pool", bad.value});
    REQUIRE_FALSE(r);
    CHECK(r.error().field == "--pool");
    CHECK(r.error().message.find(bad.says) != std::string::npos);
  }
  auto twice = parse({"--pool", "memory_mib=128,count=1", "--pool", "count=2,memory_mib=128"});
  REQUIRE_FALSE(twice);
  CHECK(twice.error().message.find("earlier --pool") != std::string::npos);
  auto xen = parse({"--xen", "--pool", "count=1"});
  REQUIRE_FALSE(xen);
  CHECK(xen.error().field == "--pool");
}

TEST_CASE("migrations between hosts take TLS files together, or --insecure-migration",
          "[api][daemon][options][migrate]") {
  auto tls = parse({"--migration-listen", "127.0.0.1:4711", "--migration-cert", "/etc/qb/c.pem",
                    "--migration-key", "/etc/qb/k.pem", "--migration-ca", "/etc/qb/ca.pem"});
  REQUIRE(tls);
  CHECK(tls->migration_listen == "127.0.0.1:4711");
  CHECK(tls->migration.tls());
  CHECK_FALSE(tls->migration.insecure);
  auto plain = parse({"--migration-listen", "[::1]:4711", "--insecure-migration"});
  REQUIRE(plain);
  CHECK(plain->migration.usable());
  CHECK_FALSE(plain->migration.tls());
  CHECK(parse({"--migration-listen", "*:4711", "--insecure-migration"}));
  CHECK(parse({})->migration_listen.empty());
  CHECK_FALSE(parse({})->migration.usable());

  struct Bad {
    std::initializer_list<std::string_view> args;
    std::string_view field;
    std::string_view says;
  };
  for (const Bad& bad :
       {Bad{{"--migration-listen", "127.0.0.1:4711"}, "--migration-listen", "--insecure-migration"},
        Bad{{"--migration-listen", "4711", "--insecure-migration"}, "--migration-listen", "ADDRESS:PORT"},
        Bad{{"--migration-listen", "host:0", "--insecure-migration"}, "--migration-listen", "PORT 1 to 65535"},
        Bad{{"--migration-listen", "example.org:80", "--insecure-migration"}, "--migration-listen",
            "not an IP address"},
        Bad{{"--migration-listen", "::1:80", "--insecure-migration"}, "--migration-listen", "[IPV6]"},
        Bad{{"--migration-cert", "/c.pem"}, "--migration-cert", "--migration-key as well"},
        Bad{{"--migration-cert", "/c.pem", "--migration-key", "/k.pem"}, "--migration-cert",
            "--migration-ca as well"},
        Bad{{"--migration-cert", "c.pem"}, "--migration-cert", "absolute path"},
        Bad{{"--migration-cert", "/c.pem", "--migration-key", "/k.pem", "--migration-ca", "/ca.pem",
             "--insecure-migration"},
            "--insecure-migration", "exclude each other"},
        Bad{{"--xen", "--migration-listen", "127.0.0.1:1", "--insecure-migration"}, "--migration-listen",
            "--xen"}}) {
    std::vector<std::string_view> v(bad.args);
    auto r = parse_config(v);
    INFO(bad.says);
    REQUIRE_FALSE(r);
    CHECK(r.error().field == bad.field);
    CHECK(r.error().message.find(bad.says) != std::string::npos);
  }
}

TEST_CASE("a create matches a pool shape only when it boots through firmware with a boot order",
          "[api][daemon][options][pool]") {
  broker::PoolShape shape;  // q35, 128 MiB, 1 vcpu, bios, 4 slots
  broker::lifecycle::DomainSpec spec;
  spec.name = "web";
  spec.boot_order = {"d0"};
  CHECK(broker::matches(shape, spec));
  auto differs = [&](auto change) {
    broker::lifecycle::DomainSpec s = spec;
    change(s);
    return !broker::matches(shape, s);
  };
  CHECK(differs([](auto& s) { s.boot_order.clear(); }));
  CHECK(differs([](auto& s) { s.kernel = "/boot/vmlinuz"; }));
  CHECK(differs([](auto& s) { s.memory_mib = 256; }));
  CHECK(differs([](auto& s) { s.vcpus = 2; }));
  CHECK(differs([](auto& s) { s.pci_slots = 8; }));
  CHECK(differs([](auto& s) { s.accel = broker::lifecycle::Accel::tcg; }));
  CHECK(differs([](auto& s) { s.firmware = broker::lifecycle::Firmware::uefi; }));
  CHECK(differs([](auto& s) { s.nvram = "/var/lib/vars.fd"; }));
  CHECK(differs([](auto& s) { s.xen = broker::lifecycle::XenPart{}; }));
  // Paused or not, both take from the pool.
  CHECK_FALSE(differs([](auto& s) { s.paused = true; }));

  // A shape kept for restores serves restores of the same specs, and no create; a create shape
  // serves no restore.
  broker::PoolShape for_restore = shape;
  for_restore.use = broker::PoolUse::restore;
  CHECK(broker::matches(for_restore, spec, broker::PoolUse::restore));
  CHECK_FALSE(broker::matches(for_restore, spec));
  CHECK_FALSE(broker::matches(shape, spec, broker::PoolUse::restore));
  // A restored direct kernel boot reboots into the kernel its QEMU loaded at spawn: a shape
  // without a kernel never serves one.
  broker::lifecycle::DomainSpec kernel = spec;
  kernel.kernel = "/boot/vmlinuz";
  kernel.boot_order.clear();
  CHECK_FALSE(broker::matches(for_restore, kernel, broker::PoolUse::restore));
}

TEST_CASE("a pool shape with a kernel serves the direct kernel boots of that kernel and nothing else",
          "[api][daemon][options][pool]") {
  broker::PoolShape shape;
  shape.kernel = "/img/vmlinuz";
  shape.initrd = "/img/initrd";
  shape.append = "console=ttyS0 quiet";
  broker::lifecycle::DomainSpec spec;
  spec.name = "k";
  spec.kernel = "/img/vmlinuz";
  spec.initrd = "/img/initrd";
  spec.append = "console=ttyS0 quiet";
  CHECK(broker::matches(shape, spec));
  auto differs = [&](auto change) {
    broker::lifecycle::DomainSpec s = spec;
    change(s);
    return !broker::matches(shape, s);
  };
  CHECK(differs([](auto& s) { s.kernel = "/img/vmlinuz-2"; }));
  CHECK(differs([](auto& s) { s.initrd.clear(); }));
  CHECK(differs([](auto& s) { s.append = "console=ttyS0"; }));
  CHECK(differs([](auto& s) { s.append.clear(); }));
  CHECK(differs([](auto& s) { s.memory_mib = 256; }));
  // A firmware boot (no kernel, a boot order) is another shape's.
  CHECK(differs([](auto& s) {
    s.kernel.clear();
    s.initrd.clear();
    s.append.clear();
    s.boot_order = {"d0"};
  }));
  CHECK_FALSE(differs([](auto& s) { s.paused = true; }));
  broker::PoolShape for_restore = shape;
  for_restore.use = broker::PoolUse::restore;
  CHECK(broker::matches(for_restore, spec, broker::PoolUse::restore));
  CHECK_FALSE(broker::matches(for_restore, spec));
}

TEST_CASE("a pool shape's kernel, initrd and append read with doubled commas and print back",
          "[api][daemon][options][pool]") {
  auto o = parse({"--image-root", "/img", "--pool",
                  "memory_mib=128,count=2,kernel=/img/vmlinuz,initrd=/img/initrd,"
                  "append=console=ttyS0,,115200 quiet,for=restore"});
  REQUIRE(o);
  REQUIRE(o->pool.size() == 1);
  const auto& shape = o->pool[0];
  CHECK(shape.kernel == "/img/vmlinuz");
  CHECK(shape.initrd == "/img/initrd");
  CHECK(shape.append == "console=ttyS0,115200 quiet");
  CHECK(shape.use == broker::PoolUse::restore);
  CHECK(broker::to_string(shape) ==
        "machine=q35,memory_mib=128,vcpus=1,firmware=bios,pci_slots=4,count=2,for=restore,"
        "kernel=/img/vmlinuz,initrd=/img/initrd,append=console=ttyS0,,115200 quiet");
  auto again = broker::parse_pool_shape(broker::to_string(shape));
  REQUIRE(again);
  CHECK(*again == shape);
  // Two shapes that differ only in their kernel are two shapes.
  CHECK(parse({"--image-root", "/img", "--pool", "count=1,kernel=/img/a", "--pool",
               "count=1,kernel=/img/b"}));

  struct Bad {
    std::initializer_list<std::string_view> args;
    std::string_view says;
  };
  for (const Bad& bad :
       {Bad{{"--image-root", "/img", "--pool", "count=1,initrd=/img/initrd"}, "initrd: needs a kernel"},
        Bad{{"--image-root", "/img", "--pool", "count=1,append=quiet"}, "append needs a kernel"},
        Bad{{"--image-root", "/img", "--pool", "count=1,kernel="}, "kernel is empty"},
        Bad{{"--image-root", "/img", "--pool", "count=1,kernel=vmlinuz"}, "kernel"},
        Bad{{"--image-root", "/img", "--pool", "count=1,kernel=/boot/vmlinuz"},
            "kernel /boot/vmlinuz is beneath no --image-root"},
        Bad{{"--image-root", "/img", "--pool", "count=1,kernel=/img/vmlinuz,firmware=bios,,x"},
            "firmware must be bios"}}) {
    std::vector<std::string_view> v(bad.args);
    auto r = parse_config(v);
    INFO(bad.says);
    REQUIRE_FALSE(r);
    CHECK(r.error().field == "--pool");
    CHECK(r.error().message.find(bad.says) != std::string::npos);
  }
}

TEST_CASE("a pool shape for restores reads and prints as for=restore, and beside a create shape",
          "[api][daemon][options][pool]") {
  auto o = parse({"--pool", "memory_mib=256,count=2", "--pool", "memory_mib=256,count=1,for=restore"});
  REQUIRE(o);
  REQUIRE(o->pool.size() == 2);
  CHECK(o->pool[0].use == broker::PoolUse::create);
  CHECK(o->pool[1].use == broker::PoolUse::restore);
  CHECK(broker::to_string(o->pool[1]) ==
        "machine=q35,memory_mib=256,vcpus=1,firmware=bios,pci_slots=4,count=1,for=restore");
  auto again = broker::parse_pool_shape(broker::to_string(o->pool[1]));
  REQUIRE(again);
  CHECK(*again == o->pool[1]);
  // for=create is the default, said or not.
  auto said = broker::parse_pool_shape("count=1,for=create");
  REQUIRE(said);
  CHECK(said->use == broker::PoolUse::create);

  auto bad = parse({"--pool", "count=1,for=migrate"});
  REQUIRE_FALSE(bad);
  CHECK(bad.error().field == "--pool");
  CHECK(bad.error().message.find("for must be create or restore, got 'migrate'") != std::string::npos);
  auto twice = parse({"--pool", "count=1,for=restore", "--pool", "count=3,for=restore"});
  REQUIRE_FALSE(twice);
  CHECK(twice.error().message.find("earlier --pool") != std::string::npos);
}
