#include "broker/control/broker.hpp"

#include <sys/socket.h>
#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <chrono>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/detached.hpp>
#include <boost/json.hpp>

#include "broker/control/peer.hpp"
#include "broker/core/errc.hpp"
#include "broker/core/log.hpp"
#include "broker/domain/fdsets.hpp"
#include "broker/domain/qmp_call.hpp"
#include "qmp/commands.hpp"

namespace broker {
namespace asio = boost::asio;
namespace json = boost::json;
using asio::awaitable;
using asio::use_awaitable;

json::object DomainInfo::to_json() const {
  json::object o;
  o["name"] = name;
  o["state"] = to_string(state);
  if (!qemu_status.empty()) o["qemu_status"] = qemu_status;
  o["uid"] = uid;
  o["pid"] = pid;
  o["accel"] = accel;
  o["job"] = job.empty() ? json::value(nullptr) : json::value(job);
  o["console"] = console;
  o["pooled"] = pooled;
  o["memory_mib"] = spec.memory_mib;
  o["vcpus"] = spec.vcpus;
  o["machine"] = lifecycle::to_string(spec.machine);
  o["devices"] = devices;
  if (usage) {
    o["usage"] = json::object{{"cpu_us", usage->cpu_us},
                              {"memory_bytes", usage->memory_bytes},
                              {"memory_from", usage->memory_from}};
  }
  if (job_progress) {
    o["job_progress"] = json::object{{"fraction", *job_progress}, {"phase", job_phase}};
  }
  return o;
}

namespace {

DomainsConfig domains_config(const BrokerConfig& c) {
  return DomainsConfig{
      .records_dir = c.records_dir,
      .session = {.start_timeout = c.start_timeout, .qmp_max_line = c.qmp_max_line,
                  .transcript = c.transcript},
      .quit_timeout = c.quit_timeout,
      .adopt_timeout = c.adopt_timeout,
      .qmp_timeout = c.timeouts.qmp,
      .log = c.log,
      .log_retention = c.log_retention,
      .parallel_lifecycle = c.parallel_lifecycle,
      .pool = c.pool,
  };
}

}  // namespace

Broker::Broker(asio::any_io_executor ex, BrokerConfig config, lifecycle::Launcher& launcher,
               const fdpass::ImageRoots& roots)
    : ex_(ex),
      config_(std::move(config)),
      launcher_(launcher),
      events_(ex),
      domains_(ex, domains_config(config_), launcher, events_),
      flow_ctx_{ex, roots, events_, config_.timeouts, flows::VncHandover::automatic,
                config_.save_root},
      resume_([this](flows::RecoveryReport::Removal r) {
        asio::co_spawn(ex_, resume_removal(std::move(r)), asio::detached);
      }) {}

Broker::~Broker() = default;

namespace {

// A job's outcome as the metrics count it.
template <class T>
metrics::JobOutcome outcome_of(const Result<T>& r) {
  if (r) return metrics::JobOutcome::ok;
  return r.error().code == errc::cancelled ? metrics::JobOutcome::cancelled
                                           : metrics::JobOutcome::failed;
}

// Counts a finished job and, for the flows watched, its latency.
void count_job(metrics::Registry& m, std::string_view kind, metrics::JobOutcome outcome,
               std::chrono::steady_clock::time_point start) {
  m.job_done(kind, outcome,
             std::chrono::duration_cast<std::chrono::microseconds>(
                 std::chrono::steady_clock::now() - start));
}

// A destination's answer to "prepare this domain", an error unless it is 201 with a body.
std::optional<Error> refusal(const std::string& to, const PeerReply& prepared) {
  if (prepared.status == 201 && prepared.body.is_object()) return std::nullopt;
  // Its own words when it gave an error body, else what it sent.
  std::string why = json::serialize(prepared.body);
  std::string field = "to";
  if (const auto* err = prepared.body.is_object() ? prepared.body.as_object().if_contains("error") : nullptr;
      err != nullptr && err->is_object()) {
    const auto& eo = err->as_object();
    if (const auto* m = eo.if_contains("message"); m != nullptr && m->is_string()) {
      why = std::string(m->get_string());
    }
    // A destination image copy_storage cannot use is the request's disk_paths entry.
    if (const auto* f = eo.if_contains("field");
        f != nullptr && f->is_string() && f->get_string().starts_with("disk_paths.")) {
      field = std::string(f->get_string());
    }
  }
  Error e(make_error_code(prepared.status == 409 ? errc::already_exists : errc::invalid_argument),
          "the broker at " + to + " refused the domain (HTTP " + std::to_string(prepared.status) +
              "): " + why);
  e.field = std::move(field);
  return e;
}

// A message of a MigrationLink as the HTTP reply it stands for: {"status": N, "body": ...}.
PeerReply peer_reply_of(const json::value& message) {
  PeerReply r;
  const auto& o = message.as_object();
  if (const auto* st = o.if_contains("status"); st != nullptr && st->is_int64() &&
                                                 st->get_int64() >= 100 && st->get_int64() < 600) {
    r.status = static_cast<unsigned>(st->get_int64());
  }
  if (const auto* body = o.if_contains("body")) r.body = *body;
  return r;
}

constexpr std::size_t kMaxLinkMessage = 1 << 20;  // a described domain is a few KiB

awaitable<void> run_relay_both_ways(std::shared_ptr<MigrationLink> link, fdpass::UniqueFd local) {
  auto r = co_await relay_both_ways(std::move(link), std::move(local));
  if (!r) log::warn(r.error().describe());
}

void close_links(std::vector<std::shared_ptr<MigrationLink>>& links) {
  for (auto& link : links) link->close();
  links.clear();
}


}  // namespace

awaitable<Result<json::value>> Broker::qmp_call(Domain& d, qmp::Command c) {
  return broker::qmp_call(d, std::move(c), config_.timeouts.qmp);
}

awaitable<Result<DomainInfo>> Broker::create(CreateDomain request) {
  const auto start = std::chrono::steady_clock::now();
  auto d = co_await flows::create(flow_ctx_, domains_, std::move(request));
  count_job(metrics(), "create", outcome_of(d), start);
  if (!d) co_return d.error();
  co_return describe(**d);
}

awaitable<Result<lifecycle::KillReport>> Broker::destroy(std::string name, bool graceful,
                                                         bool purge_nvram) {
  auto d = find(name);
  if (!d) co_return d.error();
  if (((*d)->state() == RunState::stopping || (*d)->destroying) && !(*d)->teardown_failed) {
    co_return Error(make_error_code(errc::busy), "domain " + name + " is already being destroyed");
  }
  if ((*d)->state() == RunState::adopting) {
    // Within the adopt timeout it is adopted, unresponsive (and then destroyable) or torn down.
    co_return Error(make_error_code(errc::busy),
                    "domain " + name + " is being adopted after a restart; retry in a few seconds");
  }
  // Recorded first, so a broker killed halfway through leaves the next one a destroy to finish.
  (*d)->destroying = true;
  if (auto ok = co_await domains_.records().persist(**d); !ok) {
    log::warn("domain " + name + ": destroying it without recording so first");
  }
  const auto start = std::chrono::steady_clock::now();
  auto report = co_await domains_.teardown(*d, graceful, true);
  count_job(metrics(), "destroy", outcome_of(report), start);
  if (report && purge_nvram) {
    if (auto ok = lifecycle::purge_nvram(launcher_.config().firmware, name); !ok) co_return ok.error();
  }
  if (report) {
    events_.publish(name, "domain", "destroyed",
                    {{"killed", report->found},
                     {"method", report->method},
                     {"duration_us", report->duration.count()}});
  }
  co_return report;
}

awaitable<Result<DomainInfo>> Broker::info(std::string name, bool live) {
  auto found = find(name);
  if (!found) co_return found.error();
  auto d = *found;
  DomainInfo i = describe(*d);
  if (live) i.usage = usage_of(*d);
  if (live && d->qmp() != nullptr) {
    auto st = co_await qmp_call(*d, qmp::cmd::query_status());
    if (!st) co_return st.error();
    auto s = qmp::reply::status(*st);
    if (s) i.qemu_status = s->status;
  }
  co_return i;
}

std::vector<DomainInfo> Broker::list(bool usage) const {
  std::vector<DomainInfo> out;
  for (const auto& [name, d] : domains_.all()) {
    out.push_back(describe(*d));
    if (usage) out.back().usage = usage_of(*d);
  }
  return out;
}

void Broker::note_progress(const std::string& name, double fraction, std::string_view phase) {
  progress_[name] = {fraction, std::string(phase)};
}

std::optional<DomainInfo::Usage> Broker::usage_of(const Domain& d) {
  const auto& inst = d.instance();
  auto cpu = inst.cgroup.cpu_usage_us();
  if (!cpu) return std::nullopt;
  DomainInfo::Usage u{.cpu_us = *cpu};
  if (auto mem = inst.cgroup.memory_current()) {
    u.memory_bytes = *mem;
    u.memory_from = "cgroup";
  } else if (inst.pid > 0) {
    u.memory_bytes = static_cast<std::uint64_t>(
        std::max<std::int64_t>(metrics::resident_bytes("/proc/" + std::to_string(inst.pid)), 0));
    u.memory_from = "rss";
  }
  return u;
}

DomainInfo Broker::describe(const Domain& d) const {
  DomainInfo i;
  i.name = d.name();
  i.state = d.state();
  i.uid = d.instance().uid;
  i.pid = d.instance().pid;
  i.accel = lifecycle::to_string(d.instance().accel);
  i.job = d.job();
  i.console = d.instance().console_path;
  i.pooled = d.instance().pooled;
  i.spec = d.spec();
  i.devices = d.devices_json();
  if (auto p = progress_.find(d.name()); p != progress_.end() && !d.job().empty()) {
    i.job_progress = p->second.first;
    i.job_phase = p->second.second;
  }
  return i;
}

awaitable<void> Broker::settle_fdsets(Domain& d) {
  auto r = d.state() == RunState::running
               ? co_await close_held_fdsets(d, config_.timeouts.qmp)
               : co_await collect_fdsets(d, config_.timeouts.qmp);
  if (!r) log::warn("domain " + d.name() + ": " + r.error().describe());
}

template <class T, class F>
awaitable<Result<T>> Broker::run_job(std::string name, JobSpec job, F flow) {
  auto found = find(name);
  if (!found) co_return found.error();
  auto d = *found;
  if (d->state() == RunState::starting || d->state() == RunState::stopping ||
      d->state() == RunState::adopting || d->state() == RunState::unresponsive) {
    co_return Error(make_error_code(errc::wrong_state),
                    "domain " + name + " is " + std::string(to_string(d->state())));
  }
  const std::string kind = job.kind;
  const std::string target = job.target;
  const auto start = std::chrono::steady_clock::now();
  auto guard = d->begin_job(std::move(job.kind), std::move(job.target), std::move(job.args));
  if (!guard) co_return guard.error();
  // Journal the job before the first step, so a broker killed mid-flow can finish or undo it. A
  // job that cannot be journaled does not start.
  if (job.journal == Journal::around) {
    if (auto ok = co_await domains_.records().persist(*d); !ok) co_return ok.error();
  }
  events_.publish(name, "job", "started", {{"job", kind}, {"target", target}});
  Result<T> r = co_await flow(*d);
  if (job.journal != Journal::none && d->qmp() != nullptr) co_await settle_fdsets(*d);
  guard->release();
  progress_.erase(name);
  count_job(metrics(), kind, outcome_of(r), start);
  if (job.journal != Journal::none && domains_.contains(name)) {
    // A change the record does not hold is not acknowledged: the caller hears that it was made
    // but not recorded (a restart would not know it).
    if (auto ok = co_await domains_.records().persist(*d); !ok && r) {
      Error e = ok.error();
      e.context("domain " + name + ": " + kind + " was done but not recorded");
      co_return e;
    }
  }
  json::object data{{"job", kind}, {"ok", r.has_value()}};
  if (!r) {
    data["error"] = r.error().describe();
    log::warn("domain " + name + ": " + kind + " failed: " + r.error().describe(),
              {{"DOMAIN", name}, {"JOB", kind}});
  }
  events_.publish(name, "job", "finished", std::move(data));
  co_return r;
}

awaitable<Result<void>> Broker::command_job(std::string name, std::string job, qmp::Command command,
                                            std::optional<RunState> refused_in,
                                            std::optional<RunState> after) {
  // `command` lives in this frame until the job is done.
  auto step = [this, &command, refused_in, after](Domain& d) -> awaitable<Result<void>> {
    if (refused_in && d.state() == *refused_in) {
      co_return Error(make_error_code(errc::wrong_state),
                      "domain " + d.name() + " is already " + std::string(to_string(*refused_in)));
    }
    auto r = co_await qmp_call(d, std::move(command));
    if (!r) co_return r.error();
    if (after) d.set_state(*after);
    co_return Result<void>{};
  };
  // A run-state change is written back, so the record never says paused for a running guest.
  JobSpec spec{std::move(job), {}, {}, after ? Journal::after : Journal::none};
  co_return co_await run_job<void>(std::move(name), std::move(spec), step);
}

awaitable<Result<void>> Broker::pause(std::string name) {
  co_return co_await command_job(std::move(name), "pause", qmp::cmd::stop(), RunState::paused,
                                 RunState::paused);
}

awaitable<Result<void>> Broker::resume(std::string name) {
  co_return co_await command_job(std::move(name), "resume", qmp::cmd::cont(), RunState::running,
                                 RunState::running);
}

awaitable<Result<void>> Broker::shutdown(std::string name) {
  co_return co_await command_job(std::move(name), "shutdown", qmp::cmd::system_powerdown(),
                                 std::nullopt, std::nullopt);
}

awaitable<Result<void>> Broker::reset(std::string name) {
  co_return co_await command_job(std::move(name), "reset", qmp::cmd::system_reset(), std::nullopt,
                                 std::nullopt);
}

template <class T, class... Args>
awaitable<Result<T>> Broker::device_job(std::string name, JobSpec job,
                                        awaitable<Result<T>> (*flow)(flows::Context&, Domain&, Args...),
                                        Args... args) {
  return run_job<T>(std::move(name), std::move(job),
                    [this, flow, ... args = std::move(args)](Domain& d) {
                      return flow(flow_ctx_, d, args...);
                    });
}

awaitable<Result<void>> Broker::insert_medium(std::string name, std::string cdrom, InsertMedium m) {
  // The path is journaled: a restart that finds the new medium in QEMU records it as inserted.
  JobSpec job{"cdrom-insert", cdrom, {{"path", m.path}}, Journal::around};
  return device_job(std::move(name), std::move(job), &flows::insert_medium, std::move(cdrom),
                    std::move(m));
}

awaitable<Result<void>> Broker::eject_medium(std::string name, std::string cdrom, bool force) {
  JobSpec job{"cdrom-eject", cdrom, {}, Journal::around};
  return device_job(std::move(name), std::move(job), &flows::eject_medium, std::move(cdrom), force);
}

awaitable<Result<void>> Broker::add_disk(std::string name, DiskSpec disk) {
  // The request is journaled: a restart that finds the disk plugged records it whole.
  JobSpec job{"disk-add", disk.id, to_json(disk), Journal::around};
  return device_job(std::move(name), std::move(job), &flows::add_disk, std::move(disk));
}

awaitable<Result<void>> Broker::remove_disk(std::string name, std::string id, ProgressFn progress) {
  JobSpec job{"disk-remove", id, {}, Journal::around};
  return device_job(std::move(name), std::move(job), &flows::remove_disk, std::move(id),
                    std::move(progress));
}

awaitable<Result<void>> Broker::add_nic(std::string name, NicSpec nic) {
  JobSpec job{"nic-add", nic.id, to_json(nic), Journal::around};
  return device_job(std::move(name), std::move(job), &flows::add_nic, std::move(nic));
}

awaitable<Result<void>> Broker::remove_nic(std::string name, std::string id, ProgressFn progress) {
  JobSpec job{"nic-remove", id, {}, Journal::around};
  return device_job(std::move(name), std::move(job), &flows::remove_nic, std::move(id),
                    std::move(progress));
}

awaitable<Result<VncState>> Broker::set_vnc(std::string name, VncSpec vnc) {
  // The listen spec is journaled: a restart that finds QEMU on the new listener records it.
  JobSpec job{"vnc-set", "vnc", {{"listen", vnc.listen.text()}}, Journal::around};
  return device_job(std::move(name), std::move(job), &flows::set_vnc, std::move(vnc));
}

awaitable<Result<void>> Broker::remove_vnc(std::string name) {
  return device_job(std::move(name), JobSpec{"vnc-remove", "vnc", {}, Journal::around},
                    &flows::remove_vnc);
}

flows::CancelFlag Broker::enter_cancel(const std::string& name) {
  auto flag = std::make_shared<bool>(false);
  cancels_[name] = flag;
  return flag;
}

void Broker::forget_cancel(const std::string& name, const flows::CancelFlag& flag) {
  if (auto it = cancels_.find(name); it != cancels_.end() && it->second == flag) cancels_.erase(it);
}

awaitable<Result<void>> Broker::save_step(Domain& d, SaveRequest request, flows::CancelFlag cancel) {
  const bool keep = request.keep_running;
  auto r = co_await flows::save(flow_ctx_, d, std::move(request), std::move(cancel));
  if (!r || keep) co_return r;
  // As virsh save does: the state is safely on disk, the domain goes, killed by uid.
  auto found = find(d.name());
  if (!found) co_return Result<void>{};
  auto report = co_await domains_.teardown(*found, false, true);
  if (!report) {
    Error e = report.error();
    e.context("domain " + d.name() + " was saved but not destroyed");
    co_return e;
  }
  events_.publish(d.name(), "domain", "destroyed",
                  {{"killed", report->found}, {"method", report->method}, {"reason", "saved"}});
  co_return Result<void>{};
}

awaitable<Result<void>> Broker::save(std::string name, SaveRequest request) {
  auto found = find(name);
  if (!found) co_return found.error();
  // Journaled: a restarted broker cancels QEMU's side, removes the temp file and resumes a guest
  // the save had running (flows::recover_save).
  json::object args{{"path", request.path},
                    {"keep_running", request.keep_running},
                    {"was_running", (*found)->state() == RunState::running}};
  JobSpec job{"save", {}, std::move(args), Journal::around};
  // Checked here too, so a refused save never takes the cancel flag of the job that runs.
  if (!(*found)->job().empty()) {
    co_return Error(make_error_code(errc::busy), "domain " + name + " is busy with " + (*found)->job());
  }
  flows::CancelFlag cancel = enter_cancel(name);
  auto r = co_await run_job<void>(name, std::move(job), [this, &request, &cancel](Domain& d) {
    return save_step(d, std::move(request), cancel);
  });
  forget_cancel(name, cancel);
  co_return r;
}

awaitable<Result<DomainInfo>> Broker::restore(RestoreRequest request) {
  if (domains_.contains(request.name)) {
    Error e(make_error_code(errc::already_exists), "a domain named '" + request.name + "' exists");
    e.field = "name";
    co_return e;
  }
  const std::string name = request.name;
  flows::CancelFlag cancel = enter_cancel(name);
  const auto start = std::chrono::steady_clock::now();
  auto d = co_await flows::restore(flow_ctx_, domains_, std::move(request), cancel);
  count_job(metrics(), "restore", outcome_of(d), start);
  forget_cancel(name, cancel);
  if (!d) co_return d.error();
  co_return describe(**d);
}

awaitable<Result<std::string>> Broker::cancel_job(std::string name) {
  auto found = find(name);
  if (!found) co_return found.error();
  const std::string job = (*found)->job();
  auto it = cancels_.find(name);
  if (job.empty() || it == cancels_.end()) {
    co_return Error(make_error_code(errc::wrong_state),
                    "domain " + name + (job.empty() ? " runs no job" : "'s job " + job + " cannot be cancelled"));
  }
  *it->second = true;
  events_.publish(name, "job", "cancelling", {{"job", job}});
  co_return job;
}

namespace {

// What copy_storage asks of the domain: a migration to another broker on this host, and
// disk_paths naming only writable disks (flows::mirrored_disks).
Result<void> check_storage_copy(const Domain& d, const MigrateRequest& request) {
  if (!request.copy_storage) return {};
  if (request.to == "local") {
    return field_error("copy_storage", "a live update keeps the domain's disks; copy_storage is "
                                       "for a migration to another broker");
  }
  const auto mirrored = flows::mirrored_disks(d);
  for (const auto& [id, path] : request.disk_paths) {
    if (std::find(mirrored.begin(), mirrored.end(), id) == mirrored.end()) {
      return field_error("disk_paths." + id,
                         "domain " + d.name() + " has no writable disk " + id + " to copy");
    }
  }
  return {};
}

}  // namespace

awaitable<Result<void>> Broker::migrate(std::string name, MigrateRequest request, ProgressFn) {
  auto found = find(name);
  if (!found) co_return found.error();
  if (auto ok = check_storage_copy(**found, request); !ok) co_return ok.error();
  const std::string to = request.to;
  if (to == "local") co_return co_await live_update(std::move(name));
  if (to.starts_with("tcp://")) {
    if (auto target = parse_tcp_target(to); !target) co_return target.error();
    if (!config_.migration.usable()) {
      co_return field_error("to", "a migration to another host needs qbrokerd's --migration-cert, "
                                  "--migration-key and --migration-ca, or --insecure-migration");
    }
  } else if (to.empty() || to.front() != '/') {
    co_return field_error("to", "must be \"local\", the absolute path of another broker's API "
                                "socket, or tcp://HOST:PORT");
  }
  auto d = *found;
  if (d->state() != RunState::running && d->state() != RunState::paused) {
    co_return Error(make_error_code(errc::wrong_state),
                    "domain " + name + " is " + std::string(to_string(d->state())));
  }
  // Journaled: a restarted broker cancels QEMU's side and resumes the guest, unless the state
  // had all gone (flows::recover_migrate).
  const bool was_running = d->state() == RunState::running;
  auto guard = d->begin_job("migrate", {}, {{"to", to}, {"was_running", was_running},
                                            {"copy_storage", request.copy_storage}});
  if (!guard) co_return guard.error();
  if (auto ok = co_await domains_.records().persist(*d); !ok) co_return ok.error();
  events_.publish(name, "job", "started", {{"job", "migrate"}, {"target", to}});
  flows::CancelFlag cancel = enter_cancel(name);
  const auto start = std::chrono::steady_clock::now();
  auto moved = co_await migrate_out(d, std::move(request), cancel);
  count_job(metrics(), "migrate", outcome_of(moved), start);
  forget_cancel(name, cancel);
  progress_.erase(name);
  guard->release();
  json::object data{{"job", "migrate"}, {"ok", moved.has_value()}};
  if (!moved) {
    data["error"] = moved.error().describe();
    if (auto ok = co_await domains_.records().persist(*d); !ok) log::error(ok.error().describe());
    events_.publish(name, "job", "finished", std::move(data));
    co_return moved.error();
  }
  events_.publish(name, "job", "finished", std::move(data));
  co_await depart(d, to);
  co_return Result<void>{};
}

awaitable<void> Broker::depart(std::shared_ptr<Domain> d, std::string to) {
  // The domain runs at the destination: this QEMU and everything under its uid go, recorded
  // first as a destroy is, so a broker killed halfway leaves the next one the destroy to finish.
  const std::string name = d->name();
  d->destroying = true;
  if (auto ok = co_await domains_.records().persist(*d); !ok) log::warn(ok.error().describe());
  if (auto gone = co_await domains_.teardown(d, false, true); !gone) {
    log::error("domain " + name + " migrated to " + to +
               ", but the QEMU it left could not be torn down: " + gone.error().describe());
  }
  events_.publish(name, "domain", "migrated", {{"to", to}});
}

awaitable<void> Broker::settle_interrupted_migration(std::string name, json::object args) {
  auto found = find(name);
  if (!found) co_return;
  auto d = *found;
  const auto* to_value = args.if_contains("to");
  const auto* ran = args.if_contains("was_running");
  if (to_value == nullptr || !to_value->is_string()) co_return;
  const std::string to(to_value->get_string());
  const bool was_running = ran == nullptr || !ran->is_bool() || ran->get_bool();
  // Journaled again: a broker killed while it asks leaves the next one the same question.
  auto guard = d->begin_job("migrate", {}, std::move(args));
  if (!guard) {
    log::error("domain " + name + ": " + guard.error().describe());
    co_return;
  }
  if (auto ok = co_await domains_.records().persist(*d); !ok) log::warn(ok.error().describe());
  auto there = co_await arrived(to, name, !was_running);
  auto settled = co_await settle_arrival(*d, to, was_running, std::move(there));
  guard->release();
  if (!settled) {
    log::error("domain " + name + ": " + settled.error().describe());
    if (auto ok = co_await domains_.records().persist(*d); !ok) log::warn(ok.error().describe());
    co_return;
  }
  log::info("domain " + name + ": its interrupted migration to " + to + " had arrived there");
  co_await depart(d, to);
}

awaitable<Result<PeerReply>> Broker::query_remote(std::string to, std::string name) {
  auto target = parse_tcp_target(to);
  if (!target) co_return target.error();
  auto connected = co_await MigrationLink::connect(ex_, config_.migration_tls_client, *target,
                                                   config_.timeouts.qmp);
  if (!connected) co_return connected.error();
  std::shared_ptr<MigrationLink> link = std::move(*connected);
  const json::object ask{{"query", name}};
  auto sent = co_await link->write_message(ask);
  if (!sent) {
    link->close();
    co_return sent.error();
  }
  auto line = co_await link->read_message(kMaxLinkMessage, config_.timeouts.qmp);
  link->close();
  if (!line) co_return line.error();
  co_return peer_reply_of(*line);
}

awaitable<Result<void>> Broker::migrate_out(std::shared_ptr<Domain> d, MigrateRequest request,
                                            flows::CancelFlag cancel) {
  if (request.to.starts_with("tcp://")) {
    co_return co_await migrate_remote(std::move(d), std::move(request), cancel);
  }
  std::string to = std::move(request.to);
  const bool was_running = d->state() == RunState::running;
  json::object ask{{"domain", flows::described_domain_of(*d, request.disk_paths)},
                   {"paused", !was_running}};
  if (request.copy_storage) ask["copy_storage"] = true;
  std::string ask_text = json::serialize(ask);
  std::string route = "/v1/migrations";
  std::string post = "POST";
  auto prepared = co_await peer_request(ex_, to, post, route, ask_text, config_.start_timeout);
  if (!prepared) {
    Error e = prepared.error();
    e.field = "to";
    co_return e;
  }
  if (auto refused = refusal(to, *prepared)) co_return *refused;
  const auto& ticket = prepared->body.as_object();
  const auto* token = ticket.if_contains("token");
  const auto* endpoint = ticket.if_contains("endpoint");
  if (token == nullptr || !token->is_string() || endpoint == nullptr || !endpoint->is_string()) {
    co_return field_error("to", "the broker at " + to + " answered no token and endpoint");
  }
  std::string endpoint_path(endpoint->get_string());
  std::string token_text(token->get_string());
  flows::StorageCopy storage;
  if (request.copy_storage) {
    const auto* nbd = ticket.if_contains("nbd");
    storage.disks = flows::mirrored_disks(*d);
    if (!storage.disks.empty() && (nbd == nullptr || !nbd->is_string())) {
      co_return field_error("to", "the broker at " + to + " answered no NBD listener for copy_storage");
    }
    if (nbd != nullptr && nbd->is_string()) storage.nbd_endpoint = std::string(nbd->get_string());
  }
  auto sent = co_await flows::send_state(flow_ctx_, *d, std::move(endpoint_path),
                                         std::move(token_text), cancel, std::move(storage));
  if (!sent) co_return sent.error();
  auto there = co_await arrived(to, d->name(), !was_running);
  co_return co_await settle_arrival(*d, to, was_running, std::move(there));
}

awaitable<Result<void>> Broker::settle_arrival(Domain& d, const std::string& to, bool was_running,
                                               Result<bool> there) {
  if (there && *there) co_return Result<void>{};
  if (there) {
    // The destination gave the domain up: the guest is still whole here.
    if (was_running) {
      if (auto ok = co_await flows::resume_here(flow_ctx_, d); !ok) co_return ok.error();
    }
    co_return Error(make_error_code(errc::qemu_error),
                    "the broker at " + to + " did not take the domain; it runs here again");
  }
  Error e = there.error();
  e.context("the state went to " + to +
            ", which cannot say whether it runs the guest: the domain stays paused here, so that "
            "it never runs twice; destroy it here once it runs there, or resume it");
  co_return e;
}

awaitable<Result<fdpass::UniqueFd>> Broker::open_nbd_link(const TcpTarget& target,
                                                          const std::string& token,
                                                          std::vector<std::shared_ptr<MigrationLink>>& links) {
  auto connected = co_await MigrationLink::connect(ex_, config_.migration_tls_client, target,
                                                   config_.start_timeout);
  if (!connected) co_return connected.error();
  std::shared_ptr<MigrationLink> link = std::move(*connected);
  const json::object ask{{"nbd", token}};
  if (auto sent = co_await link->write_message(ask); !sent) {
    link->close();
    co_return sent.error();
  }
  auto line = co_await link->read_message(kMaxLinkMessage, config_.start_timeout);
  if (!line) {
    link->close();
    co_return line.error();
  }
  if (PeerReply r = peer_reply_of(*line); r.status != 200) {
    link->close();
    co_return Error(make_error_code(errc::qemu_error),
                    "copy_storage: the destination refused an NBD connection: " + json::serialize(*line));
  }
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    link->close();
    co_return Error(std::error_code(errno, std::system_category()), "copy_storage: socketpair");
  }
  fdpass::UniqueFd relay_end(sv[0]);
  fdpass::UniqueFd qemu_end(sv[1]);
  links.push_back(link);
  asio::co_spawn(ex_, run_relay_both_ways(link, std::move(relay_end)), asio::detached);
  co_return qemu_end;
}

