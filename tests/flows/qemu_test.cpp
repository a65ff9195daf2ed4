// The flows through the Broker against real jailed QEMUs and the booted test guest: the guest
// reads and writes what the broker handed over, failures injected through QEMU itself leave
// nothing behind, and after every flow QEMU holds only objects the broker opened.
#include <arpa/inet.h>
#include <dirent.h>
#include <ftw.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/ip_icmp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "broker/core/errc.hpp"
#include "fdpass/devices.hpp"
#include "fdpass/errc.hpp"
#include "flows_fixture.hpp"

using namespace std::chrono_literals;
namespace json = boost::json;
namespace fs = std::filesystem;
using broker::DiskBus;
using broker::DiskFormat;
using broker::DiskSpec;
using qbtest::FlowsFixture;
using qbtest::disk;

using qbtest::fds_on;
using qbtest::find_disk;
using qbtest::guest;
using qbtest::guest_eventually;
using qbtest::host_eventually;

namespace {

constexpr uid_t kCdBase = 3'102'000;
constexpr uid_t kScsiBase = 3'102'100;
constexpr uid_t kVirtioBase = 3'102'200;
constexpr uid_t kNicVncBase = 3'102'300;
constexpr uid_t kRollbackBase = 3'102'400;
constexpr uid_t kProofBase = 3'102'500;
constexpr uid_t kHeldBase = 3'102'600;
constexpr uid_t kPlannedBase = 3'102'680;
constexpr uid_t kEarlyExitBase = 3'102'690;

bool exists(const std::string& p) {
  struct stat st {};
  return ::lstat(p.c_str(), &st) == 0;
}

// Waits on the broker's event stream for a QEMU event.
bool wait_event(FlowsFixture& fx, broker::EventStream& s, const std::string& name,
                const std::function<bool(const json::object&)>& match,
                std::chrono::milliseconds timeout = 15s) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    auto e = fx.run(s.next(std::min(deadline, std::chrono::steady_clock::now() + 200ms)));
    if (e && e->kind == "qemu" && e->name == name && match(e->data)) return true;
  }
  return false;
}

// "RFB 003.008\n" from a VNC server, read by a client thread while the broker keeps running.
std::string vnc_banner(FlowsFixture& fx, const std::string& address) {
  auto f = std::async(std::launch::async, [address]() -> std::string {
    int s = -1;
    if (address.rfind("unix:", 0) == 0) {
      auto fd = fdpass::connect_unix(address.substr(5));
      if (!fd) return "connect: " + fd.error().message();
      s = fd->release();
    } else {
      auto colon = address.rfind(':');
      s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_port = htons(static_cast<std::uint16_t>(std::stoi(address.substr(colon + 1))));
      ::inet_pton(AF_INET, address.substr(0, colon).c_str(), &a.sin_addr);
      if (::connect(s, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
        ::close(s);
        return std::string("connect: ") + std::strerror(errno);
      }
    }
    std::string got;
    auto deadline = std::chrono::steady_clock::now() + 10s;
    while (got.size() < 12 && std::chrono::steady_clock::now() < deadline) {
      pollfd p{s, POLLIN, 0};
      if (::poll(&p, 1, 100) != 1) continue;
      char buf[12];
      ssize_t n = ::read(s, buf, sizeof(buf) - got.size());
      if (n <= 0) break;
      got.append(buf, static_cast<std::size_t>(n));
    }
    ::close(s);
    return got;
  });
  return fx.run_until(f);
}

std::uint16_t icmp_checksum(const void* data, std::size_t len) {
  const auto* p = static_cast<const std::uint8_t*>(data);
  std::uint32_t sum = 0;
  for (std::size_t i = 0; i + 1 < len; i += 2) sum += static_cast<std::uint32_t>(p[i] << 8 | p[i + 1]);
  if (len % 2 != 0) sum += static_cast<std::uint32_t>(p[len - 1] << 8);
  while ((sum >> 16) != 0) sum = (sum & 0xffff) + (sum >> 16);
  return htons(static_cast<std::uint16_t>(~sum));
}

// ICMP echo from the host (a raw socket: no ping binary on the host).
bool host_ping(const std::string& ip, std::chrono::milliseconds timeout) {
  int s = ::socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_ICMP);
  if (s < 0) return false;
  sockaddr_in to{};
  to.sin_family = AF_INET;
  ::inet_pton(AF_INET, ip.c_str(), &to.sin_addr);
  const std::uint16_t ident = static_cast<std::uint16_t>(::getpid());
  auto deadline = std::chrono::steady_clock::now() + timeout;
  bool got = false;
  for (std::uint16_t seq = 1; !got && std::chrono::steady_clock::now() < deadline; ++seq) {
    icmphdr h{};
    h.type = ICMP_ECHO;
    h.un.echo.id = htons(ident);
    h.un.echo.sequence = htons(seq);
    h.checksum = icmp_checksum(&h, sizeof(h));
    ::sendto(s, &h, sizeof(h), 0, reinterpret_cast<sockaddr*>(&to), sizeof(to));
    auto slice = std::chrono::steady_clock::now() + 300ms;
    while (!got && std::chrono::steady_clock::now() < slice) {
      pollfd p{s, POLLIN, 0};
      if (::poll(&p, 1, 50) != 1) continue;
      char buf[1500];
      sockaddr_in from{};
      socklen_t fl = sizeof(from);
      ssize_t n = ::recvfrom(s, buf, sizeof(buf), 0, reinterpret_cast<sockaddr*>(&from), &fl);
      if (n < static_cast<ssize_t>(sizeof(iphdr))) continue;
      auto* ip_h = reinterpret_cast<iphdr*>(buf);
      std::size_t off = static_cast<std::size_t>(ip_h->ihl) * 4;
      if (static_cast<std::size_t>(n) < off + sizeof(icmphdr)) continue;
      auto* r = reinterpret_cast<icmphdr*>(buf + off);
      got = r->type == ICMP_ECHOREPLY && ntohs(r->un.echo.id) == ident &&
            from.sin_addr.s_addr == to.sin_addr.s_addr;
    }
  }
  ::close(s);
  return got;
}

