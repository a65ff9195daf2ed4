// The randomized kill harness (issue #12). qbrokerd runs a few domains booting the test guest;
// each round sends one random job (create, destroy, CD insert/eject, disk add on SCSI or virtio,
// disk remove, NIC add/remove, VNC set/remove, pause, resume), SIGKILLs the daemon 0-500 ms into
// it (or, one round in five, right after its answer), restarts it and audits everything the API
// lists against the host and each QEMU (kill_audit.hpp). The run stops at the first round with
// an inconsistency and prints the seed and round count that replay its jobs and kill delays:
//
//   QB_KILL_SEED=<seed> QB_KILL_ROUNDS=<n> api_kill_harness_test
//
// QB_KILL_JOBS=<kind>,... draws from those kinds of job only (cd-insert, disk-remove, ...).
//
// scripts/kill-harness.sh runs it for 500 rounds; docs/architecture.md, "The kill harness",
// says what the audit holds.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <boost/json.hpp>
#include <cstdlib>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "broker/lifecycle/cgroup.hpp"
#include "broker/lifecycle/proc.hpp"
#include "daemon_support.hpp"
#include "fdpass/devices.hpp"
#include "http_client.hpp"
#include "kill_audit.hpp"
#include "support/qemu.hpp"
#include "support/support.hpp"

using namespace std::chrono_literals;
namespace fs = std::filesystem;
namespace http = qbtest::http;
namespace json = boost::json;
using namespace qbtest::daemon;
using qbtest::kill::ApiDomain;
using qbtest::kill::Findings;

