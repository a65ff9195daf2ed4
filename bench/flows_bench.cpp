// Flows benchmark: each device flow three ways, interleaved, in the same run, against three
// identical jailed QEMUs running the booted test guest:
//
//   api   Broker::add_disk() etc.: the internal command surface (job slot, flow, domain record)
//   flow  broker::flows::add_disk() etc. on a Domain of our own: the flow alone
//   raw   the same QMP sequence written by hand on one blocking socket: open the file, sendmsg
//         each command (SCM_RIGHTS for add-fd/getfd), read its reply, wait for events
//
// Flows: CD insert and eject; disk attach and detach (scsi raw, scsi qcow2 over a backing file,
// virtio raw); NIC attach and detach; VNC set and remove. Prints medians and the ratios to raw.
//
// The api column includes the Broker's write of the domain's record (write + rename, no fsync):
// on /dev/shm by default, as qbrokerd keeps records on /run; --records-on-disk puts them on
// /var/tmp (ext4 here) to show what a record on disk costs.
//
// Usage: flows_bench [--iterations N] [--only SUBSTRING] [--records-on-disk]   (needs root and the test guest; build optimized)
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>

#include "raw_qmp.hpp"
#include "broker/core/log.hpp"
#include "broker/control/broker.hpp"
#include "broker/flows/flows.hpp"
#include "broker/lifecycle/cgroup.hpp"
#include "broker/lifecycle/launcher.hpp"
#include "broker/lifecycle/reaper.hpp"
#include "broker/lifecycle/uid_pool.hpp"
#include "fdpass/devices.hpp"
#include "fdpass/opener.hpp"
#include "qmp/client.hpp"
#include "support/asio_run.hpp"
#include "support/request_specs.hpp"
#include "support/qemu.hpp"

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
namespace asio = boost::asio;
namespace flows = broker::flows;

namespace {

constexpr uid_t kBase = 3'102'800;

// Failures throw, so main() still tears the three QEMUs down by uid.
[[noreturn]] void die(const std::string& what) { throw std::runtime_error(what); }

template <class R>
void must(const R& r, const std::string& what) {
  if (!r) die(what + ": " + r.error().describe());
}

double ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

struct TempDir {
  std::string path;
  explicit TempDir(const std::string& base = "/tmp") {
    std::string t = base + "/qbbench.XXXXXX";
    if (::mkdtemp(t.data()) == nullptr) die("mkdtemp");
    path = t;
  }
  ~TempDir() { (void)!std::system(("rm -rf " + path).c_str()); }
  std::string operator/(const std::string& n) const { return path + "/" + n; }
};

void write_image(const std::string& path, const std::string& marker) {
  std::string data(1 << 20, '\0');
  data.replace(0, marker.size(), marker);
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0 || ::write(fd, data.data(), data.size()) != static_cast<ssize_t>(data.size())) {
    die("write " + path);
  }
  ::close(fd);
}

// A hand-written QMP client: the floor. Commands are JSON text, replies are matched by order,
// events seen while waiting are kept for wait_event(). It sends the very lines the broker sends,
// ids and fdset opaques included (QEMU 7.2 under TCG answers add-fd with an opaque ~0.4 ms later
// than a bare add-fd).
class RawQmp {
 public:
  explicit RawQmp(fdpass::UniqueFd fd) : fd_(std::move(fd)) {}

