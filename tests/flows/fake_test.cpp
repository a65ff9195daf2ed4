// Every flow against the QEMU model behind the fake QMP peer: a failure injected at each step
// leaves QEMU and the domain as they were and the broker's fd count unchanged; bad input is
// refused before a single command is sent; an unplug the guest never acknowledges times out and
// removes nothing.
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <functional>
#include <future>
#include <thread>

#include <boost/asio/io_context.hpp>

#include "broker/core/errc.hpp"
#include "fdpass/errc.hpp"
#include "broker/domain/domain.hpp"
#include "broker/domain/event_bus.hpp"
#include "broker/flows/flows.hpp"
#include "fake_qemu.hpp"
#include "fdpass/devices.hpp"
#include "flows_fixture.hpp"
#include "qmp/client.hpp"

using namespace std::chrono_literals;
namespace asio = boost::asio;
namespace flows = broker::flows;
using broker::DiskBus;
using broker::DiskFormat;
using broker::DiskSpec;
using broker::Result;
using qbtest::disk;

namespace {

constexpr uid_t kUnknownDomainBase = 3'102'900;

// The images every scenario may use, in a directory that is the only image root.
struct Images {
  qbtest::TempDir dir;
  Images() {
    qbtest::make_image(dir / "a.img", 1 << 20, "QB-A");
    qbtest::make_image(dir / "b.img", 1 << 20, "QB-B");
    qbtest::make_image(dir / "base.img", 1 << 20, "QB-BASE");
    REQUIRE(qbtest::sh("qemu-img create -q -f qcow2 -b " + dir / "base.img" + " -F raw " +
                       dir / "top.qcow2") == 0);
    REQUIRE(qbtest::sh("qemu-img create -q -f qcow2 " + dir / "plain.qcow2" + " 1M") == 0);
  }
};

// One domain whose QMP client talks to a FakeQemu.
struct Harness {
  asio::io_context io;
  broker::EventBus bus{io.get_executor()};
  const Images& images;
  fdpass::ImageRoots roots;
  flows::Context ctx;
  qbtest::FakeQemu qemu;
  qbfake::FakeQmpPeer peer;
  std::unique_ptr<broker::Domain> d;

  Harness(const Images& im, qbtest::Behaviour b = {})
      : images(im),
        roots(*fdpass::ImageRoots::open({im.dir.path(), "/dev"})),
        ctx{io.get_executor(), roots, bus, {.qmp = 2000ms, .unplug = 1000ms}},
        qemu(std::move(b)),
        peer(qemu.script(), 30s) {
    broker::lifecycle::DomainSpec spec;
    spec.name = "fake";
    spec.pci_slots = 4;
    d = std::make_unique<broker::Domain>(spec);
    auto c = qbtest::run(io, qmp::Client::connect(io.get_executor(), peer.client_end(),
                                                  qmp::after(5s)));
    REQUIRE(c.has_value());
    d->set_qmp(std::move(*c));
    d->set_state(broker::RunState::running);
  }
  ~Harness() {
    d.reset();  // closes the client: the peer's script ends
    auto report = peer.join();
    CHECK(report.errors.empty());
    CHECK(qemu.errors().empty());
  }

