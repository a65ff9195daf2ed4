// What QEMU holds of the images the broker hands it, against the real QEMU and the booted test
// guest: a host block device (a loop device) as a CD and as a disk, at create and at hotplug,
// and an unplugged or ejected image gone from QEMU's fd table, for every device kind and run
// state.
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <iterator>
#include <thread>

#include "fdpass/devices.hpp"
#include "flows_fixture.hpp"

using namespace std::chrono_literals;
using broker::DiskBus;
using broker::DiskFormat;
using qbtest::FlowsFixture;
using qbtest::find_disk;
using qbtest::guest;
using qbtest::guest_eventually;
using qbtest::disk;

namespace {

constexpr uid_t kLoopBase = 3'106'100;
constexpr uid_t kGoneBase = 3'106'110;
constexpr uid_t kGonePausedBase = 3'106'120;

const std::string kReadCd = "dd if=/dev/sr0 bs=2048 count=1 2>/dev/null | head -c 15";

// A loop device over a fresh image holding `marker`.
fdpass::LoopDevice loop_over(const std::string& path, const std::string& marker,
                             fdpass::Access access, std::size_t size) {
  qbtest::make_image(path, size, marker);
  fdpass::UniqueFd backing(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  REQUIRE(backing);
  auto loop = fdpass::attach_loop(backing, access);
  REQUIRE(loop);
  return std::move(*loop);
}

// How many of QEMU's fds are the file `path` (by inode: a path may be renamed or gone).
int fds_on_inode(pid_t pid, const std::string& path) {
  struct stat want {};
  REQUIRE(::stat(path.c_str(), &want) == 0);
  const std::string dir = "/proc/" + std::to_string(pid) + "/fd";
  DIR* d = ::opendir(dir.c_str());
  REQUIRE(d != nullptr);
  int n = 0;
  while (dirent* e = ::readdir(d)) {
    struct stat st {};
    if (e->d_name[0] == '.' || ::stat((dir + "/" + e->d_name).c_str(), &st) != 0) continue;
    n += st.st_dev == want.st_dev && st.st_ino == want.st_ino ? 1 : 0;
  }
  ::closedir(d);
  return n;
}

}  // namespace

TEST_CASE("a loop device serves as a CD and as a disk, at create and at hotplug",
          "[flows][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  FlowsFixture fx(kLoopBase);
  const auto& im = fx.images;
  auto cd_a = loop_over(im / "cd-a.iso", "QB-LOOPCD-A-MRK", fdpass::Access::read_only, 64 * 2048);
  auto cd_b = loop_over(im / "cd-b.iso", "QB-LOOPCD-B-MRK", fdpass::Access::read_only, 64 * 2048);
  auto disk_a = loop_over(im / "d-a.img", "QB-LOOPDISK-A", fdpass::Access::read_write, 1 << 20);
  auto disk_b = loop_over(im / "d-b.img", "QB-LOOPDISK-B", fdpass::Access::read_write, 1 << 20);

  // At create: the CD and the disk are block devices from the start.
  auto spec = FlowsFixture::guest("fl-loop");
  spec.cdroms.push_back({"cd0", cd_a.path, std::nullopt});
  auto d0 = disk("d0", disk_a.path);
  d0.diskseq = disk_a.diskseq;
  spec.disks.push_back(d0);
  auto con = fx.boot(spec);
  CHECK(guest(*con, kReadCd).text == "QB-LOOPCD-A-MRK");
  const std::string dev_a = find_disk(*con, "QB-LOOPDISK-A");
  REQUIRE_FALSE(dev_a.empty());
  CHECK(guest(*con, "printf QB-LOOP-GUEST | dd of=" + dev_a +
                        " bs=512 seek=8 conv=notrunc,fsync 2>/dev/null").rc == 0);

  // At hotplug: a medium change and a disk hotplug, both block devices.
  REQUIRE(fx.run(fx.broker.insert_medium("fl-loop", "cd0", {cd_b.path, false})));
  CHECK(guest_eventually(*con, kReadCd, "QB-LOOPCD-B-MRK"));
  auto d1 = disk("d1", disk_b.path, DiskFormat::raw, DiskBus::virtio);
  d1.diskseq = disk_b.diskseq;
  REQUIRE(fx.run(fx.broker.add_disk("fl-loop", d1)));
  CHECK_FALSE(find_disk(*con, "QB-LOOPDISK-B").empty());

  // QEMU read each through a host block device driver, never `file`.
  int host_device = 0;
  for (const auto& line : fx.transcript) {
    if (line.find("blockdev-change-medium") != std::string::npos) {
      INFO(line);
      CHECK(line.find("host_device") != std::string::npos);
      ++host_device;
    }
  }
  CHECK(host_device == 1);  // the change; the create's medium came on the command line:
  const pid_t qemu = fx.pid_of("fl-loop");
  std::ifstream cmdline("/proc/" + std::to_string(qemu) + "/cmdline");
  const std::string words((std::istreambuf_iterator<char>(cmdline)), std::istreambuf_iterator<char>());
  CHECK(words.find("id=qb-cd0-medium,file.driver=host_device,") != std::string::npos);

  REQUIRE(fx.run(fx.broker.remove_disk("fl-loop", "d0")));
  CHECK(qbtest::read_at(im / "d-a.img", 8 * 512, 13) == "QB-LOOP-GUEST");
  REQUIRE(fx.run(fx.broker.destroy("fl-loop")));
}

namespace {

// One device kind: how to plug and unplug it on a domain, and the image it holds.
struct GoneCase {
  const char* what;
  std::function<void()> plug;
  std::function<void()> unplug;
  std::string image;
};

// Checks by inode that QEMU holds the image while plugged and no longer once the flow answered.
void check_gone(pid_t qemu, GoneCase& c) {
  INFO(c.what);
  c.plug();
  CHECK(fds_on_inode(qemu, c.image) > 0);
  c.unplug();
  CHECK(fds_on_inode(qemu, c.image) == 0);
}

std::vector<GoneCase> gone_cases(FlowsFixture& fx, const std::string& name, bool with_virtio) {
  const auto& im = fx.images;
  std::vector<GoneCase> cases;
  for (const char* f : {"scsi.img", "virtio.img", "cd.iso", "cd2.iso"}) {
    qbtest::make_image(im / f, 64 * 2048, std::string("QB-GONE-") + f);
  }
  cases.push_back({"scsi disk", [&fx, name] {
                     REQUIRE(fx.run(fx.broker.add_disk(name, disk("s", fx.images / "scsi.img"))));
                   },
                   [&fx, name] { REQUIRE(fx.run(fx.broker.remove_disk(name, "s"))); },
                   im / "scsi.img"});
  if (with_virtio) {
    cases.push_back({"virtio disk", [&fx, name] {
                       REQUIRE(fx.run(fx.broker.add_disk(
                           name, disk("v", fx.images / "virtio.img", DiskFormat::raw, DiskBus::virtio))));
                     },
                     [&fx, name] { REQUIRE(fx.run(fx.broker.remove_disk(name, "v"))); },
                     im / "virtio.img"});
  }
  cases.push_back({"CD eject", [&fx, name] {
                     REQUIRE(fx.run(fx.broker.insert_medium(name, "cd0", {fx.images / "cd.iso", true})));
                   },
                   [&fx, name] { REQUIRE(fx.run(fx.broker.eject_medium(name, "cd0", true))); },
                   im / "cd.iso"});
  cases.push_back({"CD medium replaced", [&fx, name] {
                     REQUIRE(fx.run(fx.broker.insert_medium(name, "cd0", {fx.images / "cd.iso", true})));
                   },
                   [&fx, name] {
                     REQUIRE(fx.run(fx.broker.insert_medium(name, "cd0", {fx.images / "cd2.iso", true})));
                   },
                   im / "cd.iso"});
  return cases;
}

}  // namespace

TEST_CASE("an unplugged image leaves QEMU's fd table at once on a running domain",
          "[flows][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  FlowsFixture fx(kGoneBase);
  auto spec = FlowsFixture::guest("fl-gone");
  spec.cdroms.push_back({"cd0", "", std::nullopt});
  auto con = fx.boot(spec);  // a guest that answers a virtio unplug
  const pid_t qemu = fx.pid_of("fl-gone");
  for (auto& c : gone_cases(fx, "fl-gone", true)) check_gone(qemu, c);
  REQUIRE(fx.run(fx.broker.destroy("fl-gone")));
}

// A paused guest cannot answer a virtio unplug (that times out, and the disk stays whole), so
// the kinds here are those QEMU lets go of alone. No block node holds the image any more; QEMU
// 7.2 closes the fdset's own fd only while the VM runs (docs/flows.md), so until the domain runs
// again that one fd may stay, and then the API reports it in fdsets_to_close.
TEST_CASE("an unplugged image leaves QEMU's fd table on a paused domain, or is reported until it runs",
          "[flows][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  FlowsFixture fx(kGonePausedBase);
  auto spec = FlowsFixture::guest("fl-gone-p");
  spec.cdroms.push_back({"cd0", "", std::nullopt});
  auto con = fx.boot(spec);
  const pid_t qemu = fx.pid_of("fl-gone-p");
  REQUIRE(fx.run(fx.broker.pause("fl-gone-p")));
  auto cases = gone_cases(fx, "fl-gone-p", false);
  for (auto& c : cases) {
    INFO(c.what);
    c.plug();
    CHECK(fds_on_inode(qemu, c.image) > 0);
    c.unplug();
    // At most the fdsets' own fds, each reported: no block node reads the image.
    CHECK(fds_on_inode(qemu, c.image) <= static_cast<int>(fx.reported_held("fl-gone-p").size()));
  }
  // Whatever is still held goes as soon as the VM runs.
  REQUIRE(fx.run(fx.broker.resume("fl-gone-p")));
  for (auto& c : cases) {
    INFO(c.what);
    bool gone = false;
    for (int i = 0; i < 250 && !gone; ++i) {
      gone = fds_on_inode(qemu, c.image) == 0;
      if (!gone) std::this_thread::sleep_for(20ms);
    }
    CHECK(gone);
  }
  REQUIRE(fx.run(fx.broker.destroy("fl-gone-p")));
}