  std::string cmd(const std::string& json, int pass = -1) {
    const std::string line =
        json.substr(0, json.size() - 1) + ",\"id\":" + std::to_string(++id_) + "}\n";
    qbbench::send_line(fd_.get(), line, pass);
    for (;;) {
      std::string l = line_();
      if (l.find("\"event\"") != std::string::npos) {
        events_.push_back(l);
        continue;
      }
      if (l.find("\"error\"") != std::string::npos) die("raw QMP: " + json + " -> " + l);
      return l;
    }
  }
  std::int64_t add_fd(int fd, const std::string& opaque) {
    std::string r = cmd(R"({"execute":"add-fd","arguments":{"opaque":")" + opaque + "\"}}", fd);
    auto at = r.find("\"fdset-id\": ");
    if (at == std::string::npos) die("add-fd reply: " + r);
    return std::stoll(r.substr(at + 12));
  }
  void wait_deleted(const std::string& id) {
    const std::string want = "\"device\": \"" + id + "\"";
    for (;;) {
      while (!events_.empty()) {
        std::string e = std::move(events_.front());
        events_.pop_front();
        if (e.find("DEVICE_DELETED") != std::string::npos && e.find(want) != std::string::npos) return;
      }
      events_.push_back(line_());
    }
  }
  void drop_events() { events_.clear(); }

 private:
  std::string line_() { return qbbench::read_line(fd_.get(), buf_); }
  fdpass::UniqueFd fd_;
  std::string buf_;
  std::deque<std::string> events_;
  std::uint64_t id_ = 0;
};

struct Env {
  TempDir state, run_dir, images;
  TempDir broker_state;  // where the Broker writes its domain records
  broker::lifecycle::ForkingUidKiller killer;
  broker::lifecycle::Reaper reaper{killer, kBase};
  broker::lifecycle::UidPool uids{{kBase, 8}, state.path, reaper};
  broker::lifecycle::CgroupManager cgroups;
  fdpass::ImageRoots roots;
  broker::lifecycle::Launcher launcher;
  asio::io_context io;
  broker::Broker broker;

  explicit Env(const std::string& state_base)
      : broker_state(state_base),
        roots(open_roots(images.path)),
        launcher(config(run_dir.path), uids, cgroups, roots),
        broker(io.get_executor(), broker_config(broker_state.path), launcher, roots) {
    qbtest::become_subreaper();
    uids.load();
  }
  static fdpass::ImageRoots open_roots(const std::string& images) {
    auto r = fdpass::ImageRoots::open({qbtest::guest_dir(), images});
    if (!r) die("image roots: " + r.error().message());
    return std::move(*r);
  }
  static broker::lifecycle::LauncherConfig config(const std::string& dir) {
    broker::lifecycle::LauncherConfig c;
    c.run_dir = dir;
    return c;
  }
  static broker::BrokerConfig broker_config(const std::string& dir) {
    broker::BrokerConfig c;
    c.records_dir = dir + "/domains";
    return c;
  }
  template <class T>
  T run(asio::awaitable<T> t) {
    return qbtest::run(io, std::move(t));
  }
};

broker::lifecycle::DomainSpec guest_spec(const std::string& name) {
  broker::lifecycle::DomainSpec s;
  s.name = name;
  s.kernel = qbtest::guest_kernel();
  s.initrd = qbtest::guest_initrd();
  s.append = qbtest::kGuestAppend;
  s.memory_mib = 128;
  return s;
}

// What main() started; destroyed by uid whatever happens.
struct Owned {
  Env& env;
  bool api = false;
  std::unique_ptr<broker::Domain> flow;
  std::optional<broker::lifecycle::Instance> raw;
  ~Owned() {
    if (api) (void)env.run(env.broker.destroy("qbb-api"));
    if (flow) {
      if (flow->qmp() != nullptr) flow->qmp()->close();
      flow->set_qmp(nullptr);
      (void)env.launcher.destroy(flow->instance());
    }
    if (raw) (void)env.launcher.destroy(*raw);
  }
};

struct Row {
  std::string name;
  std::vector<double> api, flow, raw;
};

}  // namespace