  template <class T>
  T run(asio::awaitable<T> t) {
    return qbtest::run(io, std::move(t));
  }
  // This process's fds minus those the model holds for "QEMU": the broker's own.
  std::size_t broker_fds() const { return qbtest::open_fd_count() - qemu.held(); }
};

// The domain's side, for comparisons.
std::string domain_state(const broker::Domain& d) {
  std::string s;
  for (auto& [id, cd] : d.cdroms) s += "cd " + id + "=" + cd.path + ";";
  for (auto& [id, x] : d.disks) s += "disk " + id + "@" + x.slot + ";";
  for (auto& [id, n] : d.nics) s += "nic " + id + "@" + n.slot + ";";
  for (auto& [slot, owner] : d.slots()) s += slot + "=" + owner + ";";
  s += d.vnc ? "vnc " + d.vnc->address : "no vnc";
  s += d.vnc_acceptor ? "+acceptor" : "";
  s += d.scsi_controller ? " scsi@" + d.scsi_slot : "";
  return s;
}

using Step = std::function<Result<void>(Harness&)>;

Step add_drive(std::string id) {
  return [id](Harness& h) { return h.run(flows::add_cdrom_drive(h.ctx, *h.d, broker::CdromSpec{id, ""})); };
}
Step insert(std::string id, std::string path, bool force = false) {
  return [id, path, force](Harness& h) {
    return h.run(flows::insert_medium(h.ctx, *h.d, id, broker::InsertMedium{path, force}));
  };
}
Step eject(std::string id, bool force = false) {
  return [id, force](Harness& h) { return h.run(flows::eject_medium(h.ctx, *h.d, id, force)); };
}
Step add(DiskSpec s) {
  return [s](Harness& h) { return h.run(flows::add_disk(h.ctx, *h.d, s)); };
}
Step unplug(std::string id) {
  return [id](Harness& h) { return h.run(flows::remove_disk(h.ctx, *h.d, id, {})); };
}
Step add_nic(std::string id, std::string tap) {
  return [id, tap](Harness& h) {
    return h.run(flows::add_nic(h.ctx, *h.d, broker::NicSpec{id, tap, "52:54:00:00:00:01"}));
  };
}
Step remove_nic(std::string id) {
  return [id](Harness& h) { return h.run(flows::remove_nic(h.ctx, *h.d, id, {})); };
}
Step set_vnc(std::string listen, flows::VncHandover mode = flows::VncHandover::automatic) {
  return [listen, mode](Harness& h) -> Result<void> {
    h.ctx.vnc = mode;
    auto r = h.run(flows::set_vnc(h.ctx, *h.d, qbtest::vnc(listen)));
    if (!r) return r.error();
    return {};
  };
}
Step remove_vnc() {
  return [](Harness& h) { return h.run(flows::remove_vnc(h.ctx, *h.d)); };
}

void run_all(Harness& h, const std::vector<Step>& steps) {
  for (const auto& s : steps) {
    auto r = s(h);
    INFO(describe(h.qemu.model()));
    REQUIRE(r);
  }
}

// Runs `prefix` then `flow` once cleanly to count the flow's commands, then once per command with
// that command failing. A failed flow must leave the model, the domain and the broker's fds as
// they were; a flow that still succeeds (only a clean-up step after the commit failed) must
// reach the clean run's end state but for the fdset it could not remove.
void every_step(const Images& im, const std::string& name, const std::vector<Step>& prefix,
                const Step& flow) {
  std::size_t base, n;
  qbtest::Model clean_end;
  std::string clean_domain;
  {
    Harness h(im);
    run_all(h, prefix);
    base = h.qemu.commands();
    auto r = flow(h);
    REQUIRE(r);
    n = h.qemu.commands() - base;
    clean_end = h.qemu.model();
    clean_domain = domain_state(*h.d);
  }
  REQUIRE(n > 0);
  for (std::size_t k = 0; k < n; ++k) {
    Harness h(im, {.fail_at = base + k});
    run_all(h, prefix);
    const qbtest::Model before = h.qemu.model();
    const std::string domain_before = domain_state(*h.d);
    const std::size_t fds = h.broker_fds();
    auto r = flow(h);
    std::string failed = h.qemu.names().at(base + k);
    INFO(name << ": command " << k + 1 << " of " << n << " (" << failed << ") fails");
    INFO("model now:\n" << describe(h.qemu.model()) << "before:\n" << describe(before));
    if (!r) {
      CHECK(r.error().code == qmp::errc::command_failed);
      CHECK(h.qemu.model() == before);
      CHECK(domain_state(*h.d) == domain_before);
    } else {
      CHECK(failed == "remove-fd");
      auto m = h.qemu.model();
      CHECK(m.nodes == clean_end.nodes);
      CHECK(m.devices == clean_end.devices);
      CHECK(m.netdevs == clean_end.netdevs);
      CHECK(m.media == clean_end.media);
      CHECK(m.named_fds == clean_end.named_fds);
      CHECK(domain_state(*h.d) == clean_domain);
    }
    CHECK(h.broker_fds() == fds);
  }
}

// The same for removals: after a failure at any step, a second attempt finishes the removal and
// QEMU holds exactly what it held before the device was added.
void every_removal_step(const Images& im, const std::string& name, const std::vector<Step>& setup,
                        const Step& plug, const Step& unplug) {
  std::size_t base, n;
  qbtest::Model empty;
  {
    Harness h(im);
    run_all(h, setup);
    empty = h.qemu.model();
    REQUIRE(plug(h));
    base = h.qemu.commands();
    REQUIRE(unplug(h));
    n = h.qemu.commands() - base;
    REQUIRE(h.qemu.model() == empty);
  }
  for (std::size_t k = 0; k < n; ++k) {
    Harness h(im, {.fail_at = base + k});
    run_all(h, setup);
    const std::size_t fds = h.broker_fds();
    const std::string domain_empty = domain_state(*h.d);
    REQUIRE(plug(h));
    auto r = unplug(h);
    std::string failed = h.qemu.names().at(base + k);
    INFO(name << ": command " << k + 1 << " of " << n << " (" << failed << ") fails");
    if (!r) {
      CHECK(r.error().code == qmp::errc::command_failed);
      auto again = unplug(h);
      INFO((again.has_error() ? again.error().describe() : std::string("ok")));
      CHECK(again);
    }
    INFO("model now:\n" << describe(h.qemu.model()));
    auto m = h.qemu.model();
    if (failed == "remove-fd") {
      m.fdsets = empty.fdsets;  // logged and left: real QEMU refuses remove-fd only for no such set
    }
    CHECK(m == empty);
    CHECK(domain_state(*h.d) == domain_empty);
    CHECK(h.broker_fds() == fds);
  }
}

}  // namespace