// The fdset ids QEMU lists, as query-fdsets shows them.
std::set<std::int64_t> fdset_ids(FlowsFixture& fx, const std::string& domain) {
  std::set<std::int64_t> out;
  const auto sets = fx.qmp(domain, "query-fdsets");
  for (const auto& f : sets.as_array()) {
    out.insert(f.at("fdset-id").to_number<std::int64_t>());
  }
  return out;
}

std::string read_text(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace

TEST_CASE("CD media are inserted and replaced and ejected with tray events and a locked tray needs force",
          "[flows][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  FlowsFixture fx(kCdBase);
  for (const char* m : {"A", "B", "C"}) {
    qbtest::make_image(fx.images / (std::string("cd-") + m + ".iso"), 64 * 2048,
                       std::string("QB-CD-") + m + "-MARKER");
  }
  auto spec = FlowsFixture::guest("fl-cd");
  spec.cdroms.push_back({"cd0", fx.images / "cd-A.iso"});
  auto con = fx.boot(spec);
  const std::string read_cd = "dd if=/dev/sr0 bs=2048 count=1 2>/dev/null | head -c 14";
  CHECK(guest(*con, read_cd).text == "QB-CD-A-MARKER");

  auto events = fx.broker.events().subscribe("fl-cd");
  REQUIRE(fx.run(fx.broker.insert_medium("fl-cd", "cd0", {fx.images / "cd-B.iso", false})));
  auto is_cd0 = [](bool open) {
    return [open](const json::object& d) {
      return d.at("id") == "cd0" && d.at("tray-open").as_bool() == open;
    };
  };
  CHECK(wait_event(fx, *events, "DEVICE_TRAY_MOVED", is_cd0(true)));
  CHECK(wait_event(fx, *events, "DEVICE_TRAY_MOVED", is_cd0(false)));
  CHECK(guest(*con, read_cd).text == "QB-CD-B-MARKER");

  // A guest process holds the drive open: the guest locked the tray.
  guest(*con, "sleep 600 < /dev/sr0 & echo $! > /tmp/holder");
  REQUIRE(host_eventually([&] {
    const auto block = fx.qmp("fl-cd", "query-block");
    for (const auto& b : block.as_array()) {
      if (b.at("qdev") == "cd0") return b.at("locked").as_bool();
    }
    return false;
  }));
  auto before = fx.snapshot("fl-cd");
  auto sent = fx.transcript.size();
  std::size_t fds = qbtest::open_fd_count();
  auto locked = fx.run(fx.broker.insert_medium("fl-cd", "cd0", {fx.images / "cd-C.iso", false}));
  REQUIRE_FALSE(locked);
  CHECK(locked.error().code == broker::errc::tray_locked);
  CHECK(locked.error().message.find("force") != std::string::npos);
  auto eject_locked = fx.run(fx.broker.eject_medium("fl-cd", "cd0", false));
  REQUIRE_FALSE(eject_locked);
  CHECK(eject_locked.error().code == broker::errc::tray_locked);
  CHECK(fx.snapshot("fl-cd") == before);
  CHECK(qbtest::open_fd_count() == fds);
  CHECK(fx.transcript.size() > sent);  // QEMU was asked, and said no

  REQUIRE(fx.run(fx.broker.insert_medium("fl-cd", "cd0", {fx.images / "cd-C.iso", true})));
  guest(*con, "kill $(cat /tmp/holder); wait");
  CHECK(guest_eventually(*con, read_cd, "QB-CD-C-MARKER"));
  const auto fdsets_reply = fx.qmp("fl-cd", "query-fdsets");
  const auto& fdsets = fdsets_reply.as_array();
  REQUIRE(fdsets.size() == 1);  // the media it replaced are gone
  CHECK(fdsets[0].at("fds").at(0).at("opaque") == "qb:cd0");

  REQUIRE(fx.run(fx.broker.eject_medium("fl-cd", "cd0", false)));
  CHECK(wait_event(fx, *events, "DEVICE_TRAY_MOVED", is_cd0(true)));
  CHECK(guest(*con, "dd if=/dev/sr0 bs=2048 count=1 of=/dev/null 2>/dev/null").rc != 0);
  CHECK(fx.qmp("fl-cd", "query-fdsets").as_array().empty());
  REQUIRE(fx.run(fx.broker.eject_medium("fl-cd", "cd0", false)));  // empty: nothing to do

  // Refused before QEMU is touched.
  sent = fx.transcript.size();
  auto missing = fx.run(fx.broker.insert_medium("fl-cd", "cd0", {fx.images / "nope.iso", false}));
  REQUIRE_FALSE(missing);
  CHECK(missing.error().code == fdpass::errc::not_found);
  CHECK(missing.error().field == "path");
  auto unknown = fx.run(fx.broker.insert_medium("fl-cd", "cd7", {fx.images / "cd-A.iso", false}));
  REQUIRE_FALSE(unknown);
  CHECK(unknown.error().code == broker::errc::not_found);
  CHECK(fx.transcript.size() == sent);

  // And in again after the eject.
  REQUIRE(fx.run(fx.broker.insert_medium("fl-cd", "cd0", {fx.images / "cd-A.iso", false})));
  CHECK(guest_eventually(*con, read_cd, "QB-CD-A-MARKER"));
  REQUIRE(fx.run(fx.broker.destroy("fl-cd")));
}

TEST_CASE("SCSI disks raw and qcow2 over a backing file and read-only and a loop device keep guest writes",
          "[flows][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  FlowsFixture fx(kScsiBase);
  const auto& im = fx.images;
  qbtest::make_image(im / "rw.img", 1 << 20, "QB-RW-MARKER");
  qbtest::make_image(im / "ro.img", 1 << 20, "QB-RO-MARKER");
  qbtest::make_image(im / "loop.img", 1 << 20, "QB-LOOP-MARKER");
  qbtest::make_image(im / "base.img", 1 << 20, "QB-BASE-MARKER", {{512 * 1024, "QB-BASE-FAR"}});
  REQUIRE(qbtest::sh("qemu-img create -q -f qcow2 -b " + im / "base.img" + " -F raw " +
                     im / "top.qcow2") == 0);
  qbtest::write_file(im / "top-marker", "QB-TOP-MARKER");
  REQUIRE(qbtest::sh("qemu-io -f qcow2 -c 'write -s " + im / "top-marker" + " 0 13' " +
                     im / "top.qcow2" + " >/dev/null") == 0);
  auto con = fx.boot(FlowsFixture::guest("fl-scsi"));

  // Read-write raw: the guest reads the marker, writes, and the host reads it after unplug.
  REQUIRE(fx.run(fx.broker.add_disk("fl-scsi", disk("rw", im / "rw.img"))));
  std::string dev = find_disk(*con, "QB-RW-MARKER");
  CHECK(guest(*con, "printf QB-GUEST-WROTE | dd of=" + dev +
                        " bs=512 seek=64 conv=notrunc,fsync 2>/dev/null").rc == 0);
  // Far into the image file too: the jail sets no RLIMIT_FSIZE that would fail such writes.
  CHECK(guest(*con, "printf QB-GUEST-FAR | dd of=" + dev +
                        " bs=512 seek=1536 conv=notrunc,fsync 2>/dev/null").rc == 0);

  // Read-only raw: the guest sees a write-protected disk.
  REQUIRE(fx.run(fx.broker.add_disk("fl-scsi", disk("ro", im / "ro.img", DiskFormat::raw,
                                                   DiskBus::scsi, true))));
  std::string ro = find_disk(*con, "QB-RO-MARKER");
  CHECK(guest(*con, "blockdev --getro " + ro).text == "1");
  CHECK(guest(*con, "printf X | dd of=" + ro + " conv=notrunc,fsync 2>/dev/null").rc != 0);

  // qcow2 over a backing file the broker opened: the overlay's and the backing file's bytes.
  REQUIRE(fx.run(fx.broker.add_disk("fl-scsi", disk("q", im / "top.qcow2", DiskFormat::qcow2,
                                                  DiskBus::scsi, false, im / "base.img"))));
  std::string q = find_disk(*con, "QB-TOP-MARKER");
  CHECK(guest(*con, "dd if=" + q + " bs=1024 skip=512 count=1 2>/dev/null | head -c 11").text ==
        "QB-BASE-FAR");

  // A host block device: a loop device, named by path and pinned by its diskseq.
  fdpass::UniqueFd backing(::open((im / "loop.img").c_str(), O_RDWR | O_CLOEXEC));
  REQUIRE(backing);
  auto loop = fdpass::attach_loop(backing, fdpass::Access::read_write);
  REQUIRE(loop);
  backing.reset();
  auto wrong = disk("blk", loop->path);
  wrong.diskseq = loop->diskseq + 1;
  auto sent = fx.transcript.size();
  auto refused = fx.run(fx.broker.add_disk("fl-scsi", wrong));
  REQUIRE_FALSE(refused);
  CHECK(refused.error().code == fdpass::errc::diskseq_mismatch);
  CHECK(refused.error().field == "diskseq");
  CHECK(fx.transcript.size() == sent);
  auto right = disk("blk", loop->path);
  right.diskseq = loop->diskseq;
  REQUIRE(fx.run(fx.broker.add_disk("fl-scsi", right)));
  std::string blk = find_disk(*con, "QB-LOOP-MARKER");
  // Far into the loop device as well.
  CHECK(guest(*con, "printf QB-LOOP-WROTE | dd of=" + blk +
                        " bs=512 seek=1024 conv=notrunc,fsync 2>/dev/null").rc == 0);
  auto info = fx.run(fx.broker.info("fl-scsi", false));
  REQUIRE(info);
  bool listed = false;
  for (const auto& x : info->devices.at("disks").as_array()) {
    if (x.at("id") == "blk") listed = x.at("diskseq").to_number<std::uint64_t>() == loop->diskseq;
  }
  CHECK(listed);

  // Unplug everything: the guest loses the disks, QEMU holds nothing of them.
  for (const char* id : {"rw", "ro", "q", "blk"}) {
    INFO(id);
    REQUIRE(fx.run(fx.broker.remove_disk("fl-scsi", id)));
  }
  CHECK(guest_eventually(*con, "ls /sys/block | grep -c sd", "0"));
  CHECK(qbtest::read_at(im / "rw.img", 64 * 512, 14) == "QB-GUEST-WROTE");
  CHECK(qbtest::read_at(im / "rw.img", 1536 * 512, 12) == "QB-GUEST-FAR");
  CHECK(qbtest::read_at(im / "loop.img", 1024 * 512, 13) == "QB-LOOP-WROTE");
  auto s = fx.snapshot("fl-scsi");
  INFO(qbtest::describe(s));
  CHECK(s.nodes.empty());
  CHECK(s.backends.empty());
  CHECK(s.fdsets.empty());
  CHECK(s.devices == std::set<std::string>{"rp1", "rp2", "rp3", "rp4", "qb-scsi0"});
  REQUIRE(fx.run(fx.broker.destroy("fl-scsi")));
  loop->fd.reset();
}

TEST_CASE("virtio disks keep guest writes across the unplug and an unacknowledged unplug times out",
          "[flows][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  broker::BrokerConfig config;
  config.timeouts.unplug = 3000ms;
  FlowsFixture fx(kVirtioBase, config);
  const auto& im = fx.images;
  qbtest::make_image(im / "v1.img", 1 << 20, "QB-V1-MARKER");
  qbtest::make_image(im / "base.img", 1 << 20, "QB-VBASE-MARKER");
  REQUIRE(qbtest::sh("qemu-img create -q -f qcow2 -b " + im / "base.img" + " -F raw " +
                     im / "v2.qcow2") == 0);
  auto con = fx.boot(FlowsFixture::guest("fl-virtio"));
  const auto empty = fx.snapshot("fl-virtio");

  auto v1 = disk("v1", im / "v1.img", DiskFormat::raw, DiskBus::virtio);
  v1.serial = "QBSERIAL1";
  REQUIRE(fx.run(fx.broker.add_disk("fl-virtio", v1)));
  std::string dev = find_disk(*con, "QB-V1-MARKER");
  CHECK(guest(*con, "cat /sys/block/" + dev.substr(5) + "/serial").text == "QBSERIAL1");
  CHECK(guest(*con, "printf QB-VIRTIO-WROTE | dd of=" + dev +
                        " bs=512 seek=100 conv=notrunc,fsync 2>/dev/null").rc == 0);
  std::vector<std::string> phases;
  REQUIRE(fx.run(fx.broker.remove_disk("fl-virtio", "v1", [&](double, std::string_view p) {
    phases.emplace_back(p);
  })));
  CHECK_FALSE(phases.empty());
  CHECK(guest_eventually(*con, "ls /sys/block | grep -c vd", "0"));
  CHECK(qbtest::read_at(im / "v1.img", 100 * 512, 15) == "QB-VIRTIO-WROTE");
  CHECK(fx.snapshot("fl-virtio") == empty);

  // qcow2 over a backing file on virtio; then a guest that cannot answer (paused): the unplug
  // times out and the disk stays whole.
  REQUIRE(fx.run(fx.broker.add_disk("fl-virtio", disk("v2", im / "v2.qcow2", DiskFormat::qcow2,
                                                     DiskBus::virtio, false, im / "base.img"))));
  find_disk(*con, "QB-VBASE-MARKER");
  const auto plugged = fx.snapshot("fl-virtio");
  REQUIRE(fx.run(fx.broker.pause("fl-virtio")));
  auto events = fx.broker.events().subscribe("fl-virtio");
  auto start = std::chrono::steady_clock::now();
  auto timeout = fx.run(fx.broker.remove_disk("fl-virtio", "v2"));
  auto took = std::chrono::steady_clock::now() - start;
  REQUIRE_FALSE(timeout);
  CHECK(timeout.error().code == broker::errc::guest_timeout);
  CHECK(took >= 3000ms);
  CHECK(fx.snapshot("fl-virtio") == plugged);
  auto info = fx.run(fx.broker.info("fl-virtio", false));
  REQUIRE(info);
  CHECK(info->devices.at("disks").as_array().size() == 1);

  // Resumed, the guest acts on the request it got; the next removal finishes the job.
  REQUIRE(fx.run(fx.broker.resume("fl-virtio")));
  CHECK(wait_event(fx, *events, "DEVICE_DELETED",
                   [](const json::object& d) { return d.contains("device") && d.at("device") == "v2"; }));
  REQUIRE(fx.run(fx.broker.remove_disk("fl-virtio", "v2")));
  CHECK(fx.snapshot("fl-virtio") == empty);
  REQUIRE(fx.run(fx.broker.destroy("fl-virtio")));
}

TEST_CASE("a NIC over a host tap answers the host ping and VNC listeners bound by the broker serve RFB",
          "[flows][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  FlowsFixture fx(kNicVncBase);
  auto con = fx.boot(FlowsFixture::guest("fl-net"));
  const auto empty = fx.snapshot("fl-net");

  const std::string tap = "qbft" + std::to_string(::getpid() % 100000);
  const std::string net = "10.213." + std::to_string(::getpid() % 200 + 20);
  REQUIRE(fx.run(fx.broker.add_nic("fl-net", broker::NicSpec{"n1", tap, "52:54:00:ab:cd:01"})));
  CHECK(exists("/sys/class/net/" + tap));
  REQUIRE(qbtest::sh("ip addr add " + net + ".1/24 dev " + tap + " && ip link set " + tap + " up") == 0);
  CHECK(guest_eventually(*con, "cat /sys/class/net/eth0/address 2>/dev/null", "52:54:00:ab:cd:01"));
  CHECK(guest(*con, "ip link set eth0 up && ip addr add " + net + ".2/24 dev eth0").rc == 0);
  CHECK(host_ping(net + ".2", 20s));

  REQUIRE(fx.run(fx.broker.remove_nic("fl-net", "n1")));
  CHECK(guest_eventually(*con, "ls /sys/class/net | grep -c eth", "0"));
  CHECK(host_eventually([&] { return !exists("/sys/class/net/" + tap); }));
  CHECK(fx.snapshot("fl-net") == empty);

  // A tap that cannot be opened (lo is no tap): refused, the root port given back.
  auto sent = fx.transcript.size();
  auto bad = fx.run(fx.broker.add_nic("fl-net", broker::NicSpec{"n2", "lo", ""}));
  REQUIRE_FALSE(bad);
  CHECK(bad.error().field == "tap");
  CHECK(fx.transcript.size() == sent);

  // VNC over TCP, replaced by a Unix socket, removed; then the add_client hand-over.
  auto tcp = fx.run(fx.broker.set_vnc("fl-net", qbtest::vnc("127.0.0.1:0")));
  REQUIRE(tcp);
  CHECK(vnc_banner(fx, tcp->address) == "RFB 003.008\n");
  const std::string sock = fx.images / "vnc.sock";
  auto unix_vnc = fx.run(fx.broker.set_vnc("fl-net", qbtest::vnc("unix:" + sock)));
  REQUIRE(unix_vnc);
  CHECK(unix_vnc->address == "unix:" + sock);
  CHECK(vnc_banner(fx, unix_vnc->address) == "RFB 003.008\n");
  CHECK(vnc_banner(fx, tcp->address).rfind("connect:", 0) == 0);  // the old listener is gone
  REQUIRE(fx.run(fx.broker.remove_vnc("fl-net")));
  CHECK_FALSE(exists(sock));

  std::size_t fds = qbtest::open_fd_count();
  fx.broker.flow_context().vnc = broker::flows::VncHandover::add_client;
  auto relay = fx.run(fx.broker.set_vnc("fl-net", qbtest::vnc("127.0.0.1:0")));
  REQUIRE(relay);
  CHECK(vnc_banner(fx, relay->address) == "RFB 003.008\n");
  CHECK(vnc_banner(fx, relay->address) == "RFB 003.008\n");  // every connection is handed over
  auto relay_unix = fx.run(fx.broker.set_vnc("fl-net", qbtest::vnc("unix:" + sock)));
  REQUIRE(relay_unix);
  CHECK(vnc_banner(fx, relay_unix->address) == "RFB 003.008\n");
  REQUIRE(fx.run(fx.broker.remove_vnc("fl-net")));
  fx.io.restart();
  fx.io.poll();
  CHECK(qbtest::open_fd_count() == fds);
  CHECK_FALSE(exists(sock));
  REQUIRE(fx.run(fx.broker.destroy("fl-net")));
}

TEST_CASE("failures injected through QEMU roll every flow back and leave nothing",
          "[flows][privileged][qemu][rollback]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  FlowsFixture fx(kRollbackBase);
  const auto& im = fx.images;
  qbtest::make_image(im / "x.img", 1 << 20, "QB-X");
  qbtest::make_image(im / "base.img", 1 << 20, "QB-BASE");
  REQUIRE(qbtest::sh("qemu-img create -q -f qcow2 -b " + im / "base.img" + " -F raw " +
                     im / "top.qcow2") == 0);
  // Running (QEMU 7.2 closes removed fdset fds only while the VM runs), no console needed.
  auto spec = FlowsFixture::guest("fl-rb");
  spec.cdroms.push_back({"cd0", ""});
  REQUIRE(fx.run(fx.broker.create(spec)));
  auto events = fx.broker.events().subscribe("fl-rb");

  // Each case plants an object in QEMU (through the passthrough, behind the broker's back) that
  // makes one step of a flow fail, runs the flow, and compares QEMU with how it was.
  auto expect_rollback = [&](const std::string& what, json::object plant,
                             const std::function<broker::Result<void>()>& flow,
                             const std::string& tap = {}) {
    INFO(what);
    if (!plant.empty()) {
      std::string cmd(plant.at("execute").as_string());
      fx.qmp("fl-rb", cmd, plant.at("arguments").as_object());
    }
    auto before = fx.snapshot("fl-rb");
    auto devices_before = fx.run(fx.broker.info("fl-rb", false))->devices;
    std::size_t fds = qbtest::open_fd_count();
    auto r = flow();
    REQUIRE_FALSE(r);
    INFO(r.error().describe());
    CHECK(r.error().code == qmp::errc::command_failed);
    auto after = fx.snapshot("fl-rb");
    INFO("before:\n" << qbtest::describe(before) << "after:\n" << qbtest::describe(after));
    CHECK(after == before);
    CHECK(fx.run(fx.broker.info("fl-rb", false))->devices == devices_before);
    CHECK(qbtest::open_fd_count() == fds);
    if (!tap.empty()) CHECK(host_eventually([&] { return !exists("/sys/class/net/" + tap); }));
  };
  auto node = [](const std::string& name) {
    return json::object{{"execute", "blockdev-add"},
                        {"arguments", json::object{{"driver", "null-co"}, {"node-name", name}}}};
  };
  auto scsi_cd = [](const std::string& id) {
    return json::object{{"execute", "device_add"},
                        {"arguments", json::object{{"driver", "scsi-cd"}, {"id", id}, {"bus", "qb-scsi0.0"}}}};
  };
  auto unplant_device = [&](const std::string& id) {
    fx.qmp("fl-rb", "device_del", {{"id", id}});
    CHECK(wait_event(fx, *events, "DEVICE_DELETED",
                     [id](const json::object& d) { return d.contains("device") && d.at("device").as_string() == id; }));
  };
  const auto clean = fx.snapshot("fl-rb");
  auto add = [&](DiskSpec s) { return [&fx, s] { return fx.run(fx.broker.add_disk("fl-rb", s)); }; };
  auto qcow = disk("x1", im / "top.qcow2", DiskFormat::qcow2, DiskBus::scsi, false, im / "base.img");

  expect_rollback("format node", node("qb-x1-fmt"), add(disk("x1", im / "x.img")));
  fx.qmp("fl-rb", "blockdev-del", {{"node-name", "qb-x1-fmt"}});
  expect_rollback("file node", node("qb-x1-file"), add(disk("x1", im / "x.img")));
  fx.qmp("fl-rb", "blockdev-del", {{"node-name", "qb-x1-file"}});
  expect_rollback("backing file node", node("qb-x1-backing-file"), add(qcow));
  fx.qmp("fl-rb", "blockdev-del", {{"node-name", "qb-x1-backing-file"}});
  expect_rollback("backing format node", node("qb-x1-backing"), add(qcow));
  fx.qmp("fl-rb", "blockdev-del", {{"node-name", "qb-x1-backing"}});
  expect_rollback("qcow2 format node", node("qb-x1-fmt"), add(qcow));
  fx.qmp("fl-rb", "blockdev-del", {{"node-name", "qb-x1-fmt"}});
  expect_rollback("scsi-hd", scsi_cd("x1"), add(disk("x1", im / "x.img")));
  expect_rollback("virtio-blk-pci", {},
                  add(disk("x1", im / "top.qcow2", DiskFormat::qcow2, DiskBus::virtio, true,
                           im / "base.img")));
  unplant_device("x1");

  const std::string tap = "qbrb" + std::to_string(::getpid() % 100000);
  auto nic = [&fx, tap] {
    return fx.run(fx.broker.add_nic("fl-rb", broker::NicSpec{"y1", tap, ""}));
  };
  expect_rollback("netdev_add",
                  json::object{{"execute", "netdev_add"},
                               {"arguments", json::object{{"type", "hubport"}, {"id", "qb-net-y1"}, {"hubid", 0}}}},
                  nic, tap);
  fx.qmp("fl-rb", "netdev_del", {{"id", "qb-net-y1"}});
  expect_rollback("virtio-net-pci", scsi_cd("y1"), nic, tap);
  unplant_device("y1");

  // The CD drive vanished behind the broker's back: blockdev-change-medium fails, the fdset goes.
  unplant_device("cd0");
  expect_rollback("blockdev-change-medium", {}, [&] {
    return fx.run(fx.broker.insert_medium("fl-rb", "cd0", {im / "x.img", false}));
  });

  auto end = fx.snapshot("fl-rb");
  end.devices.insert("cd0");
  CHECK(end.devices == clean.devices);
  CHECK(end.nodes == clean.nodes);
  CHECK(end.fdsets == clean.fdsets);
  REQUIRE(fx.run(fx.broker.destroy("fl-rb")));
}

TEST_CASE("QEMU never opens a path and every fd it holds is an object the broker opened",
          "[flows][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  FlowsFixture fx(kProofBase);
  const auto& im = fx.images;
  qbtest::make_image(im / "cd.iso", 32 * 2048, "QB-PROOF-CD");
  qbtest::make_image(im / "cd2.iso", 32 * 2048, "QB-PROOF-CD2");
  qbtest::make_image(im / "raw.img", 1 << 20, "QB-PROOF-RAW");
  qbtest::make_image(im / "v.img", 1 << 20, "QB-PROOF-V");
  qbtest::make_image(im / "loop.img", 1 << 20, "QB-PROOF-LOOP");
  qbtest::make_image(im / "base.img", 1 << 20, "QB-PROOF-BASE");
  REQUIRE(qbtest::sh("qemu-img create -q -f qcow2 -b " + im / "base.img" + " -F raw " +
                     im / "top.qcow2") == 0);
  auto spec = FlowsFixture::guest("fl-proof");
  spec.cdroms.push_back({"cd0", im / "cd.iso"});
  spec.disks.push_back(disk("boot", im / "raw.img"));
  REQUIRE(fx.run(fx.broker.create(spec)));
  auto& b = fx.broker;

  fdpass::UniqueFd backing(::open((im / "loop.img").c_str(), O_RDWR | O_CLOEXEC));
  auto loop = fdpass::attach_loop(backing, fdpass::Access::read_write);
  REQUIRE(loop);
  backing.reset();
  auto blk = disk("blk", loop->path);
  blk.diskseq = loop->diskseq;
  const std::string tap = "qbpf" + std::to_string(::getpid() % 100000);

  REQUIRE(fx.run(b.insert_medium("fl-proof", "cd0", {im / "cd2.iso", false})));
  REQUIRE(fx.run(b.add_disk("fl-proof", disk("q", im / "top.qcow2", DiskFormat::qcow2, DiskBus::scsi,
                                          false, im / "base.img"))));
  REQUIRE(fx.run(b.add_disk("fl-proof", disk("v", im / "v.img", DiskFormat::raw, DiskBus::virtio, true))));
  REQUIRE(fx.run(b.add_disk("fl-proof", blk)));
  REQUIRE(fx.run(b.add_disk("fl-proof", disk("gone", im / "v.img", DiskFormat::raw, DiskBus::scsi, true))));
  REQUIRE(fx.run(b.remove_disk("fl-proof", "gone")));
  REQUIRE(fx.run(b.add_nic("fl-proof", broker::NicSpec{"n1", tap, ""})));
  auto vnc = fx.run(b.set_vnc("fl-proof", qbtest::vnc("unix:" + im / "vnc.sock")));
  REQUIRE(vnc);
  CHECK(vnc_banner(fx, vnc->address) == "RFB 003.008\n");

  const pid_t pid = fx.pid_of("fl-proof");
  const std::string proc = "/proc/" + std::to_string(pid);
  auto id_of = [](const std::string& p) {
    struct stat st {};
    REQUIRE(::stat(p.c_str(), &st) == 0);
    return std::pair{st.st_dev, st.st_ino};
  };
  std::set<std::pair<dev_t, ino_t>> images, broker_files;
  for (const char* f : {"cd2.iso", "raw.img", "v.img", "top.qcow2", "base.img", "loop.img"}) {
    images.insert(id_of(im / f));
  }
  broker_files = images;
  broker_files.insert(id_of(fx.run_dir / "log/fl-proof.log"));
  broker_files.insert(id_of(qbtest::guest_kernel()));
  broker_files.insert(id_of(qbtest::guest_initrd()));
  std::set<dev_t> devices;  // character and block devices QEMU may hold
  for (const char* d : {"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/dev/net/tun"}) {
    struct stat st {};
    if (::stat(d, &st) == 0) devices.insert(st.st_rdev);
  }
  devices.insert(loop->rdev);

  // 1. Every file or device QEMU holds is one the broker opened (or a jail device node).
  std::set<std::pair<dev_t, ino_t>> held;
  bool loop_held = false;
  int tun_fds = 0;
  DIR* dir = ::opendir((proc + "/fd").c_str());
  REQUIRE(dir != nullptr);
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    std::string link = proc + "/fd/" + e->d_name;
    char target[512] = {};
    ssize_t n = ::readlink(link.c_str(), target, sizeof(target) - 1);
    struct stat st {};
    if (n < 0 || ::stat(link.c_str(), &st) != 0) continue;
    INFO("QEMU fd " << e->d_name << " -> " << target);
    if (qbtest::is_anonymous_memory(link)) continue;  // QEMU's own memfd: no path
    if (S_ISREG(st.st_mode)) {
      CHECK(broker_files.contains({st.st_dev, st.st_ino}));
      held.insert({st.st_dev, st.st_ino});
    } else if (S_ISBLK(st.st_mode) || S_ISCHR(st.st_mode)) {
      CHECK(devices.contains(st.st_rdev));
      loop_held = loop_held || st.st_rdev == loop->rdev;
      tun_fds += std::string(target) == "/dev/net/tun" ? 1 : 0;
    } else {
      CHECK_FALSE(S_ISDIR(st.st_mode));
    }
  }
  ::closedir(dir);
  CHECK(loop_held);
  CHECK(tun_fds == 1);
  for (const char* f : {"cd2.iso", "raw.img", "v.img", "top.qcow2", "base.img"}) {
    INFO(f << " is held by QEMU");
    CHECK(held.contains(id_of(im / f)));
  }
  CHECK_FALSE(held.contains(id_of(im / "cd.iso")));  // replaced: closed

  // 2. The jail holds no image: nothing in its own tree, no mount of the image directory.
  static std::set<std::pair<dev_t, ino_t>>* walk_images;
  static int found;
  walk_images = &images;
  found = 0;
  ::nftw((proc + "/root/").c_str(),
         [](const char*, const struct stat* st, int, struct FTW*) {
           if (walk_images->contains({st->st_dev, st->st_ino})) ++found;
           return 0;
         },
         16, FTW_PHYS | FTW_MOUNT);
  CHECK(found == 0);
  std::istringstream mounts(read_text(proc + "/mountinfo"));
  for (std::string line; std::getline(mounts, line);) {
    INFO(line);
    CHECK(line.find(im.path()) == std::string::npos);
    CHECK(line.find("/dev/loop") == std::string::npos);
  }

  // 3. No QMP argument carries a host path: the only paths are fdsets.
  std::regex fdset("^/dev/fdset/[0-9]+$");
  std::size_t checked = 0;
  for (const auto& line : fx.transcript) {
    auto v = json::parse(line);
    std::function<void(const json::value&)> walk = [&](const json::value& x) {
      if (x.is_string()) {
        std::string s(x.get_string());
        INFO(line);
        if (s.find('/') != std::string::npos) CHECK(std::regex_match(s, fdset));
        CHECK(s.find(im.path()) == std::string::npos);
        ++checked;
      } else if (x.is_object()) {
        for (const auto& kv : x.get_object()) walk(kv.value());
      } else if (x.is_array()) {
        for (const auto& y : x.get_array()) walk(y);
      }
    };
    if (auto* a = v.as_object().if_contains("arguments")) walk(*a);
  }
  CHECK(checked > 20);

  // 4. Nor does its command line: the only paths are the jail's /boot files and the fdsets of
  //    the devices planned at spawn (/dev/fdset/N names an fd QEMU was given, not a file).
  const std::vector<std::string> words = qbtest::cmdline_words(pid);
  REQUIRE(words.size() > 10);
  const std::regex fdset_name("/dev/fdset/[0-9]+");
  int planned = 0;
  for (std::size_t i = 1; i < words.size(); ++i) {
    INFO(words[i]);
    const std::string rest = std::regex_replace(words[i], fdset_name, "");
    if (rest != words[i]) ++planned;
    if (rest.find('/') == std::string::npos) continue;
    if (words[i - 1] == "-L") {
      // A data directory of the QEMU install (a QEMU outside /usr), like its built-in ones.
      CHECK(std::ranges::count(qbtest::qemu_data_dirs(), words[i]) == 1);
    } else {
      CHECK((words[i] == "/boot/kernel" || words[i] == "/boot/initrd"));
    }
  }
  CHECK(planned > 0);  // the disks of the create came on the command line

  REQUIRE(fx.run(fx.broker.destroy("fl-proof")));
  loop->fd.reset();
  CHECK(host_eventually([&] { return !exists("/sys/class/net/" + tap); }));
}

