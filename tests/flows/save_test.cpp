// Save and restore through the Broker against real jailed QEMUs and the booted test guest: the
// guest's counter and disks survive a save and restore, every refusal and failure leaves nothing
// running and no file behind, and QEMU never holds the save file by path.
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/use_future.hpp>
#include <filesystem>
#include <functional>
#include <future>
#include <thread>

#include "broker/api/http_errors.hpp"
#include "broker/core/atomic_file.hpp"
#include "broker/core/errc.hpp"
#include "broker/lifecycle/proc.hpp"
#include "fdpass/errc.hpp"
#include "flows_fixture.hpp"

using namespace std::chrono_literals;
namespace fs = std::filesystem;
using broker::DiskBus;
using broker::DiskFormat;
using qbtest::disk;
using qbtest::FlowsFixture;
using qbtest::find_disk;
using qbtest::guest;
using qbtest::guest_eventually;

namespace {

constexpr uid_t kRoundTripBase = 3'108'000;
constexpr uid_t kRefusedBase = 3'108'010;
constexpr uid_t kFullBase = 3'108'020;
constexpr uid_t kCancelBase = 3'108'030;
constexpr uid_t kUpdateBase = 3'108'060;
constexpr uid_t kUpdateFailBase = 3'108'090;

// The save root exists before the broker that is configured with it.
struct SaveDir {
  qbtest::TempDir saves;
};

struct SaveFixture : SaveDir, FlowsFixture {
  explicit SaveFixture(uid_t base) : FlowsFixture(base, with_save_root(saves.path())) {}
  static broker::BrokerConfig with_save_root(const std::string& dir) {
    broker::BrokerConfig c;
    c.save_root = dir;
    return c;
  }
  // The names in the save root.
  std::set<std::string> saved_files() const {
    std::set<std::string> out;
    for (const auto& e : fs::directory_iterator(saves.path())) out.insert(e.path().filename());
    return out;
  }
  // No line sent to any QEMU names a path in the save root.
  void check_transcript() const {
    for (const auto& line : transcript) {
      INFO(line);
      CHECK(line.find(saves.path()) == std::string::npos);
    }
  }
};

// A counter the guest bumps five times a second into /tmp/count (lost if the guest rebooted),
// renamed into place so that a reader never sees it half written.
void start_counter(qbtest::GuestConsole& con) {
  REQUIRE(guest(con,
                "(i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new "
                "/tmp/count; sleep 0.2; done) "
                "</dev/null >/dev/null 2>&1 &")
              .rc == 0);
}

// 0 until the counter's first write.
long counter(qbtest::GuestConsole& con) {
  auto out = guest(con, "cat /tmp/count 2>/dev/null");
  INFO(out.text);
  if (out.rc != 0 || out.text.empty()) return 0;
  return std::stol(out.text);
}

// Waits until the counter has moved past `than`.
long counter_after(qbtest::GuestConsole& con, long than) {
  for (int i = 0; i < 100; ++i) {
    long now = counter(con);
    if (now > than) return now;
    std::this_thread::sleep_for(100ms);
  }
  FAIL("the guest's counter stopped at " << than);
  return than;
}

// The "job" "progress" events of `job` queued on `stream`, each checked for the fields a
// progress bar reads.
int progress_events(FlowsFixture& fx, broker::EventStream& stream, const std::string& job) {
  int n = 0;
  while (stream.queued() > 0) {
    auto ev = fx.run(stream.next(std::chrono::steady_clock::now()));
    if (!ev || ev->kind != "job" || ev->name != "progress" || ev->data.at("job") != job.c_str())
      continue;
    INFO(boost::json::serialize(ev->data));
    CHECK(ev->data.at("bytes").is_number());
    CHECK(ev->data.at("total").to_number<double>() > 0);
    CHECK(ev->data.at("rate").is_number());
    CHECK(ev->data.at("phase").is_string());
    ++n;
  }
  return n;
}

bool qemu_running(FlowsFixture& fx, const std::string& domain) {
  return fx.qmp(domain, "query-status").at("running").as_bool();
}

}  // namespace