TEST_CASE("CD flows roll back every completed step when a later one fails", "[flows][rollback]") {
  qbtest::FdLeakCheck leaks;
  Images im;
  every_step(im, "cdrom drive", {add_drive("cd0")}, add_drive("cd1"));
  every_step(im, "insert", {add_drive("cd0")}, insert("cd0", im.dir / "a.img"));
  every_step(im, "replace", {add_drive("cd0"), insert("cd0", im.dir / "a.img")},
             insert("cd0", im.dir / "b.img"));
  every_step(im, "eject", {add_drive("cd0"), insert("cd0", im.dir / "a.img")}, eject("cd0"));
}

TEST_CASE("disk flows roll back every completed step when a later one fails", "[flows][rollback]") {
  qbtest::FdLeakCheck leaks;
  Images im;
  const std::vector<Step> none;
  // The SCSI controller is plugged by the first SCSI device and stays: when plugging it fails,
  // nothing is left; later steps are rolled back above it.
  {
    Harness h(im, {.fail_at = 0});
    auto r = add(disk("d1", im.dir / "a.img"))(h);
    REQUIRE_FALSE(r);
    CHECK(h.qemu.model() == qbtest::Model{});
    CHECK_FALSE(h.d->scsi_controller);
    CHECK(h.d->slots().empty());
  }
  every_step(im, "raw on scsi", {add_drive("cd0")}, add(disk("d1", im.dir / "a.img")));
  every_step(im, "read-only raw on virtio", none,
             add(disk("d1", im.dir / "a.img", DiskFormat::raw, DiskBus::virtio, true)));
  every_step(im, "qcow2 over a backing file on virtio", none,
             add(disk("d1", im.dir / "top.qcow2", DiskFormat::qcow2, DiskBus::virtio, false,
                      im.dir / "base.img")));
  every_step(im, "qcow2 on scsi", {add_drive("cd0")},
             add(disk("d1", im.dir / "plain.qcow2", DiskFormat::qcow2)));
  every_removal_step(im, "unplug scsi", {add_drive("cd0")}, add(disk("d1", im.dir / "a.img")),
                     unplug("d1"));
  every_removal_step(im, "unplug qcow2+backing virtio", none,
                     add(disk("d1", im.dir / "top.qcow2", DiskFormat::qcow2, DiskBus::virtio,
                              false, im.dir / "base.img")),
                     unplug("d1"));
}

TEST_CASE("NIC flows roll back every completed step when a later one fails",
          "[flows][rollback][privileged]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  Images im;
  std::string tap = "qbfk" + std::to_string(::getpid() % 100000);
  every_step(im, "nic", {}, add_nic("n1", tap));
  every_removal_step(im, "unplug nic", {}, add_nic("n1", tap), remove_nic("n1"));
  // The tap went with the last fd QEMU held.
  struct stat st {};
  CHECK(::stat(("/sys/class/net/" + tap).c_str(), &st) != 0);
}