namespace {

constexpr uid_t kBase = 3'105'000;
constexpr unsigned kUids = 16;
constexpr std::size_t kMaxDomains = 3;
constexpr unsigned kPciSlots = 4;  // one goes to the SCSI controller of the CD drive
constexpr auto kMaxKillDelay = 500ms;
constexpr auto kUnplugTimeout = 4s;
constexpr auto kSettle = 15s;  // longer than a resumed unplug's wait for the guest
const std::array<const char*, 6> kDisks = {"d0", "d1", "d2", "d3", "d4", "d5"};
const std::array<const char*, 2> kMedia = {"cd-a.iso", "cd-b.iso"};

// ---- Jobs ------------------------------------------------------------------------------------

// clang-format off
enum class Kind {
  create, destroy, cd_insert, cd_eject, disk_add_scsi, disk_add_virtio, disk_remove, nic_add,
  nic_remove, vnc_set, vnc_remove, pause, resume
};
// clang-format on

// Every kind with its name, in the order a draw picks from.
struct KindName {
  Kind kind;
  std::string_view name;
};
constexpr std::array<KindName, 13> kKinds = {{{Kind::create, "create"},
                                              {Kind::destroy, "destroy"},
                                              {Kind::cd_insert, "cd-insert"},
                                              {Kind::cd_eject, "cd-eject"},
                                              {Kind::disk_add_scsi, "disk-add-scsi"},
                                              {Kind::disk_add_virtio, "disk-add-virtio"},
                                              {Kind::disk_remove, "disk-remove"},
                                              {Kind::nic_add, "nic-add"},
                                              {Kind::nic_remove, "nic-remove"},
                                              {Kind::vnc_set, "vnc-set"},
                                              {Kind::vnc_remove, "vnc-remove"},
                                              {Kind::pause, "pause"},
                                              {Kind::resume, "resume"}}};

std::string_view to_string(Kind k) {
  for (const auto& [kind, name] : kKinds) {
    if (kind == k) return name;
  }
  return "?";
}

struct Job {
  Kind kind = Kind::create;
  std::string domain;
  std::string device;  // cd0, d3, n1; empty for the domain's own jobs and VNC
  std::string medium;  // cd-insert: the image put in
  std::string method;
  std::string path;
  std::string body;
  std::string describe() const {
    std::string out(to_string(kind));
    if (!device.empty()) out += " " + device;
    if (!medium.empty()) out += " " + fs::path(medium).filename().string();
    return out + " on " + domain;
  }
};

// What a round draws, always all four and in this order, so a replay with the same seed draws the
// same numbers whatever the previous rounds' answers were.
struct Draw {
  std::uint64_t kind, target, mode, delay;
  static Draw from(std::mt19937_64& rng) {
    Draw d{};
    d.kind = rng();
    d.target = rng();
    d.mode = rng();
    d.delay = rng();
    return d;
  }
  bool after_reply() const { return mode % 5 == 0; }
  // An instant in [0, 500 ms], denser near 0 (the cube of a uniform fraction): most jobs are
  // answered within a few milliseconds to a few tens, so a uniform instant would mostly fall
  // between jobs; this way about a third of the kills land in the first 20 ms.
  std::chrono::microseconds kill_delay() const {
    const double u = static_cast<double>(delay >> 11) / static_cast<double>(1ULL << 53);
    const auto max = std::chrono::duration_cast<std::chrono::microseconds>(kMaxKillDelay).count();
    return std::chrono::microseconds(
        static_cast<std::int64_t>(u * u * u * static_cast<double>(max)));
  }
};

std::string create_body(const std::string& name, bool paused) {
  json::object o{{"name", name},
                 {"memory_mib", 128},
                 {"pci_slots", kPciSlots},
                 {"kernel", qbtest::guest_kernel()},
                 {"initrd", qbtest::guest_initrd()},
                 {"append", qbtest::kGuestAppend},
                 {"cdroms", json::array{json::object{{"id", "cd0"}}}}};
  if (paused) o["paused"] = true;
  return json::serialize(o);
}

bool usable(const ApiDomain& d) {
  return d.state == "running" || d.state == "paused";
}

// Root ports left for a virtio disk or a NIC.
bool has_free_port(const ApiDomain& d) {
  std::size_t used = 1 + d.nics.size();  // the SCSI controller's port
  for (const auto& x : d.disks) used += x.bus == "virtio" ? 1 : 0;
  return used < kPciSlots;
}

// ---- The harness -----------------------------------------------------------------------------

// Kills, by pid, whatever still runs in the harness's uid range when the test ends early, and
// removes its cgroup subtree.
struct RangeCleanup {
  ~RangeCleanup() {
    for (uid_t uid = kBase; uid < kBase + kUids; ++uid) {
      for (const auto& p : broker::lifecycle::processes_of_uid("/proc", uid)) {
        if (!p.zombie) ::kill(p.pid, SIGKILL);
      }
    }
    wait_for(
        [] {
          qbtest::reap_exited_children();
          for (uid_t uid = kBase; uid < kBase + kUids; ++uid) {
            if (broker::lifecycle::live_processes_of_uid("/proc", uid) > 0) return false;
          }
          return true;
        },
        10s);
    remove_cgroup_base(kBase);
  }
};

class Harness {
 public:
  Harness();
  // Starts qbrokerd; false when its socket does not answer.
  bool start();
  // SIGKILLs the daemon and reaps it; a daemon that had already died is a finding.
  void kill(Findings& f);
  // Creates a domain paused, catches its guest's ready line on the console, resumes it.
  void boot(const std::string& name);
  // What the jobs of a round may target.
  struct Targets {
    const std::vector<ApiDomain>& domains;
    unsigned round;
    std::set<std::string> free_disks;   // images no domain has plugged
    std::set<std::string> unpluggable;  // domains whose guest can release a PCI device now
  };
  Targets targets(const std::vector<ApiDomain>& domains, unsigned round);
  // The jobs of `kind` that are valid on the targets.
  std::vector<Job> candidates(Kind kind, const Targets& t) const;
  // Destroys every domain, audits that nothing is left and stops the daemon with SIGTERM.
  Findings finish();
  // The daemon log written since `offset`, at most its last `max` bytes.
  std::string log_since(std::size_t offset, std::size_t max = 12000) const;
  std::size_t log_size() const { return slurp(log_).size(); }