TEST_CASE("a saved domain restores with its guest's counter and disks as they were",
          "[flows][privileged][qemu][save]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  SaveFixture fx(kRoundTripBase);
  const auto& im = fx.images;
  qbtest::make_image(im / "v.img", 1 << 20, "QB-VIRTIO-DISK");
  qbtest::make_image(im / "s.img", 1 << 20, "QB-SCSI-DISK");
  auto c = FlowsFixture::guest("sv1");
  c.disks.push_back(disk("s1", im / "s.img"));
  c.disks.push_back(disk("v1", im / "v.img", DiskFormat::raw, DiskBus::virtio));
  auto con = fx.boot(std::move(c));
  const std::string vdev = find_disk(*con, "QB-VIRTIO-DISK");
  const std::string sdev = find_disk(*con, "QB-SCSI-DISK");
  REQUIRE(guest(*con, "printf QB-BEFORE-SAVE | dd of=" + vdev +
                          " bs=512 seek=8 conv=notrunc,fsync 2>/dev/null")
              .rc == 0);
  start_counter(*con);
  const long before = counter_after(*con, 1);
  const auto original = fx.run(fx.broker.info("sv1", false));
  REQUIRE(original);

  const std::string file = fx.saves / "sv1.state";
  auto save_events = fx.broker.events().subscribe("sv1");
  auto saved = fx.run(fx.broker.save("sv1", {file, false}));
  INFO((saved ? "" : saved.error().describe()));
  REQUIRE(saved);
  CHECK(progress_events(fx, *save_events, "save") > 0);
  // Destroyed by uid once the file was written, as virsh save does; only the file is left.
  CHECK_FALSE(fx.broker.exists("sv1"));
  CHECK(broker::lifecycle::live_processes_of_uid("/proc", original->uid) == 0);
  CHECK(fx.saved_files() == std::set<std::string>{"sv1.state"});
  con.reset();

  auto restore_events = fx.broker.events().subscribe("sv2");
  auto restored = fx.run(fx.broker.restore({file, "sv2", false}));
  INFO((restored ? "" : restored.error().describe()));
  REQUIRE(restored);
  CHECK(progress_events(fx, *restore_events, "restore") > 0);
  CHECK(restored->state == broker::RunState::running);
  CHECK(qbtest::fds_on(restored->pid, file) == 0);
  auto fd = qbtest::connect_retry(restored->console, 10s);
  REQUIRE(fd);
  qbtest::GuestConsole again(std::move(fd));
  // The same guest, not a new boot: its counter goes on from where it was.
  const long after = counter(again);
  CHECK(after >= before);
  CHECK(after < before + 50);
  counter_after(again, after);
  // Both disks are back where the guest had them, with what it wrote; it writes on.
  CHECK(guest(again, "dd if=" + vdev + " bs=512 skip=8 count=1 2>/dev/null | head -c 14").text ==
        "QB-BEFORE-SAVE");
  CHECK(guest(again, "head -c 12 " + sdev).text == "QB-SCSI-DISK");
  REQUIRE(guest(again, "printf QB-AFTER-RESTORE | dd of=" + vdev +
                           " bs=512 seek=16 conv=notrunc,fsync 2>/dev/null")
              .rc == 0);
  CHECK(qbtest::read_at(im / "v.img", 16 * 512, 16) == "QB-AFTER-RESTORE");
  CHECK(restored->devices.at("disks").as_array().size() == 2);

  // A second save onto the same path replaces the file whole; the domain runs on.
  struct stat first {};
  REQUIRE(::stat(file.c_str(), &first) == 0);
  auto again_saved = fx.run(fx.broker.save("sv2", {file, true}));
  INFO((again_saved ? "" : again_saved.error().describe()));
  REQUIRE(again_saved);
  struct stat second {};
  REQUIRE(::stat(file.c_str(), &second) == 0);
  CHECK(second.st_ino != first.st_ino);
  CHECK(fx.saved_files() == std::set<std::string>{"sv1.state"});
  CHECK(counter_after(again, counter(again)) > after);
  auto from_second = fx.run(fx.broker.restore({file, "sv3", true}));
  INFO((from_second ? "" : from_second.error().describe()));
  REQUIRE(from_second);
  CHECK(from_second->state == broker::RunState::paused);
  REQUIRE(fx.run(fx.broker.destroy("sv3")));
  fx.check_transcript();
  REQUIRE(fx.run(fx.broker.destroy("sv2")));
}

