// ColdPlan: the commands of a create's device flows, turned into QEMU's command line.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include <boost/json/parse.hpp>

#include "broker/core/errc.hpp"
#include "broker/domain/cold_plan.hpp"
#include "qmp/commands.hpp"

namespace json = boost::json;
namespace cmd = qmp::cmd;

namespace {

// The value following `flag` at position `at` and after, or "" when absent.
std::string word_after(const std::vector<std::string>& args, const std::string& flag,
                       std::size_t nth = 0) {
  for (std::size_t i = 0; i + 1 < args.size(); ++i) {
    if (args[i] == flag && nth-- == 0) return args[i + 1];
  }
  return {};
}

}  // namespace

TEST_CASE("a planned disk becomes -blockdev and -device words with its bootindex", "[cold_plan]") {
  broker::ColdPlan plan;
  fdpass::UniqueFd fd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  auto set = plan.add_fd(fd, "qb:d0");
  REQUIRE(set);
  CHECK(*set == 0);
  auto second = plan.add_fd(fd, "qb:d1");
  REQUIRE(second);
  CHECK(*second == 1);
  // The plan holds copies: the caller's fd stays its own.
  REQUIRE(plan.fds().entries().size() == 2);
  CHECK(plan.fds().entries()[0].fd.get() != fd.get());
  struct stat a {}, b {};
  REQUIRE(::fstat(fd.get(), &a) == 0);
  REQUIRE(::fstat(plan.fds().entries()[0].fd.get(), &b) == 0);
  CHECK(a.st_ino == b.st_ino);

  REQUIRE(plan.add(cmd::blockdev_add(cmd::FileNode{.node_name = "qb-d0-file", .fdset_id = 0, .read_only = true})));
  auto dev = cmd::virtio_blk_pci("d0", "qb-d0-fmt", "rp1");
  dev.props["bootindex"] = 1;
  REQUIRE(plan.add(cmd::device_add(dev)));

  const auto args = plan.args();
  const auto node = json::parse(word_after(args, "-blockdev"));
  CHECK(node.at("node-name") == "qb-d0-file");
  CHECK(node.at("filename") == "/dev/fdset/0");
  const auto device = json::parse(word_after(args, "-device"));
  CHECK(device.at("id") == "d0");
  CHECK(device.at("bus") == "rp1");
  CHECK(device.at("bootindex") == 1);
  // Block nodes come before the devices that use them.
  CHECK(args.front() == "-blockdev");
}

TEST_CASE("a planned CD medium gets a drive of its own, named on the CD device", "[cold_plan]") {
  broker::ColdPlan plan;
  REQUIRE(plan.add(cmd::device_add(cmd::scsi_cd("cd0", std::nullopt, "qb-scsi0.0"))));
  cmd::ChangeMedium m{.id = "cd0", .fdset_id = 3, .format = "raw",
                      .read_only_mode = cmd::ReadOnlyMode::read_only};
  REQUIRE(plan.add(cmd::blockdev_change_medium(m)));
  const auto args = plan.args();
  CHECK(word_after(args, "-drive") ==
        "if=none,id=qb-cd0-medium,file.driver=file,file.filename=/dev/fdset/3,format=raw,readonly=on");
  CHECK(json::parse(word_after(args, "-device")).at("drive") == "qb-cd0-medium");

  // A second medium for the same drive, or one for a drive not planned, cannot be planned.
  auto again = plan.add(cmd::blockdev_change_medium(m));
  REQUIRE_FALSE(again);
  CHECK(again.error().code == broker::errc::internal);
  m.id = "cd9";
  CHECK_FALSE(plan.add(cmd::blockdev_change_medium(m)));
  // A block device's medium keeps the protocol driver its json: filename names.
  REQUIRE(plan.add(cmd::device_add(cmd::scsi_cd("cd2", std::nullopt, "qb-scsi0.0"))));
  cmd::ChangeMedium loop{.id = "cd2", .fdset_id = 4, .format = "raw",
                         .read_only_mode = cmd::ReadOnlyMode::read_only, .protocol = "host_device"};
  REQUIRE(plan.add(cmd::blockdev_change_medium(loop)));
  CHECK(word_after(plan.args(), "-drive", 1) ==
        "if=none,id=qb-cd2-medium,file.driver=host_device,file.filename=/dev/fdset/4,format=raw,readonly=on");
  // A json: filename naming anything else is not planned.
  for (const char* bad : {R"(json:{"file":{"driver":"nbd","filename":"/dev/fdset/4"}})",
                          R"(json:{"file":{"driver":"file","filename":"/etc/passwd"}})",
                          R"(json:{"file":{"driver":"file","filename":"/dev/fdset/4","x":1}})",
                          "json:[", "/dev/fdset/4x"}) {
    INFO(bad);
    REQUIRE(plan.add(cmd::device_add(cmd::scsi_cd("cd3", std::nullopt, "qb-scsi0.0"))));
    qmp::Command c = cmd::blockdev_change_medium(loop);
    c.args["id"] = "cd3";
    c.args["filename"] = bad;
    CHECK_FALSE(plan.add(c));
  }
  // Nor can a writable medium.
  REQUIRE(plan.add(cmd::device_add(cmd::scsi_cd("cd1", std::nullopt, "qb-scsi0.0"))));
  m.id = "cd1";
  m.read_only_mode = cmd::ReadOnlyMode::read_write;
  CHECK_FALSE(plan.add(cmd::blockdev_change_medium(m)));
}

TEST_CASE("commands with no command-line form are refused, naming the command", "[cold_plan]") {
  broker::ColdPlan plan;
  for (const auto& c : {cmd::getfd("qb-tap-n0"), cmd::system_reset(), cmd::netdev_add_tap("qb-net-n0", "qb-tap-n0")}) {
    auto r = plan.add(c);
    REQUIRE_FALSE(r);
    CHECK(r.error().describe().find(c.name) != std::string::npos);
  }
  CHECK(plan.args().empty());
}