  qbtest::TempDir dir;
  RangeCleanup cleanup;
  Child daemon;
  qbtest::kill::Layout layout;
  bool taps = false;

 private:
  // The jobs of `kind` on one domain: destroy, pause, resume and VNC; media; disks; NICs.
  std::vector<Job> domain_jobs(Kind kind, const ApiDomain& d) const;
  std::vector<Job> cd_jobs(Kind kind, const ApiDomain& d) const;
  std::vector<Job> disk_jobs(Kind kind, const ApiDomain& d, const Targets& t) const;
  std::vector<Job> nic_jobs(Kind kind, const ApiDomain& d, const Targets& t) const;
  // The guest answers on its console (it has booted, so it can release a PCI device).
  bool booted(const ApiDomain& d);

  std::vector<std::string> args_;
  std::string log_;
  std::set<pid_t> booted_;
};

Harness::Harness() {
  qbtest::become_subreaper();
  layout.root = dir.path();
  layout.state = dir / "state";
  layout.run = dir / "run";
  layout.images = dir / "images";
  layout.sock = dir / "qbroker.sock";
  layout.base = kBase;
  layout.uids = kUids;
  layout.tap_prefix = "qbkh" + std::to_string(::getpid() % 10000) + "t";
  log_ = dir / "qbrokerd.log";
  fs::create_directory(layout.images);
  for (const char* name : kDisks) {
    const std::string path = layout.images + "/" + name + ".img";
    qbtest::write_file(path, std::string("QB-KILL-") + name);
    fs::resize_file(path, 1 << 20);
  }
  for (const char* name : kMedia) {
    const std::string path = layout.images + "/" + name;
    qbtest::write_file(path, std::string("QB-KILL-MEDIUM-") + name);
    fs::resize_file(path, 1 << 20);
  }
  args_ = daemon_args(dir, kBase, kUids);
  args_.insert(args_.end(),
               {"--socket", layout.sock, "--image-root", layout.images, "--unplug-timeout-ms",
                std::to_string(std::chrono::milliseconds(kUnplugTimeout).count())});
  // A tap made and dropped at once: it vanishes with its fd.
  taps = static_cast<bool>(fdpass::open_tap(layout.tap_prefix + "probe"));
}

bool Harness::start() {
  daemon.pid = spawn(args_, log_);
  if (!wait_for_socket(layout.sock, 30s)) return false;
  if (layout.cgroup_base.empty()) {
    broker::lifecycle::CgroupManager cg({}, "qbroker-" + std::to_string(kBase));
    if (cg.available()) layout.cgroup_base = cg.base();
  }
  return true;
}

void Harness::kill(Findings& f) {
  if (daemon.pid <= 0) {
    f.add("no qbrokerd runs to kill");
    return;
  }
  int status = 0;
  if (::waitpid(daemon.pid, &status, WNOHANG) == daemon.pid) {
    f.add("qbrokerd ended on its own during the job (" +
          (WIFSIGNALED(status) ? "signal " + std::to_string(WTERMSIG(status))
                               : "exit " + std::to_string(WEXITSTATUS(status))) +
          ")");
    daemon.pid = -1;
    return;
  }
  ::kill(daemon.pid, SIGKILL);
  if (int rc = daemon.wait(10s); rc != 128 + SIGKILL) {
    f.add("qbrokerd did not end by the SIGKILL (status " + std::to_string(rc) + ")");
  }
}

void Harness::boot(const std::string& name) {
  auto created = http::call(layout.sock, "POST", "/v1/domains", create_body(name, true), 60s);
  REQUIRE(created);
  INFO(created->body);
  REQUIRE(created->status == 201);
  qbtest::GuestConsole console(
      qbtest::connect_retry(layout.run + "/console/" + name + ".sock", 10s));
  auto resumed = http::call(layout.sock, "POST", "/v1/domains/" + name + "/resume", {}, 30s);
  REQUIRE(resumed);
  REQUIRE(resumed->status / 100 == 2);
  REQUIRE(console.wait_ready(90s));
  booted_.insert(static_cast<pid_t>(created->json.at("pid").to_number<int>()));
}

bool Harness::booted(const ApiDomain& d) {
  if (booted_.contains(d.pid)) return true;
  auto fd = http::connect(layout.run + "/console/" + d.name + ".sock");
  if (!fd) return false;
  qbtest::GuestConsole console(std::move(fd));
  if (!console.run("true", 500ms)) return false;
  booted_.insert(d.pid);
  return true;
}

Harness::Targets Harness::targets(const std::vector<ApiDomain>& domains, unsigned round) {
  Targets t{domains, round, {kDisks.begin(), kDisks.end()}, {}};
  // Each image is plugged once at most, in any domain: a second read-write open would be
  // refused by QEMU's image locking, which is not what the harness tests.
  for (const auto& d : domains) {
    bool pci = !d.nics.empty();
    for (const auto& x : d.disks) {
      t.free_disks.erase(x.id);
      pci = pci || x.bus == "virtio";
    }
    // A PCI device leaves only when the guest lets go: not while paused, nor before it booted.
    if (pci && d.state == "running" && booted(d)) t.unpluggable.insert(d.name);
  }
  return t;
}

std::vector<Job> Harness::domain_jobs(Kind kind, const ApiDomain& d) const {
  const std::string at = "/v1/domains/" + d.name;
  switch (kind) {
    case Kind::destroy:
      return {Job{kind, d.name, {}, {}, "DELETE", at}};
    case Kind::pause:
      if (d.state == "running") return {Job{kind, d.name, {}, {}, "POST", at + "/pause"}};
      return {};
    case Kind::resume:
      if (d.state == "paused") return {Job{kind, d.name, {}, {}, "POST", at + "/resume"}};
      return {};
    case Kind::vnc_set:
      return {Job{kind, d.name, {}, {}, "PUT", at + "/vnc", R"({"listen":"127.0.0.1:0"})"}};
    case Kind::vnc_remove:
      if (d.vnc) return {Job{kind, d.name, {}, {}, "DELETE", at + "/vnc"}};
      return {};
    default:
      return {};
  }
}

std::vector<Job> Harness::cd_jobs(Kind kind, const ApiDomain& d) const {
  std::vector<Job> out;
  for (const auto& cd : d.cdroms) {
    const std::string at = "/v1/domains/" + d.name + "/cdroms/" + cd.id + "/medium";
    if (kind == Kind::cd_eject && !cd.medium.empty())
      out.push_back(Job{kind, d.name, cd.id, {}, "DELETE", at});
    if (kind != Kind::cd_insert) continue;
    for (const char* m : kMedia) {
      const std::string path = layout.images + "/" + m;
      if (cd.medium == path) continue;
      out.push_back(
          Job{kind, d.name, cd.id, path, "PUT", at, json::serialize(json::object{{"path", path}})});
    }
  }
  return out;
}

std::vector<Job> Harness::disk_jobs(Kind kind, const ApiDomain& d, const Targets& t) const {
  std::vector<Job> out;
  const std::string at = "/v1/domains/" + d.name + "/disks";
  if (kind == Kind::disk_remove) {
    for (const auto& x : d.disks) {
      if (x.bus == "scsi" || t.unpluggable.contains(d.name)) {
        out.push_back(Job{kind, d.name, x.id, {}, "DELETE", at + "/" + x.id});
      }
    }
    return out;
  }
  const bool virtio = kind == Kind::disk_add_virtio;
  if (virtio && !has_free_port(d)) return out;
  for (const auto& id : t.free_disks) {
    json::object body{{"id", id},
                      {"path", layout.images + "/" + id + ".img"},
                      {"bus", virtio ? "virtio" : "scsi"}};
    out.push_back(Job{kind, d.name, id, {}, "POST", at, json::serialize(body)});
  }
  return out;
}

std::vector<Job> Harness::nic_jobs(Kind kind, const ApiDomain& d, const Targets& t) const {
  std::vector<Job> out;
  const std::string at = "/v1/domains/" + d.name + "/nics";
  if (!taps) return out;
  if (kind == Kind::nic_remove) {
    if (!t.unpluggable.contains(d.name)) return out;
    for (const auto& n : d.nics)
      out.push_back(Job{kind, d.name, n.id, {}, "DELETE", at + "/" + n.id});
    return out;
  }
  if (!has_free_port(d)) return out;
  std::set<std::string> used;
  for (const auto& n : d.nics) used.insert(n.id);
  for (const char* id : {"n0", "n1", "n2"}) {
    if (used.contains(id)) continue;
    // A tap name of its own per round: one a killed job left behind is told apart.
    json::object body{{"id", id}, {"tap", layout.tap_prefix + std::to_string(t.round)}};
    out.push_back(Job{kind, d.name, id, {}, "POST", at, json::serialize(body)});
    break;
  }
  return out;
}

std::vector<Job> Harness::candidates(Kind kind, const Targets& t) const {
  if (kind == Kind::create) {
    if (t.domains.size() >= kMaxDomains) return {};
    const std::string name = "kh-r" + std::to_string(t.round);
    return {Job{kind, name, {}, {}, "POST", "/v1/domains", create_body(name, false)}};
  }
  // At least one domain stays, so every kind of device job keeps a target.
  if (kind == Kind::destroy && t.domains.size() < 2) return {};
  std::vector<Job> out;
  for (const auto& d : t.domains) {
    if (!usable(d)) continue;
    std::vector<Job> jobs;
    switch (kind) {
      case Kind::cd_insert:
      case Kind::cd_eject:
        jobs = cd_jobs(kind, d);
        break;
      case Kind::disk_add_scsi:
      case Kind::disk_add_virtio:
      case Kind::disk_remove:
        jobs = disk_jobs(kind, d, t);
        break;
      case Kind::nic_add:
      case Kind::nic_remove:
        jobs = nic_jobs(kind, d, t);
        break;
      default:
        jobs = domain_jobs(kind, d);
        break;
    }
    out.insert(out.end(), jobs.begin(), jobs.end());
  }
  return out;
}

std::string Harness::log_since(std::size_t offset, std::size_t max) const {
  std::string text = slurp(log_);
  text = offset < text.size() ? text.substr(offset) : std::string();
  return text.size() > max ? "[...]\n" + text.substr(text.size() - max) : text;
}

Findings Harness::finish() {
  Findings f;
  auto listed = qbtest::kill::list_domains(layout.sock);
  for (const auto& d : listed.value_or(std::vector<ApiDomain>{})) {
    auto r = http::call(layout.sock, "DELETE", "/v1/domains/" + d.name, {}, 60s);
    if (!r || r->status != 200) {
      f.add("destroying " + d.name + " failed: " +
            (r ? std::to_string(r->status) + " " + r->body : std::string("no answer")));
    }
  }
  for (auto& line : qbtest::kill::audit_empty(layout, daemon.pid).lines) f.add(std::move(line));
  ::kill(daemon.pid, SIGTERM);
  if (int rc = daemon.wait(15s); rc != 0)
    f.add("qbrokerd did not stop cleanly on SIGTERM (status " + std::to_string(rc) + ")");
  qbtest::kill::reap_children_except(-1);
  if (!layout.cgroup_base.empty() && fs::exists(layout.cgroup_base)) {
    for (const auto& e : fs::directory_iterator(layout.cgroup_base)) {
      if (!e.is_directory()) continue;
      auto events = slurp(e.path().string() + "/cgroup.events");
      std::replace(events.begin(), events.end(), '\n', ' ');
      f.add("cgroup left after the daemon stopped: " + e.path().string() + " (" + events + ")");
    }
  }
  return f;
}

// ---- Rounds ----------------------------------------------------------------------------------

std::uint64_t env_number(const char* name, std::uint64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::stoull(v) : fallback;
}

std::uint64_t random_seed() {
  std::random_device rd;
  return (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
}

// The kinds a run draws from: every kind, or those QB_KILL_JOBS names ("cd-insert,cd-eject"),
// to hold a fix of one flow to many kills. Always in kKinds' order, so a seed picks the same
// whatever order the names come in. Empty when a name is unknown.
std::vector<Kind> kinds_to_draw(const std::string& names) {
  std::vector<Kind> out;
  std::set<std::string> wanted;
  std::istringstream in(names);
  for (std::string name; std::getline(in, name, ',');) wanted.insert(name);
  for (const auto& [kind, name] : kKinds) {
    if (names.empty() || wanted.erase(std::string(name)) > 0) out.push_back(kind);
  }
  return wanted.empty() ? out : std::vector<Kind>{};
}

// One job picked by `draw` among the kinds that have a valid target; nullopt when none has.
std::optional<Job> pick(Harness& h, const std::vector<Kind>& allowed,
                        const std::vector<ApiDomain>& domains, unsigned round, const Draw& draw) {
  const auto targets = h.targets(domains, round);
  std::vector<std::vector<Job>> kinds;
  for (Kind kind : allowed) {
    auto jobs = h.candidates(kind, targets);
    if (!jobs.empty()) kinds.push_back(std::move(jobs));
  }
  if (kinds.empty()) return std::nullopt;
  const auto& jobs = kinds[draw.kind % kinds.size()];
  return jobs[draw.target % jobs.size()];
}

// What an answered job left that a restart lost; empty when its effect is there.
std::string lost_effect(const Job& job, const ApiDomain& d) {
  auto has = [](const auto& list, const std::string& id) {
    return std::any_of(list.begin(), list.end(), [&](const auto& x) { return x.id == id; });
  };
  std::string medium = "(no drive)";
  for (const auto& cd : d.cdroms) medium = cd.id == job.device ? cd.medium : medium;
  switch (job.kind) {
    case Kind::cd_insert:
      return medium == job.medium ? "" : job.device + " holds '" + medium + "'";
    case Kind::cd_eject:
      return medium.empty() ? "" : job.device + " holds '" + medium + "'";
    case Kind::disk_add_scsi:
    case Kind::disk_add_virtio:
      return has(d.disks, job.device) ? "" : "the disk is not listed";
    case Kind::disk_remove:
      return has(d.disks, job.device) ? "the disk is still listed" : "";
    case Kind::nic_add:
      return has(d.nics, job.device) ? "" : "the NIC is not listed";
    case Kind::nic_remove:
      return has(d.nics, job.device) ? "the NIC is still listed" : "";
    case Kind::vnc_set:
      return d.vnc ? "" : "no VNC listener is listed";
    case Kind::vnc_remove:
      return d.vnc ? "the VNC listener " + *d.vnc + " is listed" : "";
    case Kind::pause:
      return d.state == "paused" ? "" : "the domain is " + d.state;
    case Kind::resume:
      return d.state == "running" ? "" : "the domain is " + d.state;
    default:
      return {};
  }
}

// Nothing is acknowledged that the restarted daemon does not hold: an answered job's effect is
// there after the restart. A create is all or nothing even unanswered: absent, or running with
// the CD drive it asked for.
void check_outcome(const Job& job, const std::optional<http::Reply>& answer,
                   const std::vector<ApiDomain>& domains, Findings& f) {
  const ApiDomain* d = nullptr;
  for (const auto& x : domains) d = x.name == job.domain ? &x : d;
  const bool acked = answer && answer->status / 100 == 2;
  const std::string said = acked ? "answered " + std::to_string(answer->status) : "unanswered";
  if (job.kind == Kind::create) {
    if (acked && d == nullptr)
      f.add(job.describe() + " was " + said + ", but the domain is not listed");
    if (d != nullptr && (d->state != "running" || d->cdroms.size() != 1)) {
      f.add(job.describe() + " (" + said + ") left " + d->name + " listed " + d->state + " with " +
            std::to_string(d->cdroms.size()) + " CD drive(s); it asked to run with cd0");
    }
    return;
  }
  if (!acked) return;
  if (job.kind == Kind::destroy) {
    if (d != nullptr) f.add(job.describe() + " was " + said + ", but the domain is listed");
    return;
  }
  if (d == nullptr) {
    f.add(job.describe() + " was " + said + ", but the domain is not listed");
    return;
  }
  if (auto lost = lost_effect(job, *d); !lost.empty()) {
    f.add(job.describe() + " was " + said + ", but after the restart " + lost);
  }
}

struct RoundOutcome {
  Findings findings;
  std::string what;  // the job, when the daemon died and what it had answered
  std::vector<ApiDomain> domains;
  std::size_t daemon_fds = 0;
};

// Sends `job` on a connection of its own, kills the daemon as `draw` says, restarts and audits.
RoundOutcome run_round(Harness& h, const Job& job, const Draw& draw) {
  RoundOutcome out;
  out.what = job.describe();
  auto conn = http::connect(h.layout.sock);
  if (!conn ||
      !http::send_all(conn.get(), http::request_text(job.method, job.path, job.body, false))) {
    out.findings.add("could not send the job to qbrokerd");
    return out;
  }
  std::optional<http::Reply> answer;
  if (draw.after_reply()) {
    answer = http::read_reply(conn.get(), 120s);
    out.what += ", killed after its answer";
  } else {
    std::this_thread::sleep_for(draw.kill_delay());
    std::ostringstream at;
    at << std::fixed << std::setprecision(1)
       << static_cast<double>(draw.kill_delay().count()) / 1000;
    out.what += ", killed " + at.str() + " ms into it";
  }
  h.kill(out.findings);
  if (!draw.after_reply()) answer = http::read_reply(conn.get(), 200ms);
  if (answer) {
    const auto code = answer->error_code();
    out.what +=
        " (answered " + std::to_string(answer->status) + (code.empty() ? "" : " " + code) + ")";
  } else {
    out.what += " (no answer)";
  }
  qbtest::kill::reap_children_except(-1);
  if (!h.start()) {
    out.findings.add("the restarted qbrokerd does not answer on its socket");
    return out;
  }
  auto audit = qbtest::kill::audit(h.layout, h.daemon.pid, kSettle);
  for (auto& line : audit.findings.lines) out.findings.add(std::move(line));
  check_outcome(job, answer, audit.domains, out.findings);
  out.domains = std::move(audit.domains);
  out.daemon_fds = audit.daemon_fds;
  return out;
}

// A fresh daemon's non-socket fds by the number of domains it adopted: a restart must not
// carry more than the first one with as many domains did (a leak that grows across restarts).
struct FreshFds {
  std::map<std::size_t, std::size_t> seen;
  void check(RoundOutcome& o) {
    if (o.daemon_fds == 0) return;  // no daemon answered
    auto [it, first] = seen.emplace(o.domains.size(), o.daemon_fds);
    if (first || it->second == o.daemon_fds) return;
    o.findings.add("the restarted qbrokerd holds " + std::to_string(o.daemon_fds) +
                   " non-socket fds with " + std::to_string(o.domains.size()) +
                   " domain(s); an earlier one held " + std::to_string(it->second));
  }
};

}  // namespace

TEST_CASE(
    "qbrokerd SIGKILLed at random instants of random jobs keeps the API, QEMU and the host "
    "in agreement",
    "[api][daemon][privileged][qemu][restart][kill-harness]") {
  QB_REQUIRE_ROOT();
  const std::uint64_t seed = env_number("QB_KILL_SEED", random_seed());
  const auto rounds = static_cast<unsigned>(env_number("QB_KILL_ROUNDS", 30));
  const char* jobs_env = std::getenv("QB_KILL_JOBS");
  const std::string jobs = jobs_env != nullptr ? jobs_env : "";
  const auto allowed = kinds_to_draw(jobs);
  if (allowed.empty()) {
    std::string names;
    for (const auto& k : kKinds) names += (names.empty() ? "" : ",") + std::string(k.name);
    FAIL("QB_KILL_JOBS=" << jobs << ": it takes a comma-separated list of " << names);
  }
  // What replays a run, but for the round count.
  const std::string replay =
      "QB_KILL_SEED=" + std::to_string(seed) + (jobs.empty() ? "" : " QB_KILL_JOBS=" + jobs);
  std::cerr << "kill harness: seed " << seed << ", " << rounds << " rounds"
            << (jobs.empty() ? "" : ", jobs " + jobs) << std::endl;
  WARN("kill harness seed " << seed << " (" << rounds << " rounds)");
  std::mt19937_64 rng(seed);

  Harness h;
  if (!h.taps) {
    WARN("no tap can be created here: NIC jobs are skipped");
    std::cerr << "kill harness: no tap can be created here, NIC jobs are skipped" << std::endl;
  }
  REQUIRE(h.start());
  h.boot("kh-a");
  h.boot("kh-b");
  auto first = qbtest::kill::audit(h.layout, h.daemon.pid, kSettle);
  if (!first.findings.empty()) FAIL("before the first kill:\n" << first.findings.text());
  std::vector<ApiDomain> domains = std::move(first.domains);

  FreshFds fresh_fds;
  const auto started = Clock::now();
  for (unsigned round = 1; round <= rounds; ++round) {
    const Draw draw = Draw::from(rng);
    const auto job = pick(h, allowed, domains, round, draw);
    if (!job) {
      std::cerr << "kill harness: round " << round << "/" << rounds
                << ": no job of the kinds drawn from has a target; skipped" << std::endl;
      continue;
    }
    const std::size_t log_at = h.log_size();
    const auto round_start = Clock::now();
    auto outcome = run_round(h, *job, draw);
    const auto took =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - round_start);
    fresh_fds.check(outcome);
    std::cerr << "kill harness: round " << round << "/" << rounds << ": " << outcome.what << "; "
              << (outcome.findings.empty() ? "consistent" : "INCONSISTENT") << " (" << took.count()
              << " ms, " << outcome.domains.size() << " domains, daemon fds " << outcome.daemon_fds
              << ")" << std::endl;
    if (!outcome.findings.empty()) {
      std::ostringstream report;
      report << "kill harness: round " << round << " of " << rounds << " (seed " << seed
             << "): " << outcome.what << "\n"
             << outcome.findings.text() << "replay with " << replay << " QB_KILL_ROUNDS=" << round;
      std::cerr << report.str() << "\nqbrokerd's log since the round began:\n"
                << h.log_since(log_at) << std::endl;
      FAIL(report.str());
    }
    domains = std::move(outcome.domains);
  }
  const auto elapsed = std::chrono::duration_cast<std::chrono::seconds>(Clock::now() - started);

  const std::size_t log_at = h.log_size();
  auto left = h.finish();
  if (!left.empty()) {
    std::ostringstream report;
    report << "kill harness: after all " << rounds << " rounds (seed " << seed
           << "), destroying every domain left:\n"
           << left.text() << "replay with " << replay << " QB_KILL_ROUNDS=" << rounds;
    std::cerr << report.str() << "\nqbrokerd's log since the destroys began:\n"
              << h.log_since(log_at) << std::endl;
    FAIL(report.str());
  }
  std::cerr << "kill harness: seed " << seed << ": " << rounds << " rounds consistent in "
            << elapsed.count() << " s" << std::endl;
}
