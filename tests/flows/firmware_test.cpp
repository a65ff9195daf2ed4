// Firmware boot against a real QEMU (TCG): SeaBIOS and OVMF boot the test guest from a disk and
// from a CD the broker opened, in the boot order asked for; a UEFI variable written by the guest
// outlives its domain; and QEMU holds the firmware, the variable store and the media only as fds
// the broker handed over.
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "broker/core/errc.hpp"
#include "broker/lifecycle/firmware.hpp"
#include "flows_fixture.hpp"

using namespace std::chrono_literals;
namespace fs = std::filesystem;
using broker::DiskBus;
using broker::DiskFormat;
using broker::lifecycle::Firmware;
using qbtest::FlowsFixture;

namespace {

constexpr uid_t kBootBase = 3'102'700;
constexpr uid_t kVarsBase = 3'102'800;
constexpr uid_t kRefusedBase = 3'102'950;
constexpr uid_t kNoOvmfBase = 3'102'960;
constexpr uid_t kSecureBootBase = 3'102'970;

std::string read_text(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// QEMU's command line, its arguments joined by spaces.
std::string cmdline_of(pid_t pid) {
  std::string raw = read_text("/proc/" + std::to_string(pid) + "/cmdline");
  for (char& c : raw) {
    if (c == '\0') c = ' ';
  }
  return raw;
}

// True when `pid` holds an fd on the inode of `path`.
bool holds_inode(pid_t pid, const std::string& path) {
  struct stat want {};
  if (::stat(path.c_str(), &want) != 0) return false;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec)) {
    struct stat st {};
    if (::stat(e.path().c_str(), &st) == 0 && st.st_dev == want.st_dev && st.st_ino == want.st_ino) {
      return true;
    }
  }
  return false;
}

}  // namespace

