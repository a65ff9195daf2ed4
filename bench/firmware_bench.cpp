// Firmware-boot benchmark: a domain booting through SeaBIOS or OVMF from a disk or a CD, created
// through the Broker, against the same QEMU command line spawned raw with the same fds, in the
// same run. Shapes: BIOS+disk, BIOS+CD, UEFI+disk, UEFI+CD, and direct-kernel boot (q35 with
// -kernel) to show that path did not regress.
//
//   create   broker: Broker::create of a running domain, from the call to its return.
//            raw: open the files, bind the QMP and console listeners, fork+exec QEMU -> greeting
//            -> qmp_capabilities -> cont -> query-status running. The devices are on the command
//            line with their bootindex (-add-fd, -blockdev or -drive, -device), as the broker
//            itself plans them at spawn.
//   prompt   from the same start to the guest's ready marker and prompt on the serial console
//            (broker: created paused, console connected, resumed, as the flow tests boot).
//
// The raw command line is the broker's own (/proc/<pid>/cmdline of its QEMU, jail paths of the
// kernel and initrd replaced by host paths, its -add-fd fds replaced by the same files opened
// here), plus any device the broker plugged over QMP, translated from its QMP transcript: add-fd
// -> -add-fd, blockdev-add -> -blockdev, device_add -> -device, blockdev-change-medium -> a
// read-only raw -blockdev given to the CD drive. The raw UEFI domain has its own variable store,
// copied once from OVMF's template, as the broker keeps its own across creates.
//
// Broker and raw alternate which goes first each round. The broker's QMP transcript, with the time
// of each line, splits its create into launch (call -> greeting), capabilities, device plugging,
// system_reset, cont and the rest (domain record, events), printed beside the raw phases; and the
// launch is taken apart once more per round with Launcher::start alone, a uid allocation, the
// uid's sweep alone and a cgroup creation, so a miss can be traced to a step of broker/.
//
// Then pool hits: BIOS+disk and direct kernel creates through a broker with a warm pool of that
// shape (a kernel shape for the latter), against the cold rows of the same run.
//
// Usage: firmware_bench [--rounds N] [--creates C] [--only SUBSTRING] [--verbose]   (root, test
// guest and boot media, OVMF; build optimized. C: create pairs per round, 1 by default; the
// guest boots to its prompt once per round whatever C is.)
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <boost/json.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "broker/control/broker.hpp"
#include "broker/core/log.hpp"
#include "broker/lifecycle/cgroup.hpp"
#include "broker/lifecycle/firmware.hpp"
#include "broker/lifecycle/launcher.hpp"
#include "broker/lifecycle/reaper.hpp"
#include "broker/lifecycle/uid_pool.hpp"
#include "fdpass/devices.hpp"
#include "fdpass/opener.hpp"
#include "support/asio_run.hpp"
#include "pool_wait.hpp"
#include "support/qemu.hpp"
#include "support/request_specs.hpp"

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
namespace asio = boost::asio;
namespace json = boost::json;
using broker::lifecycle::Firmware;

namespace {

constexpr uid_t kBase = 3'270'000;
constexpr auto kPromptTimeout = 300s;  // OVMF under TCG on a loaded machine: up to ~16 s seen

// Failures throw, so main() still tears every QEMU down.
[[noreturn]] void die(const std::string& what) {
  throw std::runtime_error(what);
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
    std::string t = base + "/qbbench.XXXXXX";
    if (::mkdtemp(t.data()) == nullptr) die("mkdtemp");
    path = t;
  }
  ~TempDir() { (void)!std::system(("rm -rf " + path).c_str()); }
  std::string operator/(const std::string& n) const { return path + "/" + n; }
};

std::string read_file(const std::string& path) {
  fdpass::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) die("open " + path);
  std::string out;
  char buf[8192];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof(buf));
    if (n < 0) die("read " + path);
    if (n == 0) return out;
    out.append(buf, static_cast<std::size_t>(n));
  }
}