TEST_CASE("an unplug on a paused domain reports the image fd QEMU keeps and closes it when the VM runs",
          "[flows][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  FlowsFixture fx(kHeldBase);
  const std::string img = fx.images / "held.img";
  qbtest::make_image(img, 1 << 20, "QB-HELD");
  const std::string other = fx.images / "running.img";
  qbtest::make_image(other, 1 << 20, "QB-RUNNING");
  auto c = FlowsFixture::guest("held");
  c.spec.paused = true;  // never resumed before the unplug: QEMU stays in prelaunch
  auto info = fx.run(fx.broker.create(std::move(c)));
  REQUIRE(info);
  const pid_t qemu = info->pid;

  REQUIRE(fx.run(fx.broker.add_disk("held", qbtest::disk("d0", img))));
  REQUIRE(fds_on(qemu, img) > 0);
  REQUIRE(fx.run(fx.broker.remove_disk("held", "d0", {})));
  auto listed = fx.run(fx.broker.info("held"));
  REQUIRE(listed);
  CHECK(listed->devices.at("disks").as_array().empty());
  // Whatever QEMU keeps is reported, fdset by fdset, and nothing else is: on QEMU 7.2 the removed
  // fd stays open while the VM has not run.
  const auto held = fx.reported_held("held");
  CHECK(held == fdset_ids(fx, "held"));
  CHECK(fds_on(qemu, img) == static_cast<int>(held.size()));  // the fdset's own fd: no node is left
  const auto record = read_text(fx.state / "domains/held.json");
  CHECK((held.empty() || record.find("fdsets_to_close") != std::string::npos));

  // The VM runs: QEMU closes the image and the report empties.
  REQUIRE(fx.run(fx.broker.resume("held")));
  CHECK(host_eventually([&] { return fds_on(qemu, img) == 0; }, 5s));
  CHECK(fdset_ids(fx, "held").empty());
  CHECK(fx.reported_held("held").empty());
  CHECK(read_text(fx.state / "domains/held.json").find("fdsets_to_close") == std::string::npos);

  // On a running domain an unplug leaves nothing at once. SCSI needs no guest answer.
  REQUIRE(fx.run(fx.broker.add_disk("held", qbtest::disk("d1", other))));
  REQUIRE(fds_on(qemu, other) > 0);
  REQUIRE(fx.run(fx.broker.remove_disk("held", "d1", {})));
  CHECK(fds_on(qemu, other) == 0);
  CHECK(fdset_ids(fx, "held").empty());
  CHECK(fx.reported_held("held").empty());
  REQUIRE(fx.run(fx.broker.destroy("held")));
}