awaitable<Result<void>> Broker::migrate_remote(std::shared_ptr<Domain> d, MigrateRequest request,
                                               flows::CancelFlag cancel) {
  const std::string to = request.to;
  auto target = parse_tcp_target(to);
  if (!target) co_return target.error();
  const bool was_running = d->state() == RunState::running;
  auto connected = co_await MigrationLink::connect(ex_, config_.migration_tls_client, *target,
                                                   config_.start_timeout);
  if (!connected) co_return connected.error();
  std::shared_ptr<MigrationLink> link = std::move(*connected);
  json::object ask{{"domain", flows::described_domain_of(*d, request.disk_paths)},
                   {"paused", !was_running}};
  if (request.copy_storage) ask["copy_storage"] = true;
  if (auto ok = co_await link->write_message(ask); !ok) co_return ok.error();
  // The destination spawns and plugs the domain before it answers.
  auto answer = co_await link->read_message(kMaxLinkMessage, config_.start_timeout);
  if (!answer) co_return answer.error();
  PeerReply prepared = peer_reply_of(*answer);
  if (auto refused = refusal(to, prepared)) co_return *refused;
  flows::StorageCopy storage;
  if (request.copy_storage) storage.disks = flows::mirrored_disks(*d);
  const auto* nbd = prepared.body.as_object().if_contains("nbd");
  if (!storage.disks.empty() && (nbd == nullptr || !nbd->is_string())) {
    link->close();
    co_return field_error("to", "the broker at " + to + " answered no NBD token for copy_storage");
  }
  std::vector<std::shared_ptr<MigrationLink>> nbd_links;
  for (const auto& id : storage.disks) {
    auto opened = co_await open_nbd_link(*target, std::string(nbd->get_string()), nbd_links);
    if (!opened) {
      // The destination tears its half down once the main connection ends.
      link->close();
      close_links(nbd_links);
      co_return opened.error();
    }
    storage.connected.emplace(id, std::move(*opened));
  }

  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    co_return Error(std::error_code(errno, std::system_category()), "migration: socketpair");
  }
  fdpass::UniqueFd relay_end(sv[0]);
  fdpass::UniqueFd qemu_end(sv[1]);
  widen_relay_buffers(relay_end.get());
  widen_relay_buffers(qemu_end.get());
  auto relayed = std::make_shared<RelayWatch>(ex_);
  asio::co_spawn(ex_, watch_relay(link, std::move(relay_end), RelayDirection::from_local, relayed),
                 asio::detached);
  auto sent = co_await flows::send_state_fd(flow_ctx_, *d, std::move(qemu_end), cancel,
                                            std::move(storage));
  // The NBD connections ended with their nodes (or will with QEMU): nothing more goes over them.
  close_links(nbd_links);
  if (!sent) {
    // The destination sees the connection end and tears its half down by uid.
    link->close();
    co_await wait_relay(*relayed, config_.timeouts.qmp);
    co_return sent.error();
  }
  // QEMU closes its end once it has written the last byte; the relay then has sent it all.
  co_await wait_relay(*relayed, config_.timeouts.migrate_settle);
  Result<bool> there = Error(make_error_code(errc::qemu_timeout),
                             "the relay to " + to + " did not finish sending the state");
  if (relayed->result && !*relayed->result) there = relayed->result->error();
  if (relayed->result && *relayed->result) {
    auto last = co_await link->read_message(kMaxLinkMessage, config_.timeouts.migrate_settle);
    if (!last) {
      there = last.error();
    } else {
      PeerReply r = peer_reply_of(*last);
      const auto* state = r.body.is_object() ? r.body.as_object().if_contains("state") : nullptr;
      const std::string want = was_running ? "running" : "paused";
      if (r.status == 200 && state != nullptr && state->is_string() && state->get_string() == want) {
        there = true;
      } else if (r.status >= 400) {
        there = false;
      } else {
        there = Error(make_error_code(errc::qemu_error),
                      "the broker at " + to + " answered " + json::serialize(*last));
      }
    }
  }
  link->close();
  co_return co_await settle_arrival(*d, to, was_running, std::move(there));
}