void copy_file(const std::string& from, const std::string& to) {
  const std::string data = read_file(from);
  fdpass::UniqueFd fd(::open(to.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd || ::write(fd.get(), data.data(), data.size()) != static_cast<ssize_t>(data.size())) {
    die("write " + to);
  }
}

// A process's command line, one string per argument.
std::vector<std::string> cmdline_of(pid_t pid) {
  const std::string raw = read_file("/proc/" + std::to_string(pid) + "/cmdline");
  std::vector<std::string> argv;
  std::size_t at = 0;
  while (at < raw.size()) {
    const std::size_t end = raw.find('\0', at);
    argv.push_back(raw.substr(at, end - at));
    at = end == std::string::npos ? raw.size() : end + 1;
  }
  return argv;
}

// One QMP line the broker sent or received, and when.
struct Line {
  Clock::time_point at;
  qmp::Direction dir;
  std::string text;
};

// A command of the transcript with its reply (QEMU answers a monitor's commands in order).
struct Exchange {
  std::string name;
  json::object args;
  json::value reply;
  Clock::time_point sent, replied;
};

struct Transcript {
  std::optional<Clock::time_point> greeting;
  std::vector<Exchange> commands;
};

Transcript pair_up(const std::vector<Line>& lines) {
  Transcript t;
  std::size_t next_reply = 0;
  for (const auto& l : lines) {
    json::value v = json::parse(l.text);
    const json::object& o = v.as_object();
    if (l.dir == qmp::Direction::to_qemu) {
      Exchange e;
      e.name = std::string(o.at("execute").as_string());
      if (const auto* a = o.if_contains("arguments")) e.args = a->as_object();
      e.sent = l.at;
      t.commands.push_back(std::move(e));
      continue;
    }
    if (o.contains("QMP")) {
      t.greeting = l.at;
      continue;
    }
    if (o.contains("event")) continue;
    if (next_reply >= t.commands.size()) die("a QMP reply before its command: " + l.text);
    if (o.contains("error")) die("QMP error in the broker's transcript: " + l.text);
    t.commands[next_reply].reply = o.at("return");
    t.commands[next_reply].replied = l.at;
    ++next_reply;
  }
  if (!t.greeting || next_reply != t.commands.size()) die("incomplete QMP transcript");
  return t;
}

// What is timed, per shape and round.
struct Shape {
  std::string label;
  std::string name;  // the domain's name
  bool direct_kernel = false;
  Firmware firmware = Firmware::bios;
  bool cd = false;
};

broker::CreateDomain request_for(const Shape& s, bool paused) {
  broker::CreateDomain c;
  c.spec.name = s.name;
  c.spec.paused = paused;
  if (s.direct_kernel) {
    c.spec.kernel = qbtest::guest_kernel();
    c.spec.initrd = qbtest::guest_initrd();
    c.spec.append = qbtest::kGuestAppend;
    c.spec.memory_mib = 128;
    return c;
  }
  c.spec.memory_mib = 256;  // OVMF needs 144 or more
  c.spec.firmware = s.firmware;
  if (s.cd) {
    c.spec.boot_order = {"cd0"};
    c.cdroms.push_back(broker::CdromSpec{"cd0", qbtest::guest_boot_iso(), 1});
  } else {
    c.spec.boot_order = {"d0"};
    c.disks.push_back(qbtest::disk("d0", qbtest::guest_boot_disk(), broker::DiskFormat::raw,
                                   broker::DiskBus::virtio, true));
    c.disks.back().bootindex = 1;
  }
  return c;
}

// The raw QEMU of a shape: its command line and the files it gets at fixed fds.
struct RawPlan {
  std::vector<std::string> argv;
  struct File {
    int target;
    std::string path;
    int flags;
  };
  std::vector<File> files;
};

// A value of "k=v,k=v" (an -add-fd argument).
std::string option_value(const std::string& opts, const std::string& key) {
  for (std::size_t at = 0; at < opts.size();) {
    std::size_t end = opts.find(',', at);
    if (end == std::string::npos) end = opts.size();
    const std::string kv = opts.substr(at, end - at);
    if (kv.rfind(key + "=", 0) == 0) return kv.substr(key.size() + 1);
    at = end + 1;
  }
  return {};
}

// The broker's command line and QMP transcript of one create, as a cold command line.
RawPlan plan_raw(std::vector<std::string> argv, const Transcript& t,
                 const std::map<std::string, RawPlan::File>& by_opaque) {
  RawPlan plan;
  int next_fd = 5;  // 3: QMP, 4: console, as in the broker's jail
  for (std::size_t i = 0; i + 1 < argv.size(); ++i) {
    if (argv[i] == "-kernel") argv[i + 1] = qbtest::guest_kernel();
    if (argv[i] == "-initrd") argv[i + 1] = qbtest::guest_initrd();
    if (argv[i] != "-add-fd") continue;
    const std::string opaque = option_value(argv[i + 1], "opaque");
    auto f = by_opaque.find(opaque);
    if (f == by_opaque.end()) die("no file for the broker's -add-fd " + argv[i + 1]);
    const int fd = std::stoi(option_value(argv[i + 1], "fd"));
    plan.files.push_back({fd, f->second.path, f->second.flags});
    next_fd = std::max(next_fd, fd + 1);
  }
  plan.argv = std::move(argv);

  std::vector<std::string> blockdevs;
  std::vector<json::object> devices;
  for (const auto& c : t.commands) {
    if (c.name == "qmp_capabilities" || c.name == "system_reset" || c.name == "cont" ||
        c.name == "remove-fd" || c.name.rfind("query-", 0) == 0) {
      continue;
    }
    if (c.name == "add-fd") {
      const std::string opaque(c.args.at("opaque").as_string());
      auto f = by_opaque.find(opaque);
      if (f == by_opaque.end()) die("no file for the broker's add-fd " + opaque);
      const auto set = c.reply.at("fdset-id").to_number<std::int64_t>();
      plan.files.push_back({next_fd, f->second.path, f->second.flags});
      plan.argv.insert(plan.argv.end(), {"-add-fd", "fd=" + std::to_string(next_fd) + ",set=" +
                                                        std::to_string(set) + ",opaque=" + opaque});
      ++next_fd;
    } else if (c.name == "blockdev-add") {
      blockdevs.push_back(json::serialize(c.args));
    } else if (c.name == "device_add") {
      devices.push_back(c.args);
    } else if (c.name == "blockdev-change-medium") {
      // The medium a running drive gets, given to the drive at start-up instead.
      const std::string id(c.args.at("id").as_string());
      const std::string file = "qb-" + id + "-file", fmt = "qb-" + id + "-fmt";
      blockdevs.push_back(json::serialize(json::object{{"driver", "file"},
                                                       {"node-name", file},
                                                       {"filename", c.args.at("filename")},
                                                       {"read-only", true}}));
      blockdevs.push_back(json::serialize(json::object{
          {"driver", "raw"}, {"node-name", fmt}, {"file", file}, {"read-only", true}}));
      bool found = false;
      for (auto& d : devices) {
        if (d.at("id").as_string() == id) {
          d["drive"] = fmt;
          found = true;
        }
      }
      if (!found) die("blockdev-change-medium for an unknown drive " + id);
    } else {
      die("firmware_bench cannot put the broker's " + c.name + " on a command line");
    }
  }
  for (const auto& b : blockdevs) plan.argv.insert(plan.argv.end(), {"-blockdev", b});
  for (const auto& d : devices) plan.argv.insert(plan.argv.end(), {"-device", json::serialize(d)});
  return plan;
}

// A raw QEMU: a plain child of ours, as root, no jail.
struct RawQemu {
  pid_t pid = -1;
  fdpass::UniqueFd qmp;
  fdpass::UniqueFd console;
  Clock::time_point exec, greeting, capabilities, cont, running;
};

// Forks and execs `plan`: fd 3 the QMP listener, 4 the console listener, the plan's files at
// their targets, stdout and stderr to `log`. Only async-signal-safe calls after the fork.
pid_t spawn_raw(const RawPlan& plan, const std::vector<int>& sources, int log) {
  std::vector<char*> args;
  for (const auto& a : plan.argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  std::vector<int> targets = {3, 4};
  for (const auto& f : plan.files) targets.push_back(f.target);
  std::vector<int> lifted(sources.size());
  const int top = *std::max_element(targets.begin(), targets.end());
  fdpass::UniqueFd null(::open("/dev/null", O_RDWR | O_CLOEXEC));
  const int null_fd = null.get();
  pid_t pid = ::fork();
  if (pid < 0) die("fork");
  if (pid != 0) return pid;
  // Every fd lifted above the targets first, so placing one never overwrites another.
  const int keep_log = ::fcntl(log, F_DUPFD, top + 1);
  const int keep_null = ::fcntl(null_fd, F_DUPFD, top + 1);
  for (std::size_t i = 0; i < sources.size(); ++i)
    lifted[i] = ::fcntl(sources[i], F_DUPFD, top + 1);
  for (std::size_t i = 0; i < sources.size(); ++i) {
    if (lifted[i] < 0 || ::dup2(lifted[i], targets[i]) < 0) ::_exit(126);
  }
  if (keep_log < 0 || keep_null < 0 || ::dup2(keep_null, 0) < 0 || ::dup2(keep_log, 1) < 0 ||
      ::dup2(keep_log, 2) < 0) {
    ::_exit(126);
  }
  ::close_range(static_cast<unsigned>(top) + 1, ~0U, 0);
  ::execv(args[0], args.data());
  ::_exit(127);
}

// The raw floor: from opening the files to QEMU running (and, with `console`, its console
// connected before the cont).
RawQemu raw_start(const RawPlan& plan, const std::string& dir, bool console,
                  std::vector<pid_t>& live) {
  RawQemu q;
  const std::string qmp_path = dir + "/raw-qmp.sock", console_path = dir + "/raw-console.sock";
  q.exec = Clock::now();
  auto qmp_listener = fdpass::listen_unix(qmp_path, 0600, 0, 0, 4);
  auto console_listener = fdpass::listen_unix(console_path, 0600, 0, 0, 4);
  if (!qmp_listener || !console_listener) die("raw listeners");
  std::vector<fdpass::UniqueFd> opened;
  std::vector<int> sources = {qmp_listener->get(), console_listener->get()};
  for (const auto& f : plan.files) {
    opened.emplace_back(::open(f.path.c_str(), f.flags | O_CLOEXEC | O_NOCTTY));
    if (!opened.back()) die("open " + f.path);
    sources.push_back(opened.back().get());
  }
  fdpass::UniqueFd log(::open((dir + "/raw-qemu.log").c_str(),
                              O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600));
  q.pid = spawn_raw(plan, sources, log.get());
  live.push_back(q.pid);
  opened.clear();
  qmp_listener->reset();
  console_listener->reset();
  q.qmp = qbtest::connect_retry(qmp_path, 10s);
  auto greeting = qbtest::read_line(q.qmp.get(), 30s);
  if (!greeting || greeting->find("\"QMP\"") == std::string::npos) {
    die("raw QEMU gave no greeting; its log: " + read_file(dir + "/raw-qemu.log"));
  }
  q.greeting = Clock::now();
  auto caps = qbtest::qmp_command(q.qmp.get(), R"({"execute":"qmp_capabilities"})", 30s);
  if (!caps || caps->find("\"return\"") == std::string::npos) die("raw qmp_capabilities");
  q.capabilities = Clock::now();
  if (console) q.console = qbtest::connect_retry(console_path, 10s);
  auto cont = qbtest::qmp_command(q.qmp.get(), R"({"execute":"cont"})", 30s);
  if (!cont || cont->find("\"return\"") == std::string::npos) die("raw cont");
  q.cont = Clock::now();
  if (!console) {
    auto st = qbtest::qmp_command(q.qmp.get(), R"({"execute":"query-status"})", 30s);
    if (!st || st->find("\"running\"") == std::string::npos) die("raw QEMU not running");
  }
  q.running = Clock::now();
  ::unlink(qmp_path.c_str());
  ::unlink(console_path.c_str());
  return q;
}

void raw_kill(RawQemu& q, std::vector<pid_t>& live) {
  ::kill(q.pid, SIGKILL);
  ::waitpid(q.pid, nullptr, 0);
  live.erase(std::remove(live.begin(), live.end(), q.pid), live.end());
}

// Which medium the guest booted from, checked after the timing.
void check_booted(qbtest::GuestConsole& con, const Shape& s, const char* who) {
  auto out = con.run("cat /proc/cmdline; [ -d /sys/firmware/efi ] && echo efi || echo bios", 30s);
  if (!out) die(std::string(who) + " " + s.label + ": the guest does not answer");
  const std::string want_boot = s.direct_kernel ? "" : s.cd ? "qb_boot=cd" : "qb_boot=disk";
  const bool efi =
      out->text.find("efi") != std::string::npos && out->text.find("bios") == std::string::npos;
  if (out->text.find(want_boot) == std::string::npos || efi != (s.firmware == Firmware::uefi)) {
    die(std::string(who) + " " + s.label + " booted the wrong way: " + out->text);
  }
}

struct Env {
  TempDir state, run_dir, raw_dir;
  TempDir broker_state{"/dev/shm"};  // domain records on a tmpfs, as qbrokerd keeps them on /run
  broker::lifecycle::ForkingUidKiller killer;
  broker::lifecycle::Reaper reaper;
  broker::lifecycle::UidPool uids;
  broker::lifecycle::CgroupManager cgroups;
  fdpass::ImageRoots roots;
  broker::lifecycle::Launcher launcher;
  asio::io_context io;
  std::vector<Line> lines;  // the broker's QMP transcript since the last clear
  broker::Broker broker;

  // `pool`: the broker's warm-pool shapes; a broker with a pool has a uid range of its own.
  explicit Env(uid_t base = kBase, std::vector<broker::PoolShape> pool = {})
      : reaper(killer, base),
        uids({base, 8}, state.path, reaper),
        cgroups({}, "qbroker-" + std::to_string(base)),
        roots(open_roots()),
        launcher(launcher_config(run_dir.path), uids, cgroups, roots),
        broker(io.get_executor(), broker_config(std::move(pool)), launcher, roots) {
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
    c.firmware.nvram_dir = dir + "/nvram";
    return c;
  }
  broker::BrokerConfig broker_config(std::vector<broker::PoolShape> pool) {
    broker::BrokerConfig c;
    c.pool = std::move(pool);
    c.records_dir = broker_state.path + "/domains";
    c.transcript = [this](qmp::Direction d, std::string_view line, bool) {
      lines.push_back(Line{Clock::now(), d, std::string(line)});
    };
    return c;
  }
  template <class T>
  T run(asio::awaitable<T> t) {
    return qbtest::run(io, std::move(t));
  }
};

// Everything started, torn down whatever happens.
struct Owned {
  Env& env;
  std::vector<pid_t> raw;
  ~Owned() {
    for (const auto& d : env.broker.list()) (void)env.run(env.broker.destroy(d.name));
    for (pid_t p : raw) {
      ::kill(p, SIGKILL);
      ::waitpid(p, nullptr, 0);
    }
    (void)env.launcher.reclaim_uids({});
  }
};

// The phases of one create (ms): broker from its transcript, raw from its own clock.
struct Phases {
  double launch = 0, caps = 0, plug = 0, reset = 0, cont = 0, rest = 0;
};

Phases broker_phases(const Transcript& t, Clock::time_point start, Clock::time_point end) {
  Phases p;
  p.launch = ms(*t.greeting - start);
  const Exchange* caps = nullptr;
  const Exchange* reset = nullptr;
  const Exchange* cont = nullptr;
  for (const auto& c : t.commands) {
    if (c.name == "qmp_capabilities") caps = &c;
    if (c.name == "system_reset") reset = &c;
    if (c.name == "cont") cont = &c;
  }
  if (caps == nullptr || cont == nullptr) die("no qmp_capabilities or cont in the transcript");
  p.caps = ms(caps->replied - *t.greeting);
  // Everything between the handshake and the reset (or the cont): the devices' commands.
  const Clock::time_point after_plug = reset != nullptr ? reset->sent : cont->sent;
  p.plug = ms(after_plug - caps->replied);
  if (reset != nullptr) p.reset = ms(cont->sent - reset->sent);
  p.cont = ms(cont->replied - cont->sent);
  p.rest = ms(end - cont->replied);
  return p;
}

// The broker's launch taken apart outside the Broker: Launcher::start alone (validate, firmware
// and store, uid, boot-file mounts, listeners, cgroup, clone3 and the jail steps, up to the exec)
// and the QEMU it started up to its greeting; and steps of start on their own: a uid allocated
// (swept by a reaper child, recorded with fsync), the sweep alone (a kill by uid of an unused
// uid), and a cgroup made with its limits.
struct Anatomy {
  double start = 0, greeting = 0, uid = 0, sweep = 0, cgroup = 0;
};

struct Row {
  Shape shape;
  RawPlan plan;
  std::size_t plug_commands = 0;
  std::vector<double> broker_create, raw_create, broker_prompt, raw_prompt;
  std::vector<Phases> broker_phases, raw_phases;
  std::vector<Anatomy> anatomy;
};

template <class T, class F>
std::vector<double> field(const std::vector<T>& v, F f) {
  std::vector<double> out;
  for (const auto& p : v) out.push_back(f(p));
  return out;
}

std::string range(const std::vector<double>& v) {
  if (v.empty()) return "-";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.0f-%.0f", *std::min_element(v.begin(), v.end()),
                *std::max_element(v.begin(), v.end()));
  return buf;
}

void destroy(Env& env, const Shape& s) {
  if (auto gone = env.run(env.broker.destroy(s.name)); !gone) {
    die("destroy " + s.label + ": " + gone.error().describe());
  }
}

// Untimed: one create of the shape through the broker, whose command line and QMP transcript make
// the raw plan, then one raw start of that plan. It also warms the page cache and makes the
// broker's variable store, which later creates of the name reuse.
Row warm_up(Env& env, Owned& owned, const Shape& s, bool verbose) {
  env.lines.clear();
  auto info = env.run(env.broker.create(request_for(s, false)));
  if (!info) die("create " + s.label + ": " + info.error().describe());
  const Transcript t = pair_up(env.lines);
  const auto ovmf = broker::lifecycle::ovmf_files(env.launcher.config().firmware, false);
  const std::string vars = env.raw_dir / (s.name + "_VARS.fd");
  if (s.firmware == Firmware::uefi) copy_file(ovmf.vars_template, vars);
  const std::map<std::string, RawPlan::File> by_opaque = {
      {std::string(broker::lifecycle::kFirmwareCodeOpaque), {0, ovmf.code, O_RDONLY}},
      {std::string(broker::lifecycle::kFirmwareVarsOpaque), {0, vars, O_RDWR}},
      {"qb:d0", {0, qbtest::guest_boot_disk(), O_RDONLY}},
      {"qb:cd0", {0, qbtest::guest_boot_iso(), O_RDONLY}},
  };
  Row row{.shape = s, .plan = plan_raw(cmdline_of(info->pid), t, by_opaque)};
  for (const auto& c : t.commands) {
    if (c.name == "add-fd" || c.name == "blockdev-add" || c.name == "device_add" ||
        c.name == "blockdev-change-medium") {
      ++row.plug_commands;
    }
  }
  if (verbose) {
    std::printf("\n%s: broker QMP transcript\n", s.label.c_str());
    for (const auto& l : env.lines) {
      std::printf("  %s %s\n", l.dir == qmp::Direction::to_qemu ? "->" : "<-", l.text.c_str());
    }
    std::printf("%s: raw command line\n ", s.label.c_str());
    for (const auto& a : row.plan.argv) std::printf(" %s", a.c_str());
    std::printf("\n");
  }
  destroy(env, s);
  RawQemu q = raw_start(row.plan, env.raw_dir.path, false, owned.raw);
  raw_kill(q, owned.raw);
  return row;
}

void broker_create(Env& env, Row& r) {
  const Shape& s = r.shape;
  env.lines.clear();
  const auto t0 = Clock::now();
  auto info = env.run(env.broker.create(request_for(s, false)));
  const auto t1 = Clock::now();
  if (!info) die("create " + s.label + ": " + info.error().describe());
  if (info->state != broker::RunState::running) die(s.label + ": created, but not running");
  r.broker_create.push_back(ms(t1 - t0));
  r.broker_phases.push_back(broker_phases(pair_up(env.lines), t0, t1));
  destroy(env, s);
}

void raw_create(Env& env, Owned& owned, Row& r) {
  RawQemu q = raw_start(r.plan, env.raw_dir.path, false, owned.raw);
  r.raw_create.push_back(ms(q.running - q.exec));
  Phases p;
  p.launch = ms(q.greeting - q.exec);
  p.caps = ms(q.capabilities - q.greeting);
  p.cont = ms(q.running - q.capabilities);  // cont and query-status
  r.raw_phases.push_back(p);
  raw_kill(q, owned.raw);
}

// Created paused, console connected, resumed: the ready marker cannot be missed.
void broker_prompt(Env& env, Row& r) {
  const Shape& s = r.shape;
  const auto t0 = Clock::now();
  auto info = env.run(env.broker.create(request_for(s, true)));
  if (!info) die("create " + s.label + ": " + info.error().describe());
  qbtest::GuestConsole con(qbtest::connect_retry(info->console, 10s));
  if (auto ok = env.run(env.broker.resume(s.name)); !ok) die("resume: " + ok.error().describe());
  if (!con.wait_ready(kPromptTimeout)) die("broker " + s.label + ": no prompt");
  r.broker_prompt.push_back(ms(Clock::now() - t0));
  check_booted(con, s, "broker");
  destroy(env, s);
}

void raw_prompt(Env& env, Owned& owned, Row& r) {
  RawQemu q = raw_start(r.plan, env.raw_dir.path, true, owned.raw);
  qbtest::GuestConsole con(std::move(q.console));
  if (!con.wait_ready(kPromptTimeout)) die("raw " + r.shape.label + ": no prompt");
  r.raw_prompt.push_back(ms(Clock::now() - q.exec));
  check_booted(con, r.shape, "raw");
  raw_kill(q, owned.raw);
}

void launch_anatomy(Env& env, Row& r) {
  const Shape& s = r.shape;
  Anatomy a;
  const auto t0 = Clock::now();
  auto inst = env.launcher.start(request_for(s, false).spec);
  const auto t1 = Clock::now();
  if (!inst) die("start " + s.label + ": " + inst.error().describe());
  auto qmp = qbtest::connect_retry(inst->qmp_path, 10s);
  auto greeting = qbtest::read_line(qmp.get(), 30s);
  const auto t2 = Clock::now();
  if (!greeting) die("start " + s.label + ": no greeting");
  qmp.reset();
  if (auto gone = env.launcher.destroy(*inst); !gone) die("destroy: " + gone.error().describe());
  a.start = ms(t1 - t0);
  a.greeting = ms(t2 - t1);
  const auto u0 = Clock::now();
  auto uid = env.uids.allocate(s.name);
  a.uid = ms(Clock::now() - u0);
  if (!uid) die("uid: " + uid.error().describe());
  if (auto ok = env.uids.release(*uid); !ok) die("uid: " + ok.error().describe());
  const auto k0 = Clock::now();
  auto swept = env.reaper.kill_uid(kBase + 7);  // the pool hands out the lowest free uid first
  a.sweep = ms(Clock::now() - k0);
  if (!swept) die("sweep: " + swept.error().describe());
  if (env.cgroups.available()) {
    const auto c0 = Clock::now();
    auto cg = env.cgroups.create("dom-" + s.name + "-probe", {256ull << 20, 256});
    a.cgroup = ms(Clock::now() - c0);
    if (!cg) die("cgroup: " + cg.error().describe());
    env.cgroups.retire(*cg);
  }
  r.anatomy.push_back(a);
}

// One round of a shape. Whoever goes first alternates, so neither always runs on a warmer cache.
// `creates`: create pairs per round. Each create is destroyed as soon as it runs, so pairs after
// the first cost about 0.1 s, and more of them steady the create medians at little cost.
void measure_round(Env& env, Owned& owned, Row& r, int round, int creates) {
  for (int k = 1; k < creates; ++k) {
    if ((round + k) % 2 == 0) {
      broker_create(env, r);
      raw_create(env, owned, r);
    } else {
      raw_create(env, owned, r);
      broker_create(env, r);
    }
  }
  if (round % 2 == 0) {
    broker_create(env, r);
    raw_create(env, owned, r);
    broker_prompt(env, r);
    raw_prompt(env, owned, r);
  } else {
    raw_create(env, owned, r);
    broker_create(env, r);
    raw_prompt(env, owned, r);
    broker_prompt(env, r);
  }
  launch_anatomy(env, r);
  std::printf("round %d %-13s create %7.1f / %7.1f ms   prompt %8.1f / %8.1f ms (broker / raw)\n",
              round + 1, r.shape.label.c_str(), r.broker_create.back(), r.raw_create.back(),
              r.broker_prompt.back(), r.raw_prompt.back());
  std::fflush(stdout);
}

void report_ratios(const std::vector<Row>& rows) {
  std::printf("\n%-14s %28s %8s %7s   %26s %7s\n", "medians (ms)", "create -> running: broker",
              "raw", "ratio", "to prompt: broker", "raw");
  for (const auto& r : rows) {
    const double bc = median(r.broker_create), rc = median(r.raw_create);
    const double bp = median(r.broker_prompt), rp = median(r.raw_prompt);
    std::printf("%-14s %28.1f %8.1f %6.2fx   %26.0f %7.0f  %5.2fx  create <= 1.10x: %s\n",
                r.shape.label.c_str(), bc, rc, bc / rc, bp, rp, bp / rp,
                bc / rc <= 1.10 ? "met" : "NOT met");
  }
  std::printf("\nranges over the rounds (ms, min-max): create broker | raw, prompt broker | raw\n");
  for (const auto& r : rows) {
    std::printf("  %-13s %s | %s, %s | %s\n", r.shape.label.c_str(), range(r.broker_create).c_str(),
                range(r.raw_create).c_str(), range(r.broker_prompt).c_str(),
                range(r.raw_prompt).c_str());
  }
}

void report_phases(const std::vector<Row>& rows) {
  std::printf("\nwhere create -> running goes (medians, ms)\n");
  std::printf("%-14s %-6s %8s %8s %10s %8s %8s %8s\n", "", "", "launch", "caps", "plug", "reset",
              "cont", "rest");
  for (const auto& r : rows) {
    const auto& b = r.broker_phases;
    const auto& w = r.raw_phases;
    std::printf("%-14s %-6s %8.1f %8.2f %6.1f/%-3zu %8.2f %8.2f %8.2f\n", r.shape.label.c_str(),
                "broker", median(field(b, [](const Phases& p) { return p.launch; })),
                median(field(b, [](const Phases& p) { return p.caps; })),
                median(field(b, [](const Phases& p) { return p.plug; })), r.plug_commands,
                median(field(b, [](const Phases& p) { return p.reset; })),
                median(field(b, [](const Phases& p) { return p.cont; })),
                median(field(b, [](const Phases& p) { return p.rest; })));
    std::printf("%-14s %-6s %8.1f %8.2f %10s %8s %8.2f %8s\n", "", "raw",
                median(field(w, [](const Phases& p) { return p.launch; })),
                median(field(w, [](const Phases& p) { return p.caps; })), "-", "-",
                median(field(w, [](const Phases& p) { return p.cont; })), "-");
  }
  std::printf(
      "launch: create call (raw: open + fork) -> QMP greeting; plug: the devices' QMP "
      "commands in prelaunch (ms/commands); reset: system_reset; cont: cont (raw: cont + "
      "query-status); rest: cont's reply -> create returns (domain record, events)\n");

  std::printf(
      "\nthe broker's launch alone (medians, ms): Launcher::start up to the exec, then the "
      "QEMU it started up to its greeting; steps of start on their own: a uid allocated "
      "(sweep + record), the sweep alone, a cgroup\n");
  std::printf("%-14s %10s %16s %12s %8s %10s\n", "", "start", "exec->greeting", "uid+record",
              "sweep", "cgroup");
  for (const auto& r : rows) {
    const auto& a = r.anatomy;
    std::printf("%-14s %10.2f %16.1f %12.2f %8.2f %10.2f\n", r.shape.label.c_str(),
                median(field(a, [](const Anatomy& x) { return x.start; })),
                median(field(a, [](const Anatomy& x) { return x.greeting; })),
                median(field(a, [](const Anatomy& x) { return x.uid; })),
                median(field(a, [](const Anatomy& x) { return x.sweep; })),
                median(field(a, [](const Anatomy& x) { return x.cgroup; })));
  }
}

// A pool hit: the BIOS+disk shape again, created through a broker that keeps one QEMU of the
// shape spawned ahead (--pool memory_mib=256,count=1), so the create takes it instead of spawning;
// then the direct kernel shape, from a pool shape with its kernel, initrd and append line.
struct PoolRow {
  std::vector<double> create, prompt;
  std::vector<Phases> phases;
};

std::vector<broker::PoolShape> pool_for(const Shape& s) {
  const broker::CreateDomain c = request_for(s, false);
  broker::PoolShape shape;
  shape.memory_mib = c.spec.memory_mib;
  shape.kernel = c.spec.kernel;
  shape.initrd = c.spec.initrd;
  shape.append = c.spec.append;
  shape.count = 1;
  return {shape};
}

void wait_pooled(Env& env) { qbbench::wait_pooled(env.io, env.broker.pool()); }

void pool_create(Env& env, PoolRow& r, const Shape& s) {
  wait_pooled(env);
  env.lines.clear();
  const auto t0 = Clock::now();
  auto info = env.run(env.broker.create(request_for(s, false)));
  const auto t1 = Clock::now();
  if (!info) die("pool hit " + s.label + ": " + info.error().describe());
  if (!info->pooled) die("pool hit " + s.label + ": the create did not take the pooled QEMU");
  if (info->state != broker::RunState::running) die("pool hit: created, but not running");
  r.create.push_back(ms(t1 - t0));
  r.phases.push_back(broker_phases(pair_up(env.lines), t0, t1));
  destroy(env, s);
}

void pool_prompt(Env& env, PoolRow& r, const Shape& s) {
  wait_pooled(env);
  const auto t0 = Clock::now();
  auto info = env.run(env.broker.create(request_for(s, true)));
  if (!info || !info->pooled) die("pool hit " + s.label + ": no pooled create");
  qbtest::GuestConsole con(qbtest::connect_retry(info->console, 10s));
  if (auto ok = env.run(env.broker.resume(s.name)); !ok) die("resume: " + ok.error().describe());
  if (!con.wait_ready(kPromptTimeout)) die("pool hit " + s.label + ": no prompt");
  r.prompt.push_back(ms(Clock::now() - t0));
  check_booted(con, s, "pool hit");
  destroy(env, s);
}

void report_pool(const Shape& s, const PoolRow& p, const std::vector<Row>& rows) {
  const Row* cold = nullptr;
  for (const auto& r : rows) {
    if (r.shape.label == s.label) cold = &r;
  }
  const double hit = median(p.create), prompt = median(p.prompt);
  std::printf(
      "\npool hit, %s (medians, ms): create -> running %.1f (%s), to prompt %.0f (%s)\n",
      s.label.c_str(), hit, range(p.create).c_str(), prompt, range(p.prompt).c_str());
  if (cold != nullptr) {
    const double raw = median(cold->raw_create), cold_create = median(cold->broker_create);
    std::printf(
        "  against the same run's raw spawn %.1f ms: %.3fx; against a cold create %.1f ms: "
        "%.3fx (%.1fx faster)\n",
        raw, hit / raw, cold_create, hit / cold_create, cold_create / hit);
    std::printf("  to prompt against raw %.0f ms: %.2fx; against a cold create %.0f ms: %.2fx\n",
                median(cold->raw_prompt), prompt / median(cold->raw_prompt),
                median(cold->broker_prompt), prompt / median(cold->broker_prompt));
  }
  std::printf("  pool hit <= 20 ms: %s\n", hit <= 20 ? "met" : "NOT met");
  const auto& b = p.phases;
  std::printf(
      "  phases: launch (handover + QMP connect) %.2f, caps %.2f, plug %.2f, reset %.2f, "
      "cont %.2f, rest %.2f\n",
      median(field(b, [](const Phases& x) { return x.launch; })),
      median(field(b, [](const Phases& x) { return x.caps; })),
      median(field(b, [](const Phases& x) { return x.plug; })),
      median(field(b, [](const Phases& x) { return x.reset; })),
      median(field(b, [](const Phases& x) { return x.cont; })),
      median(field(b, [](const Phases& x) { return x.rest; })));
}

}  // namespace