TEST_CASE("a foreign, truncated or altered save file, or one whose disk changed, restores nothing",
          "[flows][privileged][qemu][save]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  SaveFixture fx(kRefusedBase);
  const auto& im = fx.images;
  qbtest::make_image(im / "d.img", 1 << 20, "QB-DISK");
  auto c = FlowsFixture::guest("sf1");
  c.disks.push_back(disk("d1", im / "d.img", DiskFormat::raw, DiskBus::virtio));
  auto con = fx.boot(std::move(c));
  start_counter(*con);
  const long before = counter_after(*con, 1);

  // keep_running: the domain stays, and runs on.
  const std::string file = fx.saves / "sf1.state";
  auto saved = fx.run(fx.broker.save("sf1", {file, true}));
  INFO((saved ? "" : saved.error().describe()));
  REQUIRE(saved);
  REQUIRE(fx.broker.exists("sf1"));
  CHECK(qemu_running(fx, "sf1"));
  counter_after(*con, before + 1);

  const auto uids = fx.uids.in_use();
  auto refused = [&](const std::string& path) {
    auto r = fx.run(fx.broker.restore({path, "sf2", false}));
    REQUIRE_FALSE(r);
    CHECK_FALSE(fx.broker.exists("sf2"));
    CHECK(fx.uids.in_use() == uids);
    return r.error();
  };
  const std::string data = broker::read_small_file(file, 1u << 30).value();

  qbtest::write_file(fx.saves / "foreign", "#!/bin/sh\necho not a save file\n");
  auto foreign = refused(fx.saves / "foreign");
  CHECK(foreign.code == broker::errc::invalid_argument);
  CHECK(foreign.field == "path");

  qbtest::write_file(fx.saves / "truncated", data.substr(0, data.size() - 4096));
  auto truncated = refused(fx.saves / "truncated");
  CHECK(truncated.code == broker::errc::invalid_argument);
  CHECK(truncated.message.find("truncated") != std::string::npos);

  // One byte of the stream flipped: only the checksum can tell, after QEMU took the stream.
  std::string altered = data;
  altered[altered.size() / 2] ^= 0x40;
  qbtest::write_file(fx.saves / "altered", altered);
  auto bad = refused(fx.saves / "altered");
  CHECK(bad.code == broker::errc::invalid_argument);
  CHECK(bad.message.find("checksum") != std::string::npos);

  CHECK(refused(fx.saves / "missing").code == std::errc::no_such_file_or_directory);
  auto outside = refused(im / "d.img");
  CHECK(outside.field == "path");

  // The disk was replaced by a copy (same bytes, another inode): not the disk that was saved.
  fs::copy_file(im / "d.img", im / "d.copy");
  fs::rename(im / "d.copy", im / "d.img");
  auto changed = refused(file);
  CHECK(changed.code == fdpass::errc::identity_changed);
  CHECK(changed.field == "disks.d1");
  CHECK(broker::api::classify(changed.code).status == boost::beast::http::status::conflict);
  fs::remove(im / "d.img");
  auto gone = refused(file);
  CHECK(gone.field == "disks.d1");

  auto taken = fx.run(fx.broker.restore({fx.saves / "altered", "sf1", false}));
  REQUIRE_FALSE(taken);
  CHECK(taken.error().code == broker::errc::already_exists);
  CHECK(fx.saved_files() == std::set<std::string>{"sf1.state", "foreign", "truncated", "altered"});
  fx.check_transcript();
  REQUIRE(fx.run(fx.broker.destroy("sf1")));
}