awaitable<Result<bool>> Broker::arrived(std::string to, std::string name, bool paused) {
  const auto deadline = std::chrono::steady_clock::now() + config_.timeouts.migrate_settle;
  std::string route = "/v1/domains/" + name;
  std::string get = "GET";
  asio::steady_timer tick(ex_);
  for (;;) {
    Result<PeerReply> r = Error(make_error_code(errc::internal), "no answer");
    if (to.starts_with("tcp://")) {
      r = co_await query_remote(to, name);
    } else {
      r = co_await peer_request(ex_, to, get, route, {}, config_.timeouts.qmp);
    }
    if (r && r->status == 404) co_return false;
    if (r && r->status == 200 && r->body.is_object()) {
      const auto& o = r->body.as_object();
      const auto* state = o.if_contains("state");
      const auto* job = o.if_contains("job");
      const bool settled =
          job == nullptr || job->is_null() || (job->is_string() && job->get_string().empty());
      const std::string want = paused ? "paused" : "running";
      if (settled && state != nullptr && state->is_string() && state->get_string() == want) {
        co_return true;
      }
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      co_return Error(make_error_code(errc::qemu_timeout),
                      "the broker at " + to + " did not report domain " + name + " " +
                          (paused ? "paused" : "running"));
    }
    // Short: the guest runs nowhere while this waits, and a GET costs the destination little.
    tick.expires_after(std::chrono::milliseconds(2));
    co_await tick.async_wait(asio::as_tuple(asio::use_awaitable));
  }
}