int main(int argc, char** argv) {
  int iterations = 20;
  std::string only;  // measure only the flows whose name contains this
  std::string state_base = "/dev/shm";  // qbrokerd keeps domain records on /run, a tmpfs
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--iterations" && i + 1 < argc) iterations = std::atoi(argv[++i]);
    if (std::string(argv[i]) == "--only" && i + 1 < argc) only = argv[++i];
    if (std::string(argv[i]) == "--records-on-disk") state_base = "/var/tmp";
  }
  if (::geteuid() != 0) {
    std::fprintf(stderr, "flows_bench: needs root\n");
    return 1;
  }
  broker::log::set_level(broker::log::Level::warn);
  Env env(state_base);
  Owned owned{env};
  std::printf("broker domain records in %s\n", env.broker_state.path.c_str());
  try {
  const auto& im = env.images;
  // Each QEMU gets its own writable images (QEMU locks them); the backing file is shared.
  write_image(im / "cd.iso", "QB-BENCH-CD");
  write_image(im / "base.img", "QB-BENCH-BASE");
  for (const char* who : {"api", "flow", "raw"}) {
    write_image(im / (std::string("raw-") + who + ".img"), "QB-BENCH-RAW");
    write_image(im / (std::string("virtio-") + who + ".img"), "QB-BENCH-VIRTIO");
    if (std::system(("qemu-img create -q -f qcow2 -b " + im / "base.img" + " -F raw " +
                     im / (std::string("top-") + who + ".qcow2"))
                        .c_str()) != 0) {
      die("qemu-img");
    }
  }

  // 1. The Broker's domain: created paused, console connected, resumed, booted.
  auto create = [&] {
    broker::CreateDomain c;
    c.spec = guest_spec("qbb-api");
    c.spec.paused = true;
    c.cdroms.push_back({"cd0", ""});
    return c;
  }();
  auto info = env.run(env.broker.create(create));
  must(info, "create api");
  owned.api = true;
  qbtest::GuestConsole api_console(qbtest::connect_retry(info->console, 10s));
  must(env.run(env.broker.resume("qbb-api")), "resume api");

  // 2. A Domain of our own for the flows alone.
  auto flow_inst = env.launcher.start(guest_spec("qbb-flow"));
  must(flow_inst, "start flow");
  owned.flow = std::make_unique<broker::Domain>(guest_spec("qbb-flow"));
  broker::Domain& fd_dom = *owned.flow;
  fd_dom.instance() = std::move(*flow_inst);
  qbtest::GuestConsole flow_console(qbtest::connect_retry(fd_dom.instance().console_path, 10s));
  {
    auto sock = fdpass::connect_unix(fd_dom.instance().qmp_path);
    if (!sock) die("connect flow QMP");
    auto c = env.run(qmp::Client::connect(env.io.get_executor(), std::move(*sock), qmp::after(30s)));
    if (!c) die("flow QMP: " + c.error().message);
    fd_dom.set_qmp(std::move(*c));
  }
  fd_dom.set_state(broker::RunState::running);
  flows::Context& ctx = env.broker.flow_context();
  must(env.run(flows::add_cdrom_drive(ctx, fd_dom, broker::CdromSpec{"cd0", ""})), "flow cd0");
  if (!env.run(fd_dom.qmp()->execute(qmp::cmd::cont(), qmp::after(5s)))) die("cont flow");

  // 3. A QEMU driven by hand.
  auto raw_inst = env.launcher.start(guest_spec("qbb-raw"));
  must(raw_inst, "start raw");
  owned.raw = std::move(*raw_inst);
  qbtest::GuestConsole raw_console(qbtest::connect_retry(owned.raw->console_path, 10s));
  auto raw_sock = qbtest::connect_retry(owned.raw->qmp_path, 10s);
  if (!raw_sock || !qbtest::qmp_handshake(raw_sock.get(), 30s)) die("raw QMP handshake");
  RawQmp raw(std::move(raw_sock));
  raw.cmd(R"({"execute":"device_add","arguments":{"driver":"virtio-scsi-pci","id":"qb-scsi0","bus":"rp1","romfile":""}})");
  raw.cmd(R"({"execute":"device_add","arguments":{"driver":"scsi-cd","id":"cd0","bus":"qb-scsi0.0"}})");
  raw.cmd(R"({"execute":"cont"})");

  for (auto* con : {&api_console, &flow_console, &raw_console}) {
    if (!con->wait_ready(120s)) die("a guest did not boot");
  }
  std::printf("3 guests up; %d iterations per flow\n", iterations);

  auto timed = [](const std::function<void()>& f) {
    auto t0 = Clock::now();
    f();
    return ms(Clock::now() - t0);
  };
  std::deque<Row> rows;  // references to rows stay valid as rows are added
  auto row = [&](const std::string& name) -> Row& {
    for (auto& r : rows) {
      if (r.name == name) return r;
    }
    rows.push_back(Row{name, {}, {}, {}});
    return rows.back();
  };

  // Runs one attach/detach pair three ways, `iterations` times, interleaved.
  struct Pair {
    std::string attach, detach;
    std::function<void()> api_attach, api_detach, flow_attach, flow_detach, raw_attach, raw_detach;
  };
  auto measure = [&](const Pair& p) {
    if (p.attach.find(only) == std::string::npos && p.detach.find(only) == std::string::npos) return;
    // The three run in every order in turn, so none always runs right after another's work
    // (the api's record write can slow whatever runs next).
    static constexpr int kOrders[6][3] = {{0, 1, 2}, {0, 2, 1}, {1, 0, 2}, {1, 2, 0}, {2, 0, 1}, {2, 1, 0}};
    const std::function<void()>* attach[3] = {&p.api_attach, &p.flow_attach, &p.raw_attach};
    const std::function<void()>* detach[3] = {&p.api_detach, &p.flow_detach, &p.raw_detach};
    for (int i = 0; i < iterations; ++i) {
      Row& a = row(p.attach);
      Row& d = row(p.detach);
      std::vector<double>* out_a[3] = {&a.api, &a.flow, &a.raw};
      std::vector<double>* out_d[3] = {&d.api, &d.flow, &d.raw};
      for (int k = 0; k < 3; ++k) {
        int w = kOrders[i % 6][k];
        out_a[w]->push_back(timed(*attach[w]));
      }
      for (int k = 0; k < 3; ++k) {
        int w = kOrders[i % 6][k];
        out_d[w]->push_back(timed(*detach[w]));
      }
    }
  };

  // --- CD ---------------------------------------------------------------------------------
  std::int64_t raw_cd = -1;
  measure(Pair{
      "cd insert", "cd eject",
      [&] { must(env.run(env.broker.insert_medium("qbb-api", "cd0", {im / "cd.iso", false})), "insert"); },
      [&] { must(env.run(env.broker.eject_medium("qbb-api", "cd0", false)), "eject"); },
      [&] { must(env.run(flows::insert_medium(ctx, fd_dom, "cd0", {im / "cd.iso", false})), "insert"); },
      [&] { must(env.run(flows::eject_medium(ctx, fd_dom, "cd0", false)), "eject"); },
      [&] {
        int fd = ::open((im / "cd.iso").c_str(), O_RDONLY | O_CLOEXEC);
        raw_cd = raw.add_fd(fd, "qb:cd0");
        ::close(fd);
        raw.cmd(R"({"execute":"blockdev-change-medium","arguments":{"id":"cd0","filename":"/dev/fdset/)" +
                std::to_string(raw_cd) + R"(","format":"raw","read-only-mode":"read-only"}})");
        raw.drop_events();
      },
      [&] {
        raw.cmd(R"({"execute":"eject","arguments":{"id":"cd0"}})");
        raw.cmd(R"({"execute":"remove-fd","arguments":{"fdset-id":)" + std::to_string(raw_cd) + "}}");
        raw.drop_events();
      }});

  // --- Disks ------------------------------------------------------------------------------
  auto raw_plug = [&raw](const std::string& id, const std::vector<std::string>& files, bool qcow2,
                         const std::string& device) {
    std::vector<std::int64_t> sets;
    for (std::size_t i = 0; i < files.size(); ++i) {
      // Backing first (read-only), the image last (read-write), as the broker does.
      bool ro = i + 1 < files.size();
      int fd = ::open(files[i].c_str(), (ro ? O_RDONLY : O_RDWR) | O_CLOEXEC);
      sets.push_back(raw.add_fd(fd, ro ? "qb:" + id + "-backing" : "qb:" + id));
      ::close(fd);
    }
    auto node = [&](const std::string& json) { raw.cmd(R"({"execute":"blockdev-add","arguments":)" + json + "}"); };
    if (files.size() == 2) {
      node(R"({"driver":"file","node-name":"qb-)" + id + R"(-backing-file","filename":"/dev/fdset/)" +
           std::to_string(sets[0]) + R"(","read-only":true})");
      node(R"({"driver":"raw","node-name":"qb-)" + id + R"(-backing","file":"qb-)" + id +
           R"(-backing-file","read-only":true})");
    }
    node(R"({"driver":"file","node-name":"qb-)" + id + R"(-file","filename":"/dev/fdset/)" +
         std::to_string(sets.back()) + R"(","read-only":false})");
    if (qcow2) {
      std::string backing = files.size() == 2 ? "\"qb-" + id + "-backing\"" : "null";
      node(R"({"driver":"qcow2","node-name":"qb-)" + id + R"(-fmt","file":"qb-)" + id +
           R"(-file","backing":)" + backing + R"(,"read-only":false})");
    } else {
      node(R"({"driver":"raw","node-name":"qb-)" + id + R"(-fmt","file":"qb-)" + id +
           R"(-file","read-only":false})");
    }
    raw.cmd(R"({"execute":"device_add","arguments":)" + device + "}");
    return sets;
  };
  auto raw_unplug = [&raw](const std::string& id, const std::vector<std::int64_t>& sets, bool backing) {
    raw.drop_events();
    raw.cmd(R"({"execute":"device_del","arguments":{"id":")" + id + R"("}})");
    raw.wait_deleted(id);
    std::vector<std::string> nodes = {"-fmt", "-file"};
    if (backing) nodes.insert(nodes.end(), {"-backing", "-backing-file"});
    for (const auto& n : nodes) {
      raw.cmd(R"({"execute":"blockdev-del","arguments":{"node-name":"qb-)" + id + n + R"("}})");
    }
    for (auto s : sets) raw.cmd(R"({"execute":"remove-fd","arguments":{"fdset-id":)" + std::to_string(s) + "}}");
  };
  struct DiskCase {
    std::string name;
    std::string image;  // "raw-" -> raw-api.img, raw-flow.img, raw-raw.img
    std::string suffix;
    broker::DiskFormat format;
    broker::DiskBus bus;
    bool backing;
    std::string device;
  };
  const std::vector<DiskCase> disks = {
      {"scsi raw", "raw-", ".img", broker::DiskFormat::raw, broker::DiskBus::scsi, false,
       R"({"driver":"scsi-hd","id":"d1","bus":"qb-scsi0.0","drive":"qb-d1-fmt"})"},
      {"scsi qcow2+backing", "top-", ".qcow2", broker::DiskFormat::qcow2, broker::DiskBus::scsi, true,
       R"({"driver":"scsi-hd","id":"d1","bus":"qb-scsi0.0","drive":"qb-d1-fmt"})"},
      {"virtio raw", "virtio-", ".img", broker::DiskFormat::raw, broker::DiskBus::virtio, false,
       R"({"driver":"virtio-blk-pci","id":"d1","bus":"rp2","drive":"qb-d1-fmt","romfile":""})"},
  };
  for (const auto& dc : disks) {
    auto spec_for = [&](const char* who) {
      return qbtest::disk("d1", im / (dc.image + who + dc.suffix), dc.format, dc.bus, false,
                          dc.backing ? im / "base.img" : std::string());
    };
    const broker::DiskSpec api_spec = spec_for("api"), flow_spec = spec_for("flow");
    std::vector<std::string> files;
    if (dc.backing) files.push_back(im / "base.img");
    files.push_back(im / (dc.image + "raw" + dc.suffix));
    std::vector<std::int64_t> sets;
    bool qcow2 = dc.format == broker::DiskFormat::qcow2;
    measure(Pair{
        "attach " + dc.name, "detach " + dc.name,
        [&] { must(env.run(env.broker.add_disk("qbb-api", api_spec)), "add_disk"); },
        [&] { must(env.run(env.broker.remove_disk("qbb-api", "d1")), "remove_disk"); },
        [&] { must(env.run(flows::add_disk(ctx, fd_dom, flow_spec)), "add_disk"); },
        [&] { must(env.run(flows::remove_disk(ctx, fd_dom, "d1", {})), "remove_disk"); },
        [&] { sets = raw_plug("d1", files, qcow2, dc.device); },
        [&] { raw_unplug("d1", sets, dc.backing); }});
  }

  // --- NIC --------------------------------------------------------------------------------
  measure(Pair{
      "nic attach", "nic detach",
      [&] { must(env.run(env.broker.add_nic("qbb-api", broker::NicSpec{"n1", "qbbench0", ""})), "add_nic"); },
      [&] { must(env.run(env.broker.remove_nic("qbb-api", "n1")), "remove_nic"); },
      [&] { must(env.run(flows::add_nic(ctx, fd_dom, broker::NicSpec{"n1", "qbbench1", ""})), "add_nic"); },
      [&] { must(env.run(flows::remove_nic(ctx, fd_dom, "n1", {})), "remove_nic"); },
      [&] {
        auto tap = fdpass::open_tap("qbbench2");
        if (!tap) die("tap: " + tap.error().message());
        raw.cmd(R"({"execute":"getfd","arguments":{"fdname":"qb-tap-n1"}})", tap->fd.get());
        tap->fd.reset();
        raw.cmd(R"({"execute":"netdev_add","arguments":{"type":"tap","id":"qb-net-n1","fd":"qb-tap-n1"}})");
        raw.cmd(R"({"execute":"device_add","arguments":{"driver":"virtio-net-pci","id":"n1","netdev":"qb-net-n1","bus":"rp3","romfile":""}})");
      },
      [&] {
        raw.drop_events();
        raw.cmd(R"({"execute":"device_del","arguments":{"id":"n1"}})");
        raw.wait_deleted("n1");
        raw.cmd(R"({"execute":"netdev_del","arguments":{"id":"qb-net-n1"}})");
      }});

  // --- VNC --------------------------------------------------------------------------------
  measure(Pair{
      "vnc set", "vnc remove",
      [&] { must(env.run(env.broker.set_vnc("qbb-api", qbtest::vnc("127.0.0.1:0"))), "set_vnc"); },
      [&] { must(env.run(env.broker.remove_vnc("qbb-api")), "remove_vnc"); },
      [&] { must(env.run(flows::set_vnc(ctx, fd_dom, qbtest::vnc("127.0.0.1:0"))), "set_vnc"); },
      [&] { must(env.run(flows::remove_vnc(ctx, fd_dom)), "remove_vnc"); },
      [&] {
        auto l = fdpass::listen_tcp("127.0.0.1", 0);
        if (!l) die("listen");
        raw.cmd(R"({"execute":"getfd","arguments":{"fdname":"qb-vnc"}})", l->get());
        raw.cmd(R"({"execute":"display-update","arguments":{"type":"vnc","addresses":[{"type":"fd","str":"qb-vnc"}]}})");
      },
      [&] { raw.cmd(R"({"execute":"display-update","arguments":{"type":"vnc","addresses":[]}})"); }});

  std::printf("\n%-26s %10s %10s %10s %9s %9s\n", "flow (median ms)", "api", "flow", "raw",
              "api/raw", "flow/raw");
  bool within = true;
  for (const auto& r : rows) {
    double a = median(r.api), f = median(r.flow), w = median(r.raw);
    std::printf("%-26s %10.3f %10.3f %10.3f %8.2fx %8.2fx\n", r.name.c_str(), a, f, w, a / w, f / w);
    within = within && a / w <= 1.3;
  }
  std::printf("\ntarget api/raw <= 1.3x: %s\n", within ? "met" : "NOT met");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "flows_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