TEST_CASE("SeaBIOS and OVMF boot the guest from a disk and from a CD in the order asked for",
          "[flows][firmware][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  FlowsFixture fx(kBootBase);
  struct Case {
    Firmware firmware;
    std::vector<std::string> order;
    DiskBus bus;
    std::string booted;  // qb_boot= on the kernel command line of the medium that booted
  };
  // Both media are bootable in every case: the first listed wins.
  const Case cases[] = {
      {Firmware::bios, {"d0", "cd0"}, DiskBus::scsi, "disk"},
      {Firmware::bios, {"cd0", "d0"}, DiskBus::virtio, "cd"},
      {Firmware::uefi, {"d0", "cd0"}, DiskBus::virtio, "disk"},
      {Firmware::uefi, {"cd0"}, DiskBus::scsi, "cd"},
  };
  int n = 0;
  for (const auto& c : cases) {
    const std::string name = "fw" + std::to_string(n++);
    INFO(name << ": " << broker::lifecycle::to_string(c.firmware) << " from " << c.booted);
    const auto start = std::chrono::steady_clock::now();
    auto console = fx.boot(qbtest::firmware_domain(name, c.firmware, c.order, c.bus));
    const auto took = std::chrono::steady_clock::now() - start;
    WARN(name << ": " << broker::lifecycle::to_string(c.firmware) << " from " << c.booted << " to the prompt in "
              << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms");
    CHECK(qbtest::guest_says(*console, "cat /proc/cmdline").find("qb_boot=" + c.booted) != std::string::npos);
    const bool efi = qbtest::guest_says(*console, "[ -d /sys/firmware/efi ] && echo efi || echo bios") == "efi";
    CHECK(efi == (c.firmware == Firmware::uefi));
    REQUIRE(fx.run(fx.broker.destroy(name)));
  }
}

TEST_CASE("a UEFI variable the guest writes outlives its domain, and QEMU holds the store as an fd",
          "[flows][firmware][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  FlowsFixture fx(kVarsBase);
  const std::string store =
      broker::lifecycle::nvram_store(fx.launcher.config().firmware, "vars", false);
  // A vendor GUID of the test's own: the kernel refuses unknown names under the global one.
  const std::string var = "/sys/firmware/efi/efivars/QbTest-3f6c5c1e-2b7a-4e0e-9d55-6a1f0c8b7d21";
  {
    auto console = fx.boot(qbtest::firmware_domain("vars", Firmware::uefi, {"d0"}));
    auto info = fx.run(fx.broker.info("vars", false));
    REQUIRE(info);
    // QEMU reads the firmware, the store and the media through fds; no path of theirs reaches
    // its command line or any QMP command.
    CHECK(holds_inode(info->pid, store));
    CHECK(holds_inode(info->pid, "/usr/share/OVMF/OVMF_CODE_4M.fd"));
    CHECK(holds_inode(info->pid, qbtest::guest_boot_disk()));
    CHECK(holds_inode(info->pid, qbtest::guest_boot_iso()));
    const std::string argv = cmdline_of(info->pid);
    for (const std::string& path : {store, std::string("OVMF"), qbtest::guest_boot_disk(),
                                    qbtest::guest_boot_iso(), qbtest::guest_dir()}) {
      CHECK(argv.find(path) == std::string::npos);
      for (const auto& line : fx.transcript) CHECK(line.find(path) == std::string::npos);
    }
    CHECK(argv.find("pflash0=qb-fw-code,pflash1=qb-fw-vars") != std::string::npos);
    // Attributes NV+BS+RT (7), then the value.
    qbtest::guest_says(*console, "printf \"\\007\\000\\000\\000qbroker\" > " + var);
    CHECK(qbtest::guest_says(*console, "tail -c 7 " + var) == "qbroker");
    REQUIRE(fx.run(fx.broker.destroy("vars")));
  }
  REQUIRE(fs::exists(store));  // kept for the next domain of the name
  {
    auto console = fx.boot(qbtest::firmware_domain("vars", Firmware::uefi, {"d0"}));
    CHECK(qbtest::guest_says(*console, "tail -c 7 " + var) == "qbroker");
    REQUIRE(fx.run(fx.broker.destroy("vars", false, true)));
  }
  CHECK_FALSE(fs::exists(store));
}

TEST_CASE("firmware requests that cannot boot are refused naming the field, with nothing left",
          "[flows][firmware][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::TempDir no_ovmf;
  FlowsFixture fx(kRefusedBase);
  auto refused = [&](broker::CreateDomain c) {
    auto r = fx.run(fx.broker.create(std::move(c)));
    REQUIRE_FALSE(r);
    INFO(r.error().describe());
    CHECK_FALSE(fx.broker.exists("bad"));
    CHECK(fx.uids.in_use().empty());
    return r.error().field;
  };
  // A variable store that is a symlink, or outside the image roots.
  qbtest::write_file(fx.images / "vars.fd", std::string(540672, '\0'));
  fs::create_symlink(fx.images / "vars.fd", fx.images / "link.fd");
  auto c = qbtest::firmware_domain("bad", Firmware::uefi, {"d0"});
  c.spec.nvram = fx.images / "link.fd";
  CHECK(refused(c) == "nvram");
  c.spec.nvram = "/etc/passwd";
  CHECK(refused(c) == "nvram");
  // One of the wrong size.
  qbtest::write_file(fx.images / "small.fd", std::string(4096, '\0'));
  c.spec.nvram = fx.images / "small.fd";
  CHECK(refused(c) == "nvram");
  // UEFI on a host without OVMF.
  FlowsFixture bare(kNoOvmfBase, {}, no_ovmf.path());
  c.spec.nvram.clear();
  auto r = bare.run(bare.broker.create(std::move(c)));
  REQUIRE_FALSE(r);
  CHECK(r.error().field == "firmware");
  CHECK(r.error().message.find("ovmf package") != std::string::npos);
  CHECK(bare.uids.in_use().empty());
  CHECK_FALSE(fs::exists(bare.launcher.config().firmware.nvram_dir));
}

TEST_CASE("secure boot runs OVMF's secure-boot build with Microsoft's keys, which refuses an unsigned loader",
          "[flows][firmware][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  const auto ovmf = broker::lifecycle::ovmf_files(broker::lifecycle::FirmwareConfig{}, true);
  if (!fs::exists(ovmf.code) || !fs::exists(ovmf.vars_template)) {
    WARN("skipped: this ovmf package ships no secure-boot build");
    return;
  }
  FlowsFixture fx(kSecureBootBase);
  auto c = qbtest::firmware_domain("sb", Firmware::uefi, {"d0"});
  c.spec.secure_boot = true;
  c.spec.paused = true;
  auto info = fx.run(fx.broker.create(std::move(c)));
  REQUIRE(info);
  auto fd = qbtest::connect_retry(info->console, 10s);
  REQUIRE(fd);
  qbtest::GuestConsole console(std::move(fd));
  const std::string store = broker::lifecycle::nvram_store(fx.launcher.config().firmware, "sb", true);
  CHECK(holds_inode(info->pid, ovmf.code));
  CHECK(holds_inode(info->pid, store));
  CHECK(cmdline_of(info->pid).find("smm=on") != std::string::npos);
  REQUIRE(fx.run(fx.broker.resume("sb")));
  // The test guest's loader is not signed: with the keys enrolled, OVMF will not run it.
  std::string seen;
  CHECK(console.read_until("Access Denied", seen, 120s));
  INFO(seen);
  CHECK(seen.find("QBROKER-GUEST-READY") == std::string::npos);
  REQUIRE(fx.run(fx.broker.destroy("sb", false, true)));
  CHECK_FALSE(fs::exists(store));
}