awaitable<Result<Broker::IncomingTicket>> Broker::incoming(json::value domain, bool paused,
                                                          bool copy_storage, bool same_host,
                                                          std::shared_ptr<IncomingWatch> watch) {
  const std::string dir = launcher_.config().run_dir + "/migrate";
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    co_return Error(std::error_code(errno, std::system_category()), "cannot make " + dir);
  }
  flows::IncomingRequest request{std::move(domain), paused, dir, copy_storage, same_host};
  auto in = co_await flows::prepare_incoming(flow_ctx_, domains_, std::move(request));
  if (!in) co_return in.error();
  IncomingTicket ticket{in->domain->name(), in->token, in->endpoint, in->nbd_endpoint};
  flows::CancelFlag cancel = enter_cancel(ticket.name);
  asio::co_spawn(ex_, finish_incoming(std::move(*in), cancel, std::move(watch)), asio::detached);
  co_return ticket;
}

awaitable<void> Broker::finish_incoming(flows::Incoming in, flows::CancelFlag cancel,
                                        std::shared_ptr<IncomingWatch> watch) {
  const std::string name = in.domain->name();
  const auto start = std::chrono::steady_clock::now();
  auto done = co_await flows::receive_incoming(flow_ctx_, domains_, std::move(in),
                                               config_.timeouts.migrate_settle, cancel);
  count_job(metrics(), "incoming", outcome_of(done), start);
  forget_cancel(name, cancel);
  progress_.erase(name);
  if (!done) log::warn("domain " + name + ": incoming migration: " + done.error().describe());
  if (watch) {
    watch->result = std::move(done);
    watch->wake.cancel();
  }
}