TEST_CASE("a save onto a full disk answers 507, removes the partial file and keeps the domain",
          "[flows][privileged][qemu][save]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  SaveFixture fx(kFullBase);
  // A save root far smaller than the guest's RAM.
  REQUIRE(::mount("tmpfs", fx.saves.path().c_str(), "tmpfs", MS_NOSUID | MS_NODEV,
                  "size=8m,mode=0700") == 0);
  struct Unmount {
    std::string dir;
    ~Unmount() { ::umount2(dir.c_str(), MNT_DETACH); }
  } unmount{fx.saves.path()};
  auto con = fx.boot(FlowsFixture::guest("sx1"));
  start_counter(*con);
  const long before = counter_after(*con, 1);

  auto r = fx.run(fx.broker.save("sx1", {fx.saves / "sx1.state", false}));
  REQUIRE_FALSE(r);
  CHECK(r.error().code == std::error_code(ENOSPC, std::system_category()));
  CHECK(broker::api::classify(r.error().code).status ==
        boost::beast::http::status::insufficient_storage);
  CHECK(r.error().field == "path");
  CHECK(fx.saved_files().empty());
  REQUIRE(fx.broker.exists("sx1"));
  CHECK(qemu_running(fx, "sx1"));
  counter_after(*con, before + 1);
  REQUIRE(fx.run(fx.broker.destroy("sx1")));
}

TEST_CASE("a cancelled save leaves the domain running and no file",
          "[flows][privileged][qemu][save]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  SaveFixture fx(kCancelBase);
  auto con = fx.boot(FlowsFixture::guest("sc1"));
  start_counter(*con);
  const long before = counter_after(*con, 1);

  auto none = fx.run(fx.broker.cancel_job("sc1"));
  REQUIRE_FALSE(none);
  CHECK(none.error().code == broker::errc::wrong_state);

  auto pending = boost::asio::co_spawn(
      fx.io, fx.broker.save("sc1", {fx.saves / "sc1.state", false}), boost::asio::use_future);
  // Cancelled once QEMU streams.
  auto streaming = [&] {
    for (const auto& line : fx.transcript) {
      if (line.find("\"migrate\"") != std::string::npos) return true;
    }
    return false;
  };
  for (int i = 0; i < 4000 && !streaming(); ++i) {
    fx.io.restart();
    fx.io.run_for(5ms);
  }
  REQUIRE(streaming());
  // Mid-save, QEMU holds a pipe and never the file: the broker alone has it open.
  const pid_t qemu = fx.pid_of("sc1");
  CHECK(qbtest::fds_on(qemu, fx.saves / ".sc1.state.sc1.part") == 0);
  CHECK(qbtest::fds_on(::getpid(), fx.saves / ".sc1.state.sc1.part") == 1);
  auto job = fx.run(fx.broker.cancel_job("sc1"));
  REQUIRE(job);
  CHECK(*job == "save");
  auto r = fx.run_until(pending, 60s);
  REQUIRE_FALSE(r);
  CHECK(r.error().code == broker::errc::cancelled);
  CHECK(fx.saved_files().empty());
  REQUIRE(fx.broker.exists("sc1"));
  CHECK(qemu_running(fx, "sc1"));
  counter_after(*con, before + 1);

  // A restore cancelled while QEMU loads the stream leaves nothing running.
  const std::string file = fx.saves / "kept.state";
  REQUIRE(fx.run(fx.broker.save("sc1", {file, true})));
  const auto uids = fx.uids.in_use();
  const auto sent = fx.transcript.size();
  auto restoring = boost::asio::co_spawn(fx.io, fx.broker.restore({file, "sc2", false}),
                                         boost::asio::use_future);
  auto loading = [&] {
    for (std::size_t i = sent; i < fx.transcript.size(); ++i) {
      if (fx.transcript[i].find("migrate-incoming") != std::string::npos) return true;
    }
    return false;
  };
  for (int i = 0; i < 4000 && !loading(); ++i) {
    fx.io.restart();
    fx.io.run_for(5ms);
  }
  REQUIRE(loading());
  REQUIRE(fx.run(fx.broker.cancel_job("sc2")));
  auto restored = fx.run_until(restoring, 60s);
  REQUIRE_FALSE(restored);
  CHECK(restored.error().code == broker::errc::cancelled);
  CHECK_FALSE(fx.broker.exists("sc2"));
  CHECK(fx.uids.in_use() == uids);

  // paused: the restored guest waits for a resume.
  auto paused = fx.run(fx.broker.restore({file, "sc3", true}));
  REQUIRE(paused);
  CHECK(paused->state == broker::RunState::paused);
  CHECK_FALSE(qemu_running(fx, "sc3"));
  REQUIRE(fx.run(fx.broker.resume("sc3")));
  CHECK(qemu_running(fx, "sc3"));
  REQUIRE(fx.run(fx.broker.destroy("sc3")));
  REQUIRE(fx.run(fx.broker.destroy("sc1")));
}