TEST_CASE("disks and a CD given at create come on QEMU's command line and leave its fd table when removed",
          "[flows][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  FlowsFixture fx(kPlannedBase);
  const auto& im = fx.images;
  const std::string pv = im / "pv.img";
  const std::string ps = im / "ps.img";
  const std::string iso = im / "pcd.iso";
  qbtest::make_image(pv, 1 << 20, "QB-PV-MARKER");
  qbtest::make_image(ps, 1 << 20, "QB-PS-MARKER");
  qbtest::make_image(iso, 64 * 2048, "QB-PCD-MARKER");
  auto c = FlowsFixture::guest("planned");
  c.disks.push_back(disk("pv", pv, DiskFormat::raw, DiskBus::virtio));
  c.disks.push_back(disk("ps", ps));
  c.cdroms.push_back({"cd0", iso});
  auto con = fx.boot(std::move(c));
  const pid_t qemu = fx.pid_of("planned");

  // Nothing of theirs went over QMP: QEMU built them from its command line.
  for (const auto& line : fx.transcript) {
    INFO(line);
    for (const char* cmd : {"\"add-fd\"", "\"blockdev-add\"", "\"device_add\"", "\"system_reset\""}) {
      CHECK(line.find(cmd) == std::string::npos);
    }
  }
  const std::string cmdline = read_text("/proc/" + std::to_string(qemu) + "/cmdline");
  for (const char* id : {"\"id\":\"pv\"", "\"id\":\"ps\"", "\"id\":\"cd0\""}) {
    INFO(id);
    CHECK(cmdline.find(id) != std::string::npos);
  }

  // The guest reads and writes them.
  const std::string vd = find_disk(*con, "QB-PV-MARKER");
  find_disk(*con, "QB-PS-MARKER");
  const std::string read_cd = "dd if=/dev/sr0 bs=2048 count=1 2>/dev/null | head -c 13";
  CHECK(guest(*con, read_cd).text == "QB-PCD-MARKER");
  CHECK(guest(*con, "printf QB-PV-WROTE | dd of=" + vd + " bs=512 seek=100 conv=notrunc,fsync 2>/dev/null").rc == 0);
  for (const auto& f : {pv, ps, iso}) {
    INFO(f);
    CHECK(fds_on(qemu, f) > 0);
  }

  // Removed and ejected like hotplugged ones, after which QEMU holds none of the files.
  REQUIRE(fx.run(fx.broker.remove_disk("planned", "pv", {})));
  REQUIRE(fx.run(fx.broker.remove_disk("planned", "ps", {})));
  REQUIRE(fx.run(fx.broker.eject_medium("planned", "cd0", false)));
  CHECK(qbtest::read_at(pv, 100 * 512, 11) == "QB-PV-WROTE");
  CHECK(host_eventually([&] { return fds_on(qemu, pv) + fds_on(qemu, ps) + fds_on(qemu, iso) == 0; }));
  CHECK(fx.snapshot("planned").devices.count("pv") == 0);

  // The ids are free for hotplug again, and the drive takes a new medium over QMP.
  REQUIRE(fx.run(fx.broker.add_disk("planned", disk("pv", pv, DiskFormat::raw, DiskBus::virtio))));
  find_disk(*con, "QB-PV-MARKER");
  REQUIRE(fx.run(fx.broker.insert_medium("planned", "cd0", {iso, false})));
  CHECK(guest_eventually(*con, read_cd, "QB-PCD-MARKER"));
  REQUIRE(fx.run(fx.broker.destroy("planned")));
}

TEST_CASE("a QEMU that exits at start-up is quoted in the error, and its log is kept", "[flows][privileged][qemu]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  FlowsFixture fx(kEarlyExitBase);
  const std::string kernel = fx.images / "garbage-kernel";
  { std::ofstream(kernel) << "garbage"; }
  auto c = FlowsFixture::guest("early-exit");
  c.spec.kernel = kernel;
  c.spec.initrd.clear();
  auto created = fx.run(fx.broker.create(std::move(c)));
  REQUIRE_FALSE(created);
  INFO(created.error().describe());
  CHECK(created.error().describe().find("QEMU said: qemu: invalid kernel header") != std::string::npos);
  // The domain is gone; the log of a QEMU that failed on its own stays for the operator.
  CHECK_FALSE(fx.run(fx.broker.info("early-exit", false)));
  CHECK(read_text(fx.run_dir / "log/early-exit.log").find("invalid kernel header") != std::string::npos);
}
