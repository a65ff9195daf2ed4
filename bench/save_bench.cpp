// Save and restore benchmark: an idle 128 MiB test guest saved and restored through the Broker,
// against the same QMP sequence written by hand with the same kind of fd (a pipe), in the same
// run, each round alternating which goes first.
//
//   save     broker: Broker::save with keep_running, from the call to its return: temp file and
//            header beneath the save root, pipe, getfd, migrate fd:, copy with CRC-32, trailer,
//            fsync, rename, cont.
//            raw: pipe, getfd, migrate fd:, a thread copying the pipe into a file until EOF, fsync,
//            cont, on a second guest started by the same Launcher (same jail, same command line).
//   restore  broker: Broker::restore of the broker's file, from the call to a running domain:
//            header and trailer checks, spawn with -incoming defer, QMP, pipe, getfd,
//            migrate-incoming fd:, copy with CRC-32, wait for completion, cont, domain record.
//            raw: Launcher::start with -incoming defer, QMP handshake, pipe, getfd,
//            migrate-incoming fd:, a thread copying the raw file into the pipe, query-migrate
//            until completed, cont.
//
//   update   broker: Broker::migrate(name, "local"), a live update of the running guest to a fresh
//            QEMU: spawn with -incoming defer, QMP, socketpair, getfd into both, migrate, cont,
//            the old QEMU killed by uid. raw: the same steps by hand on the raw guest.
//   pooled   broker: Broker::restore by a broker that keeps a QEMU of the saved guest's shape
//            spawned ahead (--pool ...,for=restore), so that the restore takes it: handover,
//            QMP, the devices plugged, pipe, getfd, migrate-incoming fd:, copy, completion,
//            cont, record. Twice: for the direct kernel guest of the other sections, from a
//            shape with its kernel, initrd and append line; then for a guest booted through
//            SeaBIOS from a read-only virtio disk. raw: the cold floor for the same file,
//            Launcher::start with -incoming defer, QMP handshake, the broker's own device
//            commands replayed with fds of the same disk, then as restore. The saves of each
//            guest (keep_running) are timed beforehand, for the comparison with
//            bench/libvirt_compare.sh (--bios).
//   migrate  broker: POST /v1/domains/NAME/migrate between two qbrokerd on this host, there and
//            back in turn, one per round beside the raw update, from the request to its answer: the destination prepares the domain
//            (HTTP, disk checks, spawn with -incoming defer, QMP, listener), the source connects,
//            sends the token, getfd, migrate; the destination takes the state and runs cont; the
//            source sees it running there and kills its QEMU by uid. raw: the update's steps by
//            hand, which are what a migration between two QEMUs on one host needs at the least.
//
// Usage: save_bench [--rounds N] [--dir DIR] [--memory-mib M] [--verbose] [--no-pooled]   (root
// and the test guest; build optimized. DIR holds the save files, /var/tmp by default; M is the
// guests' memory, 128 MiB by default; --no-pooled leaves the pooled restores out.)
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "broker/control/broker.hpp"
#include "broker/core/log.hpp"
#include "broker/flows/save_file.hpp"
#include "broker/lifecycle/cgroup.hpp"
#include "broker/lifecycle/launcher.hpp"
#include "broker/lifecycle/proc.hpp"
#include "broker/lifecycle/reaper.hpp"
#include "broker/lifecycle/uid_pool.hpp"
#include "fdpass/devices.hpp"
#include "fdpass/opener.hpp"
#include "http_client.hpp"
#include "qmp/commands.hpp"
#include "raw_qmp.hpp"
#include "support/asio_run.hpp"
#include "pool_wait.hpp"
#include "support/qemu.hpp"

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
namespace asio = boost::asio;

using qbbench::RawQmp;
using qbbench::wait_migration;