TEST_CASE("a live update moves the running guest to a fresh QEMU under a new uid, twice",
          "[flows][privileged][qemu][update]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  SaveFixture fx(kUpdateBase);
  const auto& im = fx.images;
  qbtest::make_image(im / "u.img", 1 << 20, "QB-UPDATE-DISK");
  auto c = FlowsFixture::guest("up1");
  c.disks.push_back(disk("u1", im / "u.img", DiskFormat::raw, DiskBus::virtio));
  auto con = fx.boot(std::move(c));
  const std::string vdev = find_disk(*con, "QB-UPDATE-DISK");
  start_counter(*con);
  long before = counter_after(*con, 1);

  for (int round = 0; round < 2; ++round) {
    INFO("update " << round);
    const auto was = fx.run(fx.broker.info("up1", false));
    REQUIRE(was);
    const int image_fds = qbtest::fds_on(was->pid, im / "u.img");
    CHECK(image_fds > 0);
    auto events = fx.broker.events().subscribe("up1");
    auto r = fx.run(fx.broker.migrate("up1", {"local"}));
    INFO((r ? "" : r.error().describe()));
    REQUIRE(r);
    CHECK(progress_events(fx, *events, "live-update") > 0);
    const auto now = fx.run(fx.broker.info("up1"));
    REQUIRE(now);
    CHECK(now->pid != was->pid);
    CHECK(now->uid != was->uid);
    CHECK(now->state == broker::RunState::running);
    CHECK(now->qemu_status == "running");
    // The old QEMU is gone by its uid, and with it every file it had under the run directory.
    CHECK(broker::lifecycle::live_processes_of_uid("/proc", was->uid) == 0);
    CHECK(fx.uids.in_use().size() == 1);
    CHECK(fs::exists(fx.run_dir / "qmp/up1.sock"));
    CHECK_FALSE(fs::exists(fx.run_dir / "qmp/up1.old.sock"));
    CHECK_FALSE(fs::exists(fx.run_dir / "log/up1.old.log"));
    CHECK(qbtest::fds_on(now->pid, im / "u.img") == image_fds);
    // The same guest on the new QEMU: its counter goes on, its disk still takes writes.
    con.reset();
    auto fd = qbtest::connect_retry(now->console, 10s);
    REQUIRE(fd);
    con = std::make_unique<qbtest::GuestConsole>(std::move(fd));
    const long after = counter(*con);
    CHECK(after >= before);
    CHECK(after < before + 50);
    before = counter_after(*con, after);
    const std::string tag = "QB-UPDATED-" + std::to_string(round);
    REQUIRE(guest(*con, "printf " + tag + " | dd of=" + vdev +
                            " bs=512 seek=32 conv=notrunc,fsync 2>/dev/null")
                .rc == 0);
    CHECK(qbtest::read_at(im / "u.img", 32 * 512, tag.size()) == tag);
  }
  // Another broker is named by the absolute path of its API socket; no such broker: refused,
  // naming "to", and the domain runs on.
  auto other = fx.run(fx.broker.migrate("up1", {"unix:/run/elsewhere.sock"}));
  REQUIRE_FALSE(other);
  CHECK(other.error().code == broker::errc::invalid_argument);
  CHECK(other.error().field == "to");
  auto nobody = fx.run(fx.broker.migrate("up1", {fx.run_dir / "no-broker.sock"}));
  REQUIRE_FALSE(nobody);
  CHECK(nobody.error().field == "to");
  CHECK(fx.run(fx.broker.info("up1", false))->state == broker::RunState::running);
  fx.check_transcript();
  REQUIRE(fx.run(fx.broker.destroy("up1")));
}