int main(int argc, char** argv) {
  int rounds = 3;
  std::string only;  // measure only the shapes whose label contains this
  bool verbose = false;
  int creates = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--rounds" && i + 1 < argc) rounds = std::atoi(argv[++i]);
    if (a == "--only" && i + 1 < argc) only = argv[++i];
    if (a == "--creates" && i + 1 < argc) creates = std::max(1, std::atoi(argv[++i]));
    if (a == "--verbose") verbose = true;
  }
  if (::geteuid() != 0) {
    std::fprintf(stderr, "firmware_bench: needs root\n");
    return 1;
  }
  broker::log::set_level(broker::log::Level::warn);
  Env env;
  Owned owned{env};
  try {
    const std::vector<Shape> shapes = {
        {"BIOS+disk", "fwb-bios-disk", false, Firmware::bios, false},
        {"BIOS+CD", "fwb-bios-cd", false, Firmware::bios, true},
        {"UEFI+disk", "fwb-uefi-disk", false, Firmware::uefi, false},
        {"UEFI+CD", "fwb-uefi-cd", false, Firmware::uefi, true},
        {"direct kernel", "fwb-kernel", true, Firmware::bios, false},
    };
    std::printf(
        "accel %s, %d rounds of %d create pairs and a boot; broker records in %s\n",
        std::string(to_string(env.launcher.detect_accel(broker::lifecycle::Accel::automatic)))
            .c_str(),
        rounds, creates, env.broker_state.path.c_str());
    std::vector<Row> rows;
    for (const auto& s : shapes) {
      if (s.label.find(only) != std::string::npos) rows.push_back(warm_up(env, owned, s, verbose));
    }
    for (int round = 0; round < rounds; ++round) {
      for (auto& r : rows) measure_round(env, owned, r, round, creates);
    }
    report_ratios(rows);
    report_phases(rows);
    uid_t pool_base = kBase + 100;
    for (const Shape* shape : {&shapes.front(), &shapes.back()}) {
      if ((shape->label + " pool").find(only) == std::string::npos) continue;
      Env pooled(pool_base, pool_for(*shape));
      pool_base += 10;
      (void)pooled.run(pooled.broker.recover());  // the pool fills once recovery is done
      Owned pooled_owned{pooled};
      PoolRow pool;
      for (int round = 0; round < rounds; ++round) {
        pool_create(pooled, pool, *shape);
        pool_prompt(pooled, pool, *shape);
        std::printf("round %d pool hit      create %7.1f ms   prompt %8.1f ms\n", round + 1,
                    pool.create.back(), pool.prompt.back());
        std::fflush(stdout);
      }
      (void)pooled.run(qbbench::stop_pool(pooled.broker.pool()));
      report_pool(*shape, pool, rows);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "firmware_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