namespace {

constexpr uid_t kBase = 3'108'100;

[[noreturn]] void die(const std::string& what) {
  throw std::runtime_error(what);
}

template <class R>
void must(const R& r, const std::string& what) {
  if (!r) die(what + ": " + r.error().describe());
}

double ms(Clock::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

struct TempDir {
  std::string path;
  explicit TempDir(const std::string& base = "/tmp") {
    std::string t = base + "/qbsave.XXXXXX";
    if (::mkdtemp(t.data()) == nullptr) die("mkdtemp in " + base);
    path = t;
  }
  ~TempDir() { (void)!std::system(("rm -rf " + path).c_str()); }
  std::string operator/(const std::string& n) const { return path + "/" + n; }
};

// Copies `in` to `out` until EOF with read and write, 1 MiB at a time.
void copy_all(int in, int out) {
  std::vector<char> buf(1 << 20);
  for (;;) {
    ssize_t n = ::read(in, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    for (ssize_t off = 0; off < n;) {
      ssize_t w = ::write(out, buf.data() + off, static_cast<std::size_t>(n - off));
      if (w <= 0) return;
      off += w;
    }
  }
}

int g_memory_mib = 128;

broker::lifecycle::DomainSpec guest_spec(const std::string& name) {
  broker::lifecycle::DomainSpec s;
  s.name = name;
  s.kernel = qbtest::guest_kernel();
  s.initrd = qbtest::guest_initrd();
  s.append = qbtest::kGuestAppend;
  s.memory_mib = static_cast<std::uint32_t>(g_memory_mib);
  return s;
}

// The broker's QMP lines with their time, for --verbose.
struct Transcript {
  bool on = false;
  Clock::time_point start = Clock::now();
  std::vector<std::string> lines;
  bool capture = false;  // every command sent, whole, into `sent`
  std::vector<std::string> sent;
  void add(qmp::Direction d, std::string_view line) {
    if (capture && d == qmp::Direction::to_qemu) sent.emplace_back(line);
    if (!on) return;
    char at[32];
    std::snprintf(at, sizeof at, "%8.1f ms %s ", ms(Clock::now() - start),
                  d == qmp::Direction::to_qemu ? "->" : "<-");
    lines.push_back(at + std::string(line.substr(0, 160)));
  }
};

struct Env {
  uid_t base;
  Transcript transcript;
  TempDir run_dir, state, records{"/dev/shm"};
  TempDir saves;
  broker::lifecycle::ForkingUidKiller killer;
  broker::lifecycle::Reaper reaper{killer, base};
  broker::lifecycle::UidPool uids{{base, 8}, state.path, reaper};
  broker::lifecycle::CgroupManager cgroups{{}, "qbroker-" + std::to_string(base)};
  fdpass::ImageRoots roots;
  broker::lifecycle::Launcher launcher;
  asio::io_context io;
  broker::Broker broker;

  // `pool`: the broker's warm-pool shapes.
  explicit Env(const std::string& save_base, uid_t uid_base = kBase,
               std::vector<broker::PoolShape> pool = {})
      : base(uid_base),
        saves(save_base),
        roots(open_roots()),
        launcher(launcher_config(run_dir.path), uids, cgroups, roots),
        broker(io.get_executor(),
               broker_config(records.path, saves.path, &transcript, std::move(pool)), launcher,
               roots) {
    qbtest::become_subreaper();
    uids.load();
  }
  ~Env() { cgroups.remove_base_if_empty(); }
  static fdpass::ImageRoots open_roots() {
    auto r = fdpass::ImageRoots::open({qbtest::guest_dir()});
    if (!r) die("image roots: " + r.error().message());
    return std::move(*r);
  }
  static broker::lifecycle::LauncherConfig launcher_config(const std::string& dir) {
    broker::lifecycle::LauncherConfig c;
    c.run_dir = dir;
    return c;
  }
  static broker::BrokerConfig broker_config(const std::string& records, const std::string& saves,
                                            Transcript* t, std::vector<broker::PoolShape> pool) {
    broker::BrokerConfig c;
    c.pool = std::move(pool);
    c.transcript = [t](qmp::Direction d, std::string_view line, bool) { t->add(d, line); };
    c.records_dir = records + "/domains";
    c.save_root = saves;
    return c;
  }
  template <class T>
  T run(asio::awaitable<T> t) {
    return qbtest::run(io, std::move(t));
  }
};

// A raw QEMU of the same jail and command line, and its QMP socket.
struct RawGuest {
  broker::lifecycle::Instance inst;
  std::optional<RawQmp> qmp;
};

RawGuest start_raw(Env& env, const broker::lifecycle::DomainSpec& spec,
                   std::vector<std::string> extra) {
  auto inst = env.launcher.start(spec, nullptr, extra);
  must(inst, "start " + spec.name);
  RawGuest g{std::move(*inst), std::nullopt};
  auto sock = qbtest::connect_retry(g.inst.qmp_path, 10s);
  if (!sock || !qbtest::qmp_handshake(sock.get(), 30s)) die("raw QMP handshake");
  g.qmp.emplace(std::move(sock));
  return g;
}

// The hand-written save: the guest runs on afterwards.
void raw_save(RawGuest& g, const std::string& file) {
  fdpass::UniqueFd out(::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  auto pipe = fdpass::make_pipe();
  if (!out || !pipe) die("raw save: open");
  ::fcntl(pipe->first.get(), F_SETPIPE_SZ, 1 << 20);
  g.qmp->cmd(R"({"execute":"migrate-set-parameters","arguments":{"max-bandwidth":)" +
             std::to_string(qmp::cmd::kUnlimitedBandwidth) + "}}");
  g.qmp->cmd(R"({"execute":"getfd","arguments":{"fdname":"qb-migrate"}})", pipe->second.get());
  pipe->second.reset();
  std::thread copier([&] { copy_all(pipe->first.get(), out.get()); });
  g.qmp->cmd(R"({"execute":"migrate","arguments":{"uri":"fd:qb-migrate"}})");
  copier.join();  // EOF: QEMU closed its end after the last byte
  if (::fsync(out.get()) != 0) die("raw save: fsync");
  wait_migration(*g.qmp);
  g.qmp->cmd(R"({"execute":"cont"})");
}

// The hand-written restore, from spawn to a running guest.
RawGuest raw_restore(Env& env, const std::string& name, const std::string& file) {
  RawGuest g = start_raw(env, guest_spec(name), {"-incoming", "defer"});
  fdpass::UniqueFd in(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
  auto pipe = fdpass::make_pipe();
  if (!in || !pipe) die("raw restore: open");
  ::fcntl(pipe->second.get(), F_SETPIPE_SZ, 1 << 20);
  g.qmp->cmd(R"({"execute":"getfd","arguments":{"fdname":"qb-migrate"}})", pipe->first.get());
  pipe->first.reset();
  g.qmp->cmd(R"({"execute":"migrate-incoming","arguments":{"uri":"fd:qb-migrate"}})");
  std::thread feeder([&] {
    copy_all(in.get(), pipe->second.get());
    pipe->second.reset();
  });
  feeder.join();
  wait_migration(*g.qmp);
  g.qmp->cmd(R"({"execute":"cont"})");
  return g;
}

// The hand-written live update: a second QEMU with -incoming defer, a socketpair, one end to each,
// migrate, cont on the new one, the old one killed by its uid. Returns the new guest.
RawGuest raw_update(Env& env, RawGuest& old, const std::string& name) {
  RawGuest next = start_raw(env, guest_spec(name), {"-incoming", "defer"});
  auto pair = fdpass::make_socketpair(SOCK_STREAM);
  if (!pair) die("raw update: socketpair");
  next.qmp->cmd(R"({"execute":"getfd","arguments":{"fdname":"qb-migrate"}})", pair->second.get());
  pair->second.reset();
  next.qmp->cmd(R"({"execute":"migrate-incoming","arguments":{"uri":"fd:qb-migrate"}})");
  old.qmp->cmd(R"({"execute":"migrate-set-parameters","arguments":{"max-bandwidth":)" +
               std::to_string(qmp::cmd::kUnlimitedBandwidth) + "}}");
  old.qmp->cmd(R"({"execute":"getfd","arguments":{"fdname":"qb-migrate"}})", pair->first.get());
  pair->first.reset();
  old.qmp->cmd(R"({"execute":"migrate","arguments":{"uri":"fd:qb-migrate"}})");
  wait_migration(*old.qmp);
  wait_migration(*next.qmp);
  next.qmp->cmd(R"({"execute":"cont"})");
  old.qmp.reset();
  must(env.launcher.destroy(old.inst), "destroy the old raw QEMU");
  return next;
}

std::uint64_t size_of(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? static_cast<std::uint64_t>(st.st_size) : 0;
}

// The test guest booted through SeaBIOS from its boot disk, read-only on virtio: a shape the
// warm pool serves.
broker::CreateDomain bios_guest(const std::string& name) {
  broker::CreateDomain c;
  c.spec.name = name;
  c.spec.memory_mib = static_cast<std::uint32_t>(g_memory_mib);
  c.spec.boot_order = {"d0"};
  broker::DiskSpec d;
  d.id = "d0";
  d.path = qbtest::guest_boot_disk();
  d.bus = broker::DiskBus::virtio;
  d.read_only = true;
  d.bootindex = 1;
  c.disks.push_back(std::move(d));
  return c;
}

// The commands a restore sent before its stream's getfd, minus the handshake: the devices.
std::vector<std::string> device_commands(const std::vector<std::string>& sent) {
  std::vector<std::string> out;
  for (const auto& line : sent) {
    if (line.find("qmp_capabilities") != std::string::npos) continue;
    if (line.find("\"getfd\"") != std::string::npos &&
        line.find("\"qb-migrate\"") != std::string::npos) {
      return out;
    }
    out.push_back(line);
  }
  die("the restore's transcript has no getfd of its stream");
}

// The cold floor of a pooled restore: spawn with -incoming defer, the broker's device commands
// replayed (each add-fd or getfd with an fd of `disk` opened here), then the stream of the
// broker's `file` fed from its offset, completion, cont.
RawGuest raw_restore_replayed(Env& env, const broker::CreateDomain& shape, const std::string& file,
                              const std::vector<std::string>& devices, const std::string& disk) {
  RawGuest g = start_raw(env, shape.spec, {"-incoming", "defer"});
  for (const auto& line : devices) {
    if (line.find("\"add-fd\"") == std::string::npos && line.find("\"getfd\"") == std::string::npos) {
      g.qmp->cmd(line);
      continue;
    }
    fdpass::UniqueFd fd(::open(disk.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) die("raw restore: open " + disk);
    g.qmp->cmd(line, fd.get());
  }
  fdpass::UniqueFd in(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
  auto layout = broker::flows::save_file::read_layout(in, "path");
  auto pipe = fdpass::make_pipe();
  if (!in || !layout || !pipe) die("raw restore: open " + file);
  ::fcntl(pipe->second.get(), F_SETPIPE_SZ, 1 << 20);
  g.qmp->cmd(R"({"execute":"getfd","arguments":{"fdname":"qb-migrate"}})", pipe->first.get());
  pipe->first.reset();
  g.qmp->cmd(R"({"execute":"migrate-incoming","arguments":{"uri":"fd:qb-migrate"}})");
  std::thread feeder([&] {
    std::vector<char> buf(1 << 20);
    auto at = static_cast<off_t>(layout->stream_offset);
    for (std::uint64_t left = layout->stream_length; left > 0;) {
      ssize_t n = ::pread(in.get(), buf.data(), std::min<std::uint64_t>(left, buf.size()), at);
      if (n <= 0) break;
      for (ssize_t off = 0; off < n;) {
        ssize_t w = ::write(pipe->second.get(), buf.data() + off, static_cast<std::size_t>(n - off));
        if (w <= 0) return;
        off += w;
      }
      at += n;
      left -= static_cast<std::uint64_t>(n);
    }
    pipe->second.reset();
  });
  feeder.join();
  wait_migration(*g.qmp);
  g.qmp->cmd(R"({"execute":"cont"})");
  return g;
}

void wait_pooled(Env& env) { qbbench::wait_pooled(env.io, env.broker.pool()); }

// Restores from the warm pool against their cold raw floor, `rounds` of each in turn: of the
// BIOS guest, or with `kernel`, of the direct kernel boot the other sections use, from a shape
// that carries its kernel, initrd and append line.
void pooled_restores(const std::string& dir, int rounds, bool verbose, bool kernel) {
  const broker::CreateDomain guest =
      kernel ? broker::CreateDomain{.spec = guest_spec("qbs-kernel")} : bios_guest("qbs-bios");
  const char* what = kernel ? "direct kernel" : "BIOS+virtio disk";
  broker::PoolShape shape;
  shape.memory_mib = static_cast<std::uint32_t>(g_memory_mib);
  shape.count = 1;
  shape.use = broker::PoolUse::restore;
  shape.kernel = guest.spec.kernel;
  shape.initrd = guest.spec.initrd;
  shape.append = guest.spec.append;
  Env env(dir, kBase + (kernel ? 60 : 50), {shape});
  (void)env.run(env.broker.recover());  // the pool fills once recovery is done
  const std::string file = env.saves / (kernel ? "kernel.state" : "bios.state");
  std::vector<double> saves;
  {
    auto info = env.run(env.broker.create(guest));
    must(info, std::string("create the ") + what + " guest");
    if (info->pooled) die("a create took a QEMU kept for restores");
    qbtest::GuestConsole con(qbtest::connect_retry(info->console, 10s));
    if (!con.wait_ready(120s)) die(std::string("the ") + what + " guest did not boot");
    std::this_thread::sleep_for(2s);
    // Its saves, timed too, for the comparison with libvirt on this guest; the last one ends it.
    for (int r = 0; r < rounds; ++r) {
      const auto t0 = Clock::now();
      must(env.run(env.broker.save(guest.spec.name, {file, true})), "save the guest");
      saves.push_back(ms(Clock::now() - t0));
    }
    must(env.run(env.broker.destroy(guest.spec.name)), "destroy the saved guest");
  }
  std::vector<double> pooled, raw;
  std::vector<std::string> devices;
  for (int r = 0; r < rounds; ++r) {
    auto api = [&] {
      wait_pooled(env);
      env.transcript.capture = devices.empty();
      env.transcript.sent.clear();
      const auto t0 = Clock::now();
      auto info = env.run(env.broker.restore({file, "qbs-pooled", false}));
      const auto t1 = Clock::now();
      env.transcript.capture = false;
      must(info, "pooled restore");
      if (!info->pooled) die("the restore did not take the pooled QEMU");
      pooled.push_back(ms(t1 - t0));
      if (devices.empty()) devices = device_commands(env.transcript.sent);
      must(env.run(env.broker.destroy("qbs-pooled")), "destroy the pooled restore");
    };
    auto floor = [&] {
      const auto t0 = Clock::now();
      broker::CreateDomain floor_guest = guest;
      floor_guest.spec.name = "qbs-raw-pooled";
      RawGuest g = raw_restore_replayed(env, floor_guest, file, devices, qbtest::guest_boot_disk());
      raw.push_back(ms(Clock::now() - t0));
      g.qmp.reset();
      must(env.launcher.destroy(g.inst), "destroy the raw restore");
    };
    api();  // first: the raw side replays what it sent
    floor();
  }
  if (verbose) {
    std::printf("pooled restore, device commands replayed by the raw side:\n");
    for (const auto& l : devices) std::printf("  %s\n", l.c_str());
  }
  std::printf("pooled restore (%s, %.1f MiB file): broker med %.1f ms, raw cold floor med "
              "%.1f ms, ratio %.2f; min %.1f / %.1f\n",
              what, size_of(file) / 1048576.0, median(pooled), median(raw),
              median(pooled) / median(raw), *std::min_element(pooled.begin(), pooled.end()),
              *std::min_element(raw.begin(), raw.end()));
  std::printf("save of the same guest (keep_running): broker med %.1f ms\n", median(saves));
  (void)env.run(qbbench::stop_pool(env.broker.pool()));
}

}  // namespace

// A qbrokerd of the benchmark's own (uid range, state, run directory), stopped by pid.
struct Daemon {
  TempDir dir;
  std::string sock = dir / "qbroker.sock";
  uid_t base;
  pid_t pid = -1;

  explicit Daemon(uid_t uid_base) : base(uid_base) {
    const std::vector<std::string> args = {
        QBROKERD,       "--socket",          sock,
        "--state-dir",  dir / "state",       "--run-dir",
        dir / "run",    "--uid-range",       std::to_string(base) + ":8",
        "--image-root", qbtest::guest_dir(), "--log-level",
        "warn"};
    pid = ::fork();
    if (pid == 0) {
      std::vector<char*> argv;
      for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    for (int i = 0; i < 200; ++i) {
      auto v = qbtest::http::call(sock, "GET", "/v1/version", {}, 1s);
      if (v && v->status == 200) return;
      std::this_thread::sleep_for(50ms);
    }
    die("qbrokerd did not answer on " + sock);
  }
  // SIGTERM leaves domains running: what still runs under the range is killed by pid.
  ~Daemon() {
    if (pid > 0) {
      ::kill(pid, SIGTERM);
      int status = 0;
      ::waitpid(pid, &status, 0);
    }
    for (uid_t u = base; u < base + 8; ++u) {
      for (const auto& p : broker::lifecycle::processes_of_uid("/proc", u)) ::kill(p.pid, SIGKILL);
    }
  }
};

// Live migrations of one booted guest between two qbrokerd, there and back, one per round, so
// that each runs beside the raw update it is compared with.
class BrokerMigrations {
 public:
  BrokerMigrations() : a_(kBase + 10), b_(kBase + 20) {
    const std::string body = R"({"name":"qbs-mig","memory_mib":)" + std::to_string(g_memory_mib) +
                             R"(,"kernel":")" + qbtest::guest_kernel() + R"(","initrd":")" +
                             qbtest::guest_initrd() + R"(","append":")" + qbtest::kGuestAppend +
                             R"("})";
    auto created = qbtest::http::call(a_.sock, "POST", "/v1/domains", body, 60s);
    if (!created || created->status != 201) die("migrate: create on the first qbrokerd");
  }
  ~BrokerMigrations() { qbtest::http::call(from_->sock, "DELETE", "/v1/domains/qbs-mig", {}, 30s); }
  // One migration, from the request to its answer.
  void once() {
    auto t0 = Clock::now();
    auto moved = qbtest::http::call(from_->sock, "POST", "/v1/domains/qbs-mig/migrate",
                                    R"({"to":")" + to_->sock + R"("})", 120s);
    if (!moved || moved->status != 200) {
      die("migrate: " + (moved ? moved->body : std::string("no answer")));
    }
    times.push_back(ms(Clock::now() - t0));
    std::swap(from_, to_);
  }
  std::vector<double> times;

 private:
  Daemon a_, b_;
  const Daemon* from_ = &a_;
  const Daemon* to_ = &b_;
};

int main(int argc, char** argv) {
  int rounds = 5;
  bool verbose = false;
  bool skip_pooled = false;
  int poll_ms = 50;
  std::string dir = "/var/tmp";
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--rounds" && i + 1 < argc) rounds = std::atoi(argv[++i]);
    if (std::string(argv[i]) == "--dir" && i + 1 < argc) dir = argv[++i];
    if (std::string(argv[i]) == "--verbose") verbose = true;
    if (std::string(argv[i]) == "--no-pooled") skip_pooled = true;
    if (std::string(argv[i]) == "--memory-mib" && i + 1 < argc) g_memory_mib = std::atoi(argv[++i]);
    if (std::string(argv[i]) == "--poll-ms" && i + 1 < argc) poll_ms = std::atoi(argv[++i]);
  }
  if (::geteuid() != 0) {
    std::fprintf(stderr, "save_bench: needs root\n");
    return 1;
  }
  broker::log::set_level(broker::log::Level::warn);
  Env env(dir);
  env.broker.flow_context().timeouts.migrate_poll = std::chrono::milliseconds(poll_ms);
  std::optional<RawGuest> raw;
  bool api = false;
  int rc = 0;
  try {
    // Two idle guests booted to their prompt: one the Broker's, one driven by hand; and a third
    // under a pair of qbrokerd, which migrate it between them.
    BrokerMigrations migrations;
    broker::CreateDomain c;
    c.spec = guest_spec("qbs-api");
    c.spec.paused = true;
    auto info = env.run(env.broker.create(c));
    must(info, "create");
    api = true;
    qbtest::GuestConsole api_console(qbtest::connect_retry(info->console, 10s));
    must(env.run(env.broker.resume("qbs-api")), "resume");
    raw = start_raw(env, guest_spec("qbs-raw"), {});
    qbtest::GuestConsole raw_console(qbtest::connect_retry(raw->inst.console_path, 10s));
    raw->qmp->cmd(R"({"execute":"cont"})");
    if (!api_console.wait_ready(120s) || !raw_console.wait_ready(120s)) die("a guest did not boot");
    std::this_thread::sleep_for(2s);  // idle, the migrated guest too (created first)
    std::printf("2 idle guests up (-m %d, TCG); %d rounds; save files in %s\n", g_memory_mib,
                rounds, env.saves.path.c_str());

    const std::string api_file = env.saves / "api.state";
    const std::string raw_file = env.saves / "raw.state";
    std::vector<double> save_api, save_raw, restore_api, restore_raw, update_api, update_raw;
    for (int r = 0; r < rounds; ++r) {
      auto api_save = [&] {
        auto t0 = Clock::now();
        must(env.run(env.broker.save("qbs-api", {api_file, true})), "broker save");
        save_api.push_back(ms(Clock::now() - t0));
      };
      auto raw_save_once = [&] {
        auto t0 = Clock::now();
        raw_save(*raw, raw_file);
        save_raw.push_back(ms(Clock::now() - t0));
      };
      auto api_restore = [&] {
        auto t0 = Clock::now();
        env.transcript.on = verbose && r == 0;
        env.transcript.start = t0;
        must(env.run(env.broker.restore({api_file, "qbs-restored", false})), "broker restore");
        restore_api.push_back(ms(Clock::now() - t0));
        if (env.transcript.on) {
          std::printf("broker restore, QMP by time (returned at %.1f ms):\n", restore_api.back());
          for (const auto& l : env.transcript.lines) std::printf("  %s\n", l.c_str());
        }
        env.transcript.on = false;
        must(env.run(env.broker.destroy("qbs-restored")), "destroy restored");
      };
      auto raw_restore_once = [&] {
        auto t0 = Clock::now();
        RawGuest g = raw_restore(env, "qbs-raw-restored", raw_file);
        restore_raw.push_back(ms(Clock::now() - t0));
        g.qmp.reset();
        must(env.launcher.destroy(g.inst), "destroy raw restored");
      };
      auto api_update = [&] {
        auto t0 = Clock::now();
        must(env.run(env.broker.migrate("qbs-api", {"local"})), "broker live update");
        update_api.push_back(ms(Clock::now() - t0));
      };
      auto raw_update_once = [&] {
        auto t0 = Clock::now();
        // The raw guest's name alternates, as the broker's listeners do.
        RawGuest next = raw_update(env, *raw, r % 2 == 0 ? "qbs-raw-b" : "qbs-raw");
        update_raw.push_back(ms(Clock::now() - t0));
        raw.emplace(std::move(next));
      };
      if (r % 2 == 0) {
        api_save();
        raw_save_once();
        api_restore();
        raw_restore_once();
        api_update();
        raw_update_once();
        migrations.once();
      } else {
        raw_save_once();
        api_save();
        raw_restore_once();
        api_restore();
        migrations.once();
        raw_update_once();
        api_update();
      }
    }
    std::printf("file sizes: broker %.1f MiB, raw %.1f MiB\n", size_of(api_file) / 1048576.0,
                size_of(raw_file) / 1048576.0);
    // Medians, and minima: on a shared machine the minimum is the figure least touched by load.
    auto least = [](const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); };
    std::printf("%-10s %12s %12s %8s %12s %12s %8s\n", "", "broker med", "raw med", "ratio",
                "broker min", "raw min", "ratio");
    auto line = [&](const char* what, const std::vector<double>& a, const std::vector<double>& b) {
      std::printf("%-10s %12.1f %12.1f %8.2f %12.1f %12.1f %8.2f\n", what, median(a), median(b),
                  median(a) / median(b), least(a), least(b), least(a) / least(b));
    };
    line("save", save_api, save_raw);
    line("restore", restore_api, restore_raw);
    line("update", update_api, update_raw);
    // Between two brokers: the raw floor is the update's, measured beside it in each round.
    line("migrate", migrations.times, update_raw);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "save_bench: %s\n", e.what());
    rc = 1;
  }
  if (api) (void)env.run(env.broker.destroy("qbs-api"));
  (void)env.run(env.broker.destroy("qbs-restored"));
  if (raw) {
    raw->qmp.reset();
    (void)env.launcher.destroy(raw->inst);
  }
  raw.reset();
  if (rc == 0 && !skip_pooled) {
    try {
      pooled_restores(dir, rounds, verbose, true);
      pooled_restores(dir, rounds, verbose, false);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "save_bench: %s\n", e.what());
      rc = 1;
    }
  }
  return rc;
}