TEST_CASE("VNC flows roll back and fall back to add_client when display-update is missing",
          "[flows][rollback]") {
  qbtest::FdLeakCheck leaks;
  Images im;
  every_step(im, "vnc tcp", {}, set_vnc("127.0.0.1:0", flows::VncHandover::display_update));
  every_step(im, "vnc unix", {}, set_vnc("unix:" + im.dir / "vnc.sock", flows::VncHandover::display_update));
  every_step(im, "vnc replace", {set_vnc("127.0.0.1:0")}, set_vnc("unix:" + im.dir / "vnc.sock"));
  every_step(im, "vnc to add_client", {set_vnc("127.0.0.1:0")},
             set_vnc("127.0.0.1:0", flows::VncHandover::add_client));
  every_step(im, "vnc remove", {set_vnc("127.0.0.1:0")}, remove_vnc());

  // A QEMU without display-update (CommandNotFound): the broker keeps the listener and hands
  // each connection over with add_client.
  Harness h(im, {.fail_at = 1, .fail_class = "CommandNotFound"});
  const std::size_t fds = h.broker_fds();
  auto v = h.run(flows::set_vnc(h.ctx, *h.d, qbtest::vnc("127.0.0.1:0")));
  REQUIRE(v);
  CHECK(h.d->vnc_acceptor != nullptr);
  CHECK(h.qemu.model().named_fds.empty());  // the refused listener fd was closed again
  CHECK_FALSE(h.qemu.model().vnc_listener);
  auto port = static_cast<std::uint16_t>(std::stoi(v->address.substr(v->address.rfind(':') + 1)));
  auto client = std::async(std::launch::async, [port] {
    int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bool ok = ::connect(s, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
    ::close(s);
    return ok;
  });
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (h.qemu.clients_ == 0 && std::chrono::steady_clock::now() < deadline) {
    h.io.restart();
    h.io.run_for(5ms);
  }
  CHECK(client.get());
  CHECK(h.qemu.clients_ == 1);
  REQUIRE(h.run(flows::remove_vnc(h.ctx, *h.d)));
  CHECK(h.d->vnc_acceptor == nullptr);
  h.io.restart();
  h.io.poll();  // lets the accept loop see it was stopped
  CHECK(h.broker_fds() == fds);
}

TEST_CASE("a CD tray the guest locked is refused without force and force works",
          "[flows][cdrom]") {
  qbtest::FdLeakCheck leaks;
  Images im;
  Harness h(im);
  run_all(h, {add_drive("cd0"), insert("cd0", im.dir / "a.img")});
  h.qemu.set_behaviour({.tray_locked = true});
  auto before = h.qemu.model();
  auto fds = h.broker_fds();
  auto r = insert("cd0", im.dir / "b.img")(h);
  REQUIRE_FALSE(r);
  CHECK(r.error().code == broker::errc::tray_locked);
  CHECK(r.error().message.find("force") != std::string::npos);
  CHECK(r.error().qmp_desc.find("is locked") != std::string::npos);
  auto e = eject("cd0")(h);
  REQUIRE_FALSE(e);
  CHECK(e.error().code == broker::errc::tray_locked);
  CHECK(h.qemu.model() == before);
  CHECK(h.d->cdroms.at("cd0").path == im.dir / "a.img");
  CHECK(h.broker_fds() == fds);
  REQUIRE(insert("cd0", im.dir / "b.img", true)(h));
  CHECK(h.d->cdroms.at("cd0").path == im.dir / "b.img");
  CHECK(h.qemu.model().fdsets.size() == 1);  // the replaced medium's fdset is gone
  REQUIRE(eject("cd0", true)(h));
  CHECK(h.qemu.model().fdsets.empty());
  CHECK(h.qemu.model().media.empty());
}

TEST_CASE("an unplug the guest never acknowledges times out and removes nothing",
          "[flows][unplug]") {
  qbtest::FdLeakCheck leaks;
  Images im;
  Harness h(im, {.ignore_unplug = true});
  run_all(h, {add(disk("v1", im.dir / "a.img", DiskFormat::raw, DiskBus::virtio))});
  auto before = h.qemu.model();
  auto domain_before = domain_state(*h.d);
  std::vector<double> progress;
  auto start = std::chrono::steady_clock::now();
  auto r = h.run(flows::remove_disk(h.ctx, *h.d, "v1",
                                    [&](double f, std::string_view) { progress.push_back(f); }));
  auto took = std::chrono::steady_clock::now() - start;
  REQUIRE_FALSE(r);
  CHECK(r.error().code == broker::errc::guest_timeout);
  CHECK(r.error().message.find("stays attached") != std::string::npos);
  CHECK(took >= 1000ms);
  CHECK(took < 3000ms);
  CHECK(h.qemu.model() == before);
  CHECK(domain_state(*h.d) == domain_before);
  REQUIRE_FALSE(progress.empty());
  CHECK(progress.front() == 0.0);
  // Once the guest lets go, the removal completes.
  h.qemu.set_behaviour({});
  REQUIRE(h.run(flows::remove_disk(h.ctx, *h.d, "v1", {})));
  CHECK(h.qemu.model().devices.empty());
  CHECK(h.qemu.model().nodes.empty());
  CHECK(h.qemu.model().fdsets.empty());
  CHECK(h.d->slots().empty());
}

TEST_CASE("a removal that finds the device gone waits for QEMU to let go of its nodes",
          "[flows][unplug]") {
  qbtest::FdLeakCheck leaks;
  Images im;
  Harness h(im, {.late_release = 3});
  run_all(h, {add(disk("d1", im.dir / "a.img"))});
  // A device_del sent before (by a broker that then died): the device has left qom-list, but
  // QEMU still holds its drive for a moment.
  qmp::Command del = qmp::cmd::device_del("d1");
  auto sent = h.run(h.d->qmp()->execute(std::move(del), qmp::after(2s)));
  REQUIRE(sent.has_value());
  REQUIRE_FALSE(h.qemu.model().devices.contains("d1"));
  REQUIRE(h.run(flows::remove_disk(h.ctx, *h.d, "d1", {})));
  CHECK(h.qemu.model().nodes.empty());
  CHECK(h.qemu.model().fdsets.empty());
  CHECK_FALSE(h.d->disks.contains("d1"));
}

TEST_CASE("bad input is refused before QEMU is touched and nothing is opened",
          "[flows][bad-input]") {
  qbtest::FdLeakCheck leaks;
  Images im;
  const auto& dir = im.dir;
  REQUIRE(::symlink("/etc/passwd", (dir / "escape").c_str()) == 0);
  REQUIRE(::symlink((dir / "a.img").c_str(), (dir / "inner-link").c_str()) == 0);
  REQUIRE(::mkfifo((dir / "fifo").c_str(), 0600) == 0);
  REQUIRE(::mkdir((dir / "sub").c_str(), 0700) == 0);
  qbtest::write_file(dir / "not-a-socket", "precious");
  {
    auto sock = fdpass::listen_unix(dir / "a.sock", 0600, 0, 0);
    REQUIRE(sock);
  }

  Harness h(im);
  run_all(h, {add_drive("cd0"), add(disk("d0", dir / "b.img"))});
  const std::size_t sent = h.qemu.commands();
  const auto model = h.qemu.model();
  const auto domain = domain_state(*h.d);
  const std::size_t fds = h.broker_fds();

  struct Case {
    std::string what;
    Step step;
    std::error_code code;
    std::string field;
  };
  using E = broker::errc;
  using F = fdpass::errc;
  std::vector<Case> cases = {
      {"outside the roots", insert("cd0", "/etc/hostname"), F::outside_roots, "path"},
      {"symlink escape", insert("cd0", dir / "escape"), F::symlink, "path"},
      {"symlink inside the root", add(disk("x", dir / "inner-link")), F::symlink, "path"},
      {"dot-dot escape", insert("cd0", dir / "../../etc/passwd"), F::escapes_root, "path"},
      {"FIFO", add(disk("x", dir / "fifo")), F::is_fifo, "path"},
      {"directory", insert("cd0", dir / "sub"), F::is_directory, "path"},
      {"socket", add(disk("x", dir / "a.sock")), F::is_socket, "path"},
      {"character device", add(disk("x", "/dev/null")), F::is_char_device, "path"},
      {"missing file", add(disk("x", dir / "nope.img")), F::not_found, "path"},
      {"missing backing", add(disk("x", dir / "top.qcow2", DiskFormat::qcow2, DiskBus::scsi, false,
                                   dir / "nope.img")),
       F::not_found, "backing"},
      {"qcow2 given as raw", add(disk("x", dir / "plain.qcow2")), E::invalid_argument, "format"},
      {"qcow2 CD medium", insert("cd0", dir / "plain.qcow2"), E::invalid_argument, "path"},
      {"raw given as qcow2", add(disk("x", dir / "a.img", DiskFormat::qcow2)), E::invalid_argument,
       "format"},
      {"backing file not named", add(disk("x", dir / "top.qcow2", DiskFormat::qcow2)),
       E::invalid_argument, "backing"},
      {"backing for a qcow2 without one",
       add(disk("x", dir / "plain.qcow2", DiskFormat::qcow2, DiskBus::scsi, false, dir / "a.img")),
       E::invalid_argument, "backing"},
      {"duplicate id (a CD)", add(disk("cd0", dir / "a.img")), E::already_exists, "id"},
      {"duplicate id (a disk)", add_nic("d0", ""), E::already_exists, "id"},
      {"duplicate CD drive", add_drive("d0"), E::already_exists, "id"},
      {"reserved id", add(disk("qb-scsi0", dir / "a.img")), E::invalid_argument, "id"},
      {"root port id", add(disk("rp1", dir / "a.img")), E::invalid_argument, "id"},
      {"unknown drive (insert)", insert("cd9", dir / "a.img"), E::not_found, "id"},
      {"unknown drive (eject)", eject("cd9"), E::not_found, "id"},
      {"unknown disk", unplug("nope"), E::not_found, "id"},
      {"unknown NIC", remove_nic("nope"), E::not_found, "id"},
      {"no VNC to remove", remove_vnc(), E::not_found, ""},
      {"VNC over a file", set_vnc("unix:" + dir / "not-a-socket"), E::invalid_argument, "listen"},
      {"VNC host name", set_vnc("localhost:0"), E::invalid_argument, "listen"},
  };
  DiskSpec seq = disk("x", dir / "a.img");
  seq.diskseq = 42;
  cases.push_back({"diskseq for a regular file", add(seq), E::invalid_argument, "diskseq"});
  for (const auto& c : cases) {
    INFO(c.what);
    auto r = c.step(h);
    REQUIRE_FALSE(r);
    INFO(r.error().describe());
    CHECK(r.error().code == c.code);
    CHECK(r.error().field == c.field);
    CHECK(h.qemu.commands() == sent);
    CHECK(h.broker_fds() == fds);
  }
  CHECK(h.qemu.model() == model);
  CHECK(domain_state(*h.d) == domain);
  CHECK(qbtest::read_at(dir / "not-a-socket", 0, 8) == "precious");
}

TEST_CASE("an unknown domain is refused by every device operation", "[flows][bad-input]") {
  QB_REQUIRE_ROOT();
  qbtest::FdLeakCheck leaks;
  qbtest::FlowsFixture fx(kUnknownDomainBase);
  auto& b = fx.broker;
  std::vector<Result<void>> results;
  results.push_back(fx.run(b.insert_medium("ghost", "cd0", {fx.images / "a.img", false})));
  results.push_back(fx.run(b.eject_medium("ghost", "cd0", false)));
  results.push_back(fx.run(b.add_disk("ghost", disk("d1", fx.images / "a.img"))));
  results.push_back(fx.run(b.remove_disk("ghost", "d1")));
  results.push_back(fx.run(b.add_nic("ghost", broker::NicSpec{"n1", "", ""})));
  results.push_back(fx.run(b.remove_nic("ghost", "n1")));
  results.push_back(fx.run(b.remove_vnc("ghost")));
  auto v = fx.run(b.set_vnc("ghost", qbtest::vnc("127.0.0.1:0")));
  REQUIRE_FALSE(v);
  CHECK(v.error().code == broker::errc::not_found);
  for (const auto& r : results) {
    REQUIRE_FALSE(r);
    CHECK(r.error().code == broker::errc::not_found);
    CHECK(r.error().field == "name");
  }
  CHECK(fx.transcript.empty());
}