awaitable<Result<void>> Broker::live_update(std::string name) {
  auto found = find(name);
  if (!found) co_return found.error();
  auto old = *found;
  if (old->state() != RunState::running && old->state() != RunState::paused) {
    co_return Error(make_error_code(errc::wrong_state),
                    "domain " + name + " is " + std::string(to_string(old->state())));
  }
  // Not run_job: the job's domain is replaced by another, and its record is rewritten by the
  // flow. Journaled like a save, so a restart cancels the migration and resumes the old guest.
  const bool was_running = old->state() == RunState::running;
  auto guard = old->begin_job("live-update", {}, {{"was_running", was_running}});
  if (!guard) co_return guard.error();
  if (auto ok = co_await domains_.records().persist(*old); !ok) co_return ok.error();
  events_.publish(name, "job", "started", {{"job", "live-update"}, {"target", ""}});
  flows::CancelFlag cancel = enter_cancel(name);
  const auto start = std::chrono::steady_clock::now();
  auto next = co_await flows::live_update(flow_ctx_, domains_, old, cancel);
  count_job(metrics(), "live-update", outcome_of(next), start);
  forget_cancel(name, cancel);
  guard->release();
  progress_.erase(name);
  json::object data{{"job", "live-update"}, {"ok", next.has_value()}};
  if (!next) {
    data["error"] = next.error().describe();
    // The old QEMU runs on; its record loses the journal.
    if (auto ok = co_await domains_.records().persist(*old); !ok) log::error(ok.error().describe());
    events_.publish(name, "job", "finished", std::move(data));
    co_return next.error();
  }
  events_.publish(name, "job", "finished", std::move(data));
  events_.publish(name, "domain", "updated",
                  {{"uid", (*next)->instance().uid}, {"pid", (*next)->instance().pid}});
  co_return Result<void>{};
}