TEST_CASE("a live update whose new QEMU dies, or that is cancelled, leaves the old one running",
          "[flows][privileged][qemu][update]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  SaveFixture fx(kUpdateFailBase);
  auto con = fx.boot(FlowsFixture::guest("uf1"));
  start_counter(*con);
  long before = counter_after(*con, 1);
  const auto was = fx.run(fx.broker.info("uf1", false));
  REQUIRE(was);

  // Runs the update until the new QEMU takes the stream, then `act`; the update must fail.
  auto interrupted = [&](const std::function<void()>& act) {
    const auto sent = fx.transcript.size();
    auto pending =
        boost::asio::co_spawn(fx.io, fx.broker.migrate("uf1", {"local"}), boost::asio::use_future);
    auto streaming = [&] {
      for (std::size_t i = sent; i < fx.transcript.size(); ++i) {
        if (fx.transcript[i].find("\"migrate\"") != std::string::npos) return true;
      }
      return false;
    };
    for (int i = 0; i < 4000 && !streaming(); ++i) {
      fx.io.restart();
      fx.io.run_for(1ms);
    }
    REQUIRE(streaming());
    act();
    auto r = fx.run_until(pending, 60s);
    REQUIRE_FALSE(r);
    return r.error();
  };
  auto unchanged = [&] {
    const auto now = fx.run(fx.broker.info("uf1"));
    REQUIRE(now);
    CHECK(now->pid == was->pid);
    CHECK(now->uid == was->uid);
    CHECK(now->qemu_status == "running");
    CHECK(now->console == fx.run_dir / "console/uf1.sock");
    CHECK(fs::exists(fx.run_dir / "qmp/uf1.sock"));
    CHECK_FALSE(fs::exists(fx.run_dir / "qmp/uf1.old.sock"));
    CHECK(fx.uids.in_use().size() == 1);
    before = counter_after(*con, before);
  };

  // The destination dies mid-stream: every process of its uid is killed.
  auto died = interrupted([&] {
    for (const auto& [uid, owner] : fx.uids.in_use()) {
      if (uid == was->uid) continue;
      for (const auto& p : broker::lifecycle::processes_of_uid("/proc", uid))
        ::kill(p.pid, SIGKILL);
    }
  });
  INFO(died.describe());
  unchanged();

  auto cancelled = interrupted([&] { REQUIRE(fx.run(fx.broker.cancel_job("uf1"))); });
  CHECK(cancelled.code == broker::errc::cancelled);
  unchanged();
  REQUIRE(fx.run(fx.broker.destroy("uf1")));
}