awaitable<Result<Broker::QemuCapabilities>> Broker::qemu_capabilities() {
  auto binary = qmp::BinaryId::of(launcher_.config().qemu.binary);
  if (!binary) co_return from_qmp(binary.error(), "QEMU binary " + launcher_.config().qemu.binary);
  if (auto cached = capabilities_.find(*binary)) {
    co_return QemuCapabilities{cached, capabilities_from_};
  }
  Error last(make_error_code(errc::qemu_gone), "no domain runs a QEMU to probe");
  // A copy: domains may come and go while a probe waits (each is kept alive by its pointer).
  std::vector<std::shared_ptr<Domain>> candidates;
  for (const auto& [name, d] : domains_.all()) {
    if (d->state() == RunState::running || d->state() == RunState::paused) candidates.push_back(d);
  }
  for (const auto& d : candidates) {
    if (d->qmp() == nullptr || !d->qmp()->is_open()) continue;
    const std::string from = d->name();
    auto caps = co_await capabilities_.get(*binary, *d->qmp(), qmp::after(config_.timeouts.qmp * 3));
    if (!caps) {
      last = from_qmp(caps.error(), "probing QEMU through domain " + from);
      log::warn(last.describe());
      continue;
    }
    capabilities_from_ = from;
    co_return QemuCapabilities{*caps, from};
  }
  co_return last;
}

awaitable<Result<json::value>> Broker::qmp_passthrough(std::string name, QmpPassthrough command) {
  auto found = find(name);
  if (!found) co_return found.error();
  co_return co_await qmp_call(**found, qmp::cmd::raw(command.execute, std::move(command.arguments)));
}

awaitable<void> Broker::resume_removal(flows::RecoveryReport::Removal removal) {
  // device_del again: QEMU answers that the unplug is under way (or starts it), and the flow
  // waits for the guest and frees what is left, as if the first broker had lived.
  const auto& [name, job] = removal;
  ProgressFn none;
  Result<void> r = Error(make_error_code(errc::internal), "not a removal: " + job.kind);
  if (job.kind == "migrate") {
    co_await settle_interrupted_migration(name, job.args);
    co_return;
  }
  if (job.kind == "disk-remove") r = co_await remove_disk(name, job.target, none);
  if (job.kind == "nic-remove") r = co_await remove_nic(name, job.target, none);
  if (r) {
    log::info("domain " + name + ": finished the interrupted " + job.kind + " " + job.target);
  } else {
    log::error("domain " + name + ": interrupted " + job.kind + " " + job.target + ": " +
               r.error().describe() + "; retry the removal");
  }
}

awaitable<Broker::RecoveryReport> Broker::recover() {
  auto report = co_await flows::recover(flow_ctx_, domains_, resume_);
  domains_.pool().start();
  co_return report;
}

std::size_t Broker::load_records() {
  loaded_ = flows::load(domains_);
  return loaded_.size();
}

awaitable<Broker::RecoveryReport> Broker::adopt_loaded() {
  auto report = co_await flows::adopt_all(flow_ctx_, domains_, std::exchange(loaded_, {}), resume_);
  domains_.pool().start();
  co_return report;
}

}  // namespace broker
